//! Persistent state in two sled databases, and how it reaches the disk.
//!
//! Owns the data directory's trees (subject ciphertexts, blind index, token
//! hashes, consents, erasure markers, activity times, access-log index), the
//! key store under the keys directory (wrapped data keys, one per subject
//! version, deliberately *not* in the data directory nor its backups), the
//! group-commit `Flusher`, and the backup stream format.
//!
//! Nothing here sees plaintext: values are ciphertexts, wrapped keys, HMACs
//! and metadata.

use crate::error::{Result, VaultError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sled::Transactional;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::mpsc;
use tokio::sync::oneshot;

/// Coalesces durability requests: every caller waiting when a flush starts is
/// answered by that one flush (group commit), so N concurrent writers cost
/// one fsync, not N.
pub struct Flusher {
    tx: mpsc::Sender<Reply>,
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
        std::thread::Builder::new()
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
        Flusher { tx }
    }

    /// Returns once everything written before the call is on disk.
    pub async fn sync(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let reply: Reply = Box::new(move |r| {
            let _ = tx.send(r);
        });
        self.tx
            .send(reply)
            .map_err(|_| VaultError::internal("flusher stopped"))?;
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
        self.tx
            .send(reply)
            .map_err(|_| VaultError::internal("flusher stopped"))?;
        rx.recv()
            .map_err(|_| VaultError::internal("flusher stopped"))?
            .map_err(flush_error)
    }
}

/// A unit of work over the data trees, applied atomically by `Store::apply`
/// (a change and the event that reports it land together).
#[derive(Default)]
pub struct Commit {
    ops: std::collections::BTreeMap<&'static str, sled::Batch>,
    /// Set by the vault when an event was staged: the sender is woken once
    /// the commit is durable.
    pub has_events: bool,
}

impl Commit {
    pub fn insert(&mut self, tree: &'static str, k: impl AsRef<[u8]>, v: impl AsRef<[u8]>) {
        self.ops.entry(tree).or_default().insert(k.as_ref(), v.as_ref());
    }
    pub fn remove(&mut self, tree: &'static str, k: impl AsRef<[u8]>) {
        self.ops.entry(tree).or_default().remove(k.as_ref());
    }
}

/// One subject as stored: field ciphertexts under the data key of `version`.
#[derive(Serialize, Deserialize, Clone)]
pub struct SubjectRecord {
    pub version: u64,
    pub created_at: u64,
    pub updated_at: u64,
    /// Field name to `nonce || ciphertext || tag`.
    pub fields: Vec<(String, Vec<u8>)>,
    /// Blind-index keys (HMACs) of this version, so that an erasure or a
    /// ledger replay can remove them without any key.
    pub index: Vec<Vec<u8>>,
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
    pub sealed: Vec<u8>,
}

/// Flushes a sled database, keeping the kind of an I/O error (a full disk
/// must reach the caller as `503 storage_unavailable`).
fn sled_flush(db: &sled::Db) -> std::io::Result<()> {
    crate::faults::enospc()?;
    match db.flush() {
        Ok(_) => Ok(()),
        Err(sled::Error::Io(e)) => Err(e),
        Err(e) => Err(std::io::Error::other(e)),
    }
}

/// Opens (creating if needed) a sled database, mapping its lock error to a
/// clear message.
fn open_db(path: &Path) -> Result<sled::Db> {
    sled::Config::new()
        .path(path)
        .mode(sled::Mode::HighThroughput)
        .flush_every_ms(None)
        .open()
        .map_err(|e| match e {
            sled::Error::Io(io) if io.to_string().contains("lock") => {
                VaultError::Internal(format!("{} is in use by another pdvault process", path.display()))
            }
            other => VaultError::from(other),
        })
}

