//! One runtime for every background job: a [`Worker`] does steps of work, a
//! runner calls it, and the [`Workers`] registry shows each one's state.
//!
//! A worker's step returns whether more work is waiting ([`Step::Busy`]: run
//! again at once) or not ([`Step::Idle`]: run again after its interval, or
//! sooner when someone [wakes](WorkerHandle::wake) it). A step that fails is
//! retried with exponential backoff (1 s doubling to 5 min) and its error is
//! kept for `fincryptctl workers` until a step succeeds again: a worker never
//! dies of an error, and never fails silently.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

/// What one step of work left behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// More is waiting: step again at once. `done` counts items handled.
    Busy { done: u64 },
    /// Nothing waiting: step again after the interval or a wake.
    Idle { done: u64 },
}

/// A background job, stepped by the runner until the registry shuts down.
pub trait Worker: Send + 'static {
    /// A short name, unique in its registry (`replication`, `proofs`, ...).
    fn name(&self) -> &'static str;
    /// Does one bounded piece of work. An `Err` is shown and retried with backoff.
    fn step(&mut self) -> BoxFuture<'_, Result<Step, String>>;
    /// Items waiting to be handled, for workers that keep a queue.
    fn queue_len(&self) -> Option<u64> {
        None
    }
}

/// The state of a worker, as `fincryptctl workers` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Stepping now.
    Busy,
    /// Waiting for its interval or a wake.
    Idle,
    /// Its last step failed; it retries after a backoff.
    Failing,
    /// Shut down.
    Stopped,
}

/// What the registry knows of one worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// The worker's name.
    pub name: String,
    /// Busy, idle, failing or stopped.
    pub state: WorkerState,
    /// Seconds between idle steps.
    pub interval_secs: u64,
    /// Unix time (seconds) the last step ended, if one has.
    pub last_run: Option<u64>,
    /// Steps taken.
    pub steps: u64,
    /// Items handled in all.
    pub work_done: u64,
    /// Items waiting, for workers that keep a queue.
    pub queue: Option<u64>,
    /// Steps that failed.
    pub errors: u64,
    /// The error of the last step, while it keeps failing.
    pub last_error: Option<String>,
}

/// Wakes a worker before its interval is over.
#[derive(Clone)]
pub struct WorkerHandle {
    wake: Arc<Notify>,
}

impl WorkerHandle {
    /// Has the worker step as soon as it can (once, however often called meanwhile).
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

/// The backoff after a failure: 1 s, doubling, at most 5 min.
fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(8)).min(Duration::from_secs(300))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Every worker of a daemon, run on one tokio runtime.
pub struct Workers {
    handle: tokio::runtime::Handle,
    statuses: Mutex<Vec<Arc<Mutex<WorkerStatus>>>>,
    stop: watch::Sender<bool>,
    tasks: Mutex<JoinSet<()>>,
}

impl Workers {
    /// A registry whose workers run on `handle`'s runtime.
    pub fn new(handle: tokio::runtime::Handle) -> Workers {
        Workers {
            handle,
            statuses: Mutex::new(Vec::new()),
            stop: watch::Sender::new(false),
            tasks: Mutex::new(JoinSet::new()),
        }
    }

    /// The runtime the workers run on.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// Starts `worker`, stepping it at least every `interval` while idle.
    pub fn spawn(&self, worker: impl Worker, interval: Duration) -> WorkerHandle {
        let status = Arc::new(Mutex::new(WorkerStatus {
            name: worker.name().to_owned(),
            state: WorkerState::Idle,
            interval_secs: interval.as_secs(),
            last_run: None,
            steps: 0,
            work_done: 0,
            queue: worker.queue_len(),
            errors: 0,
            last_error: None,
        }));
        lock(&self.statuses).push(status.clone());
        let wake = Arc::new(Notify::new());
        let run = run(
            worker,
            interval,
            status,
            wake.clone(),
            self.stop.subscribe(),
        );
        lock(&self.tasks).spawn_on(run, &self.handle);
        WorkerHandle { wake }
    }

    /// The state of every worker, in the order they were started.
    pub fn list(&self) -> Vec<WorkerStatus> {
        lock(&self.statuses)
            .iter()
            .map(|s| lock(s).clone())
            .collect()
    }

