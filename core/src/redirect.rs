//! The redirect spec: the pod's traffic annotations and proxy identity, parsed into typed
//! values before anything is rendered. Nothing a pod author writes reaches `iptables-restore`
//! as text: only `u16` ports, masked CIDRs, checked interface names and numeric ids do.

use crate::error::{Error, Result};
use crate::{MeshProfile, PodInfo};
use ipnet::IpNet;
use std::fmt;
use std::net::IpAddr;

/// A selection that may be "everything" (`*`), "nothing" (empty) or a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection<T> {
    All,
    List(Vec<T>),
}

impl<T> Selection<T> {
    pub fn none() -> Self {
        Selection::List(Vec::new())
    }
}

/// A Linux interface name as iptables' `-i`/`-o` take it (a trailing `+` is a prefix match).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfName(String);

impl IfName {
    pub fn parse(s: &str) -> Option<IfName> {
        let body = s.strip_suffix('+').unwrap_or(s);
        let ok = !body.is_empty()
            && s.len() <= 15
            && body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'@'))
            && !body.starts_with('-')
            && body != "."
            && body != "..";
        ok.then(|| IfName(s.to_string()))
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Everything the rules depend on, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectSpec {
    pub include_inbound_ports: Selection<u16>,
    pub exclude_inbound_ports: Vec<u16>,
    pub include_outbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub include_outbound_ranges: Selection<IpNet>,
    pub exclude_outbound_ranges: Vec<IpNet>,
    pub exclude_interfaces: Vec<IfName>,
    pub proxy_uid: u32,
    pub proxy_gid: u32,
}

impl RedirectSpec {
    /// The spec for a pod with no traffic annotations.
    pub fn defaults(profile: &MeshProfile) -> Self {
        RedirectSpec {
            include_inbound_ports: Selection::All,
            exclude_inbound_ports: profile.ports.inbound_excluded.clone(),
            include_outbound_ports: Vec::new(),
            exclude_outbound_ports: profile.ports.outbound_excluded.clone(),
            include_outbound_ranges: Selection::All,
            exclude_outbound_ranges: Vec::new(),
            exclude_interfaces: Vec::new(),
            proxy_uid: profile.proxy_uid,
            proxy_gid: profile.proxy_gid,
        }
    }

    /// Build the spec from a mesh pod, as Istio's CNI does: annotations on top of the defaults;
    /// the mesh's own ports are always excluded (user values first, duplicates dropped).
    pub fn from_pod(pod: &PodInfo, profile: &MeshProfile) -> Result<Self> {
        let keys = &profile.traffic;
        let mut spec = Self::defaults(profile);
        if let Some(v) = pod.annotation(keys.include_inbound_ports) {
            spec.include_inbound_ports =
                parse_selection(keys.include_inbound_ports, v, parse_port)?;
        }
        if let Some(v) = pod.annotation(keys.exclude_inbound_ports) {
            spec.exclude_inbound_ports = merged(
                parse_list(keys.exclude_inbound_ports, v, parse_port)?,
                &profile.ports.inbound_excluded,
            );
        }
        if let Some(v) = pod.annotation(keys.include_outbound_ports) {
            spec.include_outbound_ports =
                dedup(parse_list(keys.include_outbound_ports, v, parse_port)?);
        }
        if let Some(v) = pod.annotation(keys.exclude_outbound_ports) {
            spec.exclude_outbound_ports = merged(
                parse_list(keys.exclude_outbound_ports, v, parse_port)?,
                &profile.ports.outbound_excluded,
            );
        }
        if let Some(v) = pod.annotation(keys.include_outbound_ip_ranges) {
            spec.include_outbound_ranges =
                match parse_selection(keys.include_outbound_ip_ranges, v, parse_cidr)? {
                    Selection::List(l) => Selection::List(dedup(l)),
                    all => all,
                };
        }
        if let Some(v) = pod.annotation(keys.exclude_outbound_ip_ranges) {
            spec.exclude_outbound_ranges =
                dedup(parse_list(keys.exclude_outbound_ip_ranges, v, parse_cidr)?);
        }
        if let Some(v) = pod.annotation(keys.exclude_interfaces) {
            spec.exclude_interfaces = dedup(parse_list(keys.exclude_interfaces, v, |s| {
                IfName::parse(s).ok_or_else(|| {
                    "not an interface name (1-15 of A-Z a-z 0-9 _ . - @, optional trailing +)"
                        .into()
                })
            })?);
        }
        if let Some(sc) = pod
            .container(profile.proxy_container)
            .and_then(|c| c.security_context.as_ref())
        {
            let container = profile.proxy_container;
            if let Some(uid) = sc.run_as_user {
                spec.proxy_uid = owner_id(container, "runAsUser", uid)?;
                // Istio: without runAsGroup the group follows the user.
                spec.proxy_gid = spec.proxy_uid;
            }
            if let Some(gid) = sc.run_as_group {
                spec.proxy_gid = owner_id(container, "runAsGroup", gid)?;
            }
        }
        Ok(spec)
    }
}

