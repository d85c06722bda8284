//! The write-ahead log in front of the embedded engine: what makes a write
//! durable without flushing the engine.
//!
//! Every change (a [`Commit`], an `update`, a `swap`) is appended to the
//! current log segment as one record before the engine applies it, under
//! one lock, so the log holds the engine's changes in the order they were
//! made. A write is durable when [`Logged::flush`] has `fdatasync`ed the
//! segment: that is the store's durability point, in place of the engine's
//! own flush (sled's hands each flush to an IO thread pool and waits; it
//! capped the create rate, README "Benchmarks").
//!
//! When a segment passes [`SEGMENT_BYTES`], the next flush starts a new one
//! and a checkpoint thread flushes the engine, then deletes the segments
//! the engine now holds. At open, the segments still present are applied
//! to the engine in order (a record's changes together, as they were),
//! the engine is flushed and the segments removed. A record that was
//! written but never synced, or torn by a crash, ends the last segment;
//! nothing after it was acknowledged. A bad record anywhere else is
//! corruption and stops the open.
//!
//! Each record carries its log position. The engine applies a unit of
//! work key by key (whole to readers, not to a crash), and keeps an
//! intent that says where it stands in the log ([`give`]): a record of up
//! to [`Positioned::INTENT_MAX`] bytes is stored as the intent before its
//! changes; a larger one (a batch of subjects) is synced in the log before
//! the engine gets any of it, and after its changes the intent becomes its
//! position alone. The engine's files hold a prefix of what it was given,
//! so at open every unit before the intent's is whole in the engine, and
//! only the intent's unit or the large unit after it may be partly there:
//! the open applies the intent's changes again, then the log's records
//! after its position (a partly applied large unit's among them, synced).
//! After a crash of the process that completes the log. After a loss of
//! power the engine may hold units whose records never reached the disk
//! (sled writes between flushes); they were never acknowledged, and
//! replaying older records over them would leave such a unit partly
//! applied (an edit's new index entries beside the record of the version
//! before). Skipping what the intent says the engine holds, and completing
//! its last unit from the intent, keeps each unit whole.
//!
//! Stores written before the intent (2026-12-07) marked each sled batch
//! with its position instead; the open reads those marks too.
//!
//! The key store's log lives beside it in the keys
//! directory: a wrapped key in a segment is covered by the key epochs as
//! any other old copy is (README, "When an erasure becomes final").

use super::{Backend, Commit, Entries, Space, Swap, Update};
use crate::error::{Result, VaultError};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

/// A segment this large starts a checkpoint (and a new segment).
pub(super) const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// Record header: payload length and its CRC-32. The payload starts with
/// the record's position.
const HEADER: usize = 8;

/// What the log needs of its engine beyond [`Backend`] (whose `apply`
/// must be whole to readers): where it keeps the intent.
pub(super) trait Positioned: Backend {
    /// The largest record kept as an intent.
    const INTENT_MAX: usize;
    /// Applies a unit whole to readers (part by part where it is
    /// piecewise), as `Backend::apply` does, without
    /// checking its preconditions: the log has checked them under its lock,
    /// which every write of the store holds, so they still hold.
    fn apply_checked(&self, c: &Commit) -> Result<()>;
    /// Stores the intent, replacing the one before (see [`give`]).
    fn set_intent(&self, record: &[u8]) -> Result<()>;
    /// The intent last stored.
    fn intent(&self) -> Result<Option<Vec<u8>>>;
    /// The position marked in `s` by an older version (0: none).
    fn position(&self, s: Space) -> Result<u64>;
    /// The spaces of this store.
    fn spaces(&self) -> Vec<Space>;
}

pub(super) struct Logged<B: Positioned> {
    inner: Arc<B>,
    dir: PathBuf,
    log: Mutex<Segment>,
    /// Held across a sync and across a rotation with the sync of the old
    /// segment: a flush that finds the new segment current returns only
    /// after the old one, which may hold its caller's record, is synced.
    syncing: Mutex<()>,
    segment_bytes: u64,
    checkpointing: Arc<AtomicBool>,
    checkpoint: Option<mpsc::Sender<u64>>,
    checkpointer: Option<std::thread::JoinHandle<()>>,
}

