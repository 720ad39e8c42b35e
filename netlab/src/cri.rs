//! A Kubernetes node's runtime side, for real: Debian's containerd (CRI plugin built in) in its
//! own network and mount namespace, a local sandbox image, podwire-cni chained into its CNI
//! config by the agent's real `install`, the agent serving a pods directory, and a CRI client
//! making kubelet's own gRPC calls (`RunPodSandbox`, `PodSandboxStatus`, `StopPodSandbox`,
//! `RemovePodSandbox`). What `podwire demo --runtime containerd` shows and the CRI test lane
//! drives.
//!
//! On a VM runc may not lower `oom_score_adj` below its caller's: the config sets
//! `restrict_oom_score_adj = true`. containerd runs in its own mount namespace so the
//! sandboxes' netns mounts stay there.

use crate::bins::{cni_plugin_dir, workspace_bin};
use crate::lab::{agent_knows, wait_for_socket};
use crate::netns::Netns;
use anyhow::{anyhow, bail, Context, Result};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, ListPodSandboxRequest, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StopPodSandboxRequest,
};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint, Uri};

/// The pods' subnet on the node's bridge, and the bridge's (the node's) address.
pub const SUBNET: &str = "198.18.4.0/24";
pub const GATEWAY: &str = "198.18.4.1";
const PAUSE_IMAGE: &str = "podwire.test/pause:1";

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A sandbox image of our own (no registry here): busybox sleeping, as an OCI layout tar that
/// `ctr images import` takes.
fn pause_image(dir: &Path) -> Result<PathBuf> {
    let img = dir.join("image");
    let blobs = img.join("blobs/sha256");
    std::fs::create_dir_all(img.join("rootfs/bin"))?;
    std::fs::create_dir_all(&blobs)?;
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .context("busybox is missing (apt-get install busybox-static)")?;
    std::fs::copy(busybox, img.join("rootfs/bin/busybox"))?;
    let layer = dir.join("layer.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(img.join("rootfs"))
        .arg("-cf")
        .arg(&layer)
        .arg("."))?;
    let blob = |path: &Path| -> Result<(String, u64)> {
        let sum = run(Command::new("sha256sum").arg(path))?;
        let digest = sum
            .split_whitespace()
            .next()
            .context("sha256sum output")?
            .to_string();
        let size = std::fs::metadata(path)?.len();
        std::fs::rename(path, blobs.join(&digest))?;
        Ok((digest, size))
    };
    let (layer_digest, layer_size) = blob(&layer)?;
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        json!({"architecture": "amd64", "os": "linux",
               "config": {"Entrypoint": ["/bin/busybox", "sleep", "2147483647"]},
               "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]}})
        .to_string(),
    )?;
    let (config_digest, config_size) = blob(&config)?;
    let manifest = dir.join("manifest.json");
    std::fs::write(
        &manifest,
        json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
               "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                          "digest": format!("sha256:{config_digest}"), "size": config_size},
               "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                           "digest": format!("sha256:{layer_digest}"), "size": layer_size}]})
        .to_string(),
    )?;
    let (manifest_digest, manifest_size) = blob(&manifest)?;
    std::fs::write(img.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    std::fs::write(
        img.join("index.json"),
        json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"), "size": manifest_size,
            "annotations": {"io.containerd.image.name": PAUSE_IMAGE,
                            "org.opencontainers.image.ref.name": "1"}}]})
        .to_string(),
    )?;
    let tar = dir.join("pause.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&img)
        .arg("-cf")
        .arg(&tar)
        .args(["oci-layout", "index.json", "blobs"]))?;
    Ok(tar)
}

/// A node: containerd + the agent serving a pods directory + podwire-cni chained by `install`.
pub struct CriNode {
    dir: tempfile::TempDir,
    /// The node's network namespace (containerd and the bridge live there).
    pub netns: Netns,
    rt: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
    agent: Option<Killed>,
    _containerd: Killed,
}

impl std::fmt::Debug for CriNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CriNode")
            .field("dir", &self.dir.path())
            .field("netns", &self.netns.name)
            .finish_non_exhaustive()
    }
}

