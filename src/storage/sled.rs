//! The embedded backend: each space is a sled tree of one sled database
//! (`data/db` for the data store, `keys/datakeys` for the key store). The
//! only module that names sled.
//!
//! sled runs with its periodic flush off. The store puts the write-ahead
//! log (`wal`) in front of it: a write is durable when the log's segment is
//! synced, and sled's own flush runs only at the log's checkpoints.
//!
//! A unit of work is applied key by key, never as a sled batch or
//! transaction: each of those first seals sled's current IO buffer and has
//! a pool thread write it out with a `sync_file_range` that waits for the
//! disk, which made every create cost disk writes of sled's own (README,
//! "Benchmarks"). What a batch gave is kept another way:
//! - whole to readers: the unit is applied under this engine's write lock,
//!   which every read takes the read side of (a piecewise unit, new
//!   subjects of a batch, lets them in between parts of 64 changes);
//! - whole after a crash: the log tells the engine where it stands through
//!   an intent, kept in a tree of its own (`log-intent`), and sled recovers
//!   a prefix of what it was given (`wal` says how the open uses that).

use super::{Backend, Commit, Entries, Space, Swap, Update};
use crate::error::{Result, VaultError};
use std::path::Path;

/// Where a tree kept the log position of the last unit of work marked in
/// it, written in the same batch as that unit, by the versions before the
/// intent (2026-12-07): read at open, so that a store they left is
/// replayed right, and hidden from scans and counts. Stored keys are ids,
/// hashes and names; none begins with two 0xff bytes followed by this text.
const POSITION_KEY: &[u8] = b"\xff\xffpdvault:log-position";

/// The tree, and its one key, holding the log's intent (`wal`).
const INTENT_TREE: &[u8] = b"log-intent";
const INTENT_KEY: &[u8] = b"last";

/// How many changes of a piecewise unit go in between two turns of the
/// readers (about a millisecond of sled's inserts).
const PIECE: usize = 64;

type Op<'a> = (Space, &'a [u8], Option<&'a [u8]>);

/// A unit's changes in key order, tree by tree (stable: two changes of one
/// key keep their order).
fn sorted(c: &Commit) -> Vec<Op<'_>> {
    let mut ops: Vec<_> = c.ops().collect();
    ops.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    ops
}

pub(super) struct Engine {
    db: ::sled::Db,
    /// Trees by `Space` discriminant; `None` for the other store's spaces.
    trees: Vec<Option<::sled::Tree>>,
    intent: ::sled::Tree,
    /// Taken to write by a unit of work being applied, to read by every
    /// read: a reader sees a unit whole or not at all (a piecewise one part
    /// by part).
    applying: parking_lot::RwLock<()>,
    /// Test hook: the next change applied is followed by two waits at this
    /// barrier (so a test can read meanwhile); taken by that change.
    #[cfg(test)]
    mid_unit: std::sync::Mutex<Option<std::sync::Arc<std::sync::Barrier>>>,
    /// Test hook: a piecewise unit, between its first two parts, says so on
    /// the first channel and waits on the second with the lock let go.
    #[cfg(test)]
    #[allow(clippy::type_complexity)]
    between_parts: std::sync::Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>>,
}

fn err(e: ::sled::Error) -> VaultError {
    match e {
        ::sled::Error::Io(io) => io.into(),
        e => VaultError::Internal(format!("storage: {e}")),
    }
}

