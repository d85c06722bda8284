//! Micro benchmarks of the vault's real code paths (criterion): field seal and
//! open, data-key wrap and unwrap, token lookup, the policy decision,
//! blind-index hashing, Argon2id unseal with the shipped parameters, and
//! `rotate-kek` over many subjects. Run: `cargo bench --bench micro`.
//! `PDVAULT_BENCH_SUBJECTS` sets the rotation's subject count (default 100000).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use pdvault::config::{Config, Overrides};
use pdvault::crypto::{hmac_parts, SecretKey};
use pdvault::keyring::{KdfParams, Keyring};
use pdvault::policy::{Action, FieldsAsked, Request, SubjectState};
use pdvault::vault::{dek_aad, field_aad, Ctx, IssueRequest, Vault};
use serde_json::json;
use std::hint::black_box;

const KDF: KdfParams = KdfParams {
    m_kib: 65536,
    t: 3,
    p: 4,
};

fn config(dir: &std::path::Path) -> Config {
    let ov = Overrides {
        listen: None,
        data_dir: Some(dir.join("data")),
        keys_dir: Some(dir.join("keys")),
    };
    Config::from_toml(include_str!("../config/pdvault.toml"), &ov).unwrap()
}

fn crypto(c: &mut Criterion) {
    let dek = SecretKey::generate().aead();
    let aad = field_aad("2f1b6c1e-8a3b-4d5e-9f00-112233445566", "phone", 1);
    let value = br#""+77015550177""#;
    let sealed = dek.seal(value, &aad);
    c.bench_function("field_seal", |b| b.iter(|| black_box(dek.seal(black_box(value), &aad))));
    c.bench_function("field_open", |b| {
        b.iter(|| black_box(dek.open(black_box(&sealed), &aad).unwrap()))
    });
    let kek = SecretKey::generate().aead();
    let raw = SecretKey::generate();
    let waad = dek_aad("2f1b6c1e-8a3b-4d5e-9f00-112233445566", 1, 1);
    let wrapped = kek.seal(raw.expose_secret(), &waad);
    c.bench_function("dek_wrap", |b| {
        b.iter(|| black_box(kek.seal(raw.expose_secret(), &waad)))
    });
    c.bench_function("dek_unwrap", |b| {
        b.iter(|| black_box(kek.open(&wrapped, &waad).unwrap()))
    });
    let ik = SecretKey::generate();
    c.bench_function("blind_index_hmac", |b| {
        b.iter(|| {
            black_box(hmac_parts(
                ik.expose_secret(),
                &[b"pdvault-index-v1", b"email", b"\"a@example.kz\""],
            ))
        })
    });
}

fn unseal(c: &mut Criterion) {
    let d = tempfile::tempdir().unwrap();
    Keyring::create(d.path(), b"bench passphrase", KDF).unwrap();
    let mut g = c.benchmark_group("unseal");
    g.sample_size(10);
    g.bench_function("argon2id_m64MiB_t3_p4", |b| {
        b.iter(|| black_box(Keyring::open(d.path(), b"bench passphrase").unwrap()))
    });
    g.finish();
}

