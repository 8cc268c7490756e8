//! StatefulSets with several pods: each pod is its own ferry node, paired with
//! the pod of the same ordinal in the other clusters.
//!
//! The pod template is shared by every pod of a StatefulSet, so the node name,
//! the peers and the TLS Secret are written once with an `{ordinal}`
//! placeholder (`eu-west-{ordinal}`, `us-east-{ordinal}=notes-{ordinal}.ferry-notes.us-east.example.com:7443`,
//! `ferry-tls-{ordinal}`) and the webhook replaces it with the pod's ordinal at
//! admission. The ordinal is known then: the StatefulSet controller creates each
//! pod with its final `metadata.name` (`notes-2`), `generateName` (`notes-`),
//! and the labels `statefulset.kubernetes.io/pod-name` and, from Kubernetes
//! 1.28 (PodIndexLabel, on by default), `apps.kubernetes.io/pod-index`. The
//! Secret's name must be known at admission anyway (a volume cannot take it
//! from the downward API), so the replacement happens here, once, and the
//! patched pod shows the concrete names.

use std::collections::BTreeMap;

use crate::pod::MetaView;
use crate::settings::{key, Problem, PREFIX};

/// The placeholder replaced by the pod's ordinal.
pub const PLACEHOLDER: &str = "{ordinal}";
/// The label the StatefulSet controller sets to the pod's ordinal (1.28+).
pub const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";
/// The label the StatefulSet controller sets to the pod's name.
pub const POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";
/// The annotations in which the placeholder is replaced.
pub const KEYS: [&str; 3] = [key::NAME, key::PEERS, key::TLS_SECRET];

/// Whether any annotation that takes the placeholder uses it.
pub(crate) fn uses_placeholder(annotations: &BTreeMap<String, String>) -> bool {
    KEYS.iter().any(|k| {
        annotations
            .get(&format!("{PREFIX}{k}"))
            .is_some_and(|v| v.contains(PLACEHOLDER))
    })
}

/// Largest ordinal (StatefulSet replicas are an int32).
const MAX_ORDINAL: u64 = i32::MAX as u64;

/// The trailing `-N` of a StatefulSet pod name.
fn trailing_ordinal(name: &str) -> Option<u32> {
    let (_, n) = name.rsplit_once('-')?;
    parse(n)
}

/// A decimal ordinal without sign, leading zeros or overflow.
fn parse(n: &str) -> Option<u32> {
    if n.is_empty() || n.len() > 10 || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if n.len() > 1 && n.starts_with('0') {
        return None;
    }
    let v: u64 = n.parse().ok()?;
    (v <= MAX_ORDINAL).then_some(v as u32)
}

/// The pod's StatefulSet ordinal, if it is a StatefulSet pod: the
/// `apps.kubernetes.io/pod-index` label, else the number ending the
/// `statefulset.kubernetes.io/pod-name` label, else the number after
/// `generateName` in `metadata.name` (clusters before 1.28). Labels that
/// disagree with each other are an error.
pub(crate) fn ordinal(meta: &MetaView) -> Result<Option<u32>, Problem> {
    let bad = |label: &str, why: String| Problem {
        subject: format!("label {label}"),
        message: why,
    };
    let from_index = match meta.labels.get(POD_INDEX_LABEL) {
        None => None,
        Some(v) => Some(parse(v.trim()).ok_or_else(|| {
            bad(
                POD_INDEX_LABEL,
                format!("{v:?} is not a StatefulSet ordinal (a number from 0)"),
            )
        })?),
    };
    let from_name_label = meta
        .labels
        .get(POD_NAME_LABEL)
        .and_then(|n| trailing_ordinal(n));
    if let (Some(a), Some(b)) = (from_index, from_name_label) {
        if a != b {
            return Err(bad(
                POD_INDEX_LABEL,
                format!(
                    "says ordinal {a}, but {POD_NAME_LABEL} names pod {:?} (ordinal {b})",
                    meta.labels
                        .get(POD_NAME_LABEL)
                        .map(String::as_str)
                        .unwrap_or("")
                ),
            ));
        }
    }
    let from_name = (!meta.generate_name.is_empty())
        .then(|| meta.name.strip_prefix(meta.generate_name.as_str()))
        .flatten()
        .and_then(parse);
    Ok(from_index.or(from_name_label).or(from_name))
}

