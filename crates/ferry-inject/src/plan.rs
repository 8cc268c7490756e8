//! Decides what to do with one Pod and computes the JSON Patch.
//!
//! Pure: raw Pod JSON in, an [`Outcome`] out. The patch is a handful of targeted
//! `add` operations against the raw object, so nothing the injector does not touch
//! can change (fields unknown to our Kubernetes types included).

use std::collections::BTreeSet;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ordinal;
use crate::pod::PodView;
use crate::settings::{self, key, Problem, Settings, INJECT_LABEL, PREFIX, STATUS_ANNOTATION};
use crate::sidecar::{self, RunAs, CONTAINER_NAME, DEFAULT_UID, TLS_VOLUME};

/// Volume sources the sidecar cannot write to: the kubelet mounts them read-only.
const READ_ONLY_KINDS: &[&str] = &["configMap", "secret", "projected", "downwardAPI", "image"];

/// The prefix of the annotations Prometheus' pod discovery reads by convention.
const PROMETHEUS_PREFIX: &str = "prometheus.io/";

/// What the injector decided for one Pod.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Allowed as it is: not opted in, or already injected.
    Unchanged {
        why: &'static str,
        warnings: Vec<String>,
    },
    /// Allowed with this patch.
    Inject {
        patch: Patch,
        warnings: Vec<String>,
        status: InjectStatus,
    },
    /// Denied; every problem is listed.
    Deny {
        problems: Vec<Problem>,
        warnings: Vec<String>,
    },
}

/// What was injected, recorded as JSON in the `ferry.io/status` annotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct InjectStatus {
    /// The injector's version.
    pub version: String,
    /// `native-sidecar` or `container`.
    pub mode: String,
    pub container: String,
    pub image: String,
    pub volume: String,
    #[serde(rename = "tlsVolume")]
    pub tls_volume: String,
    /// The StatefulSet ordinal whose `{ordinal}` placeholders were replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordinal: Option<u32>,
}

/// Plans the mutation of `pod` (the raw `request.object`). Fails only when the
/// object is not shaped like a Pod.
pub(crate) fn plan(pod: &Value, default_image: &str) -> Result<Outcome, serde_json::Error> {
    let view = PodView::deserialize(pod)?;
    let meta = &view.metadata;

    match meta.labels.get(INJECT_LABEL).map(String::as_str) {
        Some("true") => {}
        None | Some("false") => {
            return Ok(Outcome::Unchanged {
                why: "not opted in",
                warnings: Vec::new(),
            })
        }
        Some(other) => {
            return Ok(Outcome::Deny {
                problems: vec![Problem {
                    subject: format!("label {INJECT_LABEL}"),
                    message: format!("{other:?} is neither \"true\" nor \"false\""),
                }],
                warnings: Vec::new(),
            })
        }
    }

    let has_sidecar = view.all_containers().any(|c| c.name == CONTAINER_NAME);
    let has_status = meta.annotations.contains_key(STATUS_ANNOTATION);
    if has_sidecar && has_status {
        return Ok(Outcome::Unchanged {
            why: "already injected",
            warnings: Vec::new(),
        });
    }

    let mut warnings = settings::unknown_key_warnings(&meta.annotations);
    // A StatefulSet pod's ordinal replaces `{ordinal}` in the name, the
    // peers and the TLS Secret (ordinal.rs).
    let uses_ordinal = ordinal::uses_placeholder(&meta.annotations);
    let ordinal = match ordinal::ordinal(meta) {
        Ok(o) => o,
        // labels no controller would write matter only to a pod that needs them
        Err(problem) if uses_ordinal => {
            return Ok(Outcome::Deny {
                problems: vec![problem],
                warnings,
            })
        }
        Err(_) => None,
    };
    let pod_name = if meta.name.is_empty() {
        meta.labels
            .get(ordinal::POD_NAME_LABEL)
            .map_or("", String::as_str)
    } else {
        meta.name.as_str()
    };
    let annotations = match ordinal::substitute(&meta.annotations, ordinal, pod_name) {
        Ok(a) => a,
        Err(problems) => return Ok(Outcome::Deny { problems, warnings }),
    };
    let settings = match settings::parse(&annotations, default_image) {
        Ok(s) => s,
        Err(problems) => return Ok(Outcome::Deny { problems, warnings }),
    };

    let problems = check_pod(&view, &settings, has_sidecar, &mut warnings);
    if !problems.is_empty() {
        return Ok(Outcome::Deny { problems, warnings });
    }

    let run_as = sidecar_user(&view, &mut warnings);
    if !settings.native_sidecar && !matches!(view.spec.restart_policy.as_str(), "" | "Always") {
        warnings.push(format!(
            "{PREFIX}{}=\"false\" on a pod with restartPolicy {}: the ferry container keeps running, \
             so the pod never completes; use native sidecars",
            key::NATIVE_SIDECAR,
            view.spec.restart_policy
        ));
    }

    let status = InjectStatus {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        mode: if settings.native_sidecar {
            "native-sidecar"
        } else {
            "container"
        }
        .to_owned(),
        container: CONTAINER_NAME.to_owned(),
        image: settings.image.clone(),
        volume: settings.volume.clone(),
        tls_volume: TLS_VOLUME.to_owned(),
        ordinal: ordinal.filter(|_| uses_ordinal),
    };
    let patch = build_patch(pod, &view, &settings, &status, run_as)?;
    Ok(Outcome::Inject {
        patch,
        warnings,
        status,
    })
}

