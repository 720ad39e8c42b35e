//! What other admission steps do to the injected pod: a ResourceQuota without room for the
//! proxy, and the namespace's Pod Security level.

use super::*;
/// A quantity's value. The grammar is core's ([`Quantity::parse`] decides what is valid);
/// this only scales the digits by the suffix, until core exposes the value it computes.
pub(super) fn amount(s: &str) -> Option<f64> {
    Quantity::parse(s).ok().map(|q| q.value())
}

/// The proxy container as it would be injected into the subject (its resources follow the
/// pod's `sidecar.istio.io/proxy*` annotations), else as the config's template makes it.
pub(super) fn injected(
    inp: &Inputs,
    cfg: &InjectorConfig,
) -> Result<(Value, Option<String>), String> {
    let (mut pod, note) = match inp.subject {
        Ok(Some(s)) => {
            let p = plan(&s.pod, Some(inp.namespace), None, cfg, inp.profile)
                .map_err(|e| format!("{}: {e}", s.source))?;
            if p.decision.inject {
                let ops = p
                    .patch
                    .map_err(|e| format!("{}: injection refused: {e}", s.source))?;
                let mut pod = s.pod.clone();
                apply_patch(&mut pod, &ops).map_err(|e| format!("{}: {e}", s.source))?;
                (pod, None)
            } else {
                (
                    s.pod.clone(),
                    Some(format!(
                        "{} would not be injected ({})",
                        s.source, p.decision.reason
                    )),
                )
            }
        }
        _ => {
            // No pod: the proxy alone, as the template makes it.
            let empty =
                json!({"metadata": {"namespace": inp.namespace}, "spec": {"containers": []}});
            let info = read_pod(&empty).map_err(|e| e.to_string())?;
            let ops =
                injection_patch(&empty, &info, cfg, inp.profile).map_err(|e| e.to_string())?;
            let mut pod = empty;
            apply_patch(&mut pod, &ops)?;
            (pod, Some("no pod given: the proxy alone is checked".into()))
        }
    };
    if let Some(n) = pod.get_mut("metadata").and_then(|m| m.get_mut("namespace")) {
        *n = json!(inp.namespace);
    }
    Ok((pod, note))
}

pub(super) fn proxy_resources(pod: &Value, cfg: &InjectorConfig, profile: &MeshProfile) -> Value {
    let name = cfg.proxy_name(profile);
    // The proxy is a container (classic layout) or an init container (native sidecar).
    ["/spec/containers", "/spec/initContainers"]
        .iter()
        .filter_map(|list| pod.pointer(list).and_then(Value::as_array))
        .flatten()
        .find(|c| c.get("name").and_then(Value::as_str) == Some(name))
        .and_then(|c| c.get("resources").cloned())
        .or_else(|| cfg.proxy.resources.as_ref().map(|r| json!(r)))
        .or_else(|| cfg.istio().ok().and_then(|s| s.resources.clone()))
        .unwrap_or_else(|| json!({}))
}

