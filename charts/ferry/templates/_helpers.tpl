{{/*
The ferry image, used for the webhook container and as the injected sidecar
(FERRY_SIDECAR_IMAGE): set once, in .Values.image.
*/}}
{{- define "ferry.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "ferry.labels" -}}
app.kubernetes.io/part-of: ferry
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The webhook pods' selector (as in manifests/base). */}}
{{- define "ferry.selectorLabels" -}}
app.kubernetes.io/name: {{ .Values.name }}
{{- end -}}

{{/* The Service's DNS name, which the serving certificate must carry. */}}
{{- define "ferry.serviceHost" -}}
{{- printf "%s.%s.svc" .Values.name .Release.Namespace -}}
{{- end -}}

{{/* The Secret holding the serving certificate (tls.crt, tls.key, ca.crt). */}}
{{- define "ferry.tlsSecret" -}}
{{- printf "%s-tls" .Values.name -}}
{{- end -}}

{{/* The AdmissionReview the `helm test` Pod sends: an opted-in replica pod. */}}
{{- define "ferry.testReview" -}}
{{- $pod := dict
  "apiVersion" "v1" "kind" "Pod"
  "metadata" (dict
    "name" "ferry-helm-test-0" "namespace" "ferry-helm-test"
    "labels" (dict "ferry.io/inject" "true")
    "annotations" (dict
      "ferry.io/volume" "data" "ferry.io/role" "replica" "ferry.io/name" "helm-test"
      "ferry.io/peers" "helm-test-peer=peer.example.com:7443"))
  "spec" (dict
    "volumes" (list (dict "name" "data" "emptyDir" (dict)))
    "containers" (list (dict "name" "app" "image" "registry.example.com/app:1"
      "volumeMounts" (list (dict "name" "data" "mountPath" "/data"))))) -}}
{{- $review := dict
  "apiVersion" "admission.k8s.io/v1" "kind" "AdmissionReview"
  "request" (dict
    "uid" "00000000-0000-4000-8000-00000000f377"
    "kind" (dict "group" "" "version" "v1" "kind" "Pod")
    "resource" (dict "group" "" "version" "v1" "resource" "pods")
    "namespace" "ferry-helm-test" "operation" "CREATE" "dryRun" true
    "userInfo" (dict "username" "helm-test")
    "object" $pod) -}}
{{- toJson $review -}}
{{- end -}}
