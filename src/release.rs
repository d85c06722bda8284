//! Release forms: how a stored (already normalised) field value is shown to a
//! caller under a purpose.
//!
//! This module owns [`ReleaseForm`], which form applies to which
//! [`FieldType`] ([`form_applies`], used by config validation), and the pure
//! transformations behind each form: masking, address generalisation and
//! keyed, purpose-bound pseudonyms. Nothing here decrypts, authorises or
//! audits; callers hand in the plaintext value and the per-vault pseudonym key.

use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;

use crate::fields::FieldType;

type HmacSha256 = Hmac<Sha256>;

/// Domain-separation prefix for the per-purpose pseudonym key.
const PSEUDONYM_DOMAIN: &str = "pdvault-pseudonym-v1|";
/// Prefix of every pseudonym.
const PSEUDONYM_PREFIX: &str = "pn_";
/// Pseudonyms carry this many bytes of the HMAC tag (32 hex characters).
const PSEUDONYM_BYTES: usize = 16;
/// What a masked phone looks like when it is too short to show anything.
const PHONE_FULLY_MASKED: &str = "+*** *** ** **";
/// The mask appended to a shown prefix.
const MASK: &str = "***";
/// Address keys kept by [`generalize_address`].
const GENERAL_ADDRESS_KEYS: [&str; 3] = ["country", "region", "city"];

/// How a value is released under a purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseForm {
    /// The stored value as is.
    Plain,
    /// A type-specific mask that shows only a small, fixed part of the value.
    Masked,
    /// A keyed, purpose-bound, irreversible token (`pn_` + 32 hex characters).
    Pseudonym,
    /// A coarser value: an address cut down to country, region and city.
    Generalized,
}

/// Whether `form` makes sense for `ty` (config validation uses this): Plain and
/// Pseudonym for every type; Masked for Name, Text, Phone, Email (not Address);
/// Generalized for Address only.
pub fn form_applies(form: ReleaseForm, ty: FieldType) -> bool {
    match form {
        ReleaseForm::Plain | ReleaseForm::Pseudonym => true,
        ReleaseForm::Masked => ty != FieldType::Address,
        ReleaseForm::Generalized => ty == FieldType::Address,
    }
}

/// Applies a form to a normalised value. `pseudonym_key` is the 32-byte
/// per-vault pseudonym key; `purpose` and `field` bind pseudonyms.
///
/// Combinations that [`form_applies`] rejects still give a safe answer rather
/// than the plain value: Masked on an Address generalises it, and Generalized
/// on a non-Address type falls back to Pseudonym. Masking a value that is not
/// a JSON string (which `fields::normalize` never stores for those types)
/// masks it as if it were empty.
pub fn release(
    form: ReleaseForm,
    ty: FieldType,
    value: &Value,
    pseudonym_key: &[u8],
    purpose: &str,
    field: &str,
) -> Value {
    let as_text = || value.as_str().unwrap_or("");
    match form {
        ReleaseForm::Plain => value.clone(),
        ReleaseForm::Masked => match ty {
            FieldType::Name | FieldType::Text => Value::String(mask_text(as_text())),
            FieldType::Phone => Value::String(mask_phone(as_text())),
            FieldType::Email => Value::String(mask_email(as_text())),
            FieldType::Address => generalize_address(value),
        },
        ReleaseForm::Pseudonym => Value::String(pseudonym(pseudonym_key, purpose, field, value)),
        ReleaseForm::Generalized => match ty {
            FieldType::Address => generalize_address(value),
            _ => Value::String(pseudonym(pseudonym_key, purpose, field, value)),
        },
    }
}

/// Masks an E.164 number: `"+77015554567"` -> `"+7 *** *** 45 67"`.
///
/// Shows the country calling code (its length by the ITU prefix rule) and the
/// last four digits. Non-digits are ignored; with fewer than 8 digits the
/// result is fully masked (`"+*** *** ** **"`).
pub fn mask_phone(e164: &str) -> String {
    let digits: Vec<u8> = e164.bytes().filter(u8::is_ascii_digit).collect();
    if digits.len() < 8 {
        return PHONE_FULLY_MASKED.to_owned();
    }
    let cc = &digits[..calling_code_len(&digits)];
    let last = &digits[digits.len() - 4..];
    // All bytes are ASCII digits.
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    format!("+{} *** *** {} {}", text(cc), text(&last[..2]), text(&last[2..]))
}

