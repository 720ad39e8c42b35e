//! The node contract: what podwire-cni, podwire-agent and `podwire doctor` agree on, typed
//! once. The chained conflist entry (its keys and defaults), the per-attachment records the
//! plugin leaves and the agent's repair reads, where they live, the Node condition, taint and
//! label names, and the agent's repair modes. Pure data and names: the I/O stays with the
//! binaries.

use crate::render::Rule;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use crate::conflist::PLUGIN_TYPE;

/// The plugin's binary name in the CNI bin dir.
pub const PLUGIN_BIN: &str = "podwire-cni";
/// The agent's run directory on the node: its socket, the plugin's kubeconfig, the state dir.
pub const RUN_DIR: &str = "/var/run/podwire";
/// Where the agent answers look-ups and the plugin asks (`agentSocket`).
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/podwire/agent.sock";
/// Where the plugin leaves records and locks (`stateDir`).
pub const DEFAULT_STATE_DIR: &str = "/var/run/podwire/state";
/// The namespace podwire's own components run in (never redirected).
pub const PODWIRE_NAMESPACE: &str = "podwire-system";
/// The agent's DaemonSet.
pub const AGENT_DAEMONSET: &str = "podwire-agent";

/// The Node condition the agent maintains.
pub const CONDITION: &str = "PodwireReady";
/// The condition's reason when ready / not ready.
pub const REASON_READY: &str = "PodwireReady";
pub const REASON_NOT_READY: &str = "PodwireNotReady";
/// The startup taint the agent removes once ready (`--remove-startup-taint`).
pub const STARTUP_TAINT: &str = "podwire.io/not-ready";
/// The label `--repair=label` puts on a mesh pod that started un-redirected.
pub const UNINITIALIZED_LABEL: &str = "podwire.io/uninitialized";

/// The keys of podwire-cni's entry in the conflist.
pub mod keys {
    pub const AGENT_SOCKET: &str = "agentSocket";
    pub const KUBECONFIG: &str = "kubeconfig";
    pub const EXCLUDE_NAMESPACES: &str = "excludeNamespaces";
    pub const FAILURE_POLICY: &str = "failurePolicy";
    pub const IPTABLES: &str = "iptables";
    pub const LOG_LEVEL: &str = "logLevel";
    pub const LOG_FILE: &str = "logFile";
    pub const STATE_DIR: &str = "stateDir";
}

/// A value that is not one of an enum's names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not one of {}", allowed.join(", "))]
pub struct UnknownValue {
    pub value: String,
    pub allowed: &'static [&'static str],
}

/// An enum spelled in the contract by fixed lower-case names.
macro_rules! named_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $text)] #[cfg_attr(feature = "clap", value(name = $text))] $variant),+
        }

        impl $name {
            /// Every name, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;
            fn from_str(s: &str) -> Result<Self, UnknownValue> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    _ => Err(UnknownValue { value: s.to_string(), allowed: Self::NAMES }),
                }
            }
        }
    };
}

named_enum! {
    /// What the plugin does with a pod whose mesh status it cannot determine.
    #[derive(Default)]
    FailurePolicy {
        /// ADD fails with "try again later": the pod never starts un-redirected.
        #[default]
        Closed = "closed",
        /// The pod starts without redirection (logged).
        Open = "open",
    }
}

named_enum! {
    /// Which iptables the plugin drives.
    #[derive(Default)]
    Backend {
        /// The one the node already uses.
        #[default]
        Auto = "auto",
        Legacy = "legacy",
        Nft = "nft",
    }
}

named_enum! {
    /// What the agent does with a mesh pod running on its node without redirection.
    #[derive(Default)]
    Repair {
        /// Delete the pod (UID precondition); its controller recreates it, now redirected.
        Delete = "delete",
        /// Label it `podwire.io/uninitialized=true` for a person or a tool to act on.
        #[default]
        Label = "label",
        /// Only report (log, metric, Event).
        Off = "off",
    }
}

/// podwire-cni's entry as the agent writes it. The plugin reads the same keys field by field
/// (so every error names its field) with the same defaults. Paths are strings, as in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChainedEntry {
    #[serde(rename = "type")]
    pub type_: String,
    pub agent_socket: String,
    pub failure_policy: FailurePolicy,
    pub state_dir: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_namespaces: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_file: Option<String>,
}

