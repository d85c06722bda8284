//! The audit log: every decision, allowed or refused, durable before the
//! response leaves, hash-chained so that a changed, removed or reordered entry
//! is found by `pdvault audit verify`.
//!
//! Owns the entries and their chain, the signed checkpoints of a chain's
//! head, and the per-subject access-log index in the data store. One thread
//! per node chains and commits the entries waiting at once (`commit`). Where
//! the chain is kept is a [`Place`]: the node's data directory (`file`, the
//! sled backend) or the shared data database, one chain per node (`shared`,
//! the postgres backend); `read` verifies and queries either. Entries name who,
//! which fields, which purpose, when and the outcome; never a value, never a
//! token.

use crate::error::{Result, VaultError};
use crate::storage::{Commit, KeyStore, Space, Store};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

mod commit;
mod file;
mod read;
mod shared;

use commit::{Committer, Sink};
pub use file::{log_path, read_anchor, write_base, ANCHOR_FILE, BASE_FILE, CHECKPOINT_FILE};
pub use read::{export, impact, verify, ExportFilter, Impact, SubjectImpact, Verdict};
use read::{Chain, Lines, Names};
pub use shared::heads as chain_heads;
pub use shared::write_base as write_shared_base;

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit record as written (API.md's keys, plus the chain).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditEntry {
    pub seq: u64,
    pub at: String,
    pub request_id: String,
    pub caller: Option<String>,
    pub token_id: Option<String>,
    pub purpose: Option<String>,
    pub action: String,
    pub subject: Option<String>,
    pub fields: Vec<String>,
    pub outcome: String,
    pub code: Option<String>,
    pub justification: Option<String>,
    /// The token issued, revoked or granted, for those actions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_token_id: Option<String>,
    /// The node whose chain holds the entry, where several nodes share the
    /// store (each has a chain, numbered on its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub prev: String,
    pub hash: String,
}

impl AuditEntry {
    /// The entry `seq` of a chain, made of `d`, following `prev`.
    fn chained(seq: u64, at: &str, d: Draft, prev: &str, node: Option<&str>) -> AuditEntry {
        let mut e = AuditEntry {
            seq,
            at: at.to_owned(),
            request_id: d.request_id,
            caller: d.caller,
            token_id: d.token_id,
            purpose: d.purpose,
            action: d.action,
            subject: d.subject,
            fields: d.fields,
            outcome: if d.code.is_none() { "allowed" } else { "refused" }.into(),
            code: d.code,
            justification: d.justification,
            target_token_id: d.target_token_id,
            node: node.map(str::to_owned),
            prev: prev.to_owned(),
            hash: String::new(),
        };
        e.hash = entry_hash(prev, &e);
        e
    }
}

/// What a caller hands in; the log assigns `seq`, `at` and the chain.
#[derive(Debug, Clone, Default)]
pub struct Draft {
    pub request_id: String,
    pub caller: Option<String>,
    pub token_id: Option<String>,
    pub purpose: Option<String>,
    pub action: String,
    pub subject: Option<String>,
    pub fields: Vec<String>,
    /// `None` for allowed; the refusal code otherwise.
    pub code: Option<String>,
    pub justification: Option<String>,
    pub target_token_id: Option<String>,
}

impl Draft {
    pub fn allowed(&self) -> bool {
        self.code.is_none()
    }
}

