//! The `ferry.io/*` annotations, resolved into one typed [`Settings`] value.
//!
//! Every problem is collected, not just the first, so one denial tells the user
//! everything to fix. Each message names the annotation and says what a good value
//! looks like.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::quantity::Quantity;

/// The prefix of every ferry annotation and label.
pub const PREFIX: &str = "ferry.io/";
/// The opt-in label (a label, so the webhook's `objectSelector` can filter on it).
pub const INJECT_LABEL: &str = "ferry.io/inject";
/// The annotation the injector writes to record what it injected.
pub const STATUS_ANNOTATION: &str = "ferry.io/status";

/// Annotation keys (without the prefix) and what each holds.
pub mod key {
    /// Required: the pod volume to replicate.
    pub const VOLUME: &str = "volume";
    /// `primary` or `replica`.
    pub const ROLE: &str = "role";
    /// Comma-separated `NAME=HOST:PORT`.
    pub const PEERS: &str = "peers";
    /// Comma-separated gitignore-style globs.
    pub const EXCLUDE: &str = "exclude";
    /// The sidecar image.
    pub const IMAGE: &str = "image";
    /// The sidecar's CPU request (a Kubernetes quantity).
    pub const CPU_REQUEST: &str = "cpu-request";
    /// The sidecar's memory request.
    pub const MEMORY_REQUEST: &str = "memory-request";
    /// The sidecar's CPU limit.
    pub const CPU_LIMIT: &str = "cpu-limit";
    /// The sidecar's memory limit.
    pub const MEMORY_LIMIT: &str = "memory-limit";
    /// A tracing filter (`info`, `ferry=debug,info`).
    pub const LOG_LEVEL: &str = "log-level";
    /// `true` (init container with `restartPolicy: Always`) or `false`.
    pub const NATIVE_SIDECAR: &str = "native-sidecar";
    /// The node name (must match the certificate's SAN).
    pub const NAME: &str = "name";
    /// The Secret with `tls.crt`, `tls.key`, `ca.crt`.
    pub const TLS_SECRET: &str = "tls-secret";
    /// The UDP port QUIC listens on.
    pub const QUIC_PORT: &str = "quic-port";
    /// The TCP port for `/metrics`, `/healthz`, `/readyz`.
    pub const METRICS_PORT: &str = "metrics-port";
    /// Written by the injector.
    pub const STATUS: &str = "status";
}

/// Every key the injector understands; anything else under `ferry.io/` is a warning.
pub const KNOWN_KEYS: &[&str] = &[
    key::VOLUME,
    key::ROLE,
    key::PEERS,
    key::EXCLUDE,
    key::IMAGE,
    key::CPU_REQUEST,
    key::MEMORY_REQUEST,
    key::CPU_LIMIT,
    key::MEMORY_LIMIT,
    key::LOG_LEVEL,
    key::NATIVE_SIDECAR,
    key::NAME,
    key::TLS_SECRET,
    key::QUIC_PORT,
    key::METRICS_PORT,
    key::STATUS,
];

/// Default CPU request: ferry idles on inotify and bursts while hashing a batch.
pub const DEFAULT_CPU_REQUEST: &str = "100m";
/// Default memory request: the pipeline is bounded; a quiet node needs tens of MiB.
pub const DEFAULT_MEMORY_REQUEST: &str = "128Mi";
/// Default CPU limit: one core is enough to hash and compress at disk speed.
pub const DEFAULT_CPU_LIMIT: &str = "1";
/// Default memory limit: headroom over the bounded pipeline plus chunk buffers.
pub const DEFAULT_MEMORY_LIMIT: &str = "512Mi";
/// Default log filter.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Default Secret holding the node's certificate (cert-manager layout).
pub const DEFAULT_TLS_SECRET: &str = "ferry-tls";
/// Default QUIC port (UDP), as in the design brief.
pub const DEFAULT_QUIC_PORT: u16 = 7443;
/// Default metrics/health port (TCP): not 9090, Prometheus's own port (and
/// a common app port); 9743 sits beside ferry's QUIC port 7443.
pub const DEFAULT_METRICS_PORT: u16 = 9743;

