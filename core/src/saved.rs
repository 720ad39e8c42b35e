//! Reading `iptables-save -t nat` output back, to verify (CHECK), to make ADD idempotent and
//! to remove exactly podwire's rules (DEL). Rules are compared in a canonical form because
//! `iptables-save` reorders options and adds implicit matches (`-m tcp`).

use crate::render::{Rule, RuleSet};

/// The nat table as `iptables-save` printed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedTable {
    pub chains: Vec<String>,
    /// Each rule with its original text after `-A ` (used verbatim for `-D`).
    pub rules: Vec<(Rule, String)>,
}

/// Parse the `*nat` section of `iptables-save` output.
pub fn parse_nat(save_output: &str) -> SavedTable {
    let mut t = SavedTable::default();
    let mut in_nat = false;
    for line in save_output.lines() {
        let line = line.trim_end();
        if let Some(table) = line.strip_prefix('*') {
            in_nat = table.trim() == "nat";
        } else if !in_nat || line == "COMMIT" {
            continue;
        } else if let Some(decl) = line.strip_prefix(':') {
            if let Some(name) = decl.split_whitespace().next() {
                t.chains.push(name.to_string());
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let mut it = rest.split_whitespace();
            if let Some(chain) = it.next() {
                let rule = Rule {
                    chain: chain.to_string(),
                    args: it.map(str::to_string).collect(),
                };
                t.rules.push((rule, rest.to_string()));
            }
        }
    }
    t
}

/// A rule as an order-independent set of (negated, option, values), without implicit matches.
pub fn canonical(args: &[String]) -> Vec<(bool, String, Vec<String>)> {
    let mut out: Vec<(bool, String, Vec<String>)> = Vec::new();
    let mut neg = false;
    for tok in args {
        if tok == "!" {
            neg = true;
        } else if tok.starts_with('-') {
            out.push((neg, tok.clone(), Vec::new()));
            neg = false;
        } else if let Some(last) = out.last_mut() {
            last.2.push(tok.clone());
        }
    }
    out.retain(|(_, opt, vals)| {
        !(opt == "-m" && matches!(vals.as_slice(), [v] if v == "tcp" || v == "udp"))
    });
    out.sort();
    out
}

fn same(a: &Rule, b: &Rule) -> bool {
    a.chain == b.chain && canonical(&a.args) == canonical(&b.args)
}

impl SavedTable {
    /// Does the table hold any of these chains?
    pub fn has_any_chain(&self, chains: &[String]) -> bool {
        self.chains.iter().any(|c| chains.contains(c))
    }

    fn rules_in<'a>(&'a self, chain: &'a str) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules
            .iter()
            .map(|(r, _)| r)
            .filter(move |r| r.chain == chain)
    }

    /// Differences between what `want` programs and what the table holds; empty means present.
    pub fn missing(&self, want: &RuleSet) -> Vec<String> {
        let mut problems = Vec::new();
        for c in &want.chains {
            if !self.chains.contains(c) {
                problems.push(format!("chain {c} is missing"));
                continue;
            }
            let have: Vec<&Rule> = self.rules_in(c).collect();
            let wanted: Vec<&Rule> = want.rules.iter().filter(|r| &r.chain == c).collect();
            if have.len() != wanted.len() || !have.iter().zip(&wanted).all(|(h, w)| same(h, w)) {
                problems.push(format!(
                    "chain {c} holds {} rule(s) that differ from the {} expected",
                    have.len(),
                    wanted.len()
                ));
            }
        }
        // The entry rules must be the first rules of their built-in chain, in order: a rule
        // before them (say `-I OUTPUT 1 -p tcp -j ACCEPT`) would let traffic bypass the proxy.
        for builtin in entry_chains(want) {
            let wanted: Vec<&Rule> = want.entry_rules().filter(|r| r.chain == builtin).collect();
            let have: Vec<&Rule> = self.rules_in(builtin).collect();
            if have.len() >= wanted.len() && have.iter().zip(&wanted).all(|(h, w)| same(h, w)) {
                continue;
            }
            if let Some(w) = wanted.iter().find(|w| !have.iter().any(|h| same(h, w))) {
                problems.push(format!("rule -A {builtin} {} is missing", w.args.join(" ")));
                continue;
            }
            // The first place where the chain and podwire's entry rules part ways.
            let intruder = have
                .iter()
                .zip(&wanted)
                .find(|(h, w)| !same(h, w))
                .map(|(h, _)| *h)
                .filter(|h| !wanted.iter().any(|w| same(h, w)))
                .map_or_else(
                    || "they are out of order".to_string(),
                    |h| format!("-A {builtin} {} comes first", h.args.join(" ")),
                );
            problems.push(format!(
                "podwire's entry rules are not the first rules of {builtin} ({intruder}): traffic can bypass the proxy"
            ));
        }
        problems
    }

    /// `-D` lines for the built-in chain rules podwire owns: every rule jumping into `ours`
    /// (they must go before the chains can be deleted) and, one saved rule each, the
    /// `entries` podwire recorded when it programmed the pod. Nothing is claimed by pattern:
    /// an identical rule added by someone else survives unless podwire recorded one too.
    fn entry_deletions(&self, ours: &[String], entries: &[Rule]) -> String {
        let mut out = String::new();
        let mut unclaimed: Vec<&Rule> = entries
            .iter()
            .filter(|r| !ours.contains(&r.chain) && !jumps_into(r, ours))
            .collect();
        for (rule, text) in &self.rules {
            if ours.contains(&rule.chain) {
                continue;
            }
            let recorded = unclaimed.iter().position(|e| same(e, rule));
            if let Some(i) = recorded {
                unclaimed.swap_remove(i);
            }
            if recorded.is_some() || jumps_into(rule, ours) {
                out.push_str(&format!("-D {text}\n"));
            }
        }
        out
    }

    /// `iptables-restore --noflush` input removing podwire's chains and entry rules (see
    /// [`Self::entry_deletions`]). `None` when there is nothing to remove.
    pub fn removal_input(&self, ours: &[String], entries: &[Rule]) -> Option<String> {
        let present: Vec<&String> = self.chains.iter().filter(|c| ours.contains(c)).collect();
        let deletions = self.entry_deletions(ours, entries);
        if present.is_empty() && deletions.is_empty() {
            return None;
        }
        let mut out = format!("*nat\n{deletions}");
        for c in &present {
            out.push_str(&format!("-F {c}\n"));
        }
        for c in &present {
            out.push_str(&format!("-X {c}\n"));
        }
        out.push_str("COMMIT\n");
        Some(out)
    }

    /// One transaction that replaces podwire's rules with `want`: the old entry rules (those
    /// jumping into podwire's chains and the `previous` ones podwire recorded) are deleted, the
    /// chains rebuilt, and the entry rules inserted at the top of their built-in chains again,
    /// in order, so nothing inserted before them keeps shadowing the redirection.
    pub fn replacement_input(&self, want: &RuleSet, previous: &[Rule]) -> String {
        let mut out = format!("*nat\n{}", self.entry_deletions(&want.chains, previous));
        for c in &want.chains {
            let verb = if self.chains.contains(c) { "-F" } else { "-N" };
            out.push_str(&format!("{verb} {c}\n"));
        }
        let mut position: Vec<(&str, usize)> = Vec::new();
        for r in &want.rules {
            if want.chains.contains(&r.chain) {
                out.push_str(&format!("-A {} {}\n", r.chain, r.args.join(" ")));
                continue;
            }
            let n = match position.iter_mut().find(|(c, _)| *c == r.chain) {
                Some((_, n)) => {
                    *n += 1;
                    *n
                }
                None => {
                    position.push((&r.chain, 1));
                    1
                }
            };
            out.push_str(&format!("-I {} {n} {}\n", r.chain, r.args.join(" ")));
        }
        out.push_str("COMMIT\n");
        out
    }
}

