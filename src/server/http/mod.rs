//! The HTTP port beside gRPC (`[http] listen`, default `127.0.0.1:7071`): read-only.
//!
//! | path                               | what                                                   |
//! |------------------------------------|--------------------------------------------------------|
//! | `/healthz`                         | 200 while the process serves HTTP (also during recovery) |
//! | `/readyz`                          | 200 once recovered and serving gRPC (in a cluster: and caught up with its groups' leaders); 503 before and while stopping |
//! | `/metrics`                         | OpenMetrics text (see docs/operations.md for every metric) |
//! | `/api/v1/overview`                 | totals for the console's first page                    |
//! | `/api/v1/cluster`                  | cluster mode: nodes, each partition's leader and replicas' lag |
//! | `/api/v1/topics`, `/api/v1/topics/{t}` | topics, partitions, offsets, sizes, held-back bytes |
//! | `/api/v1/topics/{t}/dead-letters`  | newest records of `<t>.dlq`: keys, headers, value sizes (`?limit=`, ≤ 100; needs `consume` on `<t>.dlq`) |
//! | `/api/v1/groups`, `/api/v1/groups/{g}` | groups, members, lag, in flight, redeliveries, dead letters |
//! | `/`                                | the web console (assets compiled into the binary)      |
//!
//! The port binds before the data directory is recovered, so an orchestrator can tell "alive,
//! recovering" (`/healthz` 200, `/readyz` 503) from "dead". Access control applies as on gRPC:
//! with `auth.required`, every path but `/healthz`, `/readyz` and the console's static files
//! needs `authorization: Bearer <token>` (401 otherwise, recorded in `_audit`); a principal sees
//! only the topics and groups it may `describe` (lists and metrics leave the others out; asking
//! for one by name is a 403, recorded).

//!
//! | file              | owns                                                                |
//! |-------------------|---------------------------------------------------------------------|
//! | `mod.rs`          | binding the port, the routes, `/readyz`, `/metrics`, error bodies   |
//! | [`state`]         | the broker's phase as the handlers see it, the rate history         |
//! | [`connections`]   | accepting and serving connections within the port's limits          |
//! | [`admission`]     | admitting a request (readiness, credentials, grants), refusals      |
//! | [`api`]           | the JSON API's handlers                                             |
//! | [`scrape`]        | what `/metrics` and the overview read from the broker               |
//! | [`rates`]         | the console's rate history                                          |
//! | [`console`]       | the web console's files                                             |

mod admission;
mod api;
mod connections;
mod console;
mod rates;
mod scrape;
mod state;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use self::admission::{Admitted, Refusal};
use self::api::{cluster, dead_letters, group, groups, overview, topic, topics};
use self::state::{Phase, Shared};

pub use self::connections::{Limits, MAX_HEADER_BYTES};
pub use self::state::HttpState;

/// Serves the port until `stop` is cancelled; the task ends once every request in progress
/// has been answered.
pub fn spawn(
    listener: TcpListener,
    state: Shared,
    limits: Limits,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let sampled = Arc::clone(&state);
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/overview", get(overview))
        .route("/api/v1/cluster", get(cluster))
        .route("/api/v1/topics", get(topics))
        .route("/api/v1/topics/{topic}", get(topic))
        .route("/api/v1/topics/{topic}/dead-letters", get(dead_letters))
        .route("/api/v1/groups", get(groups))
        .route("/api/v1/groups/{group}", get(group))
        .merge(console::routes())
        .fallback(no_such_path)
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state);
    let sampling = tokio::spawn(sample_rates(sampled, stop.clone()));
    tokio::spawn(async move {
        connections::serve(listener, app, limits, stop).await;
        let _ = sampling.await;
    })
}

async fn no_such_path(uri: axum::http::Uri) -> Refusal {
    Refusal::Failed(
        StatusCode::NOT_FOUND,
        super::status::status(
            tonic::Code::NotFound,
            format!("no such path {}", uri.path()),
        )
        .message()
        .to_string(),
    )
}

/// Every error answer of the port is `{"error": "…"}`: the ones made here already are, and
/// those made below the handlers (405 for a method other than GET, 400 for a malformed path
/// or query, 503 from `/readyz`) are rewritten, keeping their status and headers (`Allow`).
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase()
    } else {
        text
    };
    let mut rewritten = (status, Json(json!({ "error": message }))).into_response();
    for (name, value) in parts.headers {
        if let Some(name) = name
            && name != header::CONTENT_TYPE
            && name != header::CONTENT_LENGTH
        {
            rewritten.headers_mut().append(name, value);
        }
    }
    rewritten
}

async fn readyz(State(state): State<Shared>) -> Response {
    if let Some((broker, _)) = state.ready() {
        if !broker.caught_up() {
            return (StatusCode::SERVICE_UNAVAILABLE, "catching up\n").into_response();
        }
        return (StatusCode::OK, "ready\n").into_response();
    }
    let phase = match &*state.phase.read().unwrap_or_else(|p| p.into_inner()) {
        Phase::Recovering => "recovering\n",
        Phase::Ready(..) | Phase::Stopping => "stopping\n",
    };
    (StatusCode::SERVICE_UNAVAILABLE, phase).into_response()
}

async fn metrics(a: Admitted) -> Result<Response, Refusal> {
    let scrape = scrape::Scrape::gather(&a.broker, |r| a.may_describe(r)).await;
    let text = scrape
        .encode()
        .map_err(|e| Refusal::Failed(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// Samples the broker's totals every [`rates::INTERVAL`] while it serves, until `stop`.
async fn sample_rates(state: Shared, stop: CancellationToken) {
    let mut every = tokio::time::interval(rates::INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        if let Some((broker, _)) = state.ready() {
            state.rates.sample(&broker);
        }
    }
}

/// Binds the HTTP port, if it is on; with the address it got (port 0 picks one).
pub async fn bind(
    config: &crate::config::Config,
) -> Result<Option<(TcpListener, SocketAddr)>, super::error::ServeError> {
    let addr = config
        .http
        .addr()
        .map_err(|e| super::error::ServeError::Http(e.to_string()))?;
    let Some(addr) = addr else {
        return Ok(None);
    };
    let bound = match TcpListener::bind(addr).await {
        Ok(l) => l.local_addr().map(|a| (l, a)),
        Err(e) => Err(e),
    };
    bound
        .map(Some)
        .map_err(|source| super::error::ServeError::Bind { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits() -> Limits {
        Limits {
            max_connections: 8,
            header_timeout: Duration::from_secs(10),
        }
    }

    async fn status(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.unwrap();
        let code = raw.split(' ').nth(1).unwrap().parse().unwrap();
        let body = raw.split_once("\r\n\r\n").unwrap().1.to_string();
        (code, body)
    }

    #[tokio::test]
    async fn before_recovery_and_while_stopping_only_liveness_answers_200() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(HttpState::default());
        let stop = CancellationToken::new();
        let task = spawn(listener, Arc::clone(&state), limits(), stop.clone());
        for phase in ["recovering", "stopping"] {
            assert_eq!(status(addr, "/healthz").await, (200, "ok\n".into()));
            let body = format!("{{\"error\":\"{phase}\"}}");
            assert_eq!(status(addr, "/readyz").await, (503, body));
            for path in ["/metrics", "/api/v1/topics", "/api/v1/groups/g"] {
                assert_eq!(status(addr, path).await.0, 503, "{path} while {phase}");
            }
            // The console's own files need no broker.
            assert_eq!(status(addr, "/").await.0, 200);
            state.stopping();
        }
        stop.cancel();
        task.await.unwrap();
    }
}
