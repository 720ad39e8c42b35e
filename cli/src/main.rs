//! `podwire`: the operator CLI.
#![forbid(unsafe_code)]

mod demo;
mod doctor;
mod explain;
mod inject;
mod manifest;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// podwire: sidecar traffic redirection without a privileged init container.
///
/// The CNI plugin (podwire-cni) programs the redirection inside each mesh pod's network
/// namespace; the node agent (podwire-agent) keeps it installed and answers its look-ups.
#[derive(Debug, Parser)]
#[command(name = "podwire", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a local demo on this machine (root): two "pods" in network namespaces wired by
    /// Debian's bridge + host-local and podwire-cni, real traffic, then clean up.
    ///
    /// One mesh pod (has the istio-proxy container and sidecar.istio.io/status) and one plain
    /// pod. The demo shows the mesh pod's outbound and inbound connections reaching the proxy
    /// ports 15001/15006 with their original destinations, and the plain pod's not. Every
    /// address is in 198.18.0.0/15 inside namespaces the demo creates.
    Demo(demo::Args),
    /// Say whether the injection webhook would add the proxy to each Pod or pod template in a
    /// manifest, and why (the webhook's own decision, rule by rule as in DESIGN.md).
    ///
    /// Only the pod's own metadata counts: for a Deployment, the labels and annotations of
    /// spec.template.metadata, not the Deployment's.
    Explain(explain::Args),
    /// Inject offline, like `istioctl kube-inject`: write the manifest to stdout with the
    /// proxy container and annotations the webhook would add to every Pod and pod template
    /// (Deployment, StatefulSet, DaemonSet, ReplicaSet, ReplicationController, Job, CronJob).
    /// Other documents are written back unchanged.
    Inject(inject::Args),
    /// Diagnose sidecar injection in a cluster: one check per cause in Istio's "Sidecar
    /// Injection Problems" page (and the mesh injection guide), each pass / fail / could not
    /// check, with the evidence and the fix.
    ///
    /// Reads the cluster through the Kubernetes API (KUBECONFIG, ~/.kube/config, in-cluster,
    /// or --kubeconfig); changes nothing.
    Doctor(doctor::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Demo(args) => demo::run(&args),
        Cmd::Explain(args) => explain::run(&args),
        Cmd::Inject(args) => inject::run(&args),
        // doctor has its own exit codes (1 = a check failed, 2 = usage).
        Cmd::Doctor(args) => return doctor::main(&args),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!(
                "podwire: error: {}",
                podwire_core::error::report(e.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}
