//! `podwire inject -f manifest.yaml`: offline injection, like `istioctl kube-inject`. Every
//! Pod and pod template gets exactly what the webhook would add; everything else is written
//! back unchanged.

use crate::manifest::{apply, targets, Loaded, ManifestArgs};
use anyhow::{anyhow, Context, Result};
use podwire_core::MeshProfile;
use std::io::Write;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    manifest: ManifestArgs,
}

pub fn run(args: &Args) -> Result<bool> {
    let profile = MeshProfile::istio();
    let Loaded { cfg, labels, docs } = args.manifest.load(&profile)?;
    let mut out = String::new();
    // Everything is decided before anything is written: a refused pod means no output at all,
    // as the webhook would deny it.
    for (i, mut doc) in docs.into_iter().enumerate() {
        for t in targets(&doc, "", &cfg, labels.as_ref(), &profile)? {
            let ops = t.plan.patch.as_ref().map_err(|e| {
                anyhow!(
                    "document {} ({}): injection refused: {e}",
                    i + 1,
                    t.display()
                )
            })?;
            for w in &t.plan.decision.warnings {
                eprintln!("podwire: warning: {}: {w}", t.display());
            }
            apply(&mut doc, &t.pointer, ops)
                .with_context(|| format!("document {} ({})", i + 1, t.display()))?;
        }
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&serde_yaml_ng::to_string(&doc)?);
    }
    std::io::stdout()
        .write_all(out.as_bytes())
        .context("writing to stdout")?;
    Ok(true)
}