impl Engine {
    /// Opens (creating if needed) a sled database with a tree per space and
    /// its page cache bounded to `cache_mib` (`storage.cache_mib`), mapping
    /// its lock error to a clear message.
    pub(super) fn open(path: &Path, spaces: &[Space], cache_mib: u64) -> Result<Engine> {
        let config = ::sled::Config::new()
            .path(path)
            .cache_capacity(cache_mib.saturating_mul(1024 * 1024))
            .mode(::sled::Mode::HighThroughput)
            .flush_every_ms(None);
        // A store closed by this process a moment ago may still be locked
        // until sled's last IO thread lets go of it: wait a little.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let db = loop {
            match config.open() {
                Err(::sled::Error::Io(io)) if io.to_string().contains("lock") => {
                    if std::time::Instant::now() >= deadline {
                        return Err(VaultError::InUse(format!(
                            "{} is in use by another pdvault process (a server, or a command on the same directory); stop it first",
                            path.display()
                        )));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => break other.map_err(err)?,
            }
        };
        let mut trees = vec![None; Space::DATA.len() + Space::KEYS.len()];
        for s in spaces {
            trees[*s as usize] = Some(db.open_tree(s.name()).map_err(err)?);
        }
        let intent = db.open_tree(INTENT_TREE).map_err(err)?;
        Ok(Engine {
            db,
            trees,
            intent,
            applying: parking_lot::RwLock::new(()),
            #[cfg(test)]
            mid_unit: Default::default(),
            #[cfg(test)]
            between_parts: Default::default(),
        })
    }

    fn reading(&self) -> parking_lot::RwLockReadGuard<'_, ()> {
        self.applying.read()
    }

    fn writing(&self) -> parking_lot::RwLockWriteGuard<'_, ()> {
        self.applying.write()
    }

    /// Gives each change of `c` to its tree, one after another, in key
    /// order tree by tree: each walks down next to the one before, through
    /// nodes still in the CPU's caches (README, Benchmarks, eighth pass).
    /// The sort is stable, so two changes of one key keep their order. A
    /// unit seen whole may go in any order; a piecewise one relies on this
    /// one (`apply_unit`).
    fn each(&self, c: &Commit) -> Result<()> {
        self.apply_ops(&sorted(c))
    }

    fn apply_ops(&self, ops: &[Op<'_>]) -> Result<()> {
        for &(s, k, v) in ops {
            let t = self.tree(s)?;
            match v {
                Some(v) => t.insert(k, v).map(drop),
                None => t.remove(k).map(drop),
            }
            .map_err(err)?;
            #[cfg(test)]
            if let Some(hold) = self.mid_unit.lock().unwrap().take() {
                hold.wait();
                hold.wait();
            }
        }
        Ok(())
    }

    /// Applies a unit whole to readers, or, where it is piecewise
    /// (`Commit::piecewise`), [`PIECE`] changes at a time with the readers
    /// let in between: in key order tree by tree, so the `subjects` tree
    /// is done before the blind index points into it.
    fn apply_unit(&self, c: &Commit) -> Result<()> {
        if !c.piecewise() {
            let _w = self.writing();
            return self.each(c);
        }
        let mut w = self.writing();
        for (i, piece) in sorted(c).chunks(PIECE).enumerate() {
            if i > 0 {
                // Hands the lock to the readers waiting, if any, then takes it back.
                parking_lot::RwLockWriteGuard::bump(&mut w);
                #[cfg(test)]
                if let Some((reached, go)) = self.between_parts.lock().unwrap().take() {
                    parking_lot::RwLockWriteGuard::unlocked(&mut w, || {
                        reached.send(()).unwrap();
                        go.recv().unwrap();
                    });
                }
            }
            self.apply_ops(piece)?;
        }
        Ok(())
    }

    fn tree(&self, s: Space) -> Result<&::sled::Tree> {
        self.trees[s as usize]
            .as_ref()
            .ok_or_else(|| VaultError::internal(format!("no space {} in this store", s.name())))
    }
}

impl Backend for Engine {
    fn get(&self, s: Space, k: &[u8]) -> Result<Option<Vec<u8>>> {
        let _r = self.reading();
        Ok(self.tree(s)?.get(k).map_err(err)?.map(|v| v.to_vec()))
    }

