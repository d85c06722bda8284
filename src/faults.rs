//! Test-only fault points. In release builds every function here is inert;
//! in debug builds (the binary the integration tests run) a fault is armed by
//! an environment variable, so the tests can crash or break the real server:
//!
//! - `PDVAULT_FAULT_ROTATE_ABORT_AFTER=N`: abort the process after N data
//!   keys were re-wrapped by a rotation;
//! - `PDVAULT_FAULT_AUDIT_FILE=PATH`: while PATH exists, audit appends fail
//!   (see `audit.rs`);
//! - `PDVAULT_FAULT_ENOSPC_FILE=PATH`: while PATH exists, the audit log's
//!   writes and every store flush fail as a full disk does (`ENOSPC`);
//! - `PDVAULT_FAULT_KEYRING_WRITE_FILE=PATH`: while PATH exists, writing
//!   the key epochs (`master.key`, or their record in a keys database) fails;
//! - `PDVAULT_FAULT_AUDIT_SYNC_HOLD_FILE=PATH`: while PATH exists, the audit
//!   log's `fdatasync` waits (so a test can see that no answer leaves before it);
//! - `PDVAULT_FAULT_BACKUP_HOLD_FILE=PATH`: while PATH exists, a backup
//!   waits once its copy has begun (`PATH.held` appears), so a test can
//!   write meanwhile;
//! - `PDVAULT_FAULT_LEDGER_COMPACT_HOLD_FILE=PATH`: while PATH exists, a
//!   compaction of a shared ledger waits between reading the ledger and
//!   committing its rewrite (`PATH.held` appears), so a test can append
//!   meanwhile;
//! - `PDVAULT_FAULT_TOKEN_FILL_PAUSE=CALLER:MS`: a token lookup of that caller
//!   pauses MS milliseconds between loading the record and caching it.

use std::path::PathBuf;

fn var(name: &str) -> Option<String> {
    if cfg!(debug_assertions) {
        std::env::var(name).ok()
    } else {
        None
    }
}

pub fn rotate_abort_after() -> Option<u64> {
    var("PDVAULT_FAULT_ROTATE_ABORT_AFTER").and_then(|v| v.parse().ok())
}

/// The path of a file-armed fault point, if the variable is set.
pub fn armed_path(name: &str) -> Option<PathBuf> {
    var(name).map(PathBuf::from)
}

/// Whether a file-armed fault is armed now.
pub fn armed(name: &str) -> bool {
    armed_path(name).is_some_and(|p| p.exists())
}

/// The error a full disk gives, when `PDVAULT_FAULT_ENOSPC_FILE` is armed.
pub fn enospc() -> std::io::Result<()> {
    if armed("PDVAULT_FAULT_ENOSPC_FILE") {
        return Err(std::io::Error::from(std::io::ErrorKind::StorageFull));
    }
    Ok(())
}

/// Blocks while the hold file of `name` exists (checked every 10 ms), and
/// says so meanwhile with a file beside it, `<hold file>.held`.
pub fn hold(name: &str) {
    if let Some(p) = armed_path(name) {
        if p.exists() {
            let mut held = p.clone().into_os_string();
            held.push(".held");
            let _ = std::fs::write(held, b"");
        }
        while p.exists() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// Sleeps when the variable names `tag` (`TAG:MS`).
pub fn pause(name: &str, tag: &str) {
    if let Some(v) = var(name) {
        if let Some((t, ms)) = v.split_once(':') {
            if t == tag {
                // The worker's other tasks move to another thread meanwhile,
                // so the rest of the server runs on (as it would in a race).
                let d = std::time::Duration::from_millis(ms.parse().unwrap_or(0));
                tokio::task::block_in_place(|| std::thread::sleep(d));
            }
        }
    }
}
