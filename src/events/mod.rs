//! Events to the systems that received a subject's data: the durable outbox.
//!
//! Owns the event records (`outbox` tree, by sequence number), each
//! subscriber's delivery state (`deliveries` tree, by subscriber then
//! sequence, so one scan reads a subscriber's queue in order; the dead ones
//! under a key of their own, out of the queue's way), staging an
//! event into the same `Commit` as the change it reports, and the operator's
//! view (list, retry). `sender` delivers them.
//!
//! Nothing here holds a field value: events name subjects, field names,
//! purposes and receipts.

pub mod sender;

use crate::config::{EventsConfig, SubscriberConfig};
use crate::error::{Result, VaultError};
use crate::fsutil::{now_secs, rfc3339};
use crate::storage::{Commit, Space, Store};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;

// The event types this vault sends: the one list that the configuration's
// check, the events made and the API document read.
/// An event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub enum EventType {
    #[serde(rename = "subject.erased")]
    SubjectErased,
    #[serde(rename = "subject.rectified")]
    SubjectRectified,
    #[serde(rename = "consent.changed")]
    ConsentChanged,
    #[serde(rename = "grant.revoked")]
    GrantRevoked,
}

impl EventType {
    pub const ALL: [EventType; 4] = [
        EventType::SubjectErased,
        EventType::SubjectRectified,
        EventType::ConsentChanged,
        EventType::GrantRevoked,
    ];

    /// Its name on the wire and in `events.subscribers.*.events` (the
    /// serde name above; a test holds the two together).
    pub fn name(self) -> &'static str {
        match self {
            EventType::SubjectErased => "subject.erased",
            EventType::SubjectRectified => "subject.rectified",
            EventType::ConsentChanged => "consent.changed",
            EventType::GrantRevoked => "grant.revoked",
        }
    }
}

/// An event as recorded, before delivery.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventRecord {
    pub seq: u64,
    /// The Standard Webhooks message id (`webhook-id`), the same on every
    /// attempt and for every subscriber.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// Deliveries of one subject's events keep their order.
    pub subject: Option<String>,
    pub created_at: u64,
    pub data: Value,
    /// What only one subscriber is told (whether it received the data).
    #[serde(default)]
    pub per_subscriber: BTreeMap<String, Value>,
    /// The subscribers it goes to.
    pub targets: Vec<String>,
}

impl EventRecord {
    /// The delivery body for one subscriber, the same bytes on every attempt.
    pub fn body(&self, subscriber: &str) -> Vec<u8> {
        let mut data = self.data.clone();
        if let (Some(obj), Some(Value::Object(extra))) = (data.as_object_mut(), self.per_subscriber.get(subscriber)) {
            for (k, v) in extra {
                obj.insert(k.clone(), v.clone());
            }
        }
        serde_json::to_vec(&json!({
            "type": self.kind,
            "timestamp": rfc3339(self.created_at),
            "data": data,
        }))
        .expect("json")
    }
}

/// A delivery state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    Pending,
    Dead,
}

/// One subscriber's delivery of one event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    pub state: DeliveryState,
    pub subject: Option<String>,
    pub attempts: u32,
    /// Unix milliseconds of the next attempt.
    pub next_at_ms: u64,
    /// When the event was recorded or last retried by the operator: the dead
    /// clock runs from here.
    pub since: u64,
    pub recorded_at: u64,
    /// HTTP status or transport failure of the last attempt; never a body.
    pub last_error: Option<String>,
}

/// What a change reports, before it is staged.
pub struct NewEvent {
    pub kind: EventType,
    pub subject: Option<String>,
    pub data: Value,
    pub per_subscriber: BTreeMap<String, Value>,
    /// Only subscribers some of whose callers are named here (grant events).
    pub audience: Option<String>,
    /// A fixed id (an erasure has one per subject, so a replay sends it again
    /// under the same id); else a fresh one.
    pub id: Option<String>,
}

/// A pending delivery's key: the subscriber's name (`[a-z0-9_]`), 0, the
/// sequence. The sender's queue is the scan of `name 0`.
pub fn delivery_key(subscriber: &str, seq: u64) -> Vec<u8> {
    key_of(subscriber, PENDING, seq)
}

