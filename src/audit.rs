//! The audit log: every decision, allowed or refused, durable before the
//! response leaves, hash-chained so that a changed, removed or reordered entry
//! is found by `pdvault audit verify`.
//!
//! Owns `<data dir>/audit/audit.log` (JSON lines), `checkpoints.jsonl` (the
//! chain head signed with the receipt key) and the per-subject access-log
//! index in the data store. Entries name who, which fields, which purpose,
//! when and the outcome; never a value, never a token.

use crate::error::{Result, VaultError};
use crate::storage::{Commit, Flusher, Space, Store};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

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
    pub prev: String,
    pub hash: String,
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
    let body = serde_json::to_vec(&(
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
    ))
    .expect("json");
    let mut input = Vec::with_capacity(prev.len() + 1 + body.len());
    input.extend_from_slice(prev.as_bytes());
    input.push(b'\n');
    input.extend_from_slice(&body);
    // Added later: hashed only where present, so older entries still verify.
    if let Some(t) = &e.target_token_id {
        input.extend_from_slice(b"\ntarget_token_id\n");
        input.extend_from_slice(t.as_bytes());
    }
    hex::encode(crate::crypto::sha256(&input))
}

struct Writer {
    file: File,
    seq: u64,
    head: String,
    /// Length of the file up to the last whole entry written.
    len: u64,
    /// A write failed and its partial bytes may still be in the file.
    torn: bool,
}

pub struct AuditLog {
    dir: PathBuf,
    writer: Mutex<Writer>,
    flusher: Flusher,
    /// `audit.fsync`: when false (benchmarks only) appends are written but not flushed.
    fsync: bool,
    poisoned: AtomicBool,
    store: Store,
    /// Which node's chain this is, where several share the store (empty on
    /// a store of its own): keeps the nodes' access-index keys apart.
    chain: Vec<u8>,
    fault_file: Option<PathBuf>,
}

/// Actions whose allowed entries are releases of subject data.
pub fn is_release(action: &str) -> bool {
    matches!(action, "read" | "batch_get" | "lookup")
}

impl AuditLog {
    pub fn log_path(data_dir: &Path) -> PathBuf {
        data_dir.join("audit").join("audit.log")
    }

    /// Opens the log, dropping a torn last line (never acknowledged), and
    /// brings the access-log index up to date. With `fsync` false (config
    /// `audit.fsync`, benchmarks only) appends skip the fdatasync. `chain`
    /// names this node's chain on a store other nodes share (else empty).
    pub fn open(data_dir: &Path, store: &Store, fsync: bool, chain: &str) -> Result<AuditLog> {
        let chain = chain.as_bytes().to_vec();
        let indexed_key = indexed_key(&chain);
        if !fsync {
            tracing::warn!(
                "audit.fsync = false: benchmark-only: audit entries are not durable (a crash can lose acknowledged entries)"
            );
        }
        let dir = data_dir.join("audit");
        crate::fsutil::create_private_dir(&dir)?;
        let path = dir.join("audit.log");
        let mut file = crate::fsutil::open_append_private(&path)?;
        // A restored data directory continues the chain of the backup's log.
        let (mut seq, mut head) = read_base(&dir)
            .map(|b| (b.seq, b.hash))
            .unwrap_or((0, GENESIS.to_string()));
        let mut good_len = 0u64;
        let indexed = store
            .get(Space::Meta, &indexed_key)?
            .map(|b| crate::storage::read_u64(&b))
            .unwrap_or(0);
        {
            let mut r = BufReader::new(File::open(&path)?);
            let mut line = String::new();
            let mut off = 0u64;
            loop {
                line.clear();
                let n = r.read_line(&mut line)?;
                if n == 0 || !line.ends_with('\n') {
                    break;
                }
                let e: AuditEntry = serde_json::from_str(line.trim_end())
                    .map_err(|_| VaultError::Internal(format!("audit log corrupt after seq {seq}")))?;
                if e.seq > indexed {
                    index_entry(store, &e, &chain)?;
                }
                off += n as u64;
                good_len = off;
                seq = e.seq;
                head = e.hash;
            }
        }
        if file.metadata()?.len() != good_len {
            file.set_len(good_len)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::End(0))?;
        store.insert(Space::Meta, &indexed_key, seq.to_be_bytes())?;
        let sync_file = file.try_clone()?;
        let fault_file = if cfg!(debug_assertions) {
            std::env::var_os("PDVAULT_FAULT_AUDIT_FILE").map(PathBuf::from)
        } else {
            None
        };
        Ok(AuditLog {
            dir,
            writer: Mutex::new(Writer {
                file,
                seq,
                head,
                len: good_len,
                torn: false,
            }),
            flusher: Flusher::spawn("audit", move || {
                crate::faults::hold("PDVAULT_FAULT_AUDIT_SYNC_HOLD_FILE");
                sync_file.sync_data()
            }),
            fsync,
            poisoned: AtomicBool::new(false),
            store: store.clone(),
            chain,
            fault_file,
        })
    }

