//! The HTTP port beside gRPC (`[http] listen`, default `127.0.0.1:7071`): read-only.
//!
//! | path                               | what                                                   |
//! |------------------------------------|--------------------------------------------------------|
//! | `/healthz`                         | 200 while the process serves HTTP (also during recovery) |
//! | `/readyz`                          | 200 once recovered and serving gRPC; 503 before and while stopping |
//! | `/metrics`                         | OpenMetrics text (see docs/operations.md for every metric) |
//! | `/api/v1/overview`                 | totals for the console's first page                    |
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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::front::Front;
use crate::auth::{Action, Caller, Peer, Resource};
use crate::broker::Broker;
use crate::broker::audit::Decision;
use crate::broker::groups::DLQ_GROUP;

mod console;
mod rates;
mod scrape;

/// The newest dead letters one request may ask for.
const MAX_DEAD_LETTERS: usize = 100;

/// What the handlers share: the broker while it serves.
#[derive(Debug, Default)]
pub struct HttpState {
    phase: RwLock<Phase>,
    /// The console's rate history, sampled while the broker serves.
    rates: rates::RateHistory,
}

#[derive(Debug, Default)]
enum Phase {
    #[default]
    Recovering,
    Ready(Arc<Broker>, Arc<Front>),
    Stopping,
}

impl HttpState {
    /// The broker is open: `/readyz` and the API answer from now on.
    pub fn serve(&self, broker: Arc<Broker>, front: Arc<Front>) {
        // The first sample at once: a page loaded now has where its history starts.
        self.rates.sample(&broker);
        *self.phase.write().unwrap_or_else(|p| p.into_inner()) = Phase::Ready(broker, front);
    }

    /// The broker is closing: the port lets go of it (its data directory's lock goes with the
    /// last reference), and answers 503 until it stops.
    pub fn stopping(&self) {
        *self.phase.write().unwrap_or_else(|p| p.into_inner()) = Phase::Stopping;
    }

    fn ready(&self) -> Option<(Arc<Broker>, Arc<Front>)> {
        match &*self.phase.read().unwrap_or_else(|p| p.into_inner()) {
            Phase::Ready(b, f) if !b.shutdown_token().is_cancelled() => {
                Some((Arc::clone(b), Arc::clone(f)))
            }
            _ => None,
        }
    }
}

type Shared = Arc<HttpState>;

/// Serves the port until `stop` is cancelled; the task ends once every request in progress
/// has been answered.
pub fn spawn(
    listener: TcpListener,
    state: Shared,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let sampled = Arc::clone(&state);
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/overview", get(overview))
        .route("/api/v1/topics", get(topics))
        .route("/api/v1/topics/{topic}", get(topic))
        .route("/api/v1/topics/{topic}/dead-letters", get(dead_letters))
        .route("/api/v1/groups", get(groups))
        .route("/api/v1/groups/{group}", get(group))
        .merge(console::routes())
        .fallback(no_such_path)
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state);
    tokio::spawn(sample_rates(sampled, stop.clone()));
    tokio::spawn(async move {
        let service = app.into_make_service_with_connect_info::<SocketAddr>();
        if let Err(e) = axum::serve(listener, service)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "the HTTP port stopped");
        }
    })
}

/// An answer other than the happy one.
#[derive(Debug)]
enum Refusal {
    NotReady,
    Unauthenticated,
    Forbidden(String),
    Failed(StatusCode, String),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            Refusal::NotReady => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the broker is starting or stopping".to_string(),
            ),
            Refusal::Unauthenticated => {
                let body = Json(json!({"error": "missing or invalid credentials"}));
                return (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer")],
                    body,
                )
                    .into_response();
            }
            Refusal::Forbidden(m) => (StatusCode::FORBIDDEN, m),
            Refusal::Failed(s, m) => (s, m),
        };
        (status, Json(json!({ "error": message }))).into_response()
    }
}

