//! A read-only view of the few Pod fields the injector looks at.
//!
//! The Pod is never re-serialised: the patch is computed against the raw JSON the API
//! server sent, so fields this view (or our `k8s-openapi` version) does not know survive
//! untouched. Unknown fields are ignored here, and `null` reads as "absent".

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

/// The Pod fields that decide what to inject.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PodView {
    #[serde(default, deserialize_with = "null_default")]
    pub metadata: MetaView,
    #[serde(default, deserialize_with = "null_default")]
    pub spec: SpecView,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MetaView {
    /// Empty for a pod the API server will name from `generate_name`.
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
    #[serde(default, deserialize_with = "null_default")]
    pub generate_name: String,
    #[serde(default, deserialize_with = "null_default")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "null_default")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SpecView {
    #[serde(default, deserialize_with = "null_default")]
    pub volumes: Vec<VolumeView>,
    #[serde(default, deserialize_with = "null_default")]
    pub containers: Vec<ContainerView>,
    #[serde(default, deserialize_with = "null_default")]
    pub init_containers: Vec<ContainerView>,
    #[serde(default, deserialize_with = "null_default")]
    pub host_network: bool,
    #[serde(default, deserialize_with = "null_default")]
    pub restart_policy: String,
    #[serde(default, deserialize_with = "null_default")]
    pub security_context: PodSecurityView,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PodSecurityView {
    #[serde(default)]
    pub run_as_user: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct VolumeView {
    pub name: String,
    /// Everything but the name: exactly one volume source in a valid Pod.
    #[serde(flatten)]
    pub source: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ContainerView {
    pub name: String,
    #[serde(default, deserialize_with = "null_default")]
    pub ports: Vec<PortView>,
    #[serde(default, deserialize_with = "null_default")]
    pub security_context: ContainerSecurityView,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ContainerSecurityView {
    #[serde(default)]
    pub run_as_user: Option<i64>,
    #[serde(default)]
    pub run_as_group: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PortView {
    pub container_port: i64,
}

impl PodView {
    /// Every container of the pod, app and init alike.
    pub(crate) fn all_containers(&self) -> impl Iterator<Item = &ContainerView> {
        self.spec
            .init_containers
            .iter()
            .chain(self.spec.containers.iter())
    }
}

impl VolumeView {
    /// The volume source's kind (`persistentVolumeClaim`, `emptyDir`, …).
    pub(crate) fn kind(&self) -> Option<&str> {
        self.source.keys().next().map(String::as_str)
    }

    /// Whether the source itself says it is mounted read-only
    /// (`persistentVolumeClaim.readOnly`, `csi.readOnly`, …).
    pub(crate) fn source_read_only(&self) -> bool {
        self.source.values().any(|v| {
            v.get("readOnly")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false)
        })
    }
}

/// Deserialises `null` as the type's default, as the API server treats it.
fn null_default<'de, D, T>(de: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(de)?.unwrap_or_default())
}
