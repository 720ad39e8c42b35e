//! "Fix RBAC and permissions": what podwire-agent and podwire-injector call, against what
//! their service accounts are granted.

use super::*;
/// The agent's `--repair` mode from its DaemonSet, and how it was found (default `label`).
pub(super) fn repair_mode(inp: &Inputs) -> (Repair, String) {
    let Ok(ds) = &inp.cluster.agent else {
        return (
            Repair::default(),
            format!(
                "{} (assumed: the DaemonSet could not be read)",
                Repair::default()
            ),
        );
    };
    let args: Vec<&String> = ds
        .spec
        .iter()
        .flat_map(|s| s.template.spec.iter())
        .flat_map(|p| p.containers.iter())
        .flat_map(|c| c.args.iter().flatten())
        .collect();
    let given = args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix("--repair=").map(str::to_string).or_else(|| {
            (a.as_str() == "--repair")
                .then(|| args.get(i + 1).map(|v| v.to_string()))
                .flatten()
        })
    });
    match given {
        None => (Repair::default(), Repair::default().to_string()),
        Some(v) => match v.parse::<Repair>() {
            Ok(r) => (r, r.to_string()),
            Err(e) => (
                Repair::default(),
                format!(
                    "{} (assumed: the DaemonSet's --repair {e})",
                    Repair::default()
                ),
            ),
        },
    }
}

pub(super) fn rbac_check(inp: &Inputs) -> Outcome {
    let r = match &inp.cluster.rbac {
        Ok(r) => r,
        Err(e) => return unknown(e.clone()),
    };
    let (mode, repair) = repair_mode(inp);
    let mut evidence = Vec::new();
    let mut bad = false;
    for (sa, needs) in [
        (fetch::AGENT, rbac::agent_needs(mode)),
        ("podwire-injector", rbac::injector_needs()),
    ] {
        let missing = rbac::missing(r, SYSTEM_NS, sa, &needs);
        let who = format!("system:serviceaccount:{SYSTEM_NS}:{sa}");
        if missing.is_empty() {
            evidence.push(format!("{who}: all {} permissions granted", needs.len()));
        } else {
            bad = true;
            evidence.push(format!("{who} is missing:"));
            evidence.extend(missing.into_iter().map(|m| format!("  {m}")));
        }
    }
    evidence.push(format!("(agent --repair={repair})"));
    if bad {
        fail(
            evidence,
            "re-apply podwire's RBAC (ClusterRoles/Roles podwire-agent and podwire-injector and their bindings): kubectl apply -f install/podwire.yaml\nverify: kubectl auth can-i VERB RESOURCE --as system:serviceaccount:podwire-system:NAME",
        )
    } else {
        pass(evidence)
    }
}
