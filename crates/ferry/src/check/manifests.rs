//! `ferry check --manifests DIR`: the webhook configuration as rendered
//! (`kubectl kustomize manifests/base > DIR/ferry.yaml`, or `helm template`),
//! checked without a cluster: the objectSelector on `ferry.io/inject`,
//! `failurePolicy: Fail`, a CA for the API server (a `caBundle` or
//! cert-manager's `inject-ca-from`), and the Service, Deployment and
//! certificate names agreeing with each other.

use super::{f, Finding, Level};
use std::path::{Path, PathBuf};
use yaml_rust2::{Yaml, YamlLoader};

/// One Kubernetes object read from a file.
struct Obj {
    file: PathBuf,
    doc: Yaml,
}

impl Obj {
    fn kind(&self) -> &str {
        self.doc["kind"].as_str().unwrap_or("")
    }
    fn name(&self) -> &str {
        self.doc["metadata"]["name"].as_str().unwrap_or("")
    }
    fn namespace(&self) -> Option<&str> {
        self.doc["metadata"]["namespace"].as_str()
    }
    fn id(&self) -> String {
        format!("{} {} ({})", self.kind(), self.name(), self.file.display())
    }
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        if e.file_type()?.is_dir() {
            yaml_files(&p, out)?;
        } else if matches!(
            p.extension().and_then(|x| x.to_str()),
            Some("yaml") | Some("yml")
        ) {
            out.push(p);
        }
    }
    Ok(())
}

/// Checks every YAML file below `dir`.
pub fn check_dir(dir: &Path) -> Vec<Finding> {
    let mut out = Vec::new();
    let render = "render the manifests first, e.g. `kubectl kustomize manifests/base > DIR/ferry.yaml` or `helm template ferry charts/ferry -n ferry-system > DIR/ferry.yaml`";
    let mut files = Vec::new();
    if let Err(e) = yaml_files(dir, &mut files) {
        out.push(
            f(
                "manifests",
                Level::Fail,
                format!("cannot read {}: {e}", dir.display()),
            )
            .fix(render),
        );
        return out;
    }
    let mut objs = Vec::new();
    for file in &files {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                out.push(f(
                    "manifests",
                    Level::Fail,
                    format!("cannot read {}: {e}", file.display()),
                ));
                continue;
            }
        };
        match YamlLoader::load_from_str(&text) {
            Ok(docs) => objs.extend(docs.into_iter().filter(|d| !d.is_null()).map(|doc| Obj {
                file: file.clone(),
                doc,
            })),
            Err(e) => out.push(
                f(
                    "manifests",
                    Level::Fail,
                    format!("{} is not valid YAML: {e}", file.display()),
                )
                .fix("fix the file (it must be what kubectl would apply)"),
            ),
        }
    }
    let mwcs: Vec<&Obj> = objs
        .iter()
        .filter(|o| o.kind() == "MutatingWebhookConfiguration")
        .collect();
    if mwcs.is_empty() {
        out.push(
            f(
                "manifests",
                Level::Fail,
                format!(
                    "no MutatingWebhookConfiguration in the {} YAML files below {}",
                    files.len(),
                    dir.display()
                ),
            )
            .fix(render),
        );
        return out;
    }
    for m in mwcs {
        check_mwc(m, &objs, &mut out);
    }
    out
}

