//! Kubernetes `LabelSelector` (`matchLabels` + `matchExpressions`) with the API server's
//! semantics, used for the webhook's `namespaceSelector` and Istio's `alwaysInjectSelector` /
//! `neverInjectSelector`.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Labels of a namespace or pod.
pub type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl LabelSelector {
    /// `matchLabels: {key: value}`.
    pub fn match_label(key: &str, value: &str) -> Self {
        LabelSelector {
            match_labels: BTreeMap::from([(key.to_string(), value.to_string())]),
            match_expressions: Vec::new(),
        }
    }

    /// No requirement at all. The API server reads it as "everything"; Istio's
    /// always/never selectors skip it (so an empty entry never forces a decision).
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// Every requirement holds (an empty selector matches everything).
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    /// The checks `metav1.LabelSelectorAsSelector` makes, so a selector the API server would
    /// refuse is refused when the config is loaded, naming `field`.
    pub fn validate(&self, field: &str) -> Result<()> {
        let err = |f: String, reason: String| Error::InvalidConfig { field: f, reason };
        for (k, v) in &self.match_labels {
            check_key(k).map_err(|r| err(format!("{field}.matchLabels"), r))?;
            check_value(v).map_err(|r| err(format!("{field}.matchLabels.{k}"), r))?;
        }
        for (i, r) in self.match_expressions.iter().enumerate() {
            let f = format!("{field}.matchExpressions[{i}]");
            check_key(&r.key).map_err(|reason| err(f.clone(), reason))?;
            match r.operator {
                Operator::In | Operator::NotIn if r.values.is_empty() => {
                    return Err(err(
                        f,
                        format!("operator {:?} needs at least one value", r.operator),
                    ));
                }
                Operator::Exists | Operator::DoesNotExist if !r.values.is_empty() => {
                    return Err(err(f, format!("operator {:?} takes no values", r.operator)));
                }
                _ => {}
            }
            for v in &r.values {
                check_value(v).map_err(|reason| err(f.clone(), reason))?;
            }
        }
        Ok(())
    }
}

impl Requirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        let got = labels.get(&self.key);
        match self.operator {
            Operator::In => got.is_some_and(|v| self.values.contains(v)),
            // As in Kubernetes: a missing label is "not in" any set.
            Operator::NotIn => got.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => got.is_some(),
            Operator::DoesNotExist => got.is_none(),
        }
    }
}

/// kubectl's selector syntax (`app=web,tier in (a,b),!canary`), for reasons people read.
impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("<empty selector>");
        }
        let mut parts: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &self.match_expressions {
            parts.push(match r.operator {
                Operator::In => format!("{} in ({})", r.key, r.values.join(",")),
                Operator::NotIn => format!("{} notin ({})", r.key, r.values.join(",")),
                Operator::Exists => r.key.clone(),
                Operator::DoesNotExist => format!("!{}", r.key),
            });
        }
        f.write_str(&parts.join(","))
    }
}

/// A label key: optional DNS-subdomain prefix and `/`, then a name of at most 63 characters.
fn check_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !ok {
            return Err(format!(
                "label key {key:?}: prefix must be a DNS subdomain (e.g. example.com)"
            ));
        }
    }
    if name.is_empty() || !is_label_name(name) {
        return Err(format!(
            "label key {key:?}: name must be 1-63 of A-Z a-z 0-9 - _ . starting and ending alphanumeric"
        ));
    }
    Ok(())
}

fn check_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_label_name(value) {
        Ok(())
    } else {
        Err(format!(
            "label value {value:?}: must be empty or 1-63 of A-Z a-z 0-9 - _ . starting and ending alphanumeric"
        ))
    }
}

fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// Parse `k=v,k2=v2` (a namespace's labels on the command line). An empty string is a
/// namespace with no labels; `k=` is a label with an empty value.
pub fn parse_labels(s: &str) -> Result<Labels, String> {
    let mut out = Labels::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?} is not key=value"))?;
        let (k, v) = (k.trim(), v.trim());
        check_key(k)?;
        check_value(v)?;
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("label {k:?} given twice"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, operator: Operator, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_labels: BTreeMap::new(),
            match_expressions: vec![Requirement {
                key: key.into(),
                operator,
                values: values.iter().map(|s| s.to_string()).collect(),
            }],
        }
    }

    #[test]
    fn operators_follow_kubernetes() {
        let none = labels(&[]);
        let dis = labels(&[("istio-injection", "disabled")]);
        let en = labels(&[("istio-injection", "enabled")]);
        let k = "istio-injection";
        let cases = [
            (expr(k, Operator::In, &["enabled"]), [false, false, true]),
            (expr(k, Operator::NotIn, &["disabled"]), [true, false, true]),
            (expr(k, Operator::Exists, &[]), [false, true, true]),
            (expr(k, Operator::DoesNotExist, &[]), [true, false, false]),
            (
                LabelSelector::match_label(k, "enabled"),
                [false, false, true],
            ),
            (LabelSelector::default(), [true, true, true]),
        ];
        for (sel, want) in cases {
            let got = [sel.matches(&none), sel.matches(&dis), sel.matches(&en)];
            assert_eq!(got, want, "{sel}");
        }
    }

    #[test]
    fn all_requirements_must_hold() {
        let mut sel = LabelSelector::match_label("app", "web");
        sel.match_expressions
            .push(expr("tier", Operator::NotIn, &["debug"]).match_expressions[0].clone());
        assert!(sel.matches(&labels(&[("app", "web")])));
        assert!(!sel.matches(&labels(&[("app", "web"), ("tier", "debug")])));
        assert!(!sel.matches(&labels(&[("tier", "x")])));
        assert_eq!(sel.to_string(), "app=web,tier notin (debug)");
    }

    #[test]
    fn invalid_selectors_name_the_field() {
        for (sel, want) in [
            (expr("a", Operator::In, &[]), "needs at least one value"),
            (expr("a", Operator::Exists, &["x"]), "takes no values"),
            (expr("bad key!", Operator::Exists, &[]), "label key"),
            (LabelSelector::match_label("a", "has space"), "label value"),
        ] {
            match sel.validate("neverInjectSelector[0]") {
                Err(Error::InvalidConfig { field, reason }) => {
                    assert!(field.starts_with("neverInjectSelector[0]"), "{field}");
                    assert!(reason.contains(want), "{reason}");
                }
                other => panic!("{sel:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn parses_label_lists() {
        assert_eq!(
            parse_labels("istio-injection=enabled, team=a,empty="),
            Ok(labels(&[
                ("istio-injection", "enabled"),
                ("team", "a"),
                ("empty", "")
            ]))
        );
        assert_eq!(parse_labels(""), Ok(Labels::new()));
        assert!(parse_labels("novalue").is_err());
        assert!(parse_labels("a=1,a=2").is_err());
    }
}
