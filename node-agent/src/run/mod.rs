//! `podwire-agent run`: the DaemonSet mode. Install + watch the chain, a node-scoped pod
//! cache answering the plugin, status (`/healthz`, `/readyz`, `/metrics`, the Node condition
//! `PodwireReady`, Events), repair of mesh pods that raced the plugin, the plugin's
//! kubeconfig, and clean-up on termination unless the DaemonSet is only being updated.

mod events;
mod heartbeat;
mod node_status;
mod plugin_credentials;
mod pod_cache;
mod repair;
mod status_http;

use crate::error::Error;
use crate::install::{self, InstallArgs};
use crate::lookup_server::{self, Fallback, Source};
use crate::metrics::Metrics;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::reflector::Store;
use kube::Client;
use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{info, warn};

pub use podwire_core::node::Repair;
use podwire_core::node::RUN_DIR;

/// No API call may hang a task: the heartbeat, repair and Events each wait at most this long.
pub(crate) const API_TIMEOUT: Duration = Duration::from_secs(10);

/// The heartbeat's reachability check is stricter: an API server slower than this is reported
/// unreachable (not ready), while the cache keeps answering.
pub(crate) const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// One API call with [`API_TIMEOUT`]; the error says which call (`what`) and why.
pub(crate) async fn api_call<T>(
    what: &str,
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, String> {
    api_call_within(API_TIMEOUT, what, call).await
}

pub(crate) async fn api_call_within<T>(
    limit: Duration,
    what: &str,
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {limit:?}")),
    }
}

/// The DaemonSet mode. Kubernetes access comes from the in-cluster service account or
/// KUBECONFIG (kube-rs' usual inference).
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub install: InstallArgs,
    /// This node's name (the downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub node_name: String,
    /// The agent's namespace and DaemonSet, to tell an update from an uninstall on SIGTERM.
    #[arg(
        long,
        env = "POD_NAMESPACE",
        default_value = "podwire-system",
        value_name = "NS"
    )]
    pub namespace: String,
    #[arg(long, default_value = "podwire-agent", value_name = "NAME")]
    pub daemonset: String,
    /// `/healthz`, `/readyz`, `/metrics`.
    #[arg(long, default_value = "0.0.0.0:9964", value_name = "ADDR")]
    pub status_addr: String,
    /// What to do with mesh pods running on this node without redirection.
    #[arg(long, value_enum, default_value_t = Repair::default())]
    pub repair: Repair,
    /// Remove the `podwire.io/not-ready` taint from this node once ready.
    #[arg(long)]
    pub remove_startup_taint: bool,
    /// Service-account token to hand the plugin (rewritten when it rotates).
    #[arg(
        long,
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token",
        value_name = "FILE"
    )]
    pub token_file: PathBuf,
    /// Seconds between heartbeats (API check, Node condition, repair pass).
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub heartbeat: u64,
}

/// Shared state between the tasks.
struct State {
    metrics: Arc<Metrics>,
    /// The node's pods (the reflector's store).
    pods: Store<Pod>,
    /// UIDs repair has acted on (pruned to the pods still present).
    handled: Mutex<BTreeSet<String>>,
    /// The last install failure, for the readiness message.
    install_error: Mutex<Option<String>>,
    events: events::Events,
}

impl State {
    fn pods(&self) -> Vec<Arc<Pod>> {
        self.pods.state()
    }
}

fn kube_err(what: &str) -> impl Fn(kube::Error) -> Error + '_ {
    move |e| Error::Kube {
        what: what.to_string(),
        message: e.to_string(),
    }
}

