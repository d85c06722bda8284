//! Several nodes on one shared store (the postgres backend): who else is
//! serving, and the key-epoch floor.
//!
//! Key epochs still live in each node's copy of `keys/master.key`, so a
//! rotation on one node would leave every other node unable to open the keys
//! it re-wrapped. Until epochs move into the keys database, two rules keep
//! every read working:
//! - a rotation (asked for or scheduled) is refused while another node has
//!   announced itself within `LIVE_WINDOW`; each node announces itself every
//!   `HEARTBEAT` in the key store;
//! - a rotation first raises the epoch floor in the key store, and a node
//!   whose keys directory is older than the floor refuses to start, naming
//!   the file to copy.
//!
//! A node is its data directory: its id is kept in `<data dir>/node.id`, so a
//! node restarted after a crash is the same node, not a second one.

use super::*;
use std::time::Duration;

/// How often a node on a shared store announces itself.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// How recent an announcement must be for its node to count as serving.
pub const LIVE_WINDOW: Duration = Duration::from_secs(15);

const FLOOR: &str = "epoch_floor";
const NODE_PREFIX: &[u8] = b"node/";
const NODE_ID_FILE: &str = "node.id";

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

impl Vault {
    /// Whether other nodes may share this vault's store.
    pub fn on_shared_store(&self) -> bool {
        self.cfg.storage.backend == crate::config::Backend::Postgres
    }

    /// Records that this node serves, now.
    pub fn announce(&self) -> Result<()> {
        let mut k = NODE_PREFIX.to_vec();
        k.extend_from_slice(self.node_id.as_bytes());
        self.keystore.store.insert(Space::Nodes, k, now_secs().to_be_bytes())
    }

    /// Withdraws this node's announcement (a clean stop).
    pub fn leave(&self) -> Result<()> {
        let mut k = NODE_PREFIX.to_vec();
        k.extend_from_slice(self.node_id.as_bytes());
        self.keystore.store.remove(Space::Nodes, k)
    }

    /// Nodes other than this one that announced themselves recently.
    pub fn other_live_nodes(&self) -> Result<usize> {
        let since = now_secs().saturating_sub(LIVE_WINDOW.as_secs());
        let mut n = 0;
        for kv in self.keystore.store.scan(Space::Nodes, NODE_PREFIX) {
            let (k, v) = kv?;
            if &k[NODE_PREFIX.len()..] != self.node_id.as_bytes() && crate::storage::read_u64(&v) >= since {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Refuses a rotation while other nodes serve the same store.
    pub(super) fn check_rotation_alone(&self) -> Result<()> {
        if !self.on_shared_store() {
            return Ok(());
        }
        match self.other_live_nodes()? {
            0 => Ok(()),
            n => Err(VaultError::BadRequest(format!(
                "key rotation is refused while {n} other node(s) serve this database: key epochs are kept in each node's keys directory, so stop the other nodes, rotate, then copy keys/master.key to them"
            ))),
        }
    }

    /// Before any key is wrapped under `epoch`: no node with an older keys
    /// directory may start from now on.
    pub(super) fn raise_epoch_floor(&self, epoch: u32) -> Result<()> {
        if !self.on_shared_store() {
            return Ok(());
        }
        let mut c = Commit::default();
        c.insert(Space::Nodes, FLOOR, u64::from(epoch).to_be_bytes());
        self.keystore.store.commit_blocking(&c)
    }
}

/// At open: refuses a keys directory older than the store's epoch floor.
pub(super) fn check_epoch_floor(keystore: &KeyStore, keyring: &Keyring) -> Result<()> {
    let floor = keystore
        .store
        .get(Space::Nodes, FLOOR)?
        .map_or(0, |b| crate::storage::read_u64(&b));
    if floor > u64::from(keyring.current_epoch()) {
        return Err(VaultError::Internal(format!(
            "the keys database is at key epoch {floor}, this keys directory at {}: copy keys/master.key from the node that rotated",
            keyring.current_epoch()
        )));
    }
    Ok(())
}
