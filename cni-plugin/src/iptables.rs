//! Running `iptables-restore`/`iptables-save` (and the ip6tables twins) inside a pod netns.
//!
//! One atomic `iptables-restore --noflush` per family on the fast path. The xtables lock is
//! pod-scoped (`XTABLES_LOCKFILE`), so 110 pods starting at once never wait on each other.

use crate::config::Backend;
use podwire_core::render::RuleSet;
use podwire_core::saved::parse_nat;
use podwire_core::Family;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const SEARCH: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// The concrete backend used for a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concrete {
    Legacy,
    Nft,
}

impl Concrete {
    pub fn name(self) -> &'static str {
        match self {
            Concrete::Legacy => "legacy",
            Concrete::Nft => "nft",
        }
    }

    pub fn from_name(s: &str) -> Option<Concrete> {
        match s {
            "legacy" => Some(Concrete::Legacy),
            "nft" => Some(Concrete::Nft),
            _ => None,
        }
    }
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SEARCH.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Pick the backend the node already uses: a configured override wins; otherwise legacy when
/// the host netns has legacy tables loaded (kube-proxy/Docker in legacy mode), else whatever
/// the node's `iptables` command is, else nft. Cheap: one file read and one readlink chain,
/// no process spawned.
pub fn detect(configured: Backend) -> Concrete {
    match configured {
        Backend::Legacy => return Concrete::Legacy,
        Backend::Nft => return Concrete::Nft,
        Backend::Auto => {}
    }
    let legacy_tables =
        std::fs::read_to_string("/proc/self/net/ip_tables_names").unwrap_or_default();
    if !legacy_tables.trim().is_empty() {
        return Concrete::Legacy;
    }
    match find_tool("iptables").and_then(|p| std::fs::canonicalize(p).ok()) {
        Some(real) if real.to_string_lossy().contains("legacy") => Concrete::Legacy,
        Some(_) => Concrete::Nft,
        None if find_tool("iptables-nft-restore").is_some() => Concrete::Nft,
        None => Concrete::Legacy,
    }
}

/// The restore/save commands for one backend and family.
#[derive(Debug, Clone)]
pub struct Tools {
    restore: PathBuf,
    save: PathBuf,
    lockfile: PathBuf,
}

impl Tools {
    pub fn find(backend: Concrete, family: Family, lockfile: &Path) -> Result<Tools, String> {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let name = |verb: &str| format!("{base}-{}-{verb}", backend.name());
        let get = |verb: &str| {
            find_tool(&name(verb)).ok_or_else(|| {
                format!(
                    "{} not found in PATH or {}: install the iptables package on the node, or set \"iptables\" in the plugin config",
                    name(verb),
                    SEARCH.join(":")
                )
            })
        };
        Ok(Tools {
            restore: get("restore")?,
            save: get("save")?,
            lockfile: lockfile.to_path_buf(),
        })
    }

    fn command(&self, bin: &Path) -> Command {
        let mut c = Command::new(bin);
        c.env("XTABLES_LOCKFILE", &self.lockfile)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// `iptables-restore --noflush` with `input` on stdin; the error is the tool's stderr.
    pub fn restore(&self, input: &str) -> Result<(), String> {
        let mut cmd = self.command(&self.restore);
        cmd.arg("--noflush")
            .arg("--wait")
            .arg("5")
            .stdin(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.restore.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input.as_bytes())
                .map_err(|e| format!("writing to {}: {e}", self.restore.display()))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("waiting for {}: {e}", self.restore.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} exited with {}: {}",
                self.restore.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// `iptables-save -t nat`.
    pub fn save_nat(&self) -> Result<String, String> {
        let out = self
            .command(&self.save)
            .args(["-t", "nat"])
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.save.display()))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{} exited with {}: {}",
                self.save.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

/// What an ADD did for one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    New,
    AlreadyPresent,
    Replaced,
}

/// Program `want`. Fast path: one restore that creates the chains (fails atomically when they
/// exist). Only then read the table: identical rules make ADD a no-op, different ones are
/// replaced in one transaction.
pub fn apply(tools: &Tools, want: &RuleSet) -> Result<Applied, String> {
    let first = match tools.restore(&want.to_restore_input()) {
        Ok(()) => return Ok(Applied::New),
        Err(e) => e,
    };
    let table = parse_nat(&tools.save_nat()?);
    if !table.has_any_chain(&want.chains) {
        return Err(first);
    }
    if table.missing(want).is_empty() {
        return Ok(Applied::AlreadyPresent);
    }
    tools.restore(&table.replacement_input(want))?;
    Ok(Applied::Replaced)
}

/// Remove podwire's chains and entry rules; `Ok(false)` when there were none.
pub fn remove(tools: &Tools, chains: &[String]) -> Result<bool, String> {
    let table = parse_nat(&tools.save_nat()?);
    match table.removal_input(chains) {
        None => Ok(false),
        Some(input) => tools.restore(&input).map(|()| true),
    }
}

/// What differs from `want` (empty: all present).
pub fn check(tools: &Tools, want: &RuleSet) -> Result<Vec<String>, String> {
    Ok(parse_nat(&tools.save_nat()?).missing(want))
}
