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
//!
//! The shred ledger only grows: an erased subject must stay erased. The
//! revocation ledger is compacted (`Ledger::compact`): once a revoked token
//! has expired, no copy of its record can be used again, so its entry is
//! dropped. A compacted ledger starts with a signed anchor entry that names
//! the head it replaced, and its chain goes on from there.

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
    /// The first entry of a compacted ledger: it stands for the entries
    /// dropped before it (its note says how many, and the head they ended
    /// at), and is chained to that head.
    pub fn is_anchor(&self) -> bool {
        self.id.is_empty()
    }

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
    /// A file of this node's keys directory, its head and how many entries
    /// (anchor aside) it holds.
    File(PathBuf, Mutex<FileState>),
    /// A space of the shared key store.
    Shared(KeyStore, Space),
}

pub struct Ledger {
    at: At,
    kind: Kind,
}

struct FileState {
    head: (u64, String),
    len: u64,
}

/// A ledger as read: its entries in order (an anchor left out) and its head
/// (the anchor's, when it holds nothing else).
pub struct Chain {
    pub entries: Vec<LedgerEntry>,
    pub head: (u64, String),
}

/// Opens the ledger of `kind` where `cfg` keeps it and checks its chain: a
/// broken chain stops the start, since a removed entry could resurrect a
/// subject or a token.
pub fn open(cfg: &Config, keys: &KeyStore, kind: Kind) -> Result<(Ledger, Vec<LedgerEntry>)> {
    match cfg.storage.backend {
        Backend::Sled => Ledger::open_file(cfg.keys.dir.join(kind.file()), kind),
        Backend::Postgres => {
            let space = kind.space();
            let read = chain(space.name(), kind, keys.ledger(space)?.into_iter().map(Ok))?;
            Ok((
                Ledger {
                    at: At::Shared(keys.clone(), space),
                    kind,
                },
                read.entries,
            ))
        }
    }
}

impl Ledger {
    /// Opens the ledger of `kind` in `path`.
    pub fn open_file(path: PathBuf, kind: Kind) -> Result<(Ledger, Vec<LedgerEntry>)> {
        let read = read_all(&path, kind)?;
        let state = FileState {
            head: read.head,
            len: read.entries.len() as u64,
        };
        Ok((
            Ledger {
                at: At::File(path, Mutex::new(state)),
                kind,
            },
            read.entries,
        ))
    }

