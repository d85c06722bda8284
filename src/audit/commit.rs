//! The committer of a node's audit chain, whichever medium keeps it: one
//! thread takes every group of entries waiting at once, chains them (`seq`,
//! `prev`, `hash`), hands the whole group to its [`Sink`] to make durable in
//! one go (one write and one `fdatasync` for a file, one transaction for a
//! database), and answers each caller. Nothing advances on a failed group:
//! the next chains from the last durable entry.

use super::*;
use std::sync::{mpsc, Arc};
use tokio::sync::oneshot;

/// Where a committer makes a group durable.
pub(super) trait Sink: Send + 'static {
    /// Makes `entries`, which follow `before` (seq, hash), durable with
    /// their access-log records. An error: none of them may count (it is
    /// the sink's to log why; the callers are answered `audit_unavailable`).
    fn commit(&mut self, before: &(u64, String), entries: &[AuditEntry]) -> Result<()>;
}

struct Job {
    drafts: Vec<Draft>,
    reply: oneshot::Sender<Result<Vec<AuditEntry>>>,
}

pub(super) struct Committer {
    jobs: Mutex<mpsc::Sender<Job>>,
    head: Arc<Mutex<(u64, String)>>,
}

impl Committer {
    /// Starts the committer of a chain whose last durable entry is `head`;
    /// `node` names the chain among several nodes' (it is in each entry).
    pub(super) fn spawn(head: (u64, String), node: Option<String>, mut sink: impl Sink) -> Result<Committer> {
        let head = Arc::new(Mutex::new(head));
        let (tx, rx) = mpsc::channel::<Job>();
        let shared = head.clone();
        std::thread::Builder::new()
            .name("audit-commit".into())
            .spawn(move || run(&shared, node.as_deref(), &mut sink, &rx))?;
        Ok(Committer {
            jobs: Mutex::new(tx),
            head,
        })
    }

    /// Chains and commits the entries; returns once they are durable.
    pub(super) async fn append(&self, drafts: Vec<Draft>) -> Result<Vec<AuditEntry>> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .lock()
            .expect("audit lock")
            .send(Job { drafts, reply })
            .map_err(|_| VaultError::AuditUnavailable)?;
        rx.await.map_err(|_| VaultError::AuditUnavailable)?
    }

    /// The last durable entry: (seq, hash).
    pub(super) fn head(&self) -> (u64, String) {
        self.head.lock().expect("audit lock").clone()
    }
}

fn run(head: &Mutex<(u64, String)>, node: Option<&str>, sink: &mut dyn Sink, rx: &mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        jobs.extend(rx.try_iter());
        let at = crate::fsutil::rfc3339_millis(crate::fsutil::now_millis());
        let before = head.lock().expect("audit lock").clone();
        let (mut seq, mut hash) = before.clone();
        let mut entries = Vec::with_capacity(jobs.iter().map(|j| j.drafts.len()).sum());
        let mut replies = Vec::with_capacity(jobs.len());
        for job in jobs {
            replies.push((job.reply, job.drafts.len()));
            for d in job.drafts {
                seq += 1;
                let e = AuditEntry::chained(seq, &at, d, &hash, node);
                hash.clone_from(&e.hash);
                entries.push(e);
            }
        }
        let r = sink.commit(&before, &entries);
        if r.is_ok() {
            *head.lock().expect("audit lock") = (seq, hash);
        }
        let mut rest = entries.into_iter();
        for (reply, n) in replies {
            let mine: Vec<AuditEntry> = rest.by_ref().take(n).collect();
            let _ = reply.send(match &r {
                Ok(()) => Ok(mine),
                Err(_) => Err(VaultError::AuditUnavailable),
            });
        }
    }
}
