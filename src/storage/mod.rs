//! The storage seam: what the core needs from a store, and nothing of how a
//! store keeps it.
//!
//! A store is a set of ordered key spaces ([`Space`]) behind the
//! [`Backend`] trait: point reads, ordered prefix scans, atomic units of work
//! ([`Commit`]), an atomic read-modify-write for counters, and a durability
//! point ([`Backend::flush`], coalesced by the group-commit [`Flusher`]).
//! Two stores are opened: the data store (subjects, blind index, tokens,
//! consents, erasure markers, activity, access-log index, outbox) and the key
//! store (wrapped data keys and grant use counters), which no backup of the
//! data ever carries.
//!
//! The vault speaks to [`Store`] and [`KeyStore`] only; which engine is under
//! them is decided in [`open`]. `sled` (the embedded default) is the one
//! module that names its engine. The backup stream format is in `backup`.
//!
//! Nothing here sees plaintext: values are ciphertexts, wrapped keys, HMACs
//! and metadata.

use crate::error::{Result, VaultError};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

mod backup;
mod deferred;
/// How many derived writes make one engine write (the access-log index's batches).
pub(crate) use deferred::BATCH as DERIVED_BATCH;
mod postgres;
mod sled;
mod wal;
/// For crash tests elsewhere in the crate: a store's files as a crash leaves them.
#[cfg(test)]
pub(crate) use wal::tests::crash_copy;

/// A key space of a store. Names and numbers are stable: the names are the
/// sled tree names and the tags of the backup stream, the numbers the
/// `space` column of the PostgreSQL table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Space {
    Subjects = 0,
    Index = 1,
    Tokens = 2,
    TokenHashes = 3,
    Consents = 4,
    Erased = 5,
    Activity = 6,
    Access = 7,
    Meta = 8,
    /// Self-service link codes (minutes-long, single use): not in backups.
    SelfCodes = 9,
    /// Events waiting to be delivered: not in backups, so a restore never
    /// sends old news again.
    Outbox = 10,
    /// Per-subscriber delivery state of the outbox's events.
    Deliveries = 11,
    /// Key store: wrapped data keys, one per subject version.
    Wrapped = 12,
    /// Key store: uses taken of limited grants.
    GrantUses = 13,
    /// Key store: the nodes serving a shared store, and the key-epoch floor.
    Nodes = 14,
    /// Key store: the shred ledger, where it is shared (postgres).
    ShredLedger = 15,
    /// Key store: the revocation ledger, where it is shared (postgres).
    RevocationLedger = 16,
    /// The audit chains of the nodes sharing a store (postgres): entries,
    /// checkpoints and restore bases. Not in backups (a restored chain
    /// continues from its head, as a restored log file does).
    Audit = 17,
}

impl Space {
    /// The data store's spaces, the backed-up ones first.
    pub const DATA: &'static [Space] = &[
        Space::Subjects,
        Space::Index,
        Space::Tokens,
        Space::TokenHashes,
        Space::Consents,
        Space::Erased,
        Space::Activity,
        Space::Access,
        Space::Meta,
        Space::SelfCodes,
        Space::Outbox,
        Space::Deliveries,
        Space::Audit,
    ];
    /// The spaces a backup holds, in stream order: all the data store's
    /// but the short-lived codes, the outbox and the audit chains.
    pub const BACKED_UP: &'static [Space] = Space::DATA.split_at(9).0;
    /// The key store's spaces.
    pub const KEYS: &'static [Space] = &[
        Space::Wrapped,
        Space::GrantUses,
        Space::Nodes,
        Space::ShredLedger,
        Space::RevocationLedger,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Space::Subjects => "subjects",
            Space::Index => "index",
            Space::Tokens => "tokens",
            Space::TokenHashes => "token_hashes",
            Space::Consents => "consents",
            Space::Erased => "erased",
            Space::Activity => "activity",
            Space::Access => "access",
            Space::Meta => "meta",
            Space::SelfCodes => "self_codes",
            Space::Outbox => "outbox",
            Space::Deliveries => "deliveries",
            Space::Wrapped => "wrapped",
            Space::GrantUses => "grant_uses",
            Space::Nodes => "nodes",
            Space::ShredLedger => "shred_ledger",
            Space::RevocationLedger => "revocation_ledger",
            Space::Audit => "audit",
        }
    }

    pub fn from_name(n: &str) -> Option<Space> {
        Space::DATA.iter().chain(Space::KEYS).copied().find(|s| s.name() == n)
    }

    /// Whether the space is derived: rebuilt at start from what is durable
    /// elsewhere, so that its writes may be deferred (`Store::defer`).
    pub fn derived(self) -> bool {
        matches!(self, Space::Access)
    }

    pub fn from_u8(b: u8) -> Option<Space> {
        Space::DATA.iter().chain(Space::KEYS).copied().find(|s| *s as u8 == b)
    }
}

/// A precondition of a commit: the key holds this value (`None`: absent).
pub type Expected<'a> = (Space, &'a [u8], Option<&'a [u8]>);