/// The segment being appended to.
struct Segment {
    file: Arc<File>,
    no: u64,
    len: u64,
    /// The position the next record takes.
    next: u64,
    /// Set when a write could not be cut off, a sync failed or the engine
    /// failed in a unit: from then on the state on disk is unknown (a
    /// restart completes or drops what is half done), and every write is
    /// refused.
    broken: bool,
}

fn segment_path(dir: &Path, no: u64) -> PathBuf {
    dir.join(format!("{no:016}.wal"))
}

fn broken() -> VaultError {
    VaultError::internal("the store's write-ahead log failed earlier; restart the server")
}

impl Segment {
    /// Appends one record at the end, or nothing (a failed write is cut off).
    fn append(&mut self, rec: &[u8]) -> Result<()> {
        if self.broken {
            return Err(broken());
        }
        if let Err(e) = self.file.write_all_at(rec, self.len) {
            if self.file.set_len(self.len).is_err() {
                self.broken = true;
            }
            return Err(e.into());
        }
        self.len += rec.len() as u64;
        Ok(())
    }
}

/// Encodes a unit of work's changes as one log record at `position`.
fn encode<'a>(position: u64, ops: impl Iterator<Item = (Space, &'a [u8], Option<&'a [u8]>)>) -> Vec<u8> {
    let mut r = vec![0u8; HEADER];
    r.extend_from_slice(&position.to_le_bytes());
    for (s, k, v) in ops {
        r.push(s as u8);
        r.push(v.is_some() as u8);
        r.extend_from_slice(&(k.len() as u32).to_le_bytes());
        r.extend_from_slice(k);
        if let Some(v) = v {
            r.extend_from_slice(&(v.len() as u32).to_le_bytes());
            r.extend_from_slice(v);
        }
    }
    let len = (r.len() - HEADER) as u32;
    let crc = crc32fast::hash(&r[HEADER..]);
    r[..4].copy_from_slice(&len.to_le_bytes());
    r[4..HEADER].copy_from_slice(&crc.to_le_bytes());
    r
}

/// The records of a segment, in order, as positions and units of work. Stops at the end,
/// at zeroes, or at the first record that is cut short or fails its CRC:
/// `Err(offset)` says where, when that is not the end of the data.
fn decode(buf: &[u8]) -> (Vec<(u64, Commit)>, std::result::Result<(), usize>) {
    let mut out = vec![];
    let mut at = 0;
    while at + HEADER <= buf.len() {
        let len = u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(buf[at + 4..at + HEADER].try_into().expect("4 bytes"));
        if len == 0 && crc == 0 {
            break;
        }
        let Some(body) = buf.get(at + HEADER..at + HEADER + len) else {
            return (out, Err(at));
        };
        match (crc32fast::hash(body) == crc).then(|| parse(body)).flatten() {
            Some(c) => out.push(c),
            None => return (out, Err(at)),
        }
        at += HEADER + len;
    }
    if buf[at..].iter().any(|b| *b != 0) {
        return (out, Err(at));
    }
    (out, Ok(()))
}

fn parse(mut b: &[u8]) -> Option<(u64, Commit)> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (h, t) = (b.get(..n)?, b.get(n..)?);
        *b = t;
        Some(h)
    }
    fn take_len<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
        let n = u32::from_le_bytes(take(b, 4)?.try_into().ok()?) as usize;
        take(b, n)
    }
    let position = u64::from_le_bytes(take(&mut b, 8)?.try_into().ok()?);
    let mut c = Commit::default();
    while !b.is_empty() {
        let tag = take(&mut b, 2)?;
        let s = Space::from_u8(tag[0])?;
        let k = take_len(&mut b)?;
        match tag[1] {
            0 => c.remove(s, k),
            1 => c.insert(s, k, take_len(&mut b)?),
            _ => return None,
        }
    }
    Some((position, c))
}

