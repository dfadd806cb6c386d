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

//!
//! | file              | owns                                                               |
//! |-------------------|--------------------------------------------------------------------|
//! | `mod.rs`          | [`Connections`]: the accept loop, the limit, eviction, the drain   |
//! | [`connection`]    | one connection: TLS, HTTP/2 settings, handshake and idle deadlines |
//! | [`calls`]         | a connection's calls: activity, per-call accounting and metrics    |

mod calls;
mod connection;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::Routes;

use self::calls::Activity;
use self::connection::Conn;
use super::front::Front;

pub use self::connection::ConnSettings;

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
