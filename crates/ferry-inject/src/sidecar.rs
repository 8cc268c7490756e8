//! The ferry sidecar container and the TLS volume, built from [`Settings`].

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, Probe, ResourceRequirements, SeccompProfile, SecretVolumeSource,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQuantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::settings::Settings;

/// The sidecar's container name.
pub const CONTAINER_NAME: &str = "ferry";
/// The pod volume holding the node's TLS Secret.
pub const TLS_VOLUME: &str = "ferry-tls";
/// Where the replicated volume is mounted in the sidecar.
pub const ROOT_MOUNT: &str = "/ferry/root";
/// Where the TLS Secret is mounted in the sidecar.
pub const TLS_MOUNT: &str = "/ferry/tls";
/// Name of the UDP port peers dial (at most 15 characters, per Kubernetes).
pub const QUIC_PORT_NAME: &str = "ferry-quic";
/// Name of the TCP port serving `/metrics`, `/healthz`, `/readyz`. Not plain
/// `metrics`: apps often have a port by that name, and a PodMonitor or probe
/// that means ferry's must not pick up the app's.
pub const METRICS_PORT_NAME: &str = "ferry-metrics";
/// UID/GID the sidecar runs as when the pod does not set one (the distroless
/// `nonroot` user).
pub const DEFAULT_UID: i64 = 65532;

/// Startup probe period: short, so the app starts soon after the replica caught up.
const STARTUP_PERIOD_SECONDS: i32 = 2;
/// Startup probe failures allowed: 1800 × 2 s = one hour to catch up a fresh
/// replica before the kubelet restarts the sidecar.
const STARTUP_FAILURE_THRESHOLD: i32 = 1800;
/// Liveness probe period and allowed failures: a hung sidecar restarts in a minute.
const LIVENESS_PERIOD_SECONDS: i32 = 10;
const LIVENESS_FAILURE_THRESHOLD: i32 = 6;
/// Probe timeout: the endpoints answer from memory.
const PROBE_TIMEOUT_SECONDS: i32 = 2;

/// Which user the sidecar runs as. It must read and write the app's files, so it
/// runs as the app's user where that is known and not root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunAs {
    /// Inherit the pod's `securityContext.runAsUser`.
    Inherit,
    /// Set `runAsUser` (and `runAsGroup` when given) on the sidecar.
    Set { uid: i64, gid: Option<i64> },
}

/// Builds the sidecar container.
pub(crate) fn container(s: &Settings, run_as: RunAs) -> Container {
    let name_arg = s.name.clone().unwrap_or_else(|| "$(POD_NAME)".to_owned());
    let mut args: Vec<String> = [
        "run",
        "--root",
        ROOT_MOUNT,
        "--name",
        &name_arg,
        "--tls-dir",
        TLS_MOUNT,
        "--listen",
        &format!("0.0.0.0:{}", s.quic_port),
        "--metrics-addr",
        &format!("0.0.0.0:{}", s.metrics_port),
        "--role",
        s.role.as_str(),
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .collect();
    for p in &s.peers {
        args.push("--peer".to_owned());
        args.push(p.to_string());
    }
    for g in &s.exclude {
        args.push("--exclude".to_owned());
        args.push(g.clone());
    }

    let field = |path: &str| EnvVarSource {
        field_ref: Some(ObjectFieldSelector {
            field_path: path.to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let env = vec![
        EnvVar {
            name: "POD_NAME".to_owned(),
            value_from: Some(field("metadata.name")),
            ..Default::default()
        },
        EnvVar {
            name: "POD_NAMESPACE".to_owned(),
            value_from: Some(field("metadata.namespace")),
            ..Default::default()
        },
        // For commands run with `kubectl exec -c ferry -- ferry status` (or
        // `promote`): they find the node's state through the root.
        EnvVar {
            name: "FERRY_ROOT".to_owned(),
            value: Some(ROOT_MOUNT.to_owned()),
            ..Default::default()
        },
        log_env(&s.log_level),
    ];

    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String(METRICS_PORT_NAME.to_owned()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(PROBE_TIMEOUT_SECONDS),
        failure_threshold: Some(failures),
        ..Default::default()
    };

    let q = |v: &crate::quantity::Quantity| K8sQuantity(v.as_str().to_owned());
    let r = &s.resources;
    let resources = ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), q(&r.cpu_request)),
            ("memory".to_owned(), q(&r.memory_request)),
        ])),
        limits: Some(BTreeMap::from([
            ("cpu".to_owned(), q(&r.cpu_limit)),
            ("memory".to_owned(), q(&r.memory_limit)),
        ])),
        ..Default::default()
    };

    let (run_as_user, run_as_group) = match run_as {
        RunAs::Inherit => (None, None),
        RunAs::Set { uid, gid } => (Some(uid), gid),
    };

    Container {
        name: CONTAINER_NAME.to_owned(),
        image: Some(s.image.clone()),
        command: Some(vec!["ferry".to_owned()]),
        args: Some(args),
        env: Some(env),
        ports: Some(vec![
            ContainerPort {
                name: Some(QUIC_PORT_NAME.to_owned()),
                container_port: i32::from(s.quic_port),
                protocol: Some("UDP".to_owned()),
                ..Default::default()
            },
            ContainerPort {
                name: Some(METRICS_PORT_NAME.to_owned()),
                container_port: i32::from(s.metrics_port),
                protocol: Some("TCP".to_owned()),
                ..Default::default()
            },
        ]),
        resources: Some(resources),
        volume_mounts: Some(vec![
            VolumeMount {
                name: s.volume.clone(),
                mount_path: ROOT_MOUNT.to_owned(),
                ..Default::default()
            },
            VolumeMount {
                name: TLS_VOLUME.to_owned(),
                mount_path: TLS_MOUNT.to_owned(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        startup_probe: Some(probe(
            "/readyz",
            STARTUP_PERIOD_SECONDS,
            STARTUP_FAILURE_THRESHOLD,
        )),
        liveness_probe: Some(probe(
            "/healthz",
            LIVENESS_PERIOD_SECONDS,
            LIVENESS_FAILURE_THRESHOLD,
        )),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user,
            run_as_group,
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Default::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        restart_policy: s.native_sidecar.then(|| "Always".to_owned()),
        ..Default::default()
    }
}

/// The log setting: a plain level goes to `FERRY_LOG_LEVEL` (the binary keeps
/// dependencies at `warn` and applies the level to ferry's own crates); a filter with
/// targets (or `off`) goes to `FERRY_LOG`, which replaces the whole filter.
fn log_env(filter: &str) -> EnvVar {
    let lower = filter.to_ascii_lowercase();
    let (name, value) = if ["error", "warn", "info", "debug", "trace"].contains(&lower.as_str()) {
        ("FERRY_LOG_LEVEL", lower)
    } else {
        ("FERRY_LOG", filter.to_owned())
    };
    EnvVar {
        name: name.to_owned(),
        value: Some(value),
        ..Default::default()
    }
}

/// The volume that mounts the node's TLS Secret.
pub(crate) fn tls_volume(s: &Settings) -> Volume {
    Volume {
        name: TLS_VOLUME.to_owned(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(s.tls_secret.clone()),
            ..Default::default()
        }),
        ..Default::default()
    }
}
