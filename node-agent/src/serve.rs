//! `podwire-agent serve`: look-ups answered from a directory of Pod manifests.

use crate::error::Error;
use crate::lookup_server;
use crate::pods_dir::{self, PodStore};
use crate::watcher::DirWatch;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};

/// Answer the CNI plugin's pod look-ups from Pod manifests in a directory.
///
/// Every *.yaml, *.yml and *.json file directly in DIR is read (hidden files are not). A file
/// may hold several documents (YAML `---`, or JSON values one after another); documents of
/// kind Pod are served, List/PodList items are looked into, other kinds are ignored. A
/// document that cannot be read is logged with its file name and never makes a pod "not
/// found": its pod's look-ups get the error, and while a document's pod cannot even be named,
/// every pod not found is answered as unknown. DIR is read again whenever it changes. Pods are
/// keyed by namespace (`default` when empty) and name.
///
/// Stops on SIGTERM or SIGINT, removing the socket.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Directory of Pod manifests (must exist)
    #[arg(long, value_name = "DIR")]
    pub pods_dir: PathBuf,

    /// Unix socket to answer look-ups on (the plugin's `agentSocket`); its directory is
    /// created (0700) when missing, the socket itself is made 0600
    #[arg(
        long,
        value_name = "PATH",
        default_value = podwire_core::node::DEFAULT_AGENT_SOCKET
    )]
    pub socket: PathBuf,
}

pub async fn run(args: ServeArgs) -> Result<(), Error> {
    let dir = args.pods_dir;
    let meta = std::fs::metadata(&dir).map_err(|source| Error::PodsDir {
        path: dir.clone(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(Error::NotADirectory { path: dir });
    }
    // Before anything else, so that a signal is never met by the default action (dying
    // without removing the socket).
    let shutdown = shutdown_signal()?;

    // Watch first, load second: a change made during the first load is then not missed.
    let store = Arc::new(PodStore::default());
    let watch = DirWatch::start(&dir, Arc::clone(&store))?;
    let mark = store.load_mark();
    let pods = pods_dir::load_dir(&dir, &store.being_written())?;
    tracing::info!("loaded {} pods from {}", pods.len(), dir.display());
    if let Some(health) = pods.health() {
        tracing::warn!("{}: {health}", dir.display());
    }
    store.replace(pods, mark);
    let _watch = watch.spawn_reloads();

    let (listener, socket_file) = lookup_server::bind(&args.socket).await?;
    tracing::info!(
        "serving {} pods on {}",
        store.snapshot().len(),
        args.socket.display()
    );
    lookup_server::serve(
        listener,
        Arc::new(lookup_server::Source::directory(store)),
        shutdown,
    )
    .await;
    drop(socket_file); // removes the socket
    tracing::info!("stopped");
    Ok(())
}

/// Completes on the first SIGTERM or SIGINT.
pub fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, Error> {
    let install = |kind: SignalKind, name: &'static str| {
        signal(kind).map_err(|source| Error::Signal {
            signal: name,
            source,
        })
    };
    let mut term = install(SignalKind::terminate(), "SIGTERM")?;
    let mut int = install(SignalKind::interrupt(), "SIGINT")?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("{name} received: shutting down");
    })
}