fn entry_hash(prev: &str, e: &AuditEntry) -> String {
    use sha2::Digest;
    /// Feeds what serde_json writes straight to the hash, with no copy.
    struct Hashing<'a>(&'a mut sha2::Sha256);
    impl std::io::Write for Hashing<'_> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.update(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut h = sha2::Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    serde_json::to_writer(
        Hashing(&mut h),
        &(
            e.seq,
            &e.at,
            &e.request_id,
            &e.caller,
            &e.token_id,
            &e.purpose,
            &e.action,
            &e.subject,
            &e.fields,
            &e.outcome,
            &e.code,
            &e.justification,
        ),
    )
    .expect("json");
    // Added later: hashed only where present, so older entries still verify.
    if let Some(t) = &e.target_token_id {
        h.update(b"\ntarget_token_id\n");
        h.update(t.as_bytes());
    }
    if let Some(n) = &e.node {
        h.update(b"\nnode\n");
        h.update(n.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Actions whose allowed entries are releases of subject data.
pub fn is_release(action: &str) -> bool {
    matches!(action, "read" | "batch_get" | "lookup")
}

/// Where a node keeps its audit chain, and where the readers find every
/// chain. Cloning shares the stores.
#[derive(Clone)]
pub enum Place {
    /// The node's data directory and, for the anchor, its keys directory (sled).
    Files { data_dir: PathBuf, keys_dir: PathBuf },
    /// The shared data database, one chain per node, and the keys database
    /// for the anchors (postgres).
    Shared { store: Store, keys: KeyStore },
}

impl Place {
    /// Where the configured backend keeps the audit trail, for a vault that
    /// has its stores open.
    pub fn with(cfg: &crate::config::Config, store: &Store, keys: &KeyStore) -> Place {
        match cfg.storage.backend {
            crate::config::Backend::Sled => Place::files(cfg),
            crate::config::Backend::Postgres => Place::Shared {
                store: store.clone(),
                keys: keys.clone(),
            },
        }
    }

    /// The same for the operator's commands, which read while a server may
    /// run: the files as they are (sled's store stays the server's), or the
    /// databases.
    pub fn of(cfg: &crate::config::Config) -> Result<Place> {
        match cfg.storage.backend {
            crate::config::Backend::Sled => Ok(Place::files(cfg)),
            crate::config::Backend::Postgres => Ok(Place::Shared {
                store: Store::open_with(cfg)?,
                keys: KeyStore::open_with(cfg)?,
            }),
        }
    }

    fn files(cfg: &crate::config::Config) -> Place {
        Place::Files {
            data_dir: cfg.data_dir.clone(),
            keys_dir: cfg.keys.dir.clone(),
        }
    }
}

/// Where this node's checkpoints and anchor are kept.
enum Checkpoints {
    File(file::Checkpoints),
    Shared(shared::Checkpoints),
}

pub struct AuditLog {
    committer: Committer,
    checkpoints: Checkpoints,
    /// Set by the file sink when an `fdatasync` failed.
    poisoned: Arc<AtomicBool>,
    fault_file: Option<PathBuf>,
}

impl AuditLog {
    /// Opens this node's chain where `place` keeps it. `chain` names it
    /// among the nodes of a shared store (its node id; unused for files).
    /// `store` is the data store (the access-log index). With `fsync` false
    /// (`audit.fsync`, benchmarks only) file appends are written but not
    /// flushed; a database commit is always durable.
    pub fn open(place: &Place, store: &Store, fsync: bool, chain: &str) -> Result<AuditLog> {
        if !fsync {
            tracing::warn!(
                "audit.fsync = false: benchmark-only: audit entries are not durable (a crash can lose acknowledged entries)"
            );
        }
        let poisoned = Arc::new(AtomicBool::new(false));
        let (committer, checkpoints) = match place {
            Place::Files { data_dir, keys_dir } => {
                let (head, sink, cps) = file::open(data_dir, keys_dir, store, fsync, poisoned.clone())?;
                (Committer::spawn(head, None, sink)?, Checkpoints::File(cps))
            }
            Place::Shared { store, keys } => {
                let (head, sink, cps) = shared::open(store, keys, chain)?;
                (
                    Committer::spawn(head, Some(chain.to_owned()), sink)?,
                    Checkpoints::Shared(cps),
                )
            }
        };
        Ok(AuditLog {
            committer,
            checkpoints,
            poisoned,
            fault_file: crate::faults::armed_path("PDVAULT_FAULT_AUDIT_FILE"),
        })
    }

    /// The chain `chain` in a shared store (unit tests of several chains).
    #[cfg(test)]
    pub fn open_shared(store: &Store, keys: &KeyStore, chain: &str) -> Result<AuditLog> {
        let place = Place::Shared {
            store: store.clone(),
            keys: keys.clone(),
        };
        Self::open(&place, store, true, chain)
    }

    /// Appends entries and returns once they are durable. Any failure fails
    /// closed: the caller must release nothing (`503 audit_unavailable`).
    /// After a failed fsync the log refuses every later append (what the
    /// kernel dropped cannot be known).
    pub async fn append(&self, drafts: Vec<Draft>) -> Result<Vec<AuditEntry>> {
        if self.poisoned.load(Ordering::SeqCst) || self.fault_file.as_ref().is_some_and(|f| f.exists()) {
            return Err(VaultError::AuditUnavailable);
        }
        self.committer.append(drafts).await
    }

    /// The head of this node's chain: (last seq, its hash).
    pub fn head(&self) -> (u64, String) {
        self.committer.head()
    }

    /// The newest signed checkpoint of this node's chain, if any.
    pub fn last_checkpoint(&self) -> Option<Checkpoint> {
        match &self.checkpoints {
            Checkpoints::File(c) => c.last(),
            Checkpoints::Shared(c) => c.last(),
        }
    }

    /// When the last checkpoint was signed (Unix seconds), if any.
    pub fn last_checkpoint_at(&self) -> Option<u64> {
        self.last_checkpoint().and_then(|c| crate::fsutil::parse_rfc3339(&c.at))
    }

    /// Signs the current head, chained to the checkpoint before it, stores
    /// it beside the chain and records it as the anchor with the keys, out of
    /// reach of whoever can write the data. Writes nothing when the last
    /// checkpoint already covers the head.
    pub fn checkpoint(&self, key: &crate::crypto::ReceiptKey) -> Result<Option<Checkpoint>> {
        let (seq, head) = self.head();
        let last = self.last_checkpoint();
        if last.as_ref().is_some_and(|l| l.seq == seq && l.head == head) {
            return Ok(None);
        }
        let at = crate::fsutil::rfc3339(crate::fsutil::now_secs());
        let prev = last.as_ref().map(Checkpoint::id);
        let msg = checkpoint_message(seq, &head, &at, prev.as_deref());
        let cp = Checkpoint {
            seq,
            head,
            at,
            prev,
            signature: b64(&key.sign(&msg)),
        };
        match &self.checkpoints {
            Checkpoints::File(c) => c.write(&cp)?,
            Checkpoints::Shared(c) => c.write(&cp)?,
        }
        Ok(Some(cp))
    }
}

fn b64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A release's key in the access index: subject, audit sequence number, and
/// the chain (node) it is numbered in, where several share the store.
fn access_key(subject: &str, seq: u64, chain: &[u8]) -> Vec<u8> {
    let mut k = subject.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k.extend_from_slice(chain);
    k
}

/// A place in a subject's access log (`next`, given back as `after`): the
/// sequence number of the last entry seen, and its chain on a shared store
/// (`<seq>` or `<seq>.<chain>`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessCursor {
    seq: u64,
    chain: Vec<u8>,
}

impl std::str::FromStr for AccessCursor {
    type Err = VaultError;
    fn from_str(s: &str) -> Result<AccessCursor> {
        let bad = || VaultError::BadRequest("after must be a cursor from next".into());
        let (seq, chain) = match s.split_once('.') {
            Some((_, "")) => return Err(bad()),
            Some(parts) => parts,
            None => (s, ""),
        };
        let chain_ok = chain.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f' | b'-'));
        let digits = !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit());
        match seq.parse::<u64>() {
            Ok(seq) if digits && chain_ok && chain.len() <= 64 => Ok(AccessCursor {
                seq,
                chain: chain.as_bytes().to_vec(),
            }),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for AccessCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match std::str::from_utf8(&self.chain) {
            Ok("") | Err(_) => write!(f, "{}", self.seq),
            Ok(c) => write!(f, "{}.{c}", self.seq),
        }
    }
}

/// One release in the access-log index (compact: this is on the read path).
#[derive(Serialize, Deserialize)]
struct AccessRecord<'a> {
    at: &'a str,
    caller: Option<&'a str>,
    purpose: Option<&'a str>,
    action: &'a str,
    fields: Vec<&'a str>,
    request_id: &'a str,
}

