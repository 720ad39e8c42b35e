//! `podwire demo --runtime containerd`, as a person runs it: containerd's CRI creates the pods,
//! podwire-cni redirects the mesh pod's traffic and leaves the plain pod's alone.

use podwire_lab::bins::workspace_bin;
use podwire_lab::require_root;
use std::process::Command;

#[test]
fn the_containerd_demo_shows_redirection_through_the_cri() {
    if !require_root() {
        return;
    }
    let out = Command::new(workspace_bin("podwire"))
        .args(["demo", "--runtime", "containerd"])
        .output()
        .expect("run podwire demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(stdout.matches("  ✔ ").count(), 4, "{stdout}");
    assert!(!stdout.contains('✘'), "{stdout}");
    for want in [
        "RunPodSandbox",
        "reached the proxy's outbound port 15001",
        "reached the proxy's inbound port 15006",
        "shop/plain's holds none.",
        "PASS:",
    ] {
        assert!(stdout.contains(want), "{want:?} missing from\n{stdout}");
    }
}