    /// Appends one entry, durable before it returns. On a shared store
    /// several nodes may append at once; each entry still follows exactly
    /// one other.
    pub fn append(&self, id: &str, receipt: &serde_json::Value, signature: &str) -> Result<LedgerEntry> {
        match &self.at {
            At::File(path, state) => {
                let mut st = state.lock().expect("ledger lock");
                let e = LedgerEntry::next(st.head.0 + 1, st.head.1.clone(), id, receipt, signature);
                let mut f = crate::fsutil::open_append_private(path)?;
                f.write_all(&line_of(&e))?;
                f.sync_data()?;
                st.head = (e.seq, e.hash.clone());
                st.len += 1;
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
            At::File(_, state) => Ok(state.lock().expect("ledger lock").head.clone()),
            At::Shared(keys, space) => Ok(match keys.ledger_last(*space)? {
                Some(b) => {
                    let e = decode(space.name(), &b)?;
                    (e.seq, e.hash)
                }
                None => (0, crate::audit::GENESIS.to_string()),
            }),
        }
    }

    /// How many entries the ledger holds (an anchor not counted).
    pub fn count(&self) -> Result<u64> {
        match &self.at {
            At::File(_, state) => Ok(state.lock().expect("ledger lock").len),
            At::Shared(keys, space) => {
                // The anchor of a compacted ledger is one of its entries.
                let anchored = match keys.ledger_first(*space)? {
                    Some(b) => decode(space.name(), &b)?.is_anchor(),
                    None => false,
                };
                Ok(keys.ledger_len(*space)? - u64::from(anchored))
            }
        }
    }

    /// Rewrites the ledger without the entries `drop` picks, durably and in
    /// one step: an anchor entry, signed with `sign`, follows the old head,
    /// and the entries kept follow it, chained anew. Appends wait meanwhile
    /// (on a shared store, a compaction that meets a newer head gives way
    /// and drops nothing). Returns the ids of the entries dropped.
    pub fn compact(
        &self,
        drop: &dyn Fn(&LedgerEntry) -> bool,
        sign: &dyn Fn(&serde_json::Value) -> String,
        now: u64,
    ) -> Result<Vec<String>> {
        if self.kind != Kind::Revocation {
            return Err(VaultError::Internal("only the revocation ledger is compacted".into()));
        }
        match &self.at {
            At::File(path, state) => {
                let mut st = state.lock().expect("ledger lock");
                let read = read_all(path, self.kind)?;
                let Some((rewritten, gone)) = compacted(read, drop, sign, now) else {
                    return Ok(vec![]);
                };
                let bytes: Vec<u8> = rewritten.iter().flat_map(line_of).collect();
                crate::fsutil::write_atomic(path, &bytes)?;
                let last = rewritten.last().expect("an anchor at least");
                st.head = (last.seq, last.hash.clone());
                st.len = rewritten.len() as u64 - 1;
                Ok(gone)
            }
            At::Shared(keys, space) => {
                // The head first: an entry appended after it was read makes
                // the commit fail, and one appended before is in the read.
                let head = keys.ledger_head(*space)?;
                let read = chain(space.name(), self.kind, keys.ledger(*space)?.into_iter().map(Ok))?;
                let head_seq = head
                    .as_deref()
                    .map(|h| crate::storage::read_u64(h.get(..8).unwrap_or_default()));
                if head_seq.unwrap_or(0) != read.head.0 {
                    return Ok(vec![]);
                }
                let Some((rewritten, gone)) = compacted(read, drop, sign, now) else {
                    return Ok(vec![]);
                };
                crate::faults::hold("PDVAULT_FAULT_LEDGER_COMPACT_HOLD_FILE");
                let entries = rewritten
                    .iter()
                    .map(|e| (e.seq, serde_json::to_vec(e).expect("json")))
                    .collect();
                match keys.replace_ledger(*space, head.as_deref(), entries) {
                    Ok(()) => Ok(gone),
                    Err(VaultError::VersionConflict { .. }) => Ok(vec![]),
                    Err(e) => Err(e),
                }
            }
        }
    }
}

fn line_of(e: &LedgerEntry) -> Vec<u8> {
    let mut line = serde_json::to_vec(e).expect("json");
    line.push(b'\n');
    line
}

/// The entries that replace `read` when `drop` picks some: an anchor after
/// its head, then the rest. `None` when it picks none.
fn compacted(
    read: Chain,
    drop: &dyn Fn(&LedgerEntry) -> bool,
    sign: &dyn Fn(&serde_json::Value) -> String,
    now: u64,
) -> Option<(Vec<LedgerEntry>, Vec<String>)> {
    let (gone, kept): (Vec<LedgerEntry>, Vec<LedgerEntry>) = read.entries.into_iter().partition(|e| drop(e));
    if gone.is_empty() {
        return None;
    }
    let (seq, hash) = read.head;
    let note = serde_json::json!({
        "compacted_at": crate::fsutil::rfc3339(now),
        "dropped": gone.len(),
        "head_before": {"seq": seq, "hash": hash},
    });
    let mut out = vec![LedgerEntry::next(seq + 1, hash, "", &note, &sign(&note))];
    for e in kept {
        let last = out.last().expect("the anchor");
        out.push(LedgerEntry::next(
            last.seq + 1,
            last.hash.clone(),
            &e.id,
            &e.receipt,
            &e.signature,
        ));
    }
    Some((out, gone.into_iter().map(|e| e.id).collect()))
}

fn decode(name: &str, b: &[u8]) -> Result<LedgerEntry> {
    serde_json::from_slice(b).map_err(|_| VaultError::Internal(format!("ledger {name} holds an unreadable entry")))
}

/// Checks a ledger's entries, in order: numbered from 1, each chained to the
/// one before; or, in a compacted revocation ledger, from its anchor, which
/// only the first entry may be (the shred ledger is never compacted). A lost
/// line (the first ones included) breaks it.
fn chain(name: &str, kind: Kind, lines: impl Iterator<Item = Result<Vec<u8>>>) -> Result<Chain> {
    let mut out: Vec<LedgerEntry> = Vec::new();
    let mut head = (0, crate::audit::GENESIS.to_string());
    let mut first = true;
    for (i, line) in lines.enumerate() {
        let line = line?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let broken = || VaultError::Internal(format!("ledger {name} is broken at line {}", i + 1));
        let e: LedgerEntry = serde_json::from_slice(&line).map_err(|_| broken())?;
        let follows = e.seq == head.0 + 1 && e.prev == head.1;
        let anchored = first && e.is_anchor() && e.seq > 0 && kind == Kind::Revocation;
        if !(follows && !e.is_anchor() || anchored)
            || hash_of(&e.prev, e.seq, &e.id, &e.receipt, &e.signature) != e.hash
        {
            return Err(broken());
        }
        first = false;
        head = (e.seq, e.hash.clone());
        if !e.is_anchor() {
            out.push(e);
        }
    }
    Ok(Chain { entries: out, head })
}

pub fn read_all(path: &Path, kind: Kind) -> Result<Chain> {
    let empty = || Chain {
        entries: vec![],
        head: (0, crate::audit::GENESIS.to_string()),
    };
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(empty()),
        Err(e) => return Err(e.into()),
    };
    let lines = BufReader::new(f).split(b'\n').map(|l| l.map_err(VaultError::from));
    chain(&path.display().to_string(), kind, lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(entries: &[LedgerEntry]) -> Vec<&str> {
        entries.iter().map(|e| e.id.as_str()).collect()
    }

    fn open_at(path: &Path) -> Result<(Ledger, Vec<LedgerEntry>)> {
        Ledger::open_file(path.to_path_buf(), Kind::Revocation)
    }

    /// A compacted ledger keeps what was not dropped, in order, across a
    /// reopen, and takes new entries after them; a lost line of it, the
    /// anchor included, or an anchor anywhere but first, breaks it.
    #[test]
    fn a_compacted_ledger_reads_back_and_a_lost_line_still_breaks_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(REVOCATION_FILE);
        let (l, _) = open_at(&path).unwrap();
        for id in ["a", "b", "c"] {
            l.append(id, &serde_json::json!({"token_id": id}), "sig").unwrap();
        }
        let sign = |_: &serde_json::Value| "anchor-sig".to_string();
        assert!(l.compact(&|_| false, &sign, 1).unwrap().is_empty());
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);