/// The access-log record of an entry, if it is a release of subject data:
/// its key (`chain` names the node's chain on a shared store, else empty)
/// and value.
fn access_record(e: &AuditEntry, chain: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    if e.outcome != "allowed" || !is_release(&e.action) {
        return None;
    }
    let s = e.subject.as_ref()?;
    let r = AccessRecord {
        at: &e.at,
        caller: e.caller.as_deref(),
        purpose: e.purpose.as_deref(),
        action: &e.action,
        fields: e.fields.iter().map(String::as_str).collect(),
        request_id: &e.request_id,
    };
    Some((access_key(s, e.seq, chain), postcard::to_stdvec(&r).expect("postcard")))
}

/// One release of this subject's data (never values).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AccessLogEntry {
    pub seq: u64,
    #[schema(format = DateTime)]
    pub at: String,
    pub caller: Option<String>,
    pub purpose: Option<String>,
    #[schema(example = "read")]
    pub action: String,
    pub fields: Vec<String>,
    pub request_id: String,
}

/// A page of the access log.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AccessLogPage {
    pub id: String,
    pub entries: Vec<AccessLogEntry>,
    /// Cursor for `?after=` of the next page; null on the last page.
    pub next: Option<String>,
}

/// A page of a subject's access log: entries after `after`, at most `limit`,
/// and where the next page starts if there is one.
pub fn access_page(store: &Store, subject: &str, after: &AccessCursor, limit: usize) -> Result<AccessLogPage> {
    // The first key after the cursor's own.
    let mut start = access_key(subject, after.seq, &after.chain);
    start.push(0);
    let mut prefix = subject.as_bytes().to_vec();
    prefix.push(0);
    let mut page = AccessLogPage {
        id: subject.to_owned(),
        entries: Vec::new(),
        next: None,
    };
    let mut last = None;
    for kv in store.scan_from(Space::Access, &prefix, &start) {
        let (k, v) = kv?;
        if page.entries.len() == limit {
            page.next = last.as_ref().map(AccessCursor::to_string);
            return Ok(page);
        }
        let (seq, chain) = k[prefix.len()..].split_at(8);
        let seq = u64::from_be_bytes(seq.try_into().expect("8 bytes"));
        let r: AccessRecord = postcard::from_bytes(&v).map_err(|_| VaultError::internal("corrupt access index"))?;
        page.entries.push(AccessLogEntry {
            seq,
            at: r.at.to_owned(),
            caller: r.caller.map(str::to_owned),
            purpose: r.purpose.map(str::to_owned),
            action: r.action.to_owned(),
            fields: r.fields.into_iter().map(str::to_owned).collect(),
            request_id: r.request_id.to_owned(),
        });
        last = Some(AccessCursor {
            seq,
            chain: chain.to_vec(),
        });
    }
    Ok(page)
}