/// The tags after the subscriber's name: a dead delivery is kept apart
/// (until the operator's retry), so that any number of them never stands
/// between the sender and the pending ones behind them.
const PENDING: u8 = 0;
const DEAD: u8 = 1;

fn key_of(subscriber: &str, tag: u8, seq: u64) -> Vec<u8> {
    let mut k = queue_prefix(subscriber, tag);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn queue_prefix(subscriber: &str, tag: u8) -> Vec<u8> {
    let mut p = subscriber.as_bytes().to_vec();
    p.push(tag);
    p
}

/// The key a delivery in state `state` is kept under.
fn state_key(subscriber: &str, seq: u64, state: DeliveryState) -> Vec<u8> {
    match state {
        DeliveryState::Pending => key_of(subscriber, PENDING, seq),
        DeliveryState::Dead => key_of(subscriber, DEAD, seq),
    }
}

fn seq_of(key: &[u8]) -> u64 {
    u64::from_be_bytes(key[key.len() - 8..].try_into().expect("8 bytes"))
}

fn decode<T: for<'de> Deserialize<'de>>(b: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(b).map_err(|_| VaultError::internal(format!("corrupt {what}")))
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The subscribers an event goes to.
pub fn targets<'a>(cfg: &'a EventsConfig, ev: &NewEvent) -> Vec<&'a SubscriberConfig> {
    cfg.subscribers
        .iter()
        .filter(|s| s.wants(ev.kind.name()))
        .filter(|s| match &ev.audience {
            Some(caller) => s.callers().iter().any(|c| c == caller),
            None => true,
        })
        .collect()
}

impl NewEvent {
    /// An event about one subject, told alike to every subscriber that asked.
    pub fn about(kind: EventType, subject: &str, data: Value) -> NewEvent {
        NewEvent {
            kind,
            subject: Some(subject.to_owned()),
            data,
            per_subscriber: BTreeMap::new(),
            audience: None,
            id: None,
        }
    }
}

/// Adds an event and its deliveries to `c` (marking it as one that recorded
/// events); nothing when no subscriber wants it.
pub fn stage(store: &Store, cfg: &EventsConfig, c: &mut Commit, ev: NewEvent) -> Result<()> {
    let to = targets(cfg, &ev);
    if to.is_empty() {
        return Ok(());
    }
    c.has_events = true;
    let seq = store.next_counter("event_seq")?;
    let now = now_secs();
    let rec = EventRecord {
        seq,
        id: ev
            .id
            .unwrap_or_else(|| format!("msg_{}", uuid::Uuid::new_v4().simple())),
        kind: ev.kind.name().to_owned(),
        subject: ev.subject.clone(),
        created_at: now,
        data: ev.data,
        per_subscriber: ev.per_subscriber,
        targets: to.iter().map(|s| s.name.clone()).collect(),
    };
    c.insert(
        Space::Outbox,
        seq.to_be_bytes(),
        serde_json::to_vec(&rec).expect("json"),
    );
    for s in to {
        let d = Delivery {
            state: DeliveryState::Pending,
            subject: ev.subject.clone(),
            attempts: 0,
            next_at_ms: 0,
            since: now,
            recorded_at: now,
            last_error: None,
        };
        c.insert(
            Space::Deliveries,
            delivery_key(&s.name, seq),
            serde_json::to_vec(&d).expect("json"),
        );
    }
    Ok(())
}

/// The fixed message id of an event that can be staged twice for one fact
/// (a subject's erasure, a grant's revocation: replayed from their ledgers
/// after a crash or a restore), so that receivers see one id.
pub fn fixed_event_id(kind: EventType, key: &str) -> String {
    let h = crate::crypto::sha256(format!("pdvault/event/{}/{key}", kind.name()).as_bytes());
    format!("msg_{}", hex::encode(&h[..16]))
}

pub fn load_event(store: &Store, seq: u64) -> Result<Option<EventRecord>> {
    match store.get(Space::Outbox, seq.to_be_bytes())? {
        Some(b) => Ok(Some(decode(&b, "event record")?)),
        None => Ok(None),
    }
}