impl From<crate::broker::Error> for Refusal {
    fn from(e: crate::broker::Error) -> Refusal {
        let status = super::status::to_status(e);
        let code = match status.code() {
            tonic::Code::NotFound => StatusCode::NOT_FOUND,
            tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
            tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Refusal::Failed(code, status.message().to_string())
    }
}

/// A request admitted: the broker, who asks, and what (`http GET /path`, as audit records name
/// it). Extracting it from a request admits the request: 503 before the broker is ready; 401,
/// recorded in `_audit` like a gRPC refusal, without valid credentials.
struct Admitted {
    broker: Arc<Broker>,
    caller: Caller,
    rpc: String,
}

impl FromRequestParts<Shared> for Admitted {
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, Refusal> {
        let rpc = format!("http GET {}", parts.uri.path());
        let (broker, front) = state.ready().ok_or(Refusal::NotReady)?;
        let addr = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0)
            .ok_or_else(|| Refusal::Failed(StatusCode::INTERNAL_SERVER_ERROR, "no peer".into()))?;
        let peer = Arc::new(Peer {
            addr,
            certificate_names: Vec::new(),
        });
        match front.gate().admit(&parts.headers, &peer) {
            Ok(caller) => Ok(Admitted {
                broker,
                caller,
                rpc,
            }),
            Err((caller, why)) => {
                let mut e =
                    super::access::event(&caller, &rpc, String::new(), Decision::Unauthenticated);
                e.outcome = format!("UNAUTHENTICATED: {}", why.as_str());
                broker.audit().record(e).await?;
                Err(Refusal::Unauthenticated)
            }
        }
    }
}

impl Admitted {
    fn may_describe(&self, resource: Resource<'_>) -> bool {
        self.caller.allows(Action::Describe, resource)
    }

    /// Ok when the caller may describe `resource`; otherwise a recorded 403.
    async fn require(&self, resource: Resource<'_>) -> Result<(), Refusal> {
        self.require_to(Action::Describe, resource).await
    }

