//! Who may ask what: a request is admitted (the broker ready, the caller's credentials
//! valid) before a handler runs, and refused otherwise with a JSON error, the refusals that
//! access control makes recorded in `_audit` as on gRPC.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::state::Shared;
use crate::auth::{Action, Caller, Peer, Resource};
use crate::broker::Broker;
use crate::broker::audit::Decision;

/// An answer other than the happy one.
#[derive(Debug)]
pub(super) enum Refusal {
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
        let status = crate::server::status::to_status(e);
        let code = match status.code() {
            tonic::Code::NotFound => StatusCode::NOT_FOUND,
            tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
            // Asked of a broker in the wrong state for it (`/api/v1/cluster` on a single node).
            tonic::Code::FailedPrecondition => StatusCode::CONFLICT,
            tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Refusal::Failed(code, status.message().to_string())
    }
}

/// A request admitted: the broker, who asks, and what (`http GET /path`, as audit records name
/// it). Extracting it from a request admits the request: 503 before the broker is ready; 401,
/// recorded in `_audit` like a gRPC refusal, without valid credentials.
pub(super) struct Admitted {
    pub(super) broker: Arc<Broker>,
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
                let mut e = crate::server::access::event(
                    &caller,
                    &rpc,
                    String::new(),
                    Decision::Unauthenticated,
                );
                e.outcome = format!("UNAUTHENTICATED: {}", why.as_str());
                let slowed = broker.refusals().record(e).await?;
                tokio::time::sleep(slowed).await;
                Err(Refusal::Unauthenticated)
            }
        }
    }
}

impl Admitted {
    pub(super) fn may_describe(&self, resource: Resource<'_>) -> bool {
        self.caller.allows(Action::Describe, resource)
    }

    /// Ok when the caller may describe `resource`; otherwise a recorded 403.
    pub(super) async fn require(&self, resource: Resource<'_>) -> Result<(), Refusal> {
        self.require_to(Action::Describe, resource).await
    }

    /// Ok when the caller may do `action` to `resource`; otherwise a recorded 403.
    pub(super) async fn require_to(
        &self,
        action: Action,
        resource: Resource<'_>,
    ) -> Result<(), Refusal> {
        if self.caller.allows(action, resource) {
            return Ok(());
        }
        let mut e = crate::server::access::event(
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
