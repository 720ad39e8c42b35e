//! `podwire-injector`: the injection webhook.
//!
//! `review` answers one AdmissionReview from stdin exactly as `POST /inject` does; `serve`
//! is the HTTPS webhook around the same `podwire_injector::review_resolving`.
#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use podwire_core::MeshProfile;
use podwire_injector::{load_config, parse_namespace_labels, review_detailed, LoadedConfig};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Serve the webhook over HTTPS: POST /inject (AdmissionReview v1), GET /healthz,
    /// /readyz, /metrics.
    ///
    /// TLS either from files (--tls-cert/--tls-key, e.g. cert-manager; reloaded when they
    /// change) or self-managed: one replica, elected through a Lease, keeps a CA and a serving
    /// certificate in a Secret, rotates them before they expire and keeps the caBundle of the
    /// MutatingWebhookConfiguration patched; every replica serves the Secret's certificate and
    /// reloads it without dropping connections.
    Serve(Box<ServeArgs>),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Injector config file (same as for `review`).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Istio's values file (JSON/YAML, or the istio-sidecar-injector ConfigMap) instead of
    /// reading it from the cluster.
    #[arg(long, value_name = "FILE")]
    values_file: Option<PathBuf>,
    /// Istio's MeshConfig file (YAML, or the istio ConfigMap) instead of reading it from the
    /// cluster.
    #[arg(long, value_name = "FILE")]
    mesh_config_file: Option<PathBuf>,
    /// Namespace of Istio's control plane, whose istio-sidecar-injector and istio ConfigMaps
    /// hold the values and mesh config (read at start-up, watched, applied without restart).
    #[arg(long, default_value = "istio-system")]
    istio_namespace: String,
    /// Istio revision whose ConfigMaps are read (`istio-sidecar-injector-<rev>`, `istio-<rev>`).
    #[arg(long, default_value = "")]
    istio_revision: String,
    /// Do not read Istio's settings from the cluster: only the config file's `values`/`mesh`
    /// (and the files above) apply.
    #[arg(long)]
    no_istio_config: bool,
    /// Address to listen on (HTTPS).
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:15017")]
    listen: std::net::SocketAddr,
    /// Serving certificate chain (PEM, leaf first), e.g. from cert-manager. With --tls-key;
    /// without both, TLS is self-managed through the Secret below.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Namespace of the injector's Secret, Lease and Service (self-managed TLS).
    #[arg(long, env = "POD_NAMESPACE", default_value = "podwire-system")]
    namespace: String,
    /// Secret (type kubernetes.io/tls) holding the CA and serving certificate (self-managed TLS).
    #[arg(long, default_value = "podwire-injector-tls")]
    secret: String,
    /// MutatingWebhookConfiguration whose webhooks' caBundle is kept patched (self-managed TLS).
    #[arg(long, value_name = "NAME", default_value = "podwire-sidecar-injector")]
    webhook_config: String,
    /// Service in front of the injector: the certificate's DNS names (self-managed TLS).
    #[arg(long, default_value = "podwire-injector")]
    service: String,
    /// Lease electing the replica that creates and rotates the certificates.
    #[arg(long, default_value = "podwire-injector-leader")]
    lease: String,
    /// This replica's name in the Lease (default: the host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Validity of the self-managed serving certificate (s, m, h, d); it is renewed after
    /// 2/3 of it.
    #[arg(long, value_name = "DURATION", default_value = "365d", value_parser = parse_duration)]
    cert_validity: Duration,
    /// Renew the serving certificate this long after it was issued (default: 2/3 of
    /// --cert-validity).
    #[arg(long, hide = true, value_parser = parse_duration)]
    cert_renew_after: Option<Duration>,
    /// Validity of the self-managed CA (default: 10 x --cert-validity); renewed after 2/3.
    #[arg(long, hide = true, value_parser = parse_duration)]
    ca_validity: Option<Duration>,
    /// Lease duration; the leader renews it every third of it.
    #[arg(long, hide = true, default_value = "15s", value_parser = parse_duration)]
    lease_duration: Duration,
    /// How often the leader re-checks the Secret and caBundle besides reacting to changes.
    #[arg(long, hide = true, default_value = "30s", value_parser = parse_duration)]
    reconcile_interval: Duration,
    /// How often the files given here (certificates, config, Istio's settings) are re-read
    /// even without a change notification.
    #[arg(long, hide = true, default_value = "30s", value_parser = parse_duration)]
    cert_poll_interval: Duration,
    /// Do not watch namespaces: the namespaceSelector is then only applied by the API server.
    #[arg(long)]
    no_namespace_watch: bool,
    /// Do not watch nodes: Istio's ENABLE_NATIVE_SIDECARS=auto is then taken as native
    /// sidecars (right once every kubelet is 1.33 or newer) instead of following the nodes.
    /// Nodes are watched only when the injector talks to the cluster anyway (namespace watch,
    /// self-managed certificates or Istio's settings from the cluster).
    #[arg(long)]
    no_node_watch: bool,
    /// Largest AdmissionReview accepted; larger ones get 413.
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Time for a request (TLS handshake, headers, body) to arrive; a connection idle this
    /// long is closed.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    request_timeout: Duration,
    /// Client connections served at once; more wait in the kernel's accept queue.
    #[arg(long, value_name = "N", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
}