    /// Appends entries and returns once they are on disk. Any failure fails
    /// closed: the caller must release nothing (`503 audit_unavailable`).
    /// A failed write (a full disk) is cut off the file again, and the log
    /// takes appends as soon as space is back; after a failed fsync the log
    /// refuses every later append (what the kernel dropped cannot be known).
    pub async fn append(&self, drafts: Vec<Draft>) -> Result<Vec<AuditEntry>> {
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(VaultError::AuditUnavailable);
        }
        if let Some(f) = &self.fault_file {
            if f.exists() {
                return Err(VaultError::AuditUnavailable);
            }
        }
        let at = crate::fsutil::rfc3339_millis(crate::fsutil::now_millis());
        let entries = {
            let mut w = self.writer.lock().expect("audit lock");
            let mut buf = Vec::with_capacity(drafts.len() * 256);
            let mut entries = Vec::with_capacity(drafts.len());
            let (mut seq, mut head) = (w.seq, w.head.clone());
            for d in drafts {
                seq += 1;
                let mut e = AuditEntry {
                    seq,
                    at: at.clone(),
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
                    prev: head.clone(),
                    hash: String::new(),
                };
                e.hash = entry_hash(&head, &e);
                head = e.hash.clone();
                serde_json::to_writer(&mut buf, &e).expect("json");
                buf.push(b'\n');
                entries.push(e);
            }
            if w.torn {
                // The probe: cut the partial bytes of the failed write.
                let len = w.len;
                if w.file.set_len(len).is_err() {
                    return Err(VaultError::AuditUnavailable);
                }
                w.torn = false;
            }
            if crate::faults::enospc().and_then(|_| w.file.write_all(&buf)).is_err() {
                w.torn = true;
                let len = w.len;
                if w.file.set_len(len).is_ok() {
                    w.torn = false;
                }
                return Err(VaultError::AuditUnavailable);
            }
            w.seq = seq;
            w.head = head;
            w.len += buf.len() as u64;
            entries
        };
        if self.fsync && self.flusher.sync().await.is_err() {
            self.poisoned.store(true, Ordering::SeqCst);
            return Err(VaultError::AuditUnavailable);
        }
        for e in &entries {
            // Derived data: rebuilt from the log at the next start if lost.
            let _ = index_entry(&self.store, e, &self.chain);
        }
        Ok(entries)
    }

    /// The head of the chain: (last seq, its hash).
    pub fn head(&self) -> (u64, String) {
        let w = self.writer.lock().expect("audit lock");
        (w.seq, w.head.clone())
    }

    /// Signs the current head into `checkpoints.jsonl`, chained to the
    /// checkpoint before it, and records it as the anchor in the keys
    /// directory, out of reach of whoever can write the data directory.
    /// Writes nothing when the last checkpoint already covers the head.
    pub fn checkpoint(&self, key: &crate::crypto::ReceiptKey, keys_dir: &Path) -> Result<Option<Checkpoint>> {
        let (seq, head) = self.head();
        let path = self.dir.join(CHECKPOINT_FILE);
        let last = read_checkpoints(&path)?.pop();
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
        let mut f = crate::fsutil::open_append_private(&path)?;
        let mut line = serde_json::to_vec(&cp).expect("json");
        line.push(b'\n');
        f.write_all(&line)?;
        f.sync_data()?;
        crate::fsutil::write_atomic(
            &keys_dir.join(ANCHOR_FILE),
            &serde_json::to_vec_pretty(&cp).expect("json"),
        )?;
        Ok(Some(cp))
    }

    /// When the last checkpoint was signed (Unix seconds), if any.
    /// The newest signed checkpoint, if any.
    pub fn last_checkpoint(&self) -> Option<Checkpoint> {
        read_checkpoints(&self.dir.join(CHECKPOINT_FILE)).ok()?.pop()
    }

    pub fn last_checkpoint_at(&self) -> Option<u64> {
        read_checkpoints(&self.dir.join(CHECKPOINT_FILE))
            .ok()?
            .pop()
            .and_then(|c| crate::fsutil::parse_rfc3339(&c.at))
    }
}

