//! Istio's installed settings, read from the cluster: the `values` of the
//! `istio-sidecar-injector` ConfigMap and the `mesh` of the `istio` ConfigMap (in Istio's
//! namespace, `-<revision>` suffixed for a revision), read at start-up (missing or unreadable:
//! a start-up error, never a silent default) and watched, each change applied to the config
//! requests use without a restart. The podwire config file's own `values` / `mesh` stay on top.

use crate::config::{with_istio_settings, IstioSetting};
use crate::Error;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use podwire_core::inject::istio::NodeSidecars;
use podwire_core::inject::InjectorConfig;
use podwire_core::MeshProfile;
use serde_json::Value;
use std::sync::{Arc, Mutex, RwLock};

/// The config requests use, replaced whole when Istio's settings or the config file change.
#[derive(Debug)]
pub struct LiveConfig {
    current: RwLock<Arc<InjectorConfig>>,
    /// The config file as loaded (before Istio's settings).
    file: Mutex<InjectorConfig>,
    origin: String,
    profile: MeshProfile,
    istio: Mutex<(Option<Value>, Option<Value>)>,
    /// `ENABLE_NATIVE_SIDECARS=auto` as the node watch resolved it.
    nodes: Mutex<Option<Arc<NodeSidecars>>>,
}

impl LiveConfig {
    /// A config that never changes (files only, or `review`).
    pub fn fixed(config: InjectorConfig, profile: MeshProfile) -> Self {
        LiveConfig {
            current: RwLock::new(Arc::new(config.clone())),
            file: Mutex::new(config),
            origin: String::new(),
            profile,
            istio: Mutex::new((None, None)),
            nodes: Mutex::new(None),
        }
    }

    /// The file's config with Istio's `values` and `mesh` underneath; checked.
    pub fn new(
        file: InjectorConfig,
        origin: &str,
        values: Option<Value>,
        mesh: Option<Value>,
        profile: MeshProfile,
    ) -> Result<Self, Error> {
        let merged =
            with_istio_settings(file.clone(), values.clone(), mesh.clone(), origin, &profile)?;
        Ok(LiveConfig {
            current: RwLock::new(Arc::new(merged)),
            file: Mutex::new(file),
            origin: origin.to_string(),
            profile,
            istio: Mutex::new((values, mesh)),
            nodes: Mutex::new(None),
        })
    }

    /// The config now (cheap: one Arc).
    pub fn get(&self) -> Arc<InjectorConfig> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Apply a new `values` or `mesh`; a setting that does not check keeps the previous config
    /// (and says why).
    pub fn update(&self, what: IstioSetting, value: Value) -> Result<(), Error> {
        let mut istio = self.istio.lock().unwrap_or_else(|p| p.into_inner());
        let (mut values, mut mesh) = istio.clone();
        match what {
            IstioSetting::Values => values = Some(value),
            IstioSetting::Mesh => mesh = Some(value),
        }
        let file = self.file.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let merged = self.merged(file, values.clone(), mesh.clone(), self.nodes())?;
        *istio = (values, mesh);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(merged);
        Ok(())
    }

    fn nodes(&self) -> Option<Arc<NodeSidecars>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The config file's `config` over Istio's settings, with the nodes' verdict.
    fn merged(
        &self,
        mut config: InjectorConfig,
        values: Option<Value>,
        mesh: Option<Value>,
        nodes: Option<Arc<NodeSidecars>>,
    ) -> Result<InjectorConfig, Error> {
        config.nodes = nodes;
        with_istio_settings(config, values, mesh, &self.origin, &self.profile)
    }

    /// What `ENABLE_NATIVE_SIDECARS=auto` means now (from the node watch); the config is
    /// rebuilt when it changes.
    pub fn set_nodes(&self, now: NodeSidecars) -> Result<(), Error> {
        // Same lock order as `update`: Istio's settings, then the file, then this.
        let istio = self.istio.lock().unwrap_or_else(|p| p.into_inner());
        let file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if nodes.as_deref() == Some(&now) {
            return Ok(());
        }
        let now = Arc::new(now);
        let (values, mesh) = istio.clone();
        let merged = self.merged(file.clone(), values, mesh, Some(now.clone()))?;
        *nodes = Some(now);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(merged);
        Ok(())
    }

    /// Apply a changed config file (over Istio's settings now); one that does not check keeps
    /// the previous config (and says why). `Ok(false)`: the file's config is the one in use.
    pub fn replace_file(&self, config: InjectorConfig) -> Result<bool, Error> {
        // Same lock order as `update`: Istio's settings, then the file.
        let istio = self.istio.lock().unwrap_or_else(|p| p.into_inner());
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if *file == config {
            return Ok(false);
        }
        let (values, mesh) = istio.clone();
        let merged = self.merged(config.clone(), values, mesh, self.nodes())?;
        *file = config;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(merged);
        Ok(true)
    }
}

