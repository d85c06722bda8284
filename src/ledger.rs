//! The shred ledger: an append-only, hash-chained list of erased subjects,
//! kept with the keys (not with the data) so that no restored backup and no
//! old copy of the data directory can bring an erased subject back. Every
//! start replays it against the data before serving.
//!
//! Owns `<keys dir>/shred.ledger` (JSON lines). Holds ids and signed receipts,
//! never a personal value.

use crate::error::{Result, VaultError};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub const LEDGER_FILE: &str = "shred.ledger";
/// The revocation ledger: one entry per revoked token (`id` is the token id,
/// `receipt` the signed revocation note), replayed like the shred ledger.
pub const REVOCATION_FILE: &str = "revocations.ledger";

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

pub struct Ledger {
    path: PathBuf,
    state: Mutex<(u64, String)>,
}

impl Ledger {
    /// Opens the ledger and checks its chain: a broken chain stops the start,
    /// since a removed line could resurrect a subject.
    pub fn open(keys_dir: &Path) -> Result<(Ledger, Vec<LedgerEntry>)> {
        Self::open_file(keys_dir.join(LEDGER_FILE))
    }

    /// Opens the ledger in `path` (the shred or the revocation ledger).
    pub fn open_file(path: PathBuf) -> Result<(Ledger, Vec<LedgerEntry>)> {
        let entries = read_all(&path)?;
        let head = entries
            .last()
            .map(|e| (e.seq, e.hash.clone()))
            .unwrap_or((0, crate::audit::GENESIS.to_string()));
        Ok((
            Ledger {
                path,
                state: Mutex::new(head),
            },
            entries,
        ))
    }

    /// Appends one erasure and fsyncs before returning.
    pub fn append(&self, id: &str, receipt: &serde_json::Value, signature: &str) -> Result<LedgerEntry> {
        let mut st = self.state.lock().expect("ledger lock");
        let seq = st.0 + 1;
        let hash = hash_of(&st.1, seq, id, receipt, signature);
        let e = LedgerEntry {
            seq,
            id: id.to_owned(),
            receipt: receipt.clone(),
            signature: signature.to_owned(),
            prev: st.1.clone(),
            hash: hash.clone(),
        };
        let mut line = serde_json::to_vec(&e).expect("json");
        line.push(b'\n');
        let mut f = crate::fsutil::open_append_private(&self.path)?;
        f.write_all(&line)?;
        f.sync_data()?;
        *st = (seq, hash);
        Ok(e)
    }

    pub fn head(&self) -> (u64, String) {
        self.state.lock().expect("ledger lock").clone()
    }
}

pub fn read_all(path: &Path) -> Result<Vec<LedgerEntry>> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e.into()),
    };
    let mut out: Vec<LedgerEntry> = Vec::new();
    let mut prev = crate::audit::GENESIS.to_string();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let broken = || VaultError::Internal(format!("ledger {} is broken at line {}", path.display(), i + 1));
        let e: LedgerEntry = serde_json::from_str(&line).map_err(|_| broken())?;
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
