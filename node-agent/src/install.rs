//! `install` / `uninstall`: put podwire-cni in the CNI bin dir and chain it into the primary
//! conflist, keep it there (`--watch`), and undo exactly that. No cluster needed.
//!
//! Every write is temp file + rename in the same directory, keeping the file's mode, so the
//! runtime never reads a torn file (not even after `kill -9`). Temp files are hidden and end
//! in `.tmp`, which libcni never loads.
//!
//! A config that is a symlink (config managers do `10-x.conflist -> ../real/x.conflist`) is
//! read through the link, as libcni reads it, and written through it too: the link stays, its
//! final target is replaced atomically (temp + rename in the target's directory). The link is
//! the config manager's; replacing it with a file would fight whoever owns it.

use crate::error::Error;
use crate::metrics::Metrics;
use podwire_core::conflist;
use podwire_core::mesh::DEFAULT_EXCLUDED_NAMESPACES;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracing::{info, warn};

use podwire_core::node::{
    ChainedEntry, FailurePolicy, DEFAULT_AGENT_SOCKET, DEFAULT_STATE_DIR, PLUGIN_BIN,
    PODWIRE_NAMESPACE,
};
/// More re-inserts than this within [`FIGHT_WINDOW`] means something keeps reverting us.
const FIGHT_LIMIT: usize = 5;
const FIGHT_WINDOW: Duration = Duration::from_secs(60);

/// Where things go and what the plugin's entry says.
#[derive(Debug, Clone, clap::Args)]
pub struct InstallArgs {
    /// Directory the runtime executes CNI plugins from.
    #[arg(long, value_name = "DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// Directory holding the primary CNI configuration (kubelet's --cni-conf-dir).
    #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// The podwire-cni binary to install [default: next to this podwire-agent].
    #[arg(long, value_name = "FILE")]
    pub plugin_binary: Option<PathBuf>,
    /// `agentSocket` written into the plugin's entry; `run` also answers look-ups on it
    /// (`--socket` is accepted as an alias).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_AGENT_SOCKET, alias = "socket")]
    pub agent_socket: PathBuf,
    /// `kubeconfig` written into the plugin's entry (the plugin's fallback to the API server).
    #[arg(long, value_name = "FILE")]
    pub plugin_kubeconfig: Option<PathBuf>,
    /// `failurePolicy` of the plugin: closed (a pod whose status is unknown waits) or open.
    #[arg(long, value_name = "POLICY", value_enum, default_value_t = FailurePolicy::default())]
    pub failure_policy: FailurePolicy,
    /// `logFile` of the plugin.
    #[arg(long, value_name = "FILE")]
    pub plugin_log_file: Option<PathBuf>,
    /// `stateDir` written into the plugin's entry: where the plugin leaves a record per
    /// redirected pod, which `run`'s repair reads (the two must agree, or every mesh pod looks
    /// raced).
    #[arg(long, default_value = DEFAULT_STATE_DIR, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// The agent's own namespace (set by `run`): when it is not the plugin's default
    /// (`podwire-system`), the entry lists it in `excludeNamespaces` so the agent always starts.
    #[arg(skip)]
    pub agent_namespace: Option<String>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct InstallCmd {
    #[command(flatten)]
    pub args: InstallArgs,
    /// Keep watching: put the entry back when the primary CNI rewrites its config, and remove
    /// exactly podwire's change on SIGTERM/SIGINT.
    #[arg(long)]
    pub watch: bool,
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

impl InstallArgs {
    /// The conflist entry, exactly as written.
    pub fn entry(&self) -> Value {
        let exclude_namespaces = self
            .agent_namespace
            .as_ref()
            .filter(|ns| ns.as_str() != PODWIRE_NAMESPACE)
            .map(|ns| {
                DEFAULT_EXCLUDED_NAMESPACES
                    .iter()
                    .copied()
                    .chain([ns.as_str()])
                    .map(String::from)
                    .collect()
            });
        let entry = ChainedEntry {
            agent_socket: path(&self.agent_socket),
            failure_policy: self.failure_policy,
            state_dir: path(&self.state_dir),
            exclude_namespaces,
            kubeconfig: self.plugin_kubeconfig.as_deref().map(path),
            log_file: self.plugin_log_file.as_deref().map(path),
            ..ChainedEntry::default()
        };
        json!(entry)
    }

    fn plugin_source(&self) -> Result<PathBuf, Error> {
        match &self.plugin_binary {
            Some(p) => Ok(p.clone()),
            None => std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(|d| d.join(PLUGIN_BIN)))
                .ok_or_else(|| Error::Install {
                    path: PathBuf::from(PLUGIN_BIN),
                    message:
                        "cannot locate podwire-cni next to podwire-agent: pass --plugin-binary"
                            .into(),
                }),
        }
    }
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::Install {
        path: path.to_path_buf(),
        message: format!("{what}: {e}"),
    }
}

fn tmp_name(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}.podwire-{}.tmp", std::process::id()))
}

