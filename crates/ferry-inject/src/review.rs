//! AdmissionReview in, AdmissionReview out: the webhook without the server.

use base64::Engine as _;
use kube_core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube_core::{DynamicObject, Status};
use serde_json::Value;

use crate::error::ReviewError;
use crate::plan::{self, Outcome};

/// The only AdmissionReview version served (the API server sends the first it
/// shares with the webhook's `admissionReviewVersions`).
const API_VERSION: &str = "admission.k8s.io/v1";
const KIND: &str = "AdmissionReview";

/// What was decided, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The sidecar was injected.
    Injected,
    /// Allowed without changes (not opted in, already injected, not a Pod CREATE).
    Unchanged,
    /// Denied.
    Denied,
}

impl Decision {
    /// A short word for logs and audit annotations.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Injected => "injected",
            Decision::Unchanged => "unchanged",
            Decision::Denied => "denied",
        }
    }
}

/// One answered review.
#[derive(Debug, Clone)]
pub struct Reviewed {
    /// The AdmissionReview response, JSON.
    pub body: Vec<u8>,
    /// The request's uid.
    pub uid: String,
    /// `namespace/name` of the pod (`generateName*` when it has no name yet).
    pub pod: String,
    /// What was decided.
    pub decision: Decision,
    /// Why (the denial message, or why nothing changed).
    pub detail: String,
}

/// Answers one AdmissionReview (`admission.k8s.io/v1`) for a Pod: returns the
/// response review as JSON. An error means the request itself is malformed (the
/// server answers HTTP 400); a bad pod is a denial inside a normal response.
pub fn mutate(review_json: &[u8], image: &str) -> Result<Vec<u8>, ReviewError> {
    review(review_json, image).map(|r| r.body)
}

