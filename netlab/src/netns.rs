//! Named network namespaces, removed on drop, and running code inside them.

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};
use std::fs::File;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// `ip netns add pw<prefix><pid><n>` with loopback up.
    pub fn new(prefix: &str) -> Result<Netns> {
        let name = format!(
            "pw{prefix}{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .context("running ip")?;
        if !out.status.success() {
            bail!(
                "ip netns add {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Name the network namespace of process `pid` (a runtime's sandbox) `pw<prefix>...` with
    /// `ip netns attach`; dropping it removes only the name.
    pub fn attach(prefix: &str, pid: u32) -> Result<Netns> {
        let name = format!(
            "pw{prefix}{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let out = Command::new("ip")
            .args(["netns", "attach", &name, &pid.to_string()])
            .output()
            .context("running ip")?;
        if !out.status.success() {
            bail!(
                "ip netns attach {name} {pid}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Netns { name })
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// `ip -n NAME ...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "ip -n {} {}: {}",
                self.name,
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Run `f` on a thread inside this namespace (sockets created there stay there).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let target =
            File::open(self.path()).with_context(|| format!("open {}", self.path().display()))?;
        std::thread::scope(|s| {
            s.spawn(|| -> Result<T> {
                setns(&target, CloneFlags::CLONE_NEWNET).context("setns")?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns {} panicked", self.name))?
        })
    }

    /// A command run inside the namespace (spawned from a thread that entered it).
    pub fn output(&self, cmd: &mut Command) -> Result<std::process::Output> {
        self.run(|| cmd.output())?.context("spawn in netns")
    }

    /// Set a sysctl of this namespace (`net.ipv6.conf.all.accept_dad` style).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.run(|| std::fs::write(&path, value))?
            .with_context(|| format!("sysctl {key}"))
    }

    /// `iptables-save -t nat` (or ip6tables) output in this namespace.
    pub fn nat_rules(&self, save_bin: &str) -> Result<String> {
        let out = self.output(Command::new(save_bin).args(["-t", "nat"]))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
