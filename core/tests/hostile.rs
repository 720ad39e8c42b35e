//! Property tests: whatever a pod author writes in a traffic annotation, the rendered rules
//! either equal the rules of some typed value or the annotation is rejected. No text from
//! the annotation reaches `iptables-restore` except as a parsed port, CIDR or interface name.

use podwire_core::render::render;
use podwire_core::{Family, MeshProfile, PodInfo, RedirectSpec};
use proptest::prelude::*;

const KEYS: [&str; 7] = [
    "traffic.sidecar.istio.io/includeInboundPorts",
    "traffic.sidecar.istio.io/excludeInboundPorts",
    "traffic.sidecar.istio.io/includeOutboundPorts",
    "traffic.sidecar.istio.io/excludeOutboundPorts",
    "traffic.sidecar.istio.io/includeOutboundIPRanges",
    "traffic.sidecar.istio.io/excludeOutboundIPRanges",
    "traffic.sidecar.istio.io/excludeInterfaces",
];

fn pod(key: &str, value: &str) -> PodInfo {
    let mut p = PodInfo::default();
    p.metadata.annotations.insert(key.into(), value.into());
    p
}

/// Values built from valid pieces glued with hostile ones.
fn hostile_value() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("80".to_string()),
        Just("10.0.0.0/8".to_string()),
        Just("eth0".to_string()),
        Just("*".to_string()),
        Just("\n-A OUTPUT -j ACCEPT\n".to_string()),
        Just("-j".to_string()),
        Just(";".to_string()),
        Just("\"".to_string()),
        Just("'".to_string()),
        Just(" ".to_string()),
        Just("$(reboot)".to_string()),
        Just("COMMIT".to_string()),
        Just("\t".to_string()),
        Just("\r".to_string()),
        "[ -~]{0,6}",
    ];
    prop::collection::vec(piece, 1..5).prop_map(|v| v.join(""))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn annotation_text_never_reaches_the_rules(key_idx in 0usize..KEYS.len(), value in hostile_value()) {
        let p = MeshProfile::istio();
        let key = KEYS[key_idx];
        if let Ok(spec) = RedirectSpec::from_pod(&pod(key, &value), &p) {
            for fam in [Family::V4, Family::V6] {
                let input = render(&spec, &p, fam).to_restore_input();
                // Every line is one rule: no injected newline or second table survives.
                prop_assert_eq!(input.lines().filter(|l| *l == "COMMIT").count(), 1);
                prop_assert_eq!(input.lines().filter(|l| l.starts_with('*')).count(), 1);
                for line in input.lines() {
                    prop_assert!(!line.contains(['"', '\'', ';', '$', '\t', '\r', '`']), "line {:?}", line);
                    prop_assert!(line == "* nat" || line == "COMMIT" || line.starts_with("-N ") || line.starts_with("-A "));
                }
                // The accepted value is exactly a list of typed items.
                for item in value.split(',').map(|s| s.trim_matches(' ')).filter(|s| !s.is_empty()) {
                    let typed = item == "*"
                        || item.parse::<u16>().is_ok()
                        || item.parse::<ipnet::IpNet>().is_ok()
                        || item.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-@+".contains(&b));
                    prop_assert!(typed, "accepted untyped item {:?} of {:?}", item, value);
                }
            }
        } else {
            let err = RedirectSpec::from_pod(&pod(key, &value), &p).expect_err("rejected");
            let msg = err.to_string();
            prop_assert!(msg.contains(key), "error must name the annotation: {}", msg);
        }
    }

    /// A value over the 4096-byte limit is refused whatever characters it holds; the error
    /// quotes its start, cut on a character boundary (a byte index inside a multibyte
    /// character used to panic, aborting the injector on one pod's CREATE).
    #[test]
    fn an_overlong_value_is_refused_not_a_panic(
        key_idx in 0usize..KEYS.len(),
        unit in prop_oneof![Just("€"), Just("é"), Just("𝄞"), Just("8"), Just("a,")],
        lead in "[a-z0-9]{0,3}",
        count in 4097usize..6000,
    ) {
        let p = MeshProfile::istio();
        let key = KEYS[key_idx];
        let value = format!("{lead}{}", unit.repeat(count));
        let err = RedirectSpec::from_pod(&pod(key, &value), &p).expect_err("refused");
        let msg = err.to_string();
        prop_assert!(msg.contains(key) && msg.contains("longer than 4096 bytes"), "{}", msg);
        prop_assert!(msg.len() < 1024, "the error quotes the start only: {} bytes", msg.len());
    }
}
