//! podwire's own part of the path: the node agent ready and podwire-cni chained (the Node
//! condition).

use super::*;
pub(super) fn node_agent(inp: &Inputs) -> Outcome {
    let nodes = match &inp.cluster.nodes {
        Ok(n) => n,
        Err(e) => return unknown(e.clone()),
    };
    if nodes.is_empty() {
        return unknown("no node known (the pod is not scheduled and no Node could be listed)");
    }
    let scope = match inp.subject {
        Ok(Some(Subject { node: Some(n), .. })) => format!("the pod's node {n}"),
        _ => format!("all {} node(s) (the pod has no node yet)", nodes.len()),
    };
    let mut evidence = vec![format!("checked {scope}")];
    let mut bad = Vec::new();
    for n in nodes {
        let name = n.metadata.name.as_deref().unwrap_or("?");
        let cond = n
            .status
            .iter()
            .flat_map(|s| s.conditions.iter().flatten())
            .find(|c| c.type_ == CONDITION);
        match cond {
            Some(c) if c.status == "True" => evidence.push(format!(
                "node {name}: {CONDITION} True ({})",
                c.message.as_deref().unwrap_or("")
            )),
            Some(c) => {
                bad.push(name.to_string());
                evidence.push(format!(
                    "node {name}: {CONDITION} {}: {}",
                    c.status,
                    c.message.as_deref().unwrap_or("(no message)")
                ));
            }
            None => {
                bad.push(name.to_string());
                evidence.push(format!(
                    "node {name}: no {CONDITION} condition: podwire-agent has never reported on it (not scheduled there?)"
                ));
            }
        }
    }
    if bad.is_empty() {
        return pass(evidence);
    }
    let sel = "app.kubernetes.io/name=podwire-agent";
    let fix = bad
        .iter()
        .map(|n| {
            format!(
                "node {n}: kubectl -n {SYSTEM_NS} get pods -l {sel} -o wide --field-selector spec.nodeName={n}; kubectl -n {SYSTEM_NS} logs -l {sel} --field-selector spec.nodeName={n} (not chained: the primary CNI config is missing or unwritable)"
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    fail(evidence, fix)
}