    /// Stops every worker after its current step and waits for them.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let mut tasks = std::mem::take(&mut *lock(&self.tasks));
        while let Some(done) = tasks.join_next().await {
            if let Err(e) = done {
                tracing::error!(error = %e, "a worker task failed");
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn run(
    mut worker: impl Worker,
    interval: Duration,
    status: Arc<Mutex<WorkerStatus>>,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let name = worker.name();
    let mut failures = 0u32;
    // The first step waits for the interval too, as a timer would.
    let mut pause = interval;
    loop {
        // The state it waits in was set with the last step's counts (Idle
        // before the first).
        if !pause.is_zero() {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = tokio::time::sleep(pause) => {}
                // A wake ends a backoff too: whoever woke it wants it to try now.
                _ = wake.notified() => {}
            }
        }
        if *stop.borrow() {
            break;
        }
        // A retry after failures stays `Failing` until it succeeds: its
        // error is still the last word on it.
        lock(&status).state = if failures > 0 {
            WorkerState::Failing
        } else {
            WorkerState::Busy
        };
        let result = tokio::select! {
            r = worker.step() => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        let mut s = lock(&status);
        s.steps += 1;
        s.last_run = Some(unix_now());
        s.queue = worker.queue_len();
        pause = match result {
            Ok(step) => {
                failures = 0;
                s.last_error = None;
                match step {
                    Step::Busy { done } => {
                        s.work_done += done;
                        Duration::ZERO
                    }
                    Step::Idle { done } => {
                        s.work_done += done;
                        interval
                    }
                }
            }
            Err(e) => {
                failures += 1;
                s.errors += 1;
                tracing::warn!(worker = name, error = %e, failures, "background work failed; retrying");
                s.last_error = Some(e);
                backoff(failures)
            }
        };
        // Set with the counts, in one critical section: a reader never sees
        // the new error count beside the state of before.
        s.state = if failures > 0 {
            WorkerState::Failing
        } else if pause.is_zero() {
            WorkerState::Busy
        } else {
            WorkerState::Idle
        };
    }
    lock(&status).state = WorkerState::Stopped;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// Fails while `broken` is set, otherwise handles one item per step.
    struct Flaky {
        broken: Arc<AtomicBool>,
        steps: Arc<AtomicU64>,
    }

    impl Worker for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        fn step(&mut self) -> BoxFuture<'_, Result<Step, String>> {
            Box::pin(async move {
                self.steps.fetch_add(1, Ordering::SeqCst);
                if self.broken.load(Ordering::SeqCst) {
                    Err("the volume is read-only".to_owned())
                } else {
                    Ok(Step::Idle { done: 1 })
                }
            })
        }
        fn queue_len(&self) -> Option<u64> {
            Some(7)
        }
    }

    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_worker_shows_its_error_and_recovers_when_the_cause_goes() {
        let workers = Workers::new(tokio::runtime::Handle::current());
        let broken = Arc::new(AtomicBool::new(true));
        let steps = Arc::new(AtomicU64::new(0));
        let handle = workers.spawn(
            Flaky {
                broken: broken.clone(),
                steps: steps.clone(),
            },
            Duration::from_secs(3600),
        );
        // Nothing runs before the interval unless woken.
        handle.wake();
        until("a failed step", || workers.list()[0].errors >= 1).await;
        let s = &workers.list()[0];
        assert_eq!(s.state, WorkerState::Failing);
        assert_eq!(s.last_error.as_deref(), Some("the volume is read-only"));
        assert_eq!(s.queue, Some(7));
        broken.store(false, Ordering::SeqCst);
        handle.wake();
        until("a good step", || workers.list()[0].work_done == 1).await;
        let s = &workers.list()[0];
        assert_eq!(s.last_error, None, "the error goes with the cause");
        assert_eq!(s.state, WorkerState::Idle);
        workers.shutdown().await;
        assert_eq!(workers.list()[0].state, WorkerState::Stopped);
        assert!(steps.load(Ordering::SeqCst) >= 2);
    }

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(40), Duration::from_secs(256));
        assert!(backoff(u32::MAX) <= Duration::from_secs(300));
    }
}