/// Most peers one node may list: a replication set spans a handful of clusters,
/// and the sidecar's argument list must stay readable.
const MAX_PEERS: usize = 64;
/// Most exclude globs.
const MAX_EXCLUDES: usize = 256;
/// Longest exclude glob.
const MAX_GLOB_LEN: usize = 1024;
/// Longest image reference (the registry's own limit is in this range).
const MAX_IMAGE_LEN: usize = 512;

/// Which way data flows; only seeds a fresh state dir (see DESIGN.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Primary,
    Replica,
}

impl Role {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }
}

/// One `NAME=HOST:PORT` entry of `ferry.io/peers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Peer {
    pub name: String,
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}:{}", self.name, self.host, self.port)
    }
}

/// Requests and limits for the sidecar container.
#[derive(Debug, Clone)]
pub(crate) struct Resources {
    pub cpu_request: Quantity,
    pub memory_request: Quantity,
    pub cpu_limit: Quantity,
    pub memory_limit: Quantity,
}

/// Everything the annotations decide, validated.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub volume: String,
    pub role: Role,
    pub peers: Vec<Peer>,
    pub exclude: Vec<String>,
    pub image: String,
    pub resources: Resources,
    pub log_level: String,
    pub native_sidecar: bool,
    /// `None`: the pod's own name, through the downward API.
    pub name: Option<String>,
    pub tls_secret: String,
    pub quic_port: u16,
    pub metrics_port: u16,
}

/// One thing wrong with the pod, shown to the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    /// What is wrong: `annotation ferry.io/peers`, `label ferry.io/inject`, `pod`.
    pub subject: String,
    /// Why, and how to fix it.
    pub message: String,
}

impl Problem {
    pub(crate) fn annotation(key: &str, message: impl Into<String>) -> Self {
        Problem {
            subject: format!("annotation {PREFIX}{key}"),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.subject, self.message)
    }
}

