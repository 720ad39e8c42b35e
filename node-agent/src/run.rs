//! `podwire-agent run`: the DaemonSet mode. Install + watch the chain, a node-scoped pod
//! cache answering the plugin, status (`/healthz`, `/readyz`, `/metrics`, the Node condition
//! `PodwireReady`, Events), repair of mesh pods that raced the plugin, the plugin's
//! kubeconfig, and clean-up on termination unless the DaemonSet is only being updated.

use crate::error::Error;
use crate::install::{self, InstallArgs};
use crate::lookup_server::{self, Fallback, Source};
use crate::metrics::Metrics;
use crate::pods_dir::{PodStore, Pods};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;
use podwire_core::mesh::{mesh_decision, DEFAULT_EXCLUDED_NAMESPACES};
use podwire_core::{MeshProfile, PodInfo};
use serde_json::json;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{info, warn};

pub use podwire_core::node::Repair;
use podwire_core::node::{
    records_dir, Record, CONDITION, REASON_NOT_READY, REASON_READY, RUN_DIR, STARTUP_TAINT,
    UNINITIALIZED_LABEL,
};

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
#[derive(Debug, Default)]
struct State {
    metrics: Arc<Metrics>,
    /// phase by (namespace, name), for repair.
    phases: Mutex<HashMap<(String, String), String>>,
    handled: Mutex<BTreeSet<String>>,
    /// The last install failure, for the readiness message.
    install_error: Mutex<Option<String>>,
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
    let state = Arc::new(State::default());
    let store = Arc::new(PodStore::default());
    let synced = Arc::new(AtomicBool::new(false));

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
        tokio::spawn(plugin_credentials(
            args.token_file.clone(),
            run_dir,
            cluster_url,
            Duration::from_secs(args.heartbeat.max(1)),
        ));
    }
    // Everything the plugin must agree on with this agent goes into its entry.
    install_args.agent_namespace = Some(args.namespace.clone());

    tokio::spawn(watch_pods(
        client.clone(),
        args.node_name.clone(),
        store.clone(),
        synced.clone(),
        state.clone(),
    ));
    let pods_api: Api<Pod> = Api::all(client.clone());
    let fallback: Fallback = Arc::new(move |ns: String, name: String| {
        let api: Api<Pod> = Api::namespaced(pods_api.clone().into_client(), &ns);
        Box::pin(async move {
            // Only the API server's 404 is "no such pod" (`get_opt` gives `None` for it).
            match api.get_opt(&name).await {
                Ok(Some(pod)) => slim(&pod)
                    .map(Some)
                    .ok_or_else(|| "the API server's pod cannot be read".to_owned()),
                Ok(None) => Ok(None),
                Err(e) => Err(e.to_string()),
            }
        })
    });
    let source = Arc::new(Source {
        store: store.clone(),
        synced: Some(synced),
        fallback: Some(fallback),
        metrics: Some(state.metrics.clone()),
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
    tokio::spawn(serve_status(status, state.clone()));
    tokio::spawn(heartbeat(
        client.clone(),
        args.node_name.clone(),
        args.clone_for_heartbeat(),
        store.clone(),
        state.clone(),
    ));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let lookups = tokio::spawn(lookup_server::serve(
        listener,
        source,
        wait_for(stop_rx.clone()),
    ));
    let chain = {
        let (args, state, client, node) = (
            install_args.clone(),
            state.clone(),
            client.clone(),
            args.node_name.clone(),
        );
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
                        state.metrics.installed.store(false, Ordering::Relaxed);
                        *lock(&state.install_error) = Some(e.to_string());
                        warn!("installing podwire-cni on node {node}: {e}; retrying in 10s");
                        event_on_node(&client, &node, "PodwireInstallFailed", &e.to_string()).await;
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
    match api.get_opt(name).await {
        Ok(None) => true,
        Ok(Some(ds)) => ds.metadata.deletion_timestamp.is_some(),
        Err(e) => {
            warn!("cannot tell whether DaemonSet {ns}/{name} is being deleted ({e}): leaving podwire installed");
            false
        }
    }
}

/// The slice of the pod the plugin needs, nothing else kept in memory.
pub fn slim(pod: &Pod) -> Option<PodInfo> {
    serde_json::to_value(pod)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok())
}

async fn watch_pods(
    client: Client,
    node: String,
    store: Arc<PodStore>,
    synced: Arc<AtomicBool>,
    state: Arc<State>,
) {
    let api: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    let mut current = Pods::default();
    let mut pending: Option<Pods> = None;
    let key = |p: &Pod| {
        (
            p.metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            p.metadata.name.clone().unwrap_or_default(),
        )
    };
    let phase = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default()
    };
    loop {
        match stream.try_next().await {
            Ok(Some(Event::Init)) => pending = Some(Pods::default()),
            Ok(Some(Event::InitApply(pod))) => {
                if let (Some(p), Some(info)) = (pending.as_mut(), slim(&pod)) {
                    p.insert(info);
                }
                lock(&state.phases).insert(key(&pod), phase(&pod));
            }
            Ok(Some(Event::InitDone)) => {
                current = pending.take().unwrap_or_default();
                store.replace(current.clone());
                state
                    .metrics
                    .cached_pods
                    .store(current.len() as u64, Ordering::Relaxed);
                if !synced.swap(true, Ordering::SeqCst) {
                    info!("pod cache synced: {} pods on node {node}", current.len());
                }
                state.metrics.synced.store(true, Ordering::Relaxed);
            }
            Ok(Some(Event::Apply(pod))) => {
                match slim(&pod) {
                    Some(info) => {
                        current.insert(info);
                    }
                    // Not kept stale: a miss asks the API server, which is then unknown too.
                    None => {
                        let (ns, name) = key(&pod);
                        warn!(
                            "pod {ns}/{name} cannot be read from the watch: dropped from the cache"
                        );
                        current.remove(&ns, &name);
                    }
                }
                lock(&state.phases).insert(key(&pod), phase(&pod));
                store.replace(current.clone());
                state
                    .metrics
                    .cached_pods
                    .store(current.len() as u64, Ordering::Relaxed);
            }
            Ok(Some(Event::Delete(pod))) => {
                let (ns, name) = key(&pod);
                current.remove(&ns, &name);
                lock(&state.phases).remove(&(ns, name));
                store.replace(current.clone());
                state
                    .metrics
                    .cached_pods
                    .store(current.len() as u64, Ordering::Relaxed);
            }
            Ok(None) => return,
            // The watcher re-lists (410 Gone) or re-watches after a back-off by itself; the
            // cache keeps serving what it has meanwhile.
            Err(e) => warn!("pod watch on node {node}: {e}; retrying"),
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

/// Every period: check the API server, publish the Node condition when it changes, repair.
async fn heartbeat(
    client: Client,
    node: String,
    args: HeartbeatArgs,
    store: Arc<PodStore>,
    state: Arc<State>,
) {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut published: Option<(bool, String)> = None;
    let mut taint_removed = false;
    loop {
        let reachable = match tokio::time::timeout(Duration::from_secs(5), nodes.get(&node)).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                warn!("API server check (GET node {node}) failed: {e}");
                false
            }
            Err(_) => {
                warn!("API server check (GET node {node}) timed out");
                false
            }
        };
        state
            .metrics
            .api_reachable
            .store(reachable, Ordering::Relaxed);
        let (ready, message) = readiness(&state);
        if reachable && published.as_ref() != Some(&(ready, message.clone())) {
            match patch_condition(&nodes, &node, ready, &message).await {
                Ok(()) => published = Some((ready, message.clone())),
                Err(e) => warn!("patching Node {node} condition {CONDITION}: {e}"),
            }
        }
        if ready && reachable && args.remove_startup_taint && !taint_removed {
            taint_removed = remove_taint(&nodes, &node).await;
        }
        if ready {
            repair(&client, &node, &args, &store, &state).await;
        }
        tokio::time::sleep(args.period).await;
    }
}

fn readiness(state: &State) -> (bool, String) {
    let m = &state.metrics;
    let mut missing: Vec<String> = Vec::new();
    let install_error = lock(&state.install_error).clone();
    if !m.installed.load(Ordering::Relaxed) {
        missing.push(match &install_error {
            Some(e) => format!("podwire-cni is not chained into the primary CNI config: {e}"),
            None => {
                "podwire-cni is not chained into the primary CNI config (waiting for one?)".into()
            }
        });
    }
    if !m.synced.load(Ordering::Relaxed) {
        missing.push("the node's pod cache has not synced".into());
    }
    if !m.api_reachable.load(Ordering::Relaxed) {
        missing.push("the API server is not reachable".into());
    }
    let note = if m.reverted_storms.load(Ordering::Relaxed) > 0 {
        " (warning: another component keeps removing podwire's entry from the CNI config; see the agent's log)"
    } else {
        ""
    };
    if missing.is_empty() {
        (
            true,
            format!("podwire-cni is installed and the pod cache is synced{note}"),
        )
    } else {
        (false, format!("{}{note}", missing.join("; ")))
    }
}

async fn patch_condition(
    nodes: &Api<Node>,
    node: &str,
    ready: bool,
    message: &str,
) -> Result<(), kube::Error> {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let patch = json!({"status": {"conditions": [{
        "type": CONDITION,
        "status": if ready { "True" } else { "False" },
        "reason": if ready { REASON_READY } else { REASON_NOT_READY },
        "message": message,
        "lastHeartbeatTime": now,
        "lastTransitionTime": now,
    }]}});
    nodes
        .patch_status(node, &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .map(|_| ())
}

async fn remove_taint(nodes: &Api<Node>, node: &str) -> bool {
    let Ok(n) = nodes.get(node).await else {
        return false;
    };
    let taints = n.spec.and_then(|s| s.taints).unwrap_or_default();
    if !taints.iter().any(|t| t.key == STARTUP_TAINT) {
        return true;
    }
    let kept: Vec<_> = taints
        .into_iter()
        .filter(|t| t.key != STARTUP_TAINT)
        .collect();
    let patch = json!({"spec": {"taints": kept}});
    match nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(_) => {
            info!("removed the {STARTUP_TAINT} taint from node {node}");
            true
        }
        Err(e) => {
            warn!("removing the {STARTUP_TAINT} taint from node {node}: {e}");
            false
        }
    }
}

/// Pod UIDs the plugin left a record for (the records are the node contract's).
fn recorded_uids(state_dir: &Path) -> BTreeSet<String> {
    let Ok(entries) = std::fs::read_dir(records_dir(state_dir)) else {
        return BTreeSet::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|d| serde_json::from_slice::<Record>(&d).ok())
        .map(|r| r.uid)
        .collect()
}

/// Mesh pods running on this node with no record started before podwire could redirect them.
async fn repair(
    client: &Client,
    node: &str,
    args: &HeartbeatArgs,
    store: &PodStore,
    state: &State,
) {
    let profile = MeshProfile::istio();
    let excluded: Vec<String> = DEFAULT_EXCLUDED_NAMESPACES
        .iter()
        .map(|s| s.to_string())
        .chain([args.namespace.clone()])
        .collect();
    let records = recorded_uids(&args.state_dir);
    let phases = lock(&state.phases).clone();
    let snapshot = store.snapshot();
    let raced: Vec<PodInfo> = snapshot
        .iter()
        .filter(|p| !p.metadata.uid.is_empty() && !records.contains(&p.metadata.uid))
        .filter(|p| {
            phases
                .get(&(p.namespace().to_string(), p.metadata.name.clone()))
                .is_some_and(|ph| ph == "Running")
        })
        .filter(|p| mesh_decision(p, &profile, &excluded).is_redirect())
        .filter(|p| !lock(&state.handled).contains(&p.metadata.uid))
        .cloned()
        .collect();
    for pod in raced {
        let (ns, name, uid) = (
            pod.namespace().to_string(),
            pod.metadata.name.clone(),
            pod.metadata.uid.clone(),
        );
        let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let (action, result) = match args.repair {
            Repair::Off => ("report", Ok(())),
            Repair::Delete => {
                let dp = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: Some(uid.clone()),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                ("delete", api.delete(&name, &dp).await.map(|_| ()))
            }
            Repair::Label => {
                let patch = json!({"metadata": {"labels": {UNINITIALIZED_LABEL: "true"}}});
                (
                    "label",
                    api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                        .await
                        .map(|_| ()),
                )
            }
        };
        let message = match &result {
            Ok(()) => format!(
                "pod started before podwire-cni could redirect its traffic on node {node} (no plugin record for UID {uid}): {}",
                match args.repair {
                    Repair::Delete => "deleted it so its controller recreates it redirected",
                    Repair::Label => "labelled it podwire.io/uninitialized=true; restart it to get redirection",
                    Repair::Off => "restart it to get redirection (--repair=off)",
                }
            ),
            Err(e) => format!("pod runs without redirection on node {node}; {action} failed: {e}"),
        };
        warn!(pod = %format!("{ns}/{name}"), "{message}");
        lock(&state.handled).insert(uid.clone());
        event(client, &ns, &name, &uid, "PodwireUninitialized", &message).await;
        // Counted once the repair is complete, Event included: whoever reads the metric sees
        // a finished repair.
        state.metrics.repaired(args.repair, result.is_ok());
    }
}

/// A core/v1 Event on the pod, so `kubectl describe pod` shows it.
async fn event(client: &Client, ns: &str, name: &str, uid: &str, reason: &str, message: &str) {
    let involved =
        json!({"apiVersion": "v1", "kind": "Pod", "namespace": ns, "name": name, "uid": uid});
    post_event(client, ns, name, involved, reason, message).await;
}

/// An Event on this Node (`kubectl describe node`), in the default namespace as kubelet does.
async fn event_on_node(client: &Client, node: &str, reason: &str, message: &str) {
    let involved = json!({"apiVersion": "v1", "kind": "Node", "name": node, "uid": node});
    post_event(client, "default", node, involved, reason, message).await;
}

async fn post_event(
    client: &Client,
    ns: &str,
    name: &str,
    involved: serde_json::Value,
    reason: &str,
    message: &str,
) {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let ev = json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": format!("{name}.podwire-"), "namespace": ns},
        "involvedObject": involved,
        "reason": reason, "message": message, "type": "Warning",
        "source": {"component": "podwire-agent"},
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
    });
    let api: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), ns);
    match serde_json::from_value(ev) {
        Ok(ev) => {
            if let Err(e) = api.create(&PostParams::default(), &ev).await {
                warn!("recording an Event on {ns}/{name}: {e}");
            }
        }
        Err(e) => warn!("building an Event: {e}"),
    }
}

