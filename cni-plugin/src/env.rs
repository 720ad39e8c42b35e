//! The CNI environment (`CNI_COMMAND`, `CNI_CONTAINERID`, ...), validated up front.

use crate::error::{PluginError, Result};
use podwire_core::cni::{conflicting_pod_key, parse_cni_args};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

/// Who the pod is, from `CNI_ARGS`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl PodRef {
    pub fn display(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The look-up for this pod, as the agent is asked and as an answer is matched.
    pub fn request(&self) -> podwire_core::lookup::LookupRequest {
        podwire_core::lookup::LookupRequest {
            v: podwire_core::lookup::PROTOCOL_VERSION,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            uid: self.uid.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct CniEnv {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<String>,
    pub ifname: String,
    /// `None` when the runtime gave no `K8S_POD_NAME`: not a pod podwire can identify.
    pub pod: Option<PodRef>,
}

fn var(name: &'static str, get: &impl Fn(&str) -> Option<String>) -> Option<String> {
    get(name).filter(|v| !v.is_empty())
}

fn required(name: &'static str, get: &impl Fn(&str) -> Option<String>) -> Result<String> {
    var(name, get).ok_or(PluginError::InvalidEnv {
        var: name,
        reason: "is required but not set".into(),
    })
}

impl CniEnv {
    /// Read and validate the environment through `get` (std::env::var in production).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<CniEnv> {
        let command = match required("CNI_COMMAND", &get)?.as_str() {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            other => {
                return Err(PluginError::InvalidEnv {
                    var: "CNI_COMMAND",
                    reason: format!(
                        "is {other:?}, not one of ADD, DEL, CHECK, VERSION, STATUS, GC"
                    ),
                })
            }
        };
        let mut env = CniEnv {
            command,
            container_id: String::new(),
            netns: None,
            ifname: String::new(),
            pod: None,
        };
        if !matches!(command, Command::Add | Command::Del | Command::Check) {
            return Ok(env);
        }
        env.container_id = required("CNI_CONTAINERID", &get)?;
        // The spec allows alphanumerics, '_', '.', '-'; the id also names podwire's state file.
        if !env
            .container_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
            || env.container_id.starts_with('.')
        {
            return Err(PluginError::InvalidEnv {
                var: "CNI_CONTAINERID",
                reason: format!(
                    "{:?} has characters outside A-Z a-z 0-9 _ . -",
                    env.container_id
                ),
            });
        }
        env.ifname = required("CNI_IFNAME", &get)?;
        env.netns = var("CNI_NETNS", &get);
        if env.netns.is_none() && command != Command::Del {
            return Err(PluginError::InvalidEnv {
                var: "CNI_NETNS",
                reason: "is required for ADD and CHECK but not set".into(),
            });
        }
        let raw_args = var("CNI_ARGS", &get).unwrap_or_default();
        let args = parse_cni_args(&raw_args).map_err(|reason| PluginError::InvalidEnv {
            var: "CNI_ARGS",
            reason,
        })?;
        // DEL tears down what ADD recorded whatever the arguments say: never refused for them.
        if command != Command::Del {
            if let Some(reason) = conflicting_pod_key(&raw_args) {
                return Err(PluginError::InvalidEnv {
                    var: "CNI_ARGS",
                    reason,
                });
            }
        }
        if let Some(name) = args.get("K8S_POD_NAME").filter(|n| !n.is_empty()) {
            let namespace = args
                .get("K8S_POD_NAMESPACE")
                .filter(|n| !n.is_empty())
                .cloned()
                .unwrap_or_else(|| "default".into());
            for (key, value) in [("K8S_POD_NAME", name), ("K8S_POD_NAMESPACE", &namespace)] {
                if !is_dns_name(value) {
                    return Err(PluginError::InvalidEnv {
                        var: "CNI_ARGS",
                        reason: format!("{key}={value:?} is not a valid Kubernetes name"),
                    });
                }
            }
            env.pod = Some(PodRef {
                namespace,
                name: name.clone(),
                uid: args.get("K8S_POD_UID").cloned().unwrap_or_default(),
            });
        }
        Ok(env)
    }
}

/// DNS-1123 subdomain (pod names) / label (namespaces), and podman's container names
/// (which may hold '_' and upper case): conservative but never hostile.
fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        && !s.starts_with(['-', '.'])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<CniEnv> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CniEnv::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn add_env() {
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_UID=u",
            ),
        ])
        .expect("valid");
        assert_eq!(
            e.pod,
            Some(PodRef {
                namespace: "shop".into(),
                name: "web-1".into(),
                uid: "u".into()
            })
        );
    }

    #[test]
    fn podman_passes_only_the_name() {
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web"),
        ])
        .expect("valid");
        assert_eq!(e.pod.map(|p| p.namespace), Some("default".into()));
    }

    #[test]
    fn errors_name_the_variable() {
        for (pairs, var) in [
            (vec![], "CNI_COMMAND"),
            (vec![("CNI_COMMAND", "FROB")], "CNI_COMMAND"),
            (vec![("CNI_COMMAND", "ADD")], "CNI_CONTAINERID"),
            (
                vec![("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "../x")],
                "CNI_CONTAINERID",
            ),
            (
                vec![
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_CONTAINERID", "a"),
                    ("CNI_IFNAME", "eth0"),
                ],
                "CNI_NETNS",
            ),
            (
                vec![
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_CONTAINERID", "a"),
                    ("CNI_IFNAME", "eth0"),
                    ("CNI_NETNS", "/x"),
                    ("CNI_ARGS", "K8S_POD_NAME=a\nb"),
                ],
                "CNI_ARGS",
            ),
            // Which of two pods is meant cannot be guessed.
            (
                vec![
                    ("CNI_COMMAND", "ADD"),
                    ("CNI_CONTAINERID", "a"),
                    ("CNI_IFNAME", "eth0"),
                    ("CNI_NETNS", "/x"),
                    ("CNI_ARGS", "K8S_POD_NAME=web;K8S_POD_NAME=plain"),
                ],
                "CNI_ARGS",
            ),
        ] {
            match env(&pairs) {
                Err(PluginError::InvalidEnv { var: v, .. }) => assert_eq!(v, var),
                other => panic!("{pairs:?}: expected InvalidEnv({var}), got {other:?}"),
            }
        }
        // DEL is never refused for its arguments, and keys other than K8S_POD_* may repeat.
        for (command, args) in [
            ("DEL", "K8S_POD_NAME=web;K8S_POD_NAME=plain"),
            ("ADD", "IgnoreUnknown=1;IgnoreUnknown=true;K8S_POD_NAME=web"),
            ("ADD", "K8S_POD_NAME=web;K8S_POD_NAME=web"),
        ] {
            let pairs = [
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", "a"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/x"),
                ("CNI_ARGS", args),
            ];
            assert!(env(&pairs).is_ok(), "{pairs:?}");
        }
    }
}
