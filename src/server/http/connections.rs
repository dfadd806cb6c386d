//! The HTTP port's connections, bounded as the gRPC port's are: at most `max_connections` at a
//! time (one more is closed at once), and a request's line and headers read within
//! `header_timeout_ms` and at most [`MAX_HEADER_BYTES`] long (431 beyond). hyper's header
//! timer also runs while a kept-alive connection waits for its next request, so a connection
//! parked idle is closed after the same time. A client that sends its headers a byte at a
//! time, opens connections without end or parks them holds no more than these.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

/// The most a request's line and headers may take (hyper's read buffer; its floor is 8 KiB).
pub const MAX_HEADER_BYTES: usize = 16 << 10;

/// How the port treats its connections (`[http]`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

impl Limits {
    /// `[http]`'s limits (checked at start: none is zero).
    pub fn of(config: &crate::config::HttpConfig) -> Limits {
        Limits {
            max_connections: config.max_connections,
            header_timeout: Duration::from_millis(config.header_timeout_ms),
        }
    }
}

/// Accepts connections on `listener` and serves `app` on each until `stop`; then answers the
/// requests in progress and returns once every connection has closed.
pub async fn serve(listener: TcpListener, app: Router, limits: Limits, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, for one: the next accept may succeed.
                tracing::warn!(error = %e, "HTTP port: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!(%peer, limit = limits.max_connections, "HTTP port: connection limit reached; closed");
            continue;
        };
        connections.spawn(one(stream, peer, app.clone(), limits, stop.clone(), slot));
    }
    connections.close();
    connections.wait().await;
}

/// Serves one connection until it closes (the peer's doing, or a limit's) or the port stops.
async fn one(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: Limits,
    stop: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        app.clone().call(req.map(axum::body::Body::new))
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        () = stop.cancelled() => {}
    }
    // Stopping: the request in progress is answered, then the connection closes; one that
    // takes longer than a header timeout more (a reader that stopped reading) is dropped.
    connection.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(limits.header_timeout, connection).await;
}