fn check_mwc(m: &Obj, objs: &[Obj], out: &mut Vec<Finding>) {
    let Some(hooks) = m.doc["webhooks"].as_vec() else {
        out.push(
            f(m.id(), Level::Fail, "has no webhooks list")
                .fix("render the manifests from manifests/base or charts/ferry"),
        );
        return;
    };
    let inject_from = m.doc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].as_str();
    for w in hooks {
        let hook = format!(
            "webhook {} of {}",
            w["name"].as_str().unwrap_or("(unnamed)"),
            m.id()
        );
        // objectSelector on ferry.io/inject
        let sel = &w["objectSelector"];
        let by_label = !sel["matchLabels"]["ferry.io/inject"].is_badvalue();
        let by_expr = sel["matchExpressions"].as_vec().is_some_and(|v| {
            v.iter().any(|e| {
                e["key"].as_str() == Some("ferry.io/inject")
                    && matches!(e["operator"].as_str(), Some("Exists") | Some("In"))
            })
        });
        if by_label || by_expr {
            out.push(f(
                format!("{hook}: objectSelector"),
                Level::Ok,
                "only pods labelled ferry.io/inject are sent to it",
            ));
        } else {
            out.push(
                f(
                    format!("{hook}: objectSelector"),
                    Level::Fail,
                    "no objectSelector on the label ferry.io/inject: every pod of the cluster is sent to the webhook, and with failurePolicy Fail a webhook outage stops every pod from starting",
                )
                .fix("add objectSelector.matchExpressions [{key: ferry.io/inject, operator: Exists}, {key: ferry.io/inject, operator: NotIn, values: [\"false\"]}] as in manifests/base"),
            );
        }
        // failurePolicy (absent means Fail in admissionregistration/v1)
        match w["failurePolicy"].as_str() {
            None | Some("Fail") => out.push(f(
                format!("{hook}: failurePolicy"),
                Level::Ok,
                "Fail: a pod that asked for replication never starts without it",
            )),
            Some(other) => out.push(
                f(
                    format!("{hook}: failurePolicy"),
                    Level::Fail,
                    format!("{other}: while the webhook is down, a pod that asked for replication starts without it, silently"),
                )
                .fix("set failurePolicy: Fail (the objectSelector keeps other pods out of reach)"),
            ),
        }
        // a CA for the API server
        let bundle = w["clientConfig"]["caBundle"]
            .as_str()
            .filter(|s| !s.is_empty());
        match (bundle, inject_from) {
            (Some(b), _) => {
                use base64::Engine;
                let pem = base64::engine::general_purpose::STANDARD
                    .decode(b.trim())
                    .ok()
                    .and_then(|d| String::from_utf8(d).ok());
                if pem.as_deref().is_some_and(|p| p.contains("-----BEGIN CERTIFICATE-----")) {
                    out.push(f(format!("{hook}: caBundle"), Level::Ok, "holds a PEM CA certificate"));
                } else {
                    out.push(
                        f(
                            format!("{hook}: caBundle"),
                            Level::Fail,
                            "caBundle is not the base64 of a PEM certificate (the placeholder of manifests/without-cert-manager?): the API server cannot verify the webhook, and pods that opt in are refused",
                        )
                        .fix("set it to `base64 -w0 ca.crt` of the CA that signed the webhook's serving certificate (or `helm --set-file caBundle=ca.crt`)"),
                    );
                }
            }
            (None, Some(from)) => {
                let (ns, name) = from.split_once('/').unwrap_or(("", from));
                let cert = objs.iter().find(|o| {
                    o.kind() == "Certificate" && o.name() == name && o.namespace().is_none_or(|n| n == ns)
                });
                match cert {
                    Some(c) => {
                        out.push(f(format!("{hook}: CA"), Level::Ok, format!("cert-manager injects the CA of Certificate {from}")));
                        check_cert_names(&hook, w, c, out);
                    }
                    None => out.push(
                        f(
                            format!("{hook}: CA"),
                            Level::Warn,
                            format!("cert-manager.io/inject-ca-from names Certificate {from}, which is not among these manifests"),
                        )
                        .fix("make sure that Certificate exists in the cluster (`kubectl -n NS get certificate`), or render it along"),
                    ),
                }
            }
            (None, None) => out.push(
                f(
                    format!("{hook}: CA"),
                    Level::Fail,
                    "neither a caBundle nor cert-manager's cert-manager.io/inject-ca-from annotation: the API server cannot verify the webhook's certificate",
                )
                .fix("use manifests/base (cert-manager) or manifests/without-cert-manager with your CA in caBundle"),
            ),
        }
        check_service(&hook, w, objs, out);
    }
}

