//! podman as the CNI runtime: a private podman (its own containers.conf, storage, tmp dir,
//! file locks and CNI config dir) running `--rootfs` busybox containers on a conflist that
//! chains Debian's bridge + host-local + portmap and then podwire-cni, with a `podwire-agent
//! serve` answering the plugin's look-ups.
//!
//! podman runs inside a "node" namespace the testbed creates, so the bridge and the pod
//! subnet never appear on the machine's own network. Everything lives under one directory
//! that is removed, with the containers, the agent and the namespace, on drop.

use crate::bins::{cni_plugin_dir, workspace_bin};
use crate::Netns;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::fmt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The CNI network podman is asked for (`--network`).
pub const NETWORK: &str = "pwpm";
/// The bridge, inside the node namespace.
pub const BRIDGE: &str = "pwpm0";
pub const SUBNET_V4: &str = "198.19.7.0/24";
/// How long one podman command may take before it is killed.
pub const PODMAN_TIMEOUT: Duration = Duration::from_secs(30);

/// One finished podman command, printable as the whole story for an assertion message.
#[derive(Debug, Clone)]
pub struct PodmanOut {
    pub cmdline: String,
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl fmt::Display for PodmanOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` exited {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline, self.code, self.stdout, self.stderr
        )
    }
}

/// The settings that make podman 4.3 run a `--rootfs` container on this kind of machine
/// (hybrid cgroups, capped open-files limit), plus full isolation from the node's podman.
pub fn containers_conf(plugin_dirs: &[PathBuf], conf_dir: &Path, tmp_dir: &Path) -> String {
    let dirs: Vec<String> = plugin_dirs
        .iter()
        .map(|d| format!("{:?}", d.display().to_string()))
        .collect();
    format!(
        "[containers]\n\
         default_ulimits = []\n\
         \n\
         [network]\n\
         network_backend = \"cni\"\n\
         cni_plugin_dirs = [{}]\n\
         network_config_dir = {:?}\n\
         \n\
         [engine]\n\
         runtime = \"runc\"\n\
         cgroup_manager = \"cgroupfs\"\n\
         events_logger = \"file\"\n\
         lock_type = \"file\"\n\
         tmp_dir = {:?}\n",
        dirs.join(", "),
        conf_dir.display().to_string(),
        tmp_dir.display().to_string(),
    )
}

/// bridge + host-local + portmap, then `podwire` (the plugin's conflist entry).
pub fn conflist(ipam_dir: &Path, podwire: Value) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": SUBNET_V4 }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": ipam_dir.display().to_string()
                }
            },
            { "type": "portmap", "capabilities": { "portMappings": true } },
            podwire
        ]
    })
}

/// A root filesystem holding only a static busybox and its applet links.
pub fn busybox_rootfs(dir: &Path) -> Result<()> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .context("busybox is missing: apt-get install busybox-static")?;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    for d in ["etc", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::copy(busybox, bin.join("busybox"))
        .with_context(|| format!("copy {}", busybox.display()))?;
    for applet in ["sh", "sleep", "ip", "cat", "ls", "nc", "wget", "true"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet))?;
    }
    Ok(())
}

/// A private podman, a running agent and the node namespace podman runs in.
#[derive(Debug)]
pub struct PodmanLab {
    pub node: Netns,
    pub dir: PathBuf,
    agent: Option<Child>,
    runs: AtomicU32,
}

impl PodmanLab {
    /// Lay out the directory, write the configuration, put `pods` in the agent's pods
    /// directory (one JSON file each, named after the pod) and start the agent.
    pub fn new(pods: &[Value]) -> Result<PodmanLab> {
        let node = Netns::new("m")?;
        let dir = std::env::temp_dir().join(format!("podwire-podman-{}", node.name));
        let mut lab = PodmanLab {
            node,
            dir,
            agent: None,
            runs: AtomicU32::new(0),
        };
        for d in [
            "pods", "conf", "tmp", "root", "runroot", "ipam", "state", "rootfs", "out",
        ] {
            std::fs::create_dir_all(lab.dir.join(d))?;
        }
        busybox_rootfs(&lab.rootfs())?;
        for pod in pods {
            let name = pod["metadata"]["name"].as_str().unwrap_or("pod");
            std::fs::write(
                lab.dir.join("pods").join(format!("{name}.json")),
                serde_json::to_vec_pretty(pod)?,
            )?;
        }
        let plugin = workspace_bin("podwire-cni");
        let plugin_dirs = vec![
            cni_plugin_dir(),
            plugin
                .parent()
                .map(Path::to_path_buf)
                .context("podwire-cni has no parent directory")?,
        ];
        std::fs::write(
            lab.containers_conf(),
            containers_conf(&plugin_dirs, &lab.dir.join("conf"), &lab.dir.join("tmp")),
        )?;
        let podwire = json!({
            "type": "podwire-cni",
            "agentSocket": lab.socket().display().to_string(),
            "stateDir": lab.dir.join("state").display().to_string(),
            "logFile": lab.plugin_log_path().display().to_string(),
        });
        std::fs::write(
            lab.dir.join("conf").join(format!("{NETWORK}.conflist")),
            serde_json::to_vec_pretty(&conflist(&lab.dir.join("ipam"), podwire))?,
        )?;
        let agent_log = std::fs::File::create(lab.dir.join("agent.log"))?;
        lab.agent = Some(
            Command::new(workspace_bin("podwire-agent"))
                .args(["serve", "--pods-dir"])
                .arg(lab.dir.join("pods"))
                .arg("--socket")
                .arg(lab.socket())
                .stdout(Stdio::null())
                .stderr(agent_log)
                .spawn()
                .context("starting podwire-agent serve")?,
        );
        lab.wait_agent(pods)?;
        Ok(lab)
    }

    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    pub fn containers_conf(&self) -> PathBuf {
        self.dir.join("containers.conf")
    }

    pub fn plugin_log_path(&self) -> PathBuf {
        self.dir.join("podwire-cni.log")
    }

    pub fn plugin_log(&self) -> String {
        std::fs::read_to_string(self.plugin_log_path()).unwrap_or_default()
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Addresses host-local currently holds for the network.
    pub fn leased_ips(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("ipam").join(NETWORK)) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
            .collect()
    }

    /// The socket accepts connections and the agent knows every pod of `pods`.
    fn wait_agent(&mut self, pods: &[Value]) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut pending: Vec<(String, String)> = pods
            .iter()
            .map(|p| {
                let m = &p["metadata"];
                (
                    m["namespace"].as_str().unwrap_or("default").to_string(),
                    m["name"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        loop {
            if let Some(agent) = self.agent.as_mut() {
                if let Some(status) = agent.try_wait()? {
                    bail!(
                        "podwire-agent serve exited ({status}):\n{}",
                        self.agent_log()
                    );
                }
            }
            if UnixStream::connect(self.socket()).is_ok() {
                let mut still = Vec::new();
                for (ns, name) in pending {
                    if !self.agent_knows(&ns, &name)? {
                        still.push((ns, name));
                    }
                }
                pending = still;
                if pending.is_empty() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "podwire-agent did not serve {} on {} within 10s (still unknown: {pending:?}):\n{}",
                    self.dir.join("pods").display(),
                    self.socket().display(),
                    self.agent_log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ask the agent the way the plugin does; true when it knows the pod.
    pub fn agent_knows(&self, namespace: &str, name: &str) -> Result<bool> {
        crate::lab::agent_knows(&self.socket(), namespace, name)
    }

    /// `podman <global isolation flags> args...`, run from inside the node namespace, killed
    /// after [`PODMAN_TIMEOUT`].
    pub fn podman(&self, args: &[&str]) -> Result<PodmanOut> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst);
        let out_path = self.dir.join("out").join(format!("{n}.stdout"));
        let err_path = self.dir.join("out").join(format!("{n}.stderr"));
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", self.containers_conf())
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .stdin(Stdio::null())
            // Files, not pipes: conmon outlives `podman run -d` and must not hold our reads.
            .stdout(std::fs::File::create(&out_path)?)
            .stderr(std::fs::File::create(&err_path)?);
        let cmdline = format!("podman {}", args.join(" "));
        let mut child = self
            .node
            .run(|| cmd.spawn())?
            .with_context(|| format!("spawn {cmdline} (apt-get install podman runc)"))?;
        let deadline = Instant::now() + PODMAN_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        if status.is_none() {
            stderr.push_str(&format!("\n[killed after {}s]", PODMAN_TIMEOUT.as_secs()));
        }
        Ok(PodmanOut {
            cmdline,
            ok: status.is_some_and(|s| s.success()),
            code: status.and_then(|s| s.code()),
            stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
            stderr,
        })
    }

    /// `podman run -d --name NAME --network pwpm --rootfs <busybox> args...`
    pub fn run_detached(&self, name: &str, args: &[&str]) -> Result<PodmanOut> {
        let rootfs = self.rootfs().display().to_string();
        let mut all = vec![
            "run",
            "-d",
            "--name",
            name,
            "--network",
            NETWORK,
            "--rootfs",
            &rootfs,
        ];
        all.extend_from_slice(args);
        self.podman(&all)
    }

    /// `podman inspect -f FORMAT NAME`, trimmed.
    pub fn inspect(&self, name: &str, format: &str) -> Result<String> {
        let out = self.podman(&["inspect", "-f", format, name])?;
        if !out.ok {
            bail!("{out}");
        }
        Ok(out.stdout.trim().to_string())
    }

    /// The container's network namespace: podman's bind mount, else its pid's.
    pub fn netns_path(&self, name: &str) -> Result<PathBuf> {
        let key = self.inspect(name, "{{.NetworkSettings.SandboxKey}}")?;
        if !key.is_empty() && Path::new(&key).exists() {
            return Ok(PathBuf::from(key));
        }
        let pid = self.inspect(name, "{{.State.Pid}}")?;
        match pid.parse::<u32>() {
            Ok(pid) if pid > 0 => Ok(PathBuf::from(format!("/proc/{pid}/ns/net"))),
            _ => bail!("container {name} has no netns (SandboxKey {key:?}, pid {pid:?})"),
        }
    }

    /// The container's first IPv4 address on the network.
    pub fn ip(&self, name: &str) -> Result<String> {
        self.inspect(
            name,
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        )
    }

    /// `iptables-save -t nat` inside a container's network namespace.
    pub fn nat_rules(&self, name: &str) -> Result<String> {
        let path = self.netns_path(name)?;
        let out = Command::new("nsenter")
            .arg(format!("--net={}", path.display()))
            .args(["iptables-save", "-t", "nat"])
            .output()
            .context("nsenter (util-linux) / iptables-save (iptables)")?;
        if !out.status.success() {
            bail!(
                "nsenter --net={} iptables-save -t nat: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Mounts left under the lab directory (podman's shm mounts when a removal failed).
    fn detach_mounts(&self) {
        let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        let mut points: Vec<&str> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| Path::new(p).starts_with(&self.dir))
            .collect();
        // Deepest first.
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

impl Drop for PodmanLab {
    fn drop(&mut self) {
        if self.containers_conf().exists() {
            let _ = self.podman(&["rm", "--all", "--force", "--time", "0"]);
        }
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        self.detach_mounts();
        let _ = std::fs::remove_dir_all(&self.dir);
        // `node` (and with it the bridge) goes when the field is dropped.
    }
}