/// Reads and validates the `ferry.io/*` annotations. Returns the settings, or every
/// problem found. Unknown keys are not problems: see [`unknown_key_warnings`].
pub(crate) fn parse(
    annotations: &BTreeMap<String, String>,
    default_image: &str,
) -> Result<Settings, Vec<Problem>> {
    let mut problems = Vec::new();
    let get = |k: &str| annotations.get(&format!("{PREFIX}{k}")).map(|v| v.trim());

    let volume = match get(key::VOLUME) {
        None | Some("") => {
            problems.push(Problem::annotation(
                key::VOLUME,
                "is required: set it to the name of the pod volume to replicate \
                 (an entry of spec.volumes, e.g. a PersistentVolumeClaim)",
            ));
            String::new()
        }
        Some(v) => v.to_owned(),
    };

    let role = match get(key::ROLE) {
        None | Some("replica") => Role::Replica,
        Some("primary") => Role::Primary,
        Some(other) => {
            problems.push(Problem::annotation(
                key::ROLE,
                format!("{other:?} is not a role: use \"primary\" or \"replica\""),
            ));
            Role::Replica
        }
    };

    let name = match get(key::NAME) {
        None => None,
        Some(n) => match check_node_name(n) {
            Ok(()) => Some(n.to_owned()),
            Err(why) => {
                problems.push(Problem::annotation(
                    key::NAME,
                    format!("{n:?} {why}; it must match the DNS name in the node's certificate"),
                ));
                None
            }
        },
    };

    let peers = match get(key::PEERS) {
        None | Some("") => {
            problems.push(Problem::annotation(
                key::PEERS,
                "is required: list the other nodes of the replication set as \
                 NAME=HOST:PORT, comma-separated (e.g. \"us-east=ferry-app.us-east.example.com:7443\")",
            ));
            Vec::new()
        }
        Some(v) => match parse_peers(v, name.as_deref()) {
            Ok(p) => p,
            Err(why) => {
                problems.push(Problem::annotation(key::PEERS, why));
                Vec::new()
            }
        },
    };

    let exclude = match get(key::EXCLUDE) {
        None => Vec::new(),
        Some(v) => match parse_excludes(v) {
            Ok(e) => e,
            Err(why) => {
                problems.push(Problem::annotation(key::EXCLUDE, why));
                Vec::new()
            }
        },
    };

    let image = match get(key::IMAGE) {
        None => default_image.to_owned(),
        Some(i) => match check_image(i) {
            Ok(()) => i.to_owned(),
            Err(why) => {
                problems.push(Problem::annotation(key::IMAGE, why));
                default_image.to_owned()
            }
        },
    };

    let mut quantity = |k: &str, default: &str| -> Option<Quantity> {
        let text = get(k).unwrap_or(default);
        match Quantity::parse(text) {
            Ok(q) => Some(q),
            Err(why) => {
                problems.push(Problem::annotation(
                    k,
                    format!("{text:?} {why}; use a Kubernetes quantity such as \"250m\", \"0.5\", \"256Mi\" or \"1Gi\""),
                ));
                None
            }
        }
    };
    let cpu_request = quantity(key::CPU_REQUEST, DEFAULT_CPU_REQUEST);
    let memory_request = quantity(key::MEMORY_REQUEST, DEFAULT_MEMORY_REQUEST);
    let cpu_limit = quantity(key::CPU_LIMIT, DEFAULT_CPU_LIMIT);
    let memory_limit = quantity(key::MEMORY_LIMIT, DEFAULT_MEMORY_LIMIT);
    let resources = match (cpu_request, memory_request, cpu_limit, memory_limit) {
        (Some(cpu_request), Some(memory_request), Some(cpu_limit), Some(memory_limit)) => {
            for (req, lim, req_key, lim_key) in [
                (&cpu_request, &cpu_limit, key::CPU_REQUEST, key::CPU_LIMIT),
                (
                    &memory_request,
                    &memory_limit,
                    key::MEMORY_REQUEST,
                    key::MEMORY_LIMIT,
                ),
            ] {
                if req.value_cmp(lim) == Ordering::Greater {
                    problems.push(Problem::annotation(
                        req_key,
                        format!(
                            "{:?} is more than the limit {:?} ({PREFIX}{lim_key}); raise the limit or lower the request",
                            req.as_str(),
                            lim.as_str()
                        ),
                    ));
                }
            }
            Some(Resources {
                cpu_request,
                memory_request,
                cpu_limit,
                memory_limit,
            })
        }
        _ => None,
    };

    let log_level = match get(key::LOG_LEVEL) {
        None => DEFAULT_LOG_LEVEL.to_owned(),
        Some(v) => match check_log_filter(v) {
            Ok(()) => v.to_owned(),
            Err(why) => {
                problems.push(Problem::annotation(key::LOG_LEVEL, why));
                DEFAULT_LOG_LEVEL.to_owned()
            }
        },
    };

    let native_sidecar = match get(key::NATIVE_SIDECAR) {
        None | Some("true") => true,
        Some("false") => false,
        Some(other) => {
            problems.push(Problem::annotation(
                key::NATIVE_SIDECAR,
                format!("{other:?} is not a boolean: use \"true\" (default, needs Kubernetes 1.29+) or \"false\""),
            ));
            true
        }
    };

    let tls_secret = match get(key::TLS_SECRET) {
        None => DEFAULT_TLS_SECRET.to_owned(),
        Some(s) => match check_dns_subdomain(s) {
            Ok(()) => s.to_owned(),
            Err(why) => {
                problems.push(Problem::annotation(
                    key::TLS_SECRET,
                    format!("{s:?} is not a Secret name: {why}"),
                ));
                DEFAULT_TLS_SECRET.to_owned()
            }
        },
    };

    let mut port = |k: &str, default: u16| -> u16 {
        match get(k) {
            None => default,
            Some(v) => match v.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => {
                    problems.push(Problem::annotation(
                        k,
                        format!("{v:?} is not a port: use a number from 1 to 65535"),
                    ));
                    default
                }
            },
        }
    };
    let quic_port = port(key::QUIC_PORT, DEFAULT_QUIC_PORT);
    let metrics_port = port(key::METRICS_PORT, DEFAULT_METRICS_PORT);
    if quic_port == metrics_port {
        problems.push(Problem::annotation(
            key::METRICS_PORT,
            format!(
                "{metrics_port} is also the QUIC port ({PREFIX}{}); pick two different ports",
                key::QUIC_PORT
            ),
        ));
    }

    match resources {
        Some(resources) if problems.is_empty() => Ok(Settings {
            volume,
            role,
            peers,
            exclude,
            image,
            resources,
            log_level,
            native_sidecar,
            name,
            tls_secret,
            quic_port,
            metrics_port,
        }),
        _ => Err(problems),
    }
}

