//! The plugin's network configuration (its conflist entry), validated field by field so every
//! error names the field. Unknown keys (runtimeConfig, args, capabilities...) are ignored.

use crate::error::{PluginError, Result};
use podwire_core::cni::version_supported;
use podwire_core::mesh::DEFAULT_EXCLUDED_NAMESPACES;
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::path::PathBuf;

// The node contract (keys, defaults, enums) is podwire-core's, shared with the agent.
use podwire_core::node::keys;
pub use podwire_core::node::{
    Backend, FailurePolicy, DEFAULT_AGENT_SOCKET, DEFAULT_STATE_DIR, PODWIRE_NAMESPACE,
};

#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub agent_socket: PathBuf,
    pub kubeconfig: Option<PathBuf>,
    pub exclude_namespaces: Vec<String>,
    pub failure_policy: FailurePolicy,
    pub iptables: Backend,
    pub log_level: tracing::Level,
    pub log_file: Option<PathBuf>,
    pub state_dir: PathBuf,
    /// The previous plugin's result, byte for byte.
    pub prev_result: Option<Box<RawValue>>,
}

type Fields = BTreeMap<String, Box<RawValue>>;

fn field<T: serde::de::DeserializeOwned>(
    f: &Fields,
    key: &'static str,
    what: &str,
) -> Result<Option<T>> {
    match f.get(key) {
        None => Ok(None),
        Some(raw) if raw.get() == "null" => Ok(None),
        Some(raw) => {
            serde_json::from_str(raw.get())
                .map(Some)
                .map_err(|_| PluginError::InvalidConfig {
                    field: key,
                    reason: format!("expected {what}, got {}", truncate(raw.get())),
                })
        }
    }
}

