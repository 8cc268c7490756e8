//! Helpers shared by the integration tests: fixtures, patch decoding, and the
//! structural checks of an injected pod.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::{json, Value};

/// The sidecar image the tests inject by default.
pub const IMAGE: &str = "registry.example.com/ferry:test";

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The AdmissionReview fixtures (`tests/fixtures/*.json`), sorted.
pub fn fixtures() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(fixtures_dir()).expect("tests/fixtures is readable");
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.extension().is_some_and(|e| e == "json") {
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .expect("UTF-8 fixture name")
                .to_owned();
            out.push((name, read_json(&path)));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!out.is_empty(), "no fixtures found");
    out
}

pub fn fixture(name: &str) -> Value {
    read_json(&fixtures_dir().join(format!("{name}.json")))
}

pub fn read_json(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs the webhook's pure entry point; panics if the request was refused as malformed.
pub fn respond(review: &Value, image: &str) -> Value {
    let body = serde_json::to_vec(review).expect("serialise review");
    let out = ferry_inject::mutate(&body, image)
        .unwrap_or_else(|e| panic!("a well-formed review was refused: {e}"));
    serde_json::from_slice(&out).expect("the response is JSON")
}

/// The `response` object of a response review, with its basic shape checked.
pub fn response_of<'a>(review_in: &Value, review_out: &'a Value) -> &'a Value {
    assert_eq!(review_out["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(review_out["kind"], "AdmissionReview");
    let response = &review_out["response"];
    assert_eq!(
        response["uid"], review_in["request"]["uid"],
        "the uid is echoed"
    );
    assert!(response["allowed"].is_boolean());
    response
}

/// The JSON Patch in a response, decoded from base64; `None` when there is none.
pub fn patch_of(response: &Value) -> Option<json_patch::Patch> {
    let patch = response.get("patch")?;
    let b64 = patch.as_str().expect("the patch is a base64 string");
    assert_eq!(response["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("the patch is valid base64");
    Some(serde_json::from_slice(&bytes).expect("the patch is a JSON Patch"))
}

/// Applies `patch` to `pod` as the API server would.
pub fn apply(pod: &Value, patch: &json_patch::Patch) -> Value {
    let mut out = pod.clone();
    json_patch::patch(&mut out, patch).unwrap_or_else(|e| panic!("the patch does not apply: {e}"));
    out
}

fn annotation<'a>(pod: &'a Value, key: &str) -> Option<&'a str> {
    pod["metadata"]["annotations"]
        .get(key)
        .and_then(Value::as_str)
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .map(|a| a.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default()
}

/// Checks what an injection must add, derived from the pod's own annotations
/// (independently of the injector's code), and that nothing else changed.
pub fn check_injected(original: &Value, patched: &Value, default_image: &str) {
    // A StatefulSet pod's ordinal (the label the controller sets) replaces
    // `{ordinal}` in the name, the peers and the TLS Secret.
    let ordinal = original["metadata"]["labels"]["apps.kubernetes.io/pod-index"].as_str();
    let substituted: std::collections::BTreeMap<&str, String> = ["name", "peers", "tls-secret"]
        .into_iter()
        .filter_map(|k| {
            let v = annotation(original, &format!("ferry.io/{k}"))?;
            let v = match ordinal {
                Some(n) => v.replace("{ordinal}", n),
                None => v.to_owned(),
            };
            Some((k, v))
        })
        .collect();
    let a = |k: &str| {
        substituted
            .get(k)
            .map(String::as_str)
            .or_else(|| annotation(original, &format!("ferry.io/{k}")))
    };
    let native = a("native-sidecar") != Some("false");
    let volume = a("volume").expect("fixture names a volume");
    let image = a("image").unwrap_or(default_image);
    let quic_port = a("quic-port").map_or(7443, |p| p.parse::<i64>().expect("port"));
    let metrics_port = a("metrics-port").map_or(9743, |p| p.parse::<i64>().expect("port"));
    let tls_secret = a("tls-secret").unwrap_or("ferry-tls");

    // Where the sidecar is.
    let spec = &patched["spec"];
    let ferry = if native {
        let init = &spec["initContainers"];
        assert_eq!(init[0]["name"], "ferry", "the native sidecar comes first");
        assert_eq!(init[0]["restartPolicy"], "Always");
        let mut expected = vec!["ferry"];
        expected.extend(names(&original["spec"]["initContainers"]));
        assert_eq!(
            names(init),
            expected,
            "the app's init containers keep their order"
        );
        assert_eq!(
            names(&spec["containers"]),
            names(&original["spec"]["containers"])
        );
        &init[0]
    } else {
        let containers = spec["containers"].as_array().expect("containers");
        let last = containers.last().expect("a container");
        assert_eq!(last["name"], "ferry", "the plain sidecar is appended");
        assert!(last.get("restartPolicy").is_none());
        assert_eq!(
            names(&spec["initContainers"]),
            names(&original["spec"]["initContainers"])
        );
        last
    };

    assert_eq!(ferry["image"], image);
    assert_eq!(ferry["command"], json!(["ferry"]));
    let args: Vec<&str> = ferry["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|v| v.as_str().expect("string arg"))
        .collect();
    assert_eq!(args[0], "run");
    let flag = |f: &str| -> Vec<&str> {
        args.windows(2)
            .filter(|w| w[0] == f)
            .map(|w| w[1])
            .collect()
    };
    assert_eq!(flag("--root"), ["/ferry/root"]);
    assert_eq!(flag("--tls-dir"), ["/ferry/tls"]);
    assert_eq!(flag("--listen"), [format!("0.0.0.0:{quic_port}").as_str()]);
    assert_eq!(
        flag("--metrics-addr"),
        [format!("0.0.0.0:{metrics_port}").as_str()]
    );
    assert_eq!(flag("--role"), [a("role").unwrap_or("replica")]);
    assert_eq!(flag("--name"), [a("name").unwrap_or("$(POD_NAME)")]);
    let peers: Vec<String> = a("peers")
        .expect("fixture lists peers")
        .split(',')
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    assert_eq!(
        flag("--peer"),
        peers.iter().map(String::as_str).collect::<Vec<_>>()
    );
    let excludes: Vec<String> = a("exclude")
        .map(|e| e.split(',').map(|g| g.trim().to_owned()).collect())
        .unwrap_or_default();
    assert_eq!(
        flag("--exclude"),
        excludes.iter().map(String::as_str).collect::<Vec<_>>()
    );

    let env = ferry["env"].as_array().expect("env");
    let env_field = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .map(|e| e["valueFrom"]["fieldRef"]["fieldPath"].clone())
    };
    assert_eq!(env_field("POD_NAME"), Some(json!("metadata.name")));
    assert_eq!(
        env_field("POD_NAMESPACE"),
        Some(json!("metadata.namespace"))
    );
    let log_level = a("log-level").unwrap_or("info");
    let (log_var, log_value) = if ["error", "warn", "info", "debug", "trace"]
        .contains(&log_level.to_ascii_lowercase().as_str())
    {
        ("FERRY_LOG_LEVEL", log_level.to_ascii_lowercase())
    } else {
        ("FERRY_LOG", log_level.to_owned())
    };
    let log = env
        .iter()
        .find(|e| e["name"] == log_var)
        .unwrap_or_else(|| panic!("{log_var} is set"));
    assert_eq!(log["value"], log_value.as_str());
    let root = env
        .iter()
        .find(|e| e["name"] == "FERRY_ROOT")
        .expect("FERRY_ROOT");
    assert_eq!(
        root["value"], "/ferry/root",
        "so `kubectl exec -c ferry -- ferry status` works"
    );
    assert_eq!(
        env.len(),
        4,
        "POD_NAME, POD_NAMESPACE, FERRY_ROOT and one log variable"
    );

    assert_eq!(
        ferry["ports"],
        json!([
            {"name": "ferry-quic", "containerPort": quic_port, "protocol": "UDP"},
            {"name": "ferry-metrics", "containerPort": metrics_port, "protocol": "TCP"}
        ])
    );
    assert_eq!(
        ferry["volumeMounts"],
        json!([
            {"name": volume, "mountPath": "/ferry/root"},
            {"name": "ferry-tls", "mountPath": "/ferry/tls", "readOnly": true}
        ])
    );
    for (probe, path) in [("startupProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(ferry[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(ferry[probe]["httpGet"]["port"], "ferry-metrics", "{probe}");
    }
    for kind in ["requests", "limits"] {
        for res in ["cpu", "memory"] {
            let key = format!("{res}-{}", &kind[..kind.len() - 1]);
            let value = ferry["resources"][kind][res].as_str().expect("quantity");
            if let Some(v) = a(&key) {
                assert_eq!(value, v, "{key}");
            }
        }
    }
    let sc = &ferry["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    let pod_user = original["spec"]["securityContext"]
        .get("runAsUser")
        .and_then(Value::as_i64);
    match pod_user {
        Some(uid) if uid != 0 => {
            assert!(
                sc.get("runAsUser").is_none(),
                "inherits the pod's runAsUser"
            )
        }
        _ => {
            let uid = sc["runAsUser"]
                .as_i64()
                .expect("the sidecar sets runAsUser");
            assert_ne!(uid, 0, "never root");
        }
    }

    let volumes = spec["volumes"].as_array().expect("volumes");
    assert_eq!(
        volumes.last(),
        Some(&json!({"name": "ferry-tls", "secret": {"secretName": tls_secret}}))
    );

    let status: Value = serde_json::from_str(
        annotation(patched, "ferry.io/status").expect("ferry.io/status is set"),
    )
    .expect("ferry.io/status is JSON");
    assert_eq!(status["container"], "ferry");
    assert_eq!(status["volume"], volume);
    assert_eq!(status["image"], image);
    assert_eq!(
        status["mode"],
        if native {
            "native-sidecar"
        } else {
            "container"
        }
    );

    let prometheus = |pod: &Value| -> Vec<(String, Value)> {
        pod["metadata"]["annotations"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| k.starts_with("prometheus.io/"))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let app_prometheus = prometheus(original);
    if app_prometheus.is_empty() {
        assert_eq!(
            prometheus(patched),
            vec![
                ("prometheus.io/path".to_owned(), json!("/metrics")),
                (
                    "prometheus.io/port".to_owned(),
                    json!(metrics_port.to_string())
                ),
                ("prometheus.io/scrape".to_owned(), json!("true")),
            ]
        );
    } else {
        assert_eq!(
            prometheus(patched),
            app_prometheus,
            "the app's prometheus.io/* are kept"
        );
    }

    assert_eq!(
        &strip_injection(original, patched),
        original,
        "nothing else changed"
    );
}

/// Removes what an injection adds, to compare the rest with the original.
pub fn strip_injection(original: &Value, patched: &Value) -> Value {
    let mut out = patched.clone();
    let spec = &mut out["spec"];
    for list in ["initContainers", "containers"] {
        if let Some(a) = spec.get_mut(list).and_then(Value::as_array_mut) {
            a.retain(|c| c["name"] != "ferry");
        }
        let was_absent = original["spec"].get(list).is_none();
        let now_empty = spec
            .get(list)
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty);
        if was_absent && now_empty {
            spec.as_object_mut().expect("spec").remove(list);
        }
    }
    if let Some(v) = spec.get_mut("volumes").and_then(Value::as_array_mut) {
        v.retain(|v| v["name"] != "ferry-tls");
    }
    let orig_annotations = original["metadata"].get("annotations");
    if let Some(ann) = out["metadata"]
        .get_mut("annotations")
        .and_then(Value::as_object_mut)
    {
        ann.retain(|k, _| {
            let added = k == "ferry.io/status"
                || (k.starts_with("prometheus.io/")
                    && orig_annotations.and_then(|a| a.get(k.as_str())).is_none());
            !added
        });
        if orig_annotations.is_none() && ann.is_empty() {
            out["metadata"]
                .as_object_mut()
                .expect("metadata")
                .remove("annotations");
        }
    }
    // A status annotation copied from an injected pod is overwritten, not added.
    if let Some(orig_status) = original["metadata"]["annotations"].get("ferry.io/status") {
        out["metadata"]["annotations"]["ferry.io/status"] = orig_status.clone();
    }
    out
}
