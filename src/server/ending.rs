//! Response streams that end when the broker shuts down: the next poll after the shutdown token
//! is cancelled yields `UNAVAILABLE` and ends the stream, whatever the inner stream was doing
//! (waiting at the tail, waiting for a group's next delivery). The inner stream is dropped at
//! once, so a group member leaves its group and its deliveries go back. While the inner stream
//! lives it counts as an open subscription (`sluice_subscriptions`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio_stream::Stream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::Status;

use crate::metrics::{Gauge, Metrics, Raised};

pub struct Ending<S> {
    inner: Option<(Pin<Box<S>>, Raised)>,
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl<S> Ending<S> {
    pub fn new(inner: S, stop: CancellationToken, metrics: &Arc<Metrics>) -> Self {
        let open = Raised::new(Arc::clone(metrics), Gauge::Subscriptions);
        Ending {
            inner: Some((Box::pin(inner), open)),
            stopped: Box::pin(stop.cancelled_owned()),
        }
    }
}

impl<T, S> Stream for Ending<S>
where
    S: Stream<Item = Result<T, Status>>,
{
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.inner.is_none() {
            return Poll::Ready(None);
        }
        if self.stopped.as_mut().poll(cx).is_ready() {
            self.inner = None;
            return Poll::Ready(Some(Err(Status::unavailable(
                "the broker is shutting down; subscribe again once it is back",
            ))));
        }
        match self.inner.as_mut().map(|(s, _)| s.as_mut().poll_next(cx)) {
            Some(Poll::Ready(None)) | None => {
                self.inner = None;
                Poll::Ready(None)
            }
            Some(other) => other,
        }
    }
}