/// A key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);
/// Entries in key order.
pub type Entries<'a> = Box<dyn Iterator<Item = Result<Entry>> + Send + 'a>;
/// A read-modify-write step: the current value in, the new one out (`None`
/// removes). May run more than once; the last run is the one applied.
pub type Update<'a> = &'a mut (dyn FnMut(Option<&[u8]>) -> Option<Vec<u8>> + Send);

/// What a storage engine provides. Every method is atomic on its own;
/// `apply` is atomic across spaces, and refuses a commit whose
/// preconditions do not hold with `VersionConflict`. Writes become durable when `flush`
/// returns (an engine that commits durably in `apply` flushes nothing).
pub trait Backend: Send + Sync + 'static {
    fn get(&self, s: Space, k: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Entries whose key starts with `prefix` and is `>= from`, in key order.
    fn scan<'a>(&'a self, s: Space, prefix: &[u8], from: &[u8]) -> Entries<'a>;
    fn count(&self, s: Space) -> Result<u64>;
    fn apply(&self, c: &Commit) -> Result<()>;
    /// Applies writes to derived spaces only ([`Space::derived`]), which
    /// need no durability: an engine with a log in front may bypass it.
    fn apply_derived(&self, c: &Commit) -> Result<()> {
        self.apply(c)
    }
    /// Atomically replaces the value of `k` by `f(current)`; returns the
    /// previous value.
    fn update(&self, s: Space, k: &[u8], f: Update<'_>) -> Result<Option<Vec<u8>>>;
    /// Compare-and-swap of each `(key, expected, new)` on its own: replaced
    /// only where the current value is `expected`. Returns how many were.
    fn swap(&self, s: Space, items: &[Swap]) -> Result<u64>;
    fn flush(&self) -> std::io::Result<()>;
    /// Makes the engine's own files hold every write so far (where a log
    /// stands in front of it, moves the log into it). Safe at any time.
    fn checkpoint(&self) -> std::io::Result<()> {
        self.flush()
    }
    /// Every entry of `spaces`, space by space in key order, as of one
    /// moment: what a backup copies. This default scans, which is one
    /// moment where no other process writes the store and the vault holds
    /// its own writers off (the backup does).
    fn scan_snapshot(&self, spaces: &[Space], each: &mut EachEntry<'_>) -> Result<()> {
        for s in spaces {
            for kv in self.scan(*s, &[], &[]) {
                let (k, v) = kv?;
                each(*s, &k, &v)?;
            }
        }
        Ok(())
    }
    /// Whether other processes (other nodes) may write this store while
    /// this one runs: then nothing read may be cached, and what each node
    /// writes on its own account must be keyed apart.
    fn shared(&self) -> bool {
        false
    }
}

/// Called with each entry a snapshot scan finds: space, key, value.
pub type EachEntry<'a> = dyn FnMut(Space, &[u8], &[u8]) -> Result<()> + 'a;

/// Key, expected value, new value.
pub type Swap = (Vec<u8>, Vec<u8>, Vec<u8>);

/// Coalesces durability requests: every caller waiting when a flush starts is
/// answered by that one flush (group commit), so N concurrent writers cost
/// one fsync, not N.
pub struct Flusher {
    tx: Option<mpsc::Sender<Reply>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Dropping the last handle ends the thread and waits for it, so that the
/// store it flushes is closed (its files unlocked) when the drop returns.
impl Drop for Flusher {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type Reply = Box<dyn FnOnce(std::result::Result<(), (std::io::ErrorKind, String)>) + Send>;

fn flush_error((kind, msg): (std::io::ErrorKind, String)) -> VaultError {
    std::io::Error::new(kind, format!("flush: {msg}")).into()
}

impl Flusher {
    pub fn spawn<F>(name: &str, flush: F) -> Flusher
    where
        F: Fn() -> std::io::Result<()> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Reply>();
        let thread = std::thread::Builder::new()
            .name(format!("flush-{name}"))
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut waiters = vec![first];
                    waiters.extend(rx.try_iter());
                    let r = flush().map_err(|e| (e.kind(), e.to_string()));
                    for w in waiters {
                        w(r.clone());
                    }
                }
            })
            .expect("spawn flusher thread");
        Flusher {
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    fn send(&self, reply: Reply) -> Result<()> {
        self.tx
            .as_ref()
            .and_then(|tx| tx.send(reply).ok())
            .ok_or_else(|| VaultError::internal("flusher stopped"))
    }

    /// Returns once everything written before the call is on disk.
    pub async fn sync(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let reply: Reply = Box::new(move |r| {
            let _ = tx.send(r);
        });
        self.send(reply)?;
        rx.await
            .map_err(|_| VaultError::internal("flusher stopped"))?
            .map_err(flush_error)
    }

    /// The same, for synchronous callers (CLI, startup).
    pub fn sync_blocking(&self) -> Result<()> {
        let (tx, rx) = mpsc::channel();
        let reply: Reply = Box::new(move |r| {
            let _ = tx.send(r);
        });
        self.send(reply)?;
        rx.recv()
            .map_err(|_| VaultError::internal("flusher stopped"))?
            .map_err(flush_error)
    }
}

