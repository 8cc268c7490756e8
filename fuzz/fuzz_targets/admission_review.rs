//! The admission webhook's handler on arbitrary bytes and on arbitrary
//! pods inside a well-formed AdmissionReview: never a panic; a successful
//! answer is an AdmissionReview JSON carrying the request's uid, and a
//! patch, when present, is base64 JSON Patch.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn check(body: &[u8], uid: Option<&str>) {
    let v: Value = serde_json::from_slice(body).expect("the response is JSON");
    assert_eq!(v["kind"], "AdmissionReview");
    if let Some(uid) = uid {
        assert_eq!(v["response"]["uid"], uid);
    }
}

fuzz_target!(|data: &[u8]| {
    // 1. the raw request body
    if let Ok(r) = ferry_inject::review(data, "img:1") {
        check(&r.body, None);
    }
    // 2. the bytes as the pod's annotations / JSON object inside a valid review
    let Ok(pod) = serde_json::from_slice::<Value>(data) else {
        let text = String::from_utf8_lossy(data);
        let review = serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "fuzz-uid",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "operation": "CREATE",
                "namespace": "default",
                "userInfo": {},
                "object": {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "p", "labels": {"ferry.io/inject": "true"},
                        "annotations": {"ferry.io/volume": "data", "ferry.io/peers": text.as_ref(),
                                        "ferry.io/exclude": text.as_ref(), "ferry.io/memory-limit": text.as_ref()}},
                    "spec": {"containers": [{"name": "app", "image": "app"}],
                             "volumes": [{"name": "data", "emptyDir": {}}]}
                }
            }
        });
        let body = serde_json::to_vec(&review).expect("json");
        if let Ok(r) = ferry_inject::review(&body, "img:1") {
            check(&r.body, Some("fuzz-uid"));
        }
        return;
    };
    let review = serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "fuzz-uid",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE",
            "namespace": "default",
            "userInfo": {},
            "object": pod
        }
    });
    let body = serde_json::to_vec(&review).expect("json");
    if let Ok(r) = ferry_inject::review(&body, "img:1") {
        check(&r.body, Some("fuzz-uid"));
    }
});
