//! StatefulSets with several pods (docs/KUBERNETES.md, "StatefulSets with several
//! pods"): each pod is its own node, named, certified and paired by its ordinal.
//!
//! The pods are made the way the StatefulSet controller makes them (final name,
//! `generateName`, the `statefulset.kubernetes.io/pod-name` and
//! `apps.kubernetes.io/pod-index` labels, the claim of that ordinal) from one pod
//! template per cluster, and go through the webhook's entry point.

mod common;

use common::{apply, check_injected, fixture, patch_of, respond, response_of, IMAGE};
use serde_json::{json, Value};

/// The pod of `ordinal` the controller creates from the template in the
/// fixture, with this cluster's annotations.
fn pod(ordinal: u32, role: &str, me: &str, other: &str) -> Value {
    let mut r = fixture("statefulset-ordinal-replica");
    let name = format!("notes-{ordinal}");
    r["request"]["name"] = json!(name);
    let o = &mut r["request"]["object"];
    o["metadata"]["name"] = json!(name);
    o["metadata"]["labels"]["apps.kubernetes.io/pod-index"] = json!(ordinal.to_string());
    o["metadata"]["labels"]["statefulset.kubernetes.io/pod-name"] = json!(name);
    o["spec"]["hostname"] = json!(name);
    o["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] =
        json!(format!("data-notes-{ordinal}"));
    let a = &mut o["metadata"]["annotations"];
    a["ferry.io/role"] = json!(role);
    a["ferry.io/name"] = json!(format!("{me}-{{ordinal}}"));
    a["ferry.io/peers"] = json!(format!(
        "{other}-{{ordinal}}=notes-{{ordinal}}.ferry-notes.{other}.example.com:7443"
    ));
    a["ferry.io/tls-secret"] = json!("ferry-tls-{ordinal}");
    r
}

/// What the injected sidecar of `review` is: its --name, its --peer values,
/// its TLS Secret, and the ordinal `ferry.io/status` records.
struct Node {
    name: String,
    peers: Vec<String>,
    secret: String,
    status_ordinal: Value,
}

fn inject(review: &Value) -> Node {
    let out = respond(review, IMAGE);
    let response = response_of(review, &out);
    assert_eq!(response["allowed"], true, "{response}");
    let patch = patch_of(response).expect("a patch");
    let original = &review["request"]["object"];
    let pod = apply(original, &patch);
    check_injected(original, &pod, IMAGE);
    let ferry = &pod["spec"]["initContainers"][0];
    let args: Vec<&str> = ferry["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let flag = |f: &str| -> Vec<String> {
        args.windows(2)
            .filter(|w| w[0] == f)
            .map(|w| w[1].to_owned())
            .collect()
    };
    let volumes = pod["spec"]["volumes"].as_array().expect("volumes");
    let tls = volumes
        .iter()
        .find(|v| v["name"] == "ferry-tls")
        .expect("the TLS volume");
    let status: Value = serde_json::from_str(
        pod["metadata"]["annotations"]["ferry.io/status"]
            .as_str()
            .expect("ferry.io/status"),
    )
    .expect("status JSON");
    Node {
        name: flag("--name").concat(),
        peers: flag("--peer"),
        secret: tls["secret"]["secretName"]
            .as_str()
            .expect("secretName")
            .to_owned(),
        status_ordinal: status["ordinal"].clone(),
    }
}

/// Three pods in each cluster: pod N of eu-west and pod N of us-east name each
/// other, each has its own name and Secret, and no two pods share either.
#[test]
fn each_pod_pairs_with_the_pod_of_its_ordinal() {
    let mut names = std::collections::BTreeSet::new();
    let mut secrets = std::collections::BTreeSet::new();
    for n in 0..3u32 {
        let p = inject(&pod(n, "primary", "eu-west", "us-east"));
        let r = inject(&pod(n, "replica", "us-east", "eu-west"));
        assert_eq!(p.name, format!("eu-west-{n}"));
        assert_eq!(r.name, format!("us-east-{n}"));
        assert_eq!(
            p.peers,
            [format!(
                "us-east-{n}=notes-{n}.ferry-notes.us-east.example.com:7443"
            )]
        );
        assert_eq!(
            r.peers,
            [format!(
                "eu-west-{n}=notes-{n}.ferry-notes.eu-west.example.com:7443"
            )]
        );
        // the pairing: each lists the other's node name
        assert!(p.peers[0].starts_with(&format!("{}=", r.name)));
        assert!(r.peers[0].starts_with(&format!("{}=", p.name)));
        for node in [&p, &r] {
            assert_eq!(node.secret, format!("ferry-tls-{n}"));
            assert_eq!(node.status_ordinal, json!(n));
            assert!(names.insert(node.name.clone()), "{} twice", node.name);
        }
        // one Secret per pod in each cluster
        assert!(secrets.insert(p.secret.clone()), "{} twice", p.secret);
    }
}

/// At CREATE the pod name may be empty (a controller leaving it to
/// generateName): the labels still give the ordinal; before 1.28 (no
/// pod-index label) the pod-name label does.
#[test]
fn the_ordinal_comes_from_the_labels() {
    let mut r = pod(1, "primary", "eu-west", "us-east");
    r["request"]["name"] = json!("");
    let m = &mut r["request"]["object"]["metadata"];
    m.as_object_mut().expect("metadata").remove("name");
    assert_eq!(inject(&r).name, "eu-west-1");

    let mut r = pod(4, "primary", "eu-west", "us-east");
    r["request"]["object"]["metadata"]["labels"]
        .as_object_mut()
        .expect("labels")
        .remove("apps.kubernetes.io/pod-index");
    let out = respond(&r, IMAGE);
    let pod = apply(
        &r["request"]["object"],
        &patch_of(&out["response"]).expect("a patch"),
    );
    let args = pod["spec"]["initContainers"][0]["args"].to_string();
    assert!(args.contains("\"--name\",\"eu-west-4\""), "{args}");
    assert!(args.contains("ferry-notes.us-east.example.com"), "{args}");
    assert!(pod["spec"]["volumes"].to_string().contains("ferry-tls-4"));
}

fn denial(review: &Value) -> String {
    let out = respond(review, IMAGE);
    let response = response_of(review, &out);
    assert_eq!(response["allowed"], false, "{response}");
    assert!(patch_of(response).is_none());
    response["status"]["message"]
        .as_str()
        .expect("message")
        .to_owned()
}

/// `{ordinal}` on a pod that is not a StatefulSet's is denied, naming each
/// annotation that uses it.
#[test]
fn a_placeholder_outside_a_statefulset_is_denied() {
    let mut r = fixture("deployment-generate-name");
    let a = &mut r["request"]["object"]["metadata"]["annotations"];
    a["ferry.io/name"] = json!("eu-west-{ordinal}");
    a["ferry.io/tls-secret"] = json!("ferry-tls-{ordinal}");
    let m = denial(&r);
    for want in [
        "annotation ferry.io/name: uses {ordinal}, but this pod is not a StatefulSet pod",
        "annotation ferry.io/tls-secret: uses {ordinal}",
    ] {
        assert!(m.contains(want), "{want:?} not in {m:?}");
    }
}

/// A second pod of a StatefulSet whose template has no placeholders would be
/// the same node as the first: denied, naming what to write.
#[test]
fn a_second_pod_without_placeholders_is_denied() {
    let mut r = fixture("statefulset-primary");
    let o = &mut r["request"]["object"];
    o["metadata"]["name"] = json!("notes-1");
    o["metadata"]["labels"]["apps.kubernetes.io/pod-index"] = json!("1");
    o["metadata"]["labels"]["statefulset.kubernetes.io/pod-name"] = json!("notes-1");
    let m = denial(&r);
    for want in [
        "annotation ferry.io/name: \"eu-west\" has no {ordinal}, but pod \"notes-1\" is ordinal 1 of a StatefulSet",
        "annotation ferry.io/peers: \"us-east=ferry-notes.us-east.example.com:7443\" has no {ordinal}",
        "annotation ferry.io/tls-secret: is not set",
        "\"ferry-tls-{ordinal}\"",
    ] {
        assert!(m.contains(want), "{want:?} not in {m:?}");
    }
    // the first pod of the same template is fine (one pod per cluster)
    let r0 = fixture("statefulset-primary");
    let out = respond(&r0, IMAGE);
    assert_eq!(response_of(&r0, &out)["allowed"], true);
}

/// Labels that contradict each other, or an index that is no number, are
/// denied rather than guessed at.
#[test]
fn a_bad_index_label_is_denied() {
    let mut r = pod(2, "primary", "eu-west", "us-east");
    r["request"]["object"]["metadata"]["labels"]["apps.kubernetes.io/pod-index"] = json!("3");
    assert!(denial(&r).contains("label apps.kubernetes.io/pod-index: says ordinal 3"));
    r["request"]["object"]["metadata"]["labels"]["apps.kubernetes.io/pod-index"] = json!("two");
    assert!(denial(&r).contains("\"two\" is not a StatefulSet ordinal"));
    // a pod that needs no ordinal is not held to its labels
    let mut r = fixture("statefulset-primary");
    r["request"]["object"]["metadata"]["labels"]["apps.kubernetes.io/pod-index"] = json!("two");
    let out = respond(&r, IMAGE);
    assert_eq!(response_of(&r, &out)["allowed"], true);
}