/// Who received a subject's data, from its access-log index: each caller
/// and the names of the fields it was released.
pub fn received_by(
    store: &Store,
    subject: &str,
) -> Result<std::collections::BTreeMap<String, std::collections::BTreeSet<String>>> {
    let mut p = subject.as_bytes().to_vec();
    p.push(0);
    let mut out: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> = Default::default();
    for kv in store.scan(Space::Access, &p) {
        let (_, v) = kv?;
        let r: AccessRecord = postcard::from_bytes(&v).map_err(|_| VaultError::internal("corrupt access index"))?;
        if let Some(c) = r.caller {
            out.entry(c.to_owned())
                .or_default()
                .extend(r.fields.iter().map(|f| f.to_string()));
        }
    }
    Ok(out)
}

/// Removes a subject's access-log index (the audit log itself keeps its entries).
pub fn forget_subject(store: &Store, c: &mut Commit, subject: &str) -> Result<()> {
    let mut p = subject.as_bytes().to_vec();
    p.push(0);
    for k in store.keys(Space::Access, &p)? {
        c.remove(Space::Access, k);
    }
    Ok(())
}

/// Where a restored data directory's log continues: the backup's chain head.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChainBase {
    pub seq: u64,
    pub hash: String,
    pub backup_created_at: String,
    /// The server's signature of the base (`base_message`), from the backup.
    #[serde(default)]
    pub signature: Option<String>,
}

/// What the server signs about a backup's chain head, so that the base a
/// restored log continues from cannot be edited unnoticed.
pub fn base_message(seq: u64, hash: &str, created_at: &str) -> Vec<u8> {
    format!("pdvault-audit-base-v1\n{seq}\n{hash}\n{created_at}").into_bytes()
}

/// Signs a backup's chain head (the backup header carries it).
pub fn sign_base(key: &crate::crypto::ReceiptKey, seq: u64, hash: &str, created_at: &str) -> String {
    b64(&key.sign(&base_message(seq, hash, created_at)))
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
    pub head: String,
    pub at: String,
    /// The id of the checkpoint before this one (`None` for the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<String>,
    pub signature: String,
}

impl Checkpoint {
    /// Names this checkpoint in the next one's `prev`.
    pub fn id(&self) -> String {
        hex::encode(crate::crypto::sha256(self.signature.as_bytes()))
    }
}

