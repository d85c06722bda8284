//! Delivers the outbox: one task per subscriber, Standard Webhooks signing,
//! retries with exponential back-off and jitter, dead after `dead_after`.
//!
//! Owns the subscribers' runtime side (their secret, their HTTPS client) and
//! the delivery loop. A subject's events reach a subscriber in the order
//! they were recorded: while one waits for a retry, the later ones of the
//! same subject wait behind it; other subjects' events go on.

use super::{delivered, load_event, now_ms, put_delivery, queue, DeliveryState, EventRecord};
use crate::config::{EventsConfig, SubscriberConfig};
use crate::fsutil::{now_secs, read_secret_file};
use crate::vault::Vault;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// A subscriber ready to send to. Its secret is neither printable nor kept
/// anywhere but in the signer.
pub struct Subscriber {
    cfg: SubscriberConfig,
    signer: standardwebhooks::Webhook,
    client: reqwest::Client,
}

/// Reads every subscriber's secret and trust anchors: a missing or malformed
/// one stops the start, naming the subscriber and the file.
pub fn load(cfg: &EventsConfig) -> Result<Vec<Subscriber>, String> {
    cfg.subscribers.iter().map(|s| load_one(cfg, s)).collect()
}

fn load_one(cfg: &EventsConfig, s: &SubscriberConfig) -> Result<Subscriber, String> {
    let at = |what: &str| format!("events.subscribers.{}: {what}", s.name);
    let secret =
        read_secret_file(&s.secret_file).map_err(|e| at(&format!("secret_file {}: {e}", s.secret_file.display())))?;
    let secret = secret.trim();
    let b64 = secret.strip_prefix("whsec_").ok_or_else(|| {
        at(&format!(
            "secret_file {}: not a Standard Webhooks secret (whsec_...)",
            s.secret_file.display()
        ))
    })?;
    let key = {
        use base64::Engine;
        zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| {
            at(&format!(
                "secret_file {}: not base64 after whsec_",
                s.secret_file.display()
            ))
        })?)
    };
    if !(24..=64).contains(&key.len()) {
        return Err(at(&format!(
            "secret_file {}: the secret must be 24 to 64 bytes",
            s.secret_file.display()
        )));
    }
    let signer = standardwebhooks::Webhook::from_bytes(key.to_vec()).map_err(|_| at("secret"))?;
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .https_only(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(cfg.timeout)
        .connect_timeout(cfg.timeout)
        .user_agent(concat!("pdvault/", env!("CARGO_PKG_VERSION")));
    match &s.ca_file {
        Some(f) => {
            let pem = std::fs::read(f).map_err(|e| at(&format!("ca_file {}: {e}", f.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| at(&format!("ca_file {}: {e}", f.display())))?;
            if certs.is_empty() {
                return Err(at(&format!("ca_file {}: no certificate", f.display())));
            }
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                if let Ok(c) = reqwest::Certificate::from_der(&c) {
                    b = b.add_root_certificate(c);
                }
            }
        }
    }
    let client = b.build().map_err(|e| at(&format!("https client: {e}")))?;
    Ok(Subscriber {
        cfg: s.clone(),
        signer,
        client,
    })
}

/// Starts one delivery task per subscriber.
pub fn spawn(vault: Arc<Vault>, subs: Vec<Subscriber>) -> Vec<tokio::task::JoinHandle<()>> {
    subs.into_iter()
        .map(|s| {
            let vault = vault.clone();
            tokio::spawn(async move { run(vault, s).await })
        })
        .collect()
}

/// Longest sleep between passes when nothing is due (a retry from the CLI
/// run against a stopped server is picked up within this).
const IDLE: Duration = Duration::from_secs(30);

async fn run(vault: Arc<Vault>, sub: Subscriber) {
    let mut wake = vault.event_wakeups();
    loop {
        let next = match pass(&vault, &sub).await {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(subscriber = %sub.cfg.name, error = %e, "event delivery pass failed");
                Some(now_ms() + 1000)
            }
        };
        let sleep = next
            .map(|t| Duration::from_millis(t.saturating_sub(now_ms())))
            .unwrap_or(IDLE)
            .min(IDLE);
        tokio::select! {
            r = wake.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}

/// The most deliveries one pass looks at; the rest wait for the next.
const PASS: usize = 10_000;

/// How one attempt ended.
enum Outcome {
    Delivered,
    Failed(String),
    Unreachable(String),
}

/// One sweep of the subscriber's queue. Returns when the next attempt is due.
async fn pass(vault: &Vault, sub: &Subscriber) -> crate::error::Result<Option<u64>> {
    let store = vault.store();
    let cfg = &vault.cfg.events;
    let mut blocked: HashSet<String> = HashSet::new();
    let mut next: Option<u64> = None;
    let due = |t: u64, next: &mut Option<u64>| *next = Some(next.map_or(t, |n| n.min(t)));
    for (seq, mut d) in queue(store, &sub.cfg.name, PASS)? {
        if d.state == DeliveryState::Dead {
            // Kept here by a version before dead ones were kept apart.
            put_delivery(store, &sub.cfg.name, seq, &d)?;
            continue;
        }
        if d.subject.as_ref().is_some_and(|s| blocked.contains(s)) {
            continue;
        }
        if d.next_at_ms > now_ms() {
            due(d.next_at_ms, &mut next);
            d.subject.iter().for_each(|s| {
                blocked.insert(s.clone());
            });
            continue;
        }
        let Some(ev) = load_event(store, seq)? else {
            store.remove(
                crate::storage::Space::Deliveries,
                super::delivery_key(&sub.cfg.name, seq),
            )?;
            continue;
        };
        let outcome = send(sub, &ev).await;
        let label = match &outcome {
            Outcome::Delivered => "delivered",
            Outcome::Failed(_) => "failed",
            Outcome::Unreachable(_) => "unreachable",
        };
        vault.metrics.event_delivered(&sub.cfg.name, label);
        match outcome {
            Outcome::Delivered => {
                tracing::info!(subscriber = %sub.cfg.name, event = %ev.id, kind = %ev.kind, attempts = d.attempts + 1, "event delivered");
                delivered(store, &ev, &sub.cfg.name)?;
            }
            Outcome::Failed(why) | Outcome::Unreachable(why) => {
                d.attempts += 1;
                d.last_error = Some(why.clone());
                if now_secs().saturating_sub(d.since) >= cfg.dead_after.as_secs() {
                    d.state = DeliveryState::Dead;
                    vault.metrics.event_delivered(&sub.cfg.name, "dead");
                    tracing::warn!(subscriber = %sub.cfg.name, event = %ev.id, kind = %ev.kind, attempts = d.attempts, error = %why, "event dead: undelivered past events.dead_after");
                } else {
                    d.next_at_ms = now_ms() + backoff(cfg, d.attempts).as_millis() as u64;
                    due(d.next_at_ms, &mut next);
                    d.subject.iter().for_each(|s| {
                        blocked.insert(s.clone());
                    });
                    tracing::debug!(subscriber = %sub.cfg.name, event = %ev.id, attempts = d.attempts, error = %why, "event delivery failed; will retry");
                }
                put_delivery(store, &sub.cfg.name, seq, &d)?;
            }
        }
    }
    Ok(next)
}

/// `retry_min * 2^(attempts-1)`, capped at `retry_max`, then a random
/// 50-100 % of it (so that many vault nodes or events do not retry in step).
pub fn backoff(cfg: &EventsConfig, attempts: u32) -> Duration {
    let exp = cfg
        .retry_min
        .saturating_mul(1u32 << attempts.saturating_sub(1).min(20))
        .min(cfg.retry_max);
    let f: f64 = 0.5 + rand::random::<f64>() * 0.5;
    exp.mul_f64(f)
}

async fn send(sub: &Subscriber, ev: &EventRecord) -> Outcome {
    let body = ev.body(&sub.cfg.name);
    let ts = now_secs() as i64;
    let sig = match sub.signer.sign(&ev.id, ts, &body) {
        Ok(s) => s,
        Err(_) => return Outcome::Failed("cannot sign".into()),
    };
    let r = sub
        .client
        .post(&sub.cfg.url)
        .header("content-type", "application/json")
        .header("webhook-id", &ev.id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sig)
        .body(body)
        .send()
        .await;
    match r {
        Ok(resp) if resp.status().is_success() => Outcome::Delivered,
        Ok(resp) => Outcome::Failed(format!("HTTP {}", resp.status().as_u16())),
        Err(e) if e.is_timeout() => Outcome::Unreachable("timeout".into()),
        Err(e) if e.is_connect() => Outcome::Unreachable("cannot connect".into()),
        Err(_) => Outcome::Unreachable("transport error".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let cfg = EventsConfig {
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            ..Default::default()
        };
        for attempts in 1..40 {
            let full = Duration::from_secs(1u64 << (attempts - 1).min(20)).min(Duration::from_secs(60));
            let b = backoff(&cfg, attempts);
            assert!(b <= full && b >= full / 2, "{attempts}: {b:?} vs {full:?}");
        }
    }
}