pub(super) fn resource_quota(inp: &Inputs, cfg: &Config) -> Outcome {
    let quotas = match &inp.cluster.quotas {
        Ok(q) => q,
        Err(e) => return unknown(e.clone()),
    };
    let c = match cfg {
        Ok(c) => &c.config,
        Err(_) => return unknown(cfg_unusable(cfg).unwrap_or_default()),
    };
    if quotas.is_empty() {
        return pass(vec![format!(
            "no ResourceQuota in namespace {}",
            inp.namespace
        )]);
    }
    let (pod, note) = match injected(inp, c) {
        Ok(x) => x,
        Err(e) => return unknown(e),
    };
    let res = proxy_resources(&pod, c, inp.profile);
    let proxy_value = |kind: &str, r: &str| {
        res.get(kind)
            .and_then(|m| m.get(r))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let mut evidence = Vec::new();
    evidence.extend(note);
    evidence.push(format!("the proxy's resources: {res}"));
    let mut problems = Vec::new();
    for q in quotas {
        let qname = q.metadata.name.as_deref().unwrap_or("?");
        let status = q.status.as_ref();
        let hard = status
            .and_then(|s| s.hard.clone())
            .or_else(|| q.spec.as_ref().and_then(|s| s.hard.clone()))
            .unwrap_or_default();
        let used = status.and_then(|s| s.used.clone()).unwrap_or_default();
        for (key, h) in &hard {
            let (kind, r) = match key.as_str() {
                "cpu" | "requests.cpu" => ("requests", "cpu"),
                "memory" | "requests.memory" => ("requests", "memory"),
                "limits.cpu" => ("limits", "cpu"),
                "limits.memory" => ("limits", "memory"),
                _ => continue,
            };
            let Some(need) = proxy_value(kind, r) else {
                if kind == "limits" {
                    problems.push(format!(
                        "quota {qname} tracks {key} but the proxy sets no {r} limit: the API server refuses pods without one"
                    ));
                }
                continue;
            };
            let u = used.get(key).map_or("0", |q| q.0.as_str());
            let (Some(hv), Some(uv), Some(nv)) = (amount(&h.0), amount(u), amount(&need)) else {
                evidence.push(format!("quota {qname} {key}: unreadable quantity"));
                continue;
            };
            let left = hv - uv;
            let line = format!(
                "quota {qname} {key}: hard {}, used {u}, the proxy needs {need}",
                h.0
            );
            if nv > left + f64::EPSILON * hv.abs().max(1.0) {
                problems.push(format!("{line}: NOT enough left"));
            } else {
                evidence.push(line);
            }
        }
    }
    if problems.is_empty() {
        return pass(evidence);
    }
    evidence.extend(problems);
    let k = &inp.profile.resources;
    fail(
        evidence,
        format!(
            "raise the quota (kubectl -n {} edit resourcequota NAME, spec.hard), or lower the proxy's share with the pod template annotations {}, {}, {}, {}",
            inp.namespace, k.cpu_request, k.memory_request, k.cpu_limit, k.memory_limit
        ),
    )
}

pub(super) fn pod_security(inp: &Inputs, cfg: &Config) -> Outcome {
    let namespace = match &inp.cluster.namespace {
        Ok(n) => n,
        Err(e) => return unknown(e.clone()),
    };
    let c = match cfg {
        Ok(c) => &c.config,
        Err(_) => return unknown(cfg_unusable(cfg).unwrap_or_default()),
    };
    let key = "pod-security.kubernetes.io/enforce";
    let raw = fetch::label(&namespace.metadata.labels, key);
    let mut evidence = Vec::new();
    let level = match raw {
        None => {
            evidence.push(format!(
                "namespace {} has no {key} label: privileged",
                inp.namespace
            ));
            Level::Privileged
        }
        Some(v) => match Level::parse(v) {
            Some(l) => {
                evidence.push(format!("namespace {} enforces {v}", inp.namespace));
                l
            }
            None => {
                evidence.push(format!(
                    "namespace {} has {key}={v:?}, not a level: Pod Security admission enforces restricted",
                    inp.namespace
                ));
                Level::Restricted
            }
        },
    };
    if level == Level::Privileged {
        return pass(evidence);
    }
    let (pod, note) = match injected(inp, c) {
        Ok(x) => x,
        Err(e) => return unknown(e),
    };
    evidence.extend(note);
    let proxy = c.proxy_name(inp.profile);
    let v = pss::violations(&pod, level);
    if v.is_empty() {
        evidence.push("every container, the proxy included, meets it".into());
        return pass(evidence);
    }
    let mut proxy_bad = false;
    let mut apps = Vec::new();
    for (container, why) in &v {
        if container == proxy {
            proxy_bad = true;
            evidence.push(format!("container {container} (the injected proxy): {why}"));
        } else {
            if !apps.contains(container) {
                apps.push(container.clone());
            }
            evidence.push(format!("container {container}: {why}"));
        }
    }
    evidence.push("the API server refuses the pod (\"violates PodSecurity\")".into());
    let mut fix = Vec::new();
    if proxy_bad {
        fix.push(format!(
            "the proxy template breaks the level: check proxy in configmap {SYSTEM_NS}/{INJECTOR} (podwire's proxy meets restricted as shipped)"
        ));
    }
    if !apps.is_empty() {
        fix.push(format!(
            "set on container(s) {}: securityContext {{allowPrivilegeEscalation: false, capabilities: {{drop: [ALL]}}, runAsNonRoot: true, runAsUser: <non-zero>, seccompProfile: {{type: RuntimeDefault}}}}; or relax the namespace: kubectl label namespace {} {key}=baseline --overwrite",
            apps.join(", "),
            inp.namespace
        ));
    }
    fail(evidence, fix.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_scale_by_suffix() {
        assert_eq!(amount("100m"), Some(0.1));
        assert_eq!(amount("128Mi"), Some(128.0 * 1024.0 * 1024.0));
        assert_eq!(amount("2"), Some(2.0));
        assert_eq!(amount("1e3"), Some(1000.0));
        assert_eq!(amount("1k"), Some(1000.0));
        assert_eq!(amount("abc"), None);
    }
}
