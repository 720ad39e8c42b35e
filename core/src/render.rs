//! Rendering a [`RedirectSpec`] into `iptables-restore --noflush` input, rule for rule what
//! Istio's sidecar CNI programs (same chains, same order), for IPv4 and IPv6.

use crate::redirect::Selection;
use crate::{MeshProfile, RedirectSpec};
use ipnet::IpNet;
use std::fmt::Write as _;
use std::net::IpAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    fn owns(self, net: &IpNet) -> bool {
        matches!(
            (self, net),
            (Family::V4, IpNet::V4(_)) | (Family::V6, IpNet::V6(_))
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// One rule: the chain it is appended to and its match/target arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub chain: String,
    pub args: Vec<String>,
}

/// The nat-table rules for one address family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    pub family: Family,
    /// Chains this rule set creates (`-N`).
    pub chains: Vec<String>,
    pub rules: Vec<Rule>,
}

impl RuleSet {
    /// `iptables-restore --noflush` input, in the layout of Istio's rule builder.
    pub fn to_restore_input(&self) -> String {
        let mut out = String::from("* nat\n");
        for c in &self.chains {
            let _ = writeln!(out, "-N {c}");
        }
        for r in &self.rules {
            let _ = writeln!(out, "-A {} {}", r.chain, r.args.join(" "));
        }
        out.push_str("COMMIT\n");
        out
    }

    /// Rules appended to built-in chains (PREROUTING, OUTPUT): the entry points.
    pub fn entry_rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules
            .iter()
            .filter(|r| !self.chains.contains(&r.chain))
    }
}

struct Builder {
    family: Family,
    rules: Vec<Rule>,
}

impl Builder {
    fn add(&mut self, chain: &str, args: &[&str]) {
        self.rules.push(Rule {
            chain: chain.to_string(),
            args: args.iter().map(|s| s.to_string()).collect(),
        });
    }
}

/// Render the spec for one family. The order follows Istio's `IptablesConfigurator::Run`.
pub fn render(spec: &RedirectSpec, profile: &MeshProfile, family: Family) -> RuleSet {
    let ch = &profile.chains;
    let ports = &profile.ports;
    let mut b = Builder {
        family,
        rules: Vec::new(),
    };
    let (tunnel, outbound, inbound) = (
        ports.tunnel.to_string(),
        ports.outbound.to_string(),
        ports.inbound.to_string(),
    );

    for iface in &spec.exclude_interfaces {
        let i = iface.to_string();
        b.add("PREROUTING", &["-i", &i, "-j", "RETURN"]);
        b.add("OUTPUT", &["-o", &i, "-j", "RETURN"]);
    }
    b.add(
        ch.inbound,
        &["-p", "tcp", "--dport", &tunnel, "-j", "RETURN"],
    );
    b.add(
        ch.redirect,
        &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &outbound],
    );
    b.add(
        ch.in_redirect,
        &["-p", "tcp", "-j", "REDIRECT", "--to-ports", &inbound],
    );

    // Inbound: nothing is captured when the include list is empty.
    match &spec.include_inbound_ports {
        Selection::List(l) if l.is_empty() => {}
        Selection::All => {
            b.add("PREROUTING", &["-p", "tcp", "-j", ch.inbound]);
            for p in &spec.exclude_inbound_ports {
                b.add(
                    ch.inbound,
                    &["-p", "tcp", "--dport", &p.to_string(), "-j", "RETURN"],
                );
            }
            b.add(ch.inbound, &["-p", "tcp", "-j", ch.in_redirect]);
        }
        Selection::List(l) => {
            b.add("PREROUTING", &["-p", "tcp", "-j", ch.inbound]);
            for p in l {
                b.add(
                    ch.inbound,
                    &["-p", "tcp", "--dport", &p.to_string(), "-j", ch.in_redirect],
                );
            }
        }
    }

    // Outbound.
    b.add("OUTPUT", &["-j", ch.output]);
    for p in &spec.exclude_outbound_ports {
        let p = p.to_string();
        b.add(ch.output, &["-p", "tcp", "--dport", &p, "-j", "RETURN"]);
        b.add(ch.output, &["-p", "udp", "--dport", &p, "-j", "RETURN"]);
    }
    let passthrough = match family {
        Family::V4 => profile.inbound_passthrough_v4,
        Family::V6 => profile.inbound_passthrough_v6,
    };
    b.add(ch.output, &["-o", "lo", "-s", passthrough, "-j", "RETURN"]);

    // Istio keeps app->app loopback traffic un-redirected unless loopback is explicitly included.
    let includes_loopback = match &spec.include_outbound_ranges {
        Selection::All => false,
        Selection::List(l) => l.iter().any(|n| {
            n.contains(&IpAddr::from([127, 0, 0, 1]))
                || n.contains(&IpAddr::from(std::net::Ipv6Addr::LOCALHOST))
        }),
    };
    let lo = family.loopback();
    for (flag, id) in [
        ("--uid-owner", spec.proxy_uid),
        ("--gid-owner", spec.proxy_gid),
    ] {
        let id = id.to_string();
        b.add(
            ch.output,
            &[
                "-o",
                "lo",
                "!",
                "-d",
                lo,
                "-p",
                "tcp",
                "!",
                "--dport",
                &tunnel,
                "-m",
                "owner",
                flag,
                &id,
                "-j",
                ch.in_redirect,
            ],
        );
        if !includes_loopback {
            b.add(
                ch.output,
                &["-o", "lo", "-m", "owner", "!", flag, &id, "-j", "RETURN"],
            );
        }
        b.add(ch.output, &["-m", "owner", flag, &id, "-j", "RETURN"]);
    }
    b.add(ch.output, &["-d", lo, "-j", "RETURN"]);
    for net in spec
        .exclude_outbound_ranges
        .iter()
        .filter(|n| family.owns(n))
    {
        b.add(ch.output, &["-d", &net.to_string(), "-j", "RETURN"]);
    }
    for p in &spec.include_outbound_ports {
        b.add(
            ch.output,
            &["-p", "tcp", "--dport", &p.to_string(), "-j", ch.redirect],
        );
    }
    match &spec.include_outbound_ranges {
        Selection::All => b.add(ch.output, &["-j", ch.redirect]),
        Selection::List(l) => {
            let mine: Vec<&IpNet> = l.iter().filter(|n| b.family.owns(n)).collect();
            if !mine.is_empty() {
                for net in mine {
                    b.add(ch.output, &["-d", &net.to_string(), "-j", ch.redirect]);
                }
                b.add(ch.output, &["-j", "RETURN"]);
            }
        }
    }

    RuleSet {
        family,
        chains: ch.all().iter().map(|s| s.to_string()).collect(),
        rules: b.rules,
    }
}