impl Default for ChainedEntry {
    fn default() -> Self {
        ChainedEntry {
            type_: PLUGIN_TYPE.to_string(),
            agent_socket: DEFAULT_AGENT_SOCKET.into(),
            failure_policy: FailurePolicy::Closed,
            state_dir: DEFAULT_STATE_DIR.into(),
            exclude_namespaces: None,
            kubeconfig: None,
            log_file: None,
        }
    }
}

/// What the plugin leaves per redirected attachment (`<stateDir>/pods/<attachment>.json`):
/// DEL and CHECK read the backend, families and exact entry rules; the agent's repair reads
/// the pod UID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub network: String,
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub backend: String,
    pub ipv6: bool,
    /// The rules podwire added to built-in chains (`CHAIN args...`), the same for both
    /// families: DEL removes exactly these, never look-alikes that someone else added.
    #[serde(default)]
    pub entry_rules: Vec<String>,
}

impl Record {
    pub fn entry_rules(&self) -> Vec<Rule> {
        self.entry_rules
            .iter()
            .filter_map(|line| {
                let mut it = line.split_whitespace();
                Some(Rule {
                    chain: it.next()?.to_string(),
                    args: it.map(str::to_string).collect(),
                })
            })
            .collect()
    }

    pub fn set_entry_rules<'a>(&mut self, rules: impl Iterator<Item = &'a Rule>) {
        self.entry_rules = rules
            .map(|r| format!("{} {}", r.chain, r.args.join(" ")))
            .collect();
    }
}

/// The records' directory in a state dir.
pub fn records_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("pods")
}

/// The locks' directory in a state dir.
pub fn locks_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("locks")
}

/// One path component from any string, unambiguously: `[A-Za-z0-9-]` stay, every other byte
/// becomes `_xx` (hex). `.` never appears in an encoded part, so it can join two of them:
/// (`x`, `y_z`) and (`x_y`, `z`) never share a file, and no `/` or `..` escapes the dir.
pub fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    out
}

/// The attachment's name in the records and locks directories (without extension).
pub fn attachment_name(container_id: &str, ifname: &str) -> String {
    format!(
        "{}.{}",
        encode_component(container_id),
        encode_component(ifname)
    )
}

/// The record file of one attachment.
pub fn record_path(state_dir: &Path, container_id: &str, ifname: &str) -> PathBuf {
    records_dir(state_dir).join(format!("{}.json", attachment_name(container_id, ifname)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_round_trip_through_their_names() {
        for n in Repair::NAMES {
            assert_eq!(n.parse::<Repair>().expect("known").as_str(), *n);
        }
        for n in FailurePolicy::NAMES {
            let p: FailurePolicy = n.parse().expect("known");
            assert_eq!(serde_json::to_value(p).expect("json"), *n);
        }
        let e = "sometimes".parse::<FailurePolicy>().expect_err("unknown");
        assert_eq!(e.to_string(), "\"sometimes\" is not one of closed, open");
        assert_eq!(Repair::default(), Repair::Label);
    }

    #[test]
    fn the_default_entry_is_the_plugins_default() {
        let v = serde_json::to_value(ChainedEntry::default()).expect("json");
        assert_eq!(
            v,
            serde_json::json!({
                "type": "podwire-cni",
                "agentSocket": DEFAULT_AGENT_SOCKET,
                "failurePolicy": "closed",
                "stateDir": DEFAULT_STATE_DIR,
            })
        );
        assert!(
            DEFAULT_AGENT_SOCKET.starts_with(RUN_DIR) && DEFAULT_STATE_DIR.starts_with(RUN_DIR)
        );
    }

    #[test]
    fn attachment_names_do_not_collide_or_escape() {
        assert_ne!(attachment_name("x", "y_z"), attachment_name("x_y", "z"));
        let p = record_path(Path::new("/s"), "../../etc/x", "eth0");
        assert_eq!(p, Path::new("/s/pods/_2e_2e_2f_2e_2e_2fetc_2fx.eth0.json"));
    }
}
