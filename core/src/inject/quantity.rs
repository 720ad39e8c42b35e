//! Kubernetes resource quantities (`100m`, `128Mi`, `1.5`, `2e3`), checked with the API
//! server's grammar so a bad `sidecar.istio.io/proxyCPU` is refused by the injector with a
//! message naming it, instead of by the API server with one that does not.

use std::cmp::Ordering;
use std::fmt;

/// A valid, non-negative quantity: the text as written and its value (for comparisons).
#[derive(Debug, Clone, PartialEq)]
pub struct Quantity {
    text: String,
    value: f64,
}

impl Quantity {
    /// ```text
    /// quantity ::= [+|-] number suffix
    /// number   ::= digits | digits.digits | digits. | .digits
    /// suffix   ::= "" | n | u | m | k | M | G | T | P | E | Ki | Mi | Gi | Ti | Pi | Ei
    ///            | (e|E) [+|-] digits
    /// ```
    pub fn parse(s: &str) -> Result<Quantity, String> {
        const HINT: &str = "not a Kubernetes quantity (e.g. 100m, 0.5, 128Mi, 1Gi)";
        if s.is_empty() || s.len() > 64 {
            return Err(HINT.into());
        }
        let (negative, rest) = match s.as_bytes()[0] {
            b'-' => (true, &s[1..]),
            b'+' => (false, &s[1..]),
            _ => (false, s),
        };
        let num_len = rest
            .bytes()
            .take_while(|b| b.is_ascii_digit() || *b == b'.')
            .count();
        let (number, suffix) = rest.split_at(num_len);
        if number.bytes().filter(|b| *b == b'.').count() > 1
            || !number.bytes().any(|b| b.is_ascii_digit())
        {
            return Err(HINT.into());
        }
        let factor = suffix_factor(suffix).ok_or_else(|| HINT.to_string())?;
        let mantissa: f64 = number.parse().map_err(|_| HINT.to_string())?;
        let value = mantissa * factor;
        if negative && value != 0.0 {
            return Err("must not be negative".into());
        }
        if !value.is_finite() {
            return Err("too large".into());
        }
        Ok(Quantity {
            text: s.to_string(),
            value,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The value in base units (cores, bytes): `100m` → 0.1, `128Mi` → 134217728.
    pub fn value(&self) -> f64 {
        self.value
    }

    /// Compare by value (`1Gi` == `1073741824`, `500m` < `1`).
    pub fn cmp_value(&self, other: &Quantity) -> Ordering {
        self.value.total_cmp(&other.value)
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn suffix_factor(suffix: &str) -> Option<f64> {
    let f = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        _ => {
            let exp = suffix
                .strip_prefix('e')
                .or_else(|| suffix.strip_prefix('E'))?;
            let digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
            if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| b.is_ascii_digit())
            {
                return None;
            }
            let e: i32 = exp.parse().ok()?;
            10f64.powi(e)
        }
    };
    Some(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_api_grammar() {
        for s in [
            "100m", "0.5", ".5", "1.", "2", "+1", "128Mi", "1Gi", "1e3", "1E3", "1E", "5e-1",
            "500u", "1k", "0", "-0",
        ] {
            assert!(Quantity::parse(s).is_ok(), "{s}");
        }
    }

    #[test]
    fn refuses_everything_else() {
        for s in [
            "", "m", "1K", "1mi", "1 Gi", "1Gi ", "1..2", "1e", "abc", "1.2.3", "10%", "-1",
            "-100m", "0x10", "1e99999",
        ] {
            assert!(Quantity::parse(s).is_err(), "{s:?}");
        }
    }

    #[test]
    fn compares_by_value() {
        let q = |s| Quantity::parse(s).expect("valid");
        assert_eq!(q("1Gi").cmp_value(&q("1073741824")), Ordering::Equal);
        assert_eq!(q("500m").cmp_value(&q("1")), Ordering::Less);
        assert_eq!(q("2").cmp_value(&q("2000m")), Ordering::Equal);
        assert_eq!(q("1G").cmp_value(&q("1Gi")), Ordering::Less);
    }
}