/// Length of the country calling code at the start of `digits` (at least two
/// digits long): 1 for zones 1 and 7, 2 for the two-digit codes, else 3.
fn calling_code_len(digits: &[u8]) -> usize {
    if matches!(digits[0], b'1' | b'7') {
        return 1;
    }
    let two = (digits[0] - b'0') * 10 + (digits[1] - b'0');
    match two {
        20 | 27 | 30..=34 | 36 | 39 | 40 | 41 | 43..=49 | 51..=58 | 60..=66 | 81 | 82 | 84 | 86 | 90..=95 | 98 => 2,
        _ => 3,
    }
}

/// Masks an e-mail address: `"aigerim@example.kz"` -> `"a***@example.kz"`.
///
/// The first character of the local part, `***`, then `@` and the domain.
/// Without an `@` the whole value is masked as `"***"`.
pub fn mask_email(email: &str) -> String {
    match email.rsplit_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}{MASK}@{domain}")
        }
        None => MASK.to_owned(),
    }
}

/// Masks text: the first Unicode scalar value + `"***"` (`"Ivanov"` ->
/// `"I***"`, `""` -> `"***"`).
pub fn mask_text(s: &str) -> String {
    let first: String = s.chars().take(1).collect();
    format!("{first}{MASK}")
}

/// Keeps only the `country`, `region` and `city` keys that are present in an
/// address object. Anything that is not an object becomes `{}`.
pub fn generalize_address(v: &Value) -> Value {
    let mut out = Map::new();
    if let Some(obj) = v.as_object() {
        for key in GENERAL_ADDRESS_KEYS {
            if let Some(part) = obj.get(key) {
                out.insert(key.to_owned(), part.clone());
            }
        }
    }
    Value::Object(out)
}

/// Keyed, purpose-bound pseudonym of a field value.
///
/// `HMAC-SHA256(k_p, field || 0x00 || canonical_json(value))` where
/// `k_p = HMAC-SHA256(key, "pdvault-pseudonym-v1|" || purpose)`; the result is
/// `"pn_"` + the first 16 bytes of the tag in lowercase hex. The same value,
/// purpose and field always give the same pseudonym; another purpose (or
/// field, or key) gives an unrelated one. Canonical JSON is the compact
/// `serde_json` text with object keys sorted (byte order), so the pseudonym
/// does not depend on serde_json's map ordering feature.
pub fn pseudonym(key: &[u8], purpose: &str, field: &str, value: &Value) -> String {
    let mut kdf = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    kdf.update(PSEUDONYM_DOMAIN.as_bytes());
    kdf.update(purpose.as_bytes());
    let purpose_key = kdf.finalize().into_bytes();

    let mut mac = HmacSha256::new_from_slice(&purpose_key).expect("HMAC accepts keys of any length");
    mac.update(field.as_bytes());
    mac.update(b"\0");
    mac.update(canonical_json(value).as_bytes());
    let tag = mac.finalize().into_bytes();
    format!("{PSEUDONYM_PREFIX}{}", hex::encode(&tag[..PSEUDONYM_BYTES]))
}

