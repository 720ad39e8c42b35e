//! Programming the rules inside a pod netns: in-process over nf_tables netlink on nft nodes
//! ([`crate::nftables`], one acked batch per family), `iptables-restore`/`iptables-save` (and the
//! ip6tables twins) for everything else: legacy nodes, a batch the kernel refuses, ADD again,
//! repair, DEL and CHECK (they read the table through iptables-save, whichever path wrote it).
//!
//! One atomic transaction per family either way. The xtables lock is pod-scoped
//! (`XTABLES_LOCKFILE`), so 110 pods starting at once never wait on each other.

use crate::config::Backend;
use crate::nftables::NftFailure;
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;
use podwire_core::render::{Rule, RuleSet};
use podwire_core::saved::parse_nat;
use podwire_core::Family;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;
use tracing::{debug, warn};

/// How long one iptables-restore/-save may take before it is killed: it waits at most 5 s for
/// the (pod-scoped) xtables lock, so anything longer is a hung tool, and the runtime must get
/// an answer rather than a stuck sandbox.
const TOOL_TIMEOUT: Duration = Duration::from_secs(10);

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
/// the node's `iptables` command is (in /usr/sbin, /sbin, /usr/bin, /bin, else on PATH), else
/// nft. Cheap: one file read and one readlink chain, no process spawned.
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
    // The distribution's own location first (one stat on a typical node); PATH only when the
    // command lives elsewhere.
    let iptables = SEARCH
        .iter()
        .map(|d| Path::new(d).join("iptables"))
        .find(|p| p.is_file())
        .or_else(|| find_tool("iptables"));
    match iptables.and_then(|p| std::fs::canonicalize(p).ok()) {
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
        c.env("XTABLES_LOCKFILE", &self.lockfile);
        c
    }

    /// `iptables-restore --noflush` with `input` on stdin; the error is the tool's stderr.
    pub fn restore(&self, input: &str) -> Result<(), String> {
        let mut cmd = self.command(&self.restore);
        cmd.arg("--noflush").arg("--wait").arg("5");
        run(&mut cmd, input.as_bytes(), TOOL_TIMEOUT).map(|_| ())
    }

    /// `iptables-save -t nat`.
    pub fn save_nat(&self) -> Result<String, String> {
        let mut cmd = self.command(&self.save);
        cmd.args(["-t", "nat"]);
        run(&mut cmd, b"", TOOL_TIMEOUT)
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The tools of one backend and family, looked up on first use: the in-process path never
/// needs them, so a mesh ADD on an nft node does no PATH search.
#[derive(Debug)]
pub struct LazyTools {
    backend: Concrete,
    family: Family,
    lockfile: PathBuf,
    found: OnceLock<Tools>,
}

impl LazyTools {
    pub fn new(backend: Concrete, family: Family, lockfile: &Path) -> LazyTools {
        LazyTools {
            backend,
            family,
            lockfile: lockfile.to_path_buf(),
            found: OnceLock::new(),
        }
    }

    pub fn get(&self) -> Result<&Tools, String> {
        if let Some(t) = self.found.get() {
            return Ok(t);
        }
        let t = Tools::find(self.backend, self.family, &self.lockfile)?;
        Ok(self.found.get_or_init(|| t))
    }
}

/// An anonymous in-memory file: the tool's stdin, stdout or stderr. Unlike pipes, nothing
/// blocks when nobody reads, so one thread can wait for the exit with a deadline.
fn memfile(name: &std::ffi::CStr, content: &[u8]) -> std::io::Result<File> {
    let mut f = File::from(memfd_create(name, MemFdCreateFlag::MFD_CLOEXEC)?);
    f.write_all(content)?;
    f.rewind()?;
    Ok(f)
}

/// Run `cmd` with `input` on stdin; kill it after `limit`. `Err` names the tool and says why.
fn run(cmd: &mut Command, input: &[u8], limit: Duration) -> Result<Output, String> {
    let tool = cmd.get_program().to_string_lossy().into_owned();
    let io = |e: std::io::Error| format!("cannot run {tool}: {e}");
    let stdin = memfile(c"stdin", input).map_err(io)?;
    let mut stdout = memfile(c"stdout", b"").map_err(io)?;
    let mut stderr = memfile(c"stderr", b"").map_err(io)?;
    let mut child = cmd
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::from(stdout.try_clone().map_err(io)?))
        .stderr(Stdio::from(stderr.try_clone().map_err(io)?))
        .spawn()
        .map_err(io)?;
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    // Wait without reaping (WNOWAIT) on a helper thread: the pid stays ours until `child.wait`
    // below, so the kill on timeout can never hit a recycled pid.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(waitid(
            Id::Pid(pid),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
        ));
    });
    let timed_out = rx.recv_timeout(limit).is_err();
    if timed_out {
        let _ = kill(pid, Signal::SIGKILL);
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for {tool}: {e}"))?;
    let mut out = Output {
        status,
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    let _ = stdout
        .rewind()
        .and_then(|()| stdout.read_to_end(&mut out.stdout));
    let _ = stderr
        .rewind()
        .and_then(|()| stderr.read_to_end(&mut out.stderr));
    if timed_out {
        return Err(format!(
            "{tool} did not finish within {}s and was killed",
            limit.as_secs()
        ));
    }
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{tool} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// How new rules were written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// One nf_tables batch over netlink, in-process.
    Netlink,
    /// `iptables-restore --noflush`.
    Restore,
}

/// What an ADD did for one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    New(Via),
    AlreadyPresent,
    Replaced,
}

