//! Online guessing defence: per-peer counting of unknown tokens presented in
//! a row. Past `auth_failures_free` each further failure is answered more
//! slowly; past `auth_failures_lockout` the peer is refused with 429 for
//! `lockout`, whatever token it sends. A known token resets the count.

use crate::config::LimitsConfig;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Default)]
struct Peer {
    failures: u32,
    locked_until: Option<Instant>,
}

pub struct RateLimiter {
    cfg: LimitsConfig,
    peers: Mutex<HashMap<IpAddr, Peer>>,
}

impl RateLimiter {
    pub fn new(cfg: LimitsConfig) -> Self {
        RateLimiter {
            cfg,
            peers: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(seconds)` while the peer is locked out.
    pub fn locked(&self, ip: IpAddr) -> Option<u64> {
        let mut peers = self.peers.lock().expect("rate limiter");
        let p = peers.get_mut(&ip)?;
        match p.locked_until {
            Some(t) if t > Instant::now() => Some((t - Instant::now()).as_secs().max(1)),
            Some(_) => {
                p.locked_until = None;
                p.failures = 0;
                None
            }
            None => None,
        }
    }

    /// Records an unknown token; returns how long to delay the answer.
    pub fn failure(&self, ip: IpAddr) -> Duration {
        let mut peers = self.peers.lock().expect("rate limiter");
        if peers.len() > 100_000 {
            peers.retain(|_, p| p.locked_until.is_some());
        }
        let p = peers.entry(ip).or_default();
        p.failures += 1;
        if p.failures >= self.cfg.auth_failures_lockout {
            p.locked_until = Some(Instant::now() + self.cfg.lockout);
        }
        let over = p.failures.saturating_sub(self.cfg.auth_failures_free);
        self.cfg.slowdown_step * over.min(40)
    }

    pub fn success(&self, ip: IpAddr) {
        let mut peers = self.peers.lock().expect("rate limiter");
        if let Some(p) = peers.get_mut(&ip) {
            if p.locked_until.is_none() {
                p.failures = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slows_then_locks_then_forgets() {
        let cfg = LimitsConfig {
            auth_failures_free: 2,
            auth_failures_lockout: 4,
            lockout: Duration::from_millis(50),
            slowdown_step: Duration::from_millis(10),
        };
        let r = RateLimiter::new(cfg);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(r.failure(ip), Duration::ZERO);
        assert_eq!(r.failure(ip), Duration::ZERO);
        assert_eq!(r.failure(ip), Duration::from_millis(10));
        assert!(r.locked(ip).is_none());
        r.failure(ip);
        assert!(r.locked(ip).is_some());
        r.success(ip);
        assert!(r.locked(ip).is_some(), "a lockout is not lifted by a good token");
        std::thread::sleep(Duration::from_millis(60));
        assert!(r.locked(ip).is_none());
    }
}
