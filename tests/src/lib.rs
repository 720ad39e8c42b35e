//! The end-to-end testbed: [`podwire_netlab`]'s node in a box (network namespaces, the chain
//! runner, the probe proxy, re-exported here under the same names), plus what only tests need:
//! an in-process Kubernetes API server speaking the real HTTP/JSON wire format, podman as a
//! runtime, and the rule that root-needing tests fail under CI instead of skipping.
#![forbid(unsafe_code)]

pub mod apiserver;
pub mod injected;
pub mod podman;

pub use podwire_netlab::{bins, chain, cri, lab, netns, probe};
pub use podwire_netlab::{Chain, CniOutcome, Netns};

/// Root is needed for namespaces and iptables. Under CI a test must fail, never skip.
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("this test needs root (network namespaces, iptables) and CI=true is set: run the test suite as root");
    }
    eprintln!("SKIPPED: needs root (not under CI)");
    false
}