/// The in-process programmer: [`crate::nftables::program`], replaceable in tests.
pub type Programmer = fn(&RuleSet) -> Result<(), NftFailure>;

/// Program `want`. Fast path on nft nodes: one in-process nf_tables batch that creates the
/// chains (fails atomically when they exist); on legacy nodes, or when the batch fails for any
/// reason (named in the log), one `iptables-restore` doing the same. Only then read the table:
/// identical rules (entry rules first in their built-in chains) make ADD a no-op; anything
/// else, a rule shadowing them included, is replaced in one transaction. `previous`: the entry
/// rules an earlier ADD recorded.
pub fn apply(
    tools: &LazyTools,
    want: &RuleSet,
    previous: &[Rule],
    netlink: Option<Programmer>,
    pod: &str,
) -> Result<Applied, String> {
    let fam = want.family.name();
    match (tools.backend, netlink) {
        (Concrete::Nft, Some(program)) => match program(want) {
            Ok(()) => return Ok(Applied::New(Via::Netlink)),
            Err(e) if e.exists() => {
                debug!(pod, "{fam}: the chains exist ({e}); reading the table with iptables-nft-save")
            }
            Err(e) => warn!(
                pod,
                "{fam}: in-process nf_tables programming did not commit, nothing changed: {e}; falling back to iptables-nft-restore"
            ),
        },
        (Concrete::Legacy, _) => {
            debug!(pod, "{fam}: legacy iptables backend: iptables-legacy-restore (nf_tables netlink does not apply)")
        }
        (Concrete::Nft, None) => {}
    }
    let tools = tools.get()?;
    let first = match tools.restore(&want.to_restore_input()) {
        Ok(()) => return Ok(Applied::New(Via::Restore)),
        Err(e) => e,
    };
    let table = parse_nat(&tools.save_nat()?);
    if !table.has_any_chain(&want.chains) {
        return Err(first);
    }
    if table.missing(want).is_empty() {
        return Ok(Applied::AlreadyPresent);
    }
    tools.restore(&table.replacement_input(want, previous))?;
    Ok(Applied::Replaced)
}

/// Program every family in turn (`tools[i]` for `sets[i]`). When one fails, the families
/// programmed before it are removed again (no partial redirection; iptables-save reads them
/// whichever path wrote them) and the failed family is named.
pub fn apply_all(
    tools: &[LazyTools],
    sets: &[RuleSet],
    previous: &[Rule],
    netlink: Option<Programmer>,
    pod: &str,
) -> Result<Vec<Applied>, (Family, String)> {
    let mut done: Vec<Applied> = Vec::new();
    for (t, set) in tools.iter().zip(sets) {
        match apply(t, set, previous, netlink, pod) {
            Ok(a) => done.push(a),
            Err(reason) => {
                for (t, set) in tools.iter().zip(sets).take(done.len()) {
                    let entries: Vec<Rule> = set.entry_rules().cloned().collect();
                    let removed = t.get().and_then(|t| remove(t, &set.chains, &entries));
                    if let Err(e) = removed {
                        warn!(pod, "rollback of {} rules failed: {e}", set.family.name());
                    }
                }
                return Err((set.family, reason));
            }
        }
    }
    Ok(done)
}

/// Remove podwire's chains, the rules jumping into them and the recorded `entries`;
/// `Ok(false)` when there were none.
pub fn remove(tools: &Tools, chains: &[String], entries: &[Rule]) -> Result<bool, String> {
    let table = parse_nat(&tools.save_nat()?);
    match table.removal_input(chains, entries) {
        None => Ok(false),
        Some(input) => tools.restore(&input).map(|()| true),
    }
}

/// What differs from `want` (empty: all present).
pub fn check(tools: &Tools, want: &RuleSet) -> Result<Vec<String>, String> {
    Ok(parse_nat(&tools.save_nat()?).missing(want))
}

#[cfg(test)]
mod tests {
    use super::*;
    use podwire_core::render::render;
    use podwire_core::{MeshProfile, RedirectSpec};
    use podwire_lab::{require_root, Netns};

    fn default_set(family: Family) -> RuleSet {
        let p = MeshProfile::istio();
        render(&RedirectSpec::defaults(&p), &p, family)
    }

    fn lock() -> PathBuf {
        std::env::temp_dir().join(format!("podwire-iptables-test-{}.lock", std::process::id()))
    }

