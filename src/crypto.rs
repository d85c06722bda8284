//! Cryptographic primitives and the secret types that carry key material.
//!
//! Owns: AES-256-GCM sealing with random 96-bit nonces (fields and key
//! wrapping), HMAC-SHA256 (blind index, pseudonyms, token hashes), Ed25519
//! (erasure receipts, audit checkpoints), and the types `DataKey`, `Kek`,
//! `Plaintext`. Does not own where keys live (`keyring`, `keystore`).
//!
//! Secret types implement neither `Debug` nor `Serialize`; their bytes leave
//! only through an explicit `expose_*` method, and they are wiped on drop.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use ed25519_dalek::{Signer, Verifier};
use hmac::{Hmac, Mac};
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use crate::secmem::KeyPage;

/// Length of an AES-GCM nonce, in bytes (96 bits).
pub const NONCE_LEN: usize = 12;
/// Length of an AES-GCM tag, in bytes.
pub const TAG_LEN: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("ciphertext does not authenticate")]
    Open,
    #[error("malformed key material")]
    Malformed,
}

/// Fills a fresh buffer with operating-system randomness.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    OsRng.fill_bytes(&mut b);
    b
}

/// Where a secret lives: on the heap (short-lived: a request's data key), or
/// on a key page of its own, out of core dumps and swap (long-lived: the
/// keyring's keys). Either way behind a pointer, so a move copies no secret.
enum Held<T> {
    Heap(Box<T>),
    Page(KeyPage<T>),
}

impl<T> std::ops::Deref for Held<T> {
    type Target = T;
    fn deref(&self) -> &T {
        match self {
            Held::Heap(b) => b,
            Held::Page(p) => p,
        }
    }
}

impl<T> std::ops::DerefMut for Held<T> {
    fn deref_mut(&mut self) -> &mut T {
        match self {
            Held::Heap(b) => b,
            Held::Page(p) => p,
        }
    }
}

/// A 256-bit symmetric key (a subject's data key, a KEK, an unseal key).
/// Wiped on drop; cannot be printed. Boxed, so that moving the key moves a
/// pointer and leaves no copy of its bytes behind.
pub struct SecretKey(Held<Zeroizing<[u8; 32]>>);

impl SecretKey {
    pub fn generate() -> Self {
        let mut k = Box::new(Zeroizing::new([0u8; 32]));
        OsRng.fill_bytes(k.as_mut().as_mut());
        SecretKey(Held::Heap(k))
    }
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() != 32 {
            return Err(CryptoError::Malformed);
        }
        let mut k = Box::new(Zeroizing::new([0u8; 32]));
        k.copy_from_slice(bytes);
        Ok(SecretKey(Held::Heap(k)))
    }
    /// The same key moved onto a key page (`secmem`): for keys that live as
    /// long as the process. The heap copy is wiped as it is dropped.
    pub fn pinned(self) -> Self {
        let mut page = KeyPage::new(Zeroizing::new([0u8; 32]));
        page.copy_from_slice(self.expose_secret().as_slice());
        SecretKey(Held::Page(page))
    }
    /// The raw key bytes: only for wrapping and key derivation.
    pub fn expose_secret(&self) -> &[u8; 32] {
        &self.0
    }
    /// An AES-256-GCM cipher under this key (its key schedule is wiped on drop).
    pub fn aead(&self) -> Aead256 {
        Aead256::new(self.expose_secret())
    }
    /// An AES-256-GCM cipher whose key schedule lives on a key page.
    pub fn aead_pinned(&self) -> Aead256 {
        Aead256(Held::Page(KeyPage::new(Aes256Gcm::new(self.expose_secret().into()))))
    }
}

/// A subject's data key (DEK): seals that subject's fields.
pub type DataKey = SecretKey;

/// AES-256-GCM with 96-bit nonces and 128-bit tags, the one AEAD of the vault.
/// Its key schedule (the `aes` and `ghash` crates built with `zeroize`) is
/// wiped on drop, and boxed so that it is never copied by a move.
pub struct Aead256(Held<Aes256Gcm>);

