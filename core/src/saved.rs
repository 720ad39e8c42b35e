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

    /// Differences between what `want` programs and what the table holds; empty means present.
    pub fn missing(&self, want: &RuleSet) -> Vec<String> {
        let mut problems = Vec::new();
        for c in &want.chains {
            if !self.chains.contains(c) {
                problems.push(format!("chain {c} is missing"));
                continue;
            }
            let have: Vec<&Rule> = self
                .rules
                .iter()
                .map(|(r, _)| r)
                .filter(|r| &r.chain == c)
                .collect();
            let wanted: Vec<&Rule> = want.rules.iter().filter(|r| &r.chain == c).collect();
            if have.len() != wanted.len() || !have.iter().zip(&wanted).all(|(h, w)| same(h, w)) {
                problems.push(format!(
                    "chain {c} holds {} rule(s) that differ from the {} expected",
                    have.len(),
                    wanted.len()
                ));
            }
        }
        // Entry rules must appear, in order, in the built-in chains.
        let mut cursor = self.rules.iter().map(|(r, _)| r);
        for w in want.entry_rules() {
            if !cursor.any(|h| same(h, w)) {
                problems.push(format!(
                    "rule -A {} {} is missing",
                    w.chain,
                    w.args.join(" ")
                ));
                break;
            }
        }
        problems
    }

    /// `-D` lines for the built-in chain rules that lead into `ours` or that podwire adds for
    /// excluded interfaces, using the saved text so the kernel matches them exactly.
    fn entry_deletions(&self, ours: &[String]) -> String {
        let mut out = String::new();
        for (rule, text) in &self.rules {
            if ours.contains(&rule.chain) {
                continue;
            }
            let target = rule.args.iter().skip_while(|a| *a != "-j").nth(1);
            if target.is_some_and(|t| ours.contains(t)) || is_interface_exclusion(rule) {
                out.push_str(&format!("-D {text}\n"));
            }
        }
        out
    }

    /// `iptables-restore --noflush` input removing podwire's chains and entry rules. `None`
    /// when there is nothing to remove.
    pub fn removal_input(&self, ours: &[String]) -> Option<String> {
        let present: Vec<&String> = self.chains.iter().filter(|c| ours.contains(c)).collect();
        if present.is_empty() {
            return None;
        }
        let mut out = format!("*nat\n{}", self.entry_deletions(ours));
        for c in &present {
            out.push_str(&format!("-F {c}\n"));
        }
        for c in &present {
            out.push_str(&format!("-X {c}\n"));
        }
        out.push_str("COMMIT\n");
        Some(out)
    }

    /// One transaction that replaces whatever podwire rules are present with `want`.
    pub fn replacement_input(&self, want: &RuleSet) -> String {
        let mut out = format!("*nat\n{}", self.entry_deletions(&want.chains));
        for c in &want.chains {
            let verb = if self.chains.contains(c) { "-F" } else { "-N" };
            out.push_str(&format!("{verb} {c}\n"));
        }
        for r in &want.rules {
            out.push_str(&format!("-A {} {}\n", r.chain, r.args.join(" ")));
        }
        out.push_str("COMMIT\n");
        out
    }
}

/// `-A PREROUTING -i X -j RETURN` / `-A OUTPUT -o X -j RETURN`, exactly as podwire renders them.
fn is_interface_exclusion(rule: &Rule) -> bool {
    let flag = match rule.chain.as_str() {
        "PREROUTING" => "-i",
        "OUTPUT" => "-o",
        _ => return false,
    };
    matches!(rule.args.as_slice(), [f, _, j, r] if f == flag && j == "-j" && r == "RETURN")
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
        assert_eq!(
            parse_nat("*nat\nCOMMIT\n").missing(&default_rules()).len(),
            5
        );
    }

    #[test]
    fn removal_deletes_only_ours() {
        let saved = SAVED.replace(
            "-A OUTPUT -j ISTIO_OUTPUT\n",
            "-A OUTPUT -j ISTIO_OUTPUT\n-A OUTPUT -d 198.18.0.9/32 -j ACCEPT\n",
        );
        let ours = default_rules().chains;
        let input = parse_nat(&saved)
            .removal_input(&ours)
            .expect("something to remove");
        assert_eq!(
            input,
            "*nat\n-D PREROUTING -p tcp -j ISTIO_INBOUND\n-D OUTPUT -j ISTIO_OUTPUT\n-F ISTIO_INBOUND\n-F ISTIO_IN_REDIRECT\n-F ISTIO_OUTPUT\n-F ISTIO_REDIRECT\n-X ISTIO_INBOUND\n-X ISTIO_IN_REDIRECT\n-X ISTIO_OUTPUT\n-X ISTIO_REDIRECT\nCOMMIT\n"
        );
        assert_eq!(
            parse_nat("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n").removal_input(&ours),
            None
        );
    }
}