fn check_cert_names(hook: &str, w: &Yaml, cert: &Obj, out: &mut Vec<Finding>) {
    let svc = &w["clientConfig"]["service"];
    let (Some(name), Some(ns)) = (svc["name"].as_str(), svc["namespace"].as_str()) else {
        return;
    };
    let want = format!("{name}.{ns}.svc");
    let names: Vec<&str> = cert.doc["spec"]["dnsNames"]
        .as_vec()
        .map(|v| v.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    if names.contains(&want.as_str()) {
        out.push(f(
            format!("{hook}: serving certificate"),
            Level::Ok,
            format!("{} is issued for {want}", cert.id()),
        ));
    } else {
        out.push(
            f(
                format!("{hook}: serving certificate"),
                Level::Fail,
                format!("{} is issued for [{}], not for {want}, the name the API server calls", cert.id(), names.join(", ")),
            )
            .fix(format!("add {want} to its dnsNames, or point clientConfig.service at the Service it is issued for")),
        );
    }
}

fn check_service(hook: &str, w: &Yaml, objs: &[Obj], out: &mut Vec<Finding>) {
    let cc = &w["clientConfig"];
    if cc["url"].as_str().is_some() {
        out.push(f(
            format!("{hook}: service"),
            Level::Ok,
            "calls a URL (no Service to check)",
        ));
        return;
    }
    let svc = &cc["service"];
    let (Some(name), Some(ns)) = (svc["name"].as_str(), svc["namespace"].as_str()) else {
        out.push(
            f(
                format!("{hook}: service"),
                Level::Fail,
                "clientConfig names neither a service (name and namespace) nor a url",
            )
            .fix("set clientConfig.service.name and .namespace to the webhook's Service"),
        );
        return;
    };
    let port = svc["port"].as_i64().unwrap_or(443);
    let services: Vec<&Obj> = objs.iter().filter(|o| o.kind() == "Service").collect();
    let Some(s) = services
        .iter()
        .find(|o| o.name() == name && o.namespace().unwrap_or("") == ns)
    else {
        let have = services
            .iter()
            .map(|o| format!("{}/{}", o.namespace().unwrap_or("(no namespace)"), o.name()))
            .collect::<Vec<_>>()
            .join(", ");
        out.push(
            f(
                format!("{hook}: service"),
                Level::Fail,
                format!("calls Service {ns}/{name}, which is not among the manifests (Services: [{have}])"),
            )
            .fix("make clientConfig.service name and namespace those of the webhook's Service (render with the namespace set: kustomize's namespace:, helm -n)"),
        );
        return;
    };
    let ports: Vec<i64> = s.doc["spec"]["ports"]
        .as_vec()
        .map(|v| v.iter().filter_map(|p| p["port"].as_i64()).collect())
        .unwrap_or_default();
    if !ports.contains(&port) {
        out.push(
            f(
                format!("{hook}: service"),
                Level::Fail,
                format!("calls port {port} of Service {ns}/{name}, which has ports {ports:?}"),
            )
            .fix("make clientConfig.service.port one of the Service's ports"),
        );
        return;
    }
    // the Service must select the webhook's pods
    let selector = s.doc["spec"]["selector"].as_hash();
    let selects = |d: &Obj| -> bool {
        let labels = &d.doc["spec"]["template"]["metadata"]["labels"];
        selector.is_some_and(|sel| {
            !sel.is_empty()
                && sel
                    .iter()
                    .all(|(k, v)| k.as_str().is_some_and(|k| labels[k].as_str() == v.as_str()))
        })
    };
    match objs
        .iter()
        .find(|o| o.kind() == "Deployment" && o.namespace().unwrap_or("") == ns && selects(o))
    {
        Some(d) => out.push(f(
            format!("{hook}: service"),
            Level::Ok,
            format!("Service {ns}/{name} port {port} selects the pods of {}", d.id()),
        )),
        None => out.push(
            f(
                format!("{hook}: service"),
                Level::Fail,
                format!("Service {ns}/{name} selects no Deployment's pods in {ns}: the API server would find no webhook behind it"),
            )
            .fix("make the Service's selector match the ferry-inject Deployment's pod labels"),
        ),
    }
}
