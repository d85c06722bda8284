//! What a create's unit of work costs the data store, against the floor of
//! the append-only store that the README proposes ("What capped a create"),
//! both over the same preload: the argument for a change of store, in
//! numbers (issue 11). Run: `cargo bench --bench store`;
//! `PDVAULT_BENCH_SUBJECTS` sets the preload (default 100000). Before measuring,
//! it prints what the preload added to the RSS on each side, and what a
//! compact form of the proposed index holds.
//!
//! The sled side is the store as the server opens it (the shipped config's
//! `storage.cache_mib`, the write-ahead log) under the server's allocator
//! (zeroizing over mimalloc, `src/main.rs`), so that its cost is the one a
//! request pays.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use pdvault::config::{Config, Overrides};
use std::hint::black_box;

#[global_allocator]
static ALLOC: secmem_alloc::zeroizing_alloc::ZeroizeAlloc<mimalloc::MiMalloc> =
    secmem_alloc::zeroizing_alloc::ZeroizeAlloc::new(mimalloc::MiMalloc);

/// A unit of work's changes: (space number, key, value).
type Ops = Vec<(usize, Vec<u8>, Vec<u8>)>;
/// Key -> (offset of the value, its length).
type Places = std::collections::HashMap<Box<[u8]>, (u64, u32)>;

/// The floor of the append-only store that the README proposes ("What capped
/// a create"): a unit of work encoded once with its CRC and appended to one
/// file, each key put in an in-memory map to where its value lies. Only
/// that: no recovery, no compaction, no compact index, and no `fdatasync`
/// but a batch's (the sled side is not flushed either, but syncs a batch's
/// record), so it says how much of the store's cost such a design could
/// remove at most, not what it would cost.
struct AppendFloor {
    file: std::fs::File,
    len: u64,
    buf: Vec<u8>,
    /// One map a space.
    maps: Vec<Places>,
}

impl AppendFloor {
    fn new(path: &std::path::Path) -> AppendFloor {
        AppendFloor {
            file: std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)
                .unwrap(),
            len: 0,
            buf: vec![],
            maps: vec![Default::default(); 3],
        }
    }

    fn apply(&mut self, ops: &Ops) {
        use std::os::unix::fs::FileExt;
        self.buf.clear();
        self.buf.extend_from_slice(&[0; 8]);
        let mut places = Vec::with_capacity(ops.len());
        for (s, k, v) in ops {
            self.buf.push(*s as u8);
            self.buf.extend_from_slice(&(k.len() as u32).to_le_bytes());
            self.buf.extend_from_slice(k);
            self.buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
            places.push(self.len + self.buf.len() as u64);
            self.buf.extend_from_slice(v);
        }
        let crc = crc32fast::hash(&self.buf[8..]);
        let n = (self.buf.len() - 8) as u32;
        self.buf[..4].copy_from_slice(&n.to_le_bytes());
        self.buf[4..8].copy_from_slice(&crc.to_le_bytes());
        self.file.write_all_at(&self.buf, self.len).unwrap();
        self.len += self.buf.len() as u64;
        for ((s, k, v), at) in ops.iter().zip(places) {
            self.maps[*s].insert(k.as_slice().into(), (at, v.len() as u32));
        }
    }

    fn get(&self, s: usize, k: &[u8]) -> Option<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let (at, n) = *self.maps[s].get(k)?;
        let mut v = vec![0; n as usize];
        self.file.read_exact_at(&mut v, at).unwrap();
        Some(v)
    }
}

/// The index the proposal would keep in memory, compact: a record's place
/// under its subject id's 16 bytes, a blind-index entry as its HMAC's first
/// 8 bytes and the id (the record on disk settles a collision of the
/// prefix), and no activity entry (they arrive in time order, so the log is
/// their index). Built from the same units only to measure what it holds.
#[derive(Default)]
struct CompactIndex {
    records: std::collections::HashMap<[u8; 16], (u64, u32)>,
    blind: std::collections::HashMap<([u8; 8], [u8; 16]), u64>,
}

impl CompactIndex {
    fn add(&mut self, ops: &Ops, at: u64) {
        let id = |text: &[u8]| *uuid::Uuid::try_parse_ascii(text).unwrap().as_bytes();
        for (s, k, v) in ops {
            match s {
                0 => {
                    self.records.insert(id(k), (at, v.len() as u32));
                }
                1 => {
                    let prefix = k[..8].try_into().unwrap();
                    self.blind.insert((prefix, id(&k[32..])), at);
                }
                _ => {}
            }
        }
    }
}

