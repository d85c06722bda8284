//! The key hierarchy above the data keys, kept in the keys directory.
//!
//! Owns `master.key` (Argon2id parameters and salt, the sealed root secret,
//! the sealed key-encryption key of every live epoch, rotation state) and
//! `receipt.key` (the sealed Ed25519 receipt key and its public half):
//!
//! ```text
//! passphrase --Argon2id--> unseal key --AES-GCM--> KEK (epoch n), root secret, receipt key
//! root secret --HMAC--> index key, pseudonym key, token key
//! ```
//!
//! Destroying an epoch removes its sealed KEK from `master.key` (atomic
//! rewrite); every data key still wrapped only under it becomes noise.
//!
//! Changing the passphrase re-seals the root secret, every KEK and the
//! receipt key under a new salt. `master.key`'s atomic rewrite is the commit
//! point: the new `receipt.key` is written beside it first (`receipt.key.next`)
//! and moved into place after, and `open` finishes (or drops) a move that a
//! crash interrupted, so the two files never disagree on the passphrase.

use crate::crypto::{derive_key, Aead256, ReceiptKey, SecretKey};
use crate::fsutil::{now_secs, write_atomic};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use zeroize::Zeroizing;

pub const MASTER_FILE: &str = "master.key";
pub const RECEIPT_FILE: &str = "receipt.key";
/// The re-sealed `receipt.key` of a passphrase change, until it is moved into place.
const RECEIPT_NEXT: &str = "receipt.key.next";

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("the passphrase does not unseal {0}: wrong passphrase (nothing was changed)")]
    WrongPassphrase(PathBuf),
    #[error("{0} does not exist: run `pdvault init` (or `pdvault serve --dev`) first")]
    Missing(PathBuf),
    #[error("{0} already exists: refusing to overwrite key material")]
    Exists(PathBuf),
    #[error("{path} is malformed: {why}")]
    Malformed { path: PathBuf, why: String },
    #[error("key file I/O on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("argon2: {0}")]
    Kdf(String),
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct KdfParams {
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
}

#[derive(Serialize, Deserialize)]
struct KdfFile {
    alg: String,
    version: u32,
    m_kib: u32,
    t: u32,
    p: u32,
    salt: String,
}

#[derive(Serialize, Deserialize, Clone)]
struct EpochFile {
    epoch: u32,
    created_at: u64,
    retired_at: Option<u64>,
    kek: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotation {
    pub target: u32,
    pub started_at: u64,
}

#[derive(Serialize, Deserialize)]
struct MasterFile {
    format: u32,
    kdf: KdfFile,
    root: String,
    current: u32,
    epochs: Vec<EpochFile>,
    rotation: Option<Rotation>,
    last_rotation_at: u64,
    destroyed: Vec<DestroyedEpoch>,
}

/// A record that an epoch's key was destroyed (no key material).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct DestroyedEpoch {
    pub epoch: u32,
    pub destroyed_at: u64,
}

#[derive(Serialize, Deserialize)]
struct ReceiptFile {
    format: u32,
    alg: String,
    public_key: String,
    sealed_seed: String,
}

#[derive(Clone)]
struct Epoch {
    created_at: u64,
    retired_at: Option<u64>,
    sealed: Vec<u8>,
    kek: Arc<Aead256>,
}

#[derive(Clone)]
struct State {
    current: u32,
    epochs: BTreeMap<u32, Epoch>,
    rotation: Option<Rotation>,
    last_rotation_at: u64,
    destroyed: Vec<DestroyedEpoch>,
}

/// Public facts about the epochs, for receipts and status.
#[derive(Debug, Clone, Serialize)]
pub struct EpochInfo {
    pub epoch: u32,
    pub created_at: u64,
    pub retired_at: Option<u64>,
}

/// The keys derived from the root secret (stable across KEK rotations).
struct Derived {
    index: SecretKey,
    pseudonym: SecretKey,
    token: SecretKey,
    record_mac: SecretKey,
}

