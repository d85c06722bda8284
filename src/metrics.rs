//! Prometheus metrics: releases and refusals by purpose, caller and outcome,
//! and the latency of the audit log's durable append. Owns nothing else.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub purpose: String,
    pub caller: String,
    pub action: String,
    pub outcome: String,
    pub code: String,
}

pub struct Metrics {
    registry: Registry,
    pub decisions: Family<DecisionLabels, Counter>,
    pub audit_flush_seconds: Histogram,
    pub rate_limited: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("pdvault");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Policy decisions (releases, writes and refusals)",
            decisions.clone(),
        );
        let audit_flush_seconds = Histogram::new(
            [
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]
            .into_iter(),
        );
        registry.register(
            "audit_flush_seconds",
            "Time to make a batch of audit entries durable (group commit)",
            audit_flush_seconds.clone(),
        );
        let rate_limited = Counter::default();
        registry.register(
            "rate_limited",
            "Requests refused for repeated bad tokens",
            rate_limited.clone(),
        );
        Metrics {
            registry,
            decisions,
            audit_flush_seconds,
            rate_limited,
        }
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry).expect("write to String");
        s
    }
}