/// Write `data` to `target` atomically with `mode`.
pub fn write_atomic(target: &Path, data: &[u8], mode: u32) -> Result<(), Error> {
    let tmp = tmp_name(target);
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, target)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| io_err(target, "atomic write", e))
}

/// Remove temp files left by an earlier podwire that died mid-write.
fn clear_stale_temps(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with('.') && n.contains(".podwire-") && n.ends_with(".tmp") {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// Copy the plugin binary in unless an identical one is there.
pub fn install_binary(args: &InstallArgs) -> Result<bool, Error> {
    let src = args.plugin_source()?;
    let data = fs::read(&src).map_err(|e| io_err(&src, "reading the plugin binary", e))?;
    fs::create_dir_all(&args.cni_bin_dir).map_err(|e| io_err(&args.cni_bin_dir, "creating", e))?;
    clear_stale_temps(&args.cni_bin_dir);
    let target = args.cni_bin_dir.join(PLUGIN_BIN);
    if fs::read(&target).is_ok_and(|old| old == data) {
        return Ok(false);
    }
    write_atomic(&target, &data, 0o755)?;
    info!("installed {}", target.display());
    Ok(true)
}

/// Where writing `path` must go: its final target when it is a symlink (the link is kept).
fn write_target(path: &Path) -> PathBuf {
    let is_link = fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    if is_link {
        if let Ok(target) = fs::canonicalize(path) {
            return target;
        }
    }
    path.to_path_buf()
}

/// Write a config file atomically, through a symlink to its target.
fn write_config(path: &Path, data: &[u8], mode: u32) -> Result<PathBuf, Error> {
    let target = write_target(path);
    if target != path {
        if let Some(dir) = target.parent() {
            clear_stale_temps(dir);
        }
    }
    write_atomic(&target, data, mode)?;
    Ok(target)
}

/// "`path`" or "`path` (→ `target`)".
fn shown(path: &Path, target: &Path) -> String {
    if path == target {
        path.display().to_string()
    } else {
        format!("{} (symlink to {})", path.display(), target.display())
    }
}

/// The directories symlinked configs in `dir` really live in (to be watched too).
pub fn link_target_dirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_symlink()))
        .filter(|e| conflist::kind_of(&e.file_name().to_string_lossy()).is_some())
        .filter_map(|e| fs::canonicalize(e.path()).ok())
        .filter_map(|t| t.parent().map(Path::to_path_buf))
        .filter(|d| d != dir)
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// The config files of `dir` by name, symlinks followed as libcni follows them (a dangling
/// link is no config).
fn read_dir_files(dir: &Path) -> Result<Vec<(String, Vec<u8>)>, Error> {
    let entries = fs::read_dir(dir).map_err(|e| io_err(dir, "listing", e))?;
    Ok(entries
        .flatten()
        .filter(|e| fs::metadata(e.path()).is_ok_and(|m| m.is_file()))
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            conflist::kind_of(&name)?;
            fs::read(e.path()).ok().map(|d| (name, d))
        })
        .collect())
}

