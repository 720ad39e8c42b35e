//! Manifests as `kubectl apply -f` takes them: multi-document YAML (or JSON), Pods and the
//! workloads that hold a pod template, `kind: List` items. Shared by `explain` and `inject`.

use anyhow::{anyhow, bail, Context, Result};
use podwire_core::inject::patch::unescape_token;
use podwire_core::inject::{plan_in, InjectorConfig, Labels, PatchOp, Plan, Workload};
use podwire_core::MeshProfile;
use podwire_injector::{
    load_config, load_istio_setting, parse_namespace_labels, with_istio_settings, IstioSetting,
};
use serde::Deserialize;
use serde_yaml_ng::Value as Yaml;
use std::io::Read;
use std::path::Path;

/// Read FILE, or stdin for `-`.
/// What `explain` and `inject` both read: a manifest, and optionally the namespace's labels and
/// the injector's config.
#[derive(Debug, clap::Args)]
pub struct ManifestArgs {
    /// Manifest file (YAML or JSON, one or more documents); `-` reads stdin.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: String,
    /// Labels of the namespace the pods go to (`k=v,k2=v2`; '' for none). Without them the
    /// webhook's namespaceSelector is assumed to select it.
    #[arg(long, value_name = "K=V,...")]
    pub namespace_labels: Option<String>,
    /// Injector config file (as for podwire-injector); default: Istio's defaults.
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// Istio's values (JSON/YAML, or the istio-sidecar-injector ConfigMap), as
    /// `istioctl kube-inject --valuesFile`; the config file's own `values` win over it.
    #[arg(long = "valuesFile", alias = "values-file", value_name = "FILE")]
    pub values_file: Option<std::path::PathBuf>,
    /// Istio's MeshConfig (YAML, or the istio ConfigMap), as
    /// `istioctl kube-inject --meshConfigFile`; the config file's own `mesh` wins over it.
    #[arg(
        long = "meshConfigFile",
        alias = "mesh-config-file",
        value_name = "FILE"
    )]
    pub mesh_config_file: Option<std::path::PathBuf>,
}

/// A manifest read with the settings to judge it by.
#[derive(Debug)]
pub struct Loaded {
    pub cfg: InjectorConfig,
    pub labels: Option<Labels>,
    pub docs: Vec<Yaml>,
}

impl ManifestArgs {
    /// The config, the namespace labels and the manifest's documents.
    pub fn load(&self, profile: &MeshProfile) -> Result<Loaded> {
        let (cfg, labels) = settings(
            self.config.as_deref(),
            self.namespace_labels.as_deref(),
            profile,
        )?;
        let read = |path: &Option<std::path::PathBuf>, what| {
            path.as_deref()
                .map(|p| load_istio_setting(p, what))
                .transpose()
        };
        let values = read(&self.values_file, IstioSetting::Values)?;
        let mesh = read(&self.mesh_config_file, IstioSetting::Mesh)?;
        let origin = self.config.as_deref().map_or_else(
            || "the Istio settings".to_string(),
            |p| p.display().to_string(),
        );
        let cfg = with_istio_settings(cfg, values, mesh, &origin, profile)?;
        let docs = documents(&read_input(&self.file)?, &self.file)?;
        Ok(Loaded { cfg, labels, docs })
    }
}

pub fn read_input(file: &str) -> Result<String> {
    if file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading manifests from stdin")?;
        Ok(s)
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {file}"))
    }
}

/// Every non-empty YAML document, in order (and with its keys in their order, so `inject`
/// writes back what it read, plus the proxy).
pub fn documents(text: &str, origin: &str) -> Result<Vec<Yaml>> {
    let mut docs = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let doc = Yaml::deserialize(de)
            .with_context(|| format!("{origin}: document {} is not valid YAML", i + 1))?;
        if !doc.is_null() {
            docs.push(doc);
        }
    }
    Ok(docs)
}

/// The config file (or the default config) and the namespace labels given on the command line.
fn settings(
    config: Option<&Path>,
    namespace_labels: Option<&str>,
    profile: &MeshProfile,
) -> Result<(InjectorConfig, Option<Labels>)> {
    let cfg = match config {
        Some(path) => {
            let loaded = load_config(path, profile)?;
            for w in &loaded.warnings {
                eprintln!("podwire: warning: {w}");
            }
            loaded.config
        }
        None => InjectorConfig::default(),
    };
    let labels = namespace_labels.map(parse_namespace_labels).transpose()?;
    Ok((cfg, labels))
}