pub const CHECKPOINT_FILE: &str = "checkpoints.jsonl";
/// The last checkpoint, kept in the keys directory.
pub const ANCHOR_FILE: &str = "audit.anchor";

fn b64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// How far the access index has been brought up to date with a chain.
fn indexed_key(chain: &[u8]) -> Vec<u8> {
    [&b"audit_indexed"[..], if chain.is_empty() { b"" } else { b"/" }, chain].concat()
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

fn index_entry(store: &Store, e: &AuditEntry, chain: &[u8]) -> Result<()> {
    if e.outcome == "allowed" && is_release(&e.action) {
        if let Some(s) = &e.subject {
            let r = AccessRecord {
                at: &e.at,
                caller: e.caller.as_deref(),
                purpose: e.purpose.as_deref(),
                action: &e.action,
                fields: e.fields.iter().map(String::as_str).collect(),
                request_id: &e.request_id,
            };
            store.insert(
                Space::Access,
                access_key(s, e.seq, chain),
                postcard::to_stdvec(&r).expect("postcard"),
            )?;
        }
    }
    Ok(())
}

/// A page of a subject's access log: entries after `after`, at most `limit`,
/// and where the next page starts if there is one.
pub fn access_page(
    store: &Store,
    subject: &str,
    after: &AccessCursor,
    limit: usize,
) -> Result<(Vec<serde_json::Value>, Option<AccessCursor>)> {
    // The first key after the cursor's own.
    let mut start = access_key(subject, after.seq, &after.chain);
    start.push(0);
    let mut prefix = subject.as_bytes().to_vec();
    prefix.push(0);
    let mut out = Vec::new();
    let mut last = None;
    for kv in store.scan_from(Space::Access, &prefix, &start) {
        let (k, v) = kv?;
        if out.len() == limit {
            return Ok((out, last));
        }
        let (seq, chain) = k[prefix.len()..].split_at(8);
        let seq = u64::from_be_bytes(seq.try_into().expect("8 bytes"));
        let r: AccessRecord = postcard::from_bytes(&v).map_err(|_| VaultError::internal("corrupt access index"))?;
        out.push(serde_json::json!({
            "seq": seq, "at": r.at, "caller": r.caller, "purpose": r.purpose,
            "action": r.action, "fields": r.fields, "request_id": r.request_id,
        }));
        last = Some(AccessCursor {
            seq,
            chain: chain.to_vec(),
        });
    }
    Ok((out, None))
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

pub const BASE_FILE: &str = "base.json";

fn read_base(audit_dir: &Path) -> Option<ChainBase> {
    serde_json::from_slice(&std::fs::read(audit_dir.join(BASE_FILE)).ok()?).ok()
}

/// `restore`: the new log continues the backup's chain (no seq reused, so the
/// restored access-log index stays consistent).
pub fn write_base(data_dir: &Path, base: &ChainBase) -> Result<()> {
    let dir = data_dir.join("audit");
    crate::fsutil::create_private_dir(&dir)?;
    crate::fsutil::write_atomic(&dir.join(BASE_FILE), &serde_json::to_vec_pretty(base).expect("json"))?;
    Ok(())
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

fn read_checkpoints(path: &Path) -> Result<Vec<Checkpoint>> {
    let Ok(f) = File::open(path) else { return Ok(vec![]) };
    let mut out = vec![];
    for line in BufReader::new(f).lines() {
        let line = line?;
        if let Ok(c) = serde_json::from_str(&line) {
            out.push(c);
        }
    }
    Ok(out)
}

/// The outcome of `pdvault audit verify`.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Intact {
        entries: u64,
        checkpoints: usize,
        /// The last line is incomplete (a crash or a full disk mid-append):
        /// never acknowledged, and dropped by the server at its next start.
        torn_tail: bool,
    },
    /// The first entry (1-based line number and the seq it claims, if any) at
    /// which the chain breaks, and why.
    Broken { line: u64, seq: Option<u64>, why: String },
}

/// Reads the anchor (the last checkpoint) from the keys directory.
pub fn read_anchor(keys_dir: &Path) -> Option<Checkpoint> {
    serde_json::from_slice(&std::fs::read(keys_dir.join(ANCHOR_FILE)).ok()?).ok()
}

/// Checks the whole chain, the signed base a restored log continues from,
/// and every checkpoint: its signature, its link to the one before, and its
/// head against the log. `anchor` is the last checkpoint as recorded in the
/// keys directory: the log and the checkpoint file must both still reach it,
/// so neither a cut tail nor a removed checkpoint goes unnoticed.
pub fn verify(data_dir: &Path, public_key: &[u8; 32], anchor: Option<&Checkpoint>) -> Result<Verdict> {
    verify_reporting(data_dir, public_key, anchor, &mut |_| {})
}

/// `verify`, telling `read(bytes)` of every line it has checked.
pub fn verify_reporting(
    data_dir: &Path,
    public_key: &[u8; 32],
    anchor: Option<&Checkpoint>,
    read: &mut dyn FnMut(u64),
) -> Result<Verdict> {
    use base64::Engine;
    let sig_ok = |msg: &[u8], sig: &str| {
        let sig = base64::engine::general_purpose::STANDARD
            .decode(sig)
            .unwrap_or_default();
        crate::crypto::ed25519_verify(public_key, msg, &sig)
    };
    let broken = |line: u64, seq: Option<u64>, why: &str| {
        Ok(Verdict::Broken {
            line,
            seq,
            why: why.into(),
        })
    };
    let path = AuditLog::log_path(data_dir);
    let f = File::open(&path).map_err(|e| VaultError::Internal(format!("{}: {e}", path.display())))?;
    let base = read_base(&data_dir.join("audit"));
    if let Some(b) = &base {
        let signed = b
            .signature
            .as_deref()
            .is_some_and(|sig| sig_ok(&base_message(b.seq, &b.hash, &b.backup_created_at), sig));
        if !signed {
            return broken(
                0,
                Some(b.seq),
                "audit/base.json is not signed by this vault (altered or forged)",
            );
        }
    }
    let mut prev = base
        .as_ref()
        .map(|b| b.hash.clone())
        .unwrap_or_else(|| GENESIS.to_string());
    let mut expect_seq = base.as_ref().map(|b| b.seq).unwrap_or(0) + 1;
    let first_seq = expect_seq;
    let mut heads = std::collections::HashMap::new();
    if let Some(b) = &base {
        heads.insert(b.seq, b.hash.clone());
    } else {
        heads.insert(0, GENESIS.to_string());
    }
    let mut line_no = 0u64;
    let mut torn_tail = false;
    let mut r = BufReader::new(f);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if r.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        line_no += 1;
        read(buf.len() as u64);
        if buf.last() != Some(&b'\n') {
            torn_tail = true;
            break;
        }
        let e: AuditEntry = match serde_json::from_slice(&buf[..buf.len() - 1]) {
            Ok(e) => e,
            Err(_) => return broken(line_no, None, "not a valid entry"),
        };
        if e.seq != expect_seq {
            return broken(
                line_no,
                Some(e.seq),
                &format!("expected seq {expect_seq} (an entry was removed or reordered)"),
            );
        }
        if e.prev != prev {
            return broken(line_no, Some(e.seq), "prev does not match the hash of the entry before");
        }
        if entry_hash(&prev, &e) != e.hash {
            return broken(line_no, Some(e.seq), "the entry was altered (hash mismatch)");
        }
        prev = e.hash.clone();
        heads.insert(e.seq, e.hash);
        expect_seq += 1;
    }
    let entries = expect_seq - first_seq;
    let cp_path = data_dir.join("audit").join(CHECKPOINT_FILE);
    let cps = read_checkpoints(&cp_path)?;
    if cps.is_empty() && (entries > 0 || base.is_some()) {
        return broken(
            line_no,
            None,
            "no signed checkpoint: audit/checkpoints.jsonl is missing or empty",
        );
    }
    let mut prev_cp: Option<&Checkpoint> = None;
    for c in &cps {
        if !sig_ok(
            &checkpoint_message(c.seq, &c.head, &c.at, c.prev.as_deref()),
            &c.signature,
        ) {
            return broken(c.seq, Some(c.seq), "checkpoint signature does not verify");
        }
        if let (Some(p), Some(link)) = (prev_cp, c.prev.as_ref()) {
            if p.id() != *link {
                return broken(
                    c.seq,
                    Some(c.seq),
                    "a checkpoint before this one was removed or altered",
                );
            }
        }
        match heads.get(&c.seq) {
            Some(h) if *h == c.head => {}
            Some(_) => return broken(c.seq, Some(c.seq), "checkpoint head differs from the log"),
            None => {
                return broken(
                    line_no,
                    Some(c.seq),
                    "log is shorter than a signed checkpoint (truncated)",
                )
            }
        }
        prev_cp = Some(c);
    }
    if let Some(a) = anchor {
        if !cps.iter().any(|c| c == a) {
            return broken(
                line_no,
                Some(a.seq),
                "the last checkpoint recorded in the keys directory is not in checkpoints.jsonl (removed, or the log was replaced)",
            );
        }
    }
    Ok(Verdict::Intact {
        entries,
        checkpoints: cps.len(),
        torn_tail,
    })
}