/// Replaces the placeholder in the annotations that take it, in a copy of
/// `annotations`. Problems: a placeholder on a pod without an ordinal; a
/// StatefulSet pod of ordinal 1 or more whose annotations would make it the
/// same node as its siblings (no placeholder where one is needed).
pub(crate) fn substitute(
    annotations: &BTreeMap<String, String>,
    ordinal: Option<u32>,
    pod: &str,
) -> Result<BTreeMap<String, String>, Vec<Problem>> {
    let mut out = annotations.clone();
    let mut problems = Vec::new();
    for k in KEYS {
        let full = format!("{PREFIX}{k}");
        let value = annotations.get(&full);
        let has = value.is_some_and(|v| v.contains(PLACEHOLDER));
        match (value, ordinal) {
            (Some(v), Some(n)) if has => {
                out.insert(full.clone(), v.replace(PLACEHOLDER, &n.to_string()));
            }
            (Some(_), None) if has => problems.push(Problem::annotation(
                k,
                format!(
                    "uses {PLACEHOLDER}, but this pod is not a StatefulSet pod (no {POD_INDEX_LABEL} \
                     or {POD_NAME_LABEL} label, no ordinal after its generateName): use {PLACEHOLDER} \
                     only in a StatefulSet's pod template"
                ),
            )),
            // Ordinal 1 or more: a StatefulSet with several pods. The same
            // value on every pod would make them one node.
            (_, Some(n)) if n >= 1 && !has => {
                let example = match k {
                    key::NAME => "\"eu-west-{ordinal}\"",
                    key::PEERS => {
                        "\"us-east-{ordinal}=notes-{ordinal}.ferry-notes.us-east.example.com:7443\""
                    }
                    _ => "\"ferry-tls-{ordinal}\" (one Secret per pod, see docs/KUBERNETES.md)",
                };
                let what = match value {
                    None => "is not set".to_owned(),
                    Some(v) => format!("{v:?} has no {PLACEHOLDER}"),
                };
                problems.push(Problem::annotation(
                    k,
                    format!(
                        "{what}, but pod {pod:?} is ordinal {n} of a StatefulSet: every pod would be \
                         the same ferry node (one name, one certificate, one peer). Write it with \
                         {PLACEHOLDER}, e.g. {example}, so each pod pairs with the pod of the same \
                         ordinal in the other clusters"
                    ),
                ));
            }
            _ => {}
        }
        if let Some(v) = out
            .get(&full)
            .filter(|v| v.contains('{') || v.contains('}'))
        {
            if !problems.iter().any(|p| p.subject.ends_with(&full)) {
                problems.push(Problem::annotation(
                    k,
                    format!("{v:?} has an unknown placeholder: only {PLACEHOLDER} is replaced"),
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str, generate: &str, labels: &[(&str, &str)]) -> MetaView {
        MetaView {
            name: name.to_owned(),
            generate_name: generate.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn ordinals_of_statefulset_pods() {
        let cases: &[(MetaView, Option<u32>)] = &[
            // what the StatefulSet controller creates (1.28+)
            (
                meta(
                    "notes-2",
                    "notes-",
                    &[(POD_INDEX_LABEL, "2"), (POD_NAME_LABEL, "notes-2")],
                ),
                Some(2),
            ),
            // before 1.28: no index label
            (
                meta("notes-11", "notes-", &[(POD_NAME_LABEL, "notes-11")]),
                Some(11),
            ),
            // the label alone (a name not yet set)
            (meta("", "notes-", &[(POD_NAME_LABEL, "my-db-3")]), Some(3)),
            (meta("", "", &[(POD_INDEX_LABEL, "0")]), Some(0)),
            // name after generateName only
            (meta("notes-7", "notes-", &[]), Some(7)),
            // a Deployment's pod, a bare pod, a pod named like one
            (meta("", "web-5d4f8-", &[]), None),
            (meta("db-3", "", &[]), None),
            (meta("web-5d4f8-x7k2p", "web-5d4f8-", &[]), None),
            (meta("notes-01", "notes-", &[]), None),
        ];
        for (m, want) in cases {
            assert_eq!(ordinal(m).ok().flatten(), *want, "{m:?}");
        }
        for bad in ["x", "-1", "01", "99999999999"] {
            assert!(
                ordinal(&meta("", "", &[(POD_INDEX_LABEL, bad)])).is_err(),
                "{bad}"
            );
        }
        let disagree = meta(
            "",
            "",
            &[(POD_INDEX_LABEL, "1"), (POD_NAME_LABEL, "notes-2")],
        );
        assert!(ordinal(&disagree).is_err());
    }

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (format!("{PREFIX}{k}"), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn placeholders_are_replaced_or_refused() {
        let a = ann(&[
            ("name", "eu-west-{ordinal}"),
            (
                "peers",
                "us-east-{ordinal}=notes-{ordinal}.ferry.us-east.example.com:7443",
            ),
            ("tls-secret", "ferry-tls-{ordinal}"),
            ("volume", "data"),
        ]);
        let out = substitute(&a, Some(2), "notes-2").expect("replaced");
        assert_eq!(out["ferry.io/name"], "eu-west-2");
        assert_eq!(
            out["ferry.io/peers"],
            "us-east-2=notes-2.ferry.us-east.example.com:7443"
        );
        assert_eq!(out["ferry.io/tls-secret"], "ferry-tls-2");
        assert_eq!(out["ferry.io/volume"], "data");
        // not a StatefulSet pod: every annotation that uses it is named
        let e = substitute(&a, None, "web-x").unwrap_err();
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].message.contains("not a StatefulSet pod"), "{e:?}");
        // ordinal 0 without placeholders: one pod per cluster, as before
        let single = ann(&[("name", "eu-west"), ("peers", "us-east=h:7443")]);
        assert!(substitute(&single, Some(0), "notes-0").is_ok());
        // ordinal 1 without them: each missing one is named
        let e = substitute(&single, Some(1), "notes-1").unwrap_err();
        let subjects: Vec<&str> = e.iter().map(|p| p.subject.as_str()).collect();
        assert_eq!(
            subjects,
            [
                "annotation ferry.io/name",
                "annotation ferry.io/peers",
                "annotation ferry.io/tls-secret"
            ]
        );
        assert!(e[2].message.contains("is not set"), "{e:?}");
        assert!(e[0].message.contains("ordinal 1 of a StatefulSet"), "{e:?}");
        // a misspelt placeholder is named as such
        let e = substitute(&ann(&[("name", "eu-west-{index}")]), Some(0), "notes-0").unwrap_err();
        assert!(e[0].message.contains("unknown placeholder"), "{e:?}");
    }
}
