//! Entering a pod's network namespace: `setns` on a dedicated thread, so the plugin's main
//! thread never changes namespace, and a closure that switches back before the thread ends.
//! Processes spawned from inside the closure (iptables-restore) inherit the pod's netns.

use crate::error::{PluginError, Result};
use nix::sched::{sched_getaffinity, sched_getcpu, sched_setaffinity, setns, CloneFlags, CpuSet};
use nix::unistd::Pid;
use std::fs::File;
use std::path::Path;

/// Run `f` with the calling thread's network namespace set to the one at `path`.
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let err = |reason: String| PluginError::Netns {
        path: path.display().to_string(),
        reason,
    };
    let target =
        File::open(path).map_err(|e| err(format!("cannot open: {e}; is the pod sandbox gone?")))?;
    // The runtime never calls a CNI plugin for a pod in the node's own netns (hostNetwork pods
    // get no CNI call): rules there would capture the node's traffic.
    if same_file(&target, Path::new("/proc/self/ns/net")) {
        return Err(err(
            "is the plugin's own (the node's) network namespace, not a pod's: refusing to \
             program a pod's redirection there"
                .into(),
        ));
    }
    // The worker starts on this thread's CPU: this thread only waits for it, so it runs at
    // once instead of queueing behind whatever occupies another CPU (fork balancing would
    // place it there). Best effort; the affinity is restored right after the spawn.
    let home_mask = sched_getaffinity(Pid::from_raw(0)).ok();
    if let Ok(cpu) = sched_getcpu() {
        let mut here = CpuSet::new();
        if here.set(cpu).is_ok() {
            let _ = sched_setaffinity(Pid::from_raw(0), &here);
        }
    }
    std::thread::scope(|s| {
        let worker = s.spawn(|| {
            // Tools spawned from here (the fallback) must not inherit the pinning.
            if let Some(mask) = &home_mask {
                let _ = sched_setaffinity(Pid::from_raw(0), mask);
            }
            let home = File::open("/proc/thread-self/ns/net")
                .map_err(|e| err(format!("cannot open the current netns: {e}")))?;
            setns(&target, CloneFlags::CLONE_NEWNET).map_err(|e| {
                err(format!(
                    "setns failed: {e}; is it a network namespace, and are we root?"
                ))
            })?;
            let out = f();
            // The thread ends here anyway; switching back keeps the closure's contract.
            setns(&home, CloneFlags::CLONE_NEWNET)
                .map_err(|e| err(format!("cannot switch back: {e}")))?;
            Ok(out)
        });
        if let Some(mask) = &home_mask {
            let _ = sched_setaffinity(Pid::from_raw(0), mask);
        }
        worker
            .join()
            .map_err(|_| err("the netns worker thread panicked".into()))?
    })
}

/// Whether `file` is the object at `other` (nsfs gives each namespace its own inode).
fn same_file(file: &File, other: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(other)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}
