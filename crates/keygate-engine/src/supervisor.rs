//! Background tasks under supervision: a task that panics is logged, counted
//! (`keygate_task_restarts_total{task}`) and started again after [`RESTART_DELAY`]; a task
//! that returns is done. A bug met in one batch of webhooks, audit lines or alerts must not
//! end that work for good while the node keeps answering.
//!
//! Each task is made afresh by its closure on every start, from state it can clone: a task
//! that reads a channel takes it through an `Arc<tokio::sync::Mutex<_>>`, so a restart
//! continues with the messages still queued.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::task::JoinHandle;

/// How long a task that panicked waits before it starts again.
pub const RESTART_DELAY: Duration = Duration::from_secs(1);

/// Runs the task `make` returns under supervision (see the module docs). Aborting the
/// returned handle aborts the running task too.
pub fn supervise<F, Fut>(name: &'static str, mut make: F) -> JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let mut run = AbortOnDrop(tokio::spawn(make()));
            match (&mut run.0).await {
                Ok(()) => return,
                Err(e) if e.is_panic() => {
                    tracing::error!(
                        task = name,
                        "background task panicked; restarting it in {RESTART_DELAY:?}: {e}"
                    );
                    metrics::counter!("keygate_task_restarts_total", "task" => name).increment(1);
                    tokio::time::sleep(RESTART_DELAY).await;
                }
                // Cancelled: the runtime is going away.
                Err(_) => return,
            }
        }
    })
}

/// The running task of a supervisor: aborted with it.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

static ARMED: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
static ANY_ARMED: AtomicBool = AtomicBool::new(false);

/// Makes the next [`checkpoint`] of task `name` panic: how the tests show that each kind of
/// task survives a panic. Nothing in keygate calls it.
#[doc(hidden)]
pub fn panic_next(name: &'static str) {
    ARMED.lock().unwrap_or_else(|p| p.into_inner()).push(name);
    ANY_ARMED.store(true, Ordering::Release);
}

/// Called by task `name` at the start of each round of its work; panics if [`panic_next`]
/// asked for it (one load of an atomic otherwise).
#[inline]
pub fn checkpoint(name: &str) {
    if !ANY_ARMED.load(Ordering::Acquire) {
        return;
    }
    let mut armed = ARMED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(i) = armed.iter().position(|n| *n == name) {
        armed.swap_remove(i);
        ANY_ARMED.store(!armed.is_empty(), Ordering::Release);
        drop(armed);
        panic!("{name}: panic asked for by supervisor::panic_next");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_panicking_task_starts_again_and_a_finished_one_stays_done() {
        let starts = Arc::new(AtomicU32::new(0));
        let s = Arc::clone(&starts);
        let done = supervise("test-task", move || {
            let s = Arc::clone(&s);
            async move {
                if s.fetch_add(1, Ordering::SeqCst) < 2 {
                    panic!("boom");
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), done)
            .await
            .expect("finishes after two restarts")
            .expect("the supervisor itself does not panic");
        assert_eq!(starts.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn aborting_the_supervisor_aborts_its_task() {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let handle = supervise("test-abort", move || {
            let tx = tx.clone();
            async move {
                // Holds the sender until aborted.
                let _tx = tx;
                std::future::pending::<()>().await;
            }
        });
        tokio::task::yield_now().await;
        handle.abort();
        // Every sender is gone once the task is aborted: recv ends.
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the task was aborted with its supervisor");
    }

    #[test]
    fn checkpoint_panics_once_when_armed() {
        checkpoint("test-checkpoint");
        panic_next("test-checkpoint");
        assert!(std::panic::catch_unwind(|| checkpoint("test-checkpoint")).is_err());
        checkpoint("test-checkpoint");
    }
}