/// The built-in chains `want` enters through, in first-use order.
fn entry_chains(want: &RuleSet) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for r in want.entry_rules() {
        if !out.contains(&r.chain.as_str()) {
            out.push(&r.chain);
        }
    }
    out
}

fn jumps_into(rule: &Rule, ours: &[String]) -> bool {
    rule.args
        .iter()
        .skip_while(|a| *a != "-j")
        .nth(1)
        .is_some_and(|t| ours.contains(t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{render::render, Family, MeshProfile, RedirectSpec};

    const SAVED: &str = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:ISTIO_INBOUND - [0:0]\n:ISTIO_IN_REDIRECT - [0:0]\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n-A PREROUTING -p tcp -j ISTIO_INBOUND\n-A OUTPUT -j ISTIO_OUTPUT\n-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN\n-A ISTIO_INBOUND -p tcp -m tcp --dport 15020 -j RETURN\n-A ISTIO_INBOUND -p tcp -m tcp --dport 15021 -j RETURN\n-A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN\n-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT\n-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006\n-A ISTIO_OUTPUT -p tcp -m tcp --dport 15020 -j RETURN\n-A ISTIO_OUTPUT -p udp -m udp --dport 15020 -j RETURN\n-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN\n-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT\n-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN\n-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN\n-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT\n-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN\n-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN\n-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN\n-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n";

    fn default_rules() -> RuleSet {
        let p = MeshProfile::istio();
        render(&RedirectSpec::defaults(&p), &p, Family::V4)
    }

    #[test]
    fn saved_default_rules_match_rendered() {
        let t = parse_nat(SAVED);
        assert_eq!(t.missing(&default_rules()), Vec::<String>::new());
    }

    #[test]
    fn a_changed_or_missing_rule_is_reported() {
        let t = parse_nat(&SAVED.replace(
            "--uid-owner 1337 -j RETURN\n",
            "--uid-owner 1338 -j RETURN\n",
        ));
        assert_eq!(t.missing(&default_rules()).len(), 1);
        let t = parse_nat(&SAVED.replace("-A OUTPUT -j ISTIO_OUTPUT\n", ""));
        assert_eq!(
            t.missing(&default_rules()),
            vec!["rule -A OUTPUT -j ISTIO_OUTPUT is missing"]
        );
        // Four chains and the entry rule of each built-in chain.
        assert_eq!(
            parse_nat("*nat\nCOMMIT\n").missing(&default_rules()).len(),
            6
        );
    }

    #[test]
    fn removal_deletes_only_ours() {
        let saved = SAVED.replace(
            "-A OUTPUT -j ISTIO_OUTPUT\n",
            "-A OUTPUT -j ISTIO_OUTPUT\n-A OUTPUT -d 198.18.0.9/32 -j ACCEPT\n",
        );
        let ours = default_rules().chains;
        let want = default_rules();
        let entries: Vec<Rule> = want.entry_rules().cloned().collect();
        let input = parse_nat(&saved)
            .removal_input(&ours, &entries)
            .expect("something to remove");
        assert_eq!(
            input,
            "*nat\n-D PREROUTING -p tcp -j ISTIO_INBOUND\n-D OUTPUT -j ISTIO_OUTPUT\n-F ISTIO_INBOUND\n-F ISTIO_IN_REDIRECT\n-F ISTIO_OUTPUT\n-F ISTIO_REDIRECT\n-X ISTIO_INBOUND\n-X ISTIO_IN_REDIRECT\n-X ISTIO_OUTPUT\n-X ISTIO_REDIRECT\nCOMMIT\n"
        );
        assert_eq!(
            parse_nat("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n").removal_input(&ours, &entries),
            None
        );
    }

    fn rules_with_excluded_interface(iface: &str) -> RuleSet {
        let p = MeshProfile::istio();
        let mut pod = crate::PodInfo::default();
        pod.metadata.annotations.insert(
            "traffic.sidecar.istio.io/excludeInterfaces".into(),
            iface.into(),
        );
        render(
            &RedirectSpec::from_pod(&pod, &p).expect("valid"),
            &p,
            Family::V4,
        )
    }

    #[test]
    fn foreign_interface_exclusions_survive_removal() {
        // Someone else's `-o eth9 -j RETURN`; podwire programmed no excludeInterfaces.
        let saved = SAVED
            .replace(
                "-A OUTPUT -j ISTIO_OUTPUT\n",
                "-A OUTPUT -j ISTIO_OUTPUT\n-A OUTPUT -o eth9 -j RETURN\n",
            )
            .replace(
                "-A PREROUTING -p tcp -j ISTIO_INBOUND\n",
                "-A PREROUTING -p tcp -j ISTIO_INBOUND\n-A PREROUTING -i eth9 -j RETURN\n",
            );
        let want = default_rules();
        let entries: Vec<Rule> = want.entry_rules().cloned().collect();
        let input = parse_nat(&saved)
            .removal_input(&want.chains, &entries)
            .expect("something to remove");
        assert!(!input.contains("eth9"), "{input}");
        // Without a record podwire claims only the jumps into its chains.
        let input = parse_nat(&saved)
            .removal_input(&want.chains, &[])
            .expect("something to remove");
        assert!(!input.contains("eth9"), "{input}");
        assert!(input.contains("-D OUTPUT -j ISTIO_OUTPUT\n"), "{input}");
    }

    #[test]
    fn recorded_interface_exclusions_are_removed_once_each() {
        let want = rules_with_excluded_interface("eth9");
        let entries: Vec<Rule> = want.entry_rules().cloned().collect();
        // podwire's exclusion plus an identical one of someone else's: one of them goes.
        let saved = SAVED
            .replace(
                "-A PREROUTING -p tcp -j ISTIO_INBOUND\n",
                "-A PREROUTING -i eth9 -j RETURN\n-A PREROUTING -p tcp -j ISTIO_INBOUND\n-A PREROUTING -i eth9 -j RETURN\n",
            )
            .replace(
                "-A OUTPUT -j ISTIO_OUTPUT\n",
                "-A OUTPUT -o eth9 -j RETURN\n-A OUTPUT -j ISTIO_OUTPUT\n",
            );
        let input = parse_nat(&saved)
            .removal_input(&want.chains, &entries)
            .expect("something to remove");
        assert_eq!(
            input.matches("-D PREROUTING -i eth9 -j RETURN").count(),
            1,
            "{input}"
        );
        assert_eq!(
            input.matches("-D OUTPUT -o eth9 -j RETURN").count(),
            1,
            "{input}"
        );
    }

    #[test]
    fn a_rule_shadowing_the_entry_rules_is_reported_and_replaced() {
        let saved = SAVED.replace(
            "-A OUTPUT -j ISTIO_OUTPUT\n",
            "-A OUTPUT -p tcp -j ACCEPT\n-A OUTPUT -j ISTIO_OUTPUT\n",
        );
        let want = default_rules();
        let t = parse_nat(&saved);
        let problems = t.missing(&want);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("-A OUTPUT -p tcp -j ACCEPT comes first"),
            "{problems:?}"
        );
        let entries: Vec<Rule> = want.entry_rules().cloned().collect();
        let input = t.replacement_input(&want, &entries);
        assert!(input.contains("-D OUTPUT -j ISTIO_OUTPUT\n"), "{input}");
        assert!(input.contains("-I OUTPUT 1 -j ISTIO_OUTPUT\n"), "{input}");
        assert!(
            input.contains("-I PREROUTING 1 -p tcp -j ISTIO_INBOUND\n"),
            "{input}"
        );
        assert!(!input.contains("ACCEPT"), "the foreign rule stays: {input}");
        // Podwire's own rules in the wrong order are reported too.
        let want = rules_with_excluded_interface("eth9");
        let saved = SAVED
            .replace(
                "-A OUTPUT -j ISTIO_OUTPUT\n",
                "-A OUTPUT -j ISTIO_OUTPUT\n-A OUTPUT -o eth9 -j RETURN\n",
            )
            .replace(
                "-A PREROUTING -p tcp -j ISTIO_INBOUND\n",
                "-A PREROUTING -i eth9 -j RETURN\n-A PREROUTING -p tcp -j ISTIO_INBOUND\n",
            );
        let problems = parse_nat(&saved).missing(&want);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("out of order"), "{problems:?}");
    }
}