/// Where Istio keeps its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IstioConfigMaps {
    pub namespace: String,
    /// `istio-sidecar-injector[-<rev>]`, holding `data.values`.
    pub injector: String,
    /// `istio[-<rev>]`, holding `data.mesh`.
    pub mesh: String,
}

impl IstioConfigMaps {
    pub fn new(namespace: &str, revision: &str) -> Self {
        let suffix = if revision.is_empty() || revision == "default" {
            String::new()
        } else {
            format!("-{revision}")
        };
        IstioConfigMaps {
            namespace: namespace.to_string(),
            injector: format!("istio-sidecar-injector{suffix}"),
            mesh: format!("istio{suffix}"),
        }
    }

    fn of(&self, what: IstioSetting) -> (&str, &'static str) {
        match what {
            IstioSetting::Values => (&self.injector, "values"),
            IstioSetting::Mesh => (&self.mesh, "mesh"),
        }
    }
}

/// The setting `what` held by ConfigMap `cm`.
fn setting_of(cm: &ConfigMap, key: &str, what: IstioSetting, origin: &str) -> Result<Value, Error> {
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .ok_or_else(|| Error::ConfigShape {
            path: origin.to_string(),
            reason: format!("has no data.{key}: is Istio's control plane installed?"),
        })?;
    // The same parser as for files: the ConfigMap's payload is the document.
    crate::config::parse_istio_setting(text, origin, what)
}

/// Read both settings once; a missing ConfigMap or key is an error naming it.
pub async fn load(client: &Client, cms: &IstioConfigMaps) -> Result<(Value, Value), Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &cms.namespace);
    let mut out = Vec::new();
    for what in [IstioSetting::Values, IstioSetting::Mesh] {
        let (name, key) = cms.of(what);
        let origin = format!("ConfigMap {}/{name}", cms.namespace);
        let cm = api.get_opt(name).await.map_err(|e| {
            let mut message = match &e {
                kube::Error::Api(ae) => format!("{} ({} {})", ae.message, ae.code, ae.reason),
                other => other.to_string(),
            };
            if matches!(&e, kube::Error::Api(ae) if ae.code == 403) {
                message.push_str(&format!(
                    " (the injector's ServiceAccount needs get, list and watch on ConfigMap \
                     {name} in {ns}: the install's Role podwire-injector-istio-config names \
                     istio-sidecar-injector and istio; for a revision add the -<rev> ConfigMaps)",
                    ns = cms.namespace
                ));
            }
            Error::Kube {
                what: format!("reading Istio's {key} from {origin}"),
                message,
            }
        })?;
        let cm = cm.ok_or_else(|| Error::Kube {
            what: format!("reading Istio's {key} from {origin}"),
            message: "not found (install Istio's control plane, name its namespace and \
                      revision with --istio-namespace/--istio-revision, or give \
                      --values-file/--mesh-config-file)"
                .into(),
        })?;
        out.push(setting_of(&cm, key, what, &origin)?);
    }
    let mesh = out.pop().unwrap_or_default();
    let values = out.pop().unwrap_or_default();
    Ok((values, mesh))
}

/// Keep `live` in step with one of the two ConfigMaps until the task is dropped.
pub async fn watch(
    client: Client,
    cms: IstioConfigMaps,
    what: IstioSetting,
    live: Arc<LiveConfig>,
) {
    let (name, key) = cms.of(what);
    let (name, key) = (name.to_string(), key);
    let origin = format!("ConfigMap {}/{name}", cms.namespace);
    let api: Api<ConfigMap> = Api::namespaced(client, &cms.namespace);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
    let mut last: Option<String> = None;
    while let Some(ev) = stream.next().await {
        let cm = match ev {
            Ok(Event::Apply(cm) | Event::InitApply(cm)) => cm,
            Ok(Event::Delete(_)) => {
                tracing::warn!("{origin} was deleted: keeping Istio's last {key}");
                continue;
            }
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!("watching {origin} failed (retrying): {e}");
                continue;
            }
        };
        let text = cm.data.as_ref().and_then(|d| d.get(key)).cloned();
        if text == last {
            continue;
        }
        last = text;
        match setting_of(&cm, key, what, &origin).and_then(|v| live.update(what, v)) {
            Ok(()) => tracing::info!("applied Istio's {key} from {origin}"),
            Err(e) => tracing::warn!(
                "{origin} changed but is not usable, keeping the previous config: {e}"
            ),
        }
    }
}
