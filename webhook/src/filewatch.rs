//! Files given on the command line (a mounted Secret or ConfigMap, cert-manager's output) are
//! re-read when they change: on a change notification for the directories holding them
//! (Kubernetes swaps a `..data` symlink, so the files themselves are not what changes), and
//! every `poll` in case a notification was missed.

use crate::Error;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Call `reload` after every change to the directories of `files`, and at least every `poll`.
/// `what` names the files for errors ("the certificate files"). The watch lives as long as the
/// task, which runs until the runtime ends.
pub fn spawn<F>(files: &[&Path], poll: Duration, what: &str, mut reload: F) -> Result<(), Error>
where
    F: FnMut() + Send + 'static,
{
    use notify::Watcher as _;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |_ev: notify::Result<notify::Event>| {
        let _ = tx.try_send(());
    })
    .map_err(|e| Error::Io {
        what: format!("watching {what}"),
        error: std::io::Error::other(e),
    })?;
    let mut dirs: Vec<PathBuf> = files
        .iter()
        .map(|p| match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    for d in &dirs {
        watcher
            .watch(d, notify::RecursiveMode::NonRecursive)
            .map_err(|e| Error::Io {
                what: format!("watching {} for changes to {what}", d.display()),
                error: std::io::Error::other(e),
            })?;
    }
    tokio::spawn(async move {
        let _keep = watcher;
        loop {
            let _ = tokio::time::timeout(poll, rx.recv()).await;
            // Let a writer finish (a certificate then its key, temp file then rename).
            tokio::time::sleep(Duration::from_millis(100)).await;
            while rx.try_recv().is_ok() {}
            reload();
        }
    });
    Ok(())
}