/// A create's unit of work as the vault writes it to the data store
/// (`Vault::store_subjects`): the record (five sealed fields and their two
/// blind indexes, about 480 bytes), an index entry for the email and one
/// for the phone (HMAC ‖ id -> stamp), and the activity entry (time ‖ id).
/// As (space number, key, value): 0 subjects, 1 index, 2 activity.
fn create_unit(id: &[u8], i: u64) -> Ops {
    use rand::RngCore;
    let mut rng = rand::thread_rng();
    let mut record = vec![0; 480];
    rng.fill_bytes(&mut record);
    let mut ops = vec![(0, id.to_vec(), record)];
    for _ in 0..2 {
        let mut k = vec![0; 32];
        rng.fill_bytes(&mut k);
        k.extend_from_slice(id);
        ops.push((1, k, i.to_be_bytes().to_vec()));
    }
    let mut at = (1_796_000_000 + i).to_be_bytes().to_vec();
    at.extend_from_slice(id);
    ops.push((2, at, vec![]));
    ops
}

fn to_commit(units: &[Ops]) -> pdvault::storage::Commit {
    use pdvault::storage::Space;
    let spaces = [Space::Subjects, Space::Index, Space::Activity];
    let mut c = pdvault::storage::Commit::default();
    for (s, k, v) in units.iter().flatten() {
        c.insert(spaces[*s], k, v);
    }
    c
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A create's unit and a batch of 1,000 applied to the data store as the
/// vault opens it (`Store::apply`: sled behind the write-ahead log, not
/// flushed; a batch's unit is larger than an intent, so its record is
/// synced in the log first), and a record read back (`Store::get`), each
/// beside the same on [`AppendFloor`] (whose batch is synced once too),
/// both stores preloaded with `PDVAULT_BENCH_SUBJECTS` units. Prints what
/// the preload added to the process's RSS for each.
fn store_unit(c: &mut Criterion) {
    use pdvault::storage::{Space, Store};
    let n: u64 = std::env::var("PDVAULT_BENCH_SUBJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let d = tempfile::tempdir().unwrap();
    let uuid = || <[u8; 36]>::try_from(uuid::Uuid::new_v4().to_string().as_bytes()).unwrap();
    let ids: Vec<[u8; 36]> = (0..n).map(|_| uuid()).collect();
    let before = rss_kib();
    let ov = Overrides {
        listen: None,
        data_dir: Some(d.path().join("data")),
        keys_dir: Some(d.path().join("keys")),
    };
    let cfg = Config::from_toml(include_str!("../config/pdvault.toml"), &ov).unwrap();
    let store = Store::open_with(&cfg).unwrap();
    for (b, chunk) in ids.chunks(1000).enumerate() {
        let units: Vec<_> = chunk
            .iter()
            .zip(b as u64 * 1000..)
            .map(|(id, i)| create_unit(id, i))
            .collect();
        store.apply(&to_commit(&units)).unwrap();
    }
    let sled_rss = rss_kib().saturating_sub(before);
    let before = rss_kib();
    let mut floor = AppendFloor::new(&d.path().join("floor.log"));
    for (id, i) in ids.iter().zip(0..) {
        floor.apply(&create_unit(id, i));
    }
    let floor_rss = rss_kib().saturating_sub(before);
    let before = rss_kib();
    let mut compact = CompactIndex::default();
    for (id, i) in ids.iter().zip(0..) {
        compact.add(&create_unit(id, i), i * 600);
    }
    let compact_rss = rss_kib().saturating_sub(before);
    eprintln!(
        "store_unit: {n} subjects preloaded; RSS added: sled {} MiB, append floor {} MiB, \
         a compact index of the same {} MiB",
        sled_rss / 1024,
        floor_rss / 1024,
        compact_rss / 1024
    );
    drop(compact);

    let mut g = c.benchmark_group("store_unit");
    let mut i = n;
    let mut next = || {
        i += 1;
        create_unit(&uuid(), i)
    };
    g.bench_function("create/sled_wal", |b| {
        b.iter_batched(
            || to_commit(&[next()]),
            |u| store.apply(&u).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("create/append_floor", |b| {
        b.iter_batched(&mut next, |u| floor.apply(&u), BatchSize::SmallInput)
    });
    let mut pick = 0;
    g.bench_function("get_record/sled_wal", |b| {
        b.iter(|| {
            pick = (pick + 7919) % ids.len();
            black_box(store.get(Space::Subjects, ids[pick]).unwrap().unwrap())
        })
    });
    g.bench_function("get_record/append_floor", |b| {
        b.iter(|| {
            pick = (pick + 7919) % ids.len();
            black_box(floor.get(0, &ids[pick]).unwrap())
        })
    });
    g.sample_size(10);
    g.bench_function("batch_1000/sled_wal", |b| {
        b.iter_batched(
            || to_commit(&(0..1000).map(|_| next()).collect::<Vec<_>>()),
            |u| store.apply(&u).unwrap(),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("batch_1000/append_floor", |b| {
        b.iter_batched(
            || (0..1000).flat_map(|_| next()).collect::<Vec<_>>(),
            |u| {
                floor.apply(&u);
                floor.file.sync_data().unwrap()
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
    // The measured creates and batches are added to both stores.
    eprintln!(
        "store_unit: the sled store held {} subjects at the end",
        store.count(Space::Subjects).unwrap()
    );
}

criterion_group!(benches, store_unit);
criterion_main!(benches);