/// A subscriber's queue, in order: (sequence, delivery). Dead deliveries
/// are not in it (a store written before they were kept apart may still
/// hold some here: the sender moves them, [`put_delivery`]).
pub fn queue(store: &Store, subscriber: &str, limit: usize) -> Result<Vec<(u64, Delivery)>> {
    let mut out = vec![];
    for kv in store
        .scan(Space::Deliveries, queue_prefix(subscriber, PENDING))
        .take(limit)
    {
        let (k, v) = kv?;
        out.push((seq_of(&k), decode(&v, "delivery")?));
    }
    Ok(out)
}

/// Keeps a delivery under the key of its state, and removes it from the
/// other's, in one unit (a delivery that dies leaves the queue).
pub fn put_delivery(store: &Store, subscriber: &str, seq: u64, d: &Delivery) -> Result<()> {
    let other = match d.state {
        DeliveryState::Pending => DeliveryState::Dead,
        DeliveryState::Dead => DeliveryState::Pending,
    };
    let mut c = Commit::default();
    c.remove(Space::Deliveries, state_key(subscriber, seq, other));
    c.insert(
        Space::Deliveries,
        state_key(subscriber, seq, d.state),
        serde_json::to_vec(d).expect("json"),
    );
    store.apply(&c)
}

/// A subscriber's delivery of event `seq`, pending or dead.
fn get_delivery(store: &Store, subscriber: &str, seq: u64) -> Result<Option<Delivery>> {
    for state in [DeliveryState::Pending, DeliveryState::Dead] {
        if let Some(b) = store.get(Space::Deliveries, state_key(subscriber, seq, state))? {
            return Ok(Some(decode(&b, "delivery")?));
        }
    }
    Ok(None)
}

/// A delivery is done: forgets it, and the event once no subscriber waits.
pub fn delivered(store: &Store, ev: &EventRecord, subscriber: &str) -> Result<()> {
    store.remove(Space::Deliveries, delivery_key(subscriber, ev.seq))?;
    let mut left = false;
    for t in &ev.targets {
        left |= get_delivery(store, t, ev.seq)?.is_some();
    }
    if !left {
        store.remove(Space::Outbox, ev.seq.to_be_bytes())?;
    }
    Ok(())
}

/// Which deliveries `list` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    All,
    Pending,
    Dead,
}

/// An event not yet delivered to every subscriber.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = PendingEvent)]
pub struct EventView {
    /// The Standard Webhooks message id (`webhook-id`).
    pub id: String,
    #[serde(rename = "type")]
    #[schema(value_type = EventType)]
    pub kind: String,
    pub subject: Option<String>,
    #[schema(format = DateTime)]
    pub created_at: String,
    pub deliveries: Vec<DeliveryView>,
}

/// One subscriber's delivery of an event.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = Delivery)]
pub struct DeliveryView {
    pub subscriber: String,
    pub state: DeliveryState,
    pub attempts: u32,
    #[schema(format = DateTime)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    /// HTTP status or transport failure of the last attempt; never a body.
    pub last_error: Option<String>,
}

/// Undelivered events, oldest first.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventList {
    pub events: Vec<EventView>,
}

impl Filter {
    pub fn parse(s: Option<&str>) -> Option<Filter> {
        match s {
            None | Some("all") => Some(Filter::All),
            Some("pending") => Some(Filter::Pending),
            Some("dead") => Some(Filter::Dead),
            Some(_) => None,
        }
    }
    fn shows(self, d: &Delivery) -> bool {
        match self {
            Filter::All => true,
            Filter::Pending => d.state == DeliveryState::Pending,
            Filter::Dead => d.state == DeliveryState::Dead,
        }
    }
}

/// Undelivered events with their deliveries, oldest first.
pub fn list(store: &Store, filter: Filter, limit: usize) -> Result<Vec<EventView>> {
    let mut out = vec![];
    for kv in store.scan(Space::Outbox, []) {
        let (_, v) = kv?;
        let ev: EventRecord = decode(&v, "event record")?;
        let mut deliveries = vec![];
        for t in &ev.targets {
            let Some(d) = get_delivery(store, t, ev.seq)? else {
                continue;
            };
            if filter.shows(&d) {
                deliveries.push(DeliveryView {
                    subscriber: t.clone(),
                    state: d.state,
                    attempts: d.attempts,
                    next_attempt_at: (d.state == DeliveryState::Pending).then(|| rfc3339(d.next_at_ms / 1000)),
                    last_error: d.last_error,
                });
            }
        }
        if !deliveries.is_empty() {
            out.push(EventView {
                id: ev.id,
                kind: ev.kind,
                subject: ev.subject,
                created_at: rfc3339(ev.created_at),
                deliveries,
            });
            if out.len() == limit {
                break;
            }
        }
    }
    Ok(out)
}

