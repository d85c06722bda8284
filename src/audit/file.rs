//! The audit trail of a node with a store of its own (sled): one chain in
//! `<data dir>/audit/audit.log` (JSON lines), its signed checkpoints in
//! `checkpoints.jsonl`, the base a restored log continues from in
//! `base.json`, and the last checkpoint (the anchor) in the keys directory.
//!
//! The committer hands each group of entries to [`FileSink`]: one `write` of
//! all their lines, one `fdatasync`, then their access-log records in one
//! batch of the data store (derived data, rebuilt from the log at the next
//! start if lost).

use super::*;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::sync::Arc;

pub const CHECKPOINT_FILE: &str = "checkpoints.jsonl";
/// The last checkpoint, kept in the keys directory.
pub const ANCHOR_FILE: &str = "audit.anchor";
pub const BASE_FILE: &str = "base.json";

pub fn log_path(data_dir: &Path) -> PathBuf {
    data_dir.join("audit").join("audit.log")
}

/// Makes a group durable in the log file.
pub(super) struct FileSink {
    file: File,
    /// Length of the file up to the last whole entry written.
    len: u64,
    /// A write failed and its partial bytes may still be in the file.
    torn: bool,
    /// `audit.fsync` (false: benchmarks only).
    fsync: bool,
    /// Set when an `fdatasync` failed: what the kernel dropped cannot be
    /// known, so the log takes no entry until restart.
    poisoned: Arc<AtomicBool>,
    store: Store,
}

impl Sink for FileSink {
    fn commit(&mut self, _before: &(u64, String), entries: &[AuditEntry]) -> Result<()> {
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(VaultError::AuditUnavailable);
        }
        let mut buf = Vec::with_capacity(entries.len() * 400);
        for e in entries {
            serde_json::to_writer(&mut buf, e).expect("json");
            buf.push(b'\n');
        }
        if self.torn {
            // The probe: cut the partial bytes of the failed write.
            if self.file.set_len(self.len).is_err() {
                return Err(VaultError::AuditUnavailable);
            }
            self.torn = false;
        }
        // A failed write (a full disk) is cut off the file again, and the
        // log takes entries as soon as space is back.
        if let Err(e) = crate::faults::enospc().and_then(|_| self.file.write_all(&buf)) {
            tracing::error!(error = %e, "audit log write failed; nothing of this group was released");
            self.torn = self.file.set_len(self.len).is_err();
            return Err(VaultError::AuditUnavailable);
        }
        self.len += buf.len() as u64;
        if self.fsync {
            crate::faults::hold("PDVAULT_FAULT_AUDIT_SYNC_HOLD_FILE");
            if let Err(e) = self.file.sync_data() {
                tracing::error!(error = %e, "audit log fdatasync failed; the log takes no entry until restart");
                self.poisoned.store(true, Ordering::SeqCst);
                return Err(VaultError::AuditUnavailable);
            }
        }
        let mut c = Commit::default();
        for e in entries {
            if let Some((k, v)) = access_record(e, b"") {
                c.insert(Space::Access, k, v);
            }
        }
        // Derived from the log, which is durable now: the index's writes
        // go in batches (`Store::defer`), rebuilt from the log after a crash.
        self.store.defer(c);
        Ok(())
    }
}

/// The log's checkpoints and anchor.
pub(super) struct Checkpoints {
    dir: PathBuf,
    keys_dir: PathBuf,
}