        assert_eq!(l.compact(&|e| e.id == "b", &sign, 1).unwrap(), ["b"]);
        assert_eq!(l.count().unwrap(), 2);
        l.append("d", &serde_json::json!({"token_id": "d"}), "sig").unwrap();
        let (again, entries) = open_at(&path).unwrap();
        assert_eq!(ids(&entries), ["a", "c", "d"]);
        assert_eq!(again.count().unwrap(), 3);
        assert_eq!(again.head().unwrap(), l.head().unwrap());

        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let anchor: LedgerEntry = serde_json::from_str(lines[0]).unwrap();
        assert!(anchor.is_anchor());
        assert_eq!(anchor.receipt["dropped"], 1);
        assert_eq!(anchor.receipt["head_before"]["seq"], 3);
        assert_eq!(anchor.signature, "anchor-sig");
        for broken in [
            lines[1..].join("\n"),
            [lines[0], lines[2], lines[3]].join("\n"),
            [lines[1], lines[0], lines[2], lines[3]].join("\n"),
        ] {
            std::fs::write(&path, broken).unwrap();
            assert!(open_at(&path).is_err());
        }
        // The shred ledger takes no anchor: it is never compacted.
        std::fs::write(&path, text).unwrap();
        assert!(open_at(&path).is_ok());
        assert!(Ledger::open_file(path, Kind::Shred).is_err());
    }

    /// Everything dropped: the anchor alone stands, and the chain goes on
    /// from it.
    #[test]
    fn a_ledger_compacted_to_nothing_goes_on_from_its_anchor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(REVOCATION_FILE);
        let (l, _) = open_at(&path).unwrap();
        l.append("a", &serde_json::json!({}), "sig").unwrap();
        l.compact(&|_| true, &|_| String::new(), 1).unwrap();
        let (again, entries) = open_at(&path).unwrap();
        assert!(entries.is_empty());
        assert_eq!(again.count().unwrap(), 0);
        assert_eq!(again.head().unwrap().0, 2);
        again.append("b", &serde_json::json!({}), "sig").unwrap();
        assert_eq!(ids(&open_at(&path).unwrap().1), ["b"]);
    }
}