fn vault_paths(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path());
    let kr = Keyring::create(&cfg.keys.dir, b"bench", KDF).unwrap();
    let vault = Vault::open_with(cfg, kr).unwrap();
    let ctx = Ctx {
        request_id: "bench".into(),
        ..Default::default()
    };
    let (_, secret) = rt
        .block_on(vault.issue_token(
            &ctx,
            &Vault::local_operator(),
            IssueRequest {
                caller: "bench".into(),
                purposes: vec!["order".into(), "delivery".into()],
                capabilities: vec!["read".into(), "write".into()],
                ttl_seconds: 3600,
                cert_subject: None,
            },
        ))
        .unwrap();
    let text = secret.expose().to_owned();
    c.bench_function("token_lookup", |b| {
        b.iter(|| black_box(rt.block_on(vault.authenticate(&ctx, Some(&text), None)).unwrap()))
    });
    let auth = rt.block_on(vault.authenticate(&ctx, Some(&text), None)).unwrap();
    let req = Request {
        purpose: Some("delivery"),
        action: Action::Read,
        subject_id: Some("s"),
        subject: SubjectState::Live { consent: None },
        fields: FieldsAsked::Default,
        justification: None,
        now: 1,
    };
    c.bench_function("policy_decide", |b| {
        b.iter(|| black_box(vault.cfg.policy.decide(&auth.view(), black_box(&req))))
    });

    let n: usize = std::env::var("PDVAULT_BENCH_SUBJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let order = Ctx {
        request_id: "bench".into(),
        purpose: Some("order".into()),
        ..Default::default()
    };
    let subject = json!({"surname": "Ivanova", "given_name": "Aigerim", "phone": "+77015550177",
        "email": "aigerim@example.kz", "address": {"city": "Almaty", "street": "Abai Ave 10"}});
    let one: Vec<serde_json::Map<String, serde_json::Value>> = vec![subject.as_object().unwrap().clone(); 1000];
    let started = std::time::Instant::now();
    for _ in 0..n.div_ceil(1000) {
        rt.block_on(vault.batch_create(&order, &auth, &one)).unwrap();
    }
    eprintln!("loaded {n} subjects in {:.1?}", started.elapsed());
    let mut g = c.benchmark_group("rotate_kek");
    g.sample_size(10);
    g.bench_function(format!("subjects_{n}"), |b| {
        b.iter_batched(
            || (),
            |_| black_box(rt.block_on(vault.rotate_kek()).unwrap()),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// `pdvault audit impact` over a log of `PDVAULT_BENCH_AUDIT_ENTRIES`
/// entries (default 1,000,000; written directly in the log's format): 1,000
/// callers with two tokens each, each entry a release of 1-3 fields.
fn audit_impact(c: &mut Criterion) {
    use pdvault::audit::{impact, log_path, AuditEntry, ExportFilter, Place};
    use std::io::Write;
    let n: u64 = std::env::var("PDVAULT_BENCH_AUDIT_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let path = log_path(dir.path());
    let place = Place::Files {
        data_dir: dir.path().to_owned(),
        keys_dir: dir.path().to_owned(),
    };
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let fields = ["surname", "given_name", "phone", "address"];
    for seq in 1..=n {
        let caller = seq % 1000;
        let e = AuditEntry {
            seq,
            at: format!("2026-11-{:02}T{:02}:{:02}:00Z", 1 + seq % 28, seq % 24, seq % 60),
            request_id: format!("{seq:032x}"),
            caller: Some(format!("courier-{caller}")),
            token_id: Some(format!("tok_{caller:04}_{}", seq % 2)),
            purpose: Some("delivery".into()),
            action: "read".into(),
            subject: Some(format!("{:08x}-0000-4000-8000-{:012x}", seq % 50_000, seq % 50_000)),
            fields: fields[..1 + (seq % 3) as usize].iter().map(|s| s.to_string()).collect(),
            outcome: "allowed".into(),
            code: None,
            justification: None,
            target_token_id: None,
            node: None,
            prev: "0".repeat(64),
            hash: format!("{seq:064x}"),
        };
        serde_json::to_writer(&mut f, &e).unwrap();
        f.write_all(b"\n").unwrap();
    }
    f.flush().unwrap();
    let mut g = c.benchmark_group("audit_impact");
    g.sample_size(10);
    let by_token = ExportFilter {
        token: Some("tok_0007_1".into()),
        ..Default::default()
    };
    g.bench_function(format!("token_entries_{n}"), |b| {
        b.iter(|| black_box(impact(&place, &by_token).unwrap().releases))
    });
    let by_caller = ExportFilter {
        caller: Some("courier-7".into()),
        ..Default::default()
    };
    g.bench_function(format!("caller_entries_{n}"), |b| {
        b.iter(|| black_box(impact(&place, &by_caller).unwrap().releases))
    });
    g.finish();
}

criterion_group!(benches, crypto, unseal, vault_paths, audit_impact);
criterion_main!(benches);