impl CriNode {
    /// containerd up with its CRI socket answering, the sandbox image imported, podwire-cni
    /// chained, the agent serving.
    pub fn start() -> Result<CriNode> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        let netns = Netns::new("k")?;
        for sub in ["bin", "net.d", "pods", "state"] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        for plugin in ["bridge", "host-local", "loopback"] {
            std::os::unix::fs::symlink(cni_plugin_dir().join(plugin), d.join("bin").join(plugin))?;
        }
        // The node's primary CNI config, as a cluster's network add-on would leave it.
        std::fs::write(
            d.join("net.d/10-podwire-lab.conflist"),
            json!({"cniVersion": "1.0.0", "name": "podwire-lab", "plugins": [{
                "type": "bridge", "bridge": "pwbr0", "isGateway": true, "ipMasq": false,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET}]],
                         "dataDir": d.join("ipam").display().to_string(),
                         "routes": [{"dst": "0.0.0.0/0"}]}}]})
            .to_string(),
        )?;
        // The agent's real install chains podwire-cni into it.
        run(Command::new(workspace_bin("podwire-agent"))
            .args(["--log-level", "warn", "install", "--cni-bin-dir"])
            .arg(d.join("bin"))
            .arg("--cni-conf-dir")
            .arg(d.join("net.d"))
            .arg("--plugin-binary")
            .arg(workspace_bin("podwire-cni"))
            .arg("--agent-socket")
            .arg(d.join("agent.sock"))
            .arg("--plugin-log-file")
            .arg(d.join("podwire-cni.log"))
            .arg("--state-dir")
            .arg(d.join("state")))?;
        let chained = std::fs::read_to_string(d.join("net.d/10-podwire-lab.conflist"))?;
        if !chained.contains("podwire-cni") {
            bail!("podwire-agent install did not chain podwire-cni: {chained}");
        }

        let config = d.join("containerd.toml");
        std::fs::write(&config, containerd_config(d))?;
        let socket = d.join("containerd.sock");
        let containerd = Killed(
            // Its own mount namespace (the sandboxes' netns mounts stay there) over the host's
            // mounts (runc needs the cgroup mounts `ip netns exec` would hide).
            Command::new("unshare")
                .args(["--mount", "--propagation", "private", "nsenter"])
                .arg(format!("--net={}", netns.path().display()))
                .args(["containerd", "--config"])
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(d.join("containerd.log"))?)
                .spawn()
                .context("starting containerd (apt-get install containerd)")?,
        );
        wait_for_socket(&socket, Duration::from_secs(30)).map_err(|e| {
            anyhow!(
                "{e}: {}",
                std::fs::read_to_string(d.join("containerd.log")).unwrap_or_default()
            )
        })?;
        run(Command::new("ctr")
            .arg("--address")
            .arg(&socket)
            .args(["--namespace", "k8s.io", "images", "import"])
            .arg(pause_image(d)?))?;

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let path = socket.clone();
        let channel =
            rt.block_on(Endpoint::try_from("http://[::]")?.connect_with_connector(
                tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }),
            ))
            .context("connecting to containerd's CRI socket")?;
        let mut node = CriNode {
            dir,
            netns,
            rt,
            client: RuntimeServiceClient::new(channel),
            agent: None,
            _containerd: containerd,
        };
        node.start_agent()?;
        Ok(node)
    }

    /// A path in the node's directory (`podwire-cni.log`, `state/pods`, ...).
    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// `podwire-agent serve` on the pods directory.
    pub fn start_agent(&mut self) -> Result<()> {
        let child = Command::new(workspace_bin("podwire-agent"))
            .args(["--log-level", "warn", "serve", "--pods-dir"])
            .arg(self.path("pods"))
            .arg("--socket")
            .arg(self.path("agent.sock"))
            .stdout(Stdio::null())
            .spawn()
            .context("starting podwire-agent serve")?;
        self.agent = Some(Killed(child));
        wait_for_socket(&self.path("agent.sock"), Duration::from_secs(10))
    }

    /// The pod UIDs of the plugin's records (one per redirected attachment).
    pub fn recorded_uids(&self) -> Vec<String> {
        std::fs::read_dir(podwire_core::node::records_dir(&self.path("state")))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                    .filter_map(|e| std::fs::read(e.path()).ok())
                    .filter_map(|b| serde_json::from_slice::<podwire_core::node::Record>(&b).ok())
                    .map(|r| r.uid)
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn stop_agent(&mut self) {
        self.agent = None;
        let _ = std::fs::remove_file(self.path("agent.sock"));
    }

    /// Put pods in the agent's directory and wait until it answers for each.
    pub fn publish(&self, pods: &[Value]) -> Result<()> {
        for pod in pods {
            let name = pod["metadata"]["name"]
                .as_str()
                .context("pod without a name")?;
            let tmp = self.path(&format!("{name}.json.tmp"));
            std::fs::write(&tmp, pod.to_string())?;
            std::fs::rename(&tmp, self.path(&format!("pods/{name}.json")))?;
            let ns = pod["metadata"]["namespace"]
                .as_str()
                .context("pod without a namespace")?;
            let deadline = Instant::now() + Duration::from_secs(5);
            while !agent_knows(&self.path("agent.sock"), ns, name).unwrap_or(false) {
                if Instant::now() > deadline {
                    bail!("podwire-agent did not pick up {ns}/{name} within 5s");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// RunPodSandbox shaped like kubelet's (pod network namespace, metadata, log dir).
    pub fn run_sandbox(&mut self, namespace: &str, name: &str) -> Result<String, tonic::Status> {
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: self.path("logs").display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: 0, // POD
                        pid: 1,     // CONTAINER
                        ipc: 0,     // POD
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let req = RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        };
        self.rt
            .block_on(self.client.run_pod_sandbox(req))
            .map(|r| r.into_inner().pod_sandbox_id)
    }

    /// The sandbox's IP and its network namespace, named for the test.
    pub fn sandbox(&mut self, id: &str) -> Result<(String, Netns)> {
        let status = self
            .rt
            .block_on(self.client.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: true,
            }))
            .context("PodSandboxStatus")?
            .into_inner();
        let ip = status
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .context("the sandbox has no network status")?;
        let info: Value =
            serde_json::from_str(status.info.get("info").context("no verbose info")?)?;
        let pid = info["pid"]
            .as_u64()
            .context("no sandbox pid in the verbose info")?;
        let netns = Netns::attach("s", u32::try_from(pid)?)?;
        Ok((ip, netns))
    }

    /// StopPodSandbox then RemovePodSandbox, as kubelet does.
    pub fn stop_and_remove(&mut self, id: &str, named: Netns) -> Result<()> {
        drop(named);
        self.rt
            .block_on(self.client.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            }))
            .context("StopPodSandbox")?;
        self.rt
            .block_on(self.client.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            }))
            .context("RemovePodSandbox")?;
        Ok(())
    }
}

impl Drop for CriNode {
    /// Whatever happened, no sandbox (pause process, shim) outlives the test.
    fn drop(&mut self) {
        let listed = self.rt.block_on(
            self.client
                .list_pod_sandbox(ListPodSandboxRequest { filter: None }),
        );
        for sandbox in listed.map(|r| r.into_inner().items).unwrap_or_default() {
            let id = sandbox.id;
            let _ = self
                .rt
                .block_on(self.client.stop_pod_sandbox(StopPodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                }));
            let _ = self.rt.block_on(
                self.client
                    .remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id }),
            );
        }
    }
}

fn containerd_config(d: &Path) -> String {
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.internal.v1.opt", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # runc cannot lower oom_score_adj below the caller's on this VM.
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{netd}"
"#,
        root = d.join("root").display(),
        state = d.join("run").display(),
        sock = d.join("containerd.sock").display(),
        bin = d.join("bin").display(),
        netd = d.join("net.d").display(),
    )
}