    /// Ok when the caller may do `action` to `resource`; otherwise a recorded 403.
    async fn require_to(&self, action: Action, resource: Resource<'_>) -> Result<(), Refusal> {
        if self.caller.allows(action, resource) {
            return Ok(());
        }
        let mut e = super::access::event(
            &self.caller,
            &self.rpc,
            resource.to_string(),
            Decision::Denied,
        );
        e.outcome = format!("PERMISSION_DENIED: {} not granted", action.as_str());
        self.broker.audit().record(e).await?;
        Err(Refusal::Forbidden(format!(
            "{} may not {} {resource}",
            self.caller.name(),
            action.as_str()
        )))
    }
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
    if state.ready().is_some() {
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

async fn overview(a: Admitted, State(state): State<Shared>) -> Result<Json<Value>, Refusal> {
    let scrape = scrape::Scrape::gather(&a.broker, |r| a.may_describe(r)).await;
    let mut body = scrape.overview();
    // The history is of broker-wide totals: shown to a caller who may see every topic.
    let sees_all = a
        .broker
        .open_topics()
        .iter()
        .all(|t| a.may_describe(Resource::Topic(&t.name)));
    body["history"] = if sees_all {
        json!({
            "interval_seconds": rates::INTERVAL.as_secs(),
            "samples": state.rates.samples(),
        })
    } else {
        Value::Null
    };
    Ok(Json(body))
}

async fn topics(a: Admitted) -> Result<Json<Value>, Refusal> {
    let list: Vec<Value> = a
        .broker
        .open_topics()
        .iter()
        .filter(|t| a.may_describe(Resource::Topic(&t.name)))
        .map(|t| {
            let (mut records, mut bytes, mut appended) = (0, 0, 0);
            for p in &t.partitions {
                let s = p.log.stats();
                records += s.high_water - s.log_start;
                bytes += s.size_bytes;
                appended += p
                    .log
                    .metrics()
                    .records
                    .load(std::sync::atomic::Ordering::Relaxed);
            }
            json!({
                "name": &*t.name,
                "partitions": t.partitions.len(),
                "records": records,
                "size_bytes": bytes,
                "records_appended": appended,
            })
        })
        .collect();
    Ok(Json(json!({ "topics": list })))
}

async fn topic(a: Admitted, Path(name): Path<String>) -> Result<Json<Value>, Refusal> {
    a.require(Resource::Topic(&name)).await?;
    let d = a.broker.describe_topic(&name).await?;
    let partitions: Vec<Value> = d
        .partitions
        .iter()
        .map(|p| {
            json!({
                "partition": p.partition,
                "first_offset": p.first_offset,
                "next_offset": p.next_offset,
                "records": p.next_offset - p.first_offset,
                "size_bytes": p.size_bytes,
                "segments": p.segments,
                "held_bytes": p.held_bytes,
                "held_by": p.held_by,
            })
        })
        .collect();
    let groups: Vec<String> = a
        .broker
        .list_groups()?
        .into_iter()
        .filter(|(g, topics)| topics.contains(&name) && a.may_describe(Resource::Group(g)))
        .map(|(g, _)| g)
        .collect();
    let settings = a.broker.topic_settings_json(&name).unwrap_or(Value::Null);
    Ok(Json(json!({
        "name": d.name,
        "settings": settings,
        "partitions": partitions,
        "groups": groups,
        "ids": d.ids.map(|s| json!({
            "duplicates": s.duplicates,
            "in_memory": s.in_memory,
            "on_disk": s.on_disk,
        })),
    })))
}

async fn dead_letters(
    a: Admitted,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, Refusal> {
    a.require(Resource::Topic(&name)).await?;
    // Dead letters show records' keys and headers: reading them is consuming the DLQ.
    let dlq = crate::broker::groups::dlq_topic(&name);
    a.require_to(Action::Consume, Resource::Topic(&dlq)).await?;
    let limit = match query.get("limit") {
        None => 20,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_DEAD_LETTERS).contains(n))
            .ok_or_else(|| {
                Refusal::Failed(
                    StatusCode::BAD_REQUEST,
                    format!("limit must be between 1 and {MAX_DEAD_LETTERS}"),
                )
            })?,
    };
    // Only one group's dead letters (`?group=G`): filtered here, not in the browser, so that
    // another group's newer ones do not hide them.
    let group = query.get("group").cloned().filter(|g| !g.is_empty());
    if let Some(g) = &group {
        a.require(Resource::Group(g)).await?;
    }
    // A topic without dead letters has no `.dlq` topic yet: an empty list.
    a.broker.existing_topic(&name)?;
    let records = match a.broker.existing_topic(&dlq) {
        Ok(_) => {
            let wanted = group.clone();
            a.broker
                .newest_records(&dlq, limit, move |r| match &wanted {
                    None => true,
                    Some(g) => r
                        .headers
                        .iter()
                        .any(|h| h.key == DLQ_GROUP && h.value.as_ref() == g.as_bytes()),
                })
                .await?
        }
        Err(_) => Vec::new(),
    };
    let list: Vec<Value> = records
        .iter()
        .map(|(partition, r)| {
            let headers: Vec<Value> = r
                .headers
                .iter()
                .map(|h| json!({"key": h.key, "value": String::from_utf8_lossy(&h.value)}))
                .collect();
            json!({
                "partition": partition,
                "offset": r.offset,
                "timestamp_ms": r.timestamp,
                "key": r.key.as_ref().map(|k| String::from_utf8_lossy(k)),
                "value_bytes": r.value.as_ref().map_or(0, |v| v.len()),
                "headers": headers,
            })
        })
        .collect();
    Ok(Json(json!({ "topic": dlq, "dead_letters": list })))
}

async fn groups(a: Admitted) -> Result<Json<Value>, Refusal> {
    let list: Vec<Value> = a
        .broker
        .list_groups()?
        .into_iter()
        .filter(|(g, _)| a.may_describe(Resource::Group(g)))
        .map(|(g, topics)| json!({ "group": g, "topics": topics }))
        .collect();
    Ok(Json(json!({ "groups": list })))
}

async fn group(a: Admitted, Path(name): Path<String>) -> Result<Json<Value>, Refusal> {
    a.require(Resource::Group(&name)).await?;
    let described = a.broker.describe_group(&name).await?;
    let topics: Vec<Value> = described
        .iter()
        .filter(|d| a.may_describe(Resource::Topic(&d.topic)))
        .map(|d| {
            let members: Vec<Value> = d
                .members
                .iter()
                .map(|m| {
                    json!({
                        "id": m.id,
                        "in_flight": m.in_flight,
                        "max_in_flight": m.max_in_flight,
                        "exclusive": m.exclusive,
                    })
                })
                .collect();
            let partitions: Vec<Value> = d
                .partitions
                .iter()
                .map(|p| {
                    json!({
                        "partition": p.partition,
                        "committed": p.committed,
                        "end": p.end,
                        "lag": p.lag,
                        "in_flight": p.in_flight,
                        "pending": p.pending,
                        "redeliveries": p.redeliveries,
                        "ack_timeouts": p.ack_timeouts,
                        "dead_lettered": p.dead_lettered,
                        "owner": p.owner,
                        "blocked": p.blocked,
                    })
                })
                .collect();
            json!({
                "topic": d.topic,
                "lag": d.partitions.iter().map(|p| p.lag).sum::<u64>(),
                "dead_lettered": d.partitions.iter().map(|p| p.dead_lettered).sum::<u64>(),
                "members": members,
                "partitions": partitions,
            })
        })
        .collect();
    Ok(Json(json!({ "group": name, "topics": topics })))
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
        let task = spawn(listener, Arc::clone(&state), stop.clone());
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