/// A unit of work: changes to any spaces of one store, applied atomically
/// by `Store::apply` (a change and the event that reports it land together).
/// Durable once `Store::commit` (or the flusher after `apply`) returned.
#[derive(Default)]
pub struct Commit {
    ops: Vec<(Space, Vec<u8>, Option<Vec<u8>>)>,
    /// Preconditions: each key holds this value (`None`: is absent) when the
    /// commit applies, else nothing of it applies (`VersionConflict`).
    expect: Vec<(Space, Vec<u8>, Option<Vec<u8>>)>,
    /// Set by the vault when an event was staged: the sender is woken once
    /// the commit is durable.
    pub has_events: bool,
    /// Readers may see part of the unit before the rest (`set_piecewise`).
    piecewise: bool,
}

impl Commit {
    pub fn insert(&mut self, s: Space, k: impl AsRef<[u8]>, v: impl AsRef<[u8]>) {
        self.ops.push((s, k.as_ref().to_vec(), Some(v.as_ref().to_vec())));
    }
    pub fn remove(&mut self, s: Space, k: impl AsRef<[u8]>) {
        self.ops.push((s, k.as_ref().to_vec(), None));
    }
    /// Applies only if `k` holds `v` (`None`: is absent) at that moment:
    /// how a write that read a record first stays right when another node
    /// writes the same record meanwhile.
    pub fn expect(&mut self, s: Space, k: impl AsRef<[u8]>, v: Option<&[u8]>) {
        self.expect.push((s, k.as_ref().to_vec(), v.map(<[u8]>::to_vec)));
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    /// Lets readers see the unit's changes before all of them are applied,
    /// where each change stands on its own (new subjects of a batch: in key
    /// order space by space, a record lands before the index entry that
    /// points to it). The unit stays one unit for a crash: all of it or
    /// none. An embedded engine, which holds its readers while it applies a
    /// unit, then lets them in between parts. Refused with preconditions.
    pub fn set_piecewise(&mut self) {
        assert!(self.expect.is_empty(), "a unit with preconditions is applied whole");
        self.piecewise = true;
    }
    /// Whether readers may see part of the unit before the rest.
    pub fn piecewise(&self) -> bool {
        self.piecewise && self.expect.is_empty()
    }
    /// How many changes.
    pub fn len(&self) -> usize {
        self.ops.len()
    }
    /// The preconditions, in key order (so that locks are taken in one order).
    pub fn expectations(&self) -> Vec<Expected<'_>> {
        let mut e: Vec<_> = self
            .expect
            .iter()
            .map(|(s, k, v)| (*s, k.as_slice(), v.as_deref()))
            .collect();
        e.sort();
        e
    }
    /// The changes in order: key, and the new value (`None`: removed). A
    /// later change of the same key wins.
    pub fn ops(&self) -> impl Iterator<Item = (Space, &[u8], Option<&[u8]>)> {
        self.ops.iter().map(|(s, k, v)| (*s, k.as_slice(), v.as_deref()))
    }
}

/// One subject as stored: field ciphertexts under the data key of `version`.
#[derive(Serialize, Deserialize, Clone)]
pub struct SubjectRecord {
    pub version: u64,
    pub created_at: u64,
    pub updated_at: u64,
    /// Field name to `nonce || ciphertext || tag`.
    #[serde(with = "byte_strings::named")]
    pub fields: Vec<(String, Vec<u8>)>,
    /// Blind-index keys (HMACs) of this version, so that an erasure or a
    /// ledger replay can remove them without any key.
    #[serde(with = "byte_strings::list")]
    pub index: Vec<Vec<u8>>,
}

/// Byte strings of the stored records written as serde bytes. postcard
/// writes bytes exactly as it writes a sequence of `u8` (a varint length,
/// then the bytes), so records stored before read the same; what changes is
/// the decoding: one copy of the run instead of one call per byte.
mod byte_strings {
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    pub mod named {
        use super::*;
        pub fn serialize<S: Serializer>(v: &[(String, Vec<u8>)], s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(v.iter().map(|(n, b)| (n, Bytes::new(b))))
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, Vec<u8>)>, D::Error> {
            let v: Vec<(String, ByteBuf)> = Deserialize::deserialize(d)?;
            Ok(v.into_iter().map(|(n, b)| (n, b.into_vec())).collect())
        }
    }

    pub mod list {
        use super::*;
        pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(v.iter().map(|b| Bytes::new(b)))
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
            let v: Vec<ByteBuf> = Deserialize::deserialize(d)?;
            Ok(v.into_iter().map(ByteBuf::into_vec).collect())
        }
    }
}

impl SubjectRecord {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("postcard encoding of an in-memory record")
    }
    pub fn decode(b: &[u8]) -> Result<Self> {
        postcard::from_bytes(b).map_err(|e| VaultError::Internal(format!("corrupt subject record: {e}")))
    }
}

/// A subject's data key, wrapped under the KEK of `epoch`.
#[derive(Serialize, Deserialize, Clone)]
pub struct WrappedKey {
    pub epoch: u32,
    #[serde(with = "serde_bytes")]
    pub sealed: Vec<u8>,
}