/// `500ms`, `10s`, `5m`, `12h`, `365d`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 30s, 5m, 12h or 365d"))?;
    let secs = |m: u64| Ok(Duration::from_secs(n.saturating_mul(m)));
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86400),
        _ => Err(format!(
            "{s:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
        )),
    }
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
    /// Istio's values (JSON/YAML, or the istio-sidecar-injector ConfigMap); the config
    /// file's own `values` win over it.
    #[arg(long, value_name = "FILE")]
    values_file: Option<PathBuf>,
    /// Istio's MeshConfig (YAML, or the istio ConfigMap); the config file's own `mesh` wins.
    #[arg(long, value_name = "FILE")]
    mesh_config_file: Option<PathBuf>,
}

/// Istio's settings from files, when given.
fn istio_files(
    values: Option<&Path>,
    mesh: Option<&Path>,
) -> Result<(Option<serde_json::Value>, Option<serde_json::Value>)> {
    use podwire_injector::{load_istio_setting, IstioSetting};
    Ok((
        values
            .map(|p| load_istio_setting(p, IstioSetting::Values))
            .transpose()?,
        mesh.map(|p| load_istio_setting(p, IstioSetting::Mesh))
            .transpose()?,
    ))
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
        Cmd::Serve(args) => run_serve(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "podwire-injector: error: {}",
                podwire_core::error::report(e.as_ref())
            );
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
    let (values, mesh) = istio_files(
        args.values_file.as_deref(),
        args.mesh_config_file.as_deref(),
    )?;
    let cfg = podwire_injector::with_istio_settings(
        cfg.config,
        values,
        mesh,
        &args.config.display().to_string(),
        &profile,
    )?;
    let labels = args
        .namespace_labels
        .as_deref()
        .map(parse_namespace_labels)
        .transpose()?;
    let mut body = Vec::new();
    std::io::stdin()
        .read_to_end(&mut body)
        .context("reading the AdmissionReview from stdin")?;
    let reviewed = review_detailed(&body, &cfg, labels.as_ref(), &profile);
    tracing::info!(
        outcome = reviewed.outcome.as_str(),
        dry_run = reviewed.dry_run,
        "{}",
        reviewed.summary
    );
    let mut out = reviewed.review.to_json().context("encoding the answer")?;
    out.push(b'\n');
    std::io::stdout()
        .write_all(&out)
        .context("writing the answer to stdout")?;
    Ok(())
}

