//! HTTP/2 streams run in their connection's task.
//!
//! hyper's server hands each HTTP/2 stream to an executor as a future of its own. Spawned
//! as Tokio tasks, every stream pays for a task's creation, its registration in the
//! runtime's task list, and a hop through the scheduler at each wake-up between the stream
//! and its connection. [`Local`] keeps them instead in the task that drives the
//! connection, which polls them beside it: a connection and its streams share one task, as
//! Envoy keeps them on one worker.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use futures_util::stream::{FuturesUnordered, StreamExt};

type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What hyper handed over and the driver has not taken yet.
#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    /// The driver's waker while it waits; taken back while it polls, when it sees the queue
    /// anyway, so that work queued by its own polling does not wake it again.
    waiting: Option<Waker>,
}

/// The executor hyper is given: it queues each future for the connection's driver.
#[derive(Clone, Default)]
pub(crate) struct Local {
    queue: Arc<Mutex<Queue>>,
}

impl<F> hyper::rt::Executor<F> for Local
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let waiting = {
            let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            queue.jobs.push(Box::pin(fut));
            queue.waiting.take()
        };
        if let Some(waker) = waiting {
            waker.wake();
        }
    }
}

/// Polls a connection and the futures its [`Local`] executor was given.
#[derive(Default)]
pub(crate) struct Driver {
    executor: Local,
    running: FuturesUnordered<Job>,
}

impl Driver {
    /// The executor to build the connection with.
    pub fn executor(&self) -> Local {
        self.executor.clone()
    }

    /// Drives `conn` and its streams until `conn` ends; streams still running are left for
    /// [`Driver::finish`].
    pub async fn run<C: Future + ?Sized>(&mut self, mut conn: Pin<&mut C>) -> C::Output {
        poll_fn(|cx| {
            let ended = conn.as_mut().poll(cx);
            self.poll_streams(cx);
            ended
        })
        .await
    }

    /// Drives the streams left after their connection ended until the last one ends.
    pub async fn finish(&mut self) {
        poll_fn(|cx| {
            if self.poll_streams(cx) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }

    /// Polls every stream that is ready, queued ones included; true when none is left.
    fn poll_streams(&mut self, cx: &mut Context<'_>) -> bool {
        self.take_queued(None);
        loop {
            // A stream that ends frees its slot at once; one that pends is woken by its own waker.
            while let Poll::Ready(Some(())) = self.running.poll_next_unpin(cx) {}
            // Polling a stream may queue another (an upgraded stream's body): poll that too
            // before waiting, and otherwise leave the waker for work queued from elsewhere.
            if self.take_queued(Some(cx.waker())) == 0 {
                return self.running.is_empty();
            }
        }
    }

    /// Moves queued futures into the running set and returns how many there were; with a
    /// waker, leaves it for the next one queued when there were none.
    fn take_queued(&mut self, park: Option<&Waker>) -> usize {
        let mut queue = self
            .executor
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let taken = queue.jobs.len();
        self.running.extend(queue.jobs.drain(..));
        queue.waiting = match park {
            Some(waker) if taken == 0 => Some(waker.clone()),
            _ => None,
        };
        taken
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hyper::rt::Executor;
    use tokio::sync::oneshot;

    use super::*;

    #[tokio::test]
    async fn queued_futures_run_in_the_driver_and_outlive_their_connection() {
        let mut driver = Driver::default();
        let executor = driver.executor();
        let done = Arc::new(AtomicUsize::new(0));
        let (release, released) = oneshot::channel::<()>();
        // Queued before the driver first polls.
        let counter = Arc::clone(&done);
        executor.execute(async move {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let counter = Arc::clone(&done);
        let later = executor.clone();
        let conn = async move {
            // Queued while the driver polls the connection, as hyper's server does.
            later.execute(async move {
                let _ = released.await;
                counter.fetch_add(1, Ordering::SeqCst);
            });
            7
        };
        tokio::pin!(conn);
        assert_eq!(driver.run(conn).await, 7);
        assert_eq!(
            done.load(Ordering::SeqCst),
            1,
            "the waiting stream is not done"
        );
        release.send(()).unwrap();
        driver.finish().await;
        assert_eq!(done.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_future_queued_from_another_task_wakes_the_waiting_driver() {
        let mut driver = Driver::default();
        let executor = driver.executor();
        let (release, held) = oneshot::channel::<()>();
        executor.execute(async move {
            let _ = held.await;
        });
        let driving = tokio::spawn(async move { driver.finish().await });
        // The driver polls the first stream and waits for it.
        tokio::task::yield_now().await;
        // Queued from this task, the second stream must wake the driver to run, or the
        // first never ends and neither does `finish`.
        executor.execute(async move {
            let _ = release.send(());
        });
        tokio::time::timeout(std::time::Duration::from_secs(10), driving)
            .await
            .expect("the driver woke for the queued stream")
            .unwrap();
    }
}