/// What one pass of [`ensure_chained`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainState {
    /// No usable primary config yet.
    NoPrimary,
    AlreadyChained(String),
    /// Written (`from` → `to` when a `.conf` was wrapped).
    Written {
        from: String,
        to: String,
    },
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644)
}

/// Make the primary config hold exactly one podwire entry, last.
pub fn ensure_chained(conf_dir: &Path, entry: &Value) -> Result<ChainState, Error> {
    clear_stale_temps(conf_dir);
    let files = read_dir_files(conf_dir)?;
    let (primary, skipped) = conflist::pick_primary(&files);
    for s in &skipped {
        warn!("skipping CNI config {s} (as kubelet does)");
    }
    let Some(i) = primary else {
        return Ok(ChainState::NoPrimary);
    };
    let (name, bytes) = &files[i];
    let config = conflist::parse(name, bytes).map_err(|m| Error::Install {
        path: conf_dir.join(name),
        message: m,
    })?;
    if conflist::is_chained(&config, entry) {
        return Ok(ChainState::AlreadyChained(name.clone()));
    }
    check_version(conf_dir, name, &config)?;
    let (new_name, chained) =
        conflist::chain(name, &config, entry).map_err(|m| Error::Install {
            path: conf_dir.join(name),
            message: m,
        })?;
    let old = conf_dir.join(name);
    let mut text = serde_json::to_vec_pretty(&chained).unwrap_or_default();
    text.push(b'\n');
    let new_path = conf_dir.join(&new_name);
    let written = write_config(&new_path, &text, mode_of(&old))?;
    if &new_name != name {
        // The wrapped .conf goes only after its .conflist is in place: never no config at all.
        // A symlinked .conf loses only its link; the file it pointed to is left alone.
        fs::remove_file(&old).map_err(|e| io_err(&old, "removing the wrapped .conf", e))?;
    }
    info!("chained podwire-cni into {}", shown(&new_path, &written));
    Ok(ChainState::Written {
        from: name.clone(),
        to: new_name,
    })
}

fn check_version(dir: &Path, name: &str, config: &Value) -> Result<(), Error> {
    let v = config
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or("0.3.1");
    if podwire_core::cni::version_supported(v) {
        Ok(())
    } else {
        Err(Error::Install {
            path: dir.join(name),
            message: format!(
                "cniVersion {v} is not supported by podwire-cni ({}): upgrade the primary CNI",
                podwire_core::cni::SUPPORTED_VERSIONS.join(", ")
            ),
        })
    }
}

/// Remove podwire's entry from every config in the dir (restoring a wrapped `.conf`) and the
/// binary. Returns what was changed.
pub fn uninstall(args: &InstallArgs) -> Result<Vec<String>, Error> {
    let dir = &args.cni_conf_dir;
    let mut changed = Vec::new();
    clear_stale_temps(dir);
    for (name, bytes) in read_dir_files(dir)? {
        let Ok(config) = conflist::parse(&name, &bytes) else {
            continue;
        };
        let Some((target, restored)) = conflist::unchain(&name, &config) else {
            continue;
        };
        let path = dir.join(&name);
        let mut text = serde_json::to_vec_pretty(&restored).unwrap_or_default();
        text.push(b'\n');
        let target_path = dir.join(&target);
        let written = write_config(&target_path, &text, mode_of(&path))?;
        if target != name {
            fs::remove_file(&path).map_err(|e| io_err(&path, "removing", e))?;
        }
        info!("removed podwire-cni from {}", shown(&target_path, &written));
        changed.push(target);
    }
    let bin = args.cni_bin_dir.join(PLUGIN_BIN);
    match fs::remove_file(&bin) {
        Ok(()) => {
            info!("removed {}", bin.display());
            changed.push(bin.display().to_string());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&bin, "removing", e)),
    }
    Ok(changed)
}

/// Notices a component that keeps reverting podwire's entry.
#[derive(Debug, Default)]
pub struct FightDetector {
    reinserts: VecDeque<Instant>,
    pub total: u64,
    warned: bool,
}

