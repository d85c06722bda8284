//! The audit trail in a database that several nodes share (the postgres
//! backend): one hash chain per node, in the data store's `Audit` space, so
//! that `audit verify` and `audit export` see every node's entries.
//!
//! Each node's committer hands its groups to [`SharedSink`]: the entries,
//! their access-log records and the chain's new head in one unit of work
//! (one transaction), which expects the head the group follows.
//!
//! Keys of the `Audit` space: `<chain>e<seq>` an entry (its JSON),
//! `<chain>c<seq>` a signed checkpoint, `<chain>b` the base a restored chain
//! continues from. The head of each chain is `audit_head/<chain>` in `Meta`
//! (which also lists the chains), and its last checkpoint, the anchor, is
//! `anchor/<chain>` in the key store's `Nodes`: out of reach of whoever can
//! write the data database.

use super::*;
use crate::storage::KeyStore;

const HEAD_PREFIX: &str = "audit_head/";
const ANCHOR_PREFIX: &str = "anchor/";

fn key(chain: &str, kind: u8, seq: Option<u64>) -> Vec<u8> {
    let mut k = Vec::with_capacity(chain.len() + 9);
    k.extend_from_slice(chain.as_bytes());
    k.push(kind);
    if let Some(s) = seq {
        k.extend_from_slice(&s.to_be_bytes());
    }
    k
}

fn head_key(chain: &str) -> String {
    format!("{HEAD_PREFIX}{chain}")
}

fn anchor_key(chain: &str) -> String {
    format!("{ANCHOR_PREFIX}{chain}")
}

fn decode_head(b: &[u8]) -> (u64, String) {
    (
        crate::storage::read_u64(b.get(..8).unwrap_or_default()),
        String::from_utf8_lossy(b.get(8..).unwrap_or_default()).into_owned(),
    )
}

/// Makes a group durable in the data database.
pub(super) struct SharedSink {
    store: Store,
    chain: String,
}

impl Sink for SharedSink {
    fn commit(&mut self, before: &(u64, String), entries: &[AuditEntry]) -> Result<()> {
        let chain = self.chain.as_str();
        let mut c = Commit::default();
        for e in entries {
            c.insert(
                Space::Audit,
                key(chain, b'e', Some(e.seq)),
                serde_json::to_vec(e).expect("json"),
            );
            if let Some((k, v)) = access_record(e, chain.as_bytes()) {
                c.insert(Space::Access, k, v);
            }
        }
        // The head the group follows must still be there: a second process
        // writing this chain (two nodes started with one node id) fails here
        // rather than overwrite entries.
        c.expect(Space::Meta, head_key(chain), Some(&head_value(before.0, &before.1)));
        if let Some(last) = entries.last() {
            c.insert(Space::Meta, head_key(chain), head_value(last.seq, &last.hash));
        }
        crate::faults::hold("PDVAULT_FAULT_AUDIT_SYNC_HOLD_FILE");
        let r = crate::faults::enospc()
            .map_err(VaultError::from)
            .and_then(|_| self.store.commit_blocking(&c));
        if let Err(e) = &r {
            let why = match e {
                VaultError::VersionConflict { .. } => {
                    "another process wrote this node's audit chain (two nodes with one node id?)".to_owned()
                }
                e => e.to_string(),
            };
            tracing::error!(error = %why, "audit entries could not be committed; nothing of them was released");
        }
        r
    }
}

/// A chain's checkpoints (beside it) and anchor (in the key store).
pub(super) struct Checkpoints {
    chain: String,
    store: Store,
    keys: KeyStore,
    last: Mutex<Option<Checkpoint>>,
}

/// Opens this node's chain (registering it, at its restore base if it has
/// one). Returns the chain's head, the sink for its committer and its
/// checkpoints.
pub(super) fn open(store: &Store, keys: &KeyStore, chain: &str) -> Result<((u64, String), SharedSink, Checkpoints)> {
    let head = match store.get(Space::Meta, head_key(chain))? {
        Some(b) => decode_head(&b),
        None => {
            // A new chain, or one a restore left a base for.
            let start = base(store, chain)?
                .map(|b| (b.seq, b.hash))
                .unwrap_or((0, GENESIS.to_string()));
            let mut c = Commit::default();
            c.insert(Space::Meta, head_key(chain), head_value(start.0, &start.1));
            store.commit_blocking(&c)?;
            start
        }
    };
    let sink = SharedSink {
        store: store.clone(),
        chain: chain.to_owned(),
    };
    let checkpoints = Checkpoints {
        chain: chain.to_owned(),
        store: store.clone(),
        keys: keys.clone(),
        last: Mutex::new(checkpoints(store, chain)?.pop()),
    };
    Ok((head, sink, checkpoints))
}

