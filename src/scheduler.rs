//! Background duties of a running server: scheduled key rotation, destruction
//! of retired epochs past retention, the retention sweeper and signed audit
//! checkpoints. Owns only the timing; the work is the vault core's.

use crate::fsutil::{now_secs, rfc3339};
use crate::vault::Vault;
use std::sync::Arc;
use std::time::Duration;

/// How often the scheduler wakes.
pub const TICK: Duration = Duration::from_secs(60);

/// On a shared store: every `HEARTBEAT`, takes up the key epochs as the
/// keys database has them and announces this node (so that a rotation
/// elsewhere knows it serves, and under which epochs). `None` on a store of
/// its own.
pub fn spawn_heartbeat(vault: Arc<Vault>) -> Option<tokio::task::JoinHandle<()>> {
    vault.on_shared_store().then(|| {
        tokio::spawn(async move {
            loop {
                if let Err(e) = vault.heartbeat().await {
                    tracing::error!(error = %e, "could not announce this node");
                }
                tokio::time::sleep(crate::vault::HEARTBEAT).await;
            }
        })
    })
}

pub fn spawn(vault: Arc<Vault>, tick: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (mut last_sweep, mut last_token_sweep) = (0u64, 0u64);
        // The schedule runs from the last signed checkpoint on disk, not from
        // this start: a server that restarts often still signs on time.
        let mut last_checkpoint = vault.last_checkpoint_at().unwrap_or(0);
        // An interrupted rotation is finished first.
        if vault.keyring().rotation().is_some() {
            match vault.rotate_kek().await {
                Ok((epoch, n)) => tracing::info!(epoch, rewrapped = n, "finished an interrupted key rotation"),
                Err(e) => tracing::error!(error = %e, "could not finish an interrupted key rotation"),
            }
        }
        loop {
            let now = now_secs();
            let cfg = &vault.cfg;
            if now >= vault.keyring().last_rotation_at() + cfg.keys.rotate_every.as_secs() {
                match vault.rotate_kek().await {
                    Ok((epoch, n)) => tracing::info!(epoch, rewrapped = n, "scheduled key rotation done"),
                    Err(e) => tracing::error!(error = %e, "scheduled key rotation failed"),
                }
            }
            if let Err(e) = vault.destroy_expired_epochs().await {
                tracing::error!(error = %e, "could not destroy expired epochs");
            }
            if let Err(e) = vault.sweep_self_codes(now) {
                tracing::error!(error = %e, "could not drop expired self-service codes");
            }
            if now >= last_token_sweep + cfg.retention.sweep_every.as_secs() {
                last_token_sweep = now;
                // A scan of every token record: off the worker's queue.
                match crate::runtime::off_the_queue(|| vault.sweep_expired_tokens(now)) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(dropped = n, "expired tokens' records dropped"),
                    Err(e) => tracing::error!(error = %e, "could not drop expired tokens' records"),
                }
            }
            if let Some(after) = cfg.retention.inactive_after {
                if now >= last_sweep + cfg.retention.sweep_every.as_secs() {
                    last_sweep = now;
                    let cutoff = now.saturating_sub(after.as_secs());
                    let why = format!(
                        "retention.inactive_after = {}: no write since {}",
                        humantime::format_duration(after),
                        rfc3339(cutoff)
                    );
                    match vault.sweep_inactive(cutoff, &why).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(erased = n, "retention sweep"),
                        Err(e) => tracing::error!(error = %e, "retention sweep failed"),
                    }
                }
            }
            if now >= last_checkpoint + cfg.audit.checkpoint_every.as_secs() {
                last_checkpoint = now;
                if let Err(e) = vault.audit_checkpoint() {
                    tracing::error!(error = %e, "audit checkpoint failed");
                }
            }
            tokio::time::sleep(tick).await;
        }
    })
}