impl FightDetector {
    /// Record a re-insert; `true` the first time the rate crosses the limit.
    pub fn reinserted(&mut self, now: Instant) -> bool {
        self.total += 1;
        self.reinserts.push_back(now);
        while self
            .reinserts
            .front()
            .is_some_and(|t| now.duration_since(*t) > FIGHT_WINDOW)
        {
            self.reinserts.pop_front();
        }
        if self.reinserts.len() > FIGHT_LIMIT && !self.warned {
            self.warned = true;
            return true;
        }
        if self.reinserts.len() <= 1 {
            self.warned = false;
        }
        false
    }
}

/// Keep podwire chained until `shutdown` completes (`watch`), or until it is chained once.
/// Returns `true` when it stopped because of `shutdown`.
pub async fn keep_chained(
    args: &InstallArgs,
    watch: bool,
    metrics: Option<&Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<bool, Error> {
    tokio::pin!(shutdown);
    let entry = args.entry();
    install_binary(args)?;
    fs::create_dir_all(&args.cni_conf_dir)
        .map_err(|e| io_err(&args.cni_conf_dir, "creating", e))?;
    let mut events = crate::watcher::watch_dirs(&[&args.cni_conf_dir, &args.cni_bin_dir])?;
    let mut fights = FightDetector::default();
    let mut announced = false;
    let mut announced_watch = false;
    let mut chained_once = false;
    loop {
        let state = ensure_chained(&args.cni_conf_dir, &entry)?;
        match &state {
            ChainState::NoPrimary => {
                if !announced {
                    info!(
                        "no primary CNI config in {} yet: waiting for one",
                        args.cni_conf_dir.display()
                    );
                    announced = true;
                }
            }
            ChainState::AlreadyChained(_) => {}
            ChainState::Written { to, .. } => {
                if let Some(m) = metrics {
                    m.installs.inc();
                    if chained_once {
                        m.reinserts.inc();
                    }
                }
                if chained_once && fights.reinserted(Instant::now()) {
                    if let Some(m) = metrics {
                        m.reverted_storms.inc();
                    }
                    warn!(
                        "podwire-cni had to be re-inserted into {} more than {FIGHT_LIMIT} times in a minute: another component (the primary CNI's installer?) keeps rewriting it without podwire's entry",
                        args.cni_conf_dir.join(to).display()
                    );
                }
            }
        }
        // A config behind a symlink is rewritten where it lives: watch there too.
        for dir in link_target_dirs(&args.cni_conf_dir) {
            events.watch_also(&dir);
        }
        if watch && !announced_watch {
            info!(
                "watching {} and {} for changes",
                args.cni_conf_dir.display(),
                args.cni_bin_dir.display()
            );
            announced_watch = true;
        }
        let chained = !matches!(state, ChainState::NoPrimary);
        chained_once |= chained;
        if let Some(m) = metrics {
            m.installed.set(chained);
        }
        if chained_once && !watch {
            return Ok(false);
        }
        if !args.cni_bin_dir.join(PLUGIN_BIN).is_file() {
            install_binary(args)?;
        }
        tokio::select! {
            Some(()) = events.recv() => {
                // Let a burst of writes settle (re-inserting within 1 s is the promise).
                tokio::time::sleep(Duration::from_millis(20)).await;
                events.drain();
            }
            // A missed event is repaired by the next pass anyway.
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            () = &mut shutdown => return Ok(true),
        }
    }
}

/// `install [--watch]`: with --watch, SIGTERM/SIGINT remove exactly podwire's change.
pub async fn run(cmd: InstallCmd) -> Result<(), Error> {
    let shutdown = crate::serve::shutdown_signal()?;
    if keep_chained(&cmd.args, cmd.watch, None, shutdown).await? && cmd.watch {
        info!("removing podwire's change");
        uninstall(&cmd.args)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fight_detector_warns_once_per_storm() {
        let mut f = FightDetector::default();
        let t0 = Instant::now();
        let warnings: usize = (0..20)
            .map(|i| f.reinserted(t0 + Duration::from_millis(i * 10)))
            .filter(|w| *w)
            .count();
        assert_eq!(warnings, 1);
        assert_eq!(f.total, 20);
    }
}
