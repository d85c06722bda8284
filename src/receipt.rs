//! Erasure receipts: the signed statement that a subject was crypto-shredded
//! and by when no copy anywhere can be decrypted (`final_by`).
//!
//! Owns the receipt's shape, its canonical JSON (keys sorted, no white space,
//! UTF-8) and signing/verification with the Ed25519 receipt key.

use crate::crypto::{ed25519_verify, ReceiptKey};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::Value;

/// Canonical JSON: object keys sorted (recursively), no white space.
pub fn canonical_json(v: &Value) -> String {
    fn sort(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<_> = m.keys().collect();
                keys.sort();
                let mut out = serde_json::Map::new();
                for k in keys {
                    out.insert(k.clone(), sort(&m[k]));
                }
                Value::Object(out)
            }
            Value::Array(a) => Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    // serde_json's Map is a BTreeMap unless `preserve_order` is enabled; the
    // explicit sort keeps this canonical either way.
    let sorted = sort(v);
    let mut out = String::new();
    write_canonical(&sorted, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<_> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(k).expect("json"));
                out.push(':');
                write_canonical(&m[k], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&serde_json::to_string(other).expect("json")),
    }
}

/// Signs a receipt; returns the base64 signature.
pub fn sign(key: &ReceiptKey, receipt: &Value) -> String {
    B64.encode(key.sign(canonical_json(receipt).as_bytes()))
}

/// Verifies a receipt against a base64 signature and a raw public key.
pub fn verify(public_key: &[u8], receipt: &Value, signature_b64: &str) -> bool {
    let Ok(sig) = B64.decode(signature_b64) else {
        return false;
    };
    ed25519_verify(public_key, canonical_json(receipt).as_bytes(), &sig)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_form_sorts_and_strips() {
        let v = json!({"b": 1, "a": {"d": [1, 2], "c": "x y"}});
        assert_eq!(canonical_json(&v), r#"{"a":{"c":"x y","d":[1,2]},"b":1}"#);
    }

    #[test]
    fn sign_verify_and_one_changed_byte() {
        let k = ReceiptKey::generate();
        let r = json!({"id": "s1", "erased_at": "2026-11-28T00:00:00Z", "key_epoch": 1, "final_by": "2026-12-29T00:00:00Z"});
        let s = sign(&k, &r);
        assert!(verify(&k.public_key(), &r, &s));
        let mut r2 = r.clone();
        r2["id"] = json!("s2");
        assert!(!verify(&k.public_key(), &r2, &s));
    }
}
