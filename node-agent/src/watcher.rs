//! Re-reading the pods directory when it changes.
//!
//! The platform's watcher (inotify on Linux) reports changes in the directory; after a short
//! quiet period the whole directory is read again and the pod set swapped in one step, so a
//! look-up sees either the old set or the new one, never a mix.

use crate::error::Error;
use crate::pods_dir::{self, PodStore};
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How long the directory must stay quiet before it is read again.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// A directory that never stays quiet is still read again this often.
pub const MAX_DELAY: Duration = Duration::from_secs(1);

/// A watch on the pods directory. Changes are queued (and counted in the store) from the
/// moment it is created, so a change made while the first load runs is not lost;
/// [`DirWatch::spawn_reloads`] acts on them.
#[derive(Debug)]
pub struct DirWatch {
    dir: PathBuf,
    watcher: RecommendedWatcher,
    changes: mpsc::UnboundedReceiver<()>,
    store: Arc<PodStore>,
}

/// Keeps the watch alive; dropping it stops the watching (the reload task then ends).
#[derive(Debug)]
pub struct WatchGuard {
    _watcher: RecommendedWatcher,
}

impl DirWatch {
    pub fn start(dir: &Path, store: Arc<PodStore>) -> Result<Self, Error> {
        let (tx, changes) = mpsc::unbounded_channel();
        let watch_error = |source| Error::Watch {
            path: dir.to_owned(),
            source,
        };
        store.watching(dir);
        let seen = Arc::clone(&store);
        let root = dir.to_owned();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let reload = match event {
                    Ok(event) if is_marker_event(&event) => {
                        // A look-up's sync marker (this agent's): every earlier change has
                        // been seen. Another agent's is nothing.
                        if let Some(n) = own_marker_event(&event) {
                            seen.note_marker(n);
                        }
                        false
                    }
                    Ok(event) if root_gone(&event, &root) => {
                        tracing::error!(
                            "the pods directory {} was removed or replaced: look-ups fail \
                             closed until podwire-agent serve is restarted on it",
                            root.display()
                        );
                        seen.lose_directory();
                        false
                    }
                    Ok(event) => {
                        let reload = triggers_reload(&event.kind);
                        if reload {
                            // Counted before the reload is asked for: a look-up from now on
                            // waits for a set read after this change.
                            seen.note_change(&written(&event));
                        }
                        reload
                    }
                    Err(err) => {
                        // E.g. the kernel's event queue overflowed: read everything again.
                        tracing::warn!("watching the pods directory: {err}");
                        seen.note_change(&[]);
                        true
                    }
                };
                if reload {
                    // Fails only once the reload task is gone, i.e. while shutting down.
                    let _ = tx.send(());
                }
            })
            .map_err(watch_error)?;
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(watch_error)?;
        Ok(DirWatch {
            dir: dir.to_owned(),
            watcher,
            changes,
            store,
        })
    }

    /// Spawns the task that reloads the store after each burst of changes.
    pub fn spawn_reloads(self) -> WatchGuard {
        tokio::spawn(reload_loop(self.dir, self.store, self.changes));
        WatchGuard {
            _watcher: self.watcher,
        }
    }
}

/// The name of the (first) file an event is about.
fn file_name(event: &notify::Event) -> Option<&str> {
    event.paths.first()?.file_name()?.to_str()
}

/// Whether an event is about a look-up sync marker (any agent's).
fn is_marker_event(event: &notify::Event) -> bool {
    file_name(event).is_some_and(pods_dir::is_marker)
}

/// The number of this agent's sync marker an event is about, if it is about one.
fn own_marker_event(event: &notify::Event) -> Option<u64> {
    pods_dir::own_marker(file_name(event)?)
}

/// Whether the event says the watched directory itself went away.
fn root_gone(event: &notify::Event, root: &Path) -> bool {
    use notify::event::ModifyKind;
    matches!(
        event.kind,
        EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
    ) && event.paths.first().is_some_and(|p| p == root)
}

/// What an event says about files being written: written to (`true`: it may be half-written
/// until closed), or closed after writing, removed, moved away, or replaced whole by a rename
/// (`false`). Creating a file writes nothing yet (and a link made with `ln` is never closed
/// after writing): only a write marks it.
fn written(event: &notify::Event) -> Vec<(&Path, bool)> {
    use notify::event::ModifyKind;
    let open = match event.kind {
        EventKind::Modify(ModifyKind::Data(_)) => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
        | EventKind::Remove(_)
        | EventKind::Modify(ModifyKind::Name(_)) => false,
        _ => return Vec::new(),
    };
    // A rename names both ends; each is whole now.
    event.paths.iter().map(|p| (p.as_path(), open)).collect()
}