impl Checkpoints {
    pub(super) fn last(&self) -> Option<Checkpoint> {
        self.last.lock().expect("audit lock").clone()
    }

    /// Stores a checkpoint beside the entries, then records it as the anchor
    /// in the key store.
    pub(super) fn write(&self, cp: &Checkpoint) -> Result<()> {
        let mut c = Commit::default();
        c.insert(
            Space::Audit,
            key(&self.chain, b'c', Some(cp.seq)),
            serde_json::to_vec(cp).expect("json"),
        );
        self.store.commit_blocking(&c)?;
        let mut a = Commit::default();
        a.insert(
            Space::Nodes,
            anchor_key(&self.chain),
            serde_json::to_vec(cp).expect("json"),
        );
        self.keys.store.commit_blocking(&a)?;
        *self.last.lock().expect("audit lock") = Some(cp.clone());
        Ok(())
    }
}

fn head_value(seq: u64, hash: &str) -> Vec<u8> {
    [&seq.to_be_bytes()[..], hash.as_bytes()].concat()
}

fn base(store: &Store, chain: &str) -> Result<Option<ChainBase>> {
    Ok(store
        .get(Space::Audit, key(chain, b'b', None))?
        .and_then(|b| serde_json::from_slice(&b).ok()))
}

fn checkpoints(store: &Store, chain: &str) -> Result<Vec<Checkpoint>> {
    store
        .scan(Space::Audit, key(chain, b'c', None))
        .filter_map(|kv| match kv {
            Ok((_, v)) => serde_json::from_slice(&v).ok().map(Ok),
            Err(e) => Some(Err(e)),
        })
        .collect()
}

/// `restore`: the chain continues from `base` when its node starts next
/// (the head the backup's data held is dropped).
pub fn write_base(store: &Store, chain: &str, b: &ChainBase) -> Result<()> {
    let mut c = Commit::default();
    c.remove(Space::Meta, head_key(chain));
    c.insert(
        Space::Audit,
        key(chain, b'b', None),
        serde_json::to_vec(b).expect("json"),
    );
    store.commit_blocking(&c)
}

/// Every chain of the store, with its head: those with entries or a head in
/// the data store, and those whose anchor is in the key store (a chain
/// removed from the data store whole is still checked, and found missing).
pub fn heads(store: &Store, keys: Option<&KeyStore>) -> Result<BTreeMap<String, Option<(u64, String)>>> {
    let mut out = BTreeMap::new();
    for kv in store.scan(Space::Meta, HEAD_PREFIX) {
        let (k, v) = kv?;
        let chain = String::from_utf8_lossy(&k[HEAD_PREFIX.len()..]).into_owned();
        out.insert(chain, Some(decode_head(&v)));
    }
    if let Some(keys) = keys {
        for kv in keys.store.scan(Space::Nodes, ANCHOR_PREFIX) {
            let (k, _) = kv?;
            let chain = String::from_utf8_lossy(&k[ANCHOR_PREFIX.len()..]).into_owned();
            out.entry(chain).or_insert(None);
        }
    }
    Ok(out)
}

/// One node's chain, as `verify` reads it.
pub(super) fn chain<'a>(store: &'a Store, keys: &KeyStore, chain: &str) -> Result<Chain<'a>> {
    let anchor = keys
        .store
        .get(Space::Nodes, anchor_key(chain))?
        .and_then(|b| serde_json::from_slice(&b).ok());
    Ok(Chain {
        node: Some(chain.to_owned()),
        lines: entry_lines(store, chain),
        base: base(store, chain)?,
        checkpoints: checkpoints(store, chain)?,
        anchor,
        names: Names {
            base: "the chain's base",
            checkpoints: "the chain's checkpoints",
            anchor: "the keys database",
        },
    })
}

/// A chain's entries in order, each as a line (with its newline).
fn entry_lines<'a>(store: &'a Store, chain: &str) -> Lines<'a> {
    Box::new(store.scan(Space::Audit, key(chain, b'e', None)).map(|kv| {
        kv.map(|(_, mut v)| {
            v.push(b'\n');
            v
        })
    }))
}

