//! The injector's Prometheus metrics (text format, rendered with `podwire_core::prom`, as the
//! agent's are).

use crate::review::Outcome;
use podwire_core::inject::Step;
use podwire_core::prom::{labelled, single, Histogram};
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

#[derive(Debug)]
pub struct Metrics {
    requests: [AtomicU64; 4],
    decisions: [AtomicU64; 8],
    dry_runs: AtomicU64,
    latency: Histogram<10>,
    cert_expiry: AtomicI64,
    cert_reloads: AtomicU64,
    namespaces: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Default::default(),
            decisions: Default::default(),
            dry_runs: Default::default(),
            latency: Histogram::new(BUCKETS),
            cert_expiry: Default::default(),
            cert_reloads: Default::default(),
            namespaces: Default::default(),
        }
    }
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
        self.latency.observe(took);
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
        let load = |v: &[AtomicU64]| v.iter().map(|a| a.load(Relaxed)).collect::<Vec<_>>();
        labelled(
            &mut out,
            "podwire_injector_requests_total",
            "AdmissionReviews answered on /inject, by result (dry runs not included)",
            "result",
            RESULTS.iter().copied().zip(load(&self.requests)),
        );
        labelled(
            &mut out,
            "podwire_injector_decisions_total",
            "Injection decisions, by the step of the decision that settled it",
            "step",
            STEPS.iter().map(|s| s.as_str()).zip(load(&self.decisions)),
        );
        single(
            &mut out,
            "counter",
            "podwire_injector_dry_run_requests_total",
            "Dry-run AdmissionReviews answered (not counted as pods)",
            self.dry_runs.load(Relaxed),
        );
        self.latency.render(
            &mut out,
            "podwire_injector_request_duration_seconds",
            "Time to answer a request on /inject, body read included",
        );
        single(
            &mut out,
            "gauge",
            "podwire_injector_cert_expiry_timestamp_seconds",
            "notAfter of the serving certificate in use (0 before one is loaded)",
            self.cert_expiry.load(Relaxed),
        );
        single(
            &mut out,
            "counter",
            "podwire_injector_cert_reloads_total",
            "Serving certificates loaded (the first one included)",
            self.cert_reloads.load(Relaxed),
        );
        single(
            &mut out,
            "gauge",
            "podwire_injector_known_namespaces",
            "Namespaces whose labels the injector knows from its watch",
            self.namespaces.load(Relaxed),
        );
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
