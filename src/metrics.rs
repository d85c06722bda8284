//! Prometheus metrics: releases and refusals by purpose, caller and outcome,
//! the latency of the audit log's durable append, and event deliveries. Owns nothing else.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    pub subscriber: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SubscriberLabel {
    pub subscriber: String,
}

pub struct Metrics {
    registry: Registry,
    /// Event delivery attempts by subscriber and outcome (delivered, failed,
    /// unreachable, dead).
    pub event_deliveries: Family<DeliveryLabels, Counter>,
    pub events_pending: Family<SubscriberLabel, Gauge>,
    pub events_oldest_pending_seconds: Family<SubscriberLabel, Gauge>,
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
        let event_deliveries = Family::<DeliveryLabels, Counter>::default();
        registry.register(
            "event_deliveries",
            "Event delivery attempts by subscriber and outcome",
            event_deliveries.clone(),
        );
        let events_pending = Family::<SubscriberLabel, Gauge>::default();
        registry.register(
            "events_pending",
            "Events recorded and not yet delivered, per subscriber",
            events_pending.clone(),
        );
        let events_oldest_pending_seconds = Family::<SubscriberLabel, Gauge>::default();
        registry.register(
            "events_oldest_pending_seconds",
            "Age of the oldest undelivered event, per subscriber (0 when none)",
            events_oldest_pending_seconds.clone(),
        );
        Metrics {
            registry,
            event_deliveries,
            events_pending,
            events_oldest_pending_seconds,
            decisions,
            audit_flush_seconds,
            rate_limited,
        }
    }
}

impl Metrics {
    pub fn event_delivered(&self, subscriber: &str, outcome: &str) {
        self.event_deliveries
            .get_or_create(&DeliveryLabels {
                subscriber: subscriber.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Sets the queue gauges: (subscriber, pending, age of the oldest in seconds).
    pub fn set_event_queues(&self, queues: &[(String, u64, u64)]) {
        for (name, pending, age) in queues {
            let l = SubscriberLabel {
                subscriber: name.clone(),
            };
            self.events_pending.get_or_create(&l).set(*pending as i64);
            self.events_oldest_pending_seconds.get_or_create(&l).set(*age as i64);
        }
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry).expect("write to String");
        s
    }
}
