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
//! Where several nodes share one keys database (the postgres backend), the
//! epochs live there instead, as one record ([`SharedEpochs`]): every change
//! is a compare-and-swap of that record, a node that meets an epoch it does
//! not know reloads it, and `master.key` keeps only the KDF parameters and
//! the root secret (its epochs are moved out, and removed from the file, at
//! the first start on the database). The record and its KEKs are sealed
//! under the unseal key as they came from the first node's `master.key`,
//! until the first passphrase change seals them under a key derived from
//! the root secret (`SealedUnder::Root`), which every node holds whatever
//! its passphrase: from then on a node's passphrase is its own.
//!
//! Changing the passphrase re-seals the root secret, every KEK kept in
//! `master.key` and the receipt key under a new salt. `master.key`'s atomic rewrite is the commit
//! point: the new `receipt.key` is written beside it first (`receipt.key.next`)
//! and moved into place after, and `open` finishes (or drops) a move that a
//! crash interrupted, so the two files never disagree on the passphrase.

use crate::crypto::{derive_key, Aead256, MacKey, ReceiptKey, SecretKey};
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
    #[error("the key epochs in the keys database: {0}")]
    Shared(String),
    #[error("the key epochs were changed by another node meanwhile; try again")]
    Raced,
    #[error("a rotation to epoch {target} is under way on node {node}")]
    RotationElsewhere { target: u32, node: String },
    #[error(
        "{0} keeps its key epochs in a keys database (storage.backend = \"postgres\"); it cannot serve another backend"
    )]
    EpochsElsewhere(PathBuf),
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

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Rotation {
    pub target: u32,
    pub started_at: u64,
    /// The node running it, where several share the epochs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
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
    /// The epochs are kept in a keys database, not in this file.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    epochs_shared: bool,
}

/// The epochs as kept in a keys database: sealed whole, under the key of
/// its `SealedUnder`.
#[derive(Serialize, Deserialize)]
struct SharedRecord {
    /// Raised by every change: which of two records is newer.
    serial: u64,
    current: u32,
    epochs: Vec<EpochFile>,
    rotation: Option<Rotation>,
    last_rotation_at: u64,
    destroyed: Vec<DestroyedEpoch>,
}

/// The keys database's one record of the epochs, which the keyring loads
/// and replaces whole (the postgres backend; implemented over the key store).
pub trait SharedEpochs: Send + Sync {
    fn load(&self) -> Result<Option<Vec<u8>>, String>;
    /// Replaces the record if it still holds `expected` (`None`: absent);
    /// `false` when another node changed it first.
    fn replace(&self, expected: Option<&[u8]>, new: &[u8]) -> Result<bool, String>;
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

/// The key the epochs' KEKs (and a shared record) are sealed under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SealedUnder {
    /// The unseal key, derived from the passphrase: `master.key`'s epochs,
    /// and a shared record as the first node put it there.
    Passphrase,
    /// A key derived from the root secret: a shared record from its first
    /// passphrase change on.
    Root,
}

#[derive(Clone)]
struct State {
    /// The shared record's serial this state came from (0: the file's).
    serial: u64,
    sealed_under: SealedUnder,
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
    /// `index`, prepared for the blind-index HMAC of every create and lookup.
    index_mac: MacKey,
    pseudonym: SecretKey,
    token: SecretKey,
    record_mac: SecretKey,
    /// Seals a shared record and its KEKs (`SealedUnder::Root`).
    epochs: SecretKey,
}

impl Derived {
    fn from_root(root: &SecretKey) -> Derived {
        let index = derive_key(root, "blind-index").pinned();
        Derived {
            index_mac: MacKey::new(&index),
            index,
            pseudonym: derive_key(root, "pseudonym").pinned(),
            token: derive_key(root, "token-hash").pinned(),
            record_mac: derive_key(root, "record-mac").pinned(),
            epochs: derive_key(root, "shared-epochs").pinned(),
        }
    }
}

/// The shared record as this node last read or wrote it.
type LastRecord = std::sync::Mutex<Option<Vec<u8>>>;