/// Copy the service-account token next to a kubeconfig for the plugin (mode 0600, in the
/// run dir, not in net.d), rewriting the token whenever the projected one rotates.
async fn plugin_credentials(
    token_file: PathBuf,
    run_dir: PathBuf,
    server: String,
    period: Duration,
) {
    // The plugin runs on the host: everything it reads must be in the run dir (a hostPath),
    // not in this container's service-account mount.
    let ca_src = token_file.with_file_name("ca.crt");
    let (kubeconfig, token_copy, ca_copy) = (
        run_dir.join("kubeconfig"),
        run_dir.join("token"),
        run_dir.join("ca.crt"),
    );
    let mut last: Option<(Vec<u8>, Vec<u8>)> = None;
    loop {
        match (std::fs::read(&token_file), std::fs::read(&ca_src)) {
            (Ok(token), Ok(ca)) if last.as_ref() != Some(&(token.clone(), ca.clone())) => {
                let text = format!(
                    "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: podwire-cni\n  user:\n    tokenFile: {}\ncontexts:\n- name: podwire\n  context:\n    cluster: local\n    user: podwire-cni\ncurrent-context: podwire\n",
                    ca_copy.display(),
                    token_copy.display()
                );
                let wrote = install::write_atomic(&ca_copy, &ca, 0o600)
                    .and_then(|()| install::write_atomic(&token_copy, &token, 0o600))
                    .and_then(|()| install::write_atomic(&kubeconfig, text.as_bytes(), 0o600));
                match wrote {
                    Ok(()) => {
                        info!(
                            "wrote the plugin's kubeconfig {} (token refreshed)",
                            kubeconfig.display()
                        );
                        last = Some((token, ca));
                    }
                    Err(e) => warn!("writing the plugin's kubeconfig: {e}"),
                }
            }
            (Ok(_), Ok(_)) => {}
            (Err(e), _) => warn!(
                "reading the service-account token {}: {e}",
                token_file.display()
            ),
            (_, Err(e)) => warn!("reading the cluster CA {}: {e}", ca_src.display()),
        }
        tokio::time::sleep(period).await;
    }
}

