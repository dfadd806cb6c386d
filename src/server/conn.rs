//! Connections: accepted, served and ended here, so that none of them can hold the broker.
//!
//! - At most `max_connections` at once. At the limit, a new connection takes the place of the
//!   one that has had no call open for longest (dropped); when every connection has a call
//!   open, it waits for one to close, and the clients after it wait in the kernel's backlog.
//!   So idle connections, however many, cannot lock new clients out.
//! - A connection that has not sent the HTTP/2 preface and its first frame within
//!   `handshake_timeout_ms` is closed, so silent sockets cannot fill the permits.
//! - A connection with no call open for `idle_timeout_ms` is closed gracefully (GOAWAY: calls
//!   arriving meanwhile still finish; a peer that does not answer it within the handshake
//!   deadline is dropped); HTTP/2 keepalive pings find dead peers.
//! - On shutdown every connection gets a GOAWAY and ends when its calls have; whatever is still
//!   open at the drain deadline is dropped ([`Connections::drain`]).
//!
//! Each connection is one task serving tonic's routes through hyper, with its own count of calls
//! in flight (a call lasts until its response body is done or dropped).

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::body::Body;
use tonic::service::Routes;
use tower_service::Service;

use super::front::Front;
use crate::auth::Peer;
use crate::auth::tls::certificate_names;
use crate::metrics::{Gauge, Metrics, Raised, method_index};

/// Bytes a client sends before anything else: the 24-byte preface and a 9-byte frame header
/// (its SETTINGS frame).
const HANDSHAKE_BYTES: u64 = 24 + 9;

/// Bytes read from the socket at once under TLS: rustls asks for one record (≤ 16 KiB) per
/// read, so without a buffer below it a large request costs a system call per 16 KiB.
const TLS_READ_BUFFER: usize = 64 << 10;

/// The largest HTTP/2 frame a client may send us (SETTINGS_MAX_FRAME_SIZE). At the protocol's
/// default, 16 KiB, a 1 MB Send arrives as 64 DATA frames, each a wake-up of the request's task
/// and a window update sent back; at 1 MiB, one (docs/benchmarks.md, "HTTP/2 frames").
const MAX_FRAME_BYTES: u32 = 1 << 20;

