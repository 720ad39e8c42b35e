//! The injector's Prometheus metrics, rendered by hand in the text exposition format (as the
//! agent does: a few counters, gauges and one histogram do not warrant a metrics framework).

use crate::review::Outcome;
use podwire_core::inject::Step;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the request latency buckets, in seconds.
const BUCKETS: [f64; 10] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0,
];
/// `result` label values of `podwire_injector_requests_total`.
pub const RESULTS: [&str; 4] = ["injected", "skipped", "refused", "error"];
/// `step` label values of `podwire_injector_decisions_total` (the decision's step: bounded).
const STEPS: [Step; 8] = [
    Step::HostNetwork,
    Step::IgnoredNamespace,
    Step::AlreadyInjected,
    Step::Explicit,
    Step::NeverInjectSelector,
    Step::AlwaysInjectSelector,
    Step::Policy,
    Step::NamespaceSelector,
];

/// The `result` label of an answered review. Requests that are not pod creations count as
/// `skipped` (allowed unchanged); unreadable ones as `error`.
pub fn result_of(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Injected => "injected",
        Outcome::Skipped | Outcome::Ignored => "skipped",
        Outcome::Refused => "refused",
        Outcome::Malformed => "error",
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    requests: [AtomicU64; 4],
    decisions: [AtomicU64; 8],
    dry_runs: AtomicU64,
    buckets: [AtomicU64; 10],
    latency_count: AtomicU64,
    latency_sum_ns: AtomicU64,
    cert_expiry: AtomicI64,
    cert_reloads: AtomicU64,
    namespaces: AtomicU64,
}

impl Metrics {
    /// One answered `/inject` request. `result` is one of [`RESULTS`]; dry runs are counted
    /// apart (no pod is created), but their latency is recorded.
    pub fn request(&self, result: &str, step: Option<Step>, dry_run: bool, took: Duration) {
        if dry_run {
            self.dry_runs.fetch_add(1, Relaxed);
        } else {
            if let Some(i) = RESULTS.iter().position(|r| *r == result) {
                self.requests[i].fetch_add(1, Relaxed);
            }
            if let Some(i) = step.and_then(|s| STEPS.iter().position(|x| *x == s)) {
                self.decisions[i].fetch_add(1, Relaxed);
            }
        }
        // One bucket per observation (cumulated when rendered): one contended write, not ten.
        let secs = took.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|le| secs <= *le) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_ns
            .fetch_add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    /// A serving certificate was (re)loaded; `not_after` in seconds since the epoch.
    pub fn cert_loaded(&self, not_after: i64) {
        self.cert_expiry.store(not_after, Relaxed);
        self.cert_reloads.fetch_add(1, Relaxed);
    }

    pub fn set_namespaces(&self, n: usize) {
        self.namespaces.store(n as u64, Relaxed);
    }

    pub fn requests_total(&self, result: &str) -> u64 {
        RESULTS
            .iter()
            .position(|r| *r == result)
            .map(|i| self.requests[i].load(Relaxed))
            .unwrap_or(0)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP podwire_injector_requests_total AdmissionReviews answered on /inject, by result (dry runs not included)\n# TYPE podwire_injector_requests_total counter");
        for (r, v) in RESULTS.iter().zip(&self.requests) {
            let _ = writeln!(
                out,
                "podwire_injector_requests_total{{result=\"{r}\"}} {}",
                v.load(Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP podwire_injector_decisions_total Injection decisions, by the step of the decision that settled it\n# TYPE podwire_injector_decisions_total counter");
        for (s, v) in STEPS.iter().zip(&self.decisions) {
            let _ = writeln!(
                out,
                "podwire_injector_decisions_total{{step=\"{}\"}} {}",
                s.as_str(),
                v.load(Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP podwire_injector_dry_run_requests_total Dry-run AdmissionReviews answered (not counted as pods)\n# TYPE podwire_injector_dry_run_requests_total counter\npodwire_injector_dry_run_requests_total {}", self.dry_runs.load(Relaxed));
        let _ = writeln!(out, "# HELP podwire_injector_request_duration_seconds Time to answer a request on /inject, body read included\n# TYPE podwire_injector_request_duration_seconds histogram");
        let mut cumulative = 0;
        for (b, le) in self.buckets.iter().zip(BUCKETS) {
            cumulative += b.load(Relaxed);
            let _ = writeln!(
                out,
                "podwire_injector_request_duration_seconds_bucket{{le=\"{le}\"}} {cumulative}"
            );
        }
        let count = self.latency_count.load(Relaxed);
        let _ = writeln!(
            out,
            "podwire_injector_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}\npodwire_injector_request_duration_seconds_sum {}\npodwire_injector_request_duration_seconds_count {count}",
            self.latency_sum_ns.load(Relaxed) as f64 / 1e9
        );
        let _ = writeln!(out, "# HELP podwire_injector_cert_expiry_timestamp_seconds notAfter of the serving certificate in use (0 before one is loaded)\n# TYPE podwire_injector_cert_expiry_timestamp_seconds gauge\npodwire_injector_cert_expiry_timestamp_seconds {}", self.cert_expiry.load(Relaxed));
        let _ = writeln!(out, "# HELP podwire_injector_cert_reloads_total Serving certificates loaded (the first one included)\n# TYPE podwire_injector_cert_reloads_total counter\npodwire_injector_cert_reloads_total {}", self.cert_reloads.load(Relaxed));
        let _ = writeln!(out, "# HELP podwire_injector_known_namespaces Namespaces whose labels the injector knows from its watch\n# TYPE podwire_injector_known_namespaces gauge\npodwire_injector_known_namespaces {}", self.namespaces.load(Relaxed));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_a_cumulative_histogram() {
        let m = Metrics::default();
        m.request(
            "injected",
            Some(Step::Policy),
            false,
            Duration::from_micros(300),
        );
        m.request("error", None, false, Duration::from_secs(2));
        m.request("skipped", Some(Step::HostNetwork), true, Duration::ZERO);
        let t = m.render();
        assert!(t.contains("podwire_injector_requests_total{result=\"injected\"} 1\n"));
        assert!(t.contains("podwire_injector_requests_total{result=\"skipped\"} 0\n"));
        assert!(t.contains("podwire_injector_decisions_total{step=\"policy\"} 1\n"));
        assert!(t.contains("podwire_injector_decisions_total{step=\"host-network\"} 0\n"));
        assert!(t.contains("podwire_injector_dry_run_requests_total 1\n"));
        assert!(t.contains("podwire_injector_request_duration_seconds_bucket{le=\"0.0005\"} 2\n"));
        assert!(t.contains("podwire_injector_request_duration_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(t.contains("podwire_injector_request_duration_seconds_count 3\n"));
    }
}
