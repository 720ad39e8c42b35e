//! A node in a box, made of real parts: network namespaces (`ip netns`), Debian's CNI plugins
//! run the way libcni runs them, real TCP connections, and a probe proxy that reports
//! `SO_ORIGINAL_DST`. What `podwire demo` shows a person, and what the end-to-end tests
//! (`podwire-lab`, which adds the in-process API server and podman) build on.
//!
//! Every address lives in 198.18.0.0/15 / 2001:2::/48 (the benchmarking ranges) inside
//! namespaces the lab creates; nothing is sent anywhere else.
#![forbid(unsafe_code)]

pub mod bins;
pub mod chain;
pub mod cri;
pub mod lab;
pub mod netns;
pub mod probe;

pub use chain::{Chain, CniOutcome};
pub use netns::Netns;
