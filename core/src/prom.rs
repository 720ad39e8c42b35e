//! Prometheus text exposition, by hand: the agent and the injector each export a handful of
//! counters, gauges and one latency histogram, which does not warrant a metrics framework.
//! Rendering is pure; the atomics are the only state.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// A latency histogram with fixed bucket bounds (seconds). One bucket is written per
/// observation (one contended write, not one per bucket); buckets are cumulated when rendered.
#[derive(Debug)]
pub struct Histogram<const N: usize> {
    bounds: [f64; N],
    buckets: [AtomicU64; N],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    pub fn new(bounds: [f64; N]) -> Self {
        Histogram {
            bounds,
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|le| secs <= *le) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_ns
            .fetch_add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, help, "histogram");
        let mut cumulative = 0;
        for (b, le) in self.buckets.iter().zip(self.bounds) {
            cumulative += b.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_ns.load(Relaxed) as f64 / 1e9);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A metric without labels (`kind`: "counter" or "gauge").
pub fn single(out: &mut String, kind: &str, name: &str, help: &str, value: impl std::fmt::Display) {
    header(out, name, help, kind);
    let _ = writeln!(out, "{name} {value}");
}

/// A counter with one label, one line per label value.
pub fn labelled<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    values: impl IntoIterator<Item = (&'a str, u64)>,
) {
    header(out, name, help, "counter");
    for (v, n) in values {
        let _ = writeln!(out, "{name}{{{label}=\"{v}\"}} {n}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_renders_cumulative_buckets() {
        let h = Histogram::new([0.001, 0.01]);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(1));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "help");
        assert_eq!(
            out,
            "# HELP x_seconds help\n# TYPE x_seconds histogram\nx_seconds_bucket{le=\"0.001\"} 1\nx_seconds_bucket{le=\"0.01\"} 2\nx_seconds_bucket{le=\"+Inf\"} 3\nx_seconds_sum 1.0055\nx_seconds_count 3\n"
        );
        let mut out = String::new();
        labelled(&mut out, "c_total", "h", "result", [("a", 1), ("b", 2)]);
        assert!(
            out.ends_with("c_total{result=\"a\"} 1\nc_total{result=\"b\"} 2\n"),
            "{out}"
        );
    }
}
