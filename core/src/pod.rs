//! The slice of a Kubernetes Pod that podwire's decisions read.
//!
//! It deserializes straight from a Pod object (JSON or YAML through serde), ignoring every
//! other field, and is also what the agent sends the plugin, so the cache stays small.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodInfo {
    #[serde(default)]
    pub metadata: PodMeta,
    #[serde(default)]
    pub spec: PodSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodMeta {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub generate_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Set once the pod is being deleted: a runtime that does not say which UID it sets up
    /// may be setting up its re-created successor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default, skip_serializing_if = "is_false")]
    pub host_network: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node_name: String,
    #[serde(default)]
    pub containers: Vec<Container>,
    /// Istio's native-sidecar layout puts the proxy here (`restartPolicy: Always`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_containers: Vec<Container>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    pub name: String,
    /// `Always` on an init container makes it a native sidecar (Kubernetes ≥ 1.28).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<SecurityContext>,
    /// The first two arguments only: the proxy's type (`proxy sidecar`, `proxy router`).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "first_two_args"
    )]
    pub args: Vec<String>,
    /// Literal env values only, and only of the variables a decision reads ([`READ_ENV`]).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "read_env"
    )]
    pub env: Vec<EnvVar>,
}

/// Env variables a decision reads; the rest of a container's env is never kept.
pub const READ_ENV: [&str; 1] = ["DISABLE_ENVOY"];

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvVar {
    pub name: String,
    /// Absent when the variable comes from `valueFrom`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

fn first_two_args<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let mut args = Option::<Vec<String>>::deserialize(d)?.unwrap_or_default();
    args.truncate(2);
    Ok(args)
}

fn read_env<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<EnvVar>, D::Error> {
    let mut env = Option::<Vec<EnvVar>>::deserialize(d)?.unwrap_or_default();
    env.retain(|e| READ_ENV.contains(&e.name.as_str()));
    Ok(env)
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecurityContext {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_user: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_group: Option<i64>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Container {
    /// The literal value of env variable `name` (one of [`READ_ENV`]); the last entry wins,
    /// as in the container's environment.
    pub fn env_value(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .rfind(|e| e.name == name)
            .and_then(|e| e.value.as_deref())
    }
}

impl PodInfo {
    /// The namespace, with the API's default when the manifest leaves it out.
    pub fn namespace(&self) -> &str {
        if self.metadata.namespace.is_empty() {
            "default"
        } else {
            &self.metadata.namespace
        }
    }

    /// `namespace/name` for messages.
    pub fn display_name(&self) -> String {
        let name = if self.metadata.name.is_empty() {
            format!("{}<generated>", self.metadata.generate_name)
        } else {
            self.metadata.name.clone()
        };
        format!("{}/{}", self.namespace(), name)
    }

    /// The container called `name`, in `containers` or else in `initContainers`: Istio injects
    /// its proxy in either place (classic or native-sidecar layout), and a pod whose proxy is
    /// overlooked would start without redirection.
    pub fn container(&self, name: &str) -> Option<&Container> {
        self.spec
            .containers
            .iter()
            .chain(&self.spec.init_containers)
            .find(|c| c.name == name)
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata.annotations.get(key).map(String::as_str)
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.metadata.labels.get(key).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_full_pod_object_and_ignores_the_rest() {
        let pod: PodInfo = serde_json::from_str(
            r#"{"apiVersion":"v1","kind":"Pod",
                "metadata":{"name":"web-1","namespace":"shop","uid":"u-1",
                  "labels":{"app":"web"},"annotations":{"a":"b"},"resourceVersion":"9"},
                "spec":{"nodeName":"n1","containers":[
                  {"name":"app","image":"x"},
                  {"name":"istio-proxy","securityContext":{"runAsUser":1337,"runAsGroup":1338}}]},
                "status":{"phase":"Running"}}"#,
        )
        .expect("pod parses");
        assert_eq!(pod.display_name(), "shop/web-1");
        assert_eq!(pod.label("app"), Some("web"));
        let sc = pod
            .container("istio-proxy")
            .and_then(|c| c.security_context.clone())
            .expect("security context");
        assert_eq!((sc.run_as_user, sc.run_as_group), (Some(1337), Some(1338)));
    }

    #[test]
    fn finds_a_native_sidecar_proxy_in_init_containers() {
        let pod: PodInfo = serde_json::from_str(
            r#"{"metadata":{"name":"web-1"},
                "spec":{"initContainers":[
                  {"name":"istio-proxy","restartPolicy":"Always",
                   "securityContext":{"runAsUser":2000,"runAsGroup":2001}}],
                 "containers":[{"name":"app"}]}}"#,
        )
        .expect("pod parses");
        let proxy = pod.container("istio-proxy").expect("proxy found");
        assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));
        let sc = proxy.security_context.clone().expect("security context");
        assert_eq!((sc.run_as_user, sc.run_as_group), (Some(2000), Some(2001)));
        // The slice the agent sends the plugin keeps the init container.
        let wire = serde_json::to_string(&pod).expect("serializes");
        let back: PodInfo = serde_json::from_str(&wire).expect("round trip");
        assert_eq!(back, pod);
    }

    #[test]
    fn namespace_defaults_to_default() {
        let pod: PodInfo = serde_json::from_str(r#"{"metadata":{"name":"x"}}"#).expect("parses");
        assert_eq!(pod.namespace(), "default");
    }
}
