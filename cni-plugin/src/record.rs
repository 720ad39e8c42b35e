//! Per-attachment records: the plugin leaves one when ADD redirected a pod, so DEL/CHECK know
//! the backend, the families and the exact entry rules used, and the agent can tell which
//! mesh pods raced it. Each attachment also has a lock that serialises ADD, DEL and CHECK of
//! that attachment (the runtime may run them concurrently, e.g. a DEL after an ADD timed out).

use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub use podwire_core::node::Record;
use podwire_core::node::{attachment_name as attachment, encode_component as encode, locks_dir};

pub fn dir(state_dir: &Path) -> PathBuf {
    podwire_core::node::records_dir(state_dir)
}

/// The xtables lock file handed to iptables (`XTABLES_LOCKFILE`): per pod, so pods never wait
/// on each other.
pub fn lock_path(state_dir: &Path, container_id: &str) -> PathBuf {
    locks_dir(state_dir).join(format!("{}.lock", encode(container_id)))
}

fn path(state_dir: &Path, container_id: &str, ifname: &str) -> PathBuf {
    podwire_core::node::record_path(state_dir, container_id, ifname)
}

/// Where releases before the unambiguous encoding wrote the record; read so that DEL after an
/// upgrade still finds it (its content says whose it is).
fn legacy_path(state_dir: &Path, container_id: &str, ifname: &str) -> PathBuf {
    let ifname: String = ifname
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    dir(state_dir).join(format!("{container_id}_{ifname}.json"))
}

/// Write temp + rename, so a reader never sees half a record.
pub fn write(state_dir: &Path, rec: &Record) -> std::io::Result<()> {
    let target = path(state_dir, &rec.container_id, &rec.ifname);
    std::fs::create_dir_all(dir(state_dir))?;
    let tmp = target.with_extension("json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(rec).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, &target)
}

pub fn read(state_dir: &Path, container_id: &str, ifname: &str) -> Option<Record> {
    [
        path(state_dir, container_id, ifname),
        legacy_path(state_dir, container_id, ifname),
    ]
    .iter()
    .filter_map(|p| std::fs::read(p).ok())
    .filter_map(|d| serde_json::from_slice::<Record>(&d).ok())
    .find(|r| r.container_id == container_id && r.ifname == ifname)
}

/// Remove the record and the pod's xtables lock file; missing files are fine.
pub fn remove(state_dir: &Path, container_id: &str, ifname: &str) {
    let _ = std::fs::remove_file(path(state_dir, container_id, ifname));
    let legacy = legacy_path(state_dir, container_id, ifname);
    let legacy_is_ours = std::fs::read(&legacy)
        .ok()
        .and_then(|d| serde_json::from_slice::<Record>(&d).ok())
        .is_some_and(|r| r.container_id == container_id && r.ifname == ifname);
    if legacy_is_ours {
        let _ = std::fs::remove_file(legacy);
    }
    let _ = std::fs::remove_file(lock_path(state_dir, container_id));
}

pub fn all(state_dir: &Path) -> Vec<Record> {
    let Ok(entries) = std::fs::read_dir(dir(state_dir)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|d| serde_json::from_slice(&d).ok())
        .collect()
}

/// Held for the whole of one ADD, DEL or CHECK of an attachment; released on drop.
#[derive(Debug)]
pub struct AttachmentLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl AttachmentLock {
    /// Wait for the attachment's lock. The file is removed by the DEL that ends the attachment
    /// (while holding it), so after locking we make sure the path still names the file we
    /// locked; otherwise a waiter could hold a lock on a deleted file beside a newcomer.
    pub fn acquire(state_dir: &Path, container_id: &str, ifname: &str) -> std::io::Result<Self> {
        let dir = locks_dir(state_dir);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{}.op", attachment(container_id, ifname)));
        loop {
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)?;
            let lock = Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| e)?;
            let same = std::fs::metadata(&path)
                .ok()
                .zip(lock.metadata().ok())
                .is_some_and(|(on_disk, held)| {
                    on_disk.ino() == held.ino() && on_disk.dev() == held.dev()
                });
            if same {
                return Ok(AttachmentLock { _lock: lock, path });
            }
        }
    }

    /// The attachment is gone: remove the lock file before releasing it.
    pub fn retire(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(container_id: &str, ifname: &str) -> Record {
        Record {
            network: "n".into(),
            container_id: container_id.into(),
            ifname: ifname.into(),
            netns: "/proc/1/ns/net".into(),
            namespace: "default".into(),
            name: "p".into(),
            uid: "u".into(),
            backend: "nft".into(),
            ipv6: false,
            entry_rules: vec!["OUTPUT -o eth9 -j RETURN".into()],
        }
    }

    #[test]
    fn names_do_not_collide() {
        let d = tempfile::tempdir().expect("tempdir");
        write(d.path(), &rec("x", "y_z")).expect("write");
        write(d.path(), &rec("x_y", "z")).expect("write");
        assert_eq!(all(d.path()).len(), 2);
        assert_eq!(read(d.path(), "x", "y_z").expect("first").ifname, "y_z");
        assert_eq!(read(d.path(), "x_y", "z").expect("second").ifname, "z");
        remove(d.path(), "x", "y_z");
        assert!(read(d.path(), "x", "y_z").is_none());
        assert!(read(d.path(), "x_y", "z").is_some(), "the other one stays");
    }

    #[test]
    fn hostile_ids_stay_inside_the_state_dir() {
        let d = tempfile::tempdir().expect("tempdir");
        write(d.path(), &rec("../../etc/x", "eth0")).expect("write");
        let files: Vec<_> = std::fs::read_dir(dir(d.path()))
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files, ["_2e_2e_2f_2e_2e_2fetc_2fx.eth0.json"]);
        assert!(lock_path(d.path(), "../x").starts_with(d.path().join("locks")));
    }

    #[test]
    fn legacy_records_are_read_only_when_they_are_the_attachments_own() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir(d.path())).expect("mkdir");
        let old = rec("x", "y_z");
        std::fs::write(
            legacy_path(d.path(), "x", "y_z"),
            serde_json::to_vec(&old).expect("json"),
        )
        .expect("write");
        assert_eq!(read(d.path(), "x", "y_z"), Some(old));
        // ("x_y", "z") maps to the same legacy file name but is another attachment.
        assert_eq!(read(d.path(), "x_y", "z"), None);
    }

    #[test]
    fn entry_rules_round_trip() {
        let r = rec("c", "eth0");
        let rules = r.entry_rules();
        assert_eq!(rules[0].chain, "OUTPUT");
        let mut again = r.clone();
        again.set_entry_rules(rules.iter());
        assert_eq!(again, r);
    }

    #[test]
    fn the_attachment_lock_excludes_a_second_holder() {
        let d = tempfile::tempdir().expect("tempdir");
        let held = AttachmentLock::acquire(d.path(), "c", "eth0").expect("lock");
        let try_lock = || {
            let f = File::options()
                .write(true)
                .open(&held.path)
                .expect("lock file exists while held");
            Flock::lock(f, FlockArg::LockExclusiveNonblock).is_ok()
        };
        assert!(!try_lock(), "a second holder got the lock");
        let path = held.path.clone();
        held.retire();
        assert!(!path.exists(), "retire removes the lock file");
        let again = AttachmentLock::acquire(d.path(), "c", "eth0").expect("lock again");
        assert!(again.path.exists());
    }
}
