//! Deferred writes to a derived space: one that the vault rebuilds at start
//! from what is durable elsewhere (the access-log index, from the audit log),
//! so that a crash may lose them and nothing is wrong afterwards.
//!
//! They wait in memory and reach the engine in batches of [`BATCH`], applied
//! by a thread of their own, off the path of the request and of the audit
//! committer. Every read of a derived space first applies what waits
//! ([`Deferred::settle`]), so a reader sees every write deferred before it.
//! The engine takes them through `Backend::apply_derived`, which skips the
//! write-ahead log: a lost batch is rebuilt, never trusted. Batching here is
//! what keeps the index off the read's path: one engine write per audit
//! group halved a read's throughput on sled (README, Benchmarks, sixth pass).

use super::{Backend, Commit};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// How many writes make a batch.
pub(crate) const BATCH: usize = 4096;
/// How many may wait before the writer applies them itself.
const MAX_PENDING: usize = 16 * BATCH;

pub(super) struct Deferred {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    engine: Arc<dyn Backend>,
    /// The writes not yet given to the engine; `true` once the store closes.
    pending: Mutex<(Commit, bool)>,
    wake: Condvar,
    /// Held while writes taken from `pending` go to the engine, so that a
    /// reader that settles waits for a batch already on its way.
    applying: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Gives everything pending to the engine. A failure is logged, not
    /// returned: the writes are derived, and the next start rebuilds them.
    fn apply_pending(&self) {
        let _applying = lock(&self.applying);
        let c = std::mem::take(&mut lock(&self.pending).0);
        if c.is_empty() {
            return;
        }
        if let Err(e) = self.engine.apply_derived(&c) {
            tracing::warn!(error = %e, "derived index not updated; rebuilt at the next start");
        }
    }
}

impl Deferred {
    pub(super) fn new(name: &str, engine: Arc<dyn Backend>) -> Deferred {
        let shared = Arc::new(Shared {
            engine,
            pending: Mutex::new((Commit::default(), false)),
            wake: Condvar::new(),
            applying: Mutex::new(()),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("index-{name}"))
            .spawn(move || loop {
                let closing = {
                    let mut p = lock(&s.pending);
                    while p.0.ops.len() < BATCH && !p.1 {
                        p = s.wake.wait(p).unwrap_or_else(|e| e.into_inner());
                    }
                    p.1
                };
                s.apply_pending();
                if closing {
                    return;
                }
            })
            .expect("spawn index thread");
        Deferred {
            shared,
            thread: Some(thread),
        }
    }

    /// Adds `c`'s writes; wakes the thread when a batch is full. Past
    /// [`MAX_PENDING`] (the thread starved by a busy machine) the caller
    /// applies them itself: it slows down rather than memory grow.
    pub(super) fn add(&self, c: Commit) {
        let n = {
            let mut p = lock(&self.shared.pending);
            p.0.ops.extend(c.ops);
            p.0.ops.len()
        };
        if n >= MAX_PENDING {
            self.shared.apply_pending();
        } else if n >= BATCH {
            self.shared.wake.notify_one();
        }
    }

    /// Returns once every write added before the call is in the engine.
    pub(super) fn settle(&self) {
        self.shared.apply_pending();
    }
}

/// The last handle of a store applies what waits and ends the thread.
impl Drop for Deferred {
    fn drop(&mut self) {
        lock(&self.shared.pending).1 = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::storage::{Commit, Space, Store};

    fn one(s: Space, k: &str, v: Option<&str>) -> Commit {
        let mut c = Commit::default();
        match v {
            Some(v) => c.insert(s, k, v),
            None => c.remove(s, k),
        }
        c
    }

    #[test]
    fn deferred_writes_are_read_at_once_and_kept_in_order() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        s.defer(one(Space::Access, "a\x001", Some("x")));
        s.defer(one(Space::Access, "a\x002", Some("y")));
        // A read of the space applies what waits first.
        assert_eq!(s.get(Space::Access, "a\x001").unwrap().as_deref(), Some(&b"x"[..]));
        s.defer(one(Space::Access, "a\x003", Some("z")));
        assert_eq!(s.keys(Space::Access, "a\x00").unwrap().len(), 3);
        // A removal applied after a deferred write is not undone by it.
        s.defer(one(Space::Access, "a\x004", Some("w")));
        s.apply(&one(Space::Access, "a\x004", None)).unwrap();
        assert_eq!(s.get(Space::Access, "a\x004").unwrap(), None);
        // Past a batch, the thread applies them with no reader.
        let mut c = Commit::default();
        for i in 0..super::BATCH {
            c.insert(Space::Access, format!("b\0{i:05}"), "v");
        }
        s.defer(c);
        let t = std::time::Instant::now();
        while !s.deferred.shared.pending.lock().unwrap().0.is_empty() {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(20),
                "the batch was not applied"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let _applied = s.deferred.shared.applying.lock().unwrap();
        assert_eq!(s.engine.count(Space::Access).unwrap(), 3 + super::BATCH as u64);
    }

    #[test]
    fn a_writer_past_the_bound_applies_what_waits_itself() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        // One add past the bound: applied by the caller before it returns.
        let mut c = Commit::default();
        for i in 0..super::MAX_PENDING {
            c.insert(Space::Access, format!("c\0{i:06}"), "v");
        }
        s.defer(c);
        assert!(s.deferred.shared.pending.lock().unwrap().0.is_empty());
        assert_eq!(s.engine.count(Space::Access).unwrap(), super::MAX_PENDING as u64);
    }

    #[test]
    fn a_closing_store_applies_what_waits() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = Store::open(d.path()).unwrap();
            s.defer(one(Space::Access, "a\x001", Some("x")));
        }
        let s = Store::open(d.path()).unwrap();
        assert_eq!(s.get(Space::Access, "a\x001").unwrap().as_deref(), Some(&b"x"[..]));
    }
}