/// The data directory.
pub struct Store {
    pub db: sled::Db,
    pub subjects: sled::Tree,
    pub index: sled::Tree,
    pub tokens: sled::Tree,
    pub token_hashes: sled::Tree,
    pub consents: sled::Tree,
    pub erased: sled::Tree,
    pub activity: sled::Tree,
    pub access: sled::Tree,
    pub meta: sled::Tree,
    /// Self-service link codes (minutes-long, single use): not in backups.
    pub self_codes: sled::Tree,
    /// Events waiting to be delivered (`events`): not in backups, so a
    /// restore never sends old news again.
    pub outbox: sled::Tree,
    /// Per-subscriber delivery state of the outbox's events.
    pub deliveries: sled::Tree,
    pub flusher: Flusher,
}

pub const DATA_TREES: &[&str] = &[
    "subjects",
    "index",
    "tokens",
    "token_hashes",
    "consents",
    "erased",
    "activity",
    "access",
    "meta",
];

impl Store {
    pub fn open(dir: &Path) -> Result<Store> {
        crate::fsutil::create_private_dir(dir)?;
        let db = open_db(&dir.join("db"))?;
        let t = |n: &str| db.open_tree(n);
        let flush_db = db.clone();
        Ok(Store {
            subjects: t("subjects")?,
            index: t("index")?,
            tokens: t("tokens")?,
            token_hashes: t("token_hashes")?,
            consents: t("consents")?,
            erased: t("erased")?,
            activity: t("activity")?,
            access: t("access")?,
            meta: t("meta")?,
            self_codes: t("self_codes")?,
            outbox: t("outbox")?,
            deliveries: t("deliveries")?,
            flusher: Flusher::spawn("data", move || sled_flush(&flush_db)),
            db,
        })
    }

    pub fn tree(&self, name: &str) -> Option<&sled::Tree> {
        Some(match name {
            "subjects" => &self.subjects,
            "index" => &self.index,
            "tokens" => &self.tokens,
            "token_hashes" => &self.token_hashes,
            "consents" => &self.consents,
            "erased" => &self.erased,
            "activity" => &self.activity,
            "access" => &self.access,
            "meta" => &self.meta,
            _ => return None,
        })
    }

    /// A tree a `Commit` may write: the backed-up ones and the outbox's.
    fn commit_tree(&self, name: &str) -> Option<&sled::Tree> {
        match name {
            "outbox" => Some(&self.outbox),
            "deliveries" => Some(&self.deliveries),
            n => self.tree(n),
        }
    }

    /// Applies a unit of work in one transaction: after a crash all of it is
    /// there or none. Durable once the flusher has run after it.
    pub fn apply(&self, c: &Commit) -> Result<()> {
        let names: Vec<&str> = c.ops.keys().copied().collect();
        let trees: Vec<&sled::Tree> = names
            .iter()
            .map(|n| {
                self.commit_tree(n)
                    .ok_or_else(|| VaultError::internal(format!("no tree {n}")))
            })
            .collect::<Result<_>>()?;
        if trees.is_empty() {
            return Ok(());
        }
        trees
            .as_slice()
            .transaction(|txs| {
                for (tx, name) in txs.iter().zip(&names) {
                    tx.apply_batch(&c.ops[name])?;
                }
                Ok(())
            })
            .map_err(|e: sled::transaction::TransactionError<()>| match e {
                sled::transaction::TransactionError::Storage(e) => VaultError::from(e),
                sled::transaction::TransactionError::Abort(()) => VaultError::internal("transaction aborted"),
            })
    }

    /// Next value of a persistent counter in `meta`.
    pub fn next_counter(&self, name: &str) -> Result<u64> {
        self.reserve_counter(name, 1)
    }

    /// Reserves `n` consecutive values of a persistent counter; returns the first.
    pub fn reserve_counter(&self, name: &str, n: u64) -> Result<u64> {
        let v = self.meta.update_and_fetch(name, |old| {
            Some((old.map(read_u64).unwrap_or(0) + n).to_be_bytes().to_vec())
        })?;
        let last = v.map(|b| read_u64(&b)).unwrap_or(n);
        Ok(last + 1 - n)
    }

