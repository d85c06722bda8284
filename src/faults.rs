//! Test-only fault points. In release builds every function here is inert;
//! in debug builds (the binary the integration tests run) a fault is armed by
//! an environment variable, so the tests can crash or break the real server:
//!
//! - `PDVAULT_FAULT_ROTATE_ABORT_AFTER=N`: abort the process after N data
//!   keys were re-wrapped by a rotation;
//! - `PDVAULT_FAULT_AUDIT_FILE=PATH`: while PATH exists, audit appends fail
//!   (see `audit.rs`).

pub fn rotate_abort_after() -> Option<u64> {
    if cfg!(debug_assertions) {
        std::env::var("PDVAULT_FAULT_ROTATE_ABORT_AFTER")
            .ok()
            .and_then(|v| v.parse().ok())
    } else {
        None
    }
}
