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
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        // Reading a file is an event too (inotify's OPEN): acting on it would make every
        // reload trigger the next one.
        if !matches!(
            ev,
            Ok(notify::Event {
                kind: notify::EventKind::Access(_),
                ..
            })
        ) {
            let _ = tx.try_send(());
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// One change, one reload (give or take the change's own events): reading the file in
    /// `reload` must not wake the watch again.
    #[test]
    fn reading_the_files_does_not_trigger_a_reload() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("config.yaml");
        std::fs::write(&file, "a: 1\n").expect("write");
        let reloads = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        let (r, f) = (reloads.clone(), file.clone());
        rt.block_on(async {
            spawn(
                &[&file],
                Duration::from_secs(3600),
                "the test file",
                move || {
                    let _ = std::fs::read_to_string(&f);
                    r.fetch_add(1, Ordering::SeqCst);
                    let _ = tx.send(());
                },
            )
            .expect("watch");
            std::fs::write(&file, "a: 2\n").expect("write");
            let first = tokio::task::spawn_blocking(move || {
                let got = rx.recv_timeout(Duration::from_secs(10)).is_ok();
                (got, rx)
            });
            let (got, _rx) = first.await.expect("join");
            assert!(got, "no reload after a change");
            // A reload that re-triggered itself would run every ~100 ms from here on.
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        let n = reloads.load(Ordering::SeqCst);
        assert!((1..=2).contains(&n), "{n} reloads for one change");
    }
}