    /// Writes a consistent snapshot of every data tree. The caller holds the
    /// write gate, so no write runs meanwhile.
    pub fn write_backup(&self, out: &mut dyn Write, header: &serde_json::Value) -> Result<u64> {
        let mut w = HashingWriter {
            inner: out,
            hash: Sha256::new(),
        };
        w.write_all(BACKUP_MAGIC)?;
        let mut h = serde_json::to_vec(header).expect("json");
        h.push(b'\n');
        w.write_all(&h)?;
        let mut n = 0u64;
        for name in DATA_TREES {
            let tree = self.tree(name).expect("known tree");
            for kv in tree.iter() {
                let (k, v) = kv?;
                w.write_all(&[1u8])?;
                w.write_all(&(name.len() as u16).to_be_bytes())?;
                w.write_all(name.as_bytes())?;
                w.write_all(&(k.len() as u32).to_be_bytes())?;
                w.write_all(&k)?;
                w.write_all(&(v.len() as u32).to_be_bytes())?;
                w.write_all(&v)?;
                n += 1;
            }
        }
        w.write_all(&[0u8])?;
        let digest = w.hash.finalize();
        w.inner.write_all(&digest)?;
        Ok(n)
    }

    /// Loads a backup stream into this (empty) store, checking its digest.
    /// Returns the backup's header and the number of records.
    pub fn read_backup(&self, input: &mut dyn Read) -> Result<(serde_json::Value, u64)> {
        let bad = |why: &str| VaultError::BadRequest(format!("not a pdvault backup: {why}"));
        let mut r = HashingReader {
            inner: input,
            hash: Sha256::new(),
        };
        let mut magic = [0u8; BACKUP_MAGIC.len()];
        r.read_exact(&mut magic).map_err(|_| bad("too short"))?;
        if magic != BACKUP_MAGIC {
            return Err(bad("wrong magic"));
        }
        let mut line = Vec::new();
        loop {
            let mut b = [0u8; 1];
            r.read_exact(&mut b).map_err(|_| bad("truncated header"))?;
            if b[0] == b'\n' {
                break;
            }
            line.push(b[0]);
            if line.len() > 1 << 20 {
                return Err(bad("header too long"));
            }
        }
        let header: serde_json::Value = serde_json::from_slice(&line).map_err(|_| bad("header"))?;
        let mut n = 0u64;
        let mut batches: std::collections::HashMap<String, sled::Batch> = Default::default();
        loop {
            let mut tag = [0u8; 1];
            r.read_exact(&mut tag).map_err(|_| bad("truncated"))?;
            if tag[0] == 0 {
                break;
            }
            let name = read_chunk(&mut r, 2).map_err(|_| bad("truncated"))?;
            let name = String::from_utf8(name).map_err(|_| bad("tree name"))?;
            let k = read_chunk(&mut r, 4).map_err(|_| bad("truncated"))?;
            let v = read_chunk(&mut r, 4).map_err(|_| bad("truncated"))?;
            if name == "grant_uses" {
                // Backups made before the counters moved to the key store:
                // a restore never resets uses, so old counters are ignored.
                continue;
            }
            if self.tree(&name).is_none() {
                return Err(bad("unknown tree"));
            }
            batches.entry(name).or_default().insert(k, v);
            n += 1;
        }
        let digest = r.hash.finalize();
        let mut stored = [0u8; 32];
        r.inner.read_exact(&mut stored).map_err(|_| bad("missing digest"))?;
        if digest.as_slice() != stored {
            return Err(bad("digest mismatch (corrupt or truncated)"));
        }
        for (name, batch) in batches {
            self.tree(&name).expect("checked").apply_batch(batch)?;
        }
        self.flusher.sync_blocking()?;
        Ok((header, n))
    }
}

const BACKUP_MAGIC: &[u8] = b"PDVAULT-BACKUP-1\n";

fn read_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().unwrap_or([0; 8]))
}