/// Sends an event's dead deliveries again, with a fresh dead clock. Returns
/// how many were re-queued; `None` when no undelivered event has that id.
pub fn retry(store: &Store, id: &str) -> Result<Option<usize>> {
    for kv in store.scan(Space::Outbox, []) {
        let (_, v) = kv?;
        let ev: EventRecord = decode(&v, "event record")?;
        if ev.id != id {
            continue;
        }
        let mut n = 0;
        for t in &ev.targets {
            let Some(mut d) = get_delivery(store, t, ev.seq)? else {
                continue;
            };
            if d.state == DeliveryState::Dead {
                d.state = DeliveryState::Pending;
                d.attempts = 0;
                d.next_at_ms = 0;
                d.since = now_secs();
                put_delivery(store, t, ev.seq, &d)?;
                n += 1;
            }
        }
        return Ok(Some(n));
    }
    Ok(None)
}

/// Queue depth and the age of the oldest pending delivery, per subscriber.
pub fn depth(store: &Store, cfg: &EventsConfig) -> Result<Vec<(String, u64, u64)>> {
    let now = now_secs();
    let mut out = vec![];
    for s in &cfg.subscribers {
        let (mut n, mut oldest) = (0u64, None::<u64>);
        for kv in store.scan(Space::Deliveries, queue_prefix(&s.name, PENDING)) {
            let (_, v) = kv?;
            let d: Delivery = decode(&v, "delivery")?;
            if d.state == DeliveryState::Pending {
                n += 1;
                oldest = Some(oldest.map_or(d.recorded_at, |o| o.min(d.recorded_at)));
            }
        }
        out.push((s.name.clone(), n, oldest.map_or(0, |o| now.saturating_sub(o))));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(name: &str, events: &[&str], callers: Option<Vec<&str>>) -> SubscriberConfig {
        SubscriberConfig {
            name: name.into(),
            url: "https://x.example/".into(),
            secret_file: "s".into(),
            events: events.iter().map(|s| s.to_string()).collect(),
            ca_file: None,
            callers: callers.map(|c| c.into_iter().map(String::from).collect()),
        }
    }

    #[test]
    fn an_event_type_is_named_alike_on_the_wire_and_in_the_config() {
        for k in EventType::ALL {
            assert_eq!(serde_json::to_value(k).unwrap(), k.name());
        }
    }

    #[test]
    fn events_reach_only_who_asked_and_grant_events_only_the_holder() {
        let cfg = EventsConfig {
            subscribers: vec![
                sub("orders", &["subject.erased", "grant.revoked"], None),
                sub("courier", &["grant.revoked"], Some(vec!["courier-kz", "courier-2"])),
            ],
            ..Default::default()
        };
        let ev = |kind, audience: Option<&str>| NewEvent {
            kind,
            subject: None,
            data: json!({}),
            per_subscriber: Default::default(),
            audience: audience.map(String::from),
            id: None,
        };
        let names = |v: Vec<&SubscriberConfig>| v.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(targets(&cfg, &ev(EventType::SubjectErased, None))), ["orders"]);
        assert!(targets(&cfg, &ev(EventType::ConsentChanged, None)).is_empty());
        assert_eq!(
            names(targets(&cfg, &ev(EventType::GrantRevoked, Some("courier-2")))),
            ["courier"]
        );
        assert_eq!(
            names(targets(&cfg, &ev(EventType::GrantRevoked, Some("orders")))),
            ["orders"]
        );
        assert!(targets(&cfg, &ev(EventType::GrantRevoked, Some("payments"))).is_empty());
    }

    /// A store with `n` `consent.changed` events (subjects s0, s1, ...)
    /// staged for subscribers a and b, a's with a line of its own.
    fn store_with_events(d: &tempfile::TempDir, n: usize) -> (Store, EventsConfig) {
        let store = Store::open(d.path()).unwrap();
        let cfg = EventsConfig {
            subscribers: vec![
                sub("a", &["consent.changed"], None),
                sub("b", &["consent.changed"], None),
            ],
            ..Default::default()
        };
        for i in 0..n {
            let mut c = Commit::default();
            let ev = NewEvent {
                kind: EventType::ConsentChanged,
                subject: Some(format!("s{i}")),
                data: json!({"subject": format!("s{i}")}),
                per_subscriber: [("a".to_string(), json!({"only": "a"}))].into(),
                audience: None,
                id: None,
            };
            stage(&store, &cfg, &mut c, ev).unwrap();
            assert!(c.has_events);
            store.apply(&c).unwrap();
        }
        (store, cfg)
    }

    #[test]
    fn staged_events_queue_in_order_and_leave_when_delivered() {
        let d = tempfile::tempdir().unwrap();
        let (store, _) = store_with_events(&d, 3);
        let q = queue(&store, "a", 10).unwrap();
        assert_eq!(q.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1, 2, 3]);
        let ev = load_event(&store, 1).unwrap().unwrap();
        let body: Value = serde_json::from_slice(&ev.body("a")).unwrap();
        assert_eq!(body["data"]["only"], "a");
        assert_eq!(body["type"], "consent.changed");
        let body_b: Value = serde_json::from_slice(&ev.body("b")).unwrap();
        assert!(body_b["data"].get("only").is_none());
        delivered(&store, &ev, "a").unwrap();
        assert!(load_event(&store, 1).unwrap().is_some(), "b still waits");
        delivered(&store, &ev, "b").unwrap();
        assert!(load_event(&store, 1).unwrap().is_none());
        assert_eq!(list(&store, Filter::All, 100).unwrap().len(), 2);
    }

    /// However many deliveries are dead, the pending ones behind them are
    /// the queue's first: dead ones wait apart for the operator's retry.
    #[test]
    fn dead_deliveries_stand_apart_from_the_queue_until_retried() {
        let d = tempfile::tempdir().unwrap();
        let (store, cfg) = store_with_events(&d, 4);
        for (seq, mut dl) in queue(&store, "a", 3).unwrap() {
            dl.state = DeliveryState::Dead;
            put_delivery(&store, "a", seq, &dl).unwrap();
        }
        let seqs = |q: Vec<(u64, Delivery)>| q.into_iter().map(|(s, _)| s).collect::<Vec<_>>();
        assert_eq!(seqs(queue(&store, "a", 3).unwrap()), [4], "the dead ones took the pass");
        assert_eq!(depth(&store, &cfg).unwrap()[0].1, 1);
        assert_eq!(list(&store, Filter::Dead, 100).unwrap().len(), 3);
        // b's delivery of event 1 is done; a's dead one keeps the event.
        let ev1 = load_event(&store, 1).unwrap().unwrap();
        delivered(&store, &ev1, "b").unwrap();
        assert!(
            load_event(&store, 1).unwrap().is_some(),
            "a dead delivery still needs the event"
        );
        assert_eq!(retry(&store, &ev1.id).unwrap(), Some(1));
        assert_eq!(seqs(queue(&store, "a", 10).unwrap()), [1, 4]);
        assert_eq!(list(&store, Filter::Dead, 100).unwrap().len(), 2);
        // A dead delivery a version before kept in the queue leaves it
        // when the sender puts it back.
        let mut old = queue(&store, "a", 1).unwrap().remove(0).1;
        old.state = DeliveryState::Dead;
        store
            .insert(
                Space::Deliveries,
                delivery_key("a", 1),
                serde_json::to_vec(&old).unwrap(),
            )
            .unwrap();
        assert_eq!(queue(&store, "a", 10).unwrap()[0].1.state, DeliveryState::Dead);
        put_delivery(&store, "a", 1, &old).unwrap();
        assert_eq!(seqs(queue(&store, "a", 10).unwrap()), [4]);
        assert_eq!(list(&store, Filter::Dead, 100).unwrap().len(), 3);
    }
}