/// Compact JSON with object keys sorted; identical to `serde_json::to_string`
/// when serde_json keeps maps sorted (its default).
fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const KEY: [u8; 32] = [7u8; 32];
    const ALL_TYPES: [FieldType; 5] = [
        FieldType::Name,
        FieldType::Text,
        FieldType::Phone,
        FieldType::Email,
        FieldType::Address,
    ];
    const ALL_FORMS: [ReleaseForm; 4] = [
        ReleaseForm::Plain,
        ReleaseForm::Masked,
        ReleaseForm::Pseudonym,
        ReleaseForm::Generalized,
    ];

    fn s(v: &str) -> Value {
        Value::String(v.to_owned())
    }

    fn is_pseudonym(p: &str) -> bool {
        p.len() == 35
            && p.starts_with("pn_")
            && p[3..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }

    #[test]
    fn release_form_serde_is_snake_case() {
        for (form, name) in [
            (ReleaseForm::Plain, "plain"),
            (ReleaseForm::Masked, "masked"),
            (ReleaseForm::Pseudonym, "pseudonym"),
            (ReleaseForm::Generalized, "generalized"),
        ] {
            assert_eq!(serde_json::to_value(form).unwrap(), s(name));
            assert_eq!(serde_json::from_value::<ReleaseForm>(s(name)).unwrap(), form);
        }
    }

    #[test]
    fn form_applies_table() {
        use FieldType::*;
        use ReleaseForm::*;
        let table: &[(ReleaseForm, FieldType, bool)] = &[
            (Plain, Name, true),
            (Plain, Text, true),
            (Plain, Phone, true),
            (Plain, Email, true),
            (Plain, Address, true),
            (Pseudonym, Name, true),
            (Pseudonym, Text, true),
            (Pseudonym, Phone, true),
            (Pseudonym, Email, true),
            (Pseudonym, Address, true),
            (Masked, Name, true),
            (Masked, Text, true),
            (Masked, Phone, true),
            (Masked, Email, true),
            (Masked, Address, false),
            (Generalized, Name, false),
            (Generalized, Text, false),
            (Generalized, Phone, false),
            (Generalized, Email, false),
            (Generalized, Address, true),
        ];
        assert_eq!(table.len(), ALL_FORMS.len() * ALL_TYPES.len());
        for (form, ty, want) in table {
            assert_eq!(form_applies(*form, *ty), *want, "{form:?} {ty:?}");
        }
    }

    #[test]
    fn mask_phone_table() {
        let cases: &[(&str, &str)] = &[
            ("+77015554567", "+7 *** *** 45 67"),
            ("+77015550177", "+7 *** *** 01 77"),
            ("+4915112345678", "+49 *** *** 56 78"),
            ("+12025550123", "+1 *** *** 01 23"),
            ("+380501234567", "+380 *** *** 45 67"),
            ("+971501234567", "+971 *** *** 45 67"),
            ("+201001234567", "+20 *** *** 45 67"),
            ("+27821234567", "+27 *** *** 45 67"),
            ("+33612345678", "+33 *** *** 56 78"),
            ("+35312345678", "+353 *** *** 56 78"),
            ("+8613812345678", "+86 *** *** 56 78"),
            ("+85212345678", "+852 *** *** 56 78"),
            ("+98912345678", "+98 *** *** 56 78"),
            ("+99650123456", "+996 *** *** 34 56"),
            ("+12345678", "+1 *** *** 56 78"),
            ("+1234567", "+*** *** ** **"),
            ("", "+*** *** ** **"),
            ("abc", "+*** *** ** **"),
        ];
        for (input, want) in cases {
            assert_eq!(mask_phone(input), *want, "{input:?}");
        }
    }

    #[test]
    fn calling_code_lengths() {
        let two = [
            20, 27, 30, 31, 32, 33, 34, 36, 39, 40, 41, 43, 44, 45, 46, 47, 48, 49, 51, 52, 53, 54, 55, 56, 57, 58, 60,
            61, 62, 63, 64, 65, 66, 81, 82, 84, 86, 90, 91, 92, 93, 94, 95, 98,
        ];
        for p in 10..100u8 {
            let digits = [b'0' + p / 10, b'0' + p % 10];
            let want = if p / 10 == 1 || p / 10 == 7 {
                1
            } else if two.contains(&p) {
                2
            } else {
                3
            };
            assert_eq!(calling_code_len(&digits), want, "{p}");
        }
    }

    #[test]
    fn mask_email_table() {
        let cases: &[(&str, &str)] = &[
            ("aigerim@example.kz", "a***@example.kz"),
            ("a@x.kz", "a***@x.kz"),
            ("Aigerim.K@example.kz", "A***@example.kz"),
            ("Әлия@пример.қаз", "Ә***@пример.қаз"),
            ("\"a@b\"@c.kz", "\"***@c.kz"),
            ("@x.kz", "***@x.kz"),
            ("no-at-sign", "***"),
            ("", "***"),
        ];
        for (input, want) in cases {
            assert_eq!(mask_email(input), *want, "{input:?}");
        }
    }

    #[test]
    fn mask_text_table() {
        let cases: &[(&str, &str)] = &[
            ("Ivanov", "I***"),
            ("Иванов", "И***"),
            ("Әлия", "Ә***"),
            ("x", "x***"),
            ("", "***"),
        ];
        for (input, want) in cases {
            assert_eq!(mask_text(input), *want, "{input:?}");
        }
    }

    #[test]
    fn generalize_address_keeps_country_region_city() {
        let full = json!({
            "country": "KZ", "region": "Алматинская область", "city": "Алматы",
            "street": "пр. Абая", "building": "10", "apartment": "5",
            "postal_code": "050000", "comment": "домофон"
        });
        assert_eq!(
            generalize_address(&full),
            json!({"country": "KZ", "region": "Алматинская область", "city": "Алматы"})
        );
        assert_eq!(
            generalize_address(&json!({"country": "KZ", "street": "x"})),
            json!({"country": "KZ"})
        );
        assert_eq!(generalize_address(&json!({"street": "x"})), json!({}));
        assert_eq!(generalize_address(&s("Алматы")), json!({}));
        assert_eq!(generalize_address(&Value::Null), json!({}));
    }

    #[test]
    fn pseudonym_known_vector_and_format() {
        // Computed independently (Python hmac/hashlib) from the documented construction.
        let key: Vec<u8> = (0u8..32).collect();
        let p = pseudonym(&key, "billing", "phone", &s("+77015550177"));
        assert_eq!(p, "pn_f0065da8449a79668dac9f1d1e335bd0");
        assert!(is_pseudonym(&p));
        let addr = json!({"country": "KZ", "city": "Алматы"});
        let p = pseudonym(&key, "support", "address", &addr);
        assert_eq!(p, "pn_fb60d9bb0a3c15f5dc1531f7c829f602");
    }

    #[test]
    fn pseudonym_binds_key_purpose_field_value() {
        let v = s("Иванов");
        let base = pseudonym(&KEY, "billing", "surname", &v);
        assert_eq!(base, pseudonym(&KEY, "billing", "surname", &v));
        assert_ne!(base, pseudonym(&KEY, "marketing", "surname", &v));
        assert_ne!(base, pseudonym(&KEY, "billing", "given_name", &v));
        assert_ne!(base, pseudonym(&KEY, "billing", "surname", &s("Петров")));
        assert_ne!(base, pseudonym(&[8u8; 32], "billing", "surname", &v));
        // Purpose/field boundaries are not ambiguous across the NUL separator.
        assert_ne!(pseudonym(&KEY, "p", "ab", &s("c")), pseudonym(&KEY, "p", "a", &s("bc")));
        // Key order inside an object does not matter.
        let a: Value = serde_json::from_str(r#"{"city":"A","country":"KZ"}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"country":"KZ","city":"A"}"#).unwrap();
        assert_eq!(pseudonym(&KEY, "p", "address", &a), pseudonym(&KEY, "p", "address", &b));
    }

    #[test]
    fn canonical_json_matches_serde_json_sorted_output() {
        for v in [
            json!(null),
            json!(true),
            json!(12.5),
            json!(-3),
            s("a\"b\\c\u{0001}Ж"),
            json!([1, "x", {"b": 1, "a": [ {"z": 0, "y": null} ]}]),
            json!({"z": 1, "a": {"d": [], "c": {}}, "м": "ж", "A": "é"}),
        ] {
            assert_eq!(canonical_json(&v), serde_json::to_string(&v).unwrap(), "{v}");
        }
        let v = json!({"b": 1, "a": 2});
        assert_eq!(canonical_json(&v), r#"{"a":2,"b":1}"#);
    }

    #[test]
    fn release_dispatch() {
        use FieldType::*;
        use ReleaseForm::*;
        let name = s("Иванов");
        let phone = s("+77015554567");
        let email = s("aigerim@example.kz");
        let addr = json!({"country": "KZ", "city": "Алматы", "street": "Абая 10"});
        let general = json!({"country": "KZ", "city": "Алматы"});
        let r = |form, ty, v: &Value| release(form, ty, v, &KEY, "support", "f");

        for (ty, v) in [
            (Name, &name),
            (Text, &name),
            (Phone, &phone),
            (Email, &email),
            (Address, &addr),
        ] {
            assert_eq!(r(Plain, ty, v), v.clone());
            assert_eq!(r(Pseudonym, ty, v), s(&pseudonym(&KEY, "support", "f", v)));
            assert!(is_pseudonym(r(Pseudonym, ty, v).as_str().unwrap()));
        }
        assert_eq!(r(Masked, Name, &name), s("И***"));
        assert_eq!(r(Masked, Text, &name), s("И***"));
        assert_eq!(r(Masked, Phone, &phone), s("+7 *** *** 45 67"));
        assert_eq!(r(Masked, Email, &email), s("a***@example.kz"));
        // Safe fallbacks for combinations form_applies refuses.
        assert_eq!(r(Masked, Address, &addr), general);
        assert_eq!(r(Generalized, Address, &addr), general);
        for (ty, v) in [(Name, &name), (Text, &name), (Phone, &phone), (Email, &email)] {
            assert_eq!(r(Generalized, ty, v), r(Pseudonym, ty, v));
        }
        // Non-string stored values are masked as empty.
        assert_eq!(r(Masked, Name, &json!(5)), s("***"));
        assert_eq!(r(Masked, Phone, &json!(77015554567u64)), s("+*** *** ** **"));
        assert_eq!(r(Masked, Email, &Value::Null), s("***"));
    }

    proptest! {
        #[test]
        fn prop_mask_phone_reveals_at_most_four_after_code(d in "[1-9][0-9]{7,14}") {
            let e164 = format!("+{d}");
            let masked = mask_phone(&e164);
            let cc = &d[..calling_code_len(d.as_bytes())];
            let rest = masked.strip_prefix(&format!("+{cc} ")).expect("starts with the code");
            let shown: String = rest.chars().filter(char::is_ascii_digit).collect();
            prop_assert!(shown.len() <= 4, "{} shows {}", masked, shown);
            prop_assert_eq!(&shown, &d[d.len() - 4..]);
            prop_assert_eq!(masked.chars().filter(char::is_ascii_digit).count(), cc.len() + 4);
        }

        #[test]
        fn prop_mask_phone_never_shows_more_than_four_digits_beyond_code(raw in "[+]?[0-9]{0,20}") {
            let masked = mask_phone(&raw);
            let shown = masked.chars().filter(char::is_ascii_digit).count();
            prop_assert!(shown <= 3 + 4);
        }

        #[test]
        fn prop_pseudonym_stable_and_purpose_bound(
            key in prop::collection::vec(any::<u8>(), 32),
            purpose in "[a-z_]{1,12}",
            other in "[a-z_]{1,12}",
            field in "[a-z_]{1,12}",
            value in "\\PC{0,40}",
        ) {
            let v = s(&value);
            let p = pseudonym(&key, &purpose, &field, &v);
            prop_assert!(is_pseudonym(&p));
            prop_assert_eq!(&p, &pseudonym(&key, &purpose, &field, &v));
            prop_assert_eq!(
                release(ReleaseForm::Pseudonym, FieldType::Text, &v, &key, &purpose, &field),
                s(&p)
            );
            if other != purpose {
                prop_assert_ne!(&p, &pseudonym(&key, &other, &field, &v));
            }
            let v2 = s(&format!("{value}x"));
            prop_assert_ne!(&p, &pseudonym(&key, &purpose, &field, &v2));
        }
    }
}