/// Opens the data store and the key store of the configured backend.
pub fn open(cfg: &crate::config::Config) -> Result<(Store, KeyStore)> {
    let keys = KeyStore::open_with(cfg)?;
    Ok((Store::open_with(cfg)?, keys))
}

/// `pdvault migrate`: brings the databases' schema to this build's without
/// serving (every start does the same). Says what it found, for the operator.
pub fn migrate(cfg: &crate::config::Config) -> Result<String> {
    match cfg.storage.backend {
        crate::config::Backend::Sled => Ok("storage.backend = \"sled\": no database schema to migrate".into()),
        crate::config::Backend::Postgres => {
            let data = postgres::Engine::open(&cfg.storage, false)?.schema_version()?;
            let keys = postgres::Engine::open(&cfg.storage, true)?.schema_version()?;
            Ok(format!("schema version: data database {data}, keys database {keys}"))
        }
    }
}

/// Start-up checks of `[storage]` that only the backend can make.
pub fn check_config(s: &crate::config::StorageConfig) -> std::result::Result<(), String> {
    if s.cache_mib < 16 {
        return Err("storage.cache_mib must be at least 16".into());
    }
    match s.backend {
        crate::config::Backend::Sled => Ok(()),
        crate::config::Backend::Postgres => postgres::check(s),
    }
}

/// Changes in a unit from which its apply is long work
/// ([`crate::runtime::long_work`]): a batch create's thousand subjects are
/// 5,000 changes and take tens of milliseconds; a create is 5.
const LONG_UNIT: usize = 256;

/// A store: one engine's spaces, with the group commit in front of its
/// durability point. Cloning shares the engine.
#[derive(Clone)]
pub struct Store {
    engine: Arc<dyn Backend>,
    pub flusher: Arc<Flusher>,
    deferred: Arc<deferred::Deferred>,
    /// Per stamp counter, the block of values taken ahead and not yet
    /// handed out: next, end (see [`Store::reserve_stamps`]).
    stamps: Arc<Mutex<HashMap<String, (u64, u64)>>>,
    /// Its long units' turn: one applied at a time (sled's engine applies
    /// them one at a time anyway; on PostgreSQL, a node no longer sends two
    /// at once), without holding a thread each while they wait.
    long_turn: Arc<tokio::sync::Semaphore>,
}

/// How many stamps a store of one node takes from the persistent counter
/// at a time.
const STAMP_BLOCK: u64 = 1024;