/// Opening and reading a file is no change (and the reload itself opens every file);
/// a file closed after writing is.
fn triggers_reload(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

async fn reload_loop(dir: PathBuf, store: Arc<PodStore>, mut changes: mpsc::UnboundedReceiver<()>) {
    // After a reload that left files out as being written, read again once they time out
    // (a writer that never closes) even if nothing else changes.
    let mut recheck: Option<Instant> = None;
    loop {
        let next = match recheck {
            Some(at) => match tokio::time::timeout_at(at, changes.recv()).await {
                Ok(next) => next,
                Err(_) => Some(()),
            },
            None => changes.recv().await,
        };
        if next.is_none() {
            return;
        }
        let first = Instant::now();
        loop {
            let deadline = (Instant::now() + DEBOUNCE).min(first + MAX_DELAY);
            tokio::select! {
                // A look-up waits for this reload: no more waiting for quiet.
                () = store.hurry.notified() => break,
                next = tokio::time::timeout_at(deadline, changes.recv()) => match next {
                    Ok(Some(())) if Instant::now() < first + MAX_DELAY => continue,
                    Ok(Some(())) | Err(_) => break,
                    Ok(None) => return,
                },
            }
        }
        let skipped = reload(&dir, &store).await;
        recheck = skipped.then(|| Instant::now() + pods_dir::WRITE_TIMEOUT);
    }
}

/// Reads the directory again; whether files were left out as being written.
async fn reload(dir: &Path, store: &PodStore) -> bool {
    let path = dir.to_owned();
    let mark = store.load_mark();
    let being_written = store.being_written();
    let skipped = !being_written.is_empty();
    match tokio::task::spawn_blocking(move || pods_dir::load_dir(&path, &being_written)).await {
        Ok(Ok(pods)) => {
            tracing::info!("reloaded {} pods from {}", pods.len(), dir.display());
            if let Some(health) = pods.health() {
                tracing::warn!("{}: {health}", dir.display());
            }
            store.replace(pods, mark);
        }
        Ok(Err(err)) => tracing::error!(
            "{err}; look-ups are answered 'not ready' (the plugin fails closed) until the \
             directory can be read again"
        ),
        Err(err) => tracing::error!("reloading {} failed: {err}", dir.display()),
    }
    skipped
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, ModifyKind, RemoveKind};

    #[test]
    fn only_a_write_marks_a_file_as_being_written() {
        use notify::event::{DataChange, ModifyKind, RenameMode};
        let event = |kind, paths: &[&str]| notify::Event {
            kind,
            paths: paths.iter().map(PathBuf::from).collect(),
            attrs: Default::default(),
        };
        let w = |kind, paths: &[&str]| -> Vec<(PathBuf, bool)> {
            written(&event(kind, paths))
                .into_iter()
                .map(|(p, open)| (p.to_path_buf(), open))
                .collect()
        };
        let at = |p: &str, open: bool| (PathBuf::from(p), open);
        assert_eq!(
            w(
                EventKind::Modify(ModifyKind::Data(DataChange::Any)),
                &["/d/a.yaml"]
            ),
            [at("/d/a.yaml", true)]
        );
        // A file created (or linked) holds nothing half-written yet.
        assert!(w(EventKind::Create(CreateKind::File), &["/d/a.yaml"]).is_empty());
        assert_eq!(
            w(
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                &["/d/a.yaml"]
            ),
            [at("/d/a.yaml", false)]
        );
        // A rename replaces the target whole: neither end is being written.
        assert_eq!(
            w(
                EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
                &["/d/.a.tmp", "/d/a.yaml"]
            ),
            [at("/d/.a.tmp", false), at("/d/a.yaml", false)]
        );
        assert_eq!(
            w(
                EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                &["/d/a.yaml"]
            ),
            [at("/d/a.yaml", false)]
        );
        // The watched directory itself going away is not a change to it.
        let root = Path::new("/d");
        assert!(root_gone(
            &event(EventKind::Remove(RemoveKind::Folder), &["/d"]),
            root
        ));
        assert!(!root_gone(
            &event(EventKind::Remove(RemoveKind::File), &["/d/a.yaml"]),
            root
        ));
    }

    #[test]
    fn only_this_agents_markers_count() {
        assert_eq!(pods_dir::own_marker(&pods_dir::marker_name(7)), Some(7));
        // Another agent's (another pid or start), or one made by hand: not this agent's.
        let other = format!("{}1-2-7", pods_dir::MARKER_PREFIX);
        assert!(pods_dir::is_marker(&other));
        assert_eq!(pods_dir::own_marker(&other), None);
        assert_eq!(pods_dir::own_marker("pod.yaml"), None);
    }

    #[test]
    fn reads_are_not_changes() {
        assert!(!triggers_reload(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!triggers_reload(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(triggers_reload(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(triggers_reload(&EventKind::Create(CreateKind::File)));
        assert!(triggers_reload(&EventKind::Modify(ModifyKind::Any)));
        assert!(triggers_reload(&EventKind::Remove(RemoveKind::File)));
        assert!(triggers_reload(&EventKind::Other));
    }
}

/// Change notifications for a few directories (install's conf and bin dirs). Every event
/// counts: the consumer re-reads and decides.
#[derive(Debug)]
pub struct DirEvents {
    rx: mpsc::UnboundedReceiver<()>,
    watcher: RecommendedWatcher,
    watched: Vec<PathBuf>,
}

impl DirEvents {
    pub async fn recv(&mut self) -> Option<()> {
        self.rx.recv().await
    }

    /// Watch one more directory (e.g. where a symlinked config really lives), once.
    pub fn watch_also(&mut self, dir: &Path) {
        if self.watched.iter().any(|d| d == dir) {
            return;
        }
        match self.watcher.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => self.watched.push(dir.to_path_buf()),
            // The periodic pass still catches changes there, only later.
            Err(e) => tracing::warn!("cannot watch {}: {e}", dir.display()),
        }
    }

    /// Forget queued notifications (one re-read covers them all).
    pub fn drain(&mut self) {
        while self.rx.try_recv().is_ok() {}
    }
}

pub fn watch_dirs(dirs: &[&Path]) -> Result<DirEvents, Error> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match event {
            Ok(e) => !matches!(e.kind, EventKind::Access(_)),
            Err(_) => true,
        };
        if relevant {
            let _ = tx.send(());
        }
    })
    .map_err(|source| Error::Watch {
        path: dirs.first().map(|d| d.to_path_buf()).unwrap_or_default(),
        source,
    })?;
    for dir in dirs {
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(|source| Error::Watch {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    Ok(DirEvents {
        rx,
        watcher,
        watched: dirs.iter().map(|d| d.to_path_buf()).collect(),
    })
}