impl<B: Positioned> Logged<B> {
    /// Opens the log in `dir` over `inner`: applies what the segments there
    /// hold and the engine does not, flushes the engine, and starts an empty segment.
    pub(super) fn open(inner: B, dir: &Path) -> Result<Logged<B>> {
        Logged::open_sized(inner, dir, SEGMENT_BYTES)
    }

    pub(super) fn open_sized(inner: B, dir: &Path, segment_bytes: u64) -> Result<Logged<B>> {
        crate::fsutil::create_private_dir(dir)?;
        let found = segments(dir)?;
        let mut last = 0;
        for s in inner.spaces() {
            last = last.max(inner.position(s)?);
        }
        if let Some(rec) = inner.intent()? {
            let (unit, end) = decode(&rec);
            let (Ok([(p, c)]), Ok(())) = (<[_; 1]>::try_from(unit), end) else {
                return Err(VaultError::internal("the engine's log intent is corrupt"));
            };
            if p > last {
                inner.apply(&c)?;
                last = p;
            }
        }
        // Every record up to here is whole in the engine.
        let held = last;
        for (i, no) in found.iter().enumerate() {
            let path = segment_path(dir, *no);
            // Synced before the engine gets any of it, as [`give`] requires.
            File::open(&path)?.sync_data()?;
            let buf = std::fs::read(&path)?;
            let (commits, end) = decode(&buf);
            if let Err(at) = end {
                if i + 1 < found.len() {
                    return Err(VaultError::Internal(format!(
                        "{}: corrupt record at byte {at} of a completed segment",
                        path.display()
                    )));
                }
                tracing::warn!(segment = %path.display(), at, "write-ahead log ends in an unsynced or torn record; it was never acknowledged and is dropped");
            }
            for (p, c) in commits.iter().filter(|(p, _)| *p > held) {
                give(&inner, c, *p, &encode(*p, c.ops()))?;
                last = last.max(*p);
            }
        }
        if !found.is_empty() {
            inner.flush()?;
            for no in &found {
                std::fs::remove_file(segment_path(dir, *no))?;
            }
        }
        let no = found.last().map_or(1, |n| n + 1);
        let file = Arc::new(crate::fsutil::create_private(&segment_path(dir, no))?);
        crate::fsutil::sync_dir(dir)?;
        let inner = Arc::new(inner);
        let checkpointing = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<u64>();
        let checkpointer = {
            let (inner, dir, busy) = (inner.clone(), dir.to_path_buf(), checkpointing.clone());
            std::thread::Builder::new()
                .name("wal-checkpoint".into())
                .spawn(move || {
                    while let Ok(upto) = rx.recv() {
                        if let Err(e) = checkpoint(&*inner, &dir, upto) {
                            // The segments stay, and are replayed at the next start.
                            tracing::error!(error = %e, "store checkpoint failed");
                        }
                        busy.store(false, Ordering::Release);
                    }
                })
                .map_err(|e| VaultError::Internal(format!("spawn checkpoint thread: {e}")))?
        };
        Ok(Logged {
            inner,
            dir: dir.to_path_buf(),
            log: Mutex::new(Segment {
                file,
                no,
                len: 0,
                next: last + 1,
                broken: false,
            }),
            syncing: Mutex::new(()),
            segment_bytes,
            checkpointing,
            checkpoint: Some(tx),
            checkpointer: Some(checkpointer),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Segment> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Logs `c` and applies it. The caller holds the lock.
    fn log_and_apply(&self, seg: &mut Segment, c: &Commit) -> Result<()> {
        let rec = encode(seg.next, c.ops());
        seg.append(&rec)?;
        if rec.len() > B::INTENT_MAX {
            // Too large to keep twice: synced before the engine gets any of it.
            if let Err(e) = seg.file.sync_data() {
                seg.broken = true;
                return Err(e.into());
            }
        }
        if let Err(e) = give(&*self.inner, c, seg.next, &rec) {
            // The engine may hold part of the unit; the restart completes it.
            seg.broken = true;
            return Err(e);
        }
        seg.next += 1;
        Ok(())
    }

    /// Starts a new segment, then syncs the one that was current (a failed
    /// sync breaks the log); returns that one's number. The caller holds
    /// `syncing`.
    fn rotate(&self) -> std::io::Result<u64> {
        let (old, old_no) = {
            let mut seg = self.lock();
            let no = seg.no + 1;
            let file = crate::fsutil::create_private(&segment_path(&self.dir, no))?;
            crate::fsutil::sync_dir(&self.dir)?;
            seg.len = 0;
            let old = std::mem::replace(&mut seg.file, Arc::new(file));
            (old, std::mem::replace(&mut seg.no, no))
        };
        old.sync_data().inspect_err(|_| self.lock().broken = true)?;
        Ok(old_no)
    }
}

impl<B: Positioned> Logged<B> {
    /// Starts the next segment and hands the full one to the checkpoint
    /// thread, once the records written to it since the last sync are synced.
    /// The caller holds `syncing`.
    fn start_checkpoint(&self) -> std::io::Result<()> {
        let upto = self.rotate()?;
        self.checkpoint
            .as_ref()
            .and_then(|tx| tx.send(upto).ok())
            .ok_or_else(|| std::io::Error::other("checkpoint thread stopped"))
    }
}

/// A closing store checkpoints everything: the engine flushed, the
/// segments deleted, so the next open has nothing to replay and tools that
/// read the engine's files find every write. Waits for a running checkpoint
/// first, so that the engine is closed when the drop returns.
impl<B: Positioned> Drop for Logged<B> {
    fn drop(&mut self) {
        self.checkpoint.take();
        if let Some(t) = self.checkpointer.take() {
            let _ = t.join();
        }
        let seg = self.log.get_mut().unwrap_or_else(|e| e.into_inner());
        if seg.broken {
            return;
        }
        if let Err(e) = checkpoint(&*self.inner, &self.dir, seg.no) {
            tracing::error!(error = %e, "store checkpoint at close failed; the log is replayed at the next start");
        }
    }
}

/// Gives the engine the unit of work `c`, logged as `rec` at `position`.
/// A record of up to `INTENT_MAX` bytes becomes the intent first, then its
/// changes are applied: if the engine holds any of them after a crash, it
/// holds the intent and the open applies it again. A larger record must be
/// synced in the log already: its changes are applied, then the intent
/// becomes its position alone, and a crash before that leaves the record
/// to the open's replay.
fn give<B: Positioned>(inner: &B, c: &Commit, position: u64, rec: &[u8]) -> Result<()> {
    if rec.len() <= B::INTENT_MAX {
        inner.set_intent(rec)?;
        inner.apply_checked(c)
    } else {
        inner.apply_checked(c)?;
        inner.set_intent(&encode(position, std::iter::empty()))
    }
}

/// The segment numbers present in `dir`, in order.
fn segments(dir: &Path) -> Result<Vec<u64>> {
    let mut v = vec![];
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name();
        if let Some(no) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".wal"))
            .and_then(|n| n.parse().ok())
        {
            v.push(no);
        }
    }
    v.sort_unstable();
    Ok(v)
}

