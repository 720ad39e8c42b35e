//! podwire-cni's reading of a pod's traffic annotations and proxy identity, and the rules it
//! renders from them: a value is either refused (the webhook refuses the same pod before
//! admitting it) or becomes rules where every argument is one plain token of the kind its
//! option takes, in the family's own addresses, with the proxy's identity exempted, so that
//! no annotation can add an option, a rule, a line or a chain of its own.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use podwire_core::pod::{Container, SecurityContext};
use podwire_core::render::{render, Family};
use podwire_core::{MeshProfile, PodInfo, RedirectSpec};

const VALUES: &[&str] = &[
    "*",
    "",
    " ",
    ",",
    "80",
    "80,443",
    "1-100",
    "0",
    "65535",
    "65536",
    "15001",
    "15006",
    "15020",
    "10.0.0.0/8",
    "10.0.0.1",
    "0.0.0.0/0",
    "::/0",
    "fd00::/8",
    "::1",
    "10.0.0.0/8,fd00::/8",
    "1.2.3.4/33",
    "eth0",
    "eth+",
    "net1,net2",
    "lo",
    "-j ACCEPT",
    "80\n-A OUTPUT -j ACCEPT",
    "80 -j RETURN",
    "$(id)",
    "`id`",
    "eth0;reboot",
    "\u{0}",
    "a b",
    "--uid-owner",
    "!",
];

#[derive(Arbitrary, Debug)]
enum Text {
    Known(u8),
    Joined(Vec<u8>),
    Free(String),
}

impl Text {
    fn get(&self) -> String {
        match self {
            Text::Known(i) => VALUES[*i as usize % VALUES.len()].to_string(),
            Text::Joined(parts) => parts
                .iter()
                .map(|i| VALUES[*i as usize % VALUES.len()])
                .collect::<Vec<_>>()
                .join(","),
            Text::Free(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    annotations: Vec<(u8, Text)>,
    run_as_user: Option<i64>,
    run_as_group: Option<i64>,
}

/// Whether `arg` is one token iptables reads as a single word, of the characters rules use.
fn plain(arg: &str) -> bool {
    !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/+!@".contains(c))
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = Input::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    let profile = MeshProfile::istio();
    let keys = profile.traffic.all();
    let mut pod = PodInfo::default();
    for (k, v) in &input.annotations {
        pod.metadata
            .annotations
            .insert(keys[*k as usize % keys.len()].to_string(), v.get());
    }
    pod.spec.containers.push(Container {
        name: profile.proxy_container.to_string(),
        security_context: Some(SecurityContext {
            run_as_user: input.run_as_user,
            run_as_group: input.run_as_group,
        }),
        ..Default::default()
    });
    let Ok(spec) = RedirectSpec::from_pod(&pod, &profile) else {
        return;
    };
    for family in [Family::V4, Family::V6] {
        let set = render(&spec, &profile, family);
        for r in &set.rules {
            assert!(
                set.chains.contains(&r.chain)
                    || ["PREROUTING", "OUTPUT"].contains(&r.chain.as_str()),
                "a rule in a chain of its own: {r:?}"
            );
            for a in &r.args {
                assert!(plain(a), "argument {a:?} is not one plain token: {r:?}");
            }
            // Addresses are the family's own: iptables-restore would refuse the whole set.
            for w in r.args.windows(2) {
                if w[0] == "-d" || w[0] == "-s" {
                    let net: ipnet::IpNet = w[1]
                        .parse()
                        .unwrap_or_else(|e| panic!("{:?} after {}: {e}", w[1], w[0]));
                    assert!(
                        matches!(
                            (family, net),
                            (Family::V4, ipnet::IpNet::V4(_)) | (Family::V6, ipnet::IpNet::V6(_))
                        ),
                        "{net} in the {family:?} rules"
                    );
                }
            }
        }
        // The proxy's own traffic is exempted, by the identity the pod gives it.
        let uid = spec.proxy_uid.to_string();
        assert!(
            set.rules.iter().any(|r| r
                .args
                .windows(2)
                .any(|w| w[0] == "--uid-owner" && w[1] == uid)),
            "no exemption for uid {uid}"
        );
        // One line per chain and rule, between the table and COMMIT.
        let text = set.to_restore_input();
        assert_eq!(
            text.lines().count(),
            2 + set.chains.len() + set.rules.len(),
            "{text}"
        );
    }
});