fn run_serve(args: ServeArgs) -> Result<()> {
    // Two workers whatever the node's size: a webhook call takes microseconds, and each worker
    // keeps its own allocator heap, so the memory budget (serve::MemoryBudget) holds per
    // worker; more workers would multiply what stays resident after a burst.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

async fn kube_client(self_managed: bool) -> Result<kube::Client> {
    let why = if self_managed {
        "self-managed TLS (no --tls-cert/--tls-key) keeps its certificate in a Secret"
    } else {
        "the namespace watch needs it; --no-namespace-watch runs without"
    };
    let config = kube::Config::infer().await.with_context(|| {
        format!("loading the Kubernetes client configuration (in-cluster or KUBECONFIG): {why}")
    })?;
    kube::Client::try_from(config).context("creating the Kubernetes client")
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down: no new connections, finishing open ones");
}

/// The config file, and Istio's settings when given as files (`--values-file`,
/// `--mesh-config-file`), re-read when they change (a mounted ConfigMap) and applied without a
/// restart; a file that does not load or check keeps the config in use, and says so.
/// `last`: the Istio settings read from files at start-up.
fn spawn_config_reloader(
    args: &ServeArgs,
    profile: &MeshProfile,
    live: Arc<podwire_injector::istio_settings::LiveConfig>,
    last: [Option<serde_json::Value>; 2],
) -> Result<()> {
    use podwire_injector::{load_istio_setting, IstioSetting};
    /// One watched file: Istio's settings (with the last value read) or the config file.
    enum Source {
        Istio(IstioSetting, Option<serde_json::Value>),
        Config,
    }
    // (file, what it is, its last failure: said once until it changes or clears)
    let mut sources: Vec<(PathBuf, Source, Option<String>)> = [
        (&args.values_file, IstioSetting::Values),
        (&args.mesh_config_file, IstioSetting::Mesh),
    ]
    .into_iter()
    .zip(last)
    .filter_map(|((p, what), last)| Some((p.clone()?, Source::Istio(what, last), None)))
    .chain([(args.config.clone(), Source::Config, None)])
    .collect();
    let watched: Vec<PathBuf> = sources.iter().map(|(p, _, _)| p.clone()).collect();
    let watched: Vec<&Path> = watched.iter().map(PathBuf::as_path).collect();
    let profile = profile.clone();
    let reload = move || {
        for (path, source, failed) in &mut sources {
            // Ok(true): applied; Ok(false): what is in use already.
            let applied = match source {
                Source::Istio(what, last) => load_istio_setting(path, *what).and_then(|v| {
                    if last.as_ref() == Some(&v) {
                        return Ok(false);
                    }
                    let done = live.update(*what, v.clone());
                    // Not retried until the file changes again.
                    *last = Some(v);
                    done.map(|()| true)
                }),
                Source::Config => load_config(path, &profile).and_then(|l| {
                    let changed = live.replace_file(l.config)?;
                    if changed {
                        for w in l.warnings {
                            tracing::warn!("{w}");
                        }
                    }
                    Ok(changed)
                }),
            };
            match applied {
                Ok(changed) => {
                    *failed = None;
                    if changed {
                        let what = match source {
                            Source::Istio(..) => "Istio's settings from",
                            Source::Config => "the config file",
                        };
                        tracing::info!("applied {what} {}", path.display());
                    }
                }
                Err(e) => {
                    let msg = format!(
                        "{} not applied, keeping the config in use: {e}",
                        path.display()
                    );
                    if failed.as_ref() != Some(&msg) {
                        tracing::warn!("{msg}");
                        *failed = Some(msg);
                    }
                }
            }
        }
    };
    podwire_injector::filewatch::spawn(
        &watched,
        args.cert_poll_interval,
        "the config files",
        reload,
    )?;
    Ok(())
}

async fn serve(args: ServeArgs) -> Result<()> {
    use podwire_injector::{metrics::Metrics, namespaces, serve, tls};
    let profile = MeshProfile::istio();
    let cfg = config(&args.config, &profile)?;
    let metrics = Arc::new(Metrics::default());
    let certs = Arc::new(tls::CertStore::new(metrics.clone()));
    let self_managed = args.tls_cert.is_none();
    let renew_after = args
        .cert_renew_after
        .unwrap_or(args.cert_validity.mul_f64(2.0 / 3.0));
    let ca_validity = args.ca_validity.unwrap_or(args.cert_validity * 10);
    anyhow::ensure!(
        args.cert_validity >= Duration::from_secs(3) && renew_after < args.cert_validity,
        "--cert-validity must be at least 3s, and the renewal ({renew_after:?}) come before it ends"
    );
    anyhow::ensure!(
        ca_validity > args.cert_validity,
        "the CA's validity ({ca_validity:?}) must be longer than --cert-validity"
    );
    anyhow::ensure!(
        args.lease_duration >= Duration::from_secs(1),
        "the lease duration must be at least 1s"
    );
    let files = match (args.tls_cert.clone(), args.tls_key.clone()) {
        (Some(cert), Some(key)) => {
            let files = tls::CertFiles { cert, key };
            certs.install(files.load()?);
            Some(files)
        }
        _ => None,
    };
    let from_cluster =
        !args.no_istio_config && (args.values_file.is_none() || args.mesh_config_file.is_none());
    let client = if self_managed || !args.no_namespace_watch || from_cluster {
        Some(kube_client(self_managed).await?)
    } else {
        None
    };
    // Istio's settings: files when given, else the cluster's ConfigMaps (read now: missing
    // is a start-up error; then watched).
    use podwire_injector::istio_settings::{self, IstioConfigMaps, LiveConfig};
    let (mut values, mut mesh) = istio_files(
        args.values_file.as_deref(),
        args.mesh_config_file.as_deref(),
    )?;
    let cms = IstioConfigMaps::new(&args.istio_namespace, &args.istio_revision);
    let mut watch_values = false;
    let mut watch_mesh = false;
    if let (true, Some(client)) = (from_cluster, &client) {
        let (v, m) = istio_settings::load(client, &cms).await?;
        if values.is_none() {
            values = Some(v);
            watch_values = true;
        }
        if mesh.is_none() {
            mesh = Some(m);
            watch_mesh = true;
        }
    }
    let from_files = [
        (!watch_values).then(|| values.clone()).flatten(),
        (!watch_mesh).then(|| mesh.clone()).flatten(),
    ];
    let live = Arc::new(LiveConfig::new(
        cfg.config,
        &args.config.display().to_string(),
        values,
        mesh,
        profile.clone(),
    )?);
    spawn_config_reloader(&args, &profile, live.clone(), from_files)?;
    let mut tasks = Vec::new();
    let mut lease = None;
    if let Some(files) = files {
        files.spawn_reloader(certs.clone(), args.cert_poll_interval)?;
    } else if let Some(client) = client.clone() {
        let settings = podwire_injector::selfmanaged::Settings {
            namespace: args.namespace.clone(),
            secret: args.secret.clone(),
            webhook_config: args.webhook_config.clone(),
            service: args.service.clone(),
            lease: args.lease.clone(),
            identity: args.identity.clone().unwrap_or_else(default_identity),
            cert_validity: args.cert_validity,
            cert_renew_after: renew_after,
            ca_validity,
            lease_duration: args.lease_duration,
            reconcile_interval: args.reconcile_interval,
        };
        tasks.extend(podwire_injector::selfmanaged::spawn(
            client.clone(),
            settings.clone(),
            certs.clone(),
        ));
        lease = Some((client, settings));
    }
    let ns_labels = match (&client, args.no_namespace_watch) {
        (Some(client), false) => {
            let store = Arc::new(namespaces::NamespaceLabels::default());
            tasks.push(tokio::spawn(namespaces::watch(
                client.clone(),
                store.clone(),
                metrics.clone(),
            )));
            Some(store)
        }
        _ => None,
    };
    let node_watch = match (&client, args.no_node_watch) {
        (Some(client), false) => {
            let state = Arc::new(podwire_injector::nodes::NodeWatch::default());
            tasks.push(tokio::spawn(podwire_injector::nodes::watch(
                client.clone(),
                live.clone(),
                state.clone(),
            )));
            Some(state)
        }
        _ => None,
    };
    if node_watch.is_none() && live.get().native_is_auto() {
        tracing::info!(
            "ENABLE_NATIVE_SIDECARS=auto is taken as native sidecars: nodes are not watched \
             (every kubelet must be 1.33 or newer)"
        );
    }
    if let Some(client) = &client {
        use podwire_injector::IstioSetting;
        for (on, what) in [
            (watch_values, IstioSetting::Values),
            (watch_mesh, IstioSetting::Mesh),
        ] {
            if on {
                tasks.push(tokio::spawn(istio_settings::watch(
                    client.clone(),
                    cms.clone(),
                    what,
                    live.clone(),
                )));
            }
        }
    }
    let state = Arc::new(serve::State {
        config: live,
        profile,
        namespaces: ns_labels,
        nodes: node_watch,
        metrics,
        certs,
        limits: serve::Limits {
            max_body_bytes: args.max_body_bytes,
            request_timeout: args.request_timeout,
            max_connections: args.max_connections as usize,
            ..Default::default()
        },
        memo: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    // One stable line on stdout whatever the log level, with the address actually bound
    // (`--listen 127.0.0.1:0` picks a free port): `serving https://<addr>/inject`.
    let bound = listener.local_addr().unwrap_or(args.listen);
    tracing::info!("serving https://{bound}/inject");
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "serving https://{bound}/inject");
        let _ = out.flush();
    }
    serve::serve(listener, state, shutdown_signal()).await?;
    for t in tasks {
        t.abort();
    }
    if let Some((client, settings)) = lease {
        let release = podwire_injector::selfmanaged::release(&client, &settings);
        match tokio::time::timeout(Duration::from_secs(2), release).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("{e} (another replica takes over once it expires)"),
            Err(_) => tracing::warn!(
                "releasing the Lease timed out (another replica takes over once it expires)"
            ),
        }
    }
    Ok(())
}

fn default_identity() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("podwire-injector-{}", std::process::id()))
}