/// Where a document keeps its pod (template), by kind.
pub fn template_pointer(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// A pod or pod template found in a document.
#[derive(Debug)]
pub struct Target {
    pub kind: String,
    pub namespace: String,
    /// The object's name (a Pod's `generateName` prefix + `<generated>` when it has no name).
    pub name: String,
    /// JSON pointer of the pod (template) inside the document (`""` for a Pod).
    pub pointer: String,
    pub plan: Plan,
}

impl Target {
    /// `Deployment shop/web`.
    pub fn display(&self) -> String {
        format!("{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// Decide for every pod (template) in `doc`; `prefix` locates `doc` in its document (for `kind:
/// List` items). Only the pod's own metadata counts: a Deployment's labels and annotations are
/// not its pods'.
pub fn targets(
    doc: &Yaml,
    prefix: &str,
    cfg: &InjectorConfig,
    labels: Option<&Labels>,
    profile: &MeshProfile,
) -> Result<Vec<Target>> {
    let kind = doc.get("kind").and_then(Yaml::as_str).unwrap_or("");
    if kind == "List" {
        let mut out = Vec::new();
        if let Some(items) = doc.get("items").and_then(Yaml::as_sequence) {
            for (i, item) in items.iter().enumerate() {
                out.extend(targets(
                    item,
                    &format!("{prefix}/items/{i}"),
                    cfg,
                    labels,
                    profile,
                )?);
            }
        }
        return Ok(out);
    }
    let Some(pointer) = template_pointer(kind) else {
        return Ok(Vec::new());
    };
    let meta = |f: &str| {
        doc.get("metadata")
            .and_then(|m| m.get(f))
            .and_then(Yaml::as_str)
            .unwrap_or("")
            .to_string()
    };
    let namespace = match meta("namespace") {
        ns if ns.is_empty() => "default".to_string(),
        ns => ns,
    };
    let name = match (meta("name"), meta("generateName")) {
        (n, _) if !n.is_empty() => n,
        (_, g) => format!("{g}<generated>"),
    };
    let json = serde_json::to_value(doc)
        .map_err(|e| anyhow!("{kind} {namespace}/{name}: not representable as JSON: {e}"))?;
    let pod = json.pointer(pointer).ok_or_else(|| {
        anyhow!(
            "{kind} {namespace}/{name} has no pod template at {}",
            pointer.trim_start_matches('/').replace('/', ".")
        )
    })?;
    // A workload's pods are named after it, as Istio's kube-inject does; a Pod names itself
    // (or its controller, from its owner references).
    let workload = (kind != "Pod").then(|| Workload {
        api_version: doc
            .get("apiVersion")
            .and_then(Yaml::as_str)
            .unwrap_or("")
            .to_string(),
        kind: kind.to_string(),
        name: meta("name"),
        namespace: meta("namespace"),
    });
    let plan = plan_in(
        pod,
        workload.as_ref(),
        Some(&namespace),
        labels,
        cfg,
        profile,
    )
    .map_err(|e| anyhow!("{kind} {namespace}/{name}: {e}"))?;
    Ok(vec![Target {
        kind: kind.to_string(),
        namespace,
        name,
        pointer: format!("{prefix}{pointer}"),
        plan,
    }])
}

/// Apply the webhook's patch to the pod at `base` inside `doc`, as the API server would, keeping
/// the document's key order.
pub fn apply(doc: &mut Yaml, base: &str, ops: &[PatchOp]) -> Result<()> {
    for op in ops {
        let full = format!("{base}{}", op.path);
        let tokens: Vec<String> = full
            .strip_prefix('/')
            .unwrap_or(&full)
            .split('/')
            .map(unescape_token)
            .collect();
        let Some((last, parents)) = tokens.split_last() else {
            bail!("empty patch path");
        };
        let mut cur = &mut *doc;
        for t in parents {
            cur = match cur {
                Yaml::Mapping(m) => m.get_mut(t.as_str()),
                Yaml::Sequence(s) => t.parse::<usize>().ok().and_then(|i| s.get_mut(i)),
                _ => None,
            }
            .ok_or_else(|| anyhow!("patch path {full}: {t:?} does not exist"))?;
        }
        let value: Yaml = serde_yaml_ng::to_value(op.value.to_value())?;
        match cur {
            Yaml::Mapping(m) => {
                m.insert(Yaml::String(last.clone()), value);
            }
            Yaml::Sequence(s) if last == "-" => s.push(value),
            _ => bail!("patch path {full}: parent is not a mapping or list"),
        }
    }
    Ok(())
}