pub fn checkpoint_message(seq: u64, head: &str, at: &str, prev: Option<&str>) -> Vec<u8> {
    match prev {
        None => format!("pdvault-audit-checkpoint-v1\n{seq}\n{head}\n{at}").into_bytes(),
        Some(p) => format!("pdvault-audit-checkpoint-v2\n{seq}\n{head}\n{at}\n{p}").into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An allowed read of `subject`'s surname by the courier.
    fn release(subject: &str) -> Draft {
        Draft {
            request_id: format!("r-{subject}"),
            caller: Some("courier".into()),
            token_id: None,
            purpose: Some("delivery".into()),
            action: "read".into(),
            subject: Some(subject.into()),
            fields: vec!["surname".into()],
            code: None,
            justification: None,
            target_token_id: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_reindex_at_start_does_not_bring_back_an_erased_subjects_access_log() {
        let d = tempfile::tempdir().unwrap();
        let place = Place::Files {
            data_dir: d.path().join("data"),
            keys_dir: d.path().join("keys"),
        };
        std::fs::create_dir_all(d.path().join("keys")).unwrap();
        let store = Store::open(&d.path().join("data")).unwrap();
        let log = AuditLog::open(&place, &store, true, "").unwrap();
        log.append(vec![release("gone"), release("kept")]).await.unwrap();
        assert_eq!(received_by(&store, "gone").unwrap().len(), 1);
        // The erasure marks the subject and removes its index.
        let mut c = Commit::default();
        c.insert(Space::Erased, "gone", b"{}");
        forget_subject(&store, &mut c, "gone").unwrap();
        store.apply(&c).unwrap();
        drop(log);
        // The next start re-indexes every entry since the last start.
        let _log = AuditLog::open(&place, &store, true, "").unwrap();
        assert!(received_by(&store, "gone").unwrap().is_empty());
        assert_eq!(received_by(&store, "kept").unwrap().len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_reindex_at_start_is_on_disk_before_its_mark() {
        let place = |root: &std::path::Path| Place::Files {
            data_dir: root.join("data"),
            keys_dir: root.join("keys"),
        };
        // Each life runs in a directory of its own: a store's last handle
        // may close (and checkpoint) a moment after the drop, from the
        // committer's thread.
        let first = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(first.path().join("keys")).unwrap();
        let lost = tempfile::tempdir().unwrap();
        {
            // The entries' index is deferred, then lost: the store is taken
            // as a crash would leave it.
            let store = Store::open(&first.path().join("data")).unwrap();
            let log = AuditLog::open(&place(first.path()), &store, true, "").unwrap();
            log.append((0..10).map(|n| release(&format!("s{n}"))).collect())
                .await
                .unwrap();
            crate::storage::crash_copy(first.path(), lost.path());
        }
        // This start re-indexes them; a crash right after it (its log
        // synced, the engine as far as it reached the disk) keeps them.
        let after = tempfile::tempdir().unwrap();
        {
            let store = Store::open(&lost.path().join("data")).unwrap();
            let _log = AuditLog::open(&place(lost.path()), &store, true, "").unwrap();
            assert_eq!(received_by(&store, "s3").unwrap().len(), 1);
            store.commit_blocking(&Commit::default()).unwrap();
            crate::storage::crash_copy(lost.path(), after.path());
        }
        let store = Store::open(&after.path().join("data")).unwrap();
        let _log = AuditLog::open(&place(after.path()), &store, true, "").unwrap();
        for n in 0..10 {
            assert_eq!(received_by(&store, &format!("s{n}")).unwrap().len(), 1, "s{n}");
        }
    }

    /// The chain hash of an entry is fixed by the logs already written: a
    /// change to how it is computed must give the same digest, byte for
    /// byte (these were computed by `entry_hash` on 2026-12-07).
    #[test]
    fn entry_hashes_stay_what_written_logs_hold() {
        let d = Draft {
            request_id: "0b6f2c3e-8a1d-4c57-9b7e-2f1e5d4c3b2a".into(),
            caller: Some("courier-a".into()),
            token_id: Some("6f0c".into()),
            purpose: Some("delivery".into()),
            action: "read".into(),
            subject: Some("sub_01".into()),
            fields: vec!["address".into(), "phone".into(), "surname \"q\"\n".into()],
            code: None,
            justification: Some("x".repeat(700)),
            target_token_id: None,
        };
        let e = AuditEntry::chained(7, "2026-12-07T15:00:00.000Z", d.clone(), GENESIS, None);
        assert_eq!(
            e.hash,
            "e95676285fbe53a1529181747b90dc124b8b26053b671833af09d55186dd144e"
        );
        let with_node = AuditEntry::chained(
            8,
            "2026-12-07T15:00:00.001Z",
            Draft {
                code: Some("purpose_not_allowed".into()),
                target_token_id: Some("9a1b".into()),
                justification: None,
                ..d
            },
            &e.hash,
            Some("node-2"),
        );
        assert_eq!(
            with_node.hash,
            "e31fea009fcc8a808b844db9374e2801e4e02a64ba9d908c57b064fa6a1d64b1"
        );
    }

    #[test]
    fn access_cursors_read_back_what_they_print_and_refuse_the_rest() {
        for s in ["0", "17", "17.0b6f2c3e-8a1d-4c57-9b7e-2f1e5d4c3b2a"] {
            assert_eq!(s.parse::<AccessCursor>().unwrap().to_string(), s);
        }
        for s in ["", "-1", "+1", "x", "17.", "17.ABC", "17.zz", "1.2.3"] {
            assert!(s.parse::<AccessCursor>().is_err(), "{s:?} was taken");
        }
    }
}