impl Store {
    fn over(name: &str, engine: Arc<dyn Backend>) -> Store {
        let e = engine.clone();
        Store {
            flusher: Arc::new(Flusher::spawn(name, move || {
                crate::faults::enospc()?;
                e.flush()
            })),
            deferred: Arc::new(deferred::Deferred::new(name, engine.clone())),
            engine,
            stamps: Default::default(),
            long_turn: Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }

    /// Writes to derived spaces only ([`Space::derived`]), given to the
    /// engine later in batches, not durable: a crash may lose them, and the
    /// start that follows rebuilds them. Every read of such a space sees them.
    pub fn defer(&self, c: Commit) {
        debug_assert!(c.ops().all(|(s, _, _)| s.derived()));
        if !c.is_empty() {
            self.deferred.add(c);
        }
    }

    /// Before a read or write of `s`: the deferred writes reach the engine
    /// first, when `s` is derived.
    fn settle(&self, s: Space) {
        if s.derived() {
            self.deferred.settle();
        }
    }

    /// Whether other nodes may write this store at the same time.
    pub fn is_shared(&self) -> bool {
        self.engine.shared()
    }

    /// The embedded data store in `dir` (the sled backend), with the
    /// default cache.
    pub fn open(dir: &Path) -> Result<Store> {
        Store::open_sled(dir, crate::config::StorageConfig::default().cache_mib)
    }

    /// The embedded data store in `dir`, its page cache bounded to `cache_mib`.
    fn open_sled(dir: &Path, cache_mib: u64) -> Result<Store> {
        crate::fsutil::create_private_dir(dir)?;
        let engine = sled::Engine::open(&dir.join("db"), Space::DATA, cache_mib)?;
        Ok(Store::over(
            "data",
            Arc::new(wal::Logged::open(engine, &dir.join("db.wal"))?),
        ))
    }

    /// The configured data store (`storage.backend`).
    pub fn open_with(cfg: &crate::config::Config) -> Result<Store> {
        match cfg.storage.backend {
            crate::config::Backend::Sled => Store::open_sled(&cfg.data_dir, cfg.storage.cache_mib),
            crate::config::Backend::Postgres => Ok(Store::over(
                "data",
                Arc::new(postgres::Engine::open(&cfg.storage, false)?),
            )),
        }
    }

    /// Whether no space holds anything (a restore's target must be empty).
    pub fn is_empty(&self) -> Result<bool> {
        for s in Space::DATA {
            if self.scan(*s, []).next().transpose()?.is_some() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    pub fn get(&self, s: Space, k: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>> {
        self.settle(s);
        self.engine.get(s, k.as_ref())
    }
    pub fn contains(&self, s: Space, k: impl AsRef<[u8]>) -> Result<bool> {
        Ok(self.get(s, k)?.is_some())
    }
    /// Entries whose key starts with `prefix`, in key order.
    pub fn scan(&self, s: Space, prefix: impl AsRef<[u8]>) -> Entries<'_> {
        let p = prefix.as_ref();
        self.settle(s);
        self.engine.scan(s, p, p)
    }
    /// Every entry of `spaces` as of one moment (`Backend::scan_snapshot`).
    fn scan_snapshot(&self, spaces: &[Space], each: &mut EachEntry<'_>) -> Result<()> {
        spaces.iter().for_each(|s| self.settle(*s));
        self.engine.scan_snapshot(spaces, each)
    }
    /// Entries whose key starts with `prefix` and is `>= from`.
    pub fn scan_from(&self, s: Space, prefix: impl AsRef<[u8]>, from: impl AsRef<[u8]>) -> Entries<'_> {
        self.settle(s);
        self.engine.scan(s, prefix.as_ref(), from.as_ref())
    }
    /// Every key of a space starting with `prefix`.
    pub fn keys(&self, s: Space, prefix: impl AsRef<[u8]>) -> Result<Vec<Vec<u8>>> {
        self.scan(s, prefix).map(|kv| kv.map(|(k, _)| k)).collect()
    }
    pub fn count(&self, s: Space) -> Result<u64> {
        self.settle(s);
        self.engine.count(s)
    }
    /// Applies a unit of work atomically: after a crash all of it is there or
    /// none. Durable once the flusher has run after it.
    pub fn apply(&self, c: &Commit) -> Result<()> {
        if c.is_empty() {
            return Ok(());
        }
        // A removal from a derived space lands after the writes deferred
        // before it, not under them.
        if c.ops().any(|(s, _, _)| s.derived()) {
            self.deferred.settle();
        }
        self.engine.apply(c)
    }
    /// Brings the engine's files up to date (shutdown; `Backend::checkpoint`).
    pub fn checkpoint(&self) -> Result<()> {
        self.deferred.settle();
        Ok(self.engine.checkpoint()?)
    }
    /// Applies a unit of work and returns once it is durable.
    pub async fn commit(&self, c: &Commit) -> Result<()> {
        if c.len() >= LONG_UNIT {
            crate::runtime::long_work(&self.long_turn, || self.apply(c)).await?;
        } else {
            self.apply(c)?;
        }
        self.flusher.sync().await
    }
    /// The same, for synchronous callers (CLI, startup).
    pub fn commit_blocking(&self, c: &Commit) -> Result<()> {
        self.apply(c)?;
        self.flusher.sync_blocking()
    }
    /// One change on its own (atomic, durable at the next flush).
    pub fn insert(&self, s: Space, k: impl AsRef<[u8]>, v: impl AsRef<[u8]>) -> Result<()> {
        let mut c = Commit::default();
        c.insert(s, k, v);
        self.apply(&c)
    }
    pub fn remove(&self, s: Space, k: impl AsRef<[u8]>) -> Result<()> {
        let mut c = Commit::default();
        c.remove(s, k);
        self.apply(&c)
    }
    /// Removes a key and returns its value, atomically: of two concurrent
    /// takers, one gets it.
    pub fn take(&self, s: Space, k: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>> {
        self.update(s, k, &mut |_| None)
    }
    /// Atomic read-modify-write; returns the previous value.
    pub fn update(&self, s: Space, k: impl AsRef<[u8]>, f: Update<'_>) -> Result<Option<Vec<u8>>> {
        self.settle(s);
        self.engine.update(s, k.as_ref(), f)
    }

    /// Compare-and-swap of each item on its own; returns how many replaced.
    pub fn swap(&self, s: Space, items: &[Swap]) -> Result<u64> {
        if items.is_empty() {
            return Ok(0);
        }
        self.settle(s);
        self.engine.swap(s, items)
    }

    /// Next value of a persistent counter in `meta`.
    pub fn next_counter(&self, name: &str) -> Result<u64> {
        self.reserve_counter(name, 1)
    }

    /// Reserves `n` consecutive values of a persistent counter; returns the first.
    pub fn reserve_counter(&self, name: &str, n: u64) -> Result<u64> {
        let old = self.update(Space::Meta, name, &mut |old| {
            Some((old.map(read_u64).unwrap_or(0) + n).to_be_bytes().to_vec())
        })?;
        Ok(old.as_deref().map(read_u64).unwrap_or(0) + 1)
    }

    /// Reserves `n` consecutive values of the counter `name`, for values
    /// that must only grow, not be gapless (the index stamps that order
    /// duplicate emails and phones). On a store of one node they come from
    /// a block taken from the persistent counter ahead, one write a block
    /// instead of one a call (what a restart leaves of a block is skipped);
    /// a shared store takes them from the counter each time, so that its
    /// nodes' values interleave in the order they were taken.
    pub fn reserve_stamps(&self, name: &str, n: u64) -> Result<u64> {
        if self.engine.shared() {
            return self.reserve_counter(name, n);
        }
        let mut blocks = self.stamps.lock().unwrap_or_else(|e| e.into_inner());
        let block = blocks.entry(name.to_owned()).or_insert((0, 0));
        if block.1 - block.0 < n {
            let take = n.max(STAMP_BLOCK);
            let first = self.reserve_counter(name, take)?;
            *block = (first, first + take);
        }
        let first = block.0;
        block.0 += n;
        Ok(first)
    }

    /// Writes a consistent snapshot of every backed-up space. The caller
    /// holds the write gate, so no write runs meanwhile.
    pub fn write_backup(&self, out: &mut dyn Write, header: &serde_json::Value) -> Result<u64> {
        backup::write(self, out, header)
    }

    /// Loads a backup stream into this (empty) store, checking its digest.
    /// Returns the backup's header and the number of records.
    pub fn read_backup(&self, input: &mut dyn Read) -> Result<(serde_json::Value, u64)> {
        let (header, c, n) = backup::read(input)?;
        self.commit_blocking(&c)?;
        Ok((header, n))
    }
}

pub fn read_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().unwrap_or([0; 8]))
}

/// Wrapped data keys and grant use counters, in the key store: what no
/// backup of the data may carry back (a restored backup must neither
/// resurrect a key nor reset a grant's uses).
#[derive(Clone)]
pub struct KeyStore {
    pub store: Store,
}

pub fn dek_key(subject: &str, version: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(subject.len() + 9);
    k.extend_from_slice(subject.as_bytes());
    k.push(0);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

/// Splits a key-store key back into subject id and version.
pub fn parse_dek_key(k: &[u8]) -> Option<(&str, u64)> {
    if k.len() < 9 || k[k.len() - 9] != 0 {
        return None;
    }
    let (id, rest) = k.split_at(k.len() - 9);
    Some((
        std::str::from_utf8(id).ok()?,
        u64::from_be_bytes(rest[1..].try_into().ok()?),
    ))
}

fn decode_wrapped(b: &[u8]) -> Result<WrappedKey> {
    postcard::from_bytes(b).map_err(|e| VaultError::Internal(format!("corrupt wrapped key: {e}")))
}

impl KeyStore {
    /// The embedded key store under the keys directory (the sled backend),
    /// with the default cache.
    pub fn open(keys_dir: &Path) -> Result<KeyStore> {
        KeyStore::open_sled(keys_dir, crate::config::StorageConfig::default().cache_mib)
    }

    fn open_sled(keys_dir: &Path, cache_mib: u64) -> Result<KeyStore> {
        let engine = sled::Engine::open(&keys_dir.join("datakeys"), Space::KEYS, cache_mib)?;
        let engine = wal::Logged::open(engine, &keys_dir.join("datakeys.wal"))?;
        Ok(KeyStore {
            store: Store::over("keys", Arc::new(engine)),
        })
    }

    /// The configured key store (`storage.backend`).
    pub fn open_with(cfg: &crate::config::Config) -> Result<KeyStore> {
        match cfg.storage.backend {
            crate::config::Backend::Sled => KeyStore::open_sled(&cfg.keys.dir, cfg.storage.cache_mib),
            crate::config::Backend::Postgres => Ok(KeyStore {
                store: Store::over("keys", Arc::new(postgres::Engine::open(&cfg.storage, true)?)),
            }),
        }
    }

    pub fn flusher(&self) -> &Flusher {
        &self.store.flusher
    }

    pub fn get(&self, subject: &str, version: u64) -> Result<Option<WrappedKey>> {
        self.store
            .get(Space::Wrapped, dek_key(subject, version))?
            .map(|b| decode_wrapped(&b))
            .transpose()
    }

    /// Adds the wrapped keys to `c` (applied by the caller).
    pub fn stage_put(c: &mut Commit, subject: &str, version: u64, w: &WrappedKey) {
        c.insert(
            Space::Wrapped,
            dek_key(subject, version),
            postcard::to_stdvec(w).expect("postcard"),
        );
    }

    pub fn put(&self, subject: &str, version: u64, w: &WrappedKey) -> Result<()> {
        let mut c = Commit::default();
        Self::stage_put(&mut c, subject, version, w);
        self.store.apply(&c)
    }

    pub fn remove(&self, subject: &str, version: u64) -> Result<()> {
        self.store.remove(Space::Wrapped, dek_key(subject, version))
    }

    /// Every wrapped key: subject id, version and the key.
    pub fn all(&self) -> impl Iterator<Item = Result<(String, u64, WrappedKey)>> + '_ {
        self.store.scan(Space::Wrapped, []).filter_map(|kv| {
            let (k, v) = match kv {
                Ok(kv) => kv,
                Err(e) => return Some(Err(e)),
            };
            let (id, version) = parse_dek_key(&k)?;
            Some(decode_wrapped(&v).map(|w| (id.to_owned(), version, w)))
        })
    }

    pub fn count(&self) -> Result<u64> {
        self.store.count(Space::Wrapped)
    }

    /// How many uses of a limited grant were taken.
    pub fn uses(&self, grant_id: &str) -> Result<u64> {
        Ok(self
            .store
            .get(Space::GrantUses, grant_id)?
            .map(|b| read_u64(&b))
            .unwrap_or(0))
    }

    /// Takes up to `n` of the `max` uses of a grant, atomically; returns how
    /// many were taken. Not durable until the key store's flusher has run.
    pub fn take_uses(&self, grant_id: &str, max: u64, n: u64) -> Result<u64> {
        let mut took = 0;
        self.store.update(Space::GrantUses, grant_id, &mut |old| {
            let used = old.map(read_u64).unwrap_or(0);
            took = n.min(max.saturating_sub(used));
            Some((used + took).to_be_bytes().to_vec())
        })?;
        Ok(took)
    }

    /// Removes every version of a subject's key.
    pub fn remove_all(&self, subject: &str) -> Result<usize> {
        let mut prefix = subject.as_bytes().to_vec();
        prefix.push(0);
        let keys = self.store.keys(Space::Wrapped, &prefix)?;
        let mut c = Commit::default();
        for k in &keys {
            c.remove(Space::Wrapped, k);
        }
        self.store.apply(&c)?;
        Ok(keys.len())
    }

    /// A shared ledger's entries, in order.
    pub fn ledger(&self, s: Space) -> Result<Vec<Vec<u8>>> {
        self.store.scan(s, LEDGER_ENTRY).map(|kv| kv.map(|(_, v)| v)).collect()
    }

    /// A shared ledger's last entry.
    pub fn ledger_last(&self, s: Space) -> Result<Option<Vec<u8>>> {
        Ok(self.ledger_head(s)?.map(|h| h.get(8..).unwrap_or_default().to_vec()))
    }

    /// A shared ledger's head as stored: the last sequence number (8 bytes,
    /// big-endian), then the last entry.
    pub fn ledger_head(&self, s: Space) -> Result<Option<Vec<u8>>> {
        self.store.get(s, LEDGER_HEAD)
    }

    /// A shared ledger's first entry.
    pub fn ledger_first(&self, s: Space) -> Result<Option<Vec<u8>>> {
        self.store
            .scan(s, LEDGER_ENTRY)
            .next()
            .transpose()
            .map(|kv| kv.map(|(_, v)| v))
    }

    /// How many entries a shared ledger holds.
    pub fn ledger_len(&self, s: Space) -> Result<u64> {
        Ok(self.store.keys(s, LEDGER_ENTRY)?.len() as u64)
    }

    /// Replaces every entry of a shared ledger with `entries` (sequence
    /// number and bytes, in order), in one durable commit that expects the
    /// head `head` (`VersionConflict` when another writer moved it).
    pub fn replace_ledger(&self, s: Space, head: Option<&[u8]>, entries: Vec<(u64, Vec<u8>)>) -> Result<()> {
        let mut c = Commit::default();
        c.expect(s, LEDGER_HEAD, head);
        for k in self.store.keys(s, LEDGER_ENTRY)? {
            c.remove(s, k);
        }
        if let Some((seq, last)) = entries.last() {
            c.insert(s, LEDGER_HEAD, [&seq.to_be_bytes()[..], last].concat());
        }
        for (seq, bytes) in entries {
            c.insert(s, [LEDGER_ENTRY, &seq.to_be_bytes()[..]].concat(), bytes);
        }
        self.store.commit_blocking(&c)
    }

    /// Appends `make(seq, last)` to a shared ledger, durable before it
    /// returns: the entry numbered `seq`, following `last` (`None`: the
    /// first). Writers on several nodes append at once: a commit expects the
    /// head it read, and one that lost the race reads the new head and makes
    /// its entry again, so every entry follows exactly one other.
    pub fn append_ledger(&self, s: Space, make: MakeEntry<'_>) -> Result<()> {
        loop {
            let head = self.store.get(s, LEDGER_HEAD)?;
            let (seq, last) = match &head {
                Some(h) => (read_u64(h.get(..8).unwrap_or_default()) + 1, h.get(8..)),
                None => (1, None),
            };
            let entry = make(seq, last)?;
            let mut c = Commit::default();
            c.expect(s, LEDGER_HEAD, head.as_deref());
            c.insert(s, [LEDGER_ENTRY, &seq.to_be_bytes()[..]].concat(), &entry);
            c.insert(s, LEDGER_HEAD, [&seq.to_be_bytes()[..], &entry].concat());
            match self.store.commit_blocking(&c) {
                Err(VaultError::VersionConflict { .. }) => continue,
                done => return done,
            }
        }
    }
}

/// Builds a ledger entry from its sequence number and the entry before it.
pub type MakeEntry<'a> = &'a mut dyn FnMut(u64, Option<&[u8]>) -> Result<Vec<u8>>;

/// A shared ledger's keys: `e` and the sequence number for an entry, `h` for
/// the head (the last sequence number and entry).
const LEDGER_ENTRY: &[u8] = b"e";
const LEDGER_HEAD: &[u8] = b"h";

#[cfg(test)]
mod tests {
    use super::*;

