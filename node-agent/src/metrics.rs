//! The agent's Prometheus metrics, rendered by hand in the text exposition format (a handful
//! of counters and one histogram do not warrant a metrics framework).

use podwire_core::lookup::LookupStatus;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the look-up latency buckets, in seconds.
const BUCKETS: [f64; 8] = [0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.025, 0.1, 1.0];
const RESULTS: [&str; 4] = ["found", "not_found", "not_ready", "error"];
pub const REPAIR_ACTIONS: [&str; 3] = ["delete", "label", "failed"];

#[derive(Debug, Default)]
pub struct Metrics {
    lookups: [AtomicU64; 4],
    buckets: [AtomicU64; 8],
    latency_count: AtomicU64,
    latency_sum_ns: AtomicU64,
    pub installed: AtomicBool,
    pub synced: AtomicBool,
    pub api_reachable: AtomicBool,
    pub installs: AtomicU64,
    pub reinserts: AtomicU64,
    pub reverted_storms: AtomicU64,
    repairs: [AtomicU64; 3],
    pub cached_pods: AtomicU64,
}

impl Metrics {
    pub fn lookup(&self, status: &LookupStatus, took: Duration) {
        let i = match status {
            LookupStatus::Found { .. } => 0,
            LookupStatus::NotFound => 1,
            LookupStatus::NotReady { .. } => 2,
            LookupStatus::Error { .. } => 3,
        };
        self.lookups[i].fetch_add(1, Relaxed);
        let secs = took.as_secs_f64();
        for (b, le) in self.buckets.iter().zip(BUCKETS) {
            if secs <= le {
                b.fetch_add(1, Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_ns
            .fetch_add(took.as_nanos() as u64, Relaxed);
    }

    pub fn repaired(&self, action: &str) {
        if let Some(i) = REPAIR_ACTIONS.iter().position(|a| *a == action) {
            self.repairs[i].fetch_add(1, Relaxed);
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        gauge(
            &mut out,
            "podwire_installed",
            "1 when podwire-cni is installed and chained into the primary CNI config",
            self.installed.load(Relaxed).into(),
        );
        gauge(
            &mut out,
            "podwire_pod_cache_synced",
            "1 once the node's pod watch has completed its first list",
            self.synced.load(Relaxed).into(),
        );
        gauge(
            &mut out,
            "podwire_api_reachable",
            "1 when the last API server call succeeded",
            self.api_reachable.load(Relaxed).into(),
        );
        gauge(
            &mut out,
            "podwire_cached_pods",
            "Pods of this node in the agent's cache",
            self.cached_pods.load(Relaxed),
        );
        counter(
            &mut out,
            "podwire_installs_total",
            "Times podwire-cni was written into the primary CNI config",
            self.installs.load(Relaxed),
        );
        counter(
            &mut out,
            "podwire_reinserts_total",
            "Times the entry had to be put back after the primary CNI rewrote its config",
            self.reinserts.load(Relaxed),
        );
        counter(&mut out, "podwire_reverted_storms_total", "Times another component kept removing podwire's entry (more than 5 re-inserts a minute)", self.reverted_storms.load(Relaxed));
        let _ = writeln!(out, "# HELP podwire_repairs_total Mesh pods found running without redirection, by action\n# TYPE podwire_repairs_total counter");
        for (a, v) in REPAIR_ACTIONS.iter().zip(&self.repairs) {
            let _ = writeln!(
                out,
                "podwire_repairs_total{{action=\"{a}\"}} {}",
                v.load(Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP podwire_lookups_total Plugin look-ups answered, by result\n# TYPE podwire_lookups_total counter");
        for (r, v) in RESULTS.iter().zip(&self.lookups) {
            let _ = writeln!(
                out,
                "podwire_lookups_total{{result=\"{r}\"}} {}",
                v.load(Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP podwire_lookup_duration_seconds Time to answer a plugin look-up\n# TYPE podwire_lookup_duration_seconds histogram");
        for (le, v) in BUCKETS.iter().zip(&self.buckets) {
            let _ = writeln!(
                out,
                "podwire_lookup_duration_seconds_bucket{{le=\"{le}\"}} {}",
                v.load(Relaxed)
            );
        }
        let count = self.latency_count.load(Relaxed);
        let _ = writeln!(
            out,
            "podwire_lookup_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "podwire_lookup_duration_seconds_sum {}",
            self.latency_sum_ns.load(Relaxed) as f64 / 1e9
        );
        let _ = writeln!(out, "podwire_lookup_duration_seconds_count {count}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        m.lookup(&LookupStatus::NotFound, Duration::from_micros(300));
        m.lookup(&LookupStatus::NotFound, Duration::from_millis(50));
        let text = m.render();
        assert!(
            text.contains("podwire_lookups_total{result=\"not_found\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("podwire_lookup_duration_seconds_bucket{le=\"0.0005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("podwire_lookup_duration_seconds_bucket{le=\"0.1\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("podwire_lookup_duration_seconds_count 2"),
            "{text}"
        );
    }
}
