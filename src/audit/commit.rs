//! The committer of a node's audit chain, whichever medium keeps it: one
//! thread takes the entries waiting at once as a group (a large job, such as
//! a batch's thousand entries, a part at a time while small ones wait),
//! chains them (`seq`, `prev`, `hash`), hands the group to its [`Sink`] to
//! make durable in one go (one write and one `fdatasync` for a file, one
//! transaction for a database), and answers each caller whose entries are
//! all durable. Nothing advances on a failed group: the next chains from the
//! last durable entry.

use super::*;
use std::collections::VecDeque;
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

/// The most entries of one job chained before the committer looks for
/// waiting callers: a large job (a batch of 1,000) goes in parts, and the
/// small jobs that arrive meanwhile are committed after the part under way,
/// not after the whole job.
const PART: usize = 128;

/// A job taken from the channel, with what of it is chained so far.
struct Open {
    drafts: std::vec::IntoIter<Draft>,
    done: Vec<AuditEntry>,
    reply: oneshot::Sender<Result<Vec<AuditEntry>>>,
}

impl From<Job> for Open {
    fn from(j: Job) -> Open {
        Open {
            done: Vec::with_capacity(j.drafts.len()),
            drafts: j.drafts.into_iter(),
            reply: j.reply,
        }
    }
}

impl Open {
    fn small(&self) -> bool {
        self.drafts.len() <= PART
    }
}

/// Commits groups until every sender is gone. A group takes every small job
/// waiting whole, then the large ones a part at a time, and ends after the
/// first part that finds a small job in the group or waiting; a job is
/// answered when all its entries are durable, and fails with the first group
/// holding part of it that fails (its earlier parts stay in the chain, as
/// decisions recorded, like a group whose caller's store then fails).
fn run(head: &Mutex<(u64, String)>, node: Option<&str>, sink: &mut dyn Sink, rx: &mpsc::Receiver<Job>) {
    let mut queue: VecDeque<Open> = VecDeque::new();
    loop {
        if queue.is_empty() {
            match rx.recv() {
                Ok(j) => queue.push_back(j.into()),
                Err(_) => return,
            }
        }
        queue.extend(rx.try_iter().map(Open::from));
        let at = crate::fsutil::rfc3339_millis(crate::fsutil::now_millis());
        let before = head.lock().expect("audit lock").clone();
        let (mut seq, mut hash) = before.clone();
        let mut entries = Vec::new();
        // (index in `queue`, entries of it in this group)
        let mut parts: Vec<(usize, usize)> = Vec::new();
        let mut chain = |job: &mut Open, n: usize, entries: &mut Vec<AuditEntry>| {
            for d in job.drafts.by_ref().take(n) {
                seq += 1;
                let e = AuditEntry::chained(seq, &at, d, &hash, node);
                hash.clone_from(&e.hash);
                entries.push(e);
            }
        };
        for (i, job) in queue.iter_mut().enumerate().filter(|(_, j)| j.small()) {
            let n = job.drafts.len();
            chain(job, n, &mut entries);
            parts.push((i, n));
        }
        // Callers of small jobs wait for this group: the large jobs give it
        // one part each, until the first part after which one is waiting.
        let mut small_waiting = !parts.is_empty();
        'large: for i in 0..queue.len() {
            while queue[i].drafts.len() > 0 {
                let n = queue[i].drafts.len().min(PART);
                chain(&mut queue[i], n, &mut entries);
                match parts.last_mut() {
                    Some((j, m)) if *j == i => *m += n,
                    _ => parts.push((i, n)),
                }
                let arrived: Vec<Open> = rx.try_iter().map(Open::from).collect();
                small_waiting |= arrived.iter().any(Open::small);
                queue.extend(arrived);
                if small_waiting {
                    break 'large;
                }
            }
        }
        let r = sink.commit(&before, &entries);
        if r.is_ok() {
            *head.lock().expect("audit lock") = (seq, hash);
        }
        let mut rest = entries.into_iter();
        let mut failed = Vec::new();
        for (i, n) in parts {
            match &r {
                Ok(()) => queue[i].done.extend(rest.by_ref().take(n)),
                Err(_) => failed.push(i),
            }
        }
        // Answer the finished jobs and the failed ones, keep the rest in order.
        let mut kept = VecDeque::with_capacity(queue.len());
        for (i, job) in queue.drain(..).enumerate() {
            if failed.contains(&i) {
                let _ = job.reply.send(Err(VaultError::AuditUnavailable));
            } else if job.drafts.len() == 0 {
                let _ = job.reply.send(Ok(job.done));
            } else {
                kept.push_back(job);
            }
        }
        queue = kept;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    use std::time::Duration;

    /// Holds each group until told to go, and notes its size.
    struct Gate {
        sizes: Arc<Mutex<Vec<usize>>>,
        entered: mpsc::Sender<()>,
        go: mpsc::Receiver<()>,
    }

    impl Sink for Gate {
        fn commit(&mut self, _: &(u64, String), entries: &[AuditEntry]) -> Result<()> {
            self.sizes.lock().unwrap().push(entries.len());
            self.entered.send(()).unwrap();
            self.go.recv().unwrap();
            Ok(())
        }
    }

    fn poll<T>(f: &mut std::pin::Pin<Box<impl Future<Output = T>>>) -> Poll<T> {
        f.as_mut().poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn a_small_job_is_not_held_behind_the_whole_of_a_large_one() {
        let sizes = Arc::new(Mutex::new(vec![]));
        let (entered, entered_rx) = mpsc::channel();
        let (go, go_rx) = mpsc::channel();
        let gate = Gate {
            sizes: sizes.clone(),
            entered,
            go: go_rx,
        };
        let c = Committer::spawn((0, GENESIS.to_owned()), None, gate).unwrap();
        let wait = |what: &str| {
            entered_rx
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("{what} never reached the sink (sizes {:?})", sizes.lock().unwrap()))
        };
        // The committer is held in a first group while a batch of 1,000 and
        // then one read's entry wait.
        let mut first = Box::pin(c.append(vec![Draft::default()]));
        assert!(poll(&mut first).is_pending());
        wait("the first group");
        let mut large = Box::pin(c.append(vec![Draft::default(); 1000]));
        let mut small = Box::pin(c.append(vec![Draft::default()]));
        assert!(poll(&mut large).is_pending() && poll(&mut small).is_pending());
        go.send(()).unwrap();
        wait("the second group");
        go.send(()).unwrap();
        // The read's entry went with one part of the batch, not all of it.
        wait("the rest of the batch");
        assert_eq!(*sizes.lock().unwrap(), vec![1, 1 + PART, 1000 - PART]);
        let Poll::Ready(Ok(mine)) = poll(&mut small) else {
            panic!("the small job was not answered after its group")
        };
        assert_eq!(mine.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2]);
        assert!(
            poll(&mut large).is_pending(),
            "the batch was answered before all of it was durable"
        );
        go.send(()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let batch = loop {
            if let Poll::Ready(r) = poll(&mut large) {
                break r.unwrap();
            }
            assert!(std::time::Instant::now() < deadline, "the batch was never answered");
            std::thread::sleep(Duration::from_millis(5));
        };
        // One chain through the groups: the batch's entries follow the read's.
        assert_eq!(batch.first().unwrap().prev, mine[0].hash);
        assert!(batch
            .windows(2)
            .all(|w| w[1].seq == w[0].seq + 1 && w[1].prev == w[0].hash));
        assert!(matches!(poll(&mut first), Poll::Ready(Ok(_))));
    }
}
