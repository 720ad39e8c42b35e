//! A CNI runtime in miniature, doing what libcni does for a conflist: each plugin exec'd with
//! the CNI_* environment and its config (plus `name`, `cniVersion`, `prevResult`) on stdin;
//! ADD in order, DEL in reverse. Plugins run from a thread inside the "node" namespace, so
//! the bridge lands there and not on the machine's own network.

use crate::Netns;
use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Debug, Clone)]
pub struct Chain {
    pub conflist: Value,
    /// Directories searched for plugin binaries (CNI_PATH).
    pub paths: Vec<PathBuf>,
}

/// One plugin invocation's result.
#[derive(Debug, Clone)]
pub struct CniOutcome {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
    pub exit: Option<i32>,
}

impl CniOutcome {
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(self.stdout.trim())
            .with_context(|| format!("plugin stdout is not JSON: {:?}", self.stdout))
    }
}

/// Run one plugin binary exactly as a runtime would.
pub fn exec_plugin(bin: &Path, env: &[(&str, String)], stdin: &[u8]) -> Result<CniOutcome> {
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawn {}", bin.display()))?;
    if let Some(mut s) = child.stdin.take() {
        s.write_all(stdin)?;
    }
    let out = child.wait_with_output()?;
    Ok(CniOutcome {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        exit: out.status.code(),
    })
}

/// The CNI_* environment a runtime sets for one attachment (without CNI_PATH).
pub fn cni_env(
    command: &str,
    container_id: &str,
    netns: &Path,
    cni_args: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("CNI_COMMAND", command.to_string()),
        ("CNI_CONTAINERID", container_id.to_string()),
        ("CNI_NETNS", netns.display().to_string()),
        ("CNI_IFNAME", "eth0".to_string()),
        ("CNI_ARGS", cni_args.to_string()),
    ]
}

/// `CNI_ARGS` naming a Kubernetes pod, as kubelet passes them.
pub fn pod_args(namespace: &str, name: &str) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_UID=uid-{name}"
    )
}

/// Run the workspace's podwire-cni exactly as a runtime does, for one attachment on eth0.
pub fn run_podwire(
    command: &str,
    container_id: &str,
    netns: &Path,
    cni_args: &str,
    stdin: &[u8],
) -> Result<CniOutcome> {
    exec_plugin(
        &crate::bins::workspace_bin("podwire-cni"),
        &cni_env(command, container_id, netns, cni_args),
        stdin,
    )
}

/// Who is being attached.
#[derive(Debug, Clone)]
pub struct Attachment<'a> {
    pub container_id: &'a str,
    pub netns: &'a Path,
    pub ifname: &'a str,
    pub cni_args: String,
}

impl Chain {
    fn plugins(&self) -> Result<Vec<Value>> {
        self.conflist["plugins"]
            .as_array()
            .cloned()
            .ok_or_else(|| anyhow!("conflist has no plugins array"))
    }

    fn find(&self, ty: &str) -> Result<PathBuf> {
        self.paths
            .iter()
            .map(|d| d.join(ty))
            .find(|p| p.is_file())
            .ok_or_else(|| anyhow!("CNI plugin {ty} not found in {:?}", self.paths))
    }

    fn env(&self, command: &str, a: &Attachment) -> Vec<(&'static str, String)> {
        let cni_path = std::env::join_paths(&self.paths).unwrap_or_default();
        let mut env = cni_env(command, a.container_id, a.netns, &a.cni_args);
        if let Some(ifname) = env.iter_mut().find(|(k, _)| *k == "CNI_IFNAME") {
            ifname.1 = a.ifname.to_string();
        }
        env.push(("CNI_PATH", cni_path.to_string_lossy().into_owned()));
        env
    }

    fn stdin_for(&self, plugin: &Value, prev: Option<&Value>) -> Vec<u8> {
        let mut conf = plugin.clone();
        conf["name"] = self.conflist["name"].clone();
        conf["cniVersion"] = self.conflist["cniVersion"].clone();
        if let Some(p) = prev {
            conf["prevResult"] = p.clone();
        }
        serde_json::to_vec(&conf).unwrap_or_default()
    }

    /// ADD through the whole chain from inside `node`. Returns the final result, or the
    /// failing plugin's outcome.
    pub fn add(
        &self,
        node: &Netns,
        a: &Attachment,
    ) -> Result<std::result::Result<Value, (String, CniOutcome)>> {
        let mut prev: Option<Value> = None;
        for plugin in self.plugins()? {
            let ty = plugin["type"].as_str().unwrap_or_default().to_string();
            let bin = self.find(&ty)?;
            let stdin = self.stdin_for(&plugin, prev.as_ref());
            let env = self.env("ADD", a);
            let out = node.run(|| exec_plugin(&bin, &env, &stdin))??;
            if !out.ok {
                return Ok(Err((ty, out)));
            }
            prev = Some(out.json()?);
        }
        prev.map(Ok).ok_or_else(|| anyhow!("empty chain"))
    }

    /// DEL (reverse order) or CHECK (in order) with the cached result as prevResult.
    pub fn run_all(
        &self,
        node: &Netns,
        command: &str,
        a: &Attachment,
        result: Option<&Value>,
    ) -> Result<Vec<(String, CniOutcome)>> {
        let mut plugins = self.plugins()?;
        if command == "DEL" {
            plugins.reverse();
        }
        let mut outs = Vec::new();
        for plugin in plugins {
            let ty = plugin["type"].as_str().unwrap_or_default().to_string();
            let bin = self.find(&ty)?;
            let stdin = self.stdin_for(&plugin, result);
            let env = self.env(command, a);
            outs.push((ty, node.run(|| exec_plugin(&bin, &env, &stdin))??));
        }
        Ok(outs)
    }
}

/// The lab's conflist: Debian's bridge + host-local (IPv4 and optionally IPv6), then podwire.
pub fn lab_conflist(
    name: &str,
    ipam_dir: &Path,
    v4_subnet: &str,
    v6_subnet: Option<&str>,
    podwire: Value,
) -> Value {
    let mut ranges = vec![json!([{ "subnet": v4_subnet }])];
    if let Some(v6) = v6_subnet {
        ranges.push(json!([{ "subnet": v6 }]));
    }
    json!({
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": "pwbr0",
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": { "type": "host-local", "ranges": ranges, "dataDir": ipam_dir.display().to_string(),
                          "routes": [{ "dst": "0.0.0.0/0" }] }
            },
            podwire
        ]
    })
}

/// The pod's first address of a family from a CNI result (without the prefix length).
pub fn result_ip(result: &Value, v6: bool) -> Option<String> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        let addr = ip["address"].as_str()?;
        let host = addr.split('/').next()?;
        (host.contains(':') == v6).then(|| host.to_string())
    })
}