/// Every node's entries, merged in the order of their times.
pub(super) fn merged_lines<'a>(store: &'a Store) -> Result<Lines<'a>> {
    let mut chains: Vec<_> = heads(store, None)?
        .into_keys()
        .map(|c| entry_lines(store, &c).peekable())
        .collect();
    Ok(Box::new(std::iter::from_fn(move || {
        let mut first: Option<(usize, Vec<u8>)> = None;
        for (i, it) in chains.iter_mut().enumerate() {
            match it.peek() {
                None => {}
                Some(Err(_)) => return it.next(),
                Some(Ok(line)) => {
                    let at = time_of(line);
                    if first.as_ref().is_none_or(|(_, t)| at < t.as_slice()) {
                        first = Some((i, at.to_vec()));
                    }
                }
            }
        }
        chains[first?.0].next()
    })))
}

/// The `at` of an entry's JSON, without parsing the rest.
fn time_of(line: &[u8]) -> &[u8] {
    const AT: &[u8] = b"\"at\":\"";
    line.windows(AT.len())
        .position(|w| w == AT)
        .map(|p| {
            let rest = &line[p + AT.len()..];
            &rest[..rest.iter().position(|b| *b == b'"').unwrap_or(rest.len())]
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(action: &str) -> Draft {
        Draft {
            request_id: "r".into(),
            action: action.into(),
            ..Default::default()
        }
    }

    /// Two chains in one store (sled here, the engine does not matter):
    /// each verifies, export sees both in time order, and a removed or
    /// altered entry of either is found.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_chains_verify_merge_and_show_tampering() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(&d.path().join("data")).unwrap();
        let keys = KeyStore::open(&d.path().join("keys")).unwrap();
        let key = crate::crypto::ReceiptKey::generate();
        let (a, b) = (
            "aaaaaaaa-0000-4000-8000-000000000000",
            "bbbbbbbb-0000-4000-8000-000000000000",
        );
        let la = AuditLog::open_shared(&store, &keys, a).unwrap();
        let lb = AuditLog::open_shared(&store, &keys, b).unwrap();
        for i in 0..5 {
            la.append(vec![draft(&format!("a{i}"))]).await.unwrap();
            lb.append(vec![draft(&format!("b{i}")), draft("b")]).await.unwrap();
        }
        la.checkpoint(&key).unwrap();
        lb.checkpoint(&key).unwrap();
        let place = Place::Shared {
            store: store.clone(),
            keys: keys.clone(),
        };
        let pk = key.public_key();
        match verify(&place, &pk, &mut |_| {}).unwrap() {
            Verdict::Intact { entries, chains, .. } => assert_eq!((entries, chains), (15, 2)),
            v => panic!("{v:?}"),
        }
        let mut out = vec![];
        assert_eq!(export(&place, &ExportFilter::default(), &mut out).unwrap(), 15);
        let times: Vec<String> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<AuditEntry>(l).unwrap().at)
            .collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");

        // An altered entry of chain b.
        let k = key_of(b, 3);
        let mut e: AuditEntry = serde_json::from_slice(&store.get(Space::Audit, &k).unwrap().unwrap()).unwrap();
        e.action = "read".into();
        store.insert(Space::Audit, &k, serde_json::to_vec(&e).unwrap()).unwrap();
        assert!(matches!(
            verify(&place, &pk, &mut |_| {}).unwrap(),
            Verdict::Broken { .. }
        ));
        store.remove(Space::Audit, &k).unwrap();
        assert!(matches!(
            verify(&place, &pk, &mut |_| {}).unwrap(),
            Verdict::Broken { .. }
        ));
        // Chain a removed whole, head and all: its anchor still names it.
        let keys_a: Vec<_> = store.keys(Space::Audit, a.as_bytes()).unwrap();
        for k in keys_a {
            store.remove(Space::Audit, k).unwrap();
        }
        store.remove(Space::Meta, head_key(a)).unwrap();
        let only_a = Place::Shared {
            store: store.clone(),
            keys: keys.clone(),
        };
        match verify(&only_a, &pk, &mut |_| {}).unwrap() {
            Verdict::Broken { why, .. } => assert!(why.contains(a), "{why}"),
            v => panic!("a removed chain passed: {v:?}"),
        }
    }

    fn key_of(chain: &str, seq: u64) -> Vec<u8> {
        key(chain, b'e', Some(seq))
    }
}