/// How connections are served.
#[derive(Debug, Clone)]
pub struct ConnSettings {
    pub max_connections: usize,
    pub max_concurrent_streams: u32,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

/// Every open connection of a server.
#[derive(Debug)]
pub struct Connections {
    tasks: TaskTracker,
    /// Sends GOAWAY on every connection.
    goaway: CancellationToken,
    /// Drops every connection at once.
    kill: CancellationToken,
    permits: Arc<Semaphore>,
    max: usize,
    /// Every open connection: its activity, and the token that drops it to make room.
    open: Mutex<HashMap<u64, (Arc<Activity>, CancellationToken)>>,
    next_id: AtomicU64,
}

impl Connections {
    /// Accepts and serves connections until `stop` is cancelled; then stops accepting (the
    /// listening socket closes).
    pub fn serve(
        listener: TcpListener,
        routes: Routes,
        front: Arc<Front>,
        settings: ConnSettings,
        stop: CancellationToken,
    ) -> Arc<Connections> {
        let connections = Arc::new(Connections {
            tasks: TaskTracker::new(),
            goaway: CancellationToken::new(),
            kill: CancellationToken::new(),
            permits: Arc::new(Semaphore::new(settings.max_connections)),
            max: settings.max_connections,
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        });
        let me = Arc::clone(&connections);
        connections.tasks.spawn(async move {
            me.accept_loop(listener, routes, front, settings, stop)
                .await
        });
        connections
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        routes: Routes,
        front: Arc<Front>,
        settings: ConnSettings,
        stop: CancellationToken,
    ) {
        let mut backoff = Duration::from_millis(10);
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = stop.cancelled() => return,
            };
            match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(10);
                    let permit = match Arc::clone(&self.permits).try_acquire_owned() {
                        Ok(p) => p,
                        Err(_) => {
                            self.evict_idlest();
                            tokio::select! {
                                p = Arc::clone(&self.permits).acquire_owned() => match p {
                                    Ok(p) => p,
                                    Err(_) => return,
                                },
                                () = stop.cancelled() => return,
                            }
                        }
                    };
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(%peer, error = %e, "could not set TCP_NODELAY");
                    }
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    let activity = Arc::new(Activity::new());
                    let evict = CancellationToken::new();
                    self.registry()
                        .insert(id, (Arc::clone(&activity), evict.clone()));
                    let conn = Conn {
                        routes: routes.clone(),
                        front: Arc::clone(&front),
                        settings: settings.clone(),
                        goaway: self.goaway.clone(),
                        kill: self.kill.clone(),
                        evict,
                        activity,
                    };
                    let me = Arc::clone(&self);
                    self.tasks.spawn(async move {
                        conn.run(stream, peer).await;
                        me.registry().remove(&id);
                        drop(permit);
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait a little instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    fn registry(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, (Arc<Activity>, CancellationToken)>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops the connection that has had no call open for longest, if any has none open.
    fn evict_idlest(&self) {
        let registry = self.registry();
        let idlest = registry
            .values()
            .filter_map(|(a, evict)| Some((a.idle_for()?, evict)))
            .filter(|(_, evict)| !evict.is_cancelled())
            .max_by_key(|(idle, _)| *idle);
        if let Some((idle, evict)) = idlest {
            tracing::debug!(
                idle_ms = idle.as_millis() as u64,
                "at max_connections: dropping the idlest connection"
            );
            evict.cancel();
        }
    }

    /// Ends every connection: a GOAWAY to each, then waits for their calls to finish until
    /// `deadline`, and drops what is left. Returns how many connections were dropped.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.goaway.cancel();
        self.tasks.close();
        if tokio::time::timeout(deadline, self.tasks.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        let cut = self.open();
        self.kill.cancel();
        self.tasks.wait().await;
        cut
    }
}

/// One connection's task.
struct Conn {
    routes: Routes,
    front: Arc<Front>,
    settings: ConnSettings,
    goaway: CancellationToken,
    kill: CancellationToken,
    /// Cancelled to make room for a new connection (only while this one has no call open).
    evict: CancellationToken,
    activity: Arc<Activity>,
}

impl Conn {
    async fn run(self, stream: TcpStream, addr: SocketAddr) {
        tracing::debug!(peer = %addr, "connection opened");
        let read = Arc::new(AtomicU64::new(0));
        let io = Counted {
            stream,
            read: Arc::clone(&read),
        };
        let Some(acceptor) = self.front.acceptor() else {
            let peer = Arc::new(Peer {
                addr,
                certificate_names: Vec::new(),
            });
            return self.serve(io, peer, read).await;
        };
        // The TLS handshake has the handshake deadline; the HTTP/2 one starts after it.
        let accepted = tokio::select! {
            a = tokio::time::timeout(self.settings.handshake_timeout, acceptor.accept(tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, io))) => a,
            () = self.kill.cancelled() => return,
            () = self.evict.cancelled() => return,
        };
        let stream = match accepted {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                return tracing::debug!(peer = %addr, error = %e, "TLS handshake failed");
            }
            Err(_) => return tracing::debug!(peer = %addr, "no TLS handshake in time; closing"),
        };
        let certificate_names = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| certificate_names(c))
            .unwrap_or_default();
        read.store(0, Ordering::Relaxed);
        let peer = Arc::new(Peer {
            addr,
            certificate_names,
        });
        self.serve(stream, peer, read).await
    }

