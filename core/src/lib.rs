//! podwire's rules, as pure functions of their inputs.
//!
//! The webhook, the CNI plugin, the node agent and `podwire explain` all call into
//! this crate, so they can never disagree about a pod. Nothing here does I/O.
#![forbid(unsafe_code)]

pub mod cni;
pub mod conflist;
pub mod error;
pub mod inject;
pub mod lookup;
pub mod mesh;
pub mod node;
pub mod pod;
pub mod profile;
pub mod redirect;
pub mod render;
pub mod saved;

pub use error::Error;
pub use mesh::{mesh_decision, MeshDecision};
pub use pod::PodInfo;
pub use profile::MeshProfile;
pub use redirect::RedirectSpec;
pub use render::{Family, RuleSet};
