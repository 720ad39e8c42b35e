//! A testbed made of real parts: network namespaces (`ip netns`), Debian's CNI plugins run the
//! way libcni runs them, real TCP connections, and a probe proxy that reports `SO_ORIGINAL_DST`.
//!
//! Every address lives in 198.18.0.0/15 / 2001:2::/48 (the benchmarking ranges) inside
//! namespaces the lab creates; nothing is sent anywhere else.
#![forbid(unsafe_code)]

pub mod apiserver;
pub mod bins;
pub mod chain;
pub mod lab;
pub mod netns;
pub mod podman;
pub mod probe;

pub use chain::{Chain, CniOutcome};
pub use netns::Netns;

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