impl Aead256 {
    pub fn new(key: &[u8; 32]) -> Self {
        Aead256(Held::Heap(Box::new(Aes256Gcm::new(key.into()))))
    }

    /// Seals under a fresh random nonce; output is `nonce || ciphertext || tag`.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        // ThreadRng is a CSPRNG (ChaCha, reseeded from the OS): a random
        // 96-bit nonce without a getrandom syscall per seal.
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&self.seal_with_nonce(&nonce, plaintext, aad));
        out
    }

    /// Opens `nonce || ciphertext || tag`.
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Plaintext, CryptoError> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(CryptoError::Open);
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        self.open_with_nonce(nonce.try_into().expect("split at NONCE_LEN"), ct, aad)
    }

    /// Seals with a caller-chosen nonce (known-answer tests only: the vault
    /// itself always uses `seal`). Output is `ciphertext || tag`.
    pub fn seal_with_nonce(&self, nonce: &[u8; NONCE_LEN], plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        self.0
            .encrypt(Nonce::from_slice(nonce), Payload { msg: plaintext, aad })
            .expect("AES-GCM encryption of an in-memory buffer cannot fail")
    }

    /// Opens `ciphertext || tag` under the given nonce.
    pub fn open_with_nonce(
        &self,
        nonce: &[u8; NONCE_LEN],
        ct_and_tag: &[u8],
        aad: &[u8],
    ) -> Result<Plaintext, CryptoError> {
        self.0
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct_and_tag, aad })
            .map(|v| Plaintext(Zeroizing::new(v)))
            .map_err(|_| CryptoError::Open)
    }
}

/// Decrypted personal data (or any secret bytes). Wiped on drop, never printed.
pub struct Plaintext(Zeroizing<Vec<u8>>);

// Secret types can be neither printed nor serialised: checked at compile time.
static_assertions::assert_not_impl_any!(SecretKey: std::fmt::Debug, std::fmt::Display, serde::Serialize, Clone);
static_assertions::assert_not_impl_any!(Aead256: std::fmt::Debug, serde::Serialize, Clone);
static_assertions::assert_not_impl_any!(Plaintext: std::fmt::Debug, std::fmt::Display, serde::Serialize, Clone);
static_assertions::assert_not_impl_any!(ReceiptKey: std::fmt::Debug, serde::Serialize, Clone);
static_assertions::assert_not_impl_any!(RecordMac: std::fmt::Debug, serde::Serialize, Clone);
static_assertions::assert_not_impl_any!(crate::tokens::TokenSecret: std::fmt::Debug, std::fmt::Display, serde::Serialize, Clone);

impl Plaintext {
    pub fn new(bytes: Vec<u8>) -> Self {
        Plaintext(Zeroizing::new(bytes))
    }
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
    pub fn into_zeroizing(self) -> Zeroizing<Vec<u8>> {
        self.0
    }
}

type HmacSha256 = Hmac<Sha256>;

/// HMAC-SHA256 of `parts`, each length-prefixed so that no two different part
/// lists produce the same input.
pub fn hmac_parts(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    feed_parts(&mut mac, parts);
    mac.finalize().into_bytes().into()
}

/// Feeds `parts` length-prefixed, gathered into one update where they fit
/// a small buffer (each update has a fixed cost; the buffer is wiped).
fn feed_parts(mac: &mut HmacSha256, parts: &[&[u8]]) {
    let mut buf = Zeroizing::new([0u8; 256]);
    let mut at = 0;
    for p in parts {
        let end = at + 8 + p.len();
        if end > buf.len() {
            mac.update(&buf[..at]);
            mac.update(&(p.len() as u64).to_be_bytes());
            mac.update(p);
            at = 0;
            continue;
        }
        buf[at..at + 8].copy_from_slice(&(p.len() as u64).to_be_bytes());
        buf[at + 8..end].copy_from_slice(p);
        at = end;
    }
    mac.update(&buf[..at]);
}