/// Which entries `pdvault audit export` writes.
#[derive(Debug, Default, Clone)]
pub struct ExportFilter {
    /// Unix seconds: entries at or after.
    pub since: Option<u64>,
    pub subject: Option<String>,
    /// Entries that name this field.
    pub field: Option<String>,
    /// Allowed releases only (reads, batch reads, lookups).
    pub released: bool,
    /// Unix seconds: entries before.
    pub until: Option<u64>,
    /// Entries made with this token (its id).
    pub token: Option<String>,
    /// Entries made by this caller (any of its tokens).
    pub caller: Option<String>,
}

impl ExportFilter {
    pub fn keeps(&self, e: &AuditEntry) -> bool {
        let at = || crate::fsutil::parse_rfc3339(&e.at);
        let early = self.since.is_some_and(|s| at().is_some_and(|t| t < s));
        let late = self.until.is_some_and(|u| at().is_some_and(|t| t >= u));
        let other_subject = self.subject.as_ref().is_some_and(|s| e.subject.as_ref() != Some(s));
        let other_field = self.field.as_ref().is_some_and(|f| !e.fields.contains(f));
        let not_release = self.released && !(e.outcome == "allowed" && is_release(&e.action));
        let other_token = self.token.as_ref().is_some_and(|t| e.token_id.as_ref() != Some(t));
        let other_caller = self.caller.as_ref().is_some_and(|c| e.caller.as_ref() != Some(c));
        !(early || late || other_subject || other_field || not_release || other_token || other_caller)
    }