/// One warning per `ferry.io/` key the injector does not know, with a suggestion
/// when a known key is one or two edits away.
pub(crate) fn unknown_key_warnings(annotations: &BTreeMap<String, String>) -> Vec<String> {
    annotations
        .keys()
        .filter_map(|k| k.strip_prefix(PREFIX))
        .filter(|k| !KNOWN_KEYS.contains(k))
        .map(|k| {
            let hint = if k == "inject" {
                format!(" ({INJECT_LABEL} is a label, not an annotation)")
            } else {
                KNOWN_KEYS
                    .iter()
                    .filter(|known| **known != key::STATUS)
                    .map(|known| (edit_distance(k, known), known))
                    .filter(|(d, _)| *d <= 2)
                    .min()
                    .map(|(_, known)| format!(" (did you mean {PREFIX}{known}?)"))
                    .unwrap_or_default()
            };
            format!("unknown annotation {PREFIX}{k} is ignored{hint}")
        })
        .collect()
}

/// Levenshtein distance, for "did you mean" hints on short keys.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let subst = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = subst.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// `ferry.io/peers`: `NAME=HOST:PORT` entries, comma-separated; blank entries are
/// ignored so a trailing comma or a folded YAML string is fine.
fn parse_peers(value: &str, own_name: Option<&str>) -> Result<Vec<Peer>, String> {
    let mut peers = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, entry) in value.split(',').map(str::trim).enumerate() {
        if entry.is_empty() {
            continue;
        }
        let entry_no = i + 1;
        let bad = |why: &str| {
            format!(
                "entry {entry_no} {entry:?} {why}; write NAME=HOST:PORT, \
                 e.g. \"us-east=ferry-app.us-east.example.com:7443\""
            )
        };
        let (name, addr) = entry.split_once('=').ok_or_else(|| bad("has no '='"))?;
        let (name, addr) = (name.trim(), addr.trim());
        check_node_name(name).map_err(|why| bad(&format!("has a NAME that {why}")))?;
        let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad("has no ':PORT'"))?;
        let port = match port.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(bad("has a PORT that is not a number from 1 to 65535")),
        };
        check_host(host).map_err(|why| bad(&format!("has a HOST that {why}")))?;
        if Some(name) == own_name {
            return Err(bad(&format!(
                "names this node itself ({PREFIX}{}); list only the other nodes",
                key::NAME
            )));
        }
        if !seen.insert(name.to_owned()) {
            return Err(bad("repeats a NAME listed earlier; each peer appears once"));
        }
        peers.push(Peer {
            name: name.to_owned(),
            host: host.to_owned(),
            port,
        });
        if peers.len() > MAX_PEERS {
            return Err(format!("lists more than {MAX_PEERS} peers"));
        }
    }
    if peers.is_empty() {
        return Err("lists no peer: give at least one NAME=HOST:PORT".to_owned());
    }
    Ok(peers)
}

/// `ferry.io/exclude`: gitignore-style globs, comma-separated.
fn parse_excludes(value: &str) -> Result<Vec<String>, String> {
    let globs: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(str::to_owned)
        .collect();
    if globs.len() > MAX_EXCLUDES {
        return Err(format!("lists more than {MAX_EXCLUDES} globs"));
    }
    for (i, g) in globs.iter().enumerate() {
        if g.len() > MAX_GLOB_LEN {
            return Err(format!(
                "glob {} is longer than {MAX_GLOB_LEN} bytes",
                i + 1
            ));
        }
        if g.chars().any(char::is_control) {
            return Err(format!(
                "glob {} {g:?} contains a control character; use gitignore-style globs such as \"*.tmp,cache/\"",
                i + 1
            ));
        }
    }
    Ok(globs)
}

/// A node name: it travels in certificates as a DNS SAN, so DNS rules apply
/// (lower case letters, digits, '-' and '.', at most 253 characters).
fn check_node_name(name: &str) -> Result<(), String> {
    check_dns_subdomain(name)
}

/// RFC 1123 subdomain, as Kubernetes validates object names.
fn check_dns_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("is empty".to_owned());
    }
    if s.len() > 253 {
        return Err("is longer than 253 characters".to_owned());
    }
    for label in s.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(
                "is not a DNS name (lower case letters, digits, '-' and '.'; no leading or trailing '-')"
                    .to_owned(),
            );
        }
    }
    Ok(())
}