/// Flushes the engine, then deletes the segments up to `upto`: the engine
/// now holds every change they carry.
fn checkpoint<B: Backend>(inner: &B, dir: &Path, upto: u64) -> Result<()> {
    inner.flush()?;
    for no in segments(dir)?.into_iter().filter(|n| *n <= upto) {
        std::fs::remove_file(segment_path(dir, no))?;
    }
    crate::fsutil::sync_dir(dir)?;
    Ok(())
}

impl<B: Positioned> Backend for Logged<B> {
    fn get(&self, s: Space, k: &[u8]) -> Result<Option<Vec<u8>>> {
        self.inner.get(s, k)
    }

    fn scan<'a>(&'a self, s: Space, prefix: &[u8], from: &[u8]) -> Entries<'a> {
        self.inner.scan(s, prefix, from)
    }

    fn count(&self, s: Space) -> Result<u64> {
        self.inner.count(s)
    }

    /// The preconditions are checked under the log's lock, which every
    /// write of this store takes: nothing can change between the check and
    /// the write.
    fn apply(&self, c: &Commit) -> Result<()> {
        let mut seg = self.lock();
        for (s, k, v) in c.expectations() {
            if self.inner.get(s, k)?.as_deref() != v {
                return Err(VaultError::VersionConflict { current: 0 });
            }
        }
        self.log_and_apply(&mut seg, c)
    }

    /// Straight to the engine, neither logged nor under the log's lock: a
    /// batch of the derived index does not hold the store's writers up,
    /// and what a crash takes of it is rebuilt at start.
    fn apply_derived(&self, c: &Commit) -> Result<()> {
        self.inner.apply_derived(c)
    }

    fn update(&self, s: Space, k: &[u8], f: Update<'_>) -> Result<Option<Vec<u8>>> {
        let mut seg = self.lock();
        let old = self.inner.get(s, k)?;
        let mut c = Commit::default();
        match f(old.as_deref()) {
            Some(v) => c.insert(s, k, v),
            None if old.is_some() => c.remove(s, k),
            None => return Ok(None),
        }
        self.log_and_apply(&mut seg, &c)?;
        Ok(old)
    }

    fn swap(&self, s: Space, items: &[Swap]) -> Result<u64> {
        let mut seg = self.lock();
        let mut c = Commit::default();
        let mut n = 0;
        for (k, old, new) in items {
            if self.inner.get(s, k)?.as_deref() == Some(old.as_slice()) {
                c.insert(s, k, new);
                n += 1;
            }
        }
        if n > 0 {
            self.log_and_apply(&mut seg, &c)?;
        }
        Ok(n)
    }

    /// Syncs the current segment; past its size, starts the next one and
    /// hands the full one to the checkpoint thread.
    fn flush(&self) -> std::io::Result<()> {
        let _syncing = self.syncing.lock().unwrap_or_else(|e| e.into_inner());
        let (file, full) = {
            let seg = self.lock();
            if seg.broken {
                return Err(std::io::Error::other("write-ahead log failed earlier"));
            }
            (seg.file.clone(), seg.len >= self.segment_bytes)
        };
        let synced = file.sync_data();
        if synced.is_err() {
            // After a failed fsync the kernel may have dropped the pages:
            // nothing written since the last good sync can be vouched for.
            self.lock().broken = true;
            return synced;
        }
        if full && !self.checkpointing.swap(true, Ordering::AcqRel) {
            let handed = self.start_checkpoint();
            if handed.is_err() {
                self.checkpointing.store(false, Ordering::Release);
            }
            return handed;
        }
        Ok(())
    }

    /// Starts a new segment and moves every earlier one into the engine,
    /// waiting for a checkpoint already running.
    fn checkpoint(&self) -> std::io::Result<()> {
        while self.checkpointing.swap(true, Ordering::AcqRel) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let rotated = {
            let _syncing = self.syncing.lock().unwrap_or_else(|e| e.into_inner());
            self.rotate()
        };
        let done = rotated.and_then(|upto| checkpoint(&*self.inner, &self.dir, upto).map_err(std::io::Error::other));
        self.checkpointing.store(false, Ordering::Release);
        done
    }

    fn shared(&self) -> bool {
        self.inner.shared()
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::sled::Engine;
    use super::*;

    fn open(dir: &Path, segment_bytes: u64) -> Logged<Engine> {
        let e = Engine::open(&dir.join("db"), Space::DATA, 16).unwrap();
        Logged::open_sized(e, &dir.join("db.wal"), segment_bytes).unwrap()
    }

    /// The engine's state as it would be found after a crash that lost
    /// everything it had not flushed: copy its files as of its last flush.
    /// sled keeps nothing on disk between flushes but what it writes on its
    /// own, so a copy taken without flushing stands for a crash.
    pub(crate) fn crash_copy(from: &Path, to: &Path) {
        for entry in walk(from) {
            let rel = entry.strip_prefix(from).unwrap();
            let dst = to.join(rel);
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            std::fs::copy(&entry, &dst).unwrap();
        }
    }

    fn walk(d: &Path) -> Vec<PathBuf> {
        let mut v = vec![];
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                v.extend(walk(&p));
            } else {
                v.push(p);
            }
        }
        v
    }

    /// The state a loss of power leaves: the engine as far as it reached
    /// the disk (here: flushed), the log cut back to its last sync.
    fn power_loss_copy(l: &Logged<Engine>, from: &Path, synced: u64) -> tempfile::TempDir {
        l.inner.flush().unwrap();
        let b = tempfile::tempdir().unwrap();
        crash_copy(from, b.path());
        let wal = b.path().join("db.wal");
        let seg = segments(&wal).unwrap()[0];
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(segment_path(&wal, seg))
            .unwrap();
        f.set_len(synced).unwrap();
        b
    }

    /// Writes `s5` through `r` (opened on `dir`), crashes, and opens again:
    /// the write must be found, not taken for one the engine already held.
    fn after_a_write_and_a_crash(r: Logged<Engine>, dir: &Path) -> Logged<Engine> {
        put(&r, "s5", "w");
        r.flush().unwrap();
        let c = tempfile::tempdir().unwrap();
        crash_copy(dir, c.path());
        drop(r);
        let r2 = open(c.path(), SEGMENT_BYTES);
        assert_eq!(r2.get(Space::Subjects, b"s5").unwrap().as_deref(), Some(&b"w"[..]));
        r2
    }

    fn put(l: &Logged<Engine>, k: &str, v: &str) {
        let mut c = Commit::default();
        c.insert(Space::Subjects, k, v);
        c.insert(Space::Index, format!("ix-{k}"), v);
        l.apply(&c).unwrap();
    }

    #[test]
    fn synced_records_survive_a_crash_and_the_torn_tail_is_dropped() {
        let a = tempfile::tempdir().unwrap();
        let l = open(a.path(), SEGMENT_BYTES);
        put(&l, "s1", "v1");
        put(&l, "s1", "v2");
        put(&l, "s2", "w1");
        l.update(Space::Meta, b"counter", &mut |_| Some(b"7".to_vec())).unwrap();
        l.flush().unwrap();
        let b = tempfile::tempdir().unwrap();
        crash_copy(a.path(), b.path());
        // A record half written when the crash came.
        let seg = segments(&b.path().join("db.wal")).unwrap()[0];
        let path = segment_path(&b.path().join("db.wal"), seg);
        let mut bytes = std::fs::read(&path).unwrap();
        let torn = encode(99, [(Space::Subjects, &b"s3"[..], Some(&b"x"[..]))].into_iter());
        bytes.extend_from_slice(&torn[..torn.len() - 1]);
        std::fs::write(&path, bytes).unwrap();

        let r = open(b.path(), SEGMENT_BYTES);
        assert_eq!(r.get(Space::Subjects, b"s1").unwrap().as_deref(), Some(&b"v2"[..]));
        assert_eq!(r.get(Space::Index, b"ix-s2").unwrap().as_deref(), Some(&b"w1"[..]));
        assert_eq!(r.get(Space::Meta, b"counter").unwrap().as_deref(), Some(&b"7"[..]));
        assert_eq!(r.get(Space::Subjects, b"s3").unwrap(), None);
        // Replayed, flushed into the engine, and the old segments gone.
        assert_eq!(segments(&b.path().join("db.wal")).unwrap(), vec![seg + 1]);
    }

    /// `s1` written and synced; then an edit of `s1` that adds `ix-new`,
    /// given to the engine by `apply`, reaches the engine's disk while its
    /// log record does not (a loss of power). The open must find the edit
    /// whole: the store opened on the copy, and the copy's directory.
    fn edit_beyond_the_log(apply: impl FnOnce(&Logged<Engine>, &Commit)) -> (Logged<Engine>, tempfile::TempDir) {
        let a = tempfile::tempdir().unwrap();
        let l = open(a.path(), SEGMENT_BYTES);
        put(&l, "s1", "v1");
        l.flush().unwrap();
        let synced = l.lock().len;
        let mut c = Commit::default();
        c.insert(Space::Subjects, "s1", "v2");
        c.insert(Space::Index, "ix-new", "v2");
        apply(&l, &c);
        let b = power_loss_copy(&l, a.path(), synced);
        let r = open(b.path(), SEGMENT_BYTES);
        let s1 = r.get(Space::Subjects, b"s1").unwrap();
        let ix = r.get(Space::Index, b"ix-new").unwrap();
        assert_eq!((s1.as_deref(), ix.as_deref()), (Some(&b"v2"[..]), Some(&b"v2"[..])));
        (r, b)
    }

    /// A loss of power can leave the engine holding a unit of work whose
    /// record never reached the disk. The replay of older records must not
    /// be applied over it: the unit comes back whole (here: the newer one,
    /// as the engine has it), and a write after the restart is not taken
    /// for one the engine already holds.
    #[test]
    fn an_engine_ahead_of_the_log_keeps_each_unit_whole() {
        let (r, b) = edit_beyond_the_log(|l, c| l.apply(c).unwrap());
        assert_eq!(r.get(Space::Index, b"ix-s1").unwrap().as_deref(), Some(&b"v1"[..]));
        // The position marks are no entries of their spaces.
        assert_eq!(r.count(Space::Subjects).unwrap(), 1);
        assert_eq!(r.scan(Space::Subjects, b"", b"").count(), 1);
        assert_eq!(r.count(Space::Index).unwrap(), 2);
        after_a_write_and_a_crash(r, b.path());
    }

    /// sled writes between flushes, so a loss of power can leave it
    /// holding part of a unit applied key by key, whose record never
    /// reached the disk: the open completes the unit from its intent.
    #[test]
    fn a_unit_the_engine_holds_part_of_is_completed_from_its_intent() {
        let (r, b) = edit_beyond_the_log(|l, c| {
            // The engine gets the unit's intent and its first change only.
            let p = l.lock().next;
            let mut first = Commit::default();
            first.insert(Space::Subjects, "s1", "v2");
            l.inner.set_intent(&encode(p, c.ops())).unwrap();
            l.inner.apply(&first).unwrap();
        });
        // The next write takes a position after the intent's.
        let r2 = after_a_write_and_a_crash(r, b.path());
        assert_eq!(r2.get(Space::Index, b"ix-new").unwrap().as_deref(), Some(&b"v2"[..]));
    }

    /// A unit too large for an intent is synced in the log before the
    /// engine gets any of it: a crash that leaves the engine holding part
    /// of it is completed by the replay, and once it is whole the intent
    /// carries its position, so that the open does not apply the unit
    /// before it over it.
    #[test]
    fn a_large_unit_is_synced_first_and_marked_after() {
        let a = tempfile::tempdir().unwrap();
        let l = open(a.path(), SEGMENT_BYTES);
        put(&l, "s1", "v1");
        let big = "x".repeat(Engine::INTENT_MAX);
        let mut c = Commit::default();
        c.insert(Space::Subjects, "s1", "v2");
        c.insert(Space::Index, "ix-big", &big);
        // The log gets the record (synced, as `log_and_apply` does), the
        // engine its first change only: then a loss of power.
        {
            let mut seg = l.lock();
            let rec = encode(seg.next, c.ops());
            assert!(rec.len() > Engine::INTENT_MAX);
            seg.append(&rec).unwrap();
            seg.file.sync_data().unwrap();
            seg.next += 1;
        }
        let mut first = Commit::default();
        first.insert(Space::Subjects, "s1", "v2");
        l.inner.apply(&first).unwrap();
        let synced = l.lock().len;
        let b = power_loss_copy(&l, a.path(), synced);
        let r = open(b.path(), SEGMENT_BYTES);
        assert_eq!(r.get(Space::Index, b"ix-big").unwrap().as_deref(), Some(big.as_bytes()));
        assert_eq!(r.get(Space::Subjects, b"s1").unwrap().as_deref(), Some(&b"v2"[..]));
        drop(r);

        // Applied whole through the log: the intent is its position.
        let l2 = open(a.path().join("again").as_path(), SEGMENT_BYTES);
        put(&l2, "s1", "v1");
        let mut c2 = Commit::default();
        c2.insert(Space::Subjects, "s1", "v3");
        c2.insert(Space::Index, "ix-big", &big);
        l2.apply(&c2).unwrap();
        let (unit, _) = decode(&l2.inner.intent().unwrap().unwrap());
        assert_eq!(unit.len(), 1);
        assert_eq!((unit[0].0, unit[0].1.len()), (l2.lock().next - 1, 0));
    }

    #[test]
    fn a_corrupt_completed_segment_stops_the_open() {
        let a = tempfile::tempdir().unwrap();
        let dir = a.path().join("db.wal");
        std::fs::create_dir_all(&dir).unwrap();
        let mut rec = encode(1, [(Space::Subjects, &b"s1"[..], Some(&b"v"[..]))].into_iter());
        let last = rec.len() - 1;
        rec[last] ^= 1;
        std::fs::write(segment_path(&dir, 1), &rec).unwrap();
        std::fs::write(segment_path(&dir, 2), []).unwrap();
        let e = Engine::open(&a.path().join("db"), Space::DATA, 16).unwrap();
        let err = Logged::open_sized(e, &dir, SEGMENT_BYTES).err().expect("refused");
        assert!(err.to_string().contains("corrupt record"), "{err}");
    }

    #[test]
    fn preconditions_are_checked_and_a_refused_commit_is_not_logged() {
        let a = tempfile::tempdir().unwrap();
        let l = open(a.path(), SEGMENT_BYTES);
        put(&l, "s1", "v1");
        let before = l.lock().len;
        let mut c = Commit::default();
        c.expect(Space::Subjects, "s1", Some(b"other"));
        c.insert(Space::Subjects, "s1", "v2");
        assert!(matches!(l.apply(&c), Err(VaultError::VersionConflict { .. })));
        assert_eq!(l.lock().len, before);
        assert_eq!(l.get(Space::Subjects, b"s1").unwrap().as_deref(), Some(&b"v1"[..]));
        let items = vec![
            (b"s1".to_vec(), b"v1".to_vec(), b"v3".to_vec()),
            (b"s9".to_vec(), b"v1".to_vec(), b"v3".to_vec()),
        ];
        assert_eq!(l.swap(Space::Subjects, &items).unwrap(), 1);
        assert_eq!(l.get(Space::Subjects, b"s9").unwrap(), None);
    }

    #[test]
    fn a_checkpoint_moves_full_segments_into_the_engine_and_deletes_them() {
        let a = tempfile::tempdir().unwrap();
        let l = open(a.path(), 1024);
        for i in 0..200 {
            put(&l, &format!("s{i}"), "value-of-some-length");
            l.flush().unwrap();
        }
        let dir = a.path().join("db.wal");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while l.checkpointing.load(Ordering::Acquire) || segments(&dir).unwrap().len() > 1 {
            assert!(std::time::Instant::now() < deadline, "{:?}", segments(&dir));
            // Another flush hands over the segment that filled meanwhile.
            l.flush().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(l.lock().no > 2, "no segment was started");
        let b = tempfile::tempdir().unwrap();
        crash_copy(a.path(), b.path());
        let r = open(b.path(), 1024);
        for i in 0..200 {
            assert!(
                r.get(Space::Subjects, format!("s{i}").as_bytes()).unwrap().is_some(),
                "s{i}"
            );
        }
    }
}