/// Chooses the sidecar's user: the pod's `runAsUser`; else the one user all app
/// containers run as; else [`DEFAULT_UID`], with a warning. Never root: the sidecar
/// sets `runAsNonRoot`, and the kubelet would refuse to start it as UID 0.
fn sidecar_user(view: &PodView, warnings: &mut Vec<String>) -> RunAs {
    let fallback = RunAs::Set {
        uid: DEFAULT_UID,
        gid: Some(DEFAULT_UID),
    };
    match view.spec.security_context.run_as_user {
        Some(0) => {
            warnings.push(format!(
                "the pod runs as root (runAsUser: 0): ferry runs as UID {DEFAULT_UID} \
                 and replicates only files that user can read and write"
            ));
            return fallback;
        }
        Some(_) => return RunAs::Inherit,
        None => {}
    }
    let users: BTreeSet<Option<i64>> = view
        .spec
        .containers
        .iter()
        .map(|c| c.security_context.run_as_user)
        .collect();
    let groups: BTreeSet<Option<i64>> = view
        .spec
        .containers
        .iter()
        .map(|c| c.security_context.run_as_group)
        .collect();
    match (users.len(), users.first()) {
        (1, Some(&Some(uid))) if uid != 0 => RunAs::Set {
            uid,
            gid: match (groups.len(), groups.first()) {
                (1, Some(&gid)) => gid,
                _ => None,
            },
        },
        _ => {
            warnings.push(format!(
                "no runAsUser in the pod's securityContext (nor one shared by its containers): ferry runs as \
                 UID {DEFAULT_UID}; set runAsUser and fsGroup so it can use the app's files"
            ));
            fallback
        }
    }
}

/// Checks the annotations against the pod itself.
fn check_pod(
    view: &PodView,
    s: &Settings,
    has_sidecar: bool,
    warnings: &mut Vec<String>,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    let pod_problem = |message: String| Problem {
        subject: "pod".to_owned(),
        message,
    };

    if has_sidecar {
        problems.push(pod_problem(format!(
            "already has a container named {CONTAINER_NAME:?} that ferry did not inject \
             (no {STATUS_ANNOTATION} annotation); rename that container"
        )));
    }
    if view.spec.volumes.iter().any(|v| v.name == TLS_VOLUME) {
        problems.push(pod_problem(format!(
            "already has a volume named {TLS_VOLUME:?}, which ferry uses for its TLS Secret; rename that volume"
        )));
    }

    match view.spec.volumes.iter().find(|v| v.name == s.volume) {
        None => {
            let names: Vec<&str> = view.spec.volumes.iter().map(|v| v.name.as_str()).collect();
            problems.push(Problem::annotation(
                key::VOLUME,
                format!(
                    "{:?} is not a volume of this pod; use one of spec.volumes: {}",
                    s.volume,
                    if names.is_empty() {
                        "(the pod has none)".to_owned()
                    } else {
                        names.join(", ")
                    }
                ),
            ));
        }
        Some(v) => {
            let read_only_kind = v
                .source
                .keys()
                .find(|k| READ_ONLY_KINDS.contains(&k.as_str()));
            let kind = read_only_kind.map_or_else(|| v.kind().unwrap_or(""), String::as_str);
            if read_only_kind.is_some() {
                problems.push(Problem::annotation(
                    key::VOLUME,
                    format!(
                        "{:?} is a {kind} volume, which is read-only; replicate a writable volume \
                         such as a persistentVolumeClaim",
                        s.volume
                    ),
                ));
            } else if v.source_read_only() {
                problems.push(Problem::annotation(
                    key::VOLUME,
                    format!(
                        "{:?} is mounted with {kind}.readOnly: true; ferry must write to it (its \
                         state dir lives there, and a replica applies changes); remove readOnly",
                        s.volume
                    ),
                ));
            } else if kind == "emptyDir" {
                warnings.push(format!(
                    "volume {:?} is an emptyDir: its data and ferry's state vanish with the pod, \
                     so every restart is a full resync",
                    s.volume
                ));
            }
        }
    }

    for (port, port_key) in [
        (s.quic_port, key::QUIC_PORT),
        (s.metrics_port, key::METRICS_PORT),
    ] {
        if let Some(c) = view
            .all_containers()
            .find(|c| c.ports.iter().any(|p| p.container_port == i64::from(port)))
        {
            problems.push(Problem::annotation(
                port_key,
                format!(
                    "port {port} is already declared by container {:?}; set {PREFIX}{port_key} to a free port",
                    c.name
                ),
            ));
        }
    }
    if view.spec.host_network {
        warnings.push(format!(
            "the pod uses hostNetwork: ferry's ports {} (UDP) and {} (TCP) are opened on the node",
            s.quic_port, s.metrics_port
        ));
    }
    problems
}

