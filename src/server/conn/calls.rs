//! A connection's calls: how many are open and when the last one ended (for the idle deadline
//! and eviction), and each call's accounting: it lasts until its response body is done or
//! dropped, and its gRPC status is counted in the metrics once.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Response};
use tonic::body::Body;

use crate::metrics::Metrics;

/// A connection's calls in flight and when the last one ended.
#[derive(Debug)]
pub(super) struct Activity {
    calls: AtomicUsize,
    started: Instant,
    /// Nanoseconds from `started` to the end of the last call.
    last_end: AtomicU64,
}

impl Activity {
    pub(super) fn new() -> Activity {
        Activity {
            calls: AtomicUsize::new(0),
            started: Instant::now(),
            last_end: AtomicU64::new(0),
        }
    }

    /// How long the connection has had no call open; `None` while one is.
    pub(super) fn idle_for(&self) -> Option<Duration> {
        if self.calls.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let last = Duration::from_nanos(self.last_end.load(Ordering::SeqCst));
        Some(self.started.elapsed().saturating_sub(last))
    }
}

/// One call in flight on a connection; counts down when dropped.
pub(super) struct Call {
    activity: Arc<Activity>,
}

impl Call {
    pub(super) fn start(activity: &Arc<Activity>) -> Call {
        activity.calls.fetch_add(1, Ordering::SeqCst);
        Call {
            activity: Arc::clone(activity),
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let a = &self.activity;
        let now = a.started.elapsed().as_nanos() as u64;
        a.last_end.fetch_max(now, Ordering::SeqCst);
        a.calls.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The response as sent: its status code rewritten where tonic's own differs from ours (see
/// [`crate::server::status::rewrite_transport_status`]), its body holding the call open until done.
pub(super) fn finish_response(
    response: Response<Body>,
    call: Call,
    mut tally: Tally,
) -> Response<CallBody> {
    let (mut parts, body) = response.into_parts();
    if let Some(code) = crate::server::status::rewrite_transport_status(&parts.headers) {
        parts
            .headers
            .insert("grpc-status", HeaderValue::from(code as i32));
    }
    // A trailers-only answer (an error before any message) carries its status here.
    if let Some(code) = grpc_status(&parts.headers) {
        tally.finish(code);
    }
    Response::from_parts(
        parts,
        CallBody {
            body,
            tally,
            _call: call,
        },
    )
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// Counts a finished call by method and status code, once: when its status is sent, or as
/// `CANCELLED` when it ends without one (the client went away).
pub(super) struct Tally {
    metrics: Arc<Metrics>,
    method: usize,
    done: bool,
}

impl Tally {
    /// Counts a call of `method` (see `metrics::method_index`) once its status is known.
    pub(super) fn new(metrics: Arc<Metrics>, method: usize) -> Tally {
        Tally {
            metrics,
            method,
            done: false,
        }
    }

    fn finish(&mut self, code: i32) {
        if !self.done {
            self.done = true;
            self.metrics.request_done(self.method, code);
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.finish(tonic::Code::Cancelled as i32);
    }
}

/// A response body that keeps its call counted until it is done or dropped.
pub(super) struct CallBody {
    body: Body,
    tally: Tally,
    _call: Call,
}

impl http_body::Body for CallBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &frame
            && let Some(code) = f.trailers_ref().and_then(grpc_status)
        {
            self.tally.finish(code);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
