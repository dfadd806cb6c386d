//! Waiting for a lone producer's acknowledgement without a thread wake-up.
//!
//! A producer that sends one message and waits for its answer before the next meets a partition
//! writer that polls for that next append instead of sleeping (`LogConfig::writer_spin_us`).
//! The other half of the round trip is the Send task waiting for the writer's answer. Asleep,
//! its worker thread has to be woken by the writer once the sync returns, which costs tens of
//! microseconds on a virtual machine: a large share of an acknowledgement that takes a couple
//! of hundred. [`AckPoller`] lets one Send at a time look for its answer instead, yielding to
//! the runtime between looks (other tasks keep running), so the worker thread never parks and
//! the response leaves as soon as the sync returns.
//!
//! It only polls while the partition's writer serves a lone producer and its last sync took no
//! longer than the window: a busy partition batches anyway, and waiting out a slow disk awake
//! would only burn a core. At most one Send in the broker polls at a time, so at most one worker
//! thread is kept awake.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::oneshot::{self, error::TryRecvError};

#[derive(Debug)]
pub(crate) struct AckPoller {
    window: Duration,
    /// Taken by the one Send that polls.
    busy: AtomicBool,
}

impl AckPoller {
    /// Polls for up to `window` (zero: never).
    pub(crate) fn new(window: Duration) -> Self {
        AckPoller {
            window,
            busy: AtomicBool::new(false),
        }
    }

    /// Waits for `rx`'s value; None if its sender was dropped without one. `lone_sync` reads
    /// the partition's [`lone_sync_time`]: while that fits in the window and no other Send is
    /// polling, this one polls for the answer, for up to the window, before it sleeps. It stops
    /// as soon as the writer no longer serves a lone producer.
    ///
    /// [`lone_sync_time`]: crate::storage::Partition::lone_sync_time
    pub(crate) async fn wait<T>(
        &self,
        lone_sync: impl Fn() -> Option<Duration>,
        mut rx: oneshot::Receiver<T>,
    ) -> Option<T> {
        let fits = || lone_sync().is_some_and(|sync| sync <= self.window);
        if let Some(_turn) = (!self.window.is_zero() && fits())
            .then(|| Turn::take(&self.busy))
            .flatten()
        {
            let start = Instant::now();
            while start.elapsed() < self.window && fits() {
                match rx.try_recv() {
                    Ok(value) => return Some(value),
                    Err(TryRecvError::Empty) => tokio::task::yield_now().await,
                    Err(TryRecvError::Closed) => return None,
                }
            }
        }
        rx.await.ok()
    }
}

/// The right to poll, given back when dropped (also when the waiting Send is cancelled).
struct Turn<'a>(&'a AtomicBool);

impl<'a> Turn<'a> {
    fn take(busy: &'a AtomicBool) -> Option<Self> {
        busy.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
            .then_some(Turn(busy))
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    const LONG: Duration = Duration::from_secs(600);
    const FAST_SYNC: Option<Duration> = Some(Duration::from_micros(100));

    #[tokio::test]
    async fn an_answer_sent_from_another_thread_while_polling_arrives() {
        let poller = AckPoller::new(LONG);
        let (tx, rx) = oneshot::channel();
        let sender = std::thread::spawn(move || tx.send(7u64));
        assert_eq!(poller.wait(|| FAST_SYNC, rx).await, Some(7));
        sender.join().unwrap().unwrap();
        assert!(
            !poller.busy.load(Ordering::Relaxed),
            "the turn is given back"
        );
    }

    #[tokio::test]
    async fn a_dropped_sender_ends_the_poll_at_once_with_an_error() {
        // With a ten-minute window, a poll that missed the drop would hang the test.
        let poller = AckPoller::new(LONG);
        let (tx, rx) = oneshot::channel::<u64>();
        let dropper = std::thread::spawn(move || drop(tx));
        assert_eq!(poller.wait(|| FAST_SYNC, rx).await, None);
        dropper.join().unwrap();
    }

    #[test]
    fn only_one_wait_polls_and_a_cancelled_one_gives_its_turn_back() {
        let poller = AckPoller::new(LONG);
        let mut cx = Context::from_waker(Waker::noop());

        let (_tx1, rx1) = oneshot::channel::<u64>();
        let mut first = Box::pin(poller.wait(|| FAST_SYNC, rx1));
        assert!(first.as_mut().poll(&mut cx).is_pending());
        assert!(poller.busy.load(Ordering::Relaxed), "the first wait polls");

        // A second wait meanwhile sleeps on its channel and still gets its answer.
        let (tx2, rx2) = oneshot::channel::<u64>();
        let mut second = pin!(poller.wait(|| FAST_SYNC, rx2));
        assert!(second.as_mut().poll(&mut cx).is_pending());
        tx2.send(2).unwrap();
        assert_eq!(second.as_mut().poll(&mut cx), Poll::Ready(Some(2)));

        drop(first);
        assert!(
            !poller.busy.load(Ordering::Relaxed),
            "cancelling gives the turn back"
        );
    }

    #[test]
    fn polling_stops_when_the_writer_stops_serving_a_lone_producer() {
        let poller = AckPoller::new(LONG);
        let lone = AtomicBool::new(true);
        let (tx, rx) = oneshot::channel::<u64>();
        let mut wait = Box::pin(poller.wait(
            || lone.load(Ordering::Relaxed).then_some(Duration::ZERO),
            rx,
        ));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        assert!(poller.busy.load(Ordering::Relaxed));
        // The writer took a round of several appends: the next look gives up polling.
        lone.store(false, Ordering::Relaxed);
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        assert!(
            !poller.busy.load(Ordering::Relaxed),
            "asleep, the turn given back"
        );
        tx.send(3).unwrap();
        assert_eq!(wait.as_mut().poll(&mut cx), Poll::Ready(Some(3)));
    }

    #[tokio::test]
    async fn a_slow_disk_or_a_batching_partition_is_waited_for_asleep() {
        let poller = AckPoller::new(Duration::from_micros(500));
        for lone_sync in [None, Some(Duration::from_millis(5))] {
            let (tx, rx) = oneshot::channel::<u64>();
            let mut wait = Box::pin(poller.wait(|| lone_sync, rx));
            let mut cx = Context::from_waker(Waker::noop());
            assert!(wait.as_mut().poll(&mut cx).is_pending());
            assert!(
                !poller.busy.load(Ordering::Relaxed),
                "{lone_sync:?} does not poll"
            );
            tx.send(1).unwrap();
            assert_eq!(wait.await, Some(1));
        }
    }
}
