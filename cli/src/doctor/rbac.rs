//! Static RBAC evaluation: does what is bound to podwire's service accounts grant what the
//! components call? The way the API server's RBAC authorizer adds rules up (no deny rules):
//! ClusterRoleBindings grant everywhere, RoleBindings only in their namespace.

use super::fetch::{Rbac, SYSTEM_NS};
use k8s_openapi::api::rbac::v1::{PolicyRule, RoleRef, Subject};
use podwire_core::node::Repair;

/// One permission a component needs. `verbs` lists alternatives: any one of them will do
/// (the agent's repair needs `patch` for `--repair=label` or `delete` for `--repair=delete`).
#[derive(Debug, Clone)]
pub struct Need {
    pub group: &'static str,
    pub resource: &'static str,
    pub verbs: Vec<&'static str>,
    /// `None`: cluster-wide (all namespaces, or a cluster-scoped resource).
    pub namespace: Option<&'static str>,
    /// Restricted to this object name (a rule with `resourceNames` must include it).
    pub name: Option<&'static str>,
}

fn need(
    group: &'static str,
    resource: &'static str,
    verbs: &[&'static str],
    namespace: Option<&'static str>,
    name: Option<&'static str>,
) -> Vec<Need> {
    verbs
        .iter()
        .map(|v| Need {
            group,
            resource,
            verbs: vec![v],
            namespace,
            name,
        })
        .collect()
}

/// README.md "RBAC the agent needs". `repair` is the agent's `--repair` mode.
pub fn agent_needs(repair: Repair) -> Vec<Need> {
    let mut n = need("", "pods", &["get", "list", "watch"], None, None);
    match repair {
        Repair::Off => {}
        Repair::Delete => n.extend(need("", "pods", &["delete"], None, None)),
        Repair::Label => n.extend(need("", "pods", &["patch"], None, None)),
    }
    n.extend(need("", "nodes", &["get", "patch"], None, None));
    n.extend(need("", "nodes/status", &["patch"], None, None));
    n.extend(need(
        "events.k8s.io",
        "events",
        &["create", "patch"],
        None,
        None,
    ));
    n.extend(need(
        "apps",
        "daemonsets",
        &["get"],
        Some(SYSTEM_NS),
        Some("podwire-agent"),
    ));
    n
}

/// install/base/injector-rbac.yaml.
pub fn injector_needs() -> Vec<Need> {
    let mut n = need("", "namespaces", &["get", "list", "watch"], None, None);
    n.extend(need("", "nodes", &["get", "list", "watch"], None, None));
    n.extend(need(
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
        &["get", "list", "watch", "patch"],
        None,
        Some(super::fetch::WEBHOOK_CONFIG),
    ));
    n.extend(need(
        "",
        "secrets",
        &["get", "list", "watch", "update", "patch"],
        Some(SYSTEM_NS),
        Some(super::fetch::INJECTOR_SECRET),
    ));
    n.extend(need("", "secrets", &["create"], Some(SYSTEM_NS), None));
    n.extend(need(
        "coordination.k8s.io",
        "leases",
        &["get", "update", "patch"],
        Some(SYSTEM_NS),
        Some("podwire-injector-leader"),
    ));
    n.extend(need(
        "coordination.k8s.io",
        "leases",
        &["create"],
        Some(SYSTEM_NS),
        None,
    ));
    n.extend(need("", "events", &["create"], Some(SYSTEM_NS), None));
    n
}

/// Is `subject` the service account `sa` in `ns` (directly, as its user name, or through
/// the service-account groups)?
fn names(subject: &Subject, ns: &str, sa: &str) -> bool {
    match subject.kind.as_str() {
        "ServiceAccount" => subject.name == sa && subject.namespace.as_deref() == Some(ns),
        "User" => subject.name == format!("system:serviceaccount:{ns}:{sa}"),
        "Group" => {
            subject.name == "system:serviceaccounts"
                || subject.name == format!("system:serviceaccounts:{ns}")
                || subject.name == "system:authenticated"
        }
        _ => false,
    }
}

fn has(list: &Option<Vec<String>>, want: &str) -> bool {
    list.as_ref()
        .is_some_and(|l| l.iter().any(|x| x == want || x == "*"))
}

fn covers(rule: &PolicyRule, n: &Need, verb: &str) -> bool {
    let resource_ok = rule.resources.as_ref().is_some_and(|rs| {
        rs.iter().any(|r| {
            r == "*"
                || r == n.resource
                // `pods/*` covers pods' subresources; `*/status` every status subresource.
                || n.resource.split_once('/').is_some_and(|(base, sub)| {
                    *r == format!("{base}/*") || *r == format!("*/{sub}")
                })
        })
    });
    let names_ok = match rule.resource_names.as_deref() {
        None | Some([]) => true,
        Some(names) => n.name.is_some_and(|want| names.iter().any(|x| x == want)),
    };
    has(&rule.api_groups, n.group)
        && resource_ok
        && rule.verbs.iter().any(|v| v == verb || v == "*")
        && names_ok
}

/// The rules of `role_ref` (a Role is looked up in `binding_ns`).
fn rules<'a>(rbac: &'a Rbac, role_ref: &RoleRef, binding_ns: Option<&str>) -> Vec<&'a PolicyRule> {
    let from = |r: &'a Option<Vec<PolicyRule>>| r.iter().flatten().collect::<Vec<_>>();
    match role_ref.kind.as_str() {
        "ClusterRole" => rbac
            .cluster_roles
            .iter()
            .find(|r| r.metadata.name.as_deref() == Some(role_ref.name.as_str()))
            .map(|r| from(&r.rules))
            .unwrap_or_default(),
        "Role" => rbac
            .roles
            .iter()
            .find(|r| {
                r.metadata.name.as_deref() == Some(role_ref.name.as_str())
                    && r.metadata.namespace.as_deref() == binding_ns
            })
            .map(|r| from(&r.rules))
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// Every need of `sa` (in `ns`) that nothing bound to it grants, as `(group, resource, verb)`
/// strings for the report; empty when all is granted.
pub fn missing(rbac: &Rbac, ns: &str, sa: &str, needs: &[Need]) -> Vec<String> {
    // (namespace the rules apply in: None = everywhere, the rules)
    let mut grants: Vec<(Option<&str>, Vec<&PolicyRule>)> = Vec::new();
    for b in &rbac.cluster_role_bindings {
        if b.subjects.iter().flatten().any(|s| names(s, ns, sa)) {
            grants.push((None, rules(rbac, &b.role_ref, None)));
        }
    }
    for b in &rbac.role_bindings {
        if b.subjects.iter().flatten().any(|s| names(s, ns, sa)) {
            let bns = b.metadata.namespace.as_deref();
            grants.push((bns, rules(rbac, &b.role_ref, bns)));
        }
    }
    let mut out = Vec::new();
    for n in needs {
        let granted = n.verbs.iter().any(|verb| {
            grants.iter().any(|(scope, rules)| {
                let in_scope = match (scope, n.namespace) {
                    (None, _) => true,
                    (Some(bns), Some(need_ns)) => *bns == need_ns,
                    (Some(_), None) => false,
                };
                in_scope && rules.iter().any(|r| covers(r, n, verb))
            })
        });
        if !granted {
            let group = if n.group.is_empty() {
                "\"\" (core)"
            } else {
                n.group
            };
            let mut s = format!("({group}, {}, {})", n.resource, n.verbs.join("|"));
            match (n.namespace, n.name) {
                (Some(ns), Some(name)) => s.push_str(&format!(" on {name} in {ns}")),
                (Some(ns), None) => s.push_str(&format!(" in {ns}")),
                (None, Some(name)) => s.push_str(&format!(" on {name}")),
                (None, None) => {}
            }
            out.push(s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse<T: serde::de::DeserializeOwned>(v: &serde_json::Value, k: &str) -> Vec<T> {
        serde_json::from_value(v.get(k).cloned().unwrap_or(json!([]))).expect(k)
    }

    fn rbac(v: serde_json::Value) -> Rbac {
        Rbac {
            cluster_roles: parse(&v, "cr"),
            cluster_role_bindings: parse(&v, "crb"),
            roles: parse(&v, "r"),
            role_bindings: parse(&v, "rb"),
        }
    }

    #[test]
    fn a_role_binding_grants_only_in_its_namespace() {
        let sa =
            json!([{"kind": "ServiceAccount", "name": "podwire-injector", "namespace": SYSTEM_NS}]);
        let everything = json!({"metadata": {"name": "all"},
            "rules": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]});
        let role_ref =
            json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "all"});
        // Bound in another namespace: nothing in podwire-system, nothing cluster-wide.
        let elsewhere = rbac(json!({"cr": [everything],
            "rb": [{"metadata": {"name": "b", "namespace": "other"}, "roleRef": role_ref, "subjects": sa}]}));
        let m = missing(&elsewhere, SYSTEM_NS, "podwire-injector", &injector_needs());
        assert_eq!(m.len(), injector_needs().len(), "{m:?}");
        // Bound in podwire-system: only the cluster-wide needs are missing.
        let here = rbac(json!({"cr": [everything],
            "rb": [{"metadata": {"name": "b", "namespace": SYSTEM_NS}, "roleRef": role_ref, "subjects": sa}]}));
        let m = missing(&here, SYSTEM_NS, "podwire-injector", &injector_needs());
        assert_eq!(
            m.len(),
            10,
            "namespaces x3, nodes x3, mutatingwebhookconfigurations x4: {m:?}"
        );
        // Cluster-wide through the service-account group.
        let group = rbac(json!({"cr": [everything],
            "crb": [{"metadata": {"name": "b"}, "roleRef": role_ref,
                     "subjects": [{"kind": "Group", "name": "system:serviceaccounts:podwire-system"}]}]}));
        assert!(missing(&group, SYSTEM_NS, "podwire-injector", &injector_needs()).is_empty());
    }

    #[test]
    fn resource_names_must_include_the_object() {
        let sa =
            json!([{"kind": "ServiceAccount", "name": "podwire-agent", "namespace": SYSTEM_NS}]);
        let r = rbac(json!({
            "r": [{"metadata": {"name": "ds", "namespace": SYSTEM_NS},
                   "rules": [{"apiGroups": ["apps"], "resources": ["daemonsets"],
                              "resourceNames": ["something-else"], "verbs": ["get"]}]}],
            "rb": [{"metadata": {"name": "ds", "namespace": SYSTEM_NS},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "ds"},
                    "subjects": sa}]}));
        let need = need(
            "apps",
            "daemonsets",
            &["get"],
            Some(SYSTEM_NS),
            Some("podwire-agent"),
        );
        assert_eq!(
            missing(&r, SYSTEM_NS, "podwire-agent", &need),
            ["(apps, daemonsets, get) on podwire-agent in podwire-system"]
        );
    }
}