    /// A cheap test on the raw line before it is parsed: a line that does
    /// not even contain the token id or caller name asked for is skipped.
    fn may_keep(&self, line: &str) -> bool {
        self.token.as_ref().is_none_or(|t| line.contains(t.as_str()))
            && self.caller.as_ref().is_none_or(|c| line.contains(c.as_str()))
    }
}

/// Every entry of the log the filter keeps, in order, with its raw line.
fn scan(data_dir: &Path, filter: &ExportFilter, each: impl FnMut(&str, AuditEntry) -> Result<()>) -> Result<()> {
    scan_where(data_dir, filter, |line| filter.may_keep(line), each)
}

/// `scan`, with the raw-line pre-filter given.
fn scan_where(
    data_dir: &Path,
    filter: &ExportFilter,
    mut may_keep: impl FnMut(&str) -> bool,
    mut each: impl FnMut(&str, AuditEntry) -> Result<()>,
) -> Result<()> {
    let path = AuditLog::log_path(data_dir);
    let f = File::open(&path).map_err(|e| VaultError::Internal(format!("{}: {e}", path.display())))?;
    for line in BufReader::with_capacity(1 << 20, f).lines() {
        let line = line?;
        if !may_keep(&line) {
            continue;
        }
        let Ok(e) = serde_json::from_str::<AuditEntry>(&line) else {
            continue;
        };
        if filter.keeps(&e) {
            each(&line, e)?;
        }
    }
    Ok(())
}