    fn scan<'a>(&'a self, s: Space, prefix: &[u8], from: &[u8]) -> Entries<'a> {
        let tree = match self.tree(s) {
            Ok(t) => t,
            Err(e) => return Box::new(std::iter::once(Err(e))),
        };
        let prefix = prefix.to_vec();
        let start = if from > prefix.as_slice() {
            from.to_vec()
        } else {
            prefix.clone()
        };
        let mut range = tree.range(start..);
        // Each step under the read lock, as a `get` is.
        let steps = std::iter::from_fn(move || {
            let _r = self.reading();
            range.next()
        });
        Box::new(
            steps
                .take_while(move |kv| kv.as_ref().map_or(true, |(k, _)| k.starts_with(&prefix)))
                .filter(|kv| kv.as_ref().map_or(true, |(k, _)| k != POSITION_KEY))
                .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(err)),
        )
    }

    fn count(&self, s: Space) -> Result<u64> {
        let _r = self.reading();
        let t = self.tree(s)?;
        Ok(t.len() as u64 - u64::from(t.contains_key(POSITION_KEY).map_err(err)?))
    }

    /// Key by key under the write lock: whole to readers. What makes it
    /// whole after a crash is the log's (`wal`). The log checks the
    /// preconditions under its own lock and gives its units through
    /// `apply_checked`; called directly, this checks them itself, so that
    /// the engine keeps the `Backend` promise on its own.
    fn apply(&self, c: &Commit) -> Result<()> {
        let _w = self.writing();
        for (s, k, v) in c.expectations() {
            if self.tree(s)?.get(k).map_err(err)?.as_deref() != v {
                return Err(VaultError::VersionConflict { current: 0 });
            }
        }
        self.each(c)
    }

    /// Key by key, not as a batch: a sled batch takes sled's process-wide
    /// write lock, which every `get` waits for (its read side), so one
    /// batch of the derived index stalled every read for as long.
    fn apply_derived(&self, c: &Commit) -> Result<()> {
        self.each(c)
    }

    fn update(&self, s: Space, k: &[u8], f: Update<'_>) -> Result<Option<Vec<u8>>> {
        Ok(self.tree(s)?.fetch_and_update(k, f).map_err(err)?.map(|v| v.to_vec()))
    }

    fn swap(&self, s: Space, items: &[Swap]) -> Result<u64> {
        let tree = self.tree(s)?;
        let mut n = 0;
        for (k, old, new) in items {
            if tree
                .compare_and_swap(k, Some(old.as_slice()), Some(new.as_slice()))
                .map_err(err)?
                .is_ok()
            {
                n += 1;
            }
        }
        Ok(n)
    }

    fn flush(&self) -> std::io::Result<()> {
        match self.db.flush() {
            Ok(_) => Ok(()),
            Err(::sled::Error::Io(e)) => Err(e),
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}

impl super::wal::Positioned for Engine {
    /// A quarter of sled's inline item limit (a segment's quarter, 128 KiB
    /// by default): an intent never becomes a blob file of its own.
    const INTENT_MAX: usize = 16 * 1024;

    fn apply_checked(&self, c: &Commit) -> Result<()> {
        self.apply_unit(c)
    }

    fn set_intent(&self, record: &[u8]) -> Result<()> {
        self.intent.insert(INTENT_KEY, record).map(drop).map_err(err)
    }

    fn intent(&self) -> Result<Option<Vec<u8>>> {
        let _r = self.reading();
        Ok(self.intent.get(INTENT_KEY).map_err(err)?.map(|v| v.to_vec()))
    }

    fn position(&self, s: Space) -> Result<u64> {
        match self.tree(s)?.get(POSITION_KEY).map_err(err)? {
            None => Ok(0),
            Some(v) => v
                .as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| VaultError::internal(format!("corrupt log position in space {}", s.name()))),
        }
    }

    fn spaces(&self) -> Vec<Space> {
        (0..self.trees.len())
            .filter(|i| self.trees[*i].is_some())
            .filter_map(|i| Space::from_u8(i as u8))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{mpsc, Arc, Barrier};
    use std::time::Duration;

    /// A unit applied key by key is whole to readers: a read of a key the
    /// unit has already changed waits until the unit is complete.
    #[test]
    fn a_read_waits_for_the_unit_being_applied() {
        let d = tempfile::tempdir().unwrap();
        let e = Arc::new(Engine::open(&d.path().join("db"), Space::DATA, 16).unwrap());
        let hold = Arc::new(Barrier::new(2));
        *e.mid_unit.lock().unwrap() = Some(hold.clone());
        let writer = {
            let e = e.clone();
            std::thread::spawn(move || {
                let mut c = Commit::default();
                c.insert(Space::Subjects, "s1", "v1");
                c.insert(Space::Index, "ix-s1", "v1");
                e.apply(&c).unwrap();
            })
        };
        hold.wait(); // the unit's first change is made, its second not
        let (tx, rx) = mpsc::channel();
        let reader = {
            let e = e.clone();
            std::thread::spawn(move || {
                let s1 = e.get(Space::Subjects, b"s1").unwrap();
                let ix = e.get(Space::Index, b"ix-s1").unwrap();
                tx.send((s1, ix)).unwrap();
            })
        };
        assert!(
            rx.recv_timeout(Duration::from_secs(1)).is_err(),
            "a read returned while a unit was half applied"
        );
        hold.wait();
        let (s1, ix) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!((s1.as_deref(), ix.as_deref()), (Some(&b"v1"[..]), Some(&b"v1"[..])));
        writer.join().unwrap();
        reader.join().unwrap();
        assert_eq!(e.count(Space::Subjects).unwrap(), 1);
    }

    /// A piecewise unit (new subjects of a batch) lets readers in between
    /// its parts: a read is answered while the unit is half applied, and
    /// sees the records of the part already in, in key order space by space.
    #[test]
    fn a_read_is_let_in_between_the_parts_of_a_piecewise_unit() {
        use super::super::wal::Positioned;
        let d = tempfile::tempdir().unwrap();
        let e = Arc::new(Engine::open(&d.path().join("db"), Space::DATA, 16).unwrap());
        let (reached_tx, reached) = mpsc::channel();
        let (go, go_rx) = mpsc::channel();
        *e.between_parts.lock().unwrap() = Some((reached_tx, go_rx));
        let writer = {
            let e = e.clone();
            std::thread::spawn(move || {
                let mut c = Commit::default();
                for i in 0..=PIECE {
                    c.insert(Space::Index, format!("ix-s{i:03}"), "s");
                    c.insert(Space::Subjects, format!("s{i:03}"), "v1");
                }
                c.set_piecewise();
                e.apply_checked(&c).unwrap();
            })
        };
        reached
            .recv_timeout(Duration::from_secs(10))
            .expect("the piecewise unit was applied in one part");
        let (tx, rx) = mpsc::channel();
        let reader = {
            let e = e.clone();
            std::thread::spawn(move || {
                let first = e.get(Space::Subjects, b"s000").unwrap();
                let index = e.get(Space::Index, b"ix-s000").unwrap();
                tx.send((first, index)).unwrap();
            })
        };
        let (first, index) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a read waited for the whole of a piecewise unit");
        // The first part is the `subjects` tree's: a record lands before
        // the index entry that points to it.
        assert_eq!((first.as_deref(), index), (Some(&b"v1"[..]), None));
        go.send(()).unwrap();
        writer.join().unwrap();
        reader.join().unwrap();
        assert_eq!(e.count(Space::Subjects).unwrap(), PIECE as u64 + 1);
        assert_eq!(e.count(Space::Index).unwrap(), PIECE as u64 + 1);
    }

    /// A unit with a precondition is never piecewise.
    #[test]
    #[should_panic(expected = "applied whole")]
    fn a_unit_with_a_precondition_cannot_be_piecewise() {
        let mut c = Commit::default();
        c.expect(Space::Subjects, "s1", None);
        c.set_piecewise();
    }
}
