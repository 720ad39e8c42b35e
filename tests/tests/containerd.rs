//! The kubelet path: containerd's CRI (Debian's containerd, runc) sets pod networks up the way
//! kubelet asks it to, over the same gRPC calls (`RunPodSandbox`, `PodSandboxStatus`,
//! `StopPodSandbox`, `RemovePodSandbox`). podwire-cni is chained into containerd's CNI conf dir
//! by the agent's real `install`, the agent answers look-ups from a pods directory, and the
//! pods' traffic is checked for real. containerd runs in a "node" netns of its own (its bridge
//! stays there) and in its own mount namespace.

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, ListPodSandboxRequest, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StopPodSandboxRequest,
};
use podwire_core::render::render;
use podwire_core::saved::parse_nat;
use podwire_core::{Family, MeshProfile, RedirectSpec};
use podwire_lab::bins::{cni_plugin_dir, workspace_bin};
use podwire_lab::lab::{agent_knows, pod_manifest, wait_for_socket, APP_PORT};
use podwire_lab::probe::{self, connect};
use podwire_lab::{require_root, Netns};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint, Uri};

const SUBNET: &str = "198.18.4.0/24";
const GATEWAY: &str = "198.18.4.1";
const PAUSE_IMAGE: &str = "podwire.test/pause:1";

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A sandbox image of our own (no registry here): busybox sleeping, as an OCI layout tar that
/// `ctr images import` takes.
fn pause_image(dir: &Path) -> PathBuf {
    let img = dir.join("image");
    let blobs = img.join("blobs/sha256");
    std::fs::create_dir_all(img.join("rootfs/bin")).expect("mkdir");
    std::fs::create_dir_all(&blobs).expect("mkdir");
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("busybox (apt-get install busybox-static)");
    std::fs::copy(busybox, img.join("rootfs/bin/busybox")).expect("copy busybox");
    let layer = dir.join("layer.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(img.join("rootfs"))
        .arg("-cf")
        .arg(&layer)
        .arg("."));
    let blob = |path: &Path| -> (String, u64) {
        let sum = run(Command::new("sha256sum").arg(path));
        let digest = sum.split_whitespace().next().expect("digest").to_string();
        let size = std::fs::metadata(path).expect("size").len();
        std::fs::rename(path, blobs.join(&digest)).expect("move blob");
        (digest, size)
    };
    let (layer_digest, layer_size) = blob(&layer);
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        json!({"architecture": "amd64", "os": "linux",
               "config": {"Entrypoint": ["/bin/busybox", "sleep", "2147483647"]},
               "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]}})
        .to_string(),
    )
    .expect("config");
    let (config_digest, config_size) = blob(&config);
    let manifest = dir.join("manifest.json");
    std::fs::write(
        &manifest,
        json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
               "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                          "digest": format!("sha256:{config_digest}"), "size": config_size},
               "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                           "digest": format!("sha256:{layer_digest}"), "size": layer_size}]})
        .to_string(),
    )
    .expect("manifest");
    let (manifest_digest, manifest_size) = blob(&manifest);
    std::fs::write(img.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("layout");
    std::fs::write(
        img.join("index.json"),
        json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"), "size": manifest_size,
            "annotations": {"io.containerd.image.name": PAUSE_IMAGE,
                            "org.opencontainers.image.ref.name": "1"}}]})
        .to_string(),
    )
    .expect("index");
    let tar = dir.join("pause.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&img)
        .arg("-cf")
        .arg(&tar)
        .args(["oci-layout", "index.json", "blobs"]));
    tar
}

/// A node: containerd + the agent serving a pods directory + podwire-cni chained by `install`.
struct Node {
    dir: tempfile::TempDir,
    netns: Netns,
    rt: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
    agent: Option<Killed>,
    _containerd: Killed,
}