    async fn serve<I>(self, io: I, peer: Arc<Peer>, read: Arc<AtomicU64>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::clone(&self.activity);
        let calls = Arc::clone(&activity);
        let routes = self.routes;
        let front = Arc::clone(&self.front);
        let caller_peer = Arc::clone(&peer);
        let metrics = Arc::clone(self.front.metrics());
        let _open = Raised::new(Arc::clone(&metrics), Gauge::Connections);
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let call = Call::start(&calls);
            let tally = Tally {
                metrics: Arc::clone(&metrics),
                method: method_index(req.uri().path()),
                done: false,
            };
            let mut routes = routes.clone();
            let front = Arc::clone(&front);
            let peer = Arc::clone(&caller_peer);
            async move {
                let mut req = req.map(Body::new);
                let response = match front.admit(&mut req, &peer).await {
                    Ok(()) => routes.call(req).await?,
                    Err(answer) => answer,
                };
                Ok::<_, Infallible>(finish_response(response, call, tally))
            }
        });
        let peer = peer.addr;
        let s = &self.settings;
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .max_concurrent_streams(s.max_concurrent_streams)
            .max_frame_size(MAX_FRAME_BYTES)
            .keep_alive_interval(Some(s.keepalive_interval))
            .keep_alive_timeout(s.keepalive_timeout);
        let conn = builder.serve_connection(TokioIo::new(io), service);
        let mut conn = std::pin::pin!(conn);

        let handshake = tokio::time::sleep(s.handshake_timeout);
        let mut handshake = std::pin::pin!(handshake);
        let mut handshake_done = false;
        let idle_timeout = s.idle_timeout;
        // Checked when it could have passed (no timer per call: calls only touch atomics).
        let idle = async move {
            let mut wait = idle_timeout;
            loop {
                tokio::time::sleep(wait).await;
                match activity.idle_for() {
                    Some(idle) if idle >= idle_timeout => return,
                    Some(idle) => wait = idle_timeout - idle,
                    None => wait = idle_timeout,
                }
            }
        };
        let mut idle = std::pin::pin!(idle);
        let mut idle_done = false;
        // After an idle GOAWAY, the peer has the handshake deadline to answer it (h2 waits for
        // a PING's answer before it closes); a peer that does not is dropped.
        let closing = tokio::time::sleep(Duration::MAX);
        let mut closing = std::pin::pin!(closing);
        let mut goaway_sent = false;
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    break;
                }
                () = &mut handshake, if !handshake_done => {
                    if read.load(Ordering::Relaxed) < HANDSHAKE_BYTES {
                        tracing::debug!(%peer, "no HTTP/2 handshake in time; closing");
                        break;
                    }
                    handshake_done = true;
                }
                () = &mut idle, if !idle_done => {
                    tracing::debug!(%peer, "idle; closing");
                    idle_done = true;
                    conn.as_mut().graceful_shutdown();
                    closing
                        .as_mut()
                        .reset(tokio::time::Instant::now() + s.handshake_timeout);
                }
                () = &mut closing, if idle_done => {
                    tracing::debug!(%peer, "no answer to the idle GOAWAY; dropping");
                    break;
                }
                () = self.goaway.cancelled(), if !goaway_sent => {
                    goaway_sent = true;
                    conn.as_mut().graceful_shutdown();
                }
                () = self.kill.cancelled() => {
                    tracing::debug!(%peer, "dropped at the shutdown deadline");
                    break;
                }
                () = self.evict.cancelled() => {
                    tracing::debug!(%peer, "dropped to make room for a new connection");
                    break;
                }
            }
        }
        tracing::debug!(%peer, "connection closed");
    }
}

/// A connection's calls in flight and when the last one ended.
#[derive(Debug)]
struct Activity {
    calls: AtomicUsize,
    started: Instant,
    /// Nanoseconds from `started` to the end of the last call.
    last_end: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            calls: AtomicUsize::new(0),
            started: Instant::now(),
            last_end: AtomicU64::new(0),
        }
    }

    /// How long the connection has had no call open; `None` while one is.
    fn idle_for(&self) -> Option<Duration> {
        if self.calls.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let last = Duration::from_nanos(self.last_end.load(Ordering::SeqCst));
        Some(self.started.elapsed().saturating_sub(last))
    }
}

/// One call in flight on a connection; counts down when dropped.
struct Call {
    activity: Arc<Activity>,
}

impl Call {
    fn start(activity: &Arc<Activity>) -> Call {
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
/// [`super::status::rewrite_transport_status`]), its body holding the call open until done.
fn finish_response(response: Response<Body>, call: Call, mut tally: Tally) -> Response<CallBody> {
    let (mut parts, body) = response.into_parts();
    if let Some(code) = super::status::rewrite_transport_status(&parts.headers) {
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
struct Tally {
    metrics: Arc<Metrics>,
    method: usize,
    done: bool,
}

impl Tally {
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
struct CallBody {
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

/// A TCP stream that counts the bytes read from it (for the handshake deadline).
struct Counted {
    stream: TcpStream,
    read: Arc<AtomicU64>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
