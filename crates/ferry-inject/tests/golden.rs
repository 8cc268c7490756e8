//! Golden-file tests over realistic AdmissionReview requests.
//!
//! For each `tests/fixtures/*.json` the webhook's answer (allowed, warnings, the
//! patch) and the patched Pod are compared with `tests/fixtures/golden/`; the patched
//! pods there are also what `scripts/test-k8s.sh` validates against the Kubernetes
//! OpenAPI schema. Regenerate after an intended change with
//! `FERRY_UPDATE_GOLDEN=1 cargo test -p ferry-inject --test golden`, and review the diff.

mod common;

use std::path::Path;

use common::{apply, check_injected, fixture, fixtures, patch_of, respond, response_of, IMAGE};
use serde_json::{json, Value};

fn golden_dir() -> std::path::PathBuf {
    common::fixtures_dir().join("golden")
}

/// Compares `actual` with the golden file, or rewrites it when asked to. The
/// injector's version in `ferry.io/status` is written as `VERSION`, so a release
/// does not churn the golden files.
fn golden(path: &Path, actual: &Value) {
    let version = format!("\\\"version\\\":\\\"{}\\\"", env!("CARGO_PKG_VERSION"));
    let text = (serde_json::to_string_pretty(actual).expect("serialise") + "\n")
        .replace(&version, "\\\"version\\\":\\\"VERSION\\\"");
    if std::env::var_os("FERRY_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir golden");
        std::fs::write(path, &text).expect("write golden");
        return;
    }
    let expected = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; create it with FERRY_UPDATE_GOLDEN=1 cargo test -p ferry-inject --test golden",
            path.display()
        )
    });
    assert!(
        expected == text,
        "{} differs from the webhook's output; if the change is intended, regenerate with \
         FERRY_UPDATE_GOLDEN=1 and review the diff.\n--- expected\n{expected}\n--- actual\n{text}",
        path.display()
    );
}

/// Every fixture is injected as its annotations ask, matches its golden files, and
/// changes nothing but the injection.
#[test]
fn fixtures_match_golden_files() {
    for (name, review) in fixtures() {
        let out = respond(&review, IMAGE);
        let response = response_of(&review, &out);
        assert_eq!(response["allowed"], true, "{name}: {response}");
        let patch = patch_of(response).unwrap_or_else(|| panic!("{name}: no patch"));
        let pod = &review["request"]["object"];
        let patched = apply(pod, &patch);
        check_injected(pod, &patched, IMAGE);

        let summary = json!({
            "allowed": response["allowed"],
            "warnings": response.get("warnings").cloned().unwrap_or(json!([])),
            "patch": serde_json::to_value(&patch).expect("patch to JSON"),
        });
        golden(
            &golden_dir().join(format!("{name}.response.json")),
            &summary,
        );
        golden(&golden_dir().join(format!("{name}.pod.json")), &patched);
    }
}

/// The patch is a few targeted operations, never a whole-object replacement.
#[test]
fn patches_are_targeted_adds() {
    for (name, review) in fixtures() {
        let out = respond(&review, IMAGE);
        let patch = patch_of(&out["response"]).unwrap_or_else(|| panic!("{name}: no patch"));
        let ops = serde_json::to_value(&patch).expect("patch to JSON");
        let ops = ops.as_array().expect("ops");
        assert!(ops.len() <= 6, "{name}: {} operations", ops.len());
        for op in ops {
            assert_eq!(op["op"], "add", "{name}: {op}");
            let path = op["path"].as_str().expect("path");
            assert!(
                path.starts_with("/spec/initContainers")
                    || path.starts_with("/spec/containers")
                    || path.starts_with("/spec/volumes")
                    || path.starts_with("/metadata/annotations"),
                "{name}: unexpected path {path}"
            );
        }
    }
}

/// A second pass over an injected pod (reinvocation) changes nothing.
#[test]
fn reinvocation_is_idempotent() {
    for (name, review) in fixtures() {
        let out = respond(&review, IMAGE);
        let patch = patch_of(&out["response"]).unwrap_or_else(|| panic!("{name}: no patch"));
        let patched = apply(&review["request"]["object"], &patch);
        let mut again = review.clone();
        again["request"]["object"] = patched;
        let out2 = respond(&again, IMAGE);
        let response = response_of(&again, &out2);
        assert_eq!(response["allowed"], true, "{name}");
        assert!(
            patch_of(response).is_none(),
            "{name}: reinvocation patched again"
        );
        assert!(response.get("warnings").is_none(), "{name}: {response}");
    }
}