/// Like [`mutate`], with what was decided.
pub fn review(review_json: &[u8], image: &str) -> Result<Reviewed, ReviewError> {
    let value: Value = serde_json::from_slice(review_json).map_err(ReviewError::NotJson)?;
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
    if api_version != API_VERSION || kind != KIND {
        return Err(ReviewError::NotAdmissionReview {
            api_version: api_version.to_owned(),
            kind: kind.to_owned(),
        });
    }
    let raw_object = value.pointer("/request/object").cloned();
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_value(value).map_err(ReviewError::Malformed)?;
    let req: AdmissionRequest<DynamicObject> =
        review.try_into().map_err(|_| ReviewError::NoRequest)?;

    let namespace = req.namespace.clone().unwrap_or_default();
    let mut response = AdmissionResponse::from(&req);
    let is_pod = req.kind.group.is_empty() && req.kind.kind == "Pod";
    if !is_pod || req.operation != Operation::Create {
        if !is_pod {
            response.warnings = Some(vec![format!(
                "ferry-inject mutates only Pods; {}/{} was let through unchanged (check the webhook's rules)",
                req.kind.group, req.kind.kind
            )]);
        }
        return finish(
            response,
            None,
            &req,
            format!("{namespace}/{}", req.name),
            Decision::Unchanged,
            "not a Pod CREATE".to_owned(),
        );
    }

    let pod = match raw_object {
        Some(p) if p.is_object() => p,
        _ => return Err(ReviewError::NoObject),
    };
    let outcome = plan::plan(&pod, image).map_err(ReviewError::NotAPod)?;
    let pod_name = format!("{namespace}/{}", display_name(&pod));

    match outcome {
        Outcome::Unchanged { why, warnings } => {
            set_warnings(&mut response, warnings);
            finish(
                response,
                None,
                &req,
                pod_name,
                Decision::Unchanged,
                why.to_owned(),
            )
        }
        Outcome::Deny { problems, warnings } => {
            let message = format!(
                "ferry-inject: {}",
                problems
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            set_warnings(&mut response, warnings);
            let mut response = response.deny(&message);
            response.result = Status::failure(&message, "Forbidden").with_code(403);
            finish(response, None, &req, pod_name, Decision::Denied, message)
        }
        Outcome::Inject {
            patch,
            warnings,
            status,
        } => {
            set_warnings(&mut response, warnings);
            let patch_bytes =
                serde_json::to_vec(&patch).map_err(|e| ReviewError::Internal(Box::new(e)))?;
            let response = response
                .with_patch(patch)
                .map_err(|e| ReviewError::Internal(Box::new(e)))?;
            finish(
                response,
                Some(patch_bytes),
                &req,
                pod_name,
                Decision::Injected,
                format!("{} into volume {:?}", status.mode, status.volume),
            )
        }
    }
}

/// Most warnings returned at once: clients show them one per line, and the API
/// server truncates long lists anyway.
const MAX_WARNINGS: usize = 16;

fn set_warnings(response: &mut AdmissionResponse, mut warnings: Vec<String>) {
    if warnings.len() > MAX_WARNINGS {
        let more = warnings.len() - (MAX_WARNINGS - 1);
        warnings.truncate(MAX_WARNINGS - 1);
        warnings.push(format!("... and {more} more ferry-inject warnings"));
    }
    if !warnings.is_empty() {
        response.warnings = Some(warnings);
    }
}

/// Serialises the response review. kube-core writes the patch as an array of
/// numbers (which the API server also accepts); it is replaced by the base64 string
/// the API documents, a quarter of the size.
fn finish(
    mut response: AdmissionResponse,
    patch: Option<Vec<u8>>,
    req: &AdmissionRequest<DynamicObject>,
    pod: String,
    decision: Decision,
    detail: String,
) -> Result<Reviewed, ReviewError> {
    response
        .audit_annotations
        .insert("decision".to_owned(), decision.as_str().to_owned());
    let mut value = serde_json::to_value(response.into_review())
        .map_err(|e| ReviewError::Internal(Box::new(e)))?;
    if let (Some(bytes), Some(slot)) = (patch, value.pointer_mut("/response/patch")) {
        *slot = Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    let body = serde_json::to_vec(&value).map_err(|e| ReviewError::Internal(Box::new(e)))?;
    Ok(Reviewed {
        body,
        uid: req.uid.clone(),
        pod,
        decision,
        detail,
    })
}

/// The pod's name, or `generateName*`, from the raw object.
fn display_name(pod: &Value) -> String {
    let meta = |k: &str| {
        pod.pointer(&format!("/metadata/{k}"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    match (meta("name"), meta("generateName")) {
        (Some(n), _) => n.to_owned(),
        (None, Some(g)) => format!("{g}*"),
        (None, None) => "(unnamed)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn review_of(pod: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u-1",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "ns",
                "operation": "CREATE",
                "userInfo": {"username": "tester"},
                "object": pod,
            }
        }))
        .unwrap_or_default()
    }

    fn answer(pod: Value) -> Value {
        match mutate(&review_of(pod), "img") {
            Ok(body) => serde_json::from_slice(&body).unwrap_or(Value::Null),
            Err(e) => panic!("refused: {e}"),
        }
    }

    fn pod(annotations: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "labels": {"ferry.io/inject": "true"}, "annotations": annotations},
            "spec": {
                "securityContext": {"runAsUser": 1},
                "containers": [{"name": "app", "image": "app"}],
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "c"}}]
            }
        })
    }

    /// The envelope the API server decodes: apiVersion/kind echoed, uid echoed,
    /// the patch as a base64 string with its type, a Status on denial.
    #[test]
    fn response_envelope() {
        let ok = answer(pod(
            json!({"ferry.io/volume": "data", "ferry.io/peers": "b=h:1"}),
        ));
        assert_eq!(ok["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(ok["kind"], "AdmissionReview");
        assert!(ok.get("request").is_none());
        let r = &ok["response"];
        assert_eq!(r["uid"], "u-1");
        assert_eq!(r["allowed"], true);
        assert_eq!(r["patchType"], "JSONPatch");
        let patch = r["patch"].as_str().unwrap_or_default();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(patch)
            .unwrap_or_default();
        let ops: Value = serde_json::from_slice(&decoded).unwrap_or(Value::Null);
        assert_eq!(ops[0]["op"], "add");
        assert_eq!(r["auditAnnotations"], json!({"decision": "injected"}));

        let denied = answer(pod(json!({"ferry.io/peers": "b=h:1"})));
        let r = &denied["response"];
        assert_eq!(r["allowed"], false);
        assert!(r.get("patch").is_none() && r.get("patchType").is_none());
        assert_eq!(r["status"]["code"], 403);
        assert_eq!(r["status"]["status"], "Failure");
        assert_eq!(r["status"]["reason"], "Forbidden");
        let msg = r["status"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.starts_with("ferry-inject: annotation ferry.io/volume: is required"),
            "{msg}"
        );
        assert_eq!(r["auditAnnotations"], json!({"decision": "denied"}));
    }
}
