//! A real runtime: podman 4 (CNI backend, runc) runs busybox `--rootfs` containers on a
//! conflist of Debian's bridge + host-local + portmap followed by podwire-cni, with
//! `podwire-agent serve` answering the look-ups. podman calls VERSION on every plugin, ADD on
//! `run`, DEL on `rm`, and passes only `K8S_POD_NAME` (namespace "default").
//! Needs root; fails (never skips) under CI=true.

use podwire_core::render::render;
use podwire_core::saved::parse_nat;
use podwire_core::{Family, MeshProfile, RedirectSpec};
use podwire_lab::lab::pod_manifest;
use podwire_lab::podman::{PodmanLab, PodmanOut};
use podwire_lab::require_root;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const MESH: &str = "pwpm-mesh";
const PLAIN: &str = "pwpm-plain";

/// What a failure message needs besides the failing command: the plugin's and agent's logs.
fn logs(lab: &PodmanLab) -> String {
    format!(
        "--- podwire-cni log ---\n{}\n--- podwire-agent log ---\n{}",
        lab.plugin_log(),
        lab.agent_log()
    )
}

fn must(lab: &PodmanLab, out: PodmanOut, what: &str) -> PodmanOut {
    assert!(out.ok, "{what} failed:\n{out}\n{}", logs(lab));
    out
}

#[test]
fn podman_runs_podwire_in_the_cni_chain() {
    if !require_root() {
        return;
    }
    let started = Instant::now();
    let version = Command::new("podman").arg("--version").output();
    assert!(
        version.as_ref().is_ok_and(|o| o.status.success()),
        "podman is not usable ({version:?}): apt-get install podman runc containernetworking-plugins busybox-static iptables"
    );
    // Only the mesh container's name is known to the agent; the plain one is not.
    let lab = PodmanLab::new(&[pod_manifest("default", MESH, true, &[])]).expect("podman lab");
    let mut outs = Vec::new();

    // 1. The mesh container starts and its netns holds Istio's default rules.
    let out = lab
        .run_detached(MESH, &["sleep", "300"])
        .expect("spawn podman");
    outs.push(must(&lab, out, "podman run (mesh container)"));
    let saved = lab.nat_rules(MESH).expect("mesh container's nat table");
    for chain in ["ISTIO_INBOUND", "ISTIO_OUTPUT"] {
        assert!(
            saved.contains(&format!(":{chain} ")),
            "no {chain} in the mesh container:\n{saved}\n{}",
            logs(&lab)
        );
    }
    let p = MeshProfile::istio();
    let want = render(&RedirectSpec::defaults(&p), &p, Family::V4);
    assert_eq!(
        parse_nat(&saved).missing(&want),
        Vec::<String>::new(),
        "the mesh container lacks default rules:\n{saved}"
    );
    let mesh_ip = lab.ip(MESH).expect("mesh container's address");
    assert!(
        lab.leased_ips().contains(&mesh_ip),
        "host-local holds {:?}, not the mesh container's {mesh_ip:?}",
        lab.leased_ips()
    );
    let mesh_netns = lab.netns_path(MESH).expect("mesh netns");

    // 2. A container the agent does not know passes through untouched.
    let out = lab
        .run_detached(PLAIN, &["sleep", "300"])
        .expect("spawn podman");
    outs.push(must(&lab, out, "podman run (plain container)"));
    let plain_ip = lab.ip(PLAIN).expect("plain container's address");
    assert!(
        !plain_ip.is_empty() && plain_ip != mesh_ip,
        "plain container got {plain_ip:?} (mesh {mesh_ip:?})"
    );
    let saved = lab.nat_rules(PLAIN).expect("plain container's nat table");
    assert!(
        !saved.contains("ISTIO_"),
        "the plain container was touched:\n{saved}\n{}",
        logs(&lab)
    );

    // 3. Removing the mesh container runs DEL through the chain (reverse order: podwire-cni,
    //    portmap, then bridge/host-local; libcni stops at the first failure, so the released
    //    lease proves podwire-cni's DEL succeeded).
    let out = lab
        .podman(&["rm", "--force", "--time", "0", MESH])
        .expect("spawn podman");
    outs.push(must(&lab, out, "podman rm (mesh container)"));
    assert!(
        !lab.leased_ips().contains(&mesh_ip),
        "DEL did not get through the chain: host-local still holds {mesh_ip}\n{}",
        logs(&lab)
    );
    assert!(
        !Path::new(&mesh_netns).exists() || !mesh_netns.starts_with("/run/netns"),
        "podman left the mesh netns {} behind",
        mesh_netns.display()
    );
    let out = lab
        .podman(&["rm", "--force", "--time", "0", PLAIN])
        .expect("spawn podman");
    outs.push(must(&lab, out, "podman rm (plain container)"));

    for out in &outs {
        assert!(
            !out.stderr.to_lowercase().contains("podwire"),
            "podman reported a podwire-cni problem:\n{out}\n{}",
            logs(&lab)
        );
    }
    let log = lab.plugin_log();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(
        errors.is_empty(),
        "podwire-cni logged errors: {errors:#?}\n{}",
        logs(&lab)
    );
    eprintln!("podman e2e took {:?}", started.elapsed());
}