    /// The records' byte strings are written as serde bytes: the same bytes
    /// as the plain sequences of `u8` that every record stored before was
    /// written with, both ways (a store keeps its records, and a record's
    /// bytes are a write's precondition).
    #[test]
    fn records_keep_their_encoding() {
        #[derive(Serialize, Deserialize)]
        struct Before {
            version: u64,
            created_at: u64,
            updated_at: u64,
            fields: Vec<(String, Vec<u8>)>,
            index: Vec<Vec<u8>>,
        }
        #[derive(Serialize, Deserialize)]
        struct WrappedBefore {
            epoch: u32,
            sealed: Vec<u8>,
        }
        // Lengths on both sides of a one-byte varint (127 / 128).
        let long: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        let before = Before {
            version: 3,
            created_at: 1_700_000_000,
            updated_at: 1_800_000_000,
            fields: vec![
                ("email".into(), long[..127].to_vec()),
                ("address".into(), long.clone()),
                ("phone".into(), vec![]),
            ],
            index: vec![long[..32].to_vec(), long[..128].to_vec()],
        };
        let old = postcard::to_stdvec(&before).unwrap();
        let rec = SubjectRecord::decode(&old).unwrap();
        assert_eq!(
            (rec.version, rec.created_at, rec.updated_at),
            (3, 1_700_000_000, 1_800_000_000)
        );
        assert_eq!(rec.fields, before.fields);
        assert_eq!(rec.index, before.index);
        assert_eq!(rec.encode(), old);
        let back: Before = postcard::from_bytes(&rec.encode()).unwrap();
        assert_eq!(back.fields, before.fields);

        let wb = WrappedBefore {
            epoch: 9,
            sealed: long.clone(),
        };
        let old = postcard::to_stdvec(&wb).unwrap();
        let w = decode_wrapped(&old).unwrap();
        assert_eq!((w.epoch, &w.sealed), (9, &long));
        assert_eq!(postcard::to_stdvec(&w).unwrap(), old);
    }