/// Streams the entries the filter keeps, as JSON lines.
pub fn export(data_dir: &Path, filter: &ExportFilter, out: &mut dyn Write) -> Result<u64> {
    let mut n = 0;
    scan(data_dir, filter, |line, _| {
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")?;
        n += 1;
        Ok(())
    })?;
    Ok(n)
}

/// The breach question: which subjects, and which of their fields, a token
/// or a caller received (allowed releases only), how often, first and last.
/// A token's answer includes the tokens minted with it (grants, and for an
/// admin token the tokens it issued), found in the log as it is read: whoever
/// holds the token could have used them too.
#[derive(Debug, Default, Serialize)]
pub struct Impact {
    /// The token asked about and those minted with it (empty for a caller).
    pub tokens: Vec<String>,
    pub releases: u64,
    pub subjects: Vec<SubjectImpact>,
    /// Field name to how many subjects had it released.
    pub fields: BTreeMap<String, u64>,
    pub first: Option<String>,
    pub last: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct SubjectImpact {
    pub subject: String,
    pub fields: Vec<String>,
    pub releases: u64,
    pub first: String,
    pub last: String,
}

/// Answers the breach question over the log: a streaming scan that parses
/// only the lines containing the token id or caller name (0.35-0.5 s over a
/// million entries, `benches/micro.rs` `audit_impact`).
pub fn impact(data_dir: &Path, filter: &ExportFilter) -> Result<Impact> {
    // The token test is made here, over the growing set; the filter keeps
    // the rest (window, caller). Minting entries pass it so that they are seen.
    let tokens = std::cell::RefCell::new(
        filter
            .token
            .iter()
            .cloned()
            .collect::<std::collections::BTreeSet<String>>(),
    );
    let filter = ExportFilter {
        token: None,
        ..filter.clone()
    };
    let following = !tokens.borrow().is_empty();
    let mut by_subject: BTreeMap<String, (std::collections::BTreeSet<String>, u64, String, String)> = BTreeMap::new();
    let mut out = Impact::default();
    let may_keep =
        |line: &str| filter.may_keep(line) && (!following || tokens.borrow().iter().any(|t| line.contains(t.as_str())));
    scan_where(data_dir, &filter, may_keep, |_, e| {
        let ours = !following || e.token_id.as_ref().is_some_and(|t| tokens.borrow().contains(t));
        if !ours || e.outcome != "allowed" {
            return Ok(());
        }
        if let (true, Some(minted)) = (matches!(e.action.as_str(), "grant" | "token_issue"), &e.target_token_id) {
            tokens.borrow_mut().insert(minted.clone());
        }
        if !is_release(&e.action) {
            return Ok(());
        }
        out.releases += 1;
        out.first.get_or_insert_with(|| e.at.clone());
        out.last = Some(e.at.clone());
        if let Some(s) = e.subject {
            let slot = by_subject
                .entry(s)
                .or_insert_with(|| (Default::default(), 0, e.at.clone(), String::new()));
            slot.0.extend(e.fields);
            slot.1 += 1;
            slot.3 = e.at;
        }
        Ok(())
    })?;
    for (subject, (fields, releases, first, last)) in by_subject {
        for f in &fields {
            *out.fields.entry(f.clone()).or_default() += 1;
        }
        out.subjects.push(SubjectImpact {
            subject,
            fields: fields.into_iter().collect(),
            releases,
            first,
            last,
        });
    }
    out.tokens = tokens.into_inner().into_iter().collect();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::AccessCursor;

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