/// Probes and scrapes over HTTP/1.1 (hyper: a request split over several TCP segments is
/// read whole). GET only; any other method gets 405.
async fn serve_status(listener: tokio::net::TcpListener, state: Arc<State>) {
    loop {
        let conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                warn!("status server: accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(status_response(&req, &state)) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            // A client that never finishes its headers does not hold a task forever; one
            // request per connection (`Connection: close`), as probes and scrapes need no more.
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .keep_alive(false);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(conn), service);
            if let Err(e) = conn.await {
                tracing::debug!("status server connection: {e}");
            }
        });
    }
}

fn status_response<B>(
    req: &hyper::Request<B>,
    state: &State,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    use hyper::{Method, StatusCode};
    let (code, ctype, body) = if req.method() != Method::GET {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            format!("method {} not allowed: use GET\n", req.method()),
        )
    } else {
        match req.uri().path() {
            "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
            "/readyz" => {
                let (ready, message) = readiness(state);
                let code = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (code, "text/plain", format!("{message}\n"))
            }
            "/metrics" => (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                state.metrics.render(),
            ),
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /healthz, /readyz, /metrics\n".to_string(),
            ),
        }
    };
    let mut response = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    *response.status_mut() = code;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(ctype),
    );
    if code == StatusCode::METHOD_NOT_ALLOWED {
        response.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET"),
        );
    }
    response
}
