//! Locating the workspace's built binaries and the node's CNI plugins.

use std::path::{Path, PathBuf};

/// `target/<profile>/<name>` next to the running test or CLI binary.
pub fn workspace_bin(name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(format!("PODWIRE_{}", name.to_uppercase().replace('-', "_")))
    {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/debug/deps/test-xxxx or target/release/podwire
    for dir in exe.ancestors().skip(1).take(2) {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{name} is not built next to {} : run `cargo build --workspace --bins` first",
        exe.display()
    )
}

/// Debian's containernetworking-plugins directory.
pub fn cni_plugin_dir() -> PathBuf {
    for d in ["/usr/lib/cni", "/opt/cni/bin"] {
        if Path::new(d).join("bridge").is_file() {
            return PathBuf::from(d);
        }
    }
    panic!("the bridge CNI plugin is missing: apt-get install containernetworking-plugins")
}
