//! `podwire-injector`: the injection webhook.
//!
//! `review` answers one AdmissionReview from stdin exactly as `POST /inject` does; `serve`
//! (HTTPS) will be another subcommand around the same `podwire_injector::review_detailed`.
#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use podwire_core::MeshProfile;
use podwire_injector::{load_config, parse_namespace_labels, review_detailed, LoadedConfig};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// podwire-injector: adds only the proxy container (no init container, no NET_ADMIN) and the
/// annotations the podwire CNI plugin reads.
#[derive(Debug, Parser)]
#[command(name = "podwire-injector", version, propagate_version = true)]
struct Cli {
    /// Log level for messages on stderr (error, warn, info, debug, trace).
    #[arg(long, global = true, default_value = "warn")]
    log_level: tracing::Level,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Read one AdmissionReview (admission.k8s.io/v1) on stdin and write the AdmissionReview
    /// that `POST /inject` would answer on stdout.
    Review(ReviewArgs),
}

#[derive(Debug, clap::Args)]
struct ReviewArgs {
    /// Injector config file (YAML: policy, alwaysInjectSelector, neverInjectSelector,
    /// injectedAnnotations, namespaceSelector, ignoredNamespaces, proxy), or an Istio-style
    /// ConfigMap holding it under data.config.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Labels of the pod's namespace (`k=v,k2=v2`; '' for none). With them the webhook's
    /// namespaceSelector is checked here too, as the API server would before calling.
    #[arg(long, value_name = "K=V,...")]
    namespace_labels: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_max_level(cli.log_level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let result = match cli.command {
        Cmd::Review(args) => run_review(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("podwire-injector: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn config(path: &Path, profile: &MeshProfile) -> Result<LoadedConfig> {
    let loaded = load_config(path, profile)?;
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    Ok(loaded)
}

fn run_review(args: &ReviewArgs) -> Result<()> {
    let profile = MeshProfile::istio();
    let cfg = config(&args.config, &profile)?;
    let labels = args
        .namespace_labels
        .as_deref()
        .map(parse_namespace_labels)
        .transpose()?;
    let mut body = Vec::new();
    std::io::stdin()
        .read_to_end(&mut body)
        .context("reading the AdmissionReview from stdin")?;
    let reviewed = review_detailed(&body, &cfg.config, labels.as_ref(), &profile);
    tracing::info!(
        outcome = reviewed.outcome.as_str(),
        dry_run = reviewed.dry_run,
        "{}",
        reviewed.summary
    );
    let mut out = serde_json::to_vec(&reviewed.review).context("encoding the answer")?;
    out.push(b'\n');
    std::io::stdout()
        .write_all(&out)
        .context("writing the answer to stdout")?;
    Ok(())
}
