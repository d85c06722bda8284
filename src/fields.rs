//! Field schema types and write-time normalisation/validation.
//!
//! This module owns the set of field types a record can hold ([`FieldType`]) and
//! [`normalize`], the single place where a client-supplied JSON value is checked
//! and turned into the canonical form that is stored (and later blind-indexed
//! and released). Every error is a short English reason that never contains the
//! value or any part of it, so it is safe to log and to return to the client;
//! the only thing ever echoed is an address key name, and only when it is a
//! short `[a-z0-9_]` identifier.

use std::collections::BTreeMap;
use std::str::FromStr;

use email_address::EmailAddress;
use serde_json::{Map, Value};
use unicode_normalization::UnicodeNormalization;

/// The type of a stored field; decides how [`normalize`] checks it and which
/// release forms apply to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    /// A person's name part (surname, given name, patronymic).
    Name,
    /// Free text.
    Text,
    /// A telephone number, stored as E.164 (`+<digits>`).
    Phone,
    /// An e-mail address, stored with a lower-cased domain.
    Email,
    /// A postal address, stored as a JSON object of known keys.
    Address,
}

/// Longest Name/Text value (and address part), in Unicode scalar values.
const TEXT_MAX_CHARS: usize = 200;
/// Longest address `comment`, in Unicode scalar values.
const COMMENT_MAX_CHARS: usize = 1000;
/// Longest e-mail address, in Unicode scalar values.
const EMAIL_MAX_CHARS: usize = 254;
/// Longest address key name echoed back in an "unknown address key" reason.
const ECHOED_KEY_MAX: usize = 40;
/// Country used when an address does not name one.
const DEFAULT_COUNTRY: &str = "KZ";

/// Keys an address object may have.
const ADDRESS_KEYS: [&str; 8] = [
    "country",
    "region",
    "city",
    "street",
    "building",
    "apartment",
    "postal_code",
    "comment",
];

/// An address must have at least one of these (a bare country is not an address).
const ADDRESS_LOCATING_KEYS: [&str; 4] = ["region", "city", "street", "postal_code"];

/// The officially assigned ISO 3166-1 alpha-2 codes (249), sorted for binary search.
const ISO_3166_ALPHA2: [&str; 249] = [
    "AD", "AE", "AF", "AG", "AI", "AL", "AM", "AO", "AQ", "AR", "AS", "AT", "AU", "AW", "AX", "AZ", "BA", "BB", "BD",
    "BE", "BF", "BG", "BH", "BI", "BJ", "BL", "BM", "BN", "BO", "BQ", "BR", "BS", "BT", "BV", "BW", "BY", "BZ", "CA",
    "CC", "CD", "CF", "CG", "CH", "CI", "CK", "CL", "CM", "CN", "CO", "CR", "CU", "CV", "CW", "CX", "CY", "CZ", "DE",
    "DJ", "DK", "DM", "DO", "DZ", "EC", "EE", "EG", "EH", "ER", "ES", "ET", "FI", "FJ", "FK", "FM", "FO", "FR", "GA",
    "GB", "GD", "GE", "GF", "GG", "GH", "GI", "GL", "GM", "GN", "GP", "GQ", "GR", "GS", "GT", "GU", "GW", "GY", "HK",
    "HM", "HN", "HR", "HT", "HU", "ID", "IE", "IL", "IM", "IN", "IO", "IQ", "IR", "IS", "IT", "JE", "JM", "JO", "JP",
    "KE", "KG", "KH", "KI", "KM", "KN", "KP", "KR", "KW", "KY", "KZ", "LA", "LB", "LC", "LI", "LK", "LR", "LS", "LT",
    "LU", "LV", "LY", "MA", "MC", "MD", "ME", "MF", "MG", "MH", "MK", "ML", "MM", "MN", "MO", "MP", "MQ", "MR", "MS",
    "MT", "MU", "MV", "MW", "MX", "MY", "MZ", "NA", "NC", "NE", "NF", "NG", "NI", "NL", "NO", "NP", "NR", "NU", "NZ",
    "OM", "PA", "PE", "PF", "PG", "PH", "PK", "PL", "PM", "PN", "PR", "PS", "PT", "PW", "PY", "QA", "RE", "RO", "RS",
    "RU", "RW", "SA", "SB", "SC", "SD", "SE", "SG", "SH", "SI", "SJ", "SK", "SL", "SM", "SN", "SO", "SR", "SS", "ST",
    "SV", "SX", "SY", "SZ", "TC", "TD", "TF", "TG", "TH", "TJ", "TK", "TL", "TM", "TN", "TO", "TR", "TT", "TV", "TW",
    "TZ", "UA", "UG", "UM", "US", "UY", "UZ", "VA", "VC", "VE", "VG", "VI", "VN", "VU", "WF", "WS", "YE", "YT", "ZA",
    "ZM", "ZW",
];