/// A long-lived HMAC-SHA256 key with its keyed state (the key's inner and
/// outer pads) computed once, on a key page: each MAC then costs its
/// message only. For the keys every request uses (token hashes, blind
/// indexes). Cannot be printed.
pub struct MacKey(KeyPage<HmacSha256>);

impl MacKey {
    pub fn new(key: &SecretKey) -> MacKey {
        let mac = <HmacSha256 as Mac>::new_from_slice(key.expose_secret()).expect("HMAC takes any key length");
        MacKey(KeyPage::new(mac))
    }

    /// The same as `hmac_parts` under this key.
    pub fn parts(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = (*self.0).clone();
        feed_parts(&mut mac, parts);
        mac.finalize().into_bytes().into()
    }
}

/// Plain HMAC-SHA256 (no framing), as specified by RFC 2104.
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

/// Verifies a (possibly truncated, at least 128-bit) HMAC-SHA256 tag in
/// constant time.
pub fn hmac_sha256_verify(key: &[u8], msg: &[u8], tag: &[u8]) -> bool {
    if tag.len() < 16 || tag.len() > 32 {
        return false;
    }
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(msg);
    mac.verify_truncated_left(tag).is_ok()
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Derives a sub-key from a root secret for one named use (HMAC as a PRF).
pub fn derive_key(root: &SecretKey, label: &str) -> SecretKey {
    let mut k = hmac_parts(root.expose_secret(), &[b"pdvault-derive-v1", label.as_bytes()]);
    let key = SecretKey::from_bytes(&k).expect("32 bytes");
    k.zeroize();
    key
}

/// Authenticates records that grant power (tokens, grants, consents) where
/// they are stored: `mac || body`, the MAC over a label, the record's storage
/// key and its body, so that a record is valid only as what and where it was
/// written (DESIGN 9).
pub struct RecordMac(SecretKey);

impl RecordMac {
    pub const LEN: usize = 32;

    pub fn new(key: SecretKey) -> Self {
        RecordMac(key.pinned())
    }

    fn tag(&self, label: &str, key: &[u8], body: &[u8]) -> [u8; 32] {
        hmac_parts(
            self.0.expose_secret(),
            &[b"pdvault-record-v1", label.as_bytes(), key, body],
        )
    }

    /// `mac || body`.
    pub fn seal(&self, label: &str, key: &[u8], body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN + body.len());
        out.extend_from_slice(&self.tag(label, key, body));
        out.extend_from_slice(body);
        out
    }

    /// The body, if the MAC holds.
    pub fn open<'a>(&self, label: &str, key: &[u8], stored: &'a [u8]) -> Option<&'a [u8]> {
        if stored.len() < Self::LEN {
            return None;
        }
        let (mac, body) = stored.split_at(Self::LEN);
        ct_eq(mac, &self.tag(label, key, body)).then_some(body)
    }
}

/// The Ed25519 key that signs erasure receipts and audit checkpoints; on a
/// key page, as it lives as long as the process.
pub struct ReceiptKey(KeyPage<ed25519_dalek::SigningKey>);

impl ReceiptKey {
    pub fn generate() -> Self {
        ReceiptKey(KeyPage::new(ed25519_dalek::SigningKey::generate(&mut OsRng)))
    }
    pub fn from_seed(seed: &[u8]) -> Result<Self, CryptoError> {
        let seed: [u8; 32] = seed.try_into().map_err(|_| CryptoError::Malformed)?;
        let k = ReceiptKey(KeyPage::new(ed25519_dalek::SigningKey::from_bytes(&seed)));
        let mut seed = seed;
        seed.zeroize();
        Ok(k)
    }
    pub fn expose_seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }
    pub fn public_key(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.0.sign(msg).to_bytes()
    }
}