    /// Stamps grow across calls and restarts, and a store of one node
    /// writes its counter once a block, not once a call.
    #[test]
    fn stamps_grow_and_are_taken_in_blocks() {
        let d = tempfile::tempdir().unwrap();
        let mut last = 0;
        for _ in 0..2 {
            let s = Store::open(d.path()).unwrap();
            for n in [1, 5, 1] {
                let first = s.reserve_stamps("st", n).unwrap();
                assert!(first > last, "{first} after {last}");
                last = first + n - 1;
            }
            let persisted = s.get(Space::Meta, "st").unwrap().map(|v| read_u64(&v));
            assert_eq!(persisted, Some(last - 7 + STAMP_BLOCK));
            // More than a block at once is one reservation of its own.
            let big = s.reserve_stamps("st", 3 * STAMP_BLOCK).unwrap();
            assert!(big > last);
            last = big + 3 * STAMP_BLOCK - 1;
        }
    }

    #[test]
    fn counters_reserve_consecutive_ranges() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        assert_eq!(s.next_counter("c").unwrap(), 1);
        assert_eq!(s.reserve_counter("c", 10).unwrap(), 2);
        assert_eq!(s.next_counter("c").unwrap(), 12);
    }

    #[test]
    fn backups_hold_what_they_always_held() {
        let names: Vec<_> = Space::BACKED_UP.iter().map(|s| s.name()).collect();
        assert_eq!(
            names,
            [
                "subjects",
                "index",
                "tokens",
                "token_hashes",
                "consents",
                "erased",
                "activity",
                "access",
                "meta"
            ]
        );
    }