impl Node {
    fn start() -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let netns = Netns::new("k").expect("node netns");
        for sub in ["bin", "net.d", "pods", "state"] {
            std::fs::create_dir_all(d.join(sub)).expect("mkdir");
        }
        for plugin in ["bridge", "host-local", "loopback"] {
            std::os::unix::fs::symlink(cni_plugin_dir().join(plugin), d.join("bin").join(plugin))
                .expect("symlink plugin");
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
        )
        .expect("primary conflist");
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
            .arg(d.join("state")));
        let chained =
            std::fs::read_to_string(d.join("net.d/10-podwire-lab.conflist")).expect("conflist");
        assert!(chained.contains("podwire-cni"), "{chained}");

        let config = d.join("containerd.toml");
        std::fs::write(&config, containerd_config(d)).expect("containerd config");
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
                .stderr(std::fs::File::create(d.join("containerd.log")).expect("log file"))
                .spawn()
                .expect("containerd (apt-get install containerd)"),
        );
        wait_for_socket(&socket, Duration::from_secs(30)).unwrap_or_else(|e| {
            panic!(
                "{e}: {}",
                std::fs::read_to_string(d.join("containerd.log")).unwrap_or_default()
            )
        });
        run(Command::new("ctr")
            .arg("--address")
            .arg(&socket)
            .args(["--namespace", "k8s.io", "images", "import"])
            .arg(pause_image(d)));

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let path = socket.clone();
        let channel = rt
            .block_on(
                Endpoint::try_from("http://[::]")
                    .expect("endpoint")
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    })),
            )
            .expect("connect to containerd's CRI");
        let mut node = Node {
            dir,
            netns,
            rt,
            client: RuntimeServiceClient::new(channel),
            agent: None,
            _containerd: containerd,
        };
        node.start_agent();
        node
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn start_agent(&mut self) {
        let child = Command::new(workspace_bin("podwire-agent"))
            .args(["--log-level", "warn", "serve", "--pods-dir"])
            .arg(self.path("pods"))
            .arg("--socket")
            .arg(self.path("agent.sock"))
            .stdout(Stdio::null())
            .spawn()
            .expect("podwire-agent serve");
        self.agent = Some(Killed(child));
        wait_for_socket(&self.path("agent.sock"), Duration::from_secs(10)).expect("agent");
    }

    /// The pod UIDs of the plugin's records (one per redirected attachment).
    fn recorded_uids(&self) -> Vec<String> {
        std::fs::read_dir(self.path("state/pods"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                    .filter_map(|e| std::fs::read(e.path()).ok())
                    .filter_map(|b| serde_json::from_slice::<Value>(&b).ok())
                    .filter_map(|r| r["uid"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn stop_agent(&mut self) {
        self.agent = None;
        let _ = std::fs::remove_file(self.path("agent.sock"));
    }

    fn publish(&self, pods: &[Value]) {
        for pod in pods {
            let name = pod["metadata"]["name"].as_str().expect("name");
            let tmp = self.path(&format!("{name}.json.tmp"));
            std::fs::write(&tmp, pod.to_string()).expect("write");
            std::fs::rename(&tmp, self.path(&format!("pods/{name}.json"))).expect("rename");
            let ns = pod["metadata"]["namespace"].as_str().expect("namespace");
            let deadline = Instant::now() + Duration::from_secs(5);
            while !agent_knows(&self.path("agent.sock"), ns, name).unwrap_or(false) {
                assert!(
                    Instant::now() < deadline,
                    "agent did not pick up {ns}/{name}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// RunPodSandbox shaped like kubelet's (pod network namespace, metadata, log dir).
    fn run_sandbox(&mut self, namespace: &str, name: &str) -> Result<String, tonic::Status> {
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
    fn sandbox(&mut self, id: &str) -> (String, Netns) {
        let status = self
            .rt
            .block_on(self.client.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: true,
            }))
            .expect("PodSandboxStatus")
            .into_inner();
        let ip = status
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .expect("sandbox network status");
        let info: Value =
            serde_json::from_str(status.info.get("info").expect("verbose info")).expect("json");
        let pid = info["pid"].as_u64().expect("sandbox pid");
        let netns = Netns::attach("s", u32::try_from(pid).expect("pid")).expect("attach");
        (ip, netns)
    }

    fn stop_and_remove(&mut self, id: &str, named: Netns) {
        drop(named);
        self.rt
            .block_on(self.client.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            }))
            .expect("StopPodSandbox");
        self.rt
            .block_on(self.client.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            }))
            .expect("RemovePodSandbox");
    }
}

impl Drop for Node {
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

fn native_sidecar_pod(namespace: &str, name: &str, uid: u32) -> Value {
    let mut pod = pod_manifest(namespace, name, true, &[]);
    pod["spec"] = json!({
        "initContainers": [{"name": "istio-proxy", "image": "proxy:1", "restartPolicy": "Always",
            "securityContext": {"runAsUser": uid, "runAsGroup": uid}}],
        "containers": [{"name": "app", "image": "app:1"}],
    });
    pod
}

#[test]
fn containerd_cri_sets_up_mesh_pods_through_podwire() {
    if !require_root() {
        return;
    }
    let mut node = Node::start();
    node.publish(&[
        pod_manifest("shop", "web", true, &[]),
        native_sidecar_pod("shop", "native", 2100),
        pod_manifest("shop", "plain", false, &[]),
    ]);
    probe::listen(&node.netns, &probe::any(false, APP_PORT), "NODE").expect("node server");
    let upstream = format!("{GATEWAY}:{APP_PORT}");
    let p = MeshProfile::istio();
    let want = render(&RedirectSpec::defaults(&p), &p, Family::V4);

    // A classic mesh pod: Istio's reference rules, outbound traffic reaches the proxy.
    let web = node.run_sandbox("shop", "web").expect("RunPodSandbox web");
    let (web_ip, web_ns) = node.sandbox(&web);
    assert!(web_ip.starts_with("198.18.4."), "{web_ip}");
    let saved = web_ns.nat_rules("iptables-save").expect("save");
    assert_eq!(
        parse_nat(&saved).missing(&want),
        Vec::<String>::new(),
        "{saved}"
    );
    probe::start_proxy(&web_ns, false).expect("proxy");
    let seen = connect(&web_ns, &upstream).expect("outbound");
    assert_eq!(
        (seen.label.as_str(), seen.orig.as_str()),
        ("PROXY-OUT", upstream.as_str())
    );

    // Istio's native-sidecar layout: redirected, the proxy's uid from the init container.
    let native = node
        .run_sandbox("shop", "native")
        .expect("RunPodSandbox native");
    let (_, native_ns) = node.sandbox(&native);
    let saved = native_ns.nat_rules("iptables-save").expect("save");
    assert!(saved.contains("-A OUTPUT -j ISTIO_OUTPUT"), "{saved}");
    assert!(saved.contains("--uid-owner 2100"), "{saved}");

    // A plain pod is left alone.
    let plain = node
        .run_sandbox("shop", "plain")
        .expect("RunPodSandbox plain");
    let (_, plain_ns) = node.sandbox(&plain);
    let saved = plain_ns.nat_rules("iptables-save").expect("save");
    assert!(!saved.contains("ISTIO_"), "{saved}");
    let seen = connect(&plain_ns, &upstream).expect("plain outbound");
    assert_eq!(seen.label, "NODE");

    let mut uids = node.recorded_uids();
    uids.sort();
    assert_eq!(
        uids,
        ["uid-native", "uid-web"],
        "one record per redirected pod"
    );

    // Stop and Remove (containerd calls DEL, the second time without a netns): clean.
    for (id, ns) in [(web, web_ns), (native, native_ns), (plain, plain_ns)] {
        node.stop_and_remove(&id, ns);
    }
    assert_eq!(node.recorded_uids(), Vec::<String>::new());
    let log = std::fs::read_to_string(node.path("podwire-cni.log")).unwrap_or_default();
    assert!(!log.contains("ERROR"), "{log}");

    // failurePolicy closed: with the agent down the sandbox is refused with code 11, and the
    // retry (kubelet's next attempt) succeeds once the agent is back.
    node.publish(&[pod_manifest("shop", "late", true, &[])]);
    node.stop_agent();
    let err = node
        .run_sandbox("shop", "late")
        .expect_err("a pod whose mesh status is unknown must not start");
    assert!(
        err.message().contains("podwire-cni") && err.message().contains("try again later"),
        "{err:?}"
    );
    node.start_agent();
    let late = node.run_sandbox("shop", "late").expect("retry succeeds");
    let (_, late_ns) = node.sandbox(&late);
    assert!(late_ns
        .nat_rules("iptables-save")
        .expect("save")
        .contains("-A OUTPUT -j ISTIO_OUTPUT"));
    node.stop_and_remove(&late, late_ns);
}
