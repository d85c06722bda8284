//! Several nodes on one shared store (the postgres backend): who else is
//! serving, which key epochs each has taken up, and the record of the
//! epochs in the keys database.
//!
//! The epochs live in the keys database ([`EpochsInKeyStore`]), so a key
//! that another node re-wrapped opens here too (the keyring reloads an epoch
//! it does not know). What must not happen is a node wrapping a new data key
//! under an epoch that a rotation elsewhere has already passed over, since
//! that epoch is destroyed later. Hence:
//! - each node announces itself every `HEARTBEAT` with the serial of the
//!   epochs it wraps under; it takes up a newer record only after the writes
//!   it has in flight under the old one have landed (the write gate);
//! - a rotation makes its new epoch current, then waits until every node
//!   that announced itself within `LIVE_WINDOW` has taken it up, and only
//!   then re-wraps (`Vault::rotate_kek`);
//! - before a retired epoch is destroyed, the keys still under it are
//!   re-wrapped (a node that was cut off and came back may have left some).
//!
//! A node is its data directory: its id is kept in `<data dir>/node.id`, so a
//! node restarted after a crash is the same node, not a second one.

use super::*;
use std::time::Duration;

/// How often a node on a shared store announces itself.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// How recent an announcement must be for its node to count as serving.
pub const LIVE_WINDOW: Duration = Duration::from_secs(15);
/// How long a rotation waits for the serving nodes to take up its epoch.
const TAKE_UP_WAIT: Duration = Duration::from_secs(60);

const EPOCHS: &str = "epochs";
const NODE_PREFIX: &[u8] = b"node/";
pub(super) const NODE_ID_FILE: &str = "node.id";

/// This node's id: read from its data directory, made there at the first
/// start.
pub(super) fn node_id(data_dir: &std::path::Path) -> Result<String> {
    let path = data_dir.join(NODE_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) if uuid::Uuid::parse_str(s.trim()).is_ok() => Ok(s.trim().to_owned()),
        Ok(_) => Err(VaultError::Internal(format!("{} holds no node id", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = uuid::Uuid::new_v4().to_string();
            crate::fsutil::create_private_dir(data_dir)?;
            crate::fsutil::write_atomic(&path, id.as_bytes())?;
            Ok(id)
        }
        Err(e) => Err(e.into()),
    }
}

/// A keyring failure as the caller sees it: a rotation that another node
/// runs, or that lost a race, is refused; the rest is internal.
pub(super) fn keyring_error(e: crate::keyring::KeyringError) -> VaultError {
    use crate::keyring::KeyringError::*;
    match e {
        RotationElsewhere { .. } | Raced => VaultError::BadRequest(e.to_string()),
        e => VaultError::Internal(e.to_string()),
    }
}

/// The keyring's epochs as one record of the key store, replaced by
/// compare-and-swap.
pub(super) struct EpochsInKeyStore(pub KeyStore);

impl crate::keyring::SharedEpochs for EpochsInKeyStore {
    fn load(&self) -> std::result::Result<Option<Vec<u8>>, String> {
        self.0.store.get(Space::Nodes, EPOCHS).map_err(|e| e.to_string())
    }

    fn replace(&self, expected: Option<&[u8]>, new: &[u8]) -> std::result::Result<bool, String> {
        let mut c = Commit::default();
        c.expect(Space::Nodes, EPOCHS, expected);
        c.insert(Space::Nodes, EPOCHS, new);
        match self.0.store.commit_blocking(&c) {
            Ok(()) => Ok(true),
            Err(VaultError::VersionConflict { .. }) => Ok(false),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// A node's announcement: when, and the serial of the epochs it wraps under.
fn announcement(at: u64, serial: u64) -> Vec<u8> {
    [at.to_be_bytes(), serial.to_be_bytes()].concat()
}

fn read_announcement(v: &[u8]) -> (u64, u64) {
    let at = crate::storage::read_u64(v.get(..8).unwrap_or_default());
    let serial = crate::storage::read_u64(v.get(8..16).unwrap_or_default());
    (at, serial)
}

impl Vault {
    /// Whether other nodes may share this vault's store.
    pub fn on_shared_store(&self) -> bool {
        self.cfg.storage.backend == crate::config::Backend::Postgres
    }

    fn node_key(&self) -> Vec<u8> {
        [NODE_PREFIX, self.node_id.as_bytes()].concat()
    }

    /// Records that this node serves, now, wrapping under the epochs it has.
    pub fn announce(&self) -> Result<()> {
        let serial = self.keyring.epochs_serial();
        self.keystore
            .store
            .insert(Space::Nodes, self.node_key(), announcement(now_secs(), serial))?;
        self.announced_serial.store(serial, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Withdraws this node's announcement (a clean stop).
    pub fn leave(&self) -> Result<()> {
        self.keystore.store.remove(Space::Nodes, self.node_key())
    }

    /// The heartbeat: takes up the epochs as the keys database has them, and
    /// announces this node. A newer record is announced only once the writes
    /// in flight under the older one have landed, so that a rotation that
    /// sees the announcement knows no key is still being wrapped under an
    /// epoch it passed over.
    pub async fn heartbeat(&self) -> Result<()> {
        self.keyring.refresh().map_err(keyring_error)?;
        // (A read may have taken up a newer record already, between beats.)
        if self.keyring.epochs_serial() != self.announced_serial.load(std::sync::atomic::Ordering::SeqCst) {
            drop(self.gate.write().await);
        }
        self.announce()
    }

    /// Other nodes that announced themselves recently: id and the serial of
    /// the epochs they wrap under.
    fn other_live_nodes(&self) -> Result<Vec<(String, u64)>> {
        let since = now_secs().saturating_sub(LIVE_WINDOW.as_secs());
        let mut out = vec![];
        for kv in self.keystore.store.scan(Space::Nodes, NODE_PREFIX) {
            let (k, v) = kv?;
            let id = String::from_utf8_lossy(&k[NODE_PREFIX.len()..]).into_owned();
            let (at, serial) = read_announcement(&v);
            if id != self.node_id && at >= since {
                out.push((id, serial));
            }
        }
        Ok(out)
    }

    /// Whether the node `id` announced itself recently (it may be running a
    /// rotation of its own).
    pub(super) fn is_serving(&self, id: &str) -> bool {
        id == self.node_id
            || self
                .other_live_nodes()
                .is_ok_and(|nodes| nodes.iter().any(|(n, _)| n == id))
    }

    /// This node's id where the store is shared (rotations name their node).
    pub(super) fn shared_node_id(&self) -> Option<&str> {
        self.on_shared_store().then_some(self.node_id.as_str())
    }

    /// After a rotation made its epoch current: waits until every serving
    /// node has taken up the epochs of `serial` or newer.
    pub(super) async fn wait_for_take_up(&self, serial: u64) -> Result<()> {
        if !self.on_shared_store() {
            return Ok(());
        }
        let deadline = std::time::Instant::now() + TAKE_UP_WAIT;
        loop {
            let behind: Vec<String> = self
                .other_live_nodes()?
                .into_iter()
                .filter(|(_, s)| *s < serial)
                .map(|(id, _)| id)
                .collect();
            if behind.is_empty() {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(VaultError::Internal(format!(
                    "node(s) {} serve but have not taken up the new key epoch within {} s; the rotation resumes at the next attempt",
                    behind.join(", "),
                    TAKE_UP_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
