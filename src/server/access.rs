//! Permission checks inside the RPCs, and their audit records.
//!
//! Every RPC of `sluice.v1.Broker`, `sluice.v1.Admin` and the seed `broker.Broker` asks
//! [`Access::require`] before it touches anything: a denial is recorded in `_audit` (or counted
//! and summarised, for a source that keeps being refused: `broker::refusals`) and answered
//! `PERMISSION_DENIED`, with nothing changed. Administrative actions are recorded with their
//! outcome ([`Access::record_admin`]) before they are answered; if that record cannot be
//! written the call fails (`UNAVAILABLE`), saying whether the action itself happened.

use std::sync::Arc;

use tonic::{Code, Request, Status};

use crate::auth::{Action, Caller, Resource};
use crate::broker::Broker;
use crate::broker::audit::{AUDIT_TOPIC, AuditEvent, Decision};

use super::status::{status, to_status};

/// The caller a request was admitted as (set by the connection layer for every request).
pub fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("missing or invalid credentials"))
}

/// An event about `caller`'s call.
pub fn event(caller: &Caller, rpc: &str, resource: String, decision: Decision) -> AuditEvent {
    AuditEvent {
        principal: caller.name().to_string(),
        peer: caller.peer.addr.to_string(),
        tls_subject: caller.peer.tls_subject().to_string(),
        rpc: rpc.to_string(),
        resource,
        decision: Some(decision),
        request_id: caller.request_id.to_string(),
        ..AuditEvent::default()
    }
}

/// The checks and records of one service.
#[derive(Debug, Clone)]
pub struct Access {
    broker: Arc<Broker>,
}

impl Access {
    pub fn new(broker: Arc<Broker>) -> Access {
        Access { broker }
    }

    /// Ok when `caller` may do `action` to `resource`; otherwise records the denial and
    /// answers `PERMISSION_DENIED`.
    pub async fn require(
        &self,
        caller: &Caller,
        rpc: &str,
        action: Action,
        resource: Resource<'_>,
    ) -> Result<(), Status> {
        // The audit trail is written by the broker alone, whatever any grant says.
        let protected = resource == Resource::Topic(AUDIT_TOPIC)
            && matches!(action, Action::Produce | Action::Admin);
        if !protected && caller.allows(action, resource) {
            return Ok(());
        }
        let mut e = event(caller, rpc, resource.to_string(), Decision::Denied);
        e.outcome = if protected {
            format!("PERMISSION_DENIED: {AUDIT_TOPIC} is written by the broker only")
        } else {
            format!("PERMISSION_DENIED: {} not granted", action.as_str())
        };
        let slowed = self.broker.refusals().record(e).await;
        tokio::time::sleep(slowed.map_err(to_status)?).await;
        Err(status(
            Code::PermissionDenied,
            if protected {
                format!(
                    "{AUDIT_TOPIC} is the audit trail: only the broker writes, deletes or shortens it"
                )
            } else {
                format!("{} may not {} {resource}", caller.name(), action.as_str())
            },
        ))
    }

    /// Reading a topic, alone or as a member of `group` (empty: none): `consume` on both.
    pub async fn require_consume(
        &self,
        caller: &Caller,
        rpc: &str,
        topic: &str,
        group: &str,
    ) -> Result<(), Status> {
        self.require(caller, rpc, Action::Consume, Resource::Topic(topic))
            .await?;
        if group.is_empty() {
            return Ok(());
        }
        self.require(caller, rpc, Action::Consume, Resource::Group(group))
            .await
    }

    /// Whether a call may create the topic it names on first use: when the topic is missing
    /// and `auto_create` applies, that needs `admin` on it. Returns the event that records the
    /// creation, for the broker to fill in if it creates the topic.
    pub async fn may_create(
        &self,
        caller: &Caller,
        rpc: &str,
        topic: &str,
        auto_create: bool,
    ) -> Result<Option<AuditEvent>, Status> {
        if !auto_create || self.broker.existing_topic(topic).is_ok() {
            return Ok(None);
        }
        self.require(caller, rpc, Action::Admin, Resource::Topic(topic))
            .await?;
        Ok(Some(event(caller, rpc, String::new(), Decision::Allowed)))
    }

    /// Records an administrative action's outcome. `done`: whether the action happened (said in
    /// the error when the record cannot be written).
    pub async fn record(&self, event: AuditEvent, done: bool) -> Result<(), Status> {
        self.broker.audit().record(event).await.map_err(|e| {
            status(
                Code::Unavailable,
                format!(
                    "the audit trail cannot be written ({e}); the action {}",
                    if done {
                        "was carried out"
                    } else {
                        "was not carried out"
                    }
                ),
            )
        })
    }

    /// Records the outcome of an administrative call, then passes its result on.
    pub async fn record_admin<T>(
        &self,
        mut event: AuditEvent,
        result: Result<T, Status>,
    ) -> Result<T, Status> {
        event.outcome = match &result {
            Ok(_) => "ok".into(),
            Err(s) => format!("{:?}: {}", s.code(), s.message()),
        };
        self.record(event, result.is_ok()).await?;
        result
    }
}
