//! A whole node in a box: a "node" namespace holding the bridge, a running `podwire-agent
//! serve` reading a pods directory, and the conflist bridge + host-local + podwire-cni.

use crate::bins::{cni_plugin_dir, workspace_bin};
use crate::chain::{lab_conflist, result_ip, Attachment, Chain, CniOutcome};
use crate::{probe, Netns};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const NODE_V4: &str = "198.18.0.1";
pub const SUBNET_V4: &str = "198.18.0.0/24";
pub const NODE_V6: &str = "2001:2::1";
pub const SUBNET_V6: &str = "2001:2::/64";
/// The port of the "app" in every pod and of the node's server.
pub const APP_PORT: u16 = 8080;

#[derive(Debug)]
pub struct Lab {
    pub node: Netns,
    pub dir: PathBuf,
    pub chain: Chain,
    pub ipv6: bool,
    agent: Child,
}

#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub netns: Netns,
    pub result: Value,
    pub ip4: String,
    pub ip6: Option<String>,
}

impl Pod {
    pub fn container_id(&self) -> String {
        self.netns.name.clone()
    }
}

/// A pod manifest as the injector would leave it (mesh) or a plain one.
pub fn pod_manifest(
    namespace: &str,
    name: &str,
    mesh: bool,
    annotations: &[(&str, &str)],
) -> Value {
    let mut containers = vec![json!({"name": "app", "image": "app:1"})];
    let mut ann = serde_json::Map::new();
    if mesh {
        containers.push(json!({"name": "istio-proxy", "image": "proxy:1",
            "securityContext": {"runAsUser": 1337, "runAsGroup": 1337}}));
        ann.insert(
            "sidecar.istio.io/status".into(),
            json!("{\"containers\":[\"istio-proxy\"]}"),
        );
    }
    for (k, v) in annotations {
        ann.insert(k.to_string(), json!(v));
    }
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"), "annotations": ann},
           "spec": {"containers": containers}})
}