const MUST_BE_STRING: &str = "must be a string";
const MUST_BE_OBJECT: &str = "must be an object";
const CONTROL_CHARACTER: &str = "contains a control character";
const INVALID_PHONE: &str = "is not a valid phone number";
const PHONE_CHARACTER: &str = "contains a character not allowed in a phone number";
const INVALID_EMAIL: &str = "is not a valid email address";

/// Normalises and checks one field value for storage.
///
/// On success returns the canonical value to store. `Err` is a short reason in
/// English that never contains the value or any part of it.
pub fn normalize(ty: FieldType, value: &Value) -> Result<Value, String> {
    match ty {
        FieldType::Name | FieldType::Text => normalize_text(expect_str(value)?, TEXT_MAX_CHARS).map(Value::String),
        FieldType::Phone => normalize_phone(expect_str(value)?).map(Value::String),
        FieldType::Email => normalize_email(expect_str(value)?).map(Value::String),
        FieldType::Address => normalize_address(value),
    }
}

fn expect_str(value: &Value) -> Result<&str, String> {
    value.as_str().ok_or_else(|| MUST_BE_STRING.to_owned())
}

/// Cc (C0, DEL, C1) plus the Unicode line and paragraph separators.
fn is_control_like(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

/// Name/Text rule: no control character anywhere (checked before trimming),
/// trimmed, NFC, then 1..=`max_chars` characters.
fn normalize_text(raw: &str, max_chars: usize) -> Result<String, String> {
    if raw.chars().any(is_control_like) {
        return Err(CONTROL_CHARACTER.to_owned());
    }
    let trimmed = raw.trim();
    // Most input is NFC already (Latin and Cyrillic names as typed): the
    // quick check says so without building the composed copy.
    let composed;
    let text = if unicode_normalization::is_nfc_quick(trimmed.chars()) == unicode_normalization::IsNormalized::Yes {
        trimmed
    } else {
        composed = trimmed.nfc().collect::<String>();
        composed.trim()
    };
    let len = text.chars().count();
    if len == 0 || len > max_chars {
        return Err(format!("must be 1 to {max_chars} characters"));
    }
    Ok(text.to_owned())
}

/// Phone rule: E.164 output; national numbers default to Kazakhstan (+7).
fn normalize_phone(raw: &str) -> Result<String, String> {
    let trimmed = raw.trim_matches(' ');
    let (international, rest) = match trimmed.strip_prefix('+') {
        Some(rest) => (true, rest),
        None => (false, trimmed),
    };
    let mut digits = String::with_capacity(16);
    for c in rest.chars() {
        match c {
            '0'..='9' => digits.push(c),
            ' ' | '(' | ')' | '-' | '.' => {}
            _ => return Err(PHONE_CHARACTER.to_owned()),
        }
    }
    let invalid = || Err(INVALID_PHONE.to_owned());
    if international {
        if !(8..=15).contains(&digits.len()) || digits.starts_with('0') {
            return invalid();
        }
        if digits.starts_with('7') && digits.len() != 11 {
            return invalid();
        }
        return Ok(format!("+{digits}"));
    }
    match digits.len() {
        11 if digits.starts_with('8') => Ok(format!("+7{}", &digits[1..])),
        11 if digits.starts_with('7') => Ok(format!("+{digits}")),
        10 => Ok(format!("+7{digits}")),
        _ => invalid(),
    }
}

/// Email rule: trimmed, checked, local part kept, domain lower-cased.
fn normalize_email(raw: &str) -> Result<String, String> {
    if raw.chars().any(is_control_like) {
        return Err(CONTROL_CHARACTER.to_owned());
    }
    let out = canonical_email(raw.trim())?;
    // Lower-casing a Unicode domain can in rare cases produce something that
    // no longer validates (or lower-cases further); refuse those so that the
    // stored form always normalises to itself.
    match canonical_email(&out) {
        Ok(again) if again == out => Ok(out),
        _ => Err(INVALID_EMAIL.to_owned()),
    }
}

fn canonical_email(s: &str) -> Result<String, String> {
    if s.chars().count() > EMAIL_MAX_CHARS {
        return Err(format!("must be at most {EMAIL_MAX_CHARS} characters"));
    }
    if s.is_empty() || s.chars().any(char::is_whitespace) || EmailAddress::from_str(s).is_err() {
        return Err(INVALID_EMAIL.to_owned());
    }
    let Some((local, domain)) = s.rsplit_once('@') else {
        return Err(INVALID_EMAIL.to_owned());
    };
    if local.is_empty() || !domain.contains('.') || domain.starts_with('.') || domain.ends_with('.') {
        return Err(INVALID_EMAIL.to_owned());
    }
    Ok(format!("{local}@{}", domain.to_lowercase()))
}

/// Address rule: known keys only, each a Text-like string (null = absent),
/// ISO country (default KZ), postal code shape, at least one locating key.
fn normalize_address(value: &Value) -> Result<Value, String> {
    let obj = value.as_object().ok_or_else(|| MUST_BE_OBJECT.to_owned())?;
    let mut parts: BTreeMap<&'static str, String> = BTreeMap::new();
    for (key, part) in obj {
        let Some(key) = ADDRESS_KEYS.iter().copied().find(|k| k == key) else {
            return Err(unknown_address_key(key));
        };
        let raw = match part {
            Value::Null => continue,
            Value::String(s) => s,
            _ => return Err(format!("{key} {MUST_BE_STRING}")),
        };
        let max_chars = if key == "comment" {
            COMMENT_MAX_CHARS
        } else {
            TEXT_MAX_CHARS
        };
        let text = normalize_text(raw, max_chars).map_err(|reason| format!("{key} {reason}"))?;
        let text = match key {
            "country" => normalize_country(&text)?,
            "postal_code" => check_postal_code(text)?,
            _ => text,
        };
        parts.insert(key, text);
    }
    if !ADDRESS_LOCATING_KEYS.iter().any(|k| parts.contains_key(k)) {
        return Err("address needs at least a region, city, street or postal_code".to_owned());
    }
    parts.entry("country").or_insert_with(|| DEFAULT_COUNTRY.to_owned());
    let out: Map<String, Value> = parts
        .into_iter()
        .map(|(k, v)| (k.to_owned(), Value::String(v)))
        .collect();
    Ok(Value::Object(out))
}

/// Names an unknown key only when it looks like a schema identifier; keys are
/// request schema, not values, but anything odd is not echoed.
fn unknown_address_key(key: &str) -> String {
    let identifier = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if identifier {
        // ASCII only, so byte slicing is on a character boundary.
        format!("unknown address key: {}", &key[..key.len().min(ECHOED_KEY_MAX)])
    } else {
        "unknown address key".to_owned()
    }
}

fn normalize_country(text: &str) -> Result<String, String> {
    let upper = text.to_ascii_uppercase();
    if upper.len() == 2 && ISO_3166_ALPHA2.binary_search(&upper.as_str()).is_ok() {
        Ok(upper)
    } else {
        Err("country is not an ISO 3166-1 alpha-2 code".to_owned())
    }
}

fn check_postal_code(text: String) -> Result<String, String> {
    let len = text.chars().count();
    let shape_ok = text.chars().all(|c| c.is_ascii_alphanumeric() || c == ' ' || c == '-');
    if (3..=10).contains(&len) && shape_ok {
        Ok(text)
    } else {
        Err("postal_code must be 3 to 10 letters, digits, spaces or hyphens".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn s(v: &str) -> Value {
        Value::String(v.to_owned())
    }

    fn ok(ty: FieldType, v: Value) -> Value {
        match normalize(ty, &v) {
            Ok(out) => out,
            Err(reason) => panic!("{ty:?} {v} refused: {reason}"),
        }
    }

    /// Asserts refusal, that the reason contains `needle`, and that it does not
    /// echo the input.
    fn refused(ty: FieldType, v: Value, needle: &str) -> String {
        let reason = match normalize(ty, &v) {
            Ok(out) => panic!("{ty:?} {v} accepted as {out}"),
            Err(reason) => reason,
        };
        assert!(
            reason.contains(needle),
            "{ty:?} {v}: reason {reason:?} lacks {needle:?}"
        );
        if let Some(raw) = v.as_str() {
            if raw.trim().chars().count() > 3 {
                assert!(!reason.contains(raw.trim()), "reason {reason:?} leaks input");
            }
        }
        reason
    }

    #[test]
    fn field_type_serde_is_snake_case() {
        for (ty, name) in [
            (FieldType::Name, "name"),
            (FieldType::Text, "text"),
            (FieldType::Phone, "phone"),
            (FieldType::Email, "email"),
            (FieldType::Address, "address"),
        ] {
            assert_eq!(serde_json::to_value(ty).unwrap(), s(name));
            assert_eq!(serde_json::from_value::<FieldType>(s(name)).unwrap(), ty);
        }
        assert!(serde_json::from_value::<FieldType>(s("Name")).is_err());
    }

    #[test]
    fn name_and_text_accept_and_normalise() {
        let cases: &[(&str, &str)] = &[
            ("Иванов", "Иванов"),
            ("  Иванов  ", "Иванов"),
            ("\u{00a0}Айгерим\u{2003}", "Айгерим"),
            ("Әбдіқадыр", "Әбдіқадыр"),
            ("Әә Ғғ Ққ Ңң Өө Ұұ Үү Һһ Іі", "Әә Ғғ Ққ Ңң Өө Ұұ Үү Һһ Іі"),
            ("O'Brien-Smith", "O'Brien-Smith"),
            ("Жан-Поль Д’Арк", "Жан-Поль Д’Арк"),
            ("Анна Мария", "Анна Мария"),
            // NFC: e + combining acute -> é; Й decomposed -> Й.
            ("Rene\u{0301}e", "Ren\u{00e9}e"),
            ("\u{0418}\u{0306}", "\u{0419}"),
            ("x", "x"),
        ];
        for ty in [FieldType::Name, FieldType::Text] {
            for (input, want) in cases {
                assert_eq!(ok(ty, s(input)), s(want), "{ty:?} {input:?}");
            }
        }
    }

    #[test]
    fn name_and_text_length_is_in_chars() {
        for ty in [FieldType::Name, FieldType::Text] {
            let cyr200 = "Ж".repeat(200); // 400 bytes, 200 chars
            assert_eq!(ok(ty, s(&cyr200)), s(&cyr200));
            assert_eq!(ok(ty, s(&format!("  {cyr200}  "))), s(&cyr200));
            refused(ty, s(&"Ж".repeat(201)), "1 to 200 characters");
            refused(ty, s(&"a".repeat(201)), "1 to 200 characters");
            // 201 decomposed chars that compose to 200 are fine (NFC first).
            let decomposed = format!("{}e\u{0301}", "a".repeat(199));
            assert_eq!(ok(ty, s(&decomposed)).as_str().unwrap().chars().count(), 200);
            refused(ty, s(""), "1 to 200 characters");
            refused(ty, s("   "), "1 to 200 characters");
            refused(ty, s("\u{00a0}\u{3000}"), "1 to 200 characters");
        }
    }

    #[test]
    fn name_and_text_refuse_control_characters() {
        let bad = [
            "\u{0000}", "\u{0001}", "\t", "\n", "\r", "\u{001f}", "\u{007f}", "\u{0080}", "\u{0085}", "\u{009f}",
            "\u{2028}", "\u{2029}",
        ];
        for ty in [FieldType::Name, FieldType::Text] {
            for c in bad {
                refused(ty, s(&format!("Иван{c}ов")), "control character");
                refused(ty, s(&format!("{c}Иванов")), "control character");
                refused(ty, s(&format!("Иванов{c}")), "control character");
            }
        }
    }

    #[test]
    fn string_types_refuse_other_json() {
        for ty in [FieldType::Name, FieldType::Text, FieldType::Phone, FieldType::Email] {
            for v in [
                Value::Null,
                json!(1),
                json!(77015550177u64),
                json!(true),
                json!([]),
                json!(["x"]),
                json!({}),
                json!({"a": "b"}),
            ] {
                assert_eq!(normalize(ty, &v), Err("must be a string".to_owned()));
            }
        }
    }

    #[test]
    fn phone_kz_spellings_give_e164() {
        for input in [
            "8 701 555 01 77",
            "+7 (701) 555-01-77",
            "7015550177",
            "87015550177",
            "+77015550177",
            "77015550177",
            "  +7 701 555 01 77  ",
            "8.701.555.01.77",
            "8(701)5550177",
        ] {
            assert_eq!(ok(FieldType::Phone, s(input)), s("+77015550177"), "{input:?}");
        }
    }

    #[test]
    fn phone_international() {
        let cases: &[(&str, &str)] = &[
            ("+4915112345678", "+4915112345678"),
            ("+49 151 1234 5678", "+4915112345678"),
            ("+1 (202) 555-0123", "+12025550123"),
            ("+12345678", "+12345678"),               // 8 digits
            ("+123456789012345", "+123456789012345"), // 15 digits
            ("+7 495 123 45 67", "+74951234567"),
            ("+380 50 123 4567", "+380501234567"),
        ];
        for (input, want) in cases {
            assert_eq!(ok(FieldType::Phone, s(input)), s(want), "{input:?}");
        }
    }

    #[test]
    fn phone_refusals() {
        let invalid = [
            "",
            "   ",
            "+",
            "12345",
            "+7 701 555",
            "+0123456789",
            "+1234567890123456",
            "+1234567",      // 7 digits
            "+7701555017",   // zone 7 with 10 digits
            "+770155501777", // zone 7 with 12 digits
            "701555017",     // 9 national digits
            "97015550177",   // 11 digits not starting 7/8
            "870155501777",  // 12 national digits
            "()-. ",         // no digits
        ];
        for input in invalid {
            refused(FieldType::Phone, s(input), "not a valid phone number");
        }
        let bad_chars = [
            "abc",
            "701-555-01-77x",
            "++77015550177",
            "7+7015550177",
            "+7 701 555 01 77+",
            "+7/701/5550177",
            "+7\t7015550177",
            "\u{00a0}87015550177",
            "８７０１５５５０１７７", // full-width digits
            "٨٧٠١٥٥٥٠١٧٧",            // Arabic-Indic digits
            "#87015550177",
        ];
        for input in bad_chars {
            refused(FieldType::Phone, s(input), "phone number");
        }
    }

    #[test]
    fn email_accepts_and_lowercases_domain() {
        let cases: &[(&str, &str)] = &[
            ("Aigerim.K@Example.KZ", "Aigerim.K@example.kz"),
            ("  Aigerim.K@Example.KZ  ", "Aigerim.K@example.kz"),
            ("user+tag@mail.example.com", "user+tag@mail.example.com"),
            ("O'Neil@EXAMPLE.org", "O'Neil@example.org"),
            ("User@Пример.ҚАЗ", "User@пример.қаз"),
            ("a@x.kz", "a@x.kz"),
        ];
        for (input, want) in cases {
            assert_eq!(ok(FieldType::Email, s(input)), s(want), "{input:?}");
        }
    }

    #[test]
    fn email_refusals() {
        for input in [
            "not-an-email",
            "a@",
            "@b.kz",
            "a b@c.kz",
            "a@b",
            "a@@b.kz",
            "",
            "   ",
            "a@.b.kz",
            "a@b.kz.",
            "a@b..kz",
            "a.@b.kz",
            "Name <a@b.kz>",
            "<a@b.kz>",
            "a@b .kz",
            "a@b\u{00a0}.kz",
        ] {
            refused(FieldType::Email, s(input), "not a valid email address");
        }
        refused(FieldType::Email, s("a\u{0007}@b.kz"), "control character");
        refused(FieldType::Email, s("a@b.kz\n"), "control character");
        refused(FieldType::Email, s("a@b.kz\u{2028}"), "control character");
        // 254 characters is the limit.
        let domain = format!("{}.{}.{}.kz", "a".repeat(63), "b".repeat(63), "c".repeat(63));
        let at_limit = format!("{}@{domain}", "x".repeat(254 - 1 - domain.len()));
        assert_eq!(at_limit.len(), 254);
        assert_eq!(ok(FieldType::Email, s(&at_limit)), s(&at_limit));
        let over = format!("x{at_limit}");
        refused(FieldType::Email, s(&over), "at most 254 characters");
    }

    #[test]
    fn address_full_and_defaults() {
        let full = json!({
            "country": "kz",
            "region": "  Алматинская область ",
            "city": "Алматы",
            "street": "пр. Абая",
            "building": "10А",
            "apartment": "5",
            "postal_code": "050000",
            "comment": "Домофон 5, қоңырау шалыңыз"
        });
        assert_eq!(
            ok(FieldType::Address, full),
            json!({
                "country": "KZ",
                "region": "Алматинская область",
                "city": "Алматы",
                "street": "пр. Абая",
                "building": "10А",
                "apartment": "5",
                "postal_code": "050000",
                "comment": "Домофон 5, қоңырау шалыңыз"
            })
        );
        assert_eq!(
            ok(FieldType::Address, json!({"city": "Астана"})),
            json!({"city": "Астана", "country": "KZ"})
        );
        assert_eq!(
            ok(
                FieldType::Address,
                json!({"city": "Berlin", "country": "De", "street": null, "comment": null})
            ),
            json!({"city": "Berlin", "country": "DE"})
        );
        assert_eq!(
            ok(FieldType::Address, json!({"country": null, "postal_code": "A1B 2C3"})),
            json!({"country": "KZ", "postal_code": "A1B 2C3"})
        );
        assert_eq!(
            ok(FieldType::Address, json!({"region": "X", "country": " gb "})),
            json!({"region": "X", "country": "GB"})
        );
        for locating in ["region", "city", "street", "postal_code"] {
            let v = json!({ locating: "12345" });
            assert!(normalize(FieldType::Address, &v).is_ok(), "{locating}");
        }
    }

    #[test]
    fn address_output_keys_are_sorted() {
        let out = ok(
            FieldType::Address,
            json!({"street": "a", "city": "b", "apartment": "c"}),
        );
        let text = serde_json::to_string(&out).unwrap();
        assert_eq!(text, r#"{"apartment":"c","city":"b","country":"KZ","street":"a"}"#);
    }

    #[test]
    fn address_refusals() {
        use FieldType::Address;
        for v in [s("Алматы"), Value::Null, json!(1), json!(["city"]), json!(true)] {
            assert_eq!(normalize(Address, &v), Err("must be an object".to_owned()));
        }
        refused(Address, json!({}), "at least");
        refused(Address, json!({"country": "KZ"}), "at least");
        refused(
            Address,
            json!({"country": "KZ", "comment": "x", "building": "1"}),
            "at least",
        );
        refused(Address, json!({"city": null}), "at least");
        for country in ["XX", "KAZ", "K1", "", "Z", "ҚЗ", "U S", "uk"] {
            let r = refused(Address, json!({"city": "a", "country": country}), "country");
            if !country.is_empty() {
                assert!(!r.contains(&format!(" {country}")), "{r}");
            }
        }
        assert_eq!(
            normalize(Address, &json!({"city": "a", "street2": "b"})),
            Err("unknown address key: street2".to_owned())
        );
        assert_eq!(
            normalize(Address, &json!({"city": "a", "Street-2": "b"})),
            Err("unknown address key".to_owned())
        );
        assert_eq!(
            normalize(Address, &json!({"city": "a", "улица": "b"})),
            Err("unknown address key".to_owned())
        );
        assert_eq!(
            normalize(Address, &json!({"city": "a", "": "b"})),
            Err("unknown address key".to_owned())
        );
        let long_key = "k".repeat(50);
        assert_eq!(
            normalize(Address, &json!({"city": "a", long_key: "b"})),
            Err(format!("unknown address key: {}", "k".repeat(40)))
        );
        assert_eq!(
            normalize(Address, &json!({"city": 5})),
            Err("city must be a string".to_owned())
        );
        assert_eq!(
            normalize(Address, &json!({"city": {"name": "x"}})),
            Err("city must be a string".to_owned())
        );
        assert_eq!(
            normalize(Address, &json!({"city": "  "})),
            Err("city must be 1 to 200 characters".to_owned())
        );
        assert_eq!(
            normalize(Address, &json!({"street": "Абая\u{0000}10"})),
            Err("street contains a control character".to_owned())
        );
        assert!(normalize(Address, &json!({"city": "Ж".repeat(200)})).is_ok());
        refused(Address, json!({"city": "Ж".repeat(201)}), "1 to 200");
        assert!(normalize(Address, &json!({"city": "a", "comment": "Ж".repeat(1000)})).is_ok());
        refused(
            Address,
            json!({"city": "a", "comment": "Ж".repeat(1001)}),
            "comment must be 1 to 1000 characters",
        );
        refused(
            Address,
            json!({"city": "a", "building": "Ж".repeat(201)}),
            "building must be 1 to 200",
        );
        for postal in ["12", "12345678901", "05#000", "050 000!", "０５００００", "А12345"] {
            refused(Address, json!({"city": "a", "postal_code": postal}), "postal_code");
        }
        for postal in ["123", "1234567890", "SW1A 1AA", "123-4567", " 050000 "] {
            assert!(
                normalize(Address, &json!({"postal_code": postal})).is_ok(),
                "{postal:?}"
            );
        }
    }

    #[test]
    fn iso_list_is_the_official_249() {
        assert_eq!(ISO_3166_ALPHA2.len(), 249);
        assert!(ISO_3166_ALPHA2.windows(2).all(|w| w[0] < w[1]), "sorted, unique");
        assert!(ISO_3166_ALPHA2
            .iter()
            .all(|c| c.len() == 2 && c.bytes().all(|b| b.is_ascii_uppercase())));
        for code in ["KZ", "RU", "US", "GB", "SS", "SX", "XK"] {
            assert_eq!(ISO_3166_ALPHA2.binary_search(&code).is_ok(), code != "XK", "{code}");
        }
        // Exceptionally/transitionally reserved codes are not assigned.
        for code in ["UK", "EU", "SU", "AN", "YU", "XX", "ZZ"] {
            assert!(ISO_3166_ALPHA2.binary_search(&code).is_err(), "{code}");
        }
    }

    // ---- properties -------------------------------------------------------

    const ALL_TYPES: [FieldType; 5] = [
        FieldType::Name,
        FieldType::Text,
        FieldType::Phone,
        FieldType::Email,
        FieldType::Address,
    ];

    /// Latin, Cyrillic, the Kazakh letters, digits, punctuation, white space and
    /// control characters.
    fn mixed_string() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![
                4 => prop::char::range('a', 'z'),
                2 => prop::char::range('A', 'Z'),
                6 => prop::char::range('а', 'я'),
                3 => prop::char::range('А', 'Я'),
                4 => prop::sample::select("ӘәҒғҚқҢңӨөҰұҮүҺһІіЁё".chars().collect::<Vec<_>>()),
                3 => prop::char::range('0', '9'),
                3 => prop::sample::select(" @.+-()'’_,#".chars().collect::<Vec<_>>()),
                1 => prop::sample::select(
                    "\u{0}\t\n\u{1f}\u{7f}\u{85}\u{a0}\u{301}\u{2028}\u{3000}".chars().collect::<Vec<_>>()
                ),
            ],
            0..40,
        )
        .prop_map(|cs| cs.into_iter().collect())
    }

    fn phone_like() -> impl Strategy<Value = String> {
        prop_oneof![
            "[+]?[0-9 ().-]{0,20}",
            "[+][1-9][0-9]{7,14}",
            "[+]7 ?[(]?[0-9]{3}[)]? ?[0-9]{3}[ -]?[0-9]{2}[ -]?[0-9]{2}",
            "[78]?[0-9]{10}",
        ]
    }

    fn email_like() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._%+'-]{1,20}@[A-Za-z0-9Ққ-]{1,10}(\\.[A-Za-z0-9ӘәЖж]{1,8}){1,3}"
    }

    fn assert_idempotent(ty: FieldType, v: &Value) -> Result<(), TestCaseError> {
        if let Ok(once) = normalize(ty, v) {
            let twice = normalize(ty, &once);
            prop_assert_eq!(twice, Ok(once));
        }
        Ok(())
    }

    proptest! {
        /// The quick check's shortcut gives what composing every input gives.
        #[test]
        fn prop_name_text_is_trimmed_nfc(raw in mixed_string()) {
            if let Ok(out) = normalize_text(&raw, TEXT_MAX_CHARS) {
                let full: String = raw.trim().nfc().collect();
                prop_assert_eq!(out.as_str(), full.trim());
            }
        }

        #[test]
        fn prop_name_text_idempotent(raw in mixed_string()) {
            assert_idempotent(FieldType::Name, &s(&raw))?;
            assert_idempotent(FieldType::Text, &s(&raw))?;
        }

        #[test]
        fn prop_phone_idempotent(raw in phone_like()) {
            assert_idempotent(FieldType::Phone, &s(&raw))?;
        }

        #[test]
        fn prop_email_idempotent(raw in email_like()) {
            assert_idempotent(FieldType::Email, &s(&raw))?;
            if let Ok(Value::String(out)) = normalize(FieldType::Email, &s(&raw)) {
                let (local, domain) = out.rsplit_once('@').unwrap();
                prop_assert_eq!(local, raw.rsplit_once('@').unwrap().0);
                prop_assert_eq!(domain.to_lowercase(), domain);
            }
        }

        #[test]
        fn prop_address_idempotent(city in mixed_string(), postal in "[A-Za-z0-9 -]{0,12}") {
            assert_idempotent(FieldType::Address, &json!({"city": city, "postal_code": postal}))?;
        }

        #[test]
        fn prop_reasons_never_contain_input(raw in prop_oneof![mixed_string(), phone_like(), email_like()]) {
            let mut attempts: Vec<(FieldType, Value)> =
                ALL_TYPES.iter().map(|ty| (*ty, s(&raw))).collect();
            for key in ADDRESS_KEYS {
                attempts.push((FieldType::Address, json!({ key: raw.clone() })));
                attempts.push((FieldType::Address, json!({ "city": "Алматы", key: raw.clone() })));
            }
            for (ty, v) in attempts {
                if let Err(reason) = normalize(ty, &v) {
                    if raw.chars().count() > 3 {
                        prop_assert!(!reason.contains(&raw), "{:?}: {:?} leaks {:?}", ty, reason, raw);
                    }
                    let trimmed = raw.trim();
                    if trimmed.chars().count() > 3 {
                        prop_assert!(!reason.contains(trimmed), "{:?}: {:?} leaks {:?}", ty, reason, trimmed);
                    }
                }
            }
        }

        #[test]
        fn prop_kz_spellings_agree(nsn in "7[0-9]{9}") {
            let (a, b, c, d) = (&nsn[0..3], &nsn[3..6], &nsn[6..8], &nsn[8..10]);
            let want = s(&format!("+7{nsn}"));
            for spelling in [
                format!("8 {a} {b} {c} {d}"),
                format!("+7 ({a}) {b}-{c}-{d}"),
                nsn.clone(),
                format!("8{nsn}"),
                format!("+7{nsn}"),
                format!("7{nsn}"),
            ] {
                prop_assert_eq!(normalize(FieldType::Phone, &s(&spelling)), Ok(want.clone()), "{}", spelling);
            }
        }
    }
}