fn read_chunk(r: &mut dyn Read, len_bytes: usize) -> std::io::Result<Vec<u8>> {
    let mut l = [0u8; 4];
    r.read_exact(&mut l[4 - len_bytes..])?;
    let len = u32::from_be_bytes(l) as usize;
    if len > 64 << 20 {
        return Err(std::io::Error::other("chunk too large"));
    }
    let mut v = vec![0u8; len];
    r.read_exact(&mut v)?;
    Ok(v)
}

struct HashingWriter<'a> {
    inner: &'a mut dyn Write,
    hash: Sha256,
}
impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

struct HashingReader<'a> {
    inner: &'a mut dyn Read,
    hash: Sha256,
}
impl Read for HashingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Wrapped data keys and grant use counters, under the keys directory: what
/// no backup of the data may carry back (a restored backup must neither
/// resurrect a key nor reset a grant's uses).
pub struct KeyStore {
    pub db: sled::Db,
    pub keys: sled::Tree,
    pub uses: sled::Tree,
    pub flusher: Flusher,
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

impl KeyStore {
    pub fn open(keys_dir: &Path) -> Result<KeyStore> {
        let db = open_db(&keys_dir.join("datakeys"))?;
        let keys = db.open_tree("wrapped")?;
        let uses = db.open_tree("grant_uses")?;
        let flush_db = db.clone();
        Ok(KeyStore {
            keys,
            uses,
            flusher: Flusher::spawn("keys", move || sled_flush(&flush_db)),
            db,
        })
    }

    pub fn get(&self, subject: &str, version: u64) -> Result<Option<WrappedKey>> {
        match self.keys.get(dek_key(subject, version))? {
            None => Ok(None),
            Some(b) => {
                Ok(Some(postcard::from_bytes(&b).map_err(|e| {
                    VaultError::Internal(format!("corrupt wrapped key: {e}"))
                })?))
            }
        }
    }

    pub fn put(&self, subject: &str, version: u64, w: &WrappedKey) -> Result<()> {
        self.keys
            .insert(dek_key(subject, version), postcard::to_stdvec(w).expect("postcard"))?;
        Ok(())
    }

    /// How many uses of a limited grant were taken.
    pub fn uses(&self, grant_id: &str) -> Result<u64> {
        Ok(self.uses.get(grant_id.as_bytes())?.map(|b| read_u64(&b)).unwrap_or(0))
    }

    /// Takes up to `n` of the `max` uses of a grant, atomically; returns how
    /// many were taken. Not durable until the key store's flusher has run.
    pub fn take_uses(&self, grant_id: &str, max: u64, n: u64) -> Result<u64> {
        let mut took = 0;
        self.uses.fetch_and_update(grant_id.as_bytes(), |old| {
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
        let mut n = 0;
        for k in self.keys.scan_prefix(&prefix).keys() {
            self.keys.remove(k?)?;
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_reserve_consecutive_ranges() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        assert_eq!(s.next_counter("c").unwrap(), 1);
        assert_eq!(s.reserve_counter("c", 10).unwrap(), 2);
        assert_eq!(s.next_counter("c").unwrap(), 12);
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
        s.subjects.insert(b"id1", b"cipher".to_vec()).unwrap();
        s.index.insert(b"ix", b"id1".to_vec()).unwrap();
        let mut buf = vec![];
        assert_eq!(s.write_backup(&mut buf, &serde_json::json!({"x": 1})).unwrap(), 2);
        let b = tempfile::tempdir().unwrap();
        let t = Store::open(b.path()).unwrap();
        let (h, n) = t.read_backup(&mut buf.as_slice()).unwrap();
        assert_eq!((h["x"].as_i64(), n), (Some(1), 2));
        assert_eq!(t.subjects.get(b"id1").unwrap().unwrap().as_ref(), b"cipher");
        let mut bad = buf.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 1;
        let c = tempfile::tempdir().unwrap();
        let u = Store::open(c.path()).unwrap();
        assert!(u.read_backup(&mut bad.as_slice()).is_err());
        assert!(u.subjects.is_empty());
    }
}
