//! The injection decision and mutation (webhook side). See DESIGN.md "The decision".
//!
//! [`decide`] says whether a pod gets the proxy and why; [`patch::injection_patch`] builds the
//! RFC 6902 patch that adds it; [`plan`] does both for a pod object as the API server sends it.

pub mod config;
pub mod decision;
mod grpc_agent;
pub mod istio;
pub mod json;
pub mod patch;
pub mod quantity;
pub mod selector;

pub use config::{InjectorConfig, Policy, ProxyTemplate};
pub use decision::{decide, Decision, Step};
pub use istio::Workload;
pub use patch::{apply_patch, injection_patch, plan, plan_in, read_pod, PatchOp, Plan};
pub use quantity::Quantity;
pub use selector::{parse_labels, LabelSelector, Labels};