pub async fn run(args: RunArgs) -> Result<(), Error> {
    let shutdown = crate::serve::shutdown_signal()?;
    let config = kube::Config::infer().await.map_err(|e| Error::Kube {
        what: "loading the Kubernetes client configuration (in-cluster or KUBECONFIG)".into(),
        message: e.to_string(),
    })?;
    let cluster_url = config.cluster_url.to_string();
    let client = Client::try_from(config).map_err(kube_err("creating the Kubernetes client"))?;
    let metrics = Arc::new(Metrics::default());
    let synced = Arc::new(AtomicBool::new(false));
    let pods = pod_cache::start(
        client.clone(),
        args.node_name.clone(),
        synced.clone(),
        metrics.clone(),
    );
    let state = Arc::new(State {
        metrics,
        pods: pods.clone(),
        handled: Mutex::default(),
        install_error: Mutex::default(),
        events: events::Events::new(client.clone(), &args.node_name),
    });

    // The plugin's own credentials, for its fallback GET when this agent is down.
    let mut install_args = args.install.clone();
    if install_args.plugin_kubeconfig.is_none() && args.token_file.is_file() {
        let run_dir = args
            .install
            .agent_socket
            .parent()
            .unwrap_or(Path::new(RUN_DIR))
            .to_path_buf();
        install_args.plugin_kubeconfig = Some(run_dir.join("kubeconfig"));
        tokio::spawn(plugin_credentials::keep_written(
            args.token_file.clone(),
            run_dir,
            cluster_url,
            Duration::from_secs(args.heartbeat.max(1)),
        ));
    }
    // Everything the plugin must agree on with this agent goes into its entry.
    install_args.agent_namespace = Some(args.namespace.clone());

    let pods_api: Api<Pod> = Api::all(client.clone());
    let fallback: Fallback = Arc::new(move |ns: String, name: String| {
        let api: Api<Pod> = Api::namespaced(pods_api.clone().into_client(), &ns);
        Box::pin(async move {
            // Only the API server's 404 is "no such pod" (`get_opt` gives `None` for it).
            match api_call("GET pod", api.get_opt(&name)).await? {
                Some(pod) => pod_cache::slim(&pod)
                    .map(Some)
                    .ok_or_else(|| "the API server's pod cannot be read".to_owned()),
                None => Ok(None),
            }
        })
    });
    let source = Arc::new(Source {
        store: Arc::new(pod_cache::Cache(pods)),
        synced: Some(synced),
        fallback: Some(fallback),
        metrics: Some(state.metrics.clone()),
        directory: None,
    });
    let (listener, socket_file) = lookup_server::bind(&args.install.agent_socket).await?;
    let status = tokio::net::TcpListener::bind(&args.status_addr)
        .await
        .map_err(|e| Error::Kube {
            what: format!("binding the status address {}", args.status_addr),
            message: e.to_string(),
        })?;
    info!(
        "status on http://{}",
        status
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    );
    tokio::spawn(status_http::serve(status, state.clone()));
    tokio::spawn(heartbeat::run(
        client.clone(),
        args.node_name.clone(),
        args.clone_for_heartbeat(),
        state.clone(),
    ));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let lookups = tokio::spawn(lookup_server::serve(
        listener,
        source,
        wait_for(stop_rx.clone()),
    ));
    let chain = {
        let (args, state, node) = (install_args.clone(), state.clone(), args.node_name.clone());
        tokio::spawn(async move {
            // An install failure (say, an unsupported primary config) is reported and retried:
            // the agent stays up, not ready, and says why.
            loop {
                match install::keep_chained(
                    &args,
                    true,
                    Some(&state.metrics),
                    wait_for(stop_rx.clone()),
                )
                .await
                {
                    Ok(_) => return,
                    Err(e) => {
                        state.metrics.installed.set(false);
                        *lock(&state.install_error) = Some(e.to_string());
                        warn!("installing podwire-cni on node {node}: {e}; retrying in 10s");
                        state
                            .events
                            .on_node(&node, "Install", "PodwireInstallFailed", &e.to_string())
                            .await;
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                            () = wait_for(stop_rx.clone()) => return,
                        }
                    }
                }
            }
        })
    };
    shutdown.await;
    let _ = stop_tx.send(true);
    let _ = lookups.await;
    if let Err(e) = chain.await {
        warn!("the install task ended abnormally: {e}");
    }
    drop(socket_file);
    if uninstalling(&client, &args.namespace, &args.daemonset).await {
        info!(
            "DaemonSet {}/{} is gone or being deleted: removing podwire from this node",
            args.namespace, args.daemonset
        );
        install::uninstall(&install_args)?;
    } else {
        info!("DaemonSet {}/{} still exists (update or restart): leaving podwire-cni installed for the next agent", args.namespace, args.daemonset);
    }
    Ok(())
}

async fn wait_for(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// An uninstall is a deleted (or deleting) DaemonSet; anything else — a rolling update, a
/// restart, an API server we cannot reach — keeps the plugin in place, failing safe.
async fn uninstalling(client: &Client, ns: &str, name: &str) -> bool {
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), ns);
    match api_call(&format!("GET daemonset {ns}/{name}"), api.get_opt(name)).await {
        Ok(None) => true,
        Ok(Some(ds)) => ds.metadata.deletion_timestamp.is_some(),
        Err(e) => {
            warn!("cannot tell whether DaemonSet {ns}/{name} is being deleted ({e}): leaving podwire installed");
            false
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Clone)]
struct HeartbeatArgs {
    period: Duration,
    repair: Repair,
    state_dir: PathBuf,
    namespace: String,
    remove_startup_taint: bool,
}

impl RunArgs {
    fn clone_for_heartbeat(&self) -> HeartbeatArgs {
        HeartbeatArgs {
            period: Duration::from_secs(self.heartbeat.max(1)),
            repair: self.repair,
            state_dir: self.install.state_dir.clone(),
            namespace: self.namespace.clone(),
            remove_startup_taint: self.remove_startup_taint,
        }
    }
}