pub struct Keyring {
    dir: PathBuf,
    /// Where the epochs live: `None` in `master.key`, else the keys
    /// database, with the record as last read or written.
    shared: Option<(Box<dyn SharedEpochs>, LastRecord)>,
    /// `master.key` says its epochs are in a keys database.
    file_says_shared: bool,
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
const SHARED_AAD: &[u8] = b"pdvault/keyring/shared-epochs";
const SHARED_ROOT_AAD: &[u8] = b"pdvault/keyring/shared-epochs/root-sealed";
const RECEIPT_AAD: &[u8] = b"pdvault/keyring/receipt";

/// The retired epochs older than `retention`: none while a rotation is
/// under way (its source epoch still wraps live keys).
fn doomed(st: &State, now: u64, retention: std::time::Duration) -> Vec<u32> {
    if st.rotation.is_some() {
        return vec![];
    }
    st.epochs
        .iter()
        .filter(|(n, e)| {
            **n != st.current
                && e.retired_at
                    .is_some_and(|r| r.saturating_add(retention.as_secs()) <= now)
        })
        .map(|(n, _)| *n)
        .collect()
}

/// Unseals the KEK of each epoch listed.
fn open_epochs(unseal: &SecretKey, files: &[EpochFile]) -> Result<BTreeMap<u32, Epoch>, String> {
    let mut epochs = BTreeMap::new();
    for e in files {
        let sealed = B64.decode(&e.kek).map_err(|_| "kek".to_string())?;
        let kek = unseal
            .aead()
            .open(&sealed, &epoch_aad(e.epoch))
            .map_err(|_| "a KEK does not open".to_string())?;
        let kek = SecretKey::from_bytes(kek.expose()).map_err(|_| "kek length".to_string())?;
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
    Ok(epochs)
}

/// The sealed KEKs of a state, as written.
fn epoch_files(st: &State) -> Vec<EpochFile> {
    st.epochs
        .iter()
        .map(|(n, e)| EpochFile {
            epoch: *n,
            created_at: e.created_at,
            retired_at: e.retired_at,
            kek: B64.encode(&e.sealed),
        })
        .collect()
}

/// `st` with every KEK sealed under `to` instead of `from`.
fn resealed(st: &State, from: &SecretKey, to: &SecretKey) -> Result<State, String> {
    let mut next = st.clone();
    for (n, e) in next.epochs.iter_mut() {
        let kek = from
            .aead()
            .open(&e.sealed, &epoch_aad(*n))
            .map_err(|_| "a KEK does not open".to_string())?;
        e.sealed = to.aead().seal(kek.expose(), &epoch_aad(*n));
    }
    Ok(next)
}

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
            shared: None,
            file_says_shared: false,
            kdf_file: (kdf, salt),
            derived: Derived::from_root(&root),
            unseal,
            sealed_root,
            receipt,
            state: RwLock::new(State {
                serial: 0,
                sealed_under: SealedUnder::Passphrase,
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
        let epochs = open_epochs(&unseal, &mf.epochs).map_err(|why| malformed(&why))?;
        if !mf.epochs_shared && !epochs.contains_key(&mf.current) {
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
            shared: None,
            file_says_shared: mf.epochs_shared,
            kdf_file: (kdf, salt),
            derived: Derived::from_root(&root),
            unseal,
            sealed_root,
            receipt,
            state: RwLock::new(State {
                serial: 0,
                sealed_under: SealedUnder::Passphrase,
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
    ///
    /// Where the epochs are in a keys database (`share_epochs` first), they
    /// are not the passphrase's: the record is sealed under the root
    /// secret's key first (once; a compare-and-swap, so `Raced` when another
    /// node changed it meanwhile), and only this node's `master.key` and
    /// `receipt.key` change. The other nodes serve on, under their own
    /// passphrases.
    pub fn change_passphrase(self, new_passphrase: &[u8]) -> Result<Keyring, KeyringError> {
        if self.file_says_shared && self.shared.is_none() {
            return Err(KeyringError::Shared(
                "the epochs are in the keys database: open it before changing the passphrase".into(),
            ));
        }
        if self.shared.is_some() {
            self.seal_epochs_under_root()?;
        }
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
        let st = self.state.read().expect("keyring lock").clone();
        let st = match st.sealed_under {
            SealedUnder::Passphrase => resealed(&st, &self.unseal, &unseal).map_err(|why| broken(&why))?,
            SealedUnder::Root => st,
        };
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
            shared: self.shared,
            file_says_shared: self.file_says_shared,
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
            epochs: epoch_files(st),
            rotation: st.rotation.clone(),
            last_rotation_at: st.last_rotation_at,
            destroyed: st.destroyed.clone(),
            epochs_shared: false,
        };
        let mf = if self.file_says_shared || self.shared.is_some() {
            // Only the KDF and the root: the epochs are the database's.
            MasterFile {
                current: 0,
                epochs: vec![],
                rotation: None,
                last_rotation_at: 0,
                destroyed: vec![],
                epochs_shared: true,
                ..mf
            }
        } else {
            mf
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
    /// Where the epochs are shared, an epoch this node does not know yet
    /// (another node rotated) is looked up in the keys database first.
    pub fn kek(&self, epoch: u32) -> Option<Arc<Aead256>> {
        let known = |st: &State| st.epochs.get(&epoch).map(|e| e.kek.clone());
        let found = known(&self.state.read().expect("keyring lock"));
        if found.is_some() || self.shared.is_none() {
            return found;
        }
        if let Err(e) = self.refresh() {
            tracing::error!(error = %e, "could not read the key epochs from the keys database");
        }
        known(&self.state.read().expect("keyring lock"))
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
        self.state.read().expect("keyring lock").rotation.clone()
    }

    pub fn last_rotation_at(&self) -> u64 {
        self.state.read().expect("keyring lock").last_rotation_at
    }

    /// Writes `next` to `master.key`, then makes it the state in memory:
    /// nothing is used (no key wrapped under a new epoch, no epoch forgotten)
    /// before it is on disk. A failed write changes nothing.
    fn commit(&self, st: &mut State, mut next: State) -> Result<(), KeyringError> {
        match &self.shared {
            None => self.persist_locked(&next)?,
            Some((home, last)) => {
                if crate::faults::armed("PDVAULT_FAULT_KEYRING_WRITE_FILE") {
                    return Err(KeyringError::Shared(
                        "fault point: the epochs record write fails".into(),
                    ));
                }
                let mut last = last.lock().expect("keyring lock");
                next.serial = st.serial + 1;
                let raw = self.seal_shared(&next);
                if !home.replace(last.as_deref(), &raw).map_err(KeyringError::Shared)? {
                    drop(last);
                    // Lost to another node: take what it wrote, and let the
                    // caller decide again from there.
                    self.reload_into(st)?;
                    return Err(KeyringError::Raced);
                }
                *last = Some(raw);
            }
        }
        *st = next;
        Ok(())
    }

    /// The key that seals the KEKs of a state.
    fn sealer(&self, under: SealedUnder) -> &SecretKey {
        match under {
            SealedUnder::Passphrase => &self.unseal,
            SealedUnder::Root => &self.derived.epochs,
        }
    }

    /// Seals the shared record (and its KEKs) under the root secret's key,
    /// if it is not already.
    fn seal_epochs_under_root(&self) -> Result<(), KeyringError> {
        let mut st = self.state.write().expect("keyring lock");
        self.reload_into(&mut st)?;
        if st.sealed_under == SealedUnder::Root {
            return Ok(());
        }
        let mut next = resealed(&st, &self.unseal, &self.derived.epochs).map_err(KeyringError::Shared)?;
        next.sealed_under = SealedUnder::Root;
        self.commit(&mut st, next)
    }

    fn seal_shared(&self, st: &State) -> Vec<u8> {
        let rec = SharedRecord {
            serial: st.serial,
            current: st.current,
            epochs: epoch_files(st),
            rotation: st.rotation.clone(),
            last_rotation_at: st.last_rotation_at,
            destroyed: st.destroyed.clone(),
        };
        let aad = match st.sealed_under {
            SealedUnder::Passphrase => SHARED_AAD,
            SealedUnder::Root => SHARED_ROOT_AAD,
        };
        self.sealer(st.sealed_under)
            .aead()
            .seal(&Zeroizing::new(serde_json::to_vec(&rec).expect("json")), aad)
    }

    fn open_shared(&self, raw: &[u8]) -> Result<State, KeyringError> {
        let bad = |why: &str| KeyringError::Shared(format!("{why} (altered, or sealed under another passphrase)"));
        let (plain, sealed_under) = match self.derived.epochs.aead().open(raw, SHARED_ROOT_AAD) {
            Ok(plain) => (plain, SealedUnder::Root),
            Err(_) => (
                self.unseal
                    .aead()
                    .open(raw, SHARED_AAD)
                    .map_err(|_| bad("the record does not open"))?,
                SealedUnder::Passphrase,
            ),
        };
        let rec: SharedRecord = serde_json::from_slice(plain.expose()).map_err(|_| bad("the record is malformed"))?;
        let epochs = open_epochs(self.sealer(sealed_under), &rec.epochs).map_err(|why| bad(&why))?;
        if !epochs.contains_key(&rec.current) {
            return Err(bad("the current epoch has no key"));
        }
        Ok(State {
            serial: rec.serial,
            sealed_under,
            current: rec.current,
            epochs,
            rotation: rec.rotation,
            last_rotation_at: rec.last_rotation_at,
            destroyed: rec.destroyed,
        })
    }

    /// Reads the shared record into `st` if it changed; whether it did.
    fn reload_into(&self, st: &mut State) -> Result<bool, KeyringError> {
        let Some((home, last)) = &self.shared else {
            return Ok(false);
        };
        let mut last = last.lock().expect("keyring lock");
        let raw = home
            .load()
            .map_err(KeyringError::Shared)?
            .ok_or_else(|| KeyringError::Shared("the record is gone".into()))?;
        if last.as_deref() == Some(raw.as_slice()) {
            return Ok(false);
        }
        let next = self.open_shared(&raw)?;
        if next.serial < st.serial {
            return Err(KeyringError::Shared(format!(
                "the record went back from serial {} to {} (an old copy was put back?)",
                st.serial, next.serial
            )));
        }
        *st = next;
        *last = Some(raw);
        Ok(true)
    }

    /// Takes the epochs from the keys database (another node may have
    /// changed them); whether anything changed. Nothing on a keyring that
    /// keeps its epochs in `master.key`.
    pub fn refresh(&self) -> Result<bool, KeyringError> {
        if self.shared.is_none() {
            return Ok(false);
        }
        let mut st = self.state.write().expect("keyring lock");
        self.reload_into(&mut st)
    }

    /// Moves the epochs to (or takes them from) a keys database that several
    /// nodes share. The first node to start on an empty database puts its
    /// `master.key` epochs there; from then on the database's record is the
    /// only one, and this node's `master.key` is rewritten without epochs.
    pub fn share_epochs(&mut self, home: Box<dyn SharedEpochs>) -> Result<(), KeyringError> {
        let gone = || KeyringError::Shared("the record is gone".into());
        let raw = match home.load().map_err(KeyringError::Shared)? {
            Some(raw) => raw,
            None if self.file_says_shared => {
                return Err(KeyringError::Shared(
                    "the keys database holds no epochs, and this master.key gave its epochs to one: is storage.keys_url the database this keys directory ran with?".into(),
                ))
            }
            None => {
                let mut first = self.state.read().expect("keyring lock").clone();
                first.serial = 1;
                let raw = self.seal_shared(&first);
                if home.replace(None, &raw).map_err(KeyringError::Shared)? {
                    raw
                } else {
                    // Another node was first: its record is the one.
                    home.load().map_err(KeyringError::Shared)?.ok_or_else(gone)?
                }
            }
        };
        *self.state.get_mut().expect("keyring lock") = self.open_shared(&raw)?;
        self.shared = Some((home, std::sync::Mutex::new(Some(raw))));
        if !self.file_says_shared {
            self.persist()?;
            self.file_says_shared = true;
        }
        Ok(())
    }

    /// Refuses a `master.key` whose epochs went to a keys database, for a
    /// backend that keeps them in the file.
    pub fn check_epochs_here(&self) -> Result<(), KeyringError> {
        if self.file_says_shared && self.shared.is_none() {
            return Err(KeyringError::EpochsElsewhere(self.dir.join(MASTER_FILE)));
        }
        Ok(())
    }

    /// The serial of the epochs this keyring uses (0 where they are in the file).
    pub fn epochs_serial(&self) -> u64 {
        self.state.read().expect("keyring lock").serial
    }

    /// Starts a rotation (a new epoch becomes current for all new wrapping),
    /// or returns the one already under way so that it can be finished.
    /// Where several nodes share the epochs, `node` names this one, and a
    /// rotation under way on another node that `serving` says is alive is
    /// not taken over: it is refused.
    pub fn begin_rotation(
        &self,
        now: u64,
        node: Option<&str>,
        serving: &dyn Fn(&str) -> bool,
    ) -> Result<Rotation, KeyringError> {
        let mut st = self.state.write().expect("keyring lock");
        self.reload_into(&mut st)?;
        if let Some(r) = st.rotation.clone() {
            match (r.node.as_deref(), node) {
                (Some(other), Some(me)) if other != me && serving(other) => {
                    return Err(KeyringError::RotationElsewhere {
                        target: r.target,
                        node: other.to_owned(),
                    })
                }
                (owner, me) if owner != me => {
                    // Its node stopped: this one finishes it.
                    let mut next = st.clone();
                    let taken = Rotation {
                        node: me.map(str::to_owned),
                        ..r
                    };
                    next.rotation = Some(taken.clone());
                    self.commit(&mut st, next)?;
                    return Ok(taken);
                }
                _ => return Ok(r),
            }
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
        let sealed = self
            .sealer(st.sealed_under)
            .aead()
            .seal(kek.expose_secret(), &epoch_aad(target));
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
            node: node.map(str::to_owned),
        };
        next.rotation = Some(r.clone());
        self.commit(&mut st, next)?;
        Ok(r)
    }

    /// Every live data key is wrapped under the target: older epochs retire.
    pub fn finish_rotation(&self, now: u64) -> Result<(), KeyringError> {
        let mut st = self.state.write().expect("keyring lock");
        self.reload_into(&mut st)?;
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
        self.reload_into(&mut st)?;
        let doomed = doomed(&st, now, retention);
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

    /// Whether `destroy_expired` would destroy an epoch now.
    pub fn any_expired(&self, now: u64, retention: std::time::Duration) -> bool {
        !doomed(&self.state.read().expect("keyring lock"), now, retention).is_empty()
    }

    pub fn index_key(&self) -> &SecretKey {
        &self.derived.index
    }
    pub fn index_mac(&self) -> &MacKey {
        &self.derived.index_mac
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
        let r = k.begin_rotation(100, None, &|_| false).unwrap();
        assert_eq!(r.target, 2);
        assert_eq!(
            k.begin_rotation(101, None, &|_| false).unwrap(),
            r,
            "an unfinished rotation is resumed"
        );
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

    /// The keys database's record, in memory: what two nodes share.
    #[derive(Clone, Default)]
    struct Record(Arc<std::sync::Mutex<Option<Vec<u8>>>>);

    impl SharedEpochs for Record {
        fn load(&self) -> Result<Option<Vec<u8>>, String> {
            Ok(self.0.lock().unwrap().clone())
        }
        fn replace(&self, expected: Option<&[u8]>, new: &[u8]) -> Result<bool, String> {
            let mut r = self.0.lock().unwrap();
            if r.as_deref() != expected {
                return Ok(false);
            }
            *r = Some(new.to_vec());
            Ok(true)
        }
    }

    const SMALL: KdfParams = KdfParams { m_kib: 8, t: 1, p: 1 };

    /// A keys directory (passphrase "pw") and a copy of it, for two nodes.
    fn two_keys_dirs() -> (tempfile::TempDir, tempfile::TempDir) {
        let d = tempfile::tempdir().unwrap();
        Keyring::create(d.path(), b"pw", SMALL).unwrap();
        let copy = tempfile::tempdir().unwrap();
        for f in [MASTER_FILE, RECEIPT_FILE] {
            std::fs::copy(d.path().join(f), copy.path().join(f)).unwrap();
        }
        (d, copy)
    }

    /// A node's keyring on the shared record `db`.
    fn node(dir: &Path, pass: &[u8], db: &Record) -> Keyring {
        let mut k = Keyring::open(dir, pass).unwrap();
        k.share_epochs(Box::new(db.clone())).unwrap();
        k
    }

    #[test]
    fn two_nodes_share_epochs_through_one_record() {
        let (d, copy) = two_keys_dirs();
        let small = SMALL;
        let db = Record::default();
        let a = node(d.path(), b"pw", &db);
        // master.key keeps no epoch once the database has them.
        let mf: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.path().join(MASTER_FILE)).unwrap()).unwrap();
        assert_eq!(
            (mf["epochs_shared"].as_bool(), mf["epochs"].as_array().map(Vec::len)),
            (Some(true), Some(0))
        );
        assert!(matches!(
            Keyring::open(d.path(), b"pw").unwrap().check_epochs_here(),
            Err(KeyringError::EpochsElsewhere(_))
        ));
        let b = node(copy.path(), b"pw", &db);
        assert_eq!(a.epochs_serial(), b.epochs_serial());

        // A rotates; B opens a key of the new epoch without being told.
        let r = a.begin_rotation(10, Some("a"), &|_| true).unwrap();
        assert_eq!(r.target, 2);
        assert!(b.kek(2).is_some(), "B reloads an epoch it does not know");
        assert_eq!(b.current_epoch(), 2);
        // B may not take over a rotation of a node that serves, may after.
        assert!(matches!(
            b.begin_rotation(11, Some("b"), &|n| n == "a"),
            Err(KeyringError::RotationElsewhere { target: 2, .. })
        ));
        let taken = b.begin_rotation(11, Some("b"), &|_| false).unwrap();
        assert_eq!((taken.target, taken.node.as_deref()), (2, Some("b")));
        // A's view was old: its next change re-reads, and does not undo B's.
        b.finish_rotation(12).unwrap();
        a.finish_rotation(13).unwrap();
        assert_eq!(b.destroy_expired(14, std::time::Duration::ZERO).unwrap(), vec![1]);
        assert!(a.refresh().unwrap());
        assert!(a.kek(1).is_none() && a.kek(2).is_some());
        // A record sealed under another passphrase is refused.
        let other = tempfile::tempdir().unwrap();
        let mut c = Keyring::create(other.path(), b"other", small).unwrap();
        assert!(matches!(c.share_epochs(Box::new(db)), Err(KeyringError::Shared(_))));
    }

    /// On a shared keys database, one node's passphrase changes while the
    /// other serves on: the record is sealed under the root secret's key at
    /// the change, the other node reads it (and rotates under it) with its
    /// old passphrase, and the changed node opens its keys and the record
    /// with the new passphrase only.
    #[test]
    fn one_node_changes_its_passphrase_while_another_shares_the_epochs() {
        let (d, copy) = two_keys_dirs();
        let db = Record::default();
        let a = node(d.path(), b"pw", &db);
        let b = node(copy.path(), b"pw", &db);
        let before = db.load().unwrap().unwrap();
        let pk = a.receipt_key().public_key();
        let kek1 = |k: &Keyring| k.kek(1).unwrap().seal(b"x", b"aad");

        // Without the keys database it is refused, and changes nothing.
        let bare = Keyring::open(d.path(), b"pw").unwrap();
        assert!(matches!(
            bare.change_passphrase(b"new passphrase"),
            Err(KeyringError::Shared(_))
        ));
        assert_eq!(db.load().unwrap().unwrap(), before);

        let _a = a.change_passphrase(b"new passphrase").unwrap();
        assert_ne!(db.load().unwrap().unwrap(), before, "the record is sealed anew");
        assert!(matches!(
            Keyring::open(d.path(), b"pw"),
            Err(KeyringError::WrongPassphrase(_))
        ));
        // B, still under "pw", reads the record and rotates under it.
        let sealed = kek1(&b);
        assert!(b.refresh().unwrap());
        assert_eq!(b.begin_rotation(10, Some("b"), &|_| true).unwrap().target, 2);
        b.finish_rotation(11).unwrap();
        // A, reopened under the new passphrase, has every epoch B knows.
        let a2 = node(d.path(), b"new passphrase", &db);
        assert_eq!(a2.current_epoch(), 2);
        assert_eq!(a2.kek(1).unwrap().open(&sealed, b"aad").unwrap().expose(), b"x");
        assert_eq!(a2.receipt_key().public_key(), pk);
        // B's passphrase may change too; A's does not undo it.
        let b = b.change_passphrase(b"b's own passphrase").unwrap();
        assert!(a2.refresh().is_ok());
        assert_eq!(b.current_epoch(), 2);
        assert!(node(copy.path(), b"b's own passphrase", &db).kek(2).is_some());
    }
}