/// Wait until something accepts connections on the Unix socket at `path`.
pub fn wait_for_socket(path: &Path, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while UnixStream::connect(path).is_err() {
        if Instant::now() > deadline {
            bail!("nothing answers on {} after {limit:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Ask the agent on `socket` the way the plugin does; true when it knows the pod.
pub fn agent_knows(socket: &Path, namespace: &str, name: &str) -> Result<bool> {
    let mut s = UnixStream::connect(socket)?;
    writeln!(
        s,
        "{}",
        json!({"v": 1, "namespace": namespace, "name": name})
    )?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line.contains("\"found\""))
}

impl Lab {
    /// `extra` is merged into podwire's conflist entry.
    pub fn new(ipv6: bool, extra: Value) -> Result<Lab> {
        let node = Netns::new("n")?;
        if ipv6 {
            node.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
            node.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        }
        let dir = std::env::temp_dir().join(format!("podwire-lab-{}", node.name));
        std::fs::create_dir_all(dir.join("pods"))?;
        let socket = dir.join("agent.sock");
        let agent = Command::new(workspace_bin("podwire-agent"))
            .args(["serve", "--pods-dir"])
            .arg(dir.join("pods"))
            .arg("--socket")
            .arg(&socket)
            .args(["--log-level", "warn"])
            .stdout(Stdio::null())
            .spawn()
            .context("starting podwire-agent serve")?;
        let mut podwire = json!({
            "type": "podwire-cni",
            "agentSocket": socket.display().to_string(),
            "stateDir": dir.join("state").display().to_string(),
            "logFile": dir.join("podwire-cni.log").display().to_string(),
            "logLevel": "warn",
        });
        if let (Some(obj), Some(extra)) = (podwire.as_object_mut(), extra.as_object()) {
            obj.extend(extra.clone());
        }
        let plugin = workspace_bin("podwire-cni");
        let conflist = lab_conflist(
            "podwire-lab",
            &dir.join("ipam"),
            SUBNET_V4,
            ipv6.then_some(SUBNET_V6),
            podwire,
        );
        let chain = Chain {
            conflist,
            paths: vec![
                cni_plugin_dir(),
                plugin.parent().map(Path::to_path_buf).unwrap_or_default(),
            ],
        };
        let lab = Lab {
            node,
            dir,
            chain,
            ipv6,
            agent,
        };
        lab.wait_agent()?;
        // The node's server: what un-redirected outbound traffic reaches.
        probe::listen(&lab.node, &probe::any(ipv6, APP_PORT), "NODE")?;
        Ok(lab)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    fn wait_agent(&self) -> Result<()> {
        wait_for_socket(&self.socket(), Duration::from_secs(10))
    }

    /// Ask the agent the way the plugin does; true when it knows the pod.
    pub fn agent_knows(&self, namespace: &str, name: &str) -> Result<bool> {
        agent_knows(&self.socket(), namespace, name)
    }

    /// Put manifests in the agent's pods directory and wait until it serves the last one.
    pub fn publish(&self, file: &str, pods: &[Value]) -> Result<()> {
        let text: Vec<String> = pods.iter().map(|p| p.to_string()).collect();
        let tmp = self.dir.join(format!(".{file}.tmp"));
        // JSON files hold values one after another; YAML files documents split by `---`.
        let sep = if file.ends_with(".json") {
            "\n"
        } else {
            "\n---\n"
        };
        std::fs::write(&tmp, text.join(sep))?;
        std::fs::rename(&tmp, self.dir.join("pods").join(file))?;
        let Some(last) = pods.last() else {
            return Ok(());
        };
        let (ns, name) = (
            last["metadata"]["namespace"].as_str().unwrap_or("default"),
            last["metadata"]["name"].as_str().unwrap_or_default(),
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.agent_knows(ns, name)? {
            if Instant::now() > deadline {
                bail!("the agent did not pick up {ns}/{name} within 5s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn attachment(
        &self,
        pod_ns: &Netns,
        namespace: &str,
        name: &str,
    ) -> (String, PathBuf, String) {
        (
            pod_ns.name.clone(),
            pod_ns.path(),
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_UID=uid-{name}"),
        )
    }

    /// Create a pod namespace and run ADD through the chain. `Err((plugin, outcome))` when a
    /// plugin refused.
    pub fn add_pod(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<std::result::Result<Pod, (String, CniOutcome, Netns)>> {
        let netns = Netns::new("p")?;
        if self.ipv6 {
            netns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
            netns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        }
        let (cid, path, args) = self.attachment(&netns, namespace, name);
        let a = Attachment {
            container_id: &cid,
            netns: &path,
            ifname: "eth0",
            cni_args: args,
        };
        match self.chain.add(&self.node, &a)? {
            Ok(result) => {
                let ip4 = result_ip(&result, false).context("no IPv4 address in the CNI result")?;
                let ip6 = result_ip(&result, true);
                Ok(Ok(Pod {
                    name: name.into(),
                    namespace: namespace.into(),
                    netns,
                    result,
                    ip4,
                    ip6,
                }))
            }
            Err((plugin, out)) => Ok(Err((plugin, out, netns))),
        }
    }

    /// ADD that must succeed; also starts the pod's app on APP_PORT.
    pub fn start_pod(&self, namespace: &str, name: &str) -> Result<Pod> {
        match self.add_pod(namespace, name)? {
            Ok(pod) => {
                probe::listen(&pod.netns, &probe::any(self.ipv6, APP_PORT), "APP")?;
                Ok(pod)
            }
            Err((plugin, out, _)) => bail!("ADD failed in {plugin}: {} {}", out.stdout, out.stderr),
        }
    }

    /// Run DEL or CHECK for a pod through the whole chain.
    pub fn run(&self, command: &str, pod: &Pod) -> Result<Vec<(String, CniOutcome)>> {
        let (cid, path, args) = self.attachment(&pod.netns, &pod.namespace, &pod.name);
        let a = Attachment {
            container_id: &cid,
            netns: &path,
            ifname: "eth0",
            cni_args: args,
        };
        self.chain
            .run_all(&self.node, command, &a, Some(&pod.result))
    }

    pub fn plugin_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("podwire-cni.log")).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.agent.kill();
        let _ = self.agent.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
