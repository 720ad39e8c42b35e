//! `podwire demo`: the main job end to end on one machine, told in words a person reads.

use anyhow::{bail, Context, Result};
use podwire_core::inject::{apply_patch, plan, InjectorConfig, Labels};
use podwire_core::MeshProfile;
use podwire_netlab::cri::{CriNode, GATEWAY};
use podwire_netlab::lab::{pod_manifest, Lab, Pod, APP_PORT, NODE_V4, NODE_V6};
use podwire_netlab::probe::{self, connect, Seen};
use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Runtime {
    /// The pods are network namespaces the demo sets up through the CNI chain itself, the
    /// way libcni runs it.
    Netns,
    /// The pods are containerd pod sandboxes created through its CRI with kubelet's own calls
    /// (Debian's containerd, started for the demo in its own namespaces).
    Containerd,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Who creates the pods.
    #[arg(long, value_enum, default_value_t = Runtime::Netns)]
    runtime: Runtime,
    /// Also give the pods IPv6 addresses (2001:2::/64) and check IPv6 redirection
    /// (netns runtime).
    #[arg(long)]
    ipv6: bool,
    /// Print the mesh pod's nat table as podwire-cni left it.
    #[arg(long)]
    show_rules: bool,
}

struct Check {
    ok: bool,
    line: String,
}

fn expect(
    what: &str,
    seen: Result<Seen>,
    want_label: &str,
    want_orig: Option<&str>,
    meaning: &str,
) -> Check {
    match seen {
        Ok(s) => {
            let ok = s.label == want_label && want_orig.is_none_or(|o| s.orig == o);
            let who = match s.label.as_str() {
                "PROXY-OUT" => "the proxy's outbound port 15001".to_string(),
                "PROXY-IN" => "the proxy's inbound port 15006".to_string(),
                "NODE" => "the node's server directly".to_string(),
                "APP" => "the app directly".to_string(),
                other => other.to_string(),
            };
            let orig = if s.orig == "-" {
                String::new()
            } else {
                format!(", original destination {}", s.orig)
            };
            Check {
                ok,
                line: format!(
                    "{} {what:<34} reached {who}{orig}  ({meaning})",
                    if ok { "✔" } else { "✘" }
                ),
            }
        }
        Err(e) => Check {
            ok: false,
            line: format!(
                "✘ {what:<34} failed: {}",
                podwire_core::error::report(e.as_ref())
            ),
        },
    }
}

