//! The dispatcher: validate everything, then act; owns what goes to stdout.

use crate::config::{FailurePolicy, NetConf};
use crate::env::{CniEnv, Command, PodRef};
use crate::error::{PluginError, Result};
use crate::iptables::{self, Concrete, LazyTools, Tools};
use crate::lookup::{ask_agent, Lookup};
use crate::netns::in_netns;
use crate::record::{self, AttachmentLock, Record};
use podwire_core::cni::{CNI_VERSION, SUPPORTED_VERSIONS};
use podwire_core::mesh::{
    mesh_decision, namespace_excluded, pass_through_is_surprising, MeshDecision,
};
use podwire_core::render::{render, Rule, RuleSet};
use podwire_core::{Family, MeshProfile, PodInfo, RedirectSpec};
use std::path::Path;
use tracing::{info, warn};

/// Run one CNI command; `Ok(Some(s))` is printed on stdout. `conf` is the network config
/// parsed from `stdin` (VERSION answers even when it is broken).
pub fn run(env: &CniEnv, conf: Result<NetConf>, stdin: &[u8]) -> Result<Option<String>> {
    let needs = |conf: &NetConf, min: &str, verb: &str| -> Result<()> {
        if version_lt(&conf.cni_version, min) {
            return Err(PluginError::IncompatibleVersion {
                version: conf.cni_version.clone(),
                reason: format!("{verb} needs cniVersion {min} or later"),
            });
        }
        Ok(())
    };
    match env.command {
        Command::Version => Ok(Some(
            serde_json::json!({"cniVersion": CNI_VERSION, "supportedVersions": SUPPORTED_VERSIONS})
                .to_string(),
        )),
        Command::Add => add(env, &conf?),
        Command::Del => del(env, &conf?).map(|()| None),
        Command::Check => {
            let conf = conf?;
            needs(&conf, "0.4.0", "CHECK")?;
            check(env, &conf).map(|()| None)
        }
        Command::Status => {
            let conf = conf?;
            needs(&conf, "1.1.0", "STATUS")?;
            status(&conf).map(|()| None)
        }
        Command::Gc => {
            let conf = conf?;
            needs(&conf, "1.1.0", "GC")?;
            gc(&conf, stdin).map(|()| None)
        }
    }
}