/// The targeted patch: the sidecar, the TLS volume, and annotations.
fn build_patch(
    raw: &Value,
    view: &PodView,
    s: &Settings,
    status: &InjectStatus,
    run_as: RunAs,
) -> Result<Patch, serde_json::Error> {
    let add = |tokens: &[&str], value: Value| {
        PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(tokens.iter().copied()),
            value,
        })
    };
    let is_array = |p: &str| raw.pointer(p).is_some_and(Value::is_array);
    let mut ops = Vec::new();

    let container = serde_json::to_value(sidecar::container(s, run_as))?;
    if s.native_sidecar {
        // First of the init containers: the data is in place before any other
        // init container or the app runs.
        if is_array("/spec/initContainers") {
            ops.push(add(&["spec", "initContainers", "0"], container));
        } else {
            ops.push(add(
                &["spec", "initContainers"],
                Value::Array(vec![container]),
            ));
        }
    } else if is_array("/spec/containers") {
        ops.push(add(&["spec", "containers", "-"], container));
    } else {
        ops.push(add(&["spec", "containers"], Value::Array(vec![container])));
    }

    let volume = serde_json::to_value(sidecar::tls_volume(s))?;
    if is_array("/spec/volumes") {
        ops.push(add(&["spec", "volumes", "-"], volume));
    } else {
        ops.push(add(&["spec", "volumes"], Value::Array(vec![volume])));
    }

    let mut annotations: Vec<(String, String)> =
        vec![(STATUS_ANNOTATION.to_owned(), serde_json::to_string(status)?)];
    let app_has_prometheus = view
        .metadata
        .annotations
        .keys()
        .any(|k| k.starts_with(PROMETHEUS_PREFIX));
    if !app_has_prometheus {
        annotations.extend([
            ("prometheus.io/scrape".to_owned(), "true".to_owned()),
            ("prometheus.io/port".to_owned(), s.metrics_port.to_string()),
            ("prometheus.io/path".to_owned(), "/metrics".to_owned()),
        ]);
    }
    if raw
        .pointer("/metadata/annotations")
        .is_some_and(Value::is_object)
    {
        for (k, v) in annotations {
            ops.push(add(&["metadata", "annotations", &k], Value::String(v)));
        }
    } else {
        let map: serde_json::Map<String, Value> = annotations
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect();
        ops.push(add(&["metadata", "annotations"], Value::Object(map)));
    }
    Ok(Patch(ops))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn user_of(spec: Value) -> (RunAs, Vec<String>) {
        let view = match PodView::deserialize(json!({"spec": spec})) {
            Ok(v) => v,
            Err(e) => panic!("bad test pod: {e}"),
        };
        let mut warnings = Vec::new();
        (sidecar_user(&view, &mut warnings), warnings)
    }

    #[test]
    fn sidecar_runs_as_the_apps_user_never_root() {
        let fallback = RunAs::Set {
            uid: DEFAULT_UID,
            gid: Some(DEFAULT_UID),
        };
        let c = |sc: Value| json!({"name": "c", "securityContext": sc});
        let cases = [
            (
                json!({"securityContext": {"runAsUser": 1000}}),
                RunAs::Inherit,
                false,
            ),
            (json!({"securityContext": {"runAsUser": 0}}), fallback, true),
            (
                json!({"containers": [c(json!({"runAsUser": 7, "runAsGroup": 8}))]}),
                RunAs::Set {
                    uid: 7,
                    gid: Some(8),
                },
                false,
            ),
            (
                json!({"containers": [c(json!({"runAsUser": 7})), c(json!({"runAsUser": 7, "runAsGroup": 9}))]}),
                RunAs::Set { uid: 7, gid: None },
                false,
            ),
            (
                json!({"containers": [c(json!({"runAsUser": 7})), c(json!({"runAsUser": 8}))]}),
                fallback,
                true,
            ),
            (
                json!({"containers": [c(json!({"runAsUser": 7})), c(json!({}))]}),
                fallback,
                true,
            ),
            (
                json!({"containers": [c(json!({"runAsUser": 0}))]}),
                fallback,
                true,
            ),
            (
                json!({"securityContext": null, "containers": [c(Value::Null)]}),
                fallback,
                true,
            ),
        ];
        for (spec, expect, warns) in cases {
            let (got, warnings) = user_of(spec.clone());
            assert_eq!(got, expect, "{spec}");
            assert_eq!(!warnings.is_empty(), warns, "{spec}: {warnings:?}");
        }
    }
}