fn one_of<'a>(key: &'static str, value: &str, allowed: &[&'a str]) -> Result<&'a str> {
    allowed
        .iter()
        .find(|a| **a == value)
        .copied()
        .ok_or_else(|| PluginError::InvalidConfig {
            field: key,
            reason: format!("{value:?} is not one of {}", allowed.join(", ")),
        })
}

/// A field holding one of a contract enum's names.
fn named<T: std::str::FromStr<Err = podwire_core::node::UnknownValue>>(
    f: &Fields,
    key: &'static str,
    what: &str,
) -> Result<Option<T>> {
    field::<String>(f, key, what)?
        .map(|v| {
            v.parse().map_err(
                |e: podwire_core::node::UnknownValue| PluginError::InvalidConfig {
                    field: key,
                    reason: e.to_string(),
                },
            )
        })
        .transpose()
}

fn truncate(s: &str) -> String {
    if s.len() > 80 {
        format!(
            "{}...",
            &s[..s.char_indices().nth(77).map_or(s.len(), |(i, _)| i)]
        )
    } else {
        s.to_string()
    }
}

fn path(f: &Fields, key: &'static str) -> Result<Option<PathBuf>> {
    let p: Option<String> = field(f, key, "a path string")?;
    match p {
        Some(p) if p.is_empty() || p.contains('\0') => Err(PluginError::InvalidConfig {
            field: key,
            reason: "must be a non-empty path".into(),
        }),
        Some(p) => Ok(Some(PathBuf::from(p))),
        None => Ok(None),
    }
}

/// Parse only what is needed to answer VERSION / pick log settings when the rest is broken.
pub fn top_level(stdin: &[u8]) -> Result<Fields> {
    serde_json::from_slice::<Fields>(stdin)
        .map_err(|e| PluginError::Decode(format!("{e} (expected a JSON object)")))
}

/// The config's own `cniVersion` when it is one podwire speaks, even if the rest of the
/// config is broken: errors are answered in the version the runtime asked for.
pub fn declared_version(stdin: &[u8]) -> Option<String> {
    let f = top_level(stdin).ok()?;
    let v: String = field(&f, "cniVersion", "a version string").ok()??;
    version_supported(&v).then_some(v)
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<NetConf> {
        let f = top_level(stdin)?;
        let cni_version: String =
            field(&f, "cniVersion", "a version string")?.ok_or(PluginError::InvalidConfig {
                field: "cniVersion",
                reason: "is required".into(),
            })?;
        if !version_supported(&cni_version) {
            return Err(PluginError::IncompatibleVersion {
                version: cni_version,
                reason: format!(
                    "supported: {}",
                    podwire_core::cni::SUPPORTED_VERSIONS.join(", ")
                ),
            });
        }
        let name: String = field(&f, "name", "the network name (string)")?.unwrap_or_default();
        let exclude_namespaces = match field::<Vec<String>>(
            &f,
            keys::EXCLUDE_NAMESPACES,
            "a list of namespace names",
        )? {
            Some(list) => list,
            None => DEFAULT_EXCLUDED_NAMESPACES
                .iter()
                .copied()
                .chain([PODWIRE_NAMESPACE])
                .map(String::from)
                .collect(),
        };
        let failure_policy: FailurePolicy =
            named(&f, keys::FAILURE_POLICY, "\"closed\" or \"open\"")?.unwrap_or_default();
        let iptables: Backend =
            named(&f, keys::IPTABLES, "\"auto\", \"legacy\" or \"nft\"")?.unwrap_or_default();
        let log_level = match field::<String>(&f, keys::LOG_LEVEL, "a log level string")? {
            None => tracing::Level::INFO,
            Some(v) => one_of(
                keys::LOG_LEVEL,
                &v.to_ascii_lowercase(),
                &["error", "warn", "info", "debug", "trace"],
            )?
            .parse()
            .map_err(|_| PluginError::InvalidConfig {
                field: keys::LOG_LEVEL,
                reason: format!("{v:?} is not a log level"),
            })?,
        };
        Ok(NetConf {
            cni_version,
            name,
            agent_socket: path(&f, keys::AGENT_SOCKET)?
                .unwrap_or_else(|| DEFAULT_AGENT_SOCKET.into()),
            kubeconfig: path(&f, keys::KUBECONFIG)?,
            exclude_namespaces,
            failure_policy,
            iptables,
            log_level,
            log_file: path(&f, keys::LOG_FILE)?,
            state_dir: path(&f, keys::STATE_DIR)?.unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            prev_result: f.get("prevResult").filter(|r| r.get() != "null").cloned(),
        })
    }

    /// Whether the previous result holds an IPv6 address (then IPv6 gets the same rules).
    /// Checked by ADD and CHECK, which pass the result on; DEL does not need it. A result that
    /// does not read as one (not an object, an `ips` entry without an address) is refused: it
    /// would be passed on as this plugin's result, and reading it as "no IPv6" would leave
    /// IPv6 traffic unredirected.
    pub fn has_ipv6(&self) -> Result<bool> {
        #[derive(serde::Deserialize)]
        struct Ip {
            address: String,
        }
        #[derive(serde::Deserialize)]
        struct Prev {
            #[serde(default)]
            ips: Option<Vec<Ip>>,
        }
        let Some(raw) = &self.prev_result else {
            return Ok(false);
        };
        let p: Prev = serde_json::from_str(raw.get()).map_err(|e| PluginError::InvalidConfig {
            field: "prevResult",
            reason: format!(
                "expected the previous plugin's result (an object; each of its ips with an \
             address string): {e}"
            ),
        })?;
        Ok(p.ips
            .unwrap_or_default()
            .iter()
            .any(|ip| ip.address.contains(':')))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"podwire-cni"}"#)
            .expect("valid");
        assert_eq!(c.agent_socket, PathBuf::from(DEFAULT_AGENT_SOCKET));
        assert_eq!(c.failure_policy, FailurePolicy::Closed);
        assert!(c.exclude_namespaces.contains(&"kube-system".to_string()));
        assert!(c
            .exclude_namespaces
            .contains(&PODWIRE_NAMESPACE.to_string()));
        assert!(c.prev_result.is_none());
    }

    #[test]
    fn prev_result_is_kept_byte_for_byte() {
        let c = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","prevResult":{"z":1,"ips":[{"address":"fd00::2/64"}],"a":{"x":[1.50]}}}"#,
        )
        .expect("valid");
        assert_eq!(
            c.prev_result.as_ref().map(|r| r.get()),
            Some(r#"{"z":1,"ips":[{"address":"fd00::2/64"}],"a":{"x":[1.50]}}"#)
        );
        assert_eq!(c.has_ipv6().ok(), Some(true));
    }

    #[test]
    fn bad_fields_are_named() {
        for (conf, field) in [
            (r#"{"name":"n"}"#, "cniVersion"),
            (
                r#"{"cniVersion":"1.0.0","failurePolicy":"sometimes"}"#,
                "failurePolicy",
            ),
            (r#"{"cniVersion":"1.0.0","iptables":7}"#, "iptables"),
            (
                r#"{"cniVersion":"1.0.0","excludeNamespaces":"kube-system"}"#,
                "excludeNamespaces",
            ),
            (r#"{"cniVersion":"1.0.0","logLevel":"loud"}"#, "logLevel"),
            (r#"{"cniVersion":"1.0.0","agentSocket":""}"#, "agentSocket"),
        ] {
            match NetConf::parse(conf.as_bytes()) {
                Err(PluginError::InvalidConfig { field: f, .. }) => assert_eq!(f, field, "{conf}"),
                other => panic!("{conf}: expected InvalidConfig({field}), got {other:?}"),
            }
        }
        assert!(matches!(
            NetConf::parse(br#"{"cniVersion":"9.9.9"}"#),
            Err(PluginError::IncompatibleVersion { .. })
        ));
        assert!(matches!(
            NetConf::parse(b"{not json"),
            Err(PluginError::Decode(_))
        ));
    }
}