    fn nat(ns: &Netns, family: Family) -> String {
        let bin = match family {
            Family::V4 => "iptables-nft-save",
            Family::V6 => "ip6tables-nft-save",
        };
        let out = ns
            .output(Command::new(bin).args(["-t", "nat"]))
            .expect("save");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn refused(_: &RuleSet) -> Result<(), NftFailure> {
        Err(NftFailure {
            errno: Some(nix::errno::Errno::EOPNOTSUPP),
            detail: "test: nf_tables refused the batch".into(),
        })
    }

    /// A batch the kernel refuses (here: EOPNOTSUPP, as without nf_tables or nft_compat)
    /// changes nothing, and iptables-restore programs the rules instead.
    #[test]
    fn a_refused_batch_falls_back_to_iptables_restore() {
        if !require_root() {
            return;
        }
        let lock = lock();
        for family in [Family::V4, Family::V6] {
            let set = default_set(family);
            // One ADD in `ns` with a fresh tool set, the batch sent by `program`.
            let add = |ns: &Netns, backend: Concrete, program: Programmer| {
                let tools = LazyTools::new(backend, family, &lock);
                ns.run(|| apply(&tools, &set, &[], Some(program), "test/pod"))
                    .expect("thread")
            };
            let (a, b) = (
                Netns::new("ft").expect("netns"),
                Netns::new("ft").expect("netns"),
            );
            let via = add(&a, Concrete::Nft, refused).expect("fallback programs the rules");
            assert_eq!(via, Applied::New(Via::Restore));
            let via = add(&b, Concrete::Nft, crate::nftables::program)
                .expect("netlink programs the rules");
            assert_eq!(via, Applied::New(Via::Netlink));
            assert_eq!(
                parse_nat(&nat(&a, family)).missing(&set),
                Vec::<String>::new()
            );
            // ADD again over netlink-written rules: the exec path sees them as present.
            let again = add(&b, Concrete::Nft, crate::nftables::program).expect("ADD again");
            assert_eq!(again, Applied::AlreadyPresent);
            // Legacy never takes the netlink path.
            let c = Netns::new("ft").expect("netns");
            let via = add(&c, Concrete::Legacy, refused);
            assert!(
                matches!(via, Ok(Applied::New(Via::Restore))),
                "legacy: {via:?}"
            );
        }
        let _ = std::fs::remove_file(&lock);
    }

    /// IPv6 fails on both paths (the ip6 nat table is owned by another socket: EPERM), so the
    /// IPv4 rules programmed just before are removed again and IPv6 is named.
    #[test]
    fn ipv6_failure_rolls_back_ipv4() {
        if !require_root() {
            return;
        }
        let lock = lock();
        let ns = Netns::new("rb").expect("netns");
        let owner = ns
            .run(|| crate::nftables::hold_table(Family::V6))
            .expect("thread")
            .expect("owned ip6 nat table");
        let sets = [default_set(Family::V4), default_set(Family::V6)];
        let tools = [
            LazyTools::new(Concrete::Nft, Family::V4, &lock),
            LazyTools::new(Concrete::Nft, Family::V6, &lock),
        ];
        let out = ns
            .run(|| {
                apply_all(
                    &tools,
                    &sets,
                    &[],
                    Some(crate::nftables::program),
                    "test/pod",
                )
            })
            .expect("thread");
        let (family, reason) = out.expect_err("IPv6 must fail");
        assert_eq!(family, Family::V6, "{reason}");
        let v4 = nat(&ns, Family::V4);
        assert!(
            v4.contains("*nat") && !v4.contains("ISTIO"),
            "IPv4 not rolled back:\n{v4}"
        );
        drop(owner);
        // Once the table is free again, the same call succeeds over netlink.
        let out = ns
            .run(|| {
                apply_all(
                    &tools,
                    &sets,
                    &[],
                    Some(crate::nftables::program),
                    "test/pod",
                )
            })
            .expect("thread")
            .expect("both families");
        assert_eq!(out, vec![Applied::New(Via::Netlink); 2]);
        let _ = std::fs::remove_file(&lock);
    }

    #[test]
    fn a_hung_tool_is_killed_at_the_deadline() {
        let started = std::time::Instant::now();
        let err = run(
            Command::new("sleep").arg("30"),
            b"",
            Duration::from_millis(300),
        )
        .expect_err("must time out");
        assert!(err.contains("did not finish within"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "killed, not waited for"
        );
    }

    #[test]
    fn output_and_errors_are_captured() {
        let out = run(&mut Command::new("cat"), b"*nat\nCOMMIT\n", TOOL_TIMEOUT).expect("cat");
        assert_eq!(out.stdout, b"*nat\nCOMMIT\n");
        let err = run(
            Command::new("sh").args(["-c", "echo boom >&2; exit 3"]),
            b"",
            TOOL_TIMEOUT,
        )
        .expect_err("fails");
        assert!(
            err.contains("boom") && err.contains("exit status: 3"),
            "{err}"
        );
    }
}
