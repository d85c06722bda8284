//! Long synchronous work on the async runtime's workers. Owns the rule that
//! it must not hold the requests queued behind it: work that holds a thread
//! for tens of milliseconds at once (a batch's unit of thousands of changes
//! applied to a store) leaves the worker's queue to another thread first and
//! waits its turn without a thread (one at a time per store, as its engine
//! applies them anyway); work done item by item (a batch's subjects checked
//! and sealed) yields to the runtime every [`YIELD_EVERY`] items. README,
//! "The thirteenth pass", has the numbers behind both.

use tokio::sync::Semaphore;

/// Items of long work done between two yields ([`pause_every`]).
pub const YIELD_EVERY: usize = 32;

/// Yields to the runtime after every [`YIELD_EVERY`] items, `i` counting
/// from 0, so that the tasks queued on this worker run in between.
pub async fn pause_every(i: usize) {
    if i % YIELD_EVERY == YIELD_EVERY - 1 {
        tokio::task::yield_now().await;
    }
}

/// Runs `f` once it has a permit of `turn` (the long work of one resource
/// waits its turn there without holding a thread), off the worker's queue
/// ([`off_the_queue`]).
pub async fn long_work<R>(turn: &Semaphore, f: impl FnOnce() -> R) -> R {
    let _turn = turn.acquire().await.expect("never closed");
    off_the_queue(f)
}

/// Runs `f` on this thread: on a worker of a multi-threaded runtime, having
/// handed the worker's queue on (`block_in_place`); elsewhere (a
/// single-threaded runtime, a plain thread) in place.
pub fn off_the_queue<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};
    use std::time::Duration;

    fn one_worker() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_task_queued_behind_long_work_runs_while_it_holds_the_only_worker() {
        let rt = one_worker();
        let (started, started_rx) = mpsc::channel();
        let (done, done_rx) = mpsc::channel::<()>();
        let turn = Semaphore::new(1);
        let long = rt.spawn(async move {
            long_work(&turn, move || {
                started.send(()).unwrap();
                // Only the other task can end this wait in time.
                done_rx.recv_timeout(Duration::from_secs(10)).is_ok()
            })
            .await
        });
        started_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        rt.spawn(async move { done.send(()).unwrap() });
        assert!(
            rt.block_on(long).unwrap(),
            "the task queued behind the long work did not run until it ended"
        );
    }

    #[test]
    fn long_work_of_one_turn_runs_one_at_a_time() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let (started, started_rx) = mpsc::channel();
        let (go, go_rx) = mpsc::channel::<()>();
        let turn = Arc::new(Semaphore::new(1));
        let t = turn.clone();
        let first = rt.spawn(async move {
            long_work(&t, move || {
                started.send(()).unwrap();
                go_rx.recv_timeout(Duration::from_secs(10)).unwrap();
            })
            .await
        });
        started_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let entered = Arc::new(AtomicBool::new(false));
        let second = rt.spawn({
            let entered = entered.clone();
            async move { long_work(&turn, move || entered.store(true, Ordering::SeqCst)).await }
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(!entered.load(Ordering::SeqCst), "two long works ran at once");
        go.send(()).unwrap();
        rt.block_on(async {
            first.await.unwrap();
            second.await.unwrap()
        });
        assert!(entered.load(Ordering::SeqCst));
    }
}
