//! The embedded backend: each space is a sled tree of one sled database
//! (`data/db` for the data store, `keys/datakeys` for the key store). The
//! only module that names sled.
//!
//! sled runs with its periodic flush off. The store puts the write-ahead
//! log (`wal`) in front of it: a write is durable when the log's segment is
//! synced, and sled's own flush runs only at the log's checkpoints. Each
//! batch also records the log position of its unit of work, in the first
//! tree it changes, so that a replay skips what sled already holds.

use super::{Backend, Commit, Entries, Space, Swap, Update};
use crate::error::{Result, VaultError};
use ::sled::Transactional;
use std::path::Path;

/// Where a tree keeps the log position of the last unit of work marked in
/// it, written in the same batch as that unit. Hidden from scans and counts.
/// Stored keys are ids, hashes and names; none begins with two 0xff bytes
/// followed by this text.
const POSITION_KEY: &[u8] = b"\xff\xffpdvault:log-position";

pub(super) struct Engine {
    db: ::sled::Db,
    /// Trees by `Space` discriminant; `None` for the other store's spaces.
    trees: Vec<Option<::sled::Tree>>,
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
        let db = ::sled::Config::new()
            .path(path)
            .cache_capacity(cache_mib.saturating_mul(1024 * 1024))
            .mode(::sled::Mode::HighThroughput)
            .flush_every_ms(None)
            .open()
            .map_err(|e| match e {
                ::sled::Error::Io(io) if io.to_string().contains("lock") => {
                    VaultError::Internal(format!("{} is in use by another pdvault process", path.display()))
                }
                other => err(other),
            })?;
        let mut trees = vec![None; Space::DATA.len() + Space::KEYS.len()];
        for s in spaces {
            trees[*s as usize] = Some(db.open_tree(s.name()).map_err(err)?);
        }
        Ok(Engine { db, trees })
    }

    /// Applies `c` atomically; with `position`, the first tree it changes
    /// (in `Space` order) also takes that position, in the same batch.
    fn apply_marked(&self, c: &Commit, position: Option<u64>) -> Result<()> {
        let mut batches: std::collections::BTreeMap<Space, ::sled::Batch> = Default::default();
        for (s, k, v) in c.ops() {
            let b = batches.entry(s).or_default();
            match v {
                Some(v) => b.insert(k, v),
                None => b.remove(k),
            }
        }
        if let (Some(p), Some(b)) = (position, batches.values_mut().next()) {
            b.insert(POSITION_KEY, &p.to_be_bytes());
        }
        let expect = c.expectations();
        if expect.is_empty() && batches.len() == 1 {
            let (s, batch) = batches.into_iter().next().expect("one batch");
            return self.tree(s)?.apply_batch(batch).map_err(err);
        }
        let mut spaces: Vec<Space> = batches.keys().copied().chain(expect.iter().map(|e| e.0)).collect();
        spaces.sort();
        spaces.dedup();
        let trees: Vec<&::sled::Tree> = spaces.iter().map(|s| self.tree(*s)).collect::<Result<_>>()?;
        let at = |s: Space| spaces.iter().position(|x| *x == s).expect("listed");
        trees
            .as_slice()
            .transaction(|txs| {
                for (s, k, v) in &expect {
                    if txs[at(*s)].get(k)?.as_deref() != *v {
                        return ::sled::transaction::abort(());
                    }
                }
                for (s, b) in &batches {
                    txs[at(*s)].apply_batch(b)?;
                }
                Ok(())
            })
            .map_err(|e: ::sled::transaction::TransactionError<()>| match e {
                ::sled::transaction::TransactionError::Storage(e) => err(e),
                ::sled::transaction::TransactionError::Abort(()) => VaultError::VersionConflict { current: 0 },
            })
    }

    fn tree(&self, s: Space) -> Result<&::sled::Tree> {
        self.trees[s as usize]
            .as_ref()
            .ok_or_else(|| VaultError::internal(format!("no space {} in this store", s.name())))
    }
}

impl Backend for Engine {
    fn get(&self, s: Space, k: &[u8]) -> Result<Option<Vec<u8>>> {
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
        Box::new(
            tree.range(start..)
                .take_while(move |kv| kv.as_ref().map_or(true, |(k, _)| k.starts_with(&prefix)))
                .filter(|kv| kv.as_ref().map_or(true, |(k, _)| k != POSITION_KEY))
                .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(err)),
        )
    }

    fn count(&self, s: Space) -> Result<u64> {
        let t = self.tree(s)?;
        Ok(t.len() as u64 - u64::from(t.contains_key(POSITION_KEY).map_err(err)?))
    }

    fn apply(&self, c: &Commit) -> Result<()> {
        self.apply_marked(c, None)
    }

    /// Key by key, not as a batch: a sled batch takes sled's process-wide
    /// write lock, which every `get` waits for (its read side), so one
    /// batch of the derived index stalled every read for as long.
    fn apply_derived(&self, c: &Commit) -> Result<()> {
        for (s, k, v) in c.ops() {
            let t = self.tree(s)?;
            match v {
                Some(v) => t.insert(k, v).map(drop),
                None => t.remove(k).map(drop),
            }
            .map_err(err)?;
        }
        Ok(())
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
    fn apply_at(&self, c: &Commit, position: u64) -> Result<()> {
        self.apply_marked(c, Some(position))
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