impl Derived {
    fn from_root(root: &SecretKey) -> Derived {
        Derived {
            index: derive_key(root, "blind-index").pinned(),
            pseudonym: derive_key(root, "pseudonym").pinned(),
            token: derive_key(root, "token-hash").pinned(),
            record_mac: derive_key(root, "record-mac").pinned(),
        }
    }
}

pub struct Keyring {
    dir: PathBuf,
    kdf_file: (KdfParams, Vec<u8>),
    unseal: SecretKey,
    sealed_root: Vec<u8>,
    derived: Derived,
    receipt: ReceiptKey,
    state: RwLock<State>,
}

fn epoch_aad(epoch: u32) -> Vec<u8> {
    format!("pdvault/keyring/epoch/{epoch}").into_bytes()
}
const ROOT_AAD: &[u8] = b"pdvault/keyring/root";
const RECEIPT_AAD: &[u8] = b"pdvault/keyring/receipt";

fn derive_unseal(passphrase: &[u8], p: KdfParams, salt: &[u8]) -> Result<SecretKey, KeyringError> {
    let params = argon2::Params::new(p.m_kib, p.t, p.p, Some(32)).map_err(|e| KeyringError::Kdf(e.to_string()))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    a.hash_password_into(passphrase, salt, out.as_mut())
        .map_err(|e| KeyringError::Kdf(e.to_string()))?;
    SecretKey::from_bytes(out.as_ref())
        .map(SecretKey::pinned)
        .map_err(|_| KeyringError::Kdf("length".into()))
}

impl Keyring {
    pub fn exists(dir: &Path) -> bool {
        dir.join(MASTER_FILE).exists()
    }

