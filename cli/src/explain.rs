//! `podwire explain -f pod.yaml`: would this pod be injected, and why — the same decision the
//! webhook makes, for every Pod or pod template in the file.

use crate::manifest::{targets, Loaded, ManifestArgs, Target};
use anyhow::{bail, Result};
use podwire_core::inject::Step;
use podwire_core::MeshProfile;
use serde::Serialize;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    manifest: ManifestArgs,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: Format,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Format {
    Text,
    Json,
}

/// One pod's answer in `-o json`.
#[derive(Debug, Serialize)]
struct Explained<'a> {
    kind: &'a str,
    namespace: &'a str,
    name: &'a str,
    /// `injected`, `skipped`, or `refused` (the webhook would deny the pod).
    result: &'static str,
    inject: bool,
    step: Step,
    /// The step's number in DESIGN.md's "The decision (webhook side), in order".
    rule: u8,
    reason: &'a str,
    warnings: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    refused: Option<String>,
}

fn rule(step: Step) -> u8 {
    match step {
        Step::HostNetwork => 1,
        Step::IgnoredNamespace => 2,
        Step::AlreadyInjected => 3,
        Step::Explicit => 4,
        Step::NeverInjectSelector | Step::AlwaysInjectSelector => 5,
        Step::Policy => 6,
        Step::NamespaceSelector => 7,
    }
}

fn explained(t: &Target) -> Explained<'_> {
    let d = &t.plan.decision;
    let refused = t.plan.patch.as_ref().err().map(ToString::to_string);
    Explained {
        kind: &t.kind,
        namespace: &t.namespace,
        name: &t.name,
        result: match (&refused, d.inject) {
            (Some(_), _) => "refused",
            (None, true) => "injected",
            (None, false) => "skipped",
        },
        inject: d.inject,
        step: d.step,
        rule: rule(d.step),
        reason: &d.reason,
        warnings: &d.warnings,
        refused,
    }
}

pub fn run(args: &Args) -> Result<bool> {
    let profile = MeshProfile::istio();
    let Loaded { cfg, labels, docs } = args.manifest.load(&profile)?;
    let mut found = Vec::new();
    for doc in docs {
        found.extend(targets(&doc, "", &cfg, labels.as_ref(), &profile)?);
    }
    if found.is_empty() {
        bail!(
            "{}: no Pod or pod template (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob) to explain",
            args.manifest.file
        );
    }
    for t in &found {
        let e = explained(t);
        match args.output {
            Format::Json => println!("{}", serde_json::to_string_pretty(&e)?),
            Format::Text => {
                let what = if t.kind == "Pod" {
                    ""
                } else {
                    " (pod template)"
                };
                println!("{}{what}: {}", t.display(), e.result);
                println!("  reason:  {}", e.reason);
                println!("  rule:    {} ({})", e.rule, e.step.as_str());
                if let Some(r) = &e.refused {
                    println!("  refused: {r}");
                }
                for w in e.warnings {
                    println!("  warning: {w}");
                }
            }
        }
    }
    Ok(true)
}