/// Unknown `ferry.io/` keys become admission warnings with a hint.
#[test]
fn unknown_keys_are_warnings() {
    let review = fixture("job-native-sidecar");
    let out = respond(&review, IMAGE);
    assert_eq!(out["response"]["allowed"], true);
    assert_eq!(
        out["response"]["warnings"],
        json!(["unknown annotation ferry.io/volumes is ignored (did you mean ferry.io/volume?)"])
    );
}

/// What one table case expects.
enum Expect<'a> {
    /// Injected; the warnings contain these fragments.
    Injected(&'a [&'a str]),
    /// Allowed without a patch; the warnings contain these fragments.
    Unchanged(&'a [&'a str]),
    /// Denied; the message contains these fragments.
    Denied(&'a [&'a str]),
}

/// Edits the base fixture with `edit`, runs the webhook, and checks the outcome.
fn check(case: &str, edit: impl FnOnce(&mut Value), expect: Expect<'_>) {
    let mut review = fixture("statefulset-primary");
    edit(&mut review);
    let out = respond(&review, IMAGE);
    let response = response_of(&review, &out);
    let warnings: Vec<String> = response
        .get("warnings")
        .and_then(Value::as_array)
        .map(|w| {
            w.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let contains_all = |haystack: &str, needles: &[&str]| {
        for n in needles {
            assert!(haystack.contains(n), "{case}: {n:?} not in {haystack:?}");
        }
    };
    match expect {
        Expect::Injected(w) => {
            assert_eq!(response["allowed"], true, "{case}: {response}");
            let patch = patch_of(response).unwrap_or_else(|| panic!("{case}: no patch"));
            let pod = &review["request"]["object"];
            check_injected(pod, &apply(pod, &patch), IMAGE);
            contains_all(&warnings.join("\n"), w);
        }
        Expect::Unchanged(w) => {
            assert_eq!(response["allowed"], true, "{case}: {response}");
            assert!(patch_of(response).is_none(), "{case}: unexpected patch");
            contains_all(&warnings.join("\n"), w);
            if w.is_empty() {
                assert!(warnings.is_empty(), "{case}: {warnings:?}");
            }
        }
        Expect::Denied(m) => {
            assert_eq!(response["allowed"], false, "{case}: {response}");
            assert!(
                patch_of(response).is_none(),
                "{case}: a denial carries no patch"
            );
            assert_eq!(response["status"]["code"], 403, "{case}");
            let message = response["status"]["message"].as_str().expect("message");
            contains_all(message, m);
        }
    }
}

fn annotations(review: &mut Value) -> &mut serde_json::Map<String, Value> {
    review["request"]["object"]["metadata"]["annotations"]
        .as_object_mut()
        .expect("annotations")
}

fn set(review: &mut Value, key: &str, value: &str) {
    annotations(review).insert(key.to_owned(), json!(value));
}

fn volumes(review: &mut Value) -> &mut Vec<Value> {
    review["request"]["object"]["spec"]["volumes"]
        .as_array_mut()
        .expect("volumes")
}

#[test]
fn outcomes() {
    use Expect::*;
    check("base", |_| {}, Injected(&[]));
    check(
        "label false",
        |r| r["request"]["object"]["metadata"]["labels"]["ferry.io/inject"] = json!("false"),
        Unchanged(&[]),
    );
    check(
        "no label",
        |r| {
            r["request"]["object"]["metadata"]["labels"]
                .as_object_mut()
                .expect("labels")
                .remove("ferry.io/inject");
        },
        Unchanged(&[]),
    );
    check(
        "label neither true nor false",
        |r| r["request"]["object"]["metadata"]["labels"]["ferry.io/inject"] = json!("yes"),
        Denied(&["label ferry.io/inject", "\"yes\""]),
    );
    check(
        "volume annotation missing",
        |r| {
            annotations(r).remove("ferry.io/volume");
        },
        Denied(&["annotation ferry.io/volume: is required"]),
    );
    check(
        "no annotations at all",
        |r| {
            r["request"]["object"]["metadata"]
                .as_object_mut()
                .expect("metadata")
                .remove("annotations");
        },
        Denied(&[
            "ferry.io/volume: is required",
            "ferry.io/peers: is required",
        ]),
    );
    check(
        "annotations null",
        |r| r["request"]["object"]["metadata"]["annotations"] = Value::Null,
        Denied(&["ferry.io/volume: is required"]),
    );
    check(
        "volume not in pod",
        |r| set(r, "ferry.io/volume", "nope"),
        Denied(&[
            "annotation ferry.io/volume",
            "\"nope\" is not a volume of this pod",
            "data, kube-api-access-7xk2p",
        ]),
    );
    check(
        "projected volume",
        |r| set(r, "ferry.io/volume", "kube-api-access-7xk2p"),
        Denied(&[
            "annotation ferry.io/volume",
            "projected volume, which is read-only",
        ]),
    );
    for kind in ["configMap", "secret", "downwardAPI"] {
        check(
            kind,
            |r| volumes(r).push(json!({"name": "cfg", kind: {}})),
            Injected(&[]),
        );
        check(
            kind,
            |r| {
                volumes(r).push(json!({"name": "cfg", kind: {}}));
                set(r, "ferry.io/volume", "cfg");
            },
            Denied(&["annotation ferry.io/volume", &format!("is a {kind} volume")]),
        );
    }
    check(
        "read-only claim",
        |r| volumes(r)[0]["persistentVolumeClaim"]["readOnly"] = json!(true),
        Denied(&["annotation ferry.io/volume", "readOnly"]),
    );
    check(
        "emptyDir",
        |r| volumes(r)[0] = json!({"name": "data", "emptyDir": {}}),
        Injected(&["emptyDir"]),
    );
    check(
        "unparsable peers",
        |r| set(r, "ferry.io/peers", "us-east"),
        Denied(&["annotation ferry.io/peers", "NAME=HOST:PORT"]),
    );
    check(
        "unparsable quantity",
        |r| set(r, "ferry.io/memory-request", "lots"),
        Denied(&["annotation ferry.io/memory-request", "\"lots\""]),
    );
    check(
        "request above limit",
        |r| set(r, "ferry.io/cpu-request", "2"),
        Denied(&["annotation ferry.io/cpu-request", "more than the limit"]),
    );
    check(
        "several problems",
        |r| {
            set(r, "ferry.io/role", "leader");
            set(r, "ferry.io/native-sidecar", "maybe");
        },
        Denied(&["ferry.io/role", "ferry.io/native-sidecar"]),
    );
    check(
        "port taken",
        |r| {
            r["request"]["object"]["spec"]["containers"][0]["ports"][0]["containerPort"] =
                json!(7443)
        },
        Denied(&["annotation ferry.io/quic-port", "port 7443", "\"notes\""]),
    );
    check(
        "foreign container named ferry",
        |r| r["request"]["object"]["spec"]["containers"][0]["name"] = json!("ferry"),
        Denied(&["pod: already has a container named \"ferry\""]),
    );
    check(
        "foreign ferry-tls volume",
        |r| volumes(r).push(json!({"name": "ferry-tls", "emptyDir": {}})),
        Denied(&["volume named \"ferry-tls\""]),
    );
    check(
        "status copied from an injected pod, no sidecar",
        |r| set(r, "ferry.io/status", "{\"container\":\"ferry\"}"),
        Injected(&[]),
    );
    check(
        "unknown key",
        |r| set(r, "ferry.io/peer", "x"),
        Injected(&["unknown annotation ferry.io/peer is ignored (did you mean ferry.io/peers?)"]),
    );
    check(
        "many unknown keys",
        |r| {
            for i in 0..40 {
                set(r, &format!("ferry.io/unknown-{i}"), "x");
            }
        },
        Injected(&[
            "unknown annotation ferry.io/unknown-0 ",
            "... and 25 more ferry-inject warnings",
        ]),
    );
    check(
        "no runAsUser",
        |r| r["request"]["object"]["spec"]["securityContext"] = json!({}),
        Injected(&["ferry runs as UID 65532"]),
    );
    check(
        "pod runs as root",
        |r| r["request"]["object"]["spec"]["securityContext"]["runAsUser"] = json!(0),
        Injected(&["the pod runs as root"]),
    );
    check(
        "app containers' common user",
        |r| {
            r["request"]["object"]["spec"]["securityContext"] = json!({});
            r["request"]["object"]["spec"]["containers"][0]["securityContext"] =
                json!({"runAsUser": 1234, "runAsGroup": 5678});
        },
        Injected(&[]),
    );
    check(
        "plain container in a Job",
        |r| {
            set(r, "ferry.io/native-sidecar", "false");
            r["request"]["object"]["spec"]["restartPolicy"] = json!("OnFailure");
        },
        Injected(&["never completes"]),
    );
    check(
        "UPDATE",
        |r| r["request"]["operation"] = json!("UPDATE"),
        Unchanged(&[]),
    );
    check(
        "not a Pod",
        |r| r["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"}),
        Unchanged(&["mutates only Pods"]),
    );
}

/// A denial still carries the warnings (an unknown key is often the cause).
#[test]
fn denials_keep_warnings() {
    let mut review = fixture("statefulset-primary");
    annotations(&mut review).remove("ferry.io/peers");
    set(&mut review, "ferry.io/peer", "us-east=h:7443");
    let out = respond(&review, IMAGE);
    let response = response_of(&review, &out);
    assert_eq!(response["allowed"], false);
    let message = response["status"]["message"].as_str().expect("message");
    assert!(
        message.contains("annotation ferry.io/peers: is required"),
        "{message}"
    );
    assert_eq!(
        response["warnings"],
        json!(["unknown annotation ferry.io/peer is ignored (did you mean ferry.io/peers?)"])
    );
}

/// Malformed requests are errors (HTTP 400 in the server), never panics.
#[test]
fn malformed_requests_are_errors() {
    let base = fixture("statefulset-primary");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("not JSON", b"{\"apiVersion\":".to_vec()),
        ("array", b"[1,2,3]".to_vec()),
        ("v1beta1", {
            let mut r = base.clone();
            r["apiVersion"] = json!("admission.k8s.io/v1beta1");
            serde_json::to_vec(&r).expect("json")
        }),
        ("wrong kind", {
            let mut r = base.clone();
            r["kind"] = json!("Pod");
            serde_json::to_vec(&r).expect("json")
        }),
        (
            "no request",
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
        ),
        ("no uid", {
            let mut r = base.clone();
            r["request"].as_object_mut().expect("request").remove("uid");
            serde_json::to_vec(&r).expect("json")
        }),
        ("no object", {
            let mut r = base.clone();
            r["request"]["object"] = Value::Null;
            serde_json::to_vec(&r).expect("json")
        }),
        ("object is a string", {
            let mut r = base.clone();
            r["request"]["object"] = json!("pod");
            serde_json::to_vec(&r).expect("json")
        }),
        ("containers not a list", {
            let mut r = base.clone();
            r["request"]["object"]["spec"]["containers"] = json!({"name": "x"});
            serde_json::to_vec(&r).expect("json")
        }),
        ("labels not strings", {
            let mut r = base.clone();
            r["request"]["object"]["metadata"]["labels"]["ferry.io/inject"] = json!(true);
            serde_json::to_vec(&r).expect("json")
        }),
    ];
    for (case, body) in cases {
        match ferry_inject::mutate(&body, IMAGE) {
            Ok(out) => panic!("{case}: accepted: {}", String::from_utf8_lossy(&out)),
            Err(e) => {
                assert!(e.is_bad_request(), "{case}: {e}");
                assert!(!e.to_string().is_empty());
            }
        }
    }
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn base_bytes() -> Vec<u8> {
        serde_json::to_vec(&fixture("deployment-generate-name")).expect("json")
    }

    fn leaf_paths(v: &Value, at: String, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    let token = k.replace('~', "~0").replace('/', "~1");
                    leaf_paths(child, format!("{at}/{token}"), out);
                }
            }
            Value::Array(a) => {
                for (i, child) in a.iter().enumerate() {
                    leaf_paths(child, format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
        out.push(at);
    }

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(2, 8, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// A review cut short anywhere is refused, not a panic.
        #[test]
        fn truncated_reviews(cut in 0usize..1_000_000) {
            let bytes = base_bytes();
            let cut = cut % bytes.len();
            prop_assert!(ferry_inject::mutate(&bytes[..cut], IMAGE).is_err());
        }

        /// Any value at any place in a real review gets an answer or an error, and an
        /// injection still patches cleanly.
        #[test]
        fn replaced_values(pick in any::<prop::sample::Index>(), value in any_json()) {
            let mut review = fixture("deployment-generate-name");
            let mut paths = Vec::new();
            leaf_paths(&review, String::new(), &mut paths);
            let path = pick.get(&paths).clone();
            if let Some(slot) = review.pointer_mut(&path) {
                *slot = value;
            }
            let body = serde_json::to_vec(&review).expect("json");
            if let Ok(out) = ferry_inject::mutate(&body, IMAGE) {
                let out: Value = serde_json::from_slice(&out).expect("response JSON");
                if let Some(patch) = patch_of(&out["response"]) {
                    let mut pod = review["request"]["object"].clone();
                    prop_assert!(json_patch::patch(&mut pod, &patch).is_ok(), "patch does not apply at {}", path);
                }
            }
        }
    }
}