fn version_lt(a: &str, b: &str) -> bool {
    let parse = |s: &str| -> Vec<u32> { s.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    parse(a) < parse(b)
}

/// A chained plugin that changes nothing prints the previous result unchanged.
fn pass_through(conf: &NetConf) -> Option<String> {
    Some(match &conf.prev_result {
        Some(raw) => raw.get().to_string(),
        None => serde_json::json!({ "cniVersion": conf.cni_version }).to_string(),
    })
}

/// Look the pod up and decide. `Ok(None)`: leave it alone.
fn resolve(conf: &NetConf, pod_ref: &PodRef) -> Result<Option<PodInfo>> {
    if let Some(reason) = namespace_excluded(&pod_ref.namespace, &conf.exclude_namespaces) {
        info!(pod = %pod_ref.display(), "{reason}");
        return Ok(None);
    }
    let answer =
        ask_agent(&conf.agent_socket, pod_ref).or_else(|agent_err| match &conf.kubeconfig {
            // The agent is down or not synced: ask the API server directly.
            Some(kc) => crate::kube::get_pod(kc, pod_ref).map_err(|kube_err| {
                format!("{agent_err}; and the kubeconfig fallback failed: {kube_err}")
            }),
            None => Err(agent_err),
        });
    let pod = match answer {
        Ok(Lookup::Found(pod)) => *pod,
        Ok(Lookup::NotFound) => {
            info!(pod = %pod_ref.display(), "pass-through: the pod source does not know this pod (not a mesh pod)");
            return Ok(None);
        }
        Err(reason) => match conf.failure_policy {
            FailurePolicy::Closed => {
                return Err(PluginError::Undeterminable {
                    pod: pod_ref.display(),
                    reason,
                    socket: conf.agent_socket.display().to_string(),
                })
            }
            FailurePolicy::Open => {
                warn!(pod = %pod_ref.display(), "starting WITHOUT redirection (failurePolicy open): {reason}");
                return Ok(None);
            }
        },
    };
    let profile = MeshProfile::istio();
    match mesh_decision(&pod, &profile, &conf.exclude_namespaces) {
        MeshDecision::Redirect => Ok(Some(pod)),
        MeshDecision::PassThrough(reason) => {
            if pass_through_is_surprising(&pod, &profile) {
                warn!(pod = %pod_ref.display(), "injected pod starting WITHOUT redirection: {reason}");
            } else {
                info!(pod = %pod_ref.display(), "{reason}");
            }
            Ok(None)
        }
        MeshDecision::Refuse(source) => Err(PluginError::InvalidPod {
            pod: pod_ref.display(),
            source,
        }),
    }
}

fn families(ipv6: bool) -> Vec<Family> {
    if ipv6 {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    }
}

fn rulesets(pod: &PodInfo, pod_ref: &PodRef, ipv6: bool) -> Result<Vec<RuleSet>> {
    let profile = MeshProfile::istio();
    let spec = RedirectSpec::from_pod(pod, &profile).map_err(|source| PluginError::InvalidPod {
        pod: pod_ref.display(),
        source,
    })?;
    Ok(families(ipv6)
        .into_iter()
        .map(|f| render(&spec, &profile, f))
        .collect())
}

/// The pod-scoped xtables lock file, its directory created.
fn lock_path(conf: &NetConf, env: &CniEnv) -> Result<std::path::PathBuf> {
    let lock = record::lock_path(&conf.state_dir, &env.container_id);
    if let Some(dir) = lock.parent() {
        std::fs::create_dir_all(dir).map_err(|e| {
            PluginError::Io(format!("cannot create state dir {}: {e}", dir.display()))
        })?;
    }
    Ok(lock)
}

fn tools_for(
    conf: &NetConf,
    env: &CniEnv,
    backend: Concrete,
    fam: Family,
    pod: &str,
) -> Result<Tools> {
    let lock = lock_path(conf, env)?;
    Tools::find(backend, fam, &lock).map_err(|reason| PluginError::Redirect {
        pod: pod.to_string(),
        family: fam.name(),
        netns: env.netns.clone().unwrap_or_default(),
        reason,
    })
}

fn add(env: &CniEnv, conf: &NetConf) -> Result<Option<String>> {
    // The previous result is passed on as this plugin's: one that does not read as a result
    // is refused whatever the pod, not printed as ours.
    let ipv6 = conf.has_ipv6()?;
    let Some(pod_ref) = &env.pod else {
        // Kubelet always names the pod: a call without one is a runtime podwire cannot
        // check, worth a line an operator sees.
        warn!("pass-through: no K8S_POD_NAME in CNI_ARGS, not a pod podwire can identify");
        return Ok(pass_through(conf));
    };
    let Some(pod) = resolve(conf, pod_ref)? else {
        return Ok(pass_through(conf));
    };
    let sets = rulesets(&pod, pod_ref, ipv6)?;
    let netns = env.netns.clone().unwrap_or_default();
    let backend = iptables::detect(conf.iptables);
    let who = pod_ref.display();
    let xtables_lock = lock_path(conf, env)?;
    let tools: Vec<LazyTools> = sets
        .iter()
        .map(|s| LazyTools::new(backend, s.family, &xtables_lock))
        .collect();

    // One ADD/DEL/CHECK of this attachment at a time, and the record on disk before the rules
    // are: a concurrent DEL can then never leave rules without a record (which the agent's
    // repair would take for a pod that raced it).
    let lock = attachment_lock(conf, env)?;
    let previous = record::read(&conf.state_dir, &env.container_id, &env.ifname);
    // Without a record (written by an older release), the rules this ADD renders stand in.
    let previous_entries: Vec<Rule> = previous.as_ref().map_or_else(
        || sets[0].entry_rules().cloned().collect(),
        Record::entry_rules,
    );
    let mut rec = Record {
        network: conf.name.clone(),
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        netns: netns.clone(),
        namespace: pod_ref.namespace.clone(),
        name: pod_ref.name.clone(),
        uid: if pod_ref.uid.is_empty() {
            pod.metadata.uid.clone()
        } else {
            pod_ref.uid.clone()
        },
        backend: backend.name().into(),
        ipv6,
        entry_rules: Vec::new(),
    };
    rec.set_entry_rules(sets[0].entry_rules());
    record::write(&conf.state_dir, &rec).map_err(|e| {
        PluginError::Io(format!(
            "pod {who}: cannot write its record in {} ({e}); without it DEL could not tell podwire's rules apart: check the node's disk and the plugin's stateDir",
            conf.state_dir.display()
        ))
    })?;

    let outcome = in_netns(Path::new(&netns), || {
        let netlink = Some(crate::nftables::program as iptables::Programmer);
        iptables::apply_all(&tools, &sets, &previous_entries, netlink, &who)
    });
    let failure = match outcome {
        Ok(Ok(applied)) => {
            drop(lock);
            info!(pod = %who, netns = %netns, backend = backend.name(), ?applied, "traffic redirected to the proxy");
            return Ok(pass_through(conf));
        }
        Ok(Err((family, reason))) => PluginError::Redirect {
            pod: who.clone(),
            family: family.name(),
            netns: netns.clone(),
            reason,
        },
        Err(e) => e,
    };
    // Nothing of ours changed: the record goes back to what it was.
    let restored = match &previous {
        Some(p) => record::write(&conf.state_dir, p),
        None => {
            record::remove(&conf.state_dir, &env.container_id, &env.ifname);
            Ok(())
        }
    };
    if let Err(e) = restored {
        warn!(pod = %who, "cannot restore the previous record: {e}");
    }
    Err(failure)
}

fn attachment_lock(conf: &NetConf, env: &CniEnv) -> Result<AttachmentLock> {
    AttachmentLock::acquire(&conf.state_dir, &env.container_id, &env.ifname).map_err(|e| {
        PluginError::Io(format!(
            "cannot lock attachment {}/{} in {}: {e}",
            env.container_id,
            env.ifname,
            conf.state_dir.display()
        ))
    })
}

fn del(env: &CniEnv, conf: &NetConf) -> Result<()> {
    let lock = attachment_lock(conf, env)?;
    let rec = record::read(&conf.state_dir, &env.container_id, &env.ifname);
    let netns = env.netns.clone().filter(|n| Path::new(n).exists());
    let Some(netns) = netns else {
        // The sandbox is gone and its rules with it.
        record::remove(&conf.state_dir, &env.container_id, &env.ifname);
        lock.retire();
        return Ok(());
    };
    let who = env
        .pod
        .as_ref()
        .map(PodRef::display)
        .unwrap_or_else(|| env.container_id.clone());
    let backends = match rec.as_ref().and_then(|r| Concrete::from_name(&r.backend)) {
        Some(b) => vec![b],
        None => vec![iptables::detect(conf.iptables)],
    };
    let chains: Vec<String> = MeshProfile::istio()
        .chains
        .all()
        .iter()
        .map(|s| s.to_string())
        .collect();
    // Only what podwire recorded; without a record, only the jumps into its own chains.
    let entries: Vec<Rule> = rec.as_ref().map(Record::entry_rules).unwrap_or_default();
    let xtables_lock = record::lock_path(&conf.state_dir, &env.container_id);
    let errors = in_netns(Path::new(&netns), || {
        // Teardown collects every error instead of stopping at the first.
        let mut errors = Vec::new();
        for b in &backends {
            for fam in [Family::V4, Family::V6] {
                match Tools::find(*b, fam, &xtables_lock) {
                    Ok(t) => match iptables::remove(&t, &chains, &entries) {
                        Ok(true) => info!(pod = %who, "removed {} redirection", fam.name()),
                        Ok(false) => {}
                        Err(e) => errors.push(format!("{}: {e}", fam.name())),
                    },
                    Err(e) if fam == Family::V4 => errors.push(e),
                    Err(_) => {}
                }
            }
        }
        errors
    })?;
    if !errors.is_empty() {
        return Err(PluginError::Redirect {
            pod: who,
            family: "IPv4/IPv6",
            netns,
            reason: format!("removing rules: {}", errors.join("; ")),
        });
    }
    record::remove(&conf.state_dir, &env.container_id, &env.ifname);
    lock.retire();
    Ok(())
}

fn check(env: &CniEnv, conf: &NetConf) -> Result<()> {
    let Some(pod_ref) = &env.pod else {
        return Ok(());
    };
    let Some(pod) = resolve(conf, pod_ref)? else {
        return Ok(());
    };
    let _lock = attachment_lock(conf, env)?;
    let rec = record::read(&conf.state_dir, &env.container_id, &env.ifname);
    let ipv6 = match &rec {
        Some(r) => r.ipv6,
        None => conf.has_ipv6()?,
    };
    let backend = rec
        .as_ref()
        .and_then(|r| Concrete::from_name(&r.backend))
        .unwrap_or_else(|| iptables::detect(conf.iptables));
    let sets = rulesets(&pod, pod_ref, ipv6)?;
    let netns = env.netns.clone().unwrap_or_default();
    let who = pod_ref.display();
    let tools: Vec<Tools> = sets
        .iter()
        .map(|s| tools_for(conf, env, backend, s.family, &who))
        .collect::<Result<_>>()?;
    let problems = in_netns(Path::new(&netns), || {
        let mut problems = Vec::new();
        for (t, set) in tools.iter().zip(&sets) {
            match iptables::check(t, set) {
                Ok(p) => {
                    problems.extend(p.into_iter().map(|p| format!("{}: {p}", set.family.name())))
                }
                Err(e) => problems.push(format!("{}: {e}", set.family.name())),
            }
        }
        problems
    })?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(PluginError::CheckFailed {
            pod: who,
            netns,
            problems: problems.join("; "),
        })
    }
}

