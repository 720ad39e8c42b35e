//! The injector's Prometheus metrics, through `prometheus-client` (OpenMetrics text) as the
//! agent's are: typed label sets, every label value present from the start.

use crate::review::Outcome;
use podwire_core::inject::Step;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::fmt::Write;
use std::time::Duration;

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the request latency buckets, in seconds.
const BUCKETS: [f64; 10] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0,
];
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

/// The `result` label of `podwire_injector_requests_total`.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum RequestResult {
    Injected,
    Skipped,
    Refused,
    Error,
}

impl RequestResult {
    const ALL: [RequestResult; 4] = [
        RequestResult::Injected,
        RequestResult::Skipped,
        RequestResult::Refused,
        RequestResult::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RequestResult::Injected => "injected",
            RequestResult::Skipped => "skipped",
            RequestResult::Refused => "refused",
            RequestResult::Error => "error",
        }
    }
}

impl EncodeLabelValue for RequestResult {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        e.write_str(self.as_str())
    }
}

/// The result of an answered review. Requests that are not pod creations count as `skipped`
/// (allowed unchanged); unreadable ones as `error`.
pub fn result_of(outcome: Outcome) -> RequestResult {
    match outcome {
        Outcome::Injected => RequestResult::Injected,
        Outcome::Skipped | Outcome::Ignored => RequestResult::Skipped,
        Outcome::Refused => RequestResult::Refused,
        Outcome::Malformed => RequestResult::Error,
    }
}

/// The HTTP version a connection speaks (label `protocol`).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

impl EncodeLabelValue for Protocol {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        e.write_str(match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "h2",
        })
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabel {
    protocol: Protocol,
}

/// Counts one of something while held (a request in flight, an open connection).
#[derive(Debug)]
pub struct Held(Gauge);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn hold(g: &Gauge) -> Held {
    g.inc();
    Held(g.clone())
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: RequestResult,
}

/// A decision step as a label value (its `as_str`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StepValue(Step);

impl std::hash::Hash for StepValue {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.as_str().hash(h);
    }
}

impl EncodeLabelValue for StepValue {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        e.write_str(self.0.as_str())
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabel {
    step: StepValue,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<ResultLabel, Counter>,
    decisions: Family<StepLabel, Counter>,
    dry_runs: Counter,
    latency: Histogram,
    cert_expiry: Gauge,
    cert_reloads: Counter,
    namespaces: Gauge,
    memo_hits: Counter,
    in_flight: Gauge,
    connections: Family<ProtocolLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            decisions: Family::default(),
            dry_runs: Counter::default(),
            latency: Histogram::new(BUCKETS),
            cert_expiry: Gauge::default(),
            cert_reloads: Counter::default(),
            namespaces: Gauge::default(),
            memo_hits: Counter::default(),
            in_flight: Gauge::default(),
            connections: Family::default(),
        };
        for protocol in [Protocol::Http1, Protocol::Http2] {
            drop(m.connections.get_or_create(&ProtocolLabel { protocol }));
        }
        for result in RequestResult::ALL {
            drop(m.requests.get_or_create(&ResultLabel { result }));
        }
        for step in STEPS {
            drop(m.decisions.get_or_create(&StepLabel {
                step: StepValue(step),
            }));
        }
        let mut r = Registry::default();
        r.register(
            "podwire_injector_requests",
            "AdmissionReviews answered on /inject, by result (dry runs not included)",
            m.requests.clone(),
        );
        r.register(
            "podwire_injector_decisions",
            "Injection decisions, by the step of the decision that settled it",
            m.decisions.clone(),
        );
        r.register(
            "podwire_injector_dry_run_requests",
            "Dry-run AdmissionReviews answered (not counted as pods)",
            m.dry_runs.clone(),
        );
        r.register_with_unit(
            "podwire_injector_request_duration",
            "Time to answer an /inject request",
            Unit::Seconds,
            m.latency.clone(),
        );
        r.register_with_unit(
            "podwire_injector_cert_expiry_timestamp",
            "notAfter of the serving certificate in use (0 before one is loaded)",
            Unit::Seconds,
            m.cert_expiry.clone(),
        );
        r.register(
            "podwire_injector_cert_reloads",
            "Serving certificates loaded (the first one included)",
            m.cert_reloads.clone(),
        );
        r.register(
            "podwire_injector_known_namespaces",
            "Namespaces whose labels the injector knows from its watch",
            m.namespaces.clone(),
        );
        r.register(
            "podwire_injector_memo_hits",
            "Pod CREATEs answered from the memo of pods seen before (replicas of one template)",
            m.memo_hits.clone(),
        );
        r.register(
            "podwire_injector_requests_in_flight",
            "/inject requests being received or answered now",
            m.in_flight.clone(),
        );
        r.register(
            "podwire_injector_open_connections",
            "Open client connections, by HTTP version (kube-apiserver speaks h2 when offered)",
            m.connections.clone(),
        );
        Metrics { registry: r, ..m }
    }
}

impl Metrics {
    /// One answer replayed from the memo (also counted by [`Metrics::request`]).
    pub fn memo_hit(&self) {
        self.memo_hits.inc();
    }

    /// One answered `/inject` request; dry runs are counted apart (no pod is created), but
    /// their latency is recorded.
    pub fn request(
        &self,
        result: RequestResult,
        step: Option<Step>,
        dry_run: bool,
        took: Duration,
    ) {
        if dry_run {
            self.dry_runs.inc();
        } else {
            self.requests.get_or_create(&ResultLabel { result }).inc();
            if let Some(step) = step {
                self.decisions
                    .get_or_create(&StepLabel {
                        step: StepValue(step),
                    })
                    .inc();
            }
        }
        self.latency.observe(took.as_secs_f64());
    }

    /// An `/inject` request in flight until the result is dropped.
    pub fn in_flight(&self) -> Held {
        hold(&self.in_flight)
    }

    /// An open connection speaking `protocol` until the result is dropped.
    pub fn connection(&self, protocol: Protocol) -> Held {
        hold(&self.connections.get_or_create(&ProtocolLabel { protocol }))
    }

    /// A serving certificate was (re)loaded; `not_after` in seconds since the epoch.
    pub fn cert_loaded(&self, not_after: i64) {
        self.cert_expiry.set(not_after);
        self.cert_reloads.inc();
    }

    pub fn set_namespaces(&self, n: usize) {
        self.namespaces.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The OpenMetrics text ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
            let _ = writeln!(out, "# metrics could not be encoded\n# EOF");
        }
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
            RequestResult::Injected,
            Some(Step::Policy),
            false,
            Duration::from_micros(300),
        );
        m.request(RequestResult::Error, None, false, Duration::from_secs(2));
        m.request(
            RequestResult::Skipped,
            Some(Step::HostNetwork),
            true,
            Duration::ZERO,
        );
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