    /// `pdvault init`: new master key material under a passphrase.
    pub fn create(dir: &Path, passphrase: &[u8], kdf: KdfParams) -> Result<Keyring, KeyringError> {
        let master = dir.join(MASTER_FILE);
        let receipt_path = dir.join(RECEIPT_FILE);
        for p in [&master, &receipt_path] {
            if p.exists() {
                return Err(KeyringError::Exists(p.clone()));
            }
        }
        crate::fsutil::create_private_dir(dir).map_err(|source| KeyringError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let salt = crate::crypto::random_bytes::<16>().to_vec();
        let unseal = derive_unseal(passphrase, kdf, &salt)?;
        let root = SecretKey::generate();
        let sealed_root = unseal.aead().seal(root.expose_secret(), ROOT_AAD);
        let kek = SecretKey::generate();
        let sealed_kek = unseal.aead().seal(kek.expose_secret(), &epoch_aad(1));
        let receipt = ReceiptKey::generate();
        let rf = ReceiptFile {
            format: 1,
            alg: "Ed25519".into(),
            public_key: B64.encode(receipt.public_key()),
            sealed_seed: B64.encode(unseal.aead().seal(receipt.expose_seed().as_ref(), RECEIPT_AAD)),
        };
        let now = now_secs();
        let mut epochs = BTreeMap::new();
        epochs.insert(
            1,
            Epoch {
                created_at: now,
                retired_at: None,
                sealed: sealed_kek,
                kek: Arc::new(kek.aead_pinned()),
            },
        );
        let kr = Keyring {
            dir: dir.to_owned(),
            kdf_file: (kdf, salt),
            derived: Derived::from_root(&root),
            unseal,
            sealed_root,
            receipt,
            state: RwLock::new(State {
                current: 1,
                epochs,
                rotation: None,
                last_rotation_at: now,
                destroyed: vec![],
            }),
        };
        write_atomic(&receipt_path, &serde_json::to_vec_pretty(&rf).expect("json")).map_err(|source| {
            KeyringError::Io {
                path: receipt_path.clone(),
                source,
            }
        })?;
        kr.persist()?;
        Ok(kr)
    }

    /// Unseals the key material. Reads only: a wrong passphrase changes nothing.
    pub fn open(dir: &Path, passphrase: &[u8]) -> Result<Keyring, KeyringError> {
        let master = dir.join(MASTER_FILE);
        let malformed = |why: &str| KeyringError::Malformed {
            path: master.clone(),
            why: why.into(),
        };
        let bytes = std::fs::read(&master).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                KeyringError::Missing(master.clone())
            } else {
                KeyringError::Io {
                    path: master.clone(),
                    source: e,
                }
            }
        })?;
        let mf: MasterFile = serde_json::from_slice(&bytes).map_err(|e| malformed(&e.to_string()))?;
        if mf.format != 1 || mf.kdf.alg != "argon2id" || mf.kdf.version != 0x13 {
            return Err(malformed("unsupported format or KDF"));
        }
        let kdf = KdfParams {
            m_kib: mf.kdf.m_kib,
            t: mf.kdf.t,
            p: mf.kdf.p,
        };
        let salt = B64.decode(&mf.kdf.salt).map_err(|_| malformed("salt"))?;
        let unseal = derive_unseal(passphrase, kdf, &salt)?;
        let sealed_root = B64.decode(&mf.root).map_err(|_| malformed("root"))?;
        let root = unseal
            .aead()
            .open(&sealed_root, ROOT_AAD)
            .map_err(|_| KeyringError::WrongPassphrase(master.clone()))?;
        let root = SecretKey::from_bytes(root.expose()).map_err(|_| malformed("root length"))?;
        let mut epochs = BTreeMap::new();
        for e in &mf.epochs {
            let sealed = B64.decode(&e.kek).map_err(|_| malformed("kek"))?;
            let kek = unseal
                .aead()
                .open(&sealed, &epoch_aad(e.epoch))
                .map_err(|_| malformed("a KEK does not open"))?;
            let kek = SecretKey::from_bytes(kek.expose()).map_err(|_| malformed("kek length"))?;
            epochs.insert(
                e.epoch,
                Epoch {
                    created_at: e.created_at,
                    retired_at: e.retired_at,
                    sealed,
                    kek: Arc::new(kek.aead_pinned()),
                },
            );
        }
        if !epochs.contains_key(&mf.current) {
            return Err(malformed("current epoch has no key"));
        }
        let receipt_path = dir.join(RECEIPT_FILE);
        Self::settle_receipt_change(dir, &unseal)?;
        let rbytes = std::fs::read(&receipt_path).map_err(|source| KeyringError::Io {
            path: receipt_path.clone(),
            source,
        })?;
        let rf: ReceiptFile = serde_json::from_slice(&rbytes).map_err(|e| KeyringError::Malformed {
            path: receipt_path.clone(),
            why: e.to_string(),
        })?;
        let sealed_seed = B64.decode(&rf.sealed_seed).map_err(|_| malformed("receipt seed"))?;
        let seed = unseal
            .aead()
            .open(&sealed_seed, RECEIPT_AAD)
            .map_err(|_| KeyringError::WrongPassphrase(receipt_path.clone()))?;
        let receipt = ReceiptKey::from_seed(seed.expose()).map_err(|_| malformed("receipt seed length"))?;
        Ok(Keyring {
            dir: dir.to_owned(),
            kdf_file: (kdf, salt),
            derived: Derived::from_root(&root),
            unseal,
            sealed_root,
            receipt,
            state: RwLock::new(State {
                current: mf.current,
                epochs,
                rotation: mf.rotation,
                last_rotation_at: mf.last_rotation_at,
                destroyed: mf.destroyed,
            }),
        })
    }

    /// A passphrase change that a crash interrupted: `receipt.key.next` that
    /// opens under the unseal key of the committed `master.key` belongs to it
    /// (move it into place); one that does not is from a change that never
    /// committed (remove it).
    fn settle_receipt_change(dir: &Path, unseal: &SecretKey) -> Result<(), KeyringError> {
        let next = dir.join(RECEIPT_NEXT);
        let Ok(bytes) = std::fs::read(&next) else {
            return Ok(());
        };
        let io = |source| KeyringError::Io {
            path: next.clone(),
            source,
        };
        let opens = serde_json::from_slice::<ReceiptFile>(&bytes)
            .ok()
            .and_then(|rf| B64.decode(&rf.sealed_seed).ok())
            .is_some_and(|sealed| unseal.aead().open(&sealed, RECEIPT_AAD).is_ok());
        if opens {
            std::fs::rename(&next, dir.join(RECEIPT_FILE)).map_err(io)?;
        } else {
            std::fs::remove_file(&next).map_err(io)?;
        }
        crate::fsutil::sync_dir(dir).map_err(io)
    }

    /// Re-seals everything under `new_passphrase` (same Argon2id cost, a new
    /// salt). The old passphrase opens these files no more; a copy of the
    /// keys directory made before still opens with it (rotate the KEK and
    /// let the old epochs be destroyed to make such a copy useless).
    pub fn change_passphrase(self, new_passphrase: &[u8]) -> Result<Keyring, KeyringError> {
        let (kdf, _) = self.kdf_file;
        let salt = crate::crypto::random_bytes::<16>().to_vec();
        let unseal = derive_unseal(new_passphrase, kdf, &salt)?;
        let master = self.dir.join(MASTER_FILE);
        let broken = |why: &str| KeyringError::Malformed {
            path: master.clone(),
            why: why.into(),
        };
        let root = self
            .unseal
            .aead()
            .open(&self.sealed_root, ROOT_AAD)
            .map_err(|_| broken("root"))?;
        let sealed_root = unseal.aead().seal(root.expose(), ROOT_AAD);
        let mut st = self.state.read().expect("keyring lock").clone();
        for (n, e) in st.epochs.iter_mut() {
            let kek = self
                .unseal
                .aead()
                .open(&e.sealed, &epoch_aad(*n))
                .map_err(|_| broken("a KEK does not open"))?;
            e.sealed = unseal.aead().seal(kek.expose(), &epoch_aad(*n));
        }
        let rf = ReceiptFile {
            format: 1,
            alg: "Ed25519".into(),
            public_key: B64.encode(self.receipt.public_key()),
            sealed_seed: B64.encode(unseal.aead().seal(self.receipt.expose_seed().as_ref(), RECEIPT_AAD)),
        };
        let next = self.dir.join(RECEIPT_NEXT);
        write_atomic(&next, &serde_json::to_vec_pretty(&rf).expect("json")).map_err(|source| KeyringError::Io {
            path: next.clone(),
            source,
        })?;
        let kr = Keyring {
            dir: self.dir.clone(),
            kdf_file: (kdf, salt),
            unseal,
            sealed_root,
            derived: self.derived,
            receipt: self.receipt,
            state: RwLock::new(st),
        };
        if crate::faults::armed("PDVAULT_FAULT_PASSPHRASE_BEFORE_COMMIT_FILE") {
            return Err(KeyringError::Io {
                path: master,
                source: std::io::Error::other("fault point: stopped before master.key was rewritten"),
            });
        }
        kr.persist()?;
        if crate::faults::armed("PDVAULT_FAULT_PASSPHRASE_AFTER_COMMIT_FILE") {
            return Err(KeyringError::Io {
                path: next,
                source: std::io::Error::other("fault point: stopped before receipt.key was moved"),
            });
        }
        Self::settle_receipt_change(&kr.dir, &kr.unseal)?;
        Ok(kr)
    }

    /// The receipt public key, readable without the passphrase.
    pub fn read_public_key(dir: &Path) -> Result<[u8; 32], KeyringError> {
        let path = dir.join(RECEIPT_FILE);
        let bytes = std::fs::read(&path).map_err(|source| KeyringError::Io {
            path: path.clone(),
            source,
        })?;
        let rf: ReceiptFile = serde_json::from_slice(&bytes).map_err(|e| KeyringError::Malformed {
            path: path.clone(),
            why: e.to_string(),
        })?;
        B64.decode(&rf.public_key)
            .ok()
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .ok_or(KeyringError::Malformed {
                path,
                why: "public key".into(),
            })
    }

    fn persist_locked(&self, st: &State) -> Result<(), KeyringError> {
        let (kdf, salt) = &self.kdf_file;
        let mf = MasterFile {
            format: 1,
            kdf: KdfFile {
                alg: "argon2id".into(),
                version: 0x13,
                m_kib: kdf.m_kib,
                t: kdf.t,
                p: kdf.p,
                salt: B64.encode(salt),
            },
            root: B64.encode(&self.sealed_root),
            current: st.current,
            epochs: st
                .epochs
                .iter()
                .map(|(n, e)| EpochFile {
                    epoch: *n,
                    created_at: e.created_at,
                    retired_at: e.retired_at,
                    kek: B64.encode(&e.sealed),
                })
                .collect(),
            rotation: st.rotation,
            last_rotation_at: st.last_rotation_at,
            destroyed: st.destroyed.clone(),
        };
        let path = self.dir.join(MASTER_FILE);
        if crate::faults::armed("PDVAULT_FAULT_KEYRING_WRITE_FILE") {
            return Err(KeyringError::Io {
                path,
                source: std::io::Error::other("fault point: master.key write fails"),
            });
        }
        write_atomic(&path, &serde_json::to_vec_pretty(&mf).expect("json"))
            .map_err(|source| KeyringError::Io { path, source })
    }

    fn persist(&self) -> Result<(), KeyringError> {
        let st = self.state.read().expect("keyring lock");
        self.persist_locked(&st)
    }

    pub fn current_epoch(&self) -> u32 {
        self.state.read().expect("keyring lock").current
    }

    /// The KEK of an epoch, if it still exists.
    pub fn kek(&self, epoch: u32) -> Option<Arc<Aead256>> {
        self.state
            .read()
            .expect("keyring lock")
            .epochs
            .get(&epoch)
            .map(|e| e.kek.clone())
    }

    /// The current epoch and its KEK, read together.
    pub fn current_kek(&self) -> (u32, Arc<Aead256>) {
        let st = self.state.read().expect("keyring lock");
        (st.current, st.epochs[&st.current].kek.clone())
    }

    pub fn live_epochs(&self) -> Vec<EpochInfo> {
        let st = self.state.read().expect("keyring lock");
        st.epochs
            .iter()
            .map(|(n, e)| EpochInfo {
                epoch: *n,
                created_at: e.created_at,
                retired_at: e.retired_at,
            })
            .collect()
    }

    pub fn rotation(&self) -> Option<Rotation> {
        self.state.read().expect("keyring lock").rotation
    }

    pub fn last_rotation_at(&self) -> u64 {
        self.state.read().expect("keyring lock").last_rotation_at
    }

    /// Writes `next` to `master.key`, then makes it the state in memory:
    /// nothing is used (no key wrapped under a new epoch, no epoch forgotten)
    /// before it is on disk. A failed write changes nothing.
    fn commit(&self, st: &mut State, next: State) -> Result<(), KeyringError> {
        self.persist_locked(&next)?;
        *st = next;
        Ok(())
    }

    /// Starts a rotation (a new epoch becomes current for all new wrapping),
    /// or returns the one already under way so that it can be finished.
    pub fn begin_rotation(&self, now: u64) -> Result<Rotation, KeyringError> {
        let mut st = self.state.write().expect("keyring lock");
        if let Some(r) = st.rotation {
            return Ok(r);
        }
        let target = st
            .epochs
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0)
            .max(st.destroyed.iter().map(|d| d.epoch).max().unwrap_or(0))
            + 1;
        let kek = SecretKey::generate();
        let sealed = self.unseal.aead().seal(kek.expose_secret(), &epoch_aad(target));
        let mut next = st.clone();
        next.epochs.insert(
            target,
            Epoch {
                created_at: now,
                retired_at: None,
                sealed,
                kek: Arc::new(kek.aead_pinned()),
            },
        );
        next.current = target;
        let r = Rotation {
            target,
            started_at: now,
        };
        next.rotation = Some(r);
        self.commit(&mut st, next)?;
        Ok(r)
    }

    /// Every live data key is wrapped under the target: older epochs retire.
    pub fn finish_rotation(&self, now: u64) -> Result<(), KeyringError> {
        let mut st = self.state.write().expect("keyring lock");
        let mut next = st.clone();
        let current = next.current;
        for (n, e) in next.epochs.iter_mut() {
            if *n < current && e.retired_at.is_none() {
                e.retired_at = Some(now);
            }
        }
        next.rotation = None;
        next.last_rotation_at = now;
        self.commit(&mut st, next)
    }

    /// Destroys every retired epoch older than `retention`. Never while a
    /// rotation is under way (its source epoch still wraps live keys).
    pub fn destroy_expired(&self, now: u64, retention: std::time::Duration) -> Result<Vec<u32>, KeyringError> {
        let mut st = self.state.write().expect("keyring lock");
        if st.rotation.is_some() {
            return Ok(vec![]);
        }
        let doomed: Vec<u32> = st
            .epochs
            .iter()
            .filter(|(n, e)| {
                **n != st.current
                    && e.retired_at
                        .is_some_and(|r| r.saturating_add(retention.as_secs()) <= now)
            })
            .map(|(n, _)| *n)
            .collect();
        if doomed.is_empty() {
            return Ok(doomed);
        }
        let mut next = st.clone();
        for n in &doomed {
            next.epochs.remove(n);
            next.destroyed.push(DestroyedEpoch {
                epoch: *n,
                destroyed_at: now,
            });
        }
        self.commit(&mut st, next)?;
        Ok(doomed)
    }

    pub fn index_key(&self) -> &SecretKey {
        &self.derived.index
    }
    pub fn pseudonym_key(&self) -> &SecretKey {
        &self.derived.pseudonym
    }
    pub fn token_key(&self) -> &SecretKey {
        &self.derived.token
    }
    /// Authenticates stored tokens, grants and consents (DESIGN 9).
    pub fn record_mac_key(&self) -> &SecretKey {
        &self.derived.record_mac
    }
    pub fn receipt_key(&self) -> &ReceiptKey {
        &self.receipt
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KDF: KdfParams = KdfParams {
        m_kib: 65536,
        t: 3,
        p: 4,
    };

    #[test]
    fn create_open_wrong_passphrase_and_epochs() {
        let d = tempfile::tempdir().unwrap();
        let k = Keyring::create(d.path(), b"correct horse", KDF).unwrap();
        let pk = k.receipt_key().public_key();
        assert!(matches!(
            Keyring::create(d.path(), b"x", KDF),
            Err(KeyringError::Exists(_))
        ));
        let before = std::fs::read(d.path().join(MASTER_FILE)).unwrap();
        assert!(matches!(
            Keyring::open(d.path(), b"wrong"),
            Err(KeyringError::WrongPassphrase(_))
        ));
        assert_eq!(before, std::fs::read(d.path().join(MASTER_FILE)).unwrap());
        let r = k.begin_rotation(100).unwrap();
        assert_eq!(r.target, 2);
        assert_eq!(k.begin_rotation(101).unwrap(), r, "an unfinished rotation is resumed");
        k.finish_rotation(102).unwrap();
        let k2 = Keyring::open(d.path(), b"correct horse").unwrap();
        assert_eq!(k2.current_epoch(), 2);
        assert!(k2.kek(1).is_some());
        assert_eq!(k2.receipt_key().public_key(), pk);
        assert_eq!(Keyring::read_public_key(d.path()).unwrap(), pk);
        assert_eq!(k2.index_key().expose_secret(), k.index_key().expose_secret());
        assert_eq!(k2.destroy_expired(102, std::time::Duration::ZERO).unwrap(), vec![1]);
        assert!(k2.kek(1).is_none());
        let k3 = Keyring::open(d.path(), b"correct horse").unwrap();
        assert!(k3.kek(1).is_none());
        assert!(k3.kek(2).is_some());
    }
}