/// Ready to ADD: the pod source answers (or failurePolicy open) and iptables is installed.
fn status(conf: &NetConf) -> Result<()> {
    let backend = iptables::detect(conf.iptables);
    Tools::find(
        backend,
        Family::V4,
        &record::lock_path(&conf.state_dir, "status"),
    )
    .map_err(PluginError::NotAvailable)?;
    if conf.failure_policy == FailurePolicy::Closed {
        std::os::unix::net::UnixStream::connect(&conf.agent_socket).map_err(|e| {
            PluginError::NotAvailable(format!(
                "the node agent does not answer on {} ({e}); with failurePolicy closed mesh pods cannot start: check the podwire-agent pod on this node",
                conf.agent_socket.display()
            ))
        })?;
    }
    Ok(())
}

/// Forget records of attachments the runtime no longer has.
fn gc(conf: &NetConf, stdin: &[u8]) -> Result<()> {
    #[derive(serde::Deserialize)]
    struct Attachment {
        #[serde(rename = "containerID")]
        container_id: String,
        ifname: String,
    }
    #[derive(serde::Deserialize)]
    struct GcConf {
        #[serde(rename = "cni.dev/valid-attachments", default)]
        valid: Vec<Attachment>,
    }
    let gc: GcConf = serde_json::from_slice(stdin).map_err(|e| PluginError::InvalidConfig {
        field: "cni.dev/valid-attachments",
        reason: format!("expected a list of {{containerID, ifname}}: {e}"),
    })?;
    for rec in record::all(&conf.state_dir)
        .into_iter()
        .filter(|r| r.network == conf.name)
    {
        if !gc
            .valid
            .iter()
            .any(|a| a.container_id == rec.container_id && a.ifname == rec.ifname)
        {
            info!(container = %rec.container_id, pod = %format!("{}/{}", rec.namespace, rec.name), "gc: forgetting stale record");
            record::remove(&conf.state_dir, &rec.container_id, &rec.ifname);
        }
    }
    Ok(())
}