/// A peer host: a DNS name, an IPv4 address, or an IPv6 address in brackets.
fn check_host(host: &str) -> Result<(), String> {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner
            .parse::<Ipv6Addr>()
            .map(|_| ())
            .map_err(|_| "is not an IPv6 address".to_owned());
    }
    if host.parse::<Ipv4Addr>().is_ok() {
        return Ok(());
    }
    if host.parse::<Ipv6Addr>().is_ok() {
        return Err("is an IPv6 address without brackets (write [ADDR]:PORT)".to_owned());
    }
    if host.is_empty() || host.len() > 253 {
        return Err("is empty or longer than 253 characters".to_owned());
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    for label in host.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err("is neither a DNS name nor an IP address".to_owned());
        }
    }
    Ok(())
}

/// A container image reference: no spaces or control characters, bounded length.
/// The registry is the judge of the rest.
fn check_image(image: &str) -> Result<(), String> {
    if image.is_empty() {
        return Err(
            "is empty: name an image, e.g. \"registry.example.com/ferry:0.1.0\"".to_owned(),
        );
    }
    if image.len() > MAX_IMAGE_LEN {
        return Err(format!("is longer than {MAX_IMAGE_LEN} characters"));
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{image:?} contains whitespace; an image reference has none"
        ));
    }
    Ok(())
}

