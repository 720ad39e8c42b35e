//! Per-attachment records: the plugin leaves one when ADD redirected a pod, so DEL/CHECK know
//! the backend and families used and the agent can tell which mesh pods raced it.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub network: String,
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub backend: String,
    pub ipv6: bool,
}

pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("pods")
}

pub fn lock_path(state_dir: &Path, container_id: &str) -> PathBuf {
    state_dir.join("locks").join(format!("{container_id}.lock"))
}

fn path(state_dir: &Path, container_id: &str, ifname: &str) -> PathBuf {
    // ifname is the runtime's; keep only safe characters for the file name.
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
    let data = std::fs::read(path(state_dir, container_id, ifname)).ok()?;
    serde_json::from_slice(&data).ok()
}

/// Remove the record and the pod's lock file; missing files are fine.
pub fn remove(state_dir: &Path, container_id: &str, ifname: &str) {
    let _ = std::fs::remove_file(path(state_dir, container_id, ifname));
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
