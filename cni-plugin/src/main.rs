//! podwire-cni: a chained CNI plugin that redirects a mesh pod's traffic to its sidecar proxy
//! inside the pod's network namespace, with no privileged init container.
//!
//! Exec'd by the container runtime once per pod: small, synchronous, no async runtime.
#![forbid(unsafe_code)]

mod config;
mod env;
mod error;
mod iptables;
mod kube;
mod logging;
mod lookup;
mod netns;
mod nftables;
mod plugin;
mod record;

use std::io::{Read, Write};
use std::process::ExitCode;

/// A network config is a few KiB; refuse to buffer something absurd.
const MAX_STDIN: u64 = 4 << 20;

fn main() -> ExitCode {
    if std::env::args()
        .nth(1)
        .is_some_and(|a| a == "--help" || a == "-h" || a == "--version")
    {
        println!(
            "podwire-cni {} — chained CNI plugin (spec 1.1.0; accepts 0.3.x, 0.4.0, 1.0.0 configs)\n\n\
             Invoked by the container runtime, not by people: CNI_COMMAND=ADD|DEL|CHECK|VERSION|STATUS|GC\n\
             and the other CNI_* variables in the environment, the network config on stdin.\n\
             Config keys: agentSocket, kubeconfig, excludeNamespaces, failurePolicy (closed|open),\n\
             iptables (auto|legacy|nft), logLevel, logFile, stateDir. See README.md.",
            env!("CARGO_PKG_VERSION")
        );
        return ExitCode::SUCCESS;
    }
    let mut stdin = Vec::new();
    // One byte past the limit tells a config that is too large from one that fits exactly:
    // a cut config must not be read (its start may parse, what follows the cut is unread).
    let read = std::io::stdin().take(MAX_STDIN + 1).read_to_end(&mut stdin);
    let too_large = stdin.len() as u64 > MAX_STDIN;
    if too_large {
        stdin.clear();
    }

    // Parsed once: logging settings come from it, and a broken config still gets logged.
    let conf = config::NetConf::parse(&stdin);
    let version = match &conf {
        Ok(c) => c.cni_version.clone(),
        Err(_) => config::declared_version(&stdin)
            .unwrap_or_else(|| podwire_core::cni::CNI_VERSION.to_string()),
    };
    match &conf {
        Ok(c) => logging::init(c.log_level, c.log_file.as_deref()),
        Err(_) => logging::init(tracing::Level::INFO, None),
    }

    let result = match read {
        Err(e) => Err(error::PluginError::Io(format!("cannot read stdin: {e}"))),
        Ok(_) if too_large => Err(error::PluginError::Decode(format!(
            "the network configuration on stdin is larger than {} MiB",
            MAX_STDIN >> 20
        ))),
        Ok(_) => env::CniEnv::from_lookup(|k| std::env::var(k).ok())
            .and_then(|e| plugin::run(&e, conf, &stdin)),
    };
    let mut out = std::io::stdout().lock();
    match result {
        Ok(Some(text)) => {
            let _ = writeln!(out, "{text}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(code = e.code(), "{e}");
            let json = serde_json::to_string(&e.to_cni(&version)).unwrap_or_else(|_| {
                format!(
                    r#"{{"cniVersion":"{version}","code":{},"msg":"podwire-cni failed"}}"#,
                    e.code()
                )
            });
            let _ = writeln!(out, "{json}");
            ExitCode::FAILURE
        }
    }
}
