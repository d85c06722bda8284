//! The backup stream: every backed-up space of a data store, with a SHA-256
//! digest over the whole stream. The same format from every backend, so a
//! backup taken on one restores on the other.
//!
//! `PDVAULT-BACKUP-1\n`, a JSON header line, then records `1, name(u16),
//! key(u32), value(u32)`, a `0` byte, and the digest of all that precedes it.

use super::{Commit, Space, Store};
use crate::error::{Result, VaultError};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};

const MAGIC: &[u8] = b"PDVAULT-BACKUP-1\n";

pub(super) fn write(store: &Store, out: &mut dyn Write, header: &serde_json::Value) -> Result<u64> {
    let mut w = HashingWriter {
        inner: out,
        hash: Sha256::new(),
    };
    w.write_all(MAGIC)?;
    let mut h = serde_json::to_vec(header).expect("json");
    h.push(b'\n');
    w.write_all(&h)?;
    let mut n = 0u64;
    store.scan_snapshot(Space::BACKED_UP, &mut |space, k, v| {
        if n == 0 {
            // Tests: hold the copy once it has begun (its moment is fixed).
            crate::faults::hold("PDVAULT_FAULT_BACKUP_HOLD_FILE");
        }
        let name = space.name();
        w.write_all(&[1u8])?;
        w.write_all(&(name.len() as u16).to_be_bytes())?;
        w.write_all(name.as_bytes())?;
        w.write_all(&(k.len() as u32).to_be_bytes())?;
        w.write_all(k)?;
        w.write_all(&(v.len() as u32).to_be_bytes())?;
        w.write_all(v)?;
        n += 1;
        Ok(())
    })?;
    w.write_all(&[0u8])?;
    let digest = w.hash.finalize();
    w.inner.write_all(&digest)?;
    Ok(n)
}

/// Reads and checks a whole stream; returns its header, the records as one
/// unit of work (applied by the caller only once the digest matched) and
/// their number.
pub(super) fn read(input: &mut dyn Read) -> Result<(serde_json::Value, Commit, u64)> {
    let bad = |why: &str| VaultError::BadRequest(format!("not a pdvault backup: {why}"));
    let mut r = HashingReader {
        inner: input,
        hash: Sha256::new(),
    };
    let mut magic = [0u8; MAGIC.len()];
    r.read_exact(&mut magic).map_err(|_| bad("too short"))?;
    if magic != MAGIC {
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
    let mut c = Commit::default();
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
        let space = Space::from_name(&name)
            .filter(|s| Space::BACKED_UP.contains(s))
            .ok_or_else(|| bad("unknown tree"))?;
        c.insert(space, k, v);
        n += 1;
    }
    let digest = r.hash.finalize();
    let mut stored = [0u8; 32];
    r.inner.read_exact(&mut stored).map_err(|_| bad("missing digest"))?;
    if digest.as_slice() != stored {
        return Err(bad("digest mismatch (corrupt or truncated)"));
    }
    Ok((header, c, n))
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