/// Verifies an Ed25519 signature (RFC 8032, strict: rejects non-canonical
/// encodings and small-order keys).
pub fn ed25519_verify(public_key: &[u8], msg: &[u8], signature: &[u8]) -> bool {
    let Ok(pk) = <[u8; 32]>::try_from(public_key) else {
        return false;
    };
    let Ok(sig) = <[u8; 64]>::try_from(signature) else {
        return false;
    };
    let Ok(vk) = ed25519_dalek::VerifyingKey::from_bytes(&pk) else {
        return false;
    };
    let sig = ed25519_dalek::Signature::from_bytes(&sig);
    vk.verify_strict(msg, &sig).is_ok() && vk.verify(msg, &sig).is_ok()
}

/// Constant-time equality of two byte strings.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn round_trip_and_aad_binding() {
        let k = SecretKey::generate().aead();
        let s = k.seal(b"Ivanov", b"subject-1|surname|1");
        assert_eq!(k.open(&s, b"subject-1|surname|1").unwrap().expose(), b"Ivanov");
        assert_eq!(k.open(&s, b"subject-2|surname|1").err(), Some(CryptoError::Open));
        assert_eq!(k.open(&s, b"subject-1|email|1").err(), Some(CryptoError::Open));
        assert_eq!(k.open(&s, b"subject-1|surname|2").err(), Some(CryptoError::Open));
    }

    #[test]
    fn every_flipped_byte_fails() {
        let k = SecretKey::generate().aead();
        let s = k.seal(b"+77015550177", b"aad");
        for i in 0..s.len() {
            let mut t = s.clone();
            t[i] ^= 0x01;
            assert!(k.open(&t, b"aad").is_err(), "byte {i}");
        }
        assert!(k.open(&s[..s.len() - 1], b"aad").is_err());
        assert!(k.open(&[], b"aad").is_err());
    }

    #[test]
    fn other_key_fails() {
        let a = SecretKey::generate().aead();
        let b = SecretKey::generate().aead();
        assert!(b.open(&a.seal(b"x", b""), b"").is_err());
    }

    #[test]
    fn hundred_thousand_nonces_never_repeat() {
        let k = SecretKey::generate().aead();
        let mut seen = HashSet::with_capacity(100_000);
        for _ in 0..100_000 {
            let s = k.seal(b"v", b"a");
            let nonce: [u8; NONCE_LEN] = s[..NONCE_LEN].try_into().unwrap();
            assert!(seen.insert(nonce), "nonce repeated");
        }
    }

    #[test]
    fn hmac_parts_is_unambiguous() {
        let k = [7u8; 32];
        assert_ne!(hmac_parts(&k, &[b"ab", b"c"]), hmac_parts(&k, &[b"a", b"bc"]));
    }

    /// The gathered and the prepared forms give the framed HMAC of RFC 2104,
    /// for parts that fit the buffer and parts that do not.
    #[test]
    fn mac_key_and_hmac_parts_are_the_framed_hmac() {
        let k = SecretKey::from_bytes(&[9u8; 32]).unwrap();
        let long = vec![5u8; 300];
        for parts in [&[&b"pdvault"[..], b"x"][..], &[&b"a"[..], &long, b"tail"][..], &[][..]] {
            let mut framed = vec![];
            for p in parts {
                framed.extend_from_slice(&(p.len() as u64).to_be_bytes());
                framed.extend_from_slice(p);
            }
            let want = hmac_sha256(k.expose_secret(), &framed);
            assert_eq!(hmac_parts(k.expose_secret(), parts), want);
            assert_eq!(MacKey::new(&k).parts(parts), want);
        }
    }

    #[test]
    fn receipt_signature_round_trip() {
        let k = ReceiptKey::generate();
        let sig = k.sign(b"receipt");
        assert!(ed25519_verify(&k.public_key(), b"receipt", &sig));
        assert!(!ed25519_verify(&k.public_key(), b"receipt!", &sig));
        let k2 = ReceiptKey::from_seed(k.expose_seed().as_ref()).unwrap();
        assert_eq!(k2.public_key(), k.public_key());
    }
}
