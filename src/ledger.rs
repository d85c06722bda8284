//! The shred and revocation ledgers: append-only, hash-chained lists of
//! erased subjects and revoked tokens, kept with the keys (not with the
//! data) so that no restored backup and no old copy of the data can bring an
//! erased subject or a revoked token back. Every start replays them against
//! the data before serving.
//!
//! Owns where a ledger lives: on the sled backend `<keys dir>/shred.ledger`
//! and `revocations.ledger` (JSON lines); on the postgres backend the keys
//! database, shared by every node, so that a node replays what any node
//! erased or revoked. Holds ids and signed receipts, never a personal value.

use crate::config::{Backend, Config};
use crate::error::{Result, VaultError};
use crate::storage::{KeyStore, Space};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub const LEDGER_FILE: &str = "shred.ledger";
/// The revocation ledger: one entry per revoked token (`id` is the token id,
/// `receipt` the signed revocation note), replayed like the shred ledger.
pub const REVOCATION_FILE: &str = "revocations.ledger";

/// Which of the two ledgers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Shred,
    Revocation,
}

impl Kind {
    fn file(self) -> &'static str {
        match self {
            Kind::Shred => LEDGER_FILE,
            Kind::Revocation => REVOCATION_FILE,
        }
    }

    fn space(self) -> Space {
        match self {
            Kind::Shred => Space::ShredLedger,
            Kind::Revocation => Space::RevocationLedger,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub seq: u64,
    pub id: String,
    /// The signed erasure receipt, exactly as answered to the caller.
    pub receipt: serde_json::Value,
    pub signature: String,
    pub prev: String,
    pub hash: String,
}

fn hash_of(prev: &str, seq: u64, id: &str, receipt: &serde_json::Value, sig: &str) -> String {
    let body = serde_json::to_vec(&(seq, id, crate::receipt::canonical_json(receipt), sig)).expect("json");
    let mut input = prev.as_bytes().to_vec();
    input.push(b'\n');
    input.extend_from_slice(&body);
    hex::encode(crate::crypto::sha256(&input))
}

impl LedgerEntry {
    /// The entry that follows `prev` (the previous entry's hash).
    fn next(seq: u64, prev: String, id: &str, receipt: &serde_json::Value, signature: &str) -> LedgerEntry {
        LedgerEntry {
            seq,
            id: id.to_owned(),
            receipt: receipt.clone(),
            signature: signature.to_owned(),
            hash: hash_of(&prev, seq, id, receipt, signature),
            prev,
        }
    }
}

enum At {
    /// A file of this node's keys directory, and its head.
    File(PathBuf, Mutex<(u64, String)>),
    /// A space of the shared key store.
    Shared(KeyStore, Space),
}

pub struct Ledger {
    at: At,
}

/// Opens the ledger of `kind` where `cfg` keeps it and checks its chain: a
/// broken chain stops the start, since a removed entry could resurrect a
/// subject or a token.
pub fn open(cfg: &Config, keys: &KeyStore, kind: Kind) -> Result<(Ledger, Vec<LedgerEntry>)> {
    match cfg.storage.backend {
        Backend::Sled => Ledger::open_file(cfg.keys.dir.join(kind.file())),
        Backend::Postgres => {
            let space = kind.space();
            let entries = chain(space.name(), keys.ledger(space)?.into_iter().map(Ok))?;
            Ok((
                Ledger {
                    at: At::Shared(keys.clone(), space),
                },
                entries,
            ))
        }
    }
}

impl Ledger {
    /// Opens the ledger in `path` (the shred or the revocation ledger file).
    pub fn open_file(path: PathBuf) -> Result<(Ledger, Vec<LedgerEntry>)> {
        let entries = read_all(&path)?;
        let head = entries
            .last()
            .map(|e| (e.seq, e.hash.clone()))
            .unwrap_or((0, crate::audit::GENESIS.to_string()));
        Ok((
            Ledger {
                at: At::File(path, Mutex::new(head)),
            },
            entries,
        ))
    }

    /// Appends one entry, durable before it returns. On a shared store
    /// several nodes may append at once; each entry still follows exactly
    /// one other.
    pub fn append(&self, id: &str, receipt: &serde_json::Value, signature: &str) -> Result<LedgerEntry> {
        match &self.at {
            At::File(path, state) => {
                let mut st = state.lock().expect("ledger lock");
                let e = LedgerEntry::next(st.0 + 1, st.1.clone(), id, receipt, signature);
                let mut line = serde_json::to_vec(&e).expect("json");
                line.push(b'\n');
                let mut f = crate::fsutil::open_append_private(path)?;
                f.write_all(&line)?;
                f.sync_data()?;
                *st = (e.seq, e.hash.clone());
                Ok(e)
            }
            At::Shared(keys, space) => {
                let mut made = None;
                keys.append_ledger(*space, &mut |seq, last| {
                    let prev = match last {
                        Some(b) => decode(space.name(), b)?.hash,
                        None => crate::audit::GENESIS.to_string(),
                    };
                    let e = LedgerEntry::next(seq, prev, id, receipt, signature);
                    let bytes = serde_json::to_vec(&e).expect("json");
                    made = Some(e);
                    Ok(bytes)
                })?;
                Ok(made.expect("append_ledger made an entry"))
            }
        }
    }

    /// The last entry's sequence number and hash.
    pub fn head(&self) -> Result<(u64, String)> {
        match &self.at {
            At::File(_, state) => Ok(state.lock().expect("ledger lock").clone()),
            At::Shared(keys, space) => Ok(match keys.ledger_last(*space)? {
                Some(b) => {
                    let e = decode(space.name(), &b)?;
                    (e.seq, e.hash)
                }
                None => (0, crate::audit::GENESIS.to_string()),
            }),
        }
    }
}

fn decode(name: &str, b: &[u8]) -> Result<LedgerEntry> {
    serde_json::from_slice(b).map_err(|_| VaultError::Internal(format!("ledger {name} holds an unreadable entry")))
}

/// Checks a ledger's entries, in order: numbered from 1, each chained to the
/// one before.
fn chain(name: &str, lines: impl Iterator<Item = Result<Vec<u8>>>) -> Result<Vec<LedgerEntry>> {
    let mut out: Vec<LedgerEntry> = Vec::new();
    let mut prev = crate::audit::GENESIS.to_string();
    for (i, line) in lines.enumerate() {
        let line = line?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let broken = || VaultError::Internal(format!("ledger {name} is broken at line {}", i + 1));
        let e: LedgerEntry = serde_json::from_slice(&line).map_err(|_| broken())?;
        if e.seq != out.len() as u64 + 1
            || e.prev != prev
            || hash_of(&prev, e.seq, &e.id, &e.receipt, &e.signature) != e.hash
        {
            return Err(broken());
        }
        prev = e.hash.clone();
        out.push(e);
    }
    Ok(out)
}

pub fn read_all(path: &Path) -> Result<Vec<LedgerEntry>> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e.into()),
    };
    let lines = BufReader::new(f).split(b'\n').map(|l| l.map_err(VaultError::from));
    chain(&path.display().to_string(), lines)
}
