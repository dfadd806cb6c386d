//! The gRPC front: `sluice.v1` Broker and Admin services, health, reflection, connection limits
//! and graceful shutdown. Translation only: all storage logic lives below.
//!
//! Shutdown (`stop` cancelled): the listening socket closes, every subscription and group
//! stream ends with `UNAVAILABLE`, new Sends are refused with `UNAVAILABLE` while the ones in
//! flight are answered, every connection gets a GOAWAY; connections still open after
//! `shutdown_timeout_ms` are dropped. Then every partition and group log closes cleanly.
//!
//! | file                 | owns                                                            |
//! |----------------------|-----------------------------------------------------------------|
//! | `mod.rs`             | starting the server: listeners, routes, the stop sequence       |
//! | [`broker_service`]   | `sluice.v1.Broker`: Send, Subscribe, Ack, Nack                  |
//! | [`admin_service`]    | `sluice.v1.Admin`: topics, groups, Compact, with audit records  |
//! | [`seed`]             | the seed design's `broker.Broker` API                           |
//! | [`subscription`]     | opening a subscription for both APIs; the v1 response stream    |
//! | [`relay`]            | cluster port: members and acks relayed to groups led here       |
//! | [`convert`]          | API messages to and from the broker's types                     |
//! | [`conn`]             | connections: accept, limits, eviction, per-connection HTTP/2    |
//! | [`front`]            | TLS and admission of each call                                  |
//! | [`access`]           | permission checks and audit records of calls                    |
//! | [`ending`]           | streams that end with the broker's shutdown                     |
//! | [`http`]             | the HTTP port: metrics, health, JSON API, console               |
//! | [`status`]           | the one mapping of errors to gRPC statuses                      |
//! | [`error`]            | [`ServeError`]                                                  |

mod access;
mod admin_service;
mod broker_service;
mod conn;
mod convert;
mod ending;
mod error;
mod front;
mod http;
mod relay;
mod seed;
pub mod status;
mod subscription;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::config::Config;
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::proto::seed::broker_server::BrokerServer as SeedServer;
use crate::proto::v1::admin_server::AdminServer;
use crate::proto::v1::broker_server::BrokerServer;
use crate::storage::{FileIo, RealIo};

pub use admin_service::{AdminService, compaction_counts, compaction_to_pb};
pub use broker_service::BrokerService;
pub use convert::delivery_to_pb;
pub use error::ServeError;
/// The most an HTTP request's line and headers may take on the HTTP port.
pub use http::MAX_HEADER_BYTES as HTTP_MAX_HEADER_BYTES;

/// A running server: its address, and the token that stops it.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    /// The HTTP port (metrics, health, API, console), when on.
    pub http_addr: Option<SocketAddr>,
    /// Cluster mode: this node's id and its cluster port.
    pub cluster: Option<(u64, SocketAddr)>,
    pub stop: CancellationToken,
    pub done: tokio::task::JoinHandle<Result<(), ServeError>>,
}

/// Opens the broker and serves it until `stop` is cancelled; then stops accepting, lets in-flight
/// sends finish, ends subscriptions, and closes every partition cleanly.
pub async fn start(config: Config, stop: CancellationToken) -> Result<Running, ServeError> {
    start_with_io(config, Arc::new(RealIo), stop).await
}

/// [`start`] with the storage's durable writes and syncs going through `io` (fault injection).
pub async fn start_with_io(
    config: Config,
    io: Arc<dyn FileIo>,
    stop: CancellationToken,
) -> Result<Running, ServeError> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: config.listen,
        source,
    })?;
    if !config.listen.ip().is_loopback() && !config.tls.enabled() {
        tracing::warn!(listen = %config.listen,
            "allow_plaintext: serving without TLS beyond this machine; tokens and data travel unencrypted");
    }
    // TLS files are checked before the data directory is touched.
    crate::auth::tls::server_config(&config.tls).map_err(front::FrontError::from)?;
    // The HTTP port answers /healthz (and /readyz: not yet) while the data is recovered.
    let http = http::bind(&config).await?;
    let http_addr = http.as_ref().map(|(_, a)| *a);
    let http_state = Arc::new(http::HttpState::default());
    let http_stop = CancellationToken::new();
    let limits = http::Limits::of(&config.http);
    let http_task =
        http.map(|(l, _)| http::spawn(l, Arc::clone(&http_state), limits, http_stop.clone()));
    // Until the broker serves, an early return stops the HTTP port too.
    let http_guard = http_stop.drop_guard();
    let broker = Broker::open_with_io(config.clone(), io).await?;
    broker.serve_groups(Arc::new(relay::LedGroups::new(&broker)));
    let cluster = broker.cluster_port();
    let front = Arc::new(front::Front::new(&config, Arc::clone(&broker))?);
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(ServeError::Signal)?;
    let http_stop = http_guard.disarm();
    http_state.serve(Arc::clone(&broker), Arc::clone(&front));
    let stopped = stop.clone();
    let state = Arc::clone(&http_state);
    let data = broker.data_dir_handle();
    let let_go_within = Duration::from_millis(config.shutdown_timeout_ms);
    let done = tokio::spawn(async move {
        let shutting = broker.shutdown_token();
        let closing = Arc::clone(&state);
        // Once shutdown starts, the HTTP port lets go of the broker (/readyz: "stopping").
        let release = tokio::spawn(async move {
            shutting.cancelled().await;
            closing.stopping();
        });
        let result = serve(broker, front, hangup, listener, config, stopped).await;
        state.stopping();
        release.abort();
        http_stop.cancel();
        if let Some(task) = http_task {
            let _ = task.await;
        }
        let_go(&data, let_go_within).await;
        result
    });
    Ok(Running {
        addr,
        http_addr,
        cluster,
        stop,
        done,
    })
}

