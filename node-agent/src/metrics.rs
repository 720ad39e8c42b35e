//! The agent's Prometheus metrics, through `prometheus-client` (OpenMetrics text): typed label
//! sets, so a label value that no metric knows cannot be recorded.

use podwire_core::lookup::LookupStatus;
use podwire_core::node::Repair;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::fmt::Write;
use std::time::Duration;

/// Upper bounds of the look-up latency buckets, in seconds.
const BUCKETS: [f64; 8] = [0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.025, 0.1, 1.0];

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A 0/1 gauge.
#[derive(Debug, Default, Clone)]
pub struct Flag(Gauge);

impl Flag {
    pub fn set(&self, on: bool) {
        self.0.set(i64::from(on));
    }
    pub fn get(&self) -> bool {
        self.0.get() != 0
    }
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
enum LookupResult {
    Found,
    NotFound,
    NotReady,
    Error,
}

impl EncodeLabelValue for LookupResult {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        e.write_str(match self {
            LookupResult::Found => "found",
            LookupResult::NotFound => "not_found",
            LookupResult::NotReady => "not_ready",
            LookupResult::Error => "error",
        })
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: LookupResult,
}

/// `podwire_repairs_total`'s `action`: the repair mode carried out (`off`: only reported), or
/// `failed`.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
enum RepairAction {
    Done(Repair),
    Failed,
}

impl EncodeLabelValue for RepairAction {
    fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        e.write_str(match self {
            RepairAction::Done(r) => r.as_str(),
            RepairAction::Failed => "failed",
        })
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabel {
    action: RepairAction,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    lookups: Family<ResultLabel, Counter>,
    latency: Histogram,
    repairs: Family<ActionLabel, Counter>,
    pub installed: Flag,
    pub synced: Flag,
    pub api_reachable: Flag,
    pub installs: Counter,
    pub reinserts: Counter,
    pub reverted_storms: Counter,
    pub cached_pods: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            lookups: Family::default(),
            latency: Histogram::new(BUCKETS),
            repairs: Family::default(),
            installed: Flag::default(),
            synced: Flag::default(),
            api_reachable: Flag::default(),
            installs: Counter::default(),
            reinserts: Counter::default(),
            reverted_storms: Counter::default(),
            cached_pods: Gauge::default(),
            registry: Registry::default(),
        };
        // Every label value from the start: a scrape shows 0, not an absent series.
        for result in [
            LookupResult::Found,
            LookupResult::NotFound,
            LookupResult::NotReady,
            LookupResult::Error,
        ] {
            drop(m.lookups.get_or_create(&ResultLabel { result }));
        }
        for action in [
            RepairAction::Done(Repair::Delete),
            RepairAction::Done(Repair::Label),
            RepairAction::Done(Repair::Off),
            RepairAction::Failed,
        ] {
            drop(m.repairs.get_or_create(&ActionLabel { action }));
        }
        let r = &mut registry;
        r.register(
            "podwire_installed",
            "1 when podwire-cni is installed and chained into the primary CNI config",
            m.installed.0.clone(),
        );
        r.register(
            "podwire_pod_cache_synced",
            "1 once the node's pod watch has completed its first list",
            m.synced.0.clone(),
        );
        r.register(
            "podwire_api_reachable",
            "1 when the last API server call succeeded",
            m.api_reachable.0.clone(),
        );
        r.register(
            "podwire_cached_pods",
            "Pods of this node in the agent's cache",
            m.cached_pods.clone(),
        );
        r.register(
            "podwire_installs",
            "Times podwire-cni was written into the primary CNI config",
            m.installs.clone(),
        );
        r.register(
            "podwire_reinserts",
            "Times the entry had to be put back after the primary CNI rewrote its config",
            m.reinserts.clone(),
        );
        r.register(
            "podwire_reverted_storms",
            "Times another component kept removing podwire's entry (more than 5 re-inserts a minute)",
            m.reverted_storms.clone(),
        );
        r.register(
            "podwire_repairs",
            "Mesh pods found running without redirection, by action",
            m.repairs.clone(),
        );
        r.register(
            "podwire_lookups",
            "Plugin look-ups answered, by result",
            m.lookups.clone(),
        );
        r.register_with_unit(
            "podwire_lookup_duration",
            "Time to answer a plugin look-up",
            Unit::Seconds,
            m.latency.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn lookup(&self, status: &LookupStatus, took: Duration) {
        let result = match status {
            LookupStatus::Found { .. } => LookupResult::Found,
            LookupStatus::NotFound => LookupResult::NotFound,
            LookupStatus::NotReady { .. } => LookupResult::NotReady,
            LookupStatus::Error { .. } => LookupResult::Error,
        };
        self.lookups.get_or_create(&ResultLabel { result }).inc();
        self.latency.observe(took.as_secs_f64());
    }

    /// One raced pod handled with `mode`; `ok: false` counts it as `failed`.
    pub fn repaired(&self, mode: Repair, ok: bool) {
        let action = if ok {
            RepairAction::Done(mode)
        } else {
            RepairAction::Failed
        };
        self.repairs.get_or_create(&ActionLabel { action }).inc();
    }

    /// The OpenMetrics text ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            // Writing into a String cannot fail; say so rather than serve half a page.
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
    fn histogram_is_cumulative_and_every_label_is_there() {
        let m = Metrics::default();
        m.lookup(&LookupStatus::NotFound, Duration::from_micros(300));
        m.lookup(&LookupStatus::NotFound, Duration::from_millis(50));
        m.repaired(Repair::Off, true);
        let text = m.render();
        for line in [
            "podwire_lookups_total{result=\"not_found\"} 2",
            "podwire_lookups_total{result=\"found\"} 0",
            "podwire_lookup_duration_seconds_bucket{le=\"0.0005\"} 1",
            "podwire_lookup_duration_seconds_bucket{le=\"0.1\"} 2",
            "podwire_lookup_duration_seconds_count 2",
            "podwire_repairs_total{action=\"off\"} 1",
            "podwire_repairs_total{action=\"failed\"} 0",
            "podwire_installed 0",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