/// A tracing filter: comma-separated `LEVEL` or `TARGET=LEVEL` directives.
fn check_log_filter(filter: &str) -> Result<(), String> {
    const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];
    let bad = |d: &str| {
        format!(
            "{filter:?} is not a log filter (directive {d:?}): use a level ({}) or TARGET=LEVEL pairs, e.g. \"ferry=debug,info\"",
            LEVELS.join(", ")
        )
    };
    if filter.is_empty() || filter.len() > 512 {
        return Err(bad(filter));
    }
    for d in filter.split(',').map(str::trim) {
        let (target, level) = match d.split_once('=') {
            Some((t, l)) => (Some(t), l),
            None => (None, d),
        };
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(bad(d));
        }
        if let Some(t) = target {
            let ok = !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':' || b == b'-');
            if !ok {
                return Err(bad(d));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const IMAGE: &str = "example/ferry:test";

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (format!("{PREFIX}{k}"), (*v).to_owned()))
            .collect()
    }

    fn minimal() -> Vec<(&'static str, &'static str)> {
        vec![
            ("volume", "data"),
            ("peers", "us-east=ferry.us-east.example.com:7443"),
        ]
    }

    /// Parses `extra` on top of a minimal valid set; returns the problems' text.
    fn problems(extra: &[(&str, &str)]) -> Vec<String> {
        let mut pairs = minimal();
        pairs.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
        pairs.extend_from_slice(extra);
        match parse(&annotations(&pairs), IMAGE) {
            Ok(_) => Vec::new(),
            Err(p) => p.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn defaults() {
        let a = annotations(&minimal());
        let s = match parse(&a, IMAGE) {
            Ok(v) => v,
            Err(p) => panic!("minimal annotations refused: {p:?}"),
        };
        assert!(unknown_key_warnings(&a).is_empty());
        assert_eq!(s.volume, "data");
        assert_eq!(s.role, Role::Replica);
        assert_eq!(s.image, IMAGE);
        assert!(s.native_sidecar);
        assert_eq!(s.name, None);
        assert_eq!(s.tls_secret, DEFAULT_TLS_SECRET);
        assert_eq!((s.quic_port, s.metrics_port), (7443, 9743));
        assert_eq!(s.resources.cpu_request.as_str(), DEFAULT_CPU_REQUEST);
        assert_eq!(s.resources.memory_limit.as_str(), DEFAULT_MEMORY_LIMIT);
        assert_eq!(s.log_level, "info");
        assert_eq!(
            s.peers,
            vec![Peer {
                name: "us-east".into(),
                host: "ferry.us-east.example.com".into(),
                port: 7443
            }]
        );
    }

    #[test]
    fn peers_accept_names_ips_and_blanks() {
        let v = " a=10.0.0.1:7443 ,\n b=[fd00::1]:7443, c=host-c.example:1,";
        assert_eq!(
            parse_peers(v, None).map(|p| p.iter().map(ToString::to_string).collect::<Vec<_>>()),
            Ok(vec![
                "a=10.0.0.1:7443".to_owned(),
                "b=[fd00::1]:7443".to_owned(),
                "c=host-c.example:1".to_owned()
            ])
        );
    }

    /// Each bad value is denied with a message naming its annotation.
    #[test]
    fn bad_values_name_their_annotation() {
        let cases: &[(&str, &str, &str)] = &[
            ("volume", "", "is required"),
            ("peers", "", "is required"),
            ("peers", "us-east", "has no '='"),
            ("peers", "us-east=host", "has no ':PORT'"),
            ("peers", "us-east=host:0", "PORT"),
            ("peers", "us-east=host:99999", "PORT"),
            ("peers", "Us_East=host:1", "NAME"),
            ("peers", "a=fd00::1:7443", "without brackets"),
            ("peers", "a=h:1,a=h:2", "repeats"),
            ("peers", "a=-bad-:1", "HOST"),
            ("peers", ",,", "lists no peer"),
            ("role", "leader", "\"primary\" or \"replica\""),
            ("cpu-request", "lots", "quantity"),
            ("memory-limit", "-1Gi", "negative"),
            ("cpu-request", "2", "more than the limit"),
            ("memory-request", "1Gi", "more than the limit"),
            ("native-sidecar", "yes", "not a boolean"),
            ("log-level", "verbose", "not a log filter"),
            ("log-level", "fe rry=debug", "not a log filter"),
            ("image", "my image", "whitespace"),
            ("name", "EU_WEST", "DNS name"),
            ("tls-secret", "Bad_Name", "Secret name"),
            ("quic-port", "0", "not a port"),
            ("metrics-port", "http", "not a port"),
            ("metrics-port", "7443", "also the QUIC port"),
            ("exclude", "a,b\u{7}", "control character"),
        ];
        for (key, value, expect) in cases {
            let found = problems(&[(key, value)]);
            assert_eq!(found.len(), 1, "{key}={value:?}: {found:?}");
            let msg = &found[0];
            assert!(
                msg.starts_with(&format!("annotation {PREFIX}{key}:")),
                "{key}={value:?}: {msg}"
            );
            assert!(msg.contains(expect), "{key}={value:?}: {msg}");
        }
    }

    #[test]
    fn every_problem_is_listed() {
        let found = problems(&[("volume", ""), ("role", "x"), ("cpu-limit", "y")]);
        assert_eq!(found.len(), 3, "{found:?}");
    }

    #[test]
    fn a_peer_cannot_be_the_node_itself() {
        let found = problems(&[("name", "eu-west"), ("peers", "eu-west=h:1")]);
        assert_eq!(found.len(), 1);
        assert!(found[0].contains("names this node itself"), "{found:?}");
    }

    #[test]
    fn unknown_keys_warn_with_hints() {
        let mut a = annotations(&minimal());
        a.insert("ferry.io/peer".into(), "x".into());
        a.insert("ferry.io/inject".into(), "true".into());
        a.insert("ferry.io/colour".into(), "blue".into());
        a.insert("ferry.iox/other".into(), "ignored".into());
        assert!(parse(&a, IMAGE).is_ok());
        let warnings = unknown_key_warnings(&a);
        assert_eq!(
            warnings,
            vec![
                "unknown annotation ferry.io/colour is ignored".to_owned(),
                "unknown annotation ferry.io/inject is ignored (ferry.io/inject is a label, not an annotation)".to_owned(),
                "unknown annotation ferry.io/peer is ignored (did you mean ferry.io/peers?)".to_owned(),
            ]
        );
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("peer", "peers"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    proptest! {
        #[test]
        fn any_annotation_values_never_panic(values in proptest::collection::vec("\\PC{0,40}", KNOWN_KEYS.len())) {
            let pairs: BTreeMap<String, String> = KNOWN_KEYS
                .iter()
                .zip(values)
                .map(|(k, v)| (format!("{PREFIX}{k}"), v))
                .collect();
            match parse(&pairs, IMAGE) {
                Ok(s) => prop_assert!(!s.peers.is_empty() && !s.volume.is_empty()),
                Err(p) => prop_assert!(p.iter().all(|p| p.subject.starts_with("annotation ferry.io/"))),
            }
        }
    }
}