/// Waits until nothing holds the data directory any more (its `LOCK` goes with the last holder),
/// so that a start in this process right after finds it free: a task that held the broker as it
/// stopped (a read on the blocking pool, a metrics sample) lets go within moments. Past
/// `deadline` it says so and returns.
async fn let_go(data: &std::sync::Weak<crate::storage::DataDir>, deadline: Duration) {
    let until = tokio::time::Instant::now() + deadline;
    while data.strong_count() > 0 {
        if tokio::time::Instant::now() >= until {
            tracing::error!(
                holders = data.strong_count(),
                "the data directory is still held after the stop; a start in this process would find it locked"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn serve(
    broker: Arc<Broker>,
    front: Arc<front::Front>,
    mut hangup: tokio::signal::unix::Signal,
    listener: TcpListener,
    config: Config,
    stop: CancellationToken,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<BrokerServer<BrokerService>>().await;
    health.set_serving::<AdminServer<AdminService>>().await;
    health.set_serving::<SeedServer<seed::SeedService>>().await;
    // Both reflection versions: grpcurl 1.8 and other older tools speak only v1alpha.
    // Every service served is listed, health included (`grpcurl … grpc.health.v1.Health/Check`
    // needs its descriptor).
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let max_in = config.max_request_bytes;
    // A response holds at least one delivery: a message and its envelope.
    let max_out = config.delivery_batch_bytes.max(config.max_message_bytes) + (1 << 20);
    let floor = config.answer_sends_without_storing;
    if floor {
        tracing::warn!("benchmark floor: Sends are answered at once and nothing is stored");
    }
    let broker_service = BrokerServer::new(
        BrokerService::new(Arc::clone(&broker)).answering_sends_without_storing(floor),
    )
    .max_decoding_message_size(max_in)
    .max_encoding_message_size(max_out);
    let admin_service =
        AdminServer::new(AdminService::new(Arc::clone(&broker))).max_decoding_message_size(max_in);
    let seed_service = SeedServer::new(
        seed::SeedService::new(Arc::clone(&broker)).answering_sends_without_storing(floor),
    )
    .max_decoding_message_size(max_in)
    .max_encoding_message_size(max_out);
    let routes = tonic::service::Routes::new(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(broker_service)
        .add_service(admin_service)
        .add_service(seed_service);

    let settings = conn::ConnSettings {
        max_connections: config.max_connections,
        max_concurrent_streams: config.max_concurrent_streams,
        handshake_timeout: Duration::from_millis(config.handshake_timeout_ms),
        idle_timeout: Duration::from_millis(config.idle_timeout_ms),
        keepalive_interval: Duration::from_secs(30),
        keepalive_timeout: Duration::from_secs(10),
    };
    let connections =
        conn::Connections::serve(listener, routes, Arc::clone(&front), settings, stop.clone());
    loop {
        tokio::select! {
            _ = hangup.recv() => front.reload().await,
            () = stop.cancelled() => break,
        }
    }
    tracing::info!(
        connections = connections.open(),
        "shutting down: no new connections, ending subscriptions, answering sends in flight"
    );
    // Ends subscription and group streams, and refuses new calls that would start work.
    broker.shutdown_token().cancel();
    let deadline = Duration::from_millis(config.shutdown_timeout_ms);
    let cut = connections.drain(deadline).await;
    if cut > 0 {
        tracing::warn!(
            connections = cut,
            timeout_ms = config.shutdown_timeout_ms,
            "shutdown deadline passed: dropped connections whose calls had not finished"
        );
    }
    broker.shutdown().await;
    Ok(())
}