fn owner_id(container: &str, field: &'static str, value: i64) -> Result<u32> {
    let err = |reason| Error::InvalidOwner {
        container: container.to_string(),
        field,
        value,
        reason,
    };
    let id = u32::try_from(value).map_err(|_| err("must be between 1 and 4294967294"))?;
    if id == 0 {
        // Matching uid 0 would exempt every root process in the pod from redirection.
        return Err(err("the proxy must not run as root (0)"));
    }
    if id == u32::MAX {
        return Err(err("must be between 1 and 4294967294"));
    }
    Ok(id)
}

fn invalid(key: &str, value: &str, reason: impl Into<String>) -> Error {
    Error::InvalidAnnotation {
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Comma-separated items; blanks around commas and a trailing comma are tolerated (as Istio's
/// `split` does), anything else inside an item must parse as a typed value.
fn parse_list<T>(
    key: &str,
    value: &str,
    item: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>> {
    if value.len() > 4096 {
        // The error quotes the start only, cut on a character (a byte index may split one).
        let head = value
            .char_indices()
            .nth(64)
            .map_or(value, |(i, _)| &value[..i]);
        return Err(invalid(key, head, "longer than 4096 bytes"));
    }
    value
        .split(',')
        .map(|s| s.trim_matches(|c| c == ' '))
        .filter(|s| !s.is_empty())
        .map(|s| item(s).map_err(|reason| invalid(key, value, format!("{s:?}: {reason}"))))
        .collect()
}

fn parse_selection<T>(
    key: &str,
    value: &str,
    item: impl Fn(&str) -> Result<T, String>,
) -> Result<Selection<T>> {
    if value.trim_matches(' ') == "*" {
        return Ok(Selection::All);
    }
    parse_list(key, value, item).map(Selection::List)
}

fn parse_port(s: &str) -> Result<u16, String> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err("not a port number (1-65535)".into());
    }
    match s.parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        _ => Err("port out of range (1-65535)".into()),
    }
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    const HELP: &str = "not a CIDR (e.g. 10.0.0.0/8 or fd00::/8)";
    // Strict, as Istio's parser (Go's netip.ParsePrefix): the address through std's parser,
    // which refuses leading zeros (`010.0.0.0` reads as octal elsewhere), and a prefix length
    // in plain decimal (`/08` is refused too).
    let (addr, len) = s.split_once('/').ok_or(HELP)?;
    let addr: IpAddr = addr.parse().map_err(|_| {
        if addr.split('.').any(|o| o.len() > 1 && o.starts_with('0')) {
            "not a CIDR: an IPv4 octet has a leading zero (ambiguous: octal or decimal?)"
                .to_string()
        } else {
            HELP.to_string()
        }
    })?;
    if len.is_empty()
        || len.len() > 3
        || !len.bytes().all(|b| b.is_ascii_digit())
        || (len.len() > 1 && len.starts_with('0'))
    {
        return Err(format!(
            "not a CIDR: prefix length {len:?} must be a decimal number without leading zeros"
        ));
    }
    let len: u8 = len.parse().map_err(|_| HELP.to_string())?;
    IpNet::new(addr, len)
        .map(|n| n.trunc())
        .map_err(|_| format!("not a CIDR: prefix length {len} is too long for {addr}"))
}

fn dedup<T: PartialEq>(items: Vec<T>) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(items.len());
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

fn merged(user: Vec<u16>, always: &[u16]) -> Vec<u16> {
    dedup(user.into_iter().chain(always.iter().copied()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_with(annotations: &[(&str, &str)]) -> PodInfo {
        let mut pod = PodInfo::default();
        for (k, v) in annotations {
            pod.metadata
                .annotations
                .insert(k.to_string(), v.to_string());
        }
        pod
    }

    #[test]
    fn defaults_without_annotations() {
        let p = MeshProfile::istio();
        assert_eq!(
            RedirectSpec::from_pod(&PodInfo::default(), &p),
            Ok(RedirectSpec::defaults(&p))
        );
    }

    #[test]
    fn parses_every_key() {
        let p = MeshProfile::istio();
        let spec = RedirectSpec::from_pod(
            &pod_with(&[
                ("traffic.sidecar.istio.io/includeInboundPorts", "80, 443,"),
                ("traffic.sidecar.istio.io/excludeInboundPorts", "9000,15021"),
                ("traffic.sidecar.istio.io/includeOutboundPorts", "3306"),
                ("traffic.sidecar.istio.io/excludeOutboundPorts", "5432"),
                (
                    "traffic.sidecar.istio.io/includeOutboundIPRanges",
                    "10.1.2.3/8,fd00::/8",
                ),
                (
                    "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                    "169.254.169.254/32",
                ),
                ("traffic.sidecar.istio.io/excludeInterfaces", "eth1,net+"),
            ]),
            &p,
        )
        .expect("valid");
        assert_eq!(spec.include_inbound_ports, Selection::List(vec![80, 443]));
        assert_eq!(spec.exclude_inbound_ports, vec![9000, 15021, 15020, 15090]);
        assert_eq!(spec.include_outbound_ports, vec![3306]);
        assert_eq!(spec.exclude_outbound_ports, vec![5432, 15020]);
        assert_eq!(
            spec.include_outbound_ranges,
            Selection::List(vec![
                "10.0.0.0/8".parse().expect("cidr"),
                "fd00::/8".parse().expect("cidr")
            ])
        );
        assert_eq!(spec.exclude_interfaces.len(), 2);
    }

    #[test]
    fn empty_include_means_nothing() {
        let p = MeshProfile::istio();
        let spec = RedirectSpec::from_pod(
            &pod_with(&[
                ("traffic.sidecar.istio.io/includeInboundPorts", ""),
                ("traffic.sidecar.istio.io/includeOutboundIPRanges", ""),
            ]),
            &p,
        )
        .expect("valid");
        assert_eq!(spec.include_inbound_ports, Selection::none());
        assert_eq!(spec.include_outbound_ranges, Selection::none());
    }

    #[test]
    fn hostile_values_are_rejected_naming_key_and_value() {
        let p = MeshProfile::istio();
        for (key, value) in [
            (
                "traffic.sidecar.istio.io/excludeInboundPorts",
                "80\n-A OUTPUT -j ACCEPT",
            ),
            ("traffic.sidecar.istio.io/excludeInboundPorts", "80;reboot"),
            ("traffic.sidecar.istio.io/includeInboundPorts", "0"),
            ("traffic.sidecar.istio.io/includeOutboundPorts", "65536"),
            (
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                "10.0.0.0/8 -j DROP",
            ),
            (
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                "10.0.0.1",
            ),
            ("traffic.sidecar.istio.io/includeOutboundIPRanges", "'*'"),
            // Leading zeros: octal to some parsers, decimal to others (Istio refuses them).
            (
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                "010.0.0.0/8",
            ),
            (
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                "10.0.0.0/08",
            ),
            (
                "traffic.sidecar.istio.io/includeOutboundIPRanges",
                "fd00::/0128",
            ),
            (
                "traffic.sidecar.istio.io/includeOutboundIPRanges",
                "10.0.0.0/33",
            ),
            (
                "traffic.sidecar.istio.io/includeOutboundIPRanges",
                "10.0.0.0/+8",
            ),
            (
                "traffic.sidecar.istio.io/excludeInterfaces",
                "eth0 -j ACCEPT",
            ),
            ("traffic.sidecar.istio.io/excludeInterfaces", "-j"),
            (
                "traffic.sidecar.istio.io/excludeInterfaces",
                "averyveryverylongname",
            ),
        ] {
            match RedirectSpec::from_pod(&pod_with(&[(key, value)]), &p) {
                Err(Error::InvalidAnnotation {
                    key: k, value: v, ..
                }) => {
                    assert_eq!((k.as_str(), v.as_str()), (key, value))
                }
                other => panic!("{key}={value:?} must be rejected, got {other:?}"),
            }
        }
    }

    #[test]
    fn proxy_identity_from_security_context() {
        let p = MeshProfile::istio();
        let mut pod: PodInfo = serde_json::from_value(serde_json::json!({
            "spec": {"containers": [{"name": "istio-proxy",
                "securityContext": {"runAsUser": 2000}}]}
        }))
        .expect("pod");
        let spec = RedirectSpec::from_pod(&pod, &p).expect("valid");
        assert_eq!((spec.proxy_uid, spec.proxy_gid), (2000, 2000));
        pod.spec.containers[0]
            .security_context
            .as_mut()
            .expect("sc")
            .run_as_group = Some(3000);
        let spec = RedirectSpec::from_pod(&pod, &p).expect("valid");
        assert_eq!((spec.proxy_uid, spec.proxy_gid), (2000, 3000));
        pod.spec.containers[0]
            .security_context
            .as_mut()
            .expect("sc")
            .run_as_user = Some(0);
        assert!(matches!(
            RedirectSpec::from_pod(&pod, &p),
            Err(Error::InvalidOwner {
                field: "runAsUser",
                ..
            })
        ));
    }

    #[test]
    fn proxy_identity_from_a_native_sidecar() {
        let pod: PodInfo = serde_json::from_value(serde_json::json!({
            "spec": {"initContainers": [{"name": "istio-proxy", "restartPolicy": "Always",
                "securityContext": {"runAsUser": 2100, "runAsGroup": 2200}}],
                "containers": [{"name": "app"}]}
        }))
        .expect("pod");
        let spec = RedirectSpec::from_pod(&pod, &MeshProfile::istio()).expect("valid");
        assert_eq!((spec.proxy_uid, spec.proxy_gid), (2100, 2200));
    }
}
