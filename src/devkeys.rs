//! Development material for `pdvault serve --dev`: whatever is missing in the
//! keys directory is made here (a self-signed TLS certificate and key for
//! `localhost` and `127.0.0.1`, a random `dev-passphrase`). Never used
//! without `--dev`.

use crate::fsutil::{create_private, create_private_dir};
use std::io::Write;
use std::path::Path;

pub const DEV_PASSPHRASE: &str = "dev-passphrase";
pub const ADMIN_TOKEN: &str = "admin.token";

/// Writes a secret file (no trailing newline), owner-only.
pub fn write_secret(path: &Path, text: &str) -> std::io::Result<()> {
    let mut f = create_private(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// Makes `cert` and `key` (PEM) if either is missing. Returns whether it did.
pub fn ensure_tls(cert: &Path, key: &Path) -> Result<bool, String> {
    if cert.exists() && key.exists() {
        return Ok(false);
    }
    for p in [cert, key] {
        if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_private_dir(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
    }
    let mut params = rcgen::CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])
    .map_err(|e| e.to_string())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "pdvault dev (localhost)");
    // No basicConstraints at all: an explicit cA=FALSE is a DEFAULT value,
    // which DER forbids encoding (strict parsers refuse the certificate).
    params.is_ca = rcgen::IsCa::NoCa;
    // Valid from a day ago (clock skew) for one year.
    let now = crate::fsutil::now_secs();
    let (y, m, d) = utc_ymd(now.saturating_sub(86400));
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = utc_ymd(now + 365 * 86400);
    params.not_after = rcgen::date_time_ymd(y, m, d);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let cert_obj = params.self_signed(&kp).map_err(|e| e.to_string())?;
    write_secret(key, &kp.serialize_pem()).map_err(|e| format!("{}: {e}", key.display()))?;
    std::fs::write(cert, cert_obj.pem()).map_err(|e| format!("{}: {e}", cert.display()))?;
    Ok(true)
}

/// The UTC calendar day (year, month, day) of a Unix time.
fn utc_ymd(secs: u64) -> (i32, u8, u8) {
    let day = crate::fsutil::rfc3339(secs);
    let num = |r: std::ops::Range<usize>| day[r].parse::<i32>().expect("RFC 3339 digits");
    (num(0..4), num(5..7) as u8, num(8..10) as u8)
}

/// A random dev passphrase (only ever written to `keys/dev-passphrase`).
pub fn random_passphrase() -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(crate::crypto::random_bytes::<24>())
}