pub fn run(args: &Args) -> Result<bool> {
    if !nix_is_root() {
        bail!("podwire demo creates network namespaces and iptables rules: run it as root (sudo)");
    }
    if args.runtime == Runtime::Containerd {
        if args.ipv6 {
            bail!("--ipv6 is shown with the netns runtime only (drop --runtime containerd)");
        }
        return containerd(args);
    }
    println!(
        "podwire demo: real network namespaces, Debian's CNI plugins, podwire-cni, real TCP\n"
    );
    let lab = Lab::new(args.ipv6, json!({})).context("setting up the demo node")?;
    println!(
        "node      namespace {} (bridge pwbr0, {NODE_V4}{}; a server on :{APP_PORT})",
        lab.node.name,
        if args.ipv6 {
            format!(" and {NODE_V6}")
        } else {
            String::new()
        }
    );
    println!(
        "agent     podwire-agent serve --pods-dir {}",
        lab.dir.join("pods").display()
    );
    let chain: Vec<String> = lab.chain.conflist["plugins"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| {
                    let ty = p["type"].as_str()?;
                    Some(match p["ipam"]["type"].as_str() {
                        Some(ipam) => format!("{ty} ({ipam} IPAM)"),
                        None => ty.to_string(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    println!("chain     {}", chain.join(" → "));

    let pods = injected_pods()?;
    lab.publish("demo.yaml", &pods)?;
    let mesh = lab
        .start_pod("shop", "web")
        .context("starting the mesh pod")?;
    let plain = lab
        .start_pod("shop", "plain")
        .context("starting the plain pod")?;
    for (pod, what) in [
        (
            &mesh,
            "mesh pod: the injected istio-proxy container + sidecar.istio.io/status",
        ),
        (
            &plain,
            "plain pod: sidecar.istio.io/inject=false, no sidecar",
        ),
    ] {
        println!(
            "pod       {}/{:<6} {:<15} {what}",
            pod.namespace, pod.name, pod.ip4
        );
    }
    // Both pods run the same stand-in proxy; only the mesh pod's traffic should reach it.
    probe::start_proxy(&mesh.netns, args.ipv6)?;
    probe::start_proxy(&plain.netns, args.ipv6)?;

    let rules = mesh.netns.nat_rules("iptables-save")?;
    let count = rules.lines().filter(|l| l.starts_with("-A ")).count();
    println!("\nshop/web's netns now holds {count} nat rules in ISTIO_INBOUND/ISTIO_OUTPUT/ISTIO_REDIRECT/ISTIO_IN_REDIRECT;");
    println!(
        "shop/plain's holds {}.",
        if plain.netns.nat_rules("iptables-save")?.contains("ISTIO_") {
            "some too (WRONG)"
        } else {
            "none"
        }
    );
    if args.show_rules {
        println!("\n{rules}");
    }

    println!("\ntraffic:");
    let checks = traffic(&lab, &mesh, &plain, args.ipv6);
    for c in &checks {
        println!("  {}", c.line);
    }
    let ok = checks.iter().all(|c| c.ok);

    println!("\ncleaning up: DEL through the chain, then the namespaces and the agent go away");
    for pod in [&mesh, &plain] {
        for (plugin, out) in lab.run("DEL", pod)? {
            if !out.ok {
                println!("  DEL failed in {plugin}: {}", out.stdout.trim());
            }
        }
    }
    println!(
        "\n{}",
        if ok {
            "PASS: the mesh pod's traffic was redirected to its proxy, the plain pod's was not."
        } else {
            "FAIL: see the ✘ lines above."
        }
    );
    Ok(ok)
}

/// The pods as a person writes them: the webhook's own decision and patch turn "web" into a
/// mesh pod; "plain" opts out.
fn injected_pods() -> Result<Vec<serde_json::Value>> {
    let profile = MeshProfile::istio();
    let cfg = InjectorConfig::default();
    let ns_labels: Labels = [
        ("istio-injection", "enabled"),
        ("kubernetes.io/metadata.name", "shop"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    println!("namespace shop, labelled istio-injection=enabled");
    let mut pods = Vec::new();
    for (name, annotations) in [
        ("web", &[][..]),
        ("plain", &[("sidecar.istio.io/inject", "false")][..]),
    ] {
        let mut pod = pod_manifest("shop", name, false, annotations);
        let plan =
            plan(&pod, None, Some(&ns_labels), &cfg, &profile).context("injection decision")?;
        println!("injector  shop/{name:<6} {}", plan.decision.reason);
        let ops = plan
            .patch
            .map_err(|e| anyhow::anyhow!("injection refused: {e}"))?;
        apply_patch(&mut pod, &ops).map_err(|e| anyhow::anyhow!("applying the patch: {e}"))?;
        pods.push(pod);
    }
    Ok(pods)
}

/// The same story with containerd creating the pods through its CRI, as kubelet asks it to.
fn containerd(args: &Args) -> Result<bool> {
    println!("podwire demo: containerd's CRI (kubelet's calls), Debian's CNI plugins, podwire-cni, real TCP\n");
    let mut node = CriNode::start().context(
        "starting containerd for the demo (apt-get install containerd runc busybox-static)",
    )?;
    println!(
        "node      namespace {} running containerd (CRI socket {}); bridge {GATEWAY}, a server on :{APP_PORT}",
        node.netns.name,
        node.path("containerd.sock").display()
    );
    println!("chain     bridge (host-local IPAM) → podwire-cni, chained into containerd's CNI config by `podwire-agent install`");
    println!(
        "agent     podwire-agent serve --pods-dir {}",
        node.path("pods").display()
    );
    let pods = injected_pods()?;
    node.publish(&pods)?;
    probe::listen(&node.netns, &probe::any(false, APP_PORT), "NODE")?;
    let mut sandboxes = Vec::new();
    for (name, what) in [
        (
            "web",
            "mesh pod: the injected istio-proxy container + sidecar.istio.io/status",
        ),
        (
            "plain",
            "plain pod: sidecar.istio.io/inject=false, no sidecar",
        ),
    ] {
        let id = node
            .run_sandbox("shop", name)
            .map_err(|e| anyhow::anyhow!("RunPodSandbox shop/{name}: {}", e.message()))?;
        let (ip, netns) = node.sandbox(&id)?;
        println!(
            "pod       shop/{name:<6} {ip:<15} RunPodSandbox {}…  {what}",
            &id[..12.min(id.len())]
        );
        probe::listen(&netns, &probe::any(false, APP_PORT), "APP")?;
        probe::start_proxy(&netns, false)?;
        sandboxes.push((id, ip, netns));
    }
    let (web_ip, web_ns) = (&sandboxes[0].1, &sandboxes[0].2);
    let (plain_ip, plain_ns) = (&sandboxes[1].1, &sandboxes[1].2);
    let rules = web_ns.nat_rules("iptables-save")?;
    let count = rules.lines().filter(|l| l.starts_with("-A ")).count();
    println!("\nshop/web's sandbox now holds {count} nat rules in ISTIO_INBOUND/ISTIO_OUTPUT/ISTIO_REDIRECT/ISTIO_IN_REDIRECT;");
    println!(
        "shop/plain's holds {}.",
        if plain_ns.nat_rules("iptables-save")?.contains("ISTIO_") {
            "some too (WRONG)"
        } else {
            "none"
        }
    );
    if args.show_rules {
        println!("\n{rules}");
    }
    let upstream = format!("{GATEWAY}:{APP_PORT}");
    let web_in = format!("{web_ip}:{APP_PORT}");
    let checks = [
        expect(
            &format!("shop/web   → {upstream}"),
            connect(web_ns, &upstream),
            "PROXY-OUT",
            Some(&upstream),
            "outbound redirected",
        ),
        expect(
            &format!("node       → shop/web:{APP_PORT}"),
            connect(&node.netns, &web_in),
            "PROXY-IN",
            Some(&web_in),
            "inbound redirected",
        ),
        expect(
            &format!("shop/plain → {upstream}"),
            connect(plain_ns, &upstream),
            "NODE",
            None,
            "not redirected",
        ),
        expect(
            &format!("node       → shop/plain:{APP_PORT}"),
            connect(&node.netns, &format!("{plain_ip}:{APP_PORT}")),
            "APP",
            None,
            "not redirected",
        ),
    ];
    println!("\ntraffic:");
    for c in &checks {
        println!("  {}", c.line);
    }
    let ok = checks.iter().all(|c| c.ok);
    println!("\ncleaning up: StopPodSandbox + RemovePodSandbox (containerd calls DEL), then containerd and the agent go away");
    for (id, _, netns) in sandboxes {
        node.stop_and_remove(&id, netns)?;
    }
    let left = node.recorded_uids();
    if !left.is_empty() {
        println!("  ✘ podwire-cni records left behind for {left:?}");
    }
    println!(
        "\n{}",
        if ok && left.is_empty() {
            "PASS: the mesh pod's traffic was redirected to its proxy, the plain pod's was not."
        } else {
            "FAIL: see the ✘ lines above."
        }
    );
    Ok(ok && left.is_empty())
}

fn traffic(lab: &Lab, mesh: &Pod, plain: &Pod, ipv6: bool) -> Vec<Check> {
    let node = format!("{NODE_V4}:{APP_PORT}");
    let mesh_in = format!("{}:{APP_PORT}", mesh.ip4);
    let mut checks = vec![
        expect(
            &format!("shop/web   → {node}"),
            connect(&mesh.netns, &node),
            "PROXY-OUT",
            Some(&node),
            "outbound redirected",
        ),
        expect(
            &format!("node       → shop/web:{APP_PORT}"),
            connect(&lab.node, &mesh_in),
            "PROXY-IN",
            Some(&mesh_in),
            "inbound redirected",
        ),
        expect(
            &format!("shop/plain → {node}"),
            connect(&plain.netns, &node),
            "NODE",
            None,
            "not redirected",
        ),
        expect(
            &format!("node       → shop/plain:{APP_PORT}"),
            connect(&lab.node, &format!("{}:{APP_PORT}", plain.ip4)),
            "APP",
            None,
            "not redirected",
        ),
    ];
    if ipv6 {
        let node6 = format!("[{NODE_V6}]:{APP_PORT}");
        checks.push(expect(
            &format!("shop/web   → {node6}"),
            connect(&mesh.netns, &node6),
            "PROXY-OUT",
            Some(&node6),
            "IPv6 outbound redirected",
        ));
        if let Some(ip6) = &mesh.ip6 {
            let t = format!("[{ip6}]:{APP_PORT}");
            checks.push(expect(
                "node       → shop/web (IPv6)",
                connect(&lab.node, &t),
                "PROXY-IN",
                Some(&t),
                "IPv6 inbound redirected",
            ));
        }
    }
    checks
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}
