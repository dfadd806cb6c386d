//! One connection's task: the TLS handshake when the server has TLS, then tonic's routes served
//! over hyper's HTTP/2 with our window, frame and keepalive settings, until the peer leaves, the
//! handshake or idle deadline passes, the server drains, or the connection is evicted.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::service::Routes;
use tower_service::Service;

use super::calls::{Activity, Call, Tally, finish_response};
use crate::auth::Peer;
use crate::auth::tls::certificate_names;
use crate::metrics::{Gauge, Raised, method_index};
use crate::server::front::Front;

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

/// One connection's task.
pub(super) struct Conn {
    pub(super) routes: Routes,
    pub(super) front: Arc<Front>,
    pub(super) settings: ConnSettings,
    pub(super) goaway: CancellationToken,
    pub(super) kill: CancellationToken,
    /// Cancelled to make room for a new connection (only while this one has no call open).
    pub(super) evict: CancellationToken,
    pub(super) activity: Arc<Activity>,
}

impl Conn {
    pub(super) async fn run(self, stream: TcpStream, addr: SocketAddr) {
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
            let tally = Tally::new(Arc::clone(&metrics), method_index(req.uri().path()));
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