    #[test]
    fn dek_keys_round_trip() {
        let k = dek_key("4f1c", 7);
        assert_eq!(parse_dek_key(&k), Some(("4f1c", 7)));
    }

    #[tokio::test]
    async fn group_commit_answers_everyone() {
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = count.clone();
        let f = std::sync::Arc::new(Flusher::spawn("t", move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }));
        let mut hs = vec![];
        for _ in 0..50 {
            let f = f.clone();
            hs.push(tokio::spawn(async move { f.sync().await }));
        }
        for h in hs {
            h.await.unwrap().unwrap();
        }
        let flushes = count.load(std::sync::atomic::Ordering::SeqCst);
        assert!(flushes < 50, "50 waiters took {flushes} flushes");
    }

    #[test]
    fn backup_round_trip_and_corruption() {
        let a = tempfile::tempdir().unwrap();
        let s = Store::open(a.path()).unwrap();
        s.insert(Space::Subjects, b"id1", b"cipher").unwrap();
        s.insert(Space::Index, b"ix", b"id1").unwrap();
        let mut buf = vec![];
        assert_eq!(s.write_backup(&mut buf, &serde_json::json!({"x": 1})).unwrap(), 2);
        let b = tempfile::tempdir().unwrap();
        let t = Store::open(b.path()).unwrap();
        let (h, n) = t.read_backup(&mut buf.as_slice()).unwrap();
        assert_eq!((h["x"].as_i64(), n), (Some(1), 2));
        assert_eq!(t.get(Space::Subjects, b"id1").unwrap().unwrap().as_slice(), b"cipher");
        let mut bad = buf.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 1;
        let c = tempfile::tempdir().unwrap();
        let u = Store::open(c.path()).unwrap();
        assert!(u.read_backup(&mut bad.as_slice()).is_err());
        assert_eq!(u.count(Space::Subjects).unwrap(), 0);
    }
}