/// Opens the log, dropping a torn last line (never acknowledged), and brings
/// the access-log index up to date. Returns the chain's head, the sink for
/// its committer and its checkpoints.
pub(super) fn open(
    data_dir: &Path,
    keys_dir: &Path,
    store: &Store,
    fsync: bool,
    poisoned: Arc<AtomicBool>,
) -> Result<((u64, String), FileSink, Checkpoints)> {
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
        .get(Space::Meta, INDEXED)?
        .map(|b| crate::storage::read_u64(&b))
        .unwrap_or(0);
    let mut reindex = Commit::default();
    let mut reindexed = false;
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
                // An erased subject's index went with its data at the
                // erasure; it does not come back.
                let erased = match &e.subject {
                    Some(s) => store.contains(Space::Erased, s)?,
                    None => false,
                };
                if let (false, Some((k, v))) = (erased, access_record(&e, b"")) {
                    reindex.insert(Space::Access, k, v);
                }
                // Derived writes, given to the engine in batches beside the
                // log (no log record, no sync each).
                if reindex.len() >= crate::storage::DERIVED_BATCH {
                    reindexed = true;
                    store.defer(std::mem::take(&mut reindex));
                }
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
    if reindexed || !reindex.is_empty() {
        store.defer(reindex);
        // The mark may only outlive a crash that the entries it covers
        // outlive too: the engine's files hold them before it is written.
        store.checkpoint()?;
    }
    store.insert(Space::Meta, INDEXED, seq.to_be_bytes())?;
    let sink = FileSink {
        file,
        len: good_len,
        torn: false,
        fsync,
        poisoned,
        store: store.clone(),
    };
    let checkpoints = Checkpoints {
        dir,
        keys_dir: keys_dir.to_owned(),
    };
    Ok(((seq, head), sink, checkpoints))
}

impl Checkpoints {
    pub(super) fn last(&self) -> Option<Checkpoint> {
        read_checkpoints(&self.dir.join(CHECKPOINT_FILE)).ok()?.pop()
    }

    /// Appends a checkpoint to `checkpoints.jsonl` and records it as the
    /// anchor in the keys directory.
    pub(super) fn write(&self, cp: &Checkpoint) -> Result<()> {
        let mut f = crate::fsutil::open_append_private(&self.dir.join(CHECKPOINT_FILE))?;
        let mut line = serde_json::to_vec(cp).expect("json");
        line.push(b'\n');
        f.write_all(&line)?;
        f.sync_data()?;
        crate::fsutil::write_atomic(
            &self.keys_dir.join(ANCHOR_FILE),
            &serde_json::to_vec_pretty(cp).expect("json"),
        )?;
        Ok(())
    }
}

/// How far the access index has been brought up to date with the log.
const INDEXED: &str = "audit_indexed";

pub(super) fn read_base(audit_dir: &Path) -> Option<ChainBase> {
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

pub(super) fn read_checkpoints(path: &Path) -> Result<Vec<Checkpoint>> {
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

/// Reads the anchor (the last checkpoint) from the keys directory.
pub fn read_anchor(keys_dir: &Path) -> Option<Checkpoint> {
    serde_json::from_slice(&std::fs::read(keys_dir.join(ANCHOR_FILE)).ok()?).ok()
}

/// The log's lines, each with its newline (a last line without one is torn).
pub(super) fn lines(data_dir: &Path) -> Result<Lines<'static>> {
    let path = log_path(data_dir);
    let f = File::open(&path).map_err(|e| VaultError::Internal(format!("{}: {e}", path.display())))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    Ok(Box::new(std::iter::from_fn(move || {
        let mut buf = Vec::new();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) => None,
            Ok(_) => Some(Ok(buf)),
            Err(e) => Some(Err(e.into())),
        }
    })))
}

/// This node's chain, as `verify` reads it.
pub(super) fn chain(data_dir: &Path, keys_dir: &Path) -> Result<Chain<'static>> {
    let dir = data_dir.join("audit");
    Ok(Chain {
        node: None,
        lines: lines(data_dir)?,
        base: read_base(&dir),
        checkpoints: read_checkpoints(&dir.join(CHECKPOINT_FILE))?,
        anchor: read_anchor(keys_dir),
        names: Names {
            base: "audit/base.json",
            checkpoints: "audit/checkpoints.jsonl",
            anchor: "the keys directory",
        },
    })
}
