//! The server's front door: TLS for each new connection, admission of each request (who is
//! calling), and the SIGHUP reload of both.
//!
//! - Health (`grpc.health.v1`) is open to everyone. Reflection is served when
//!   `auth.reflection` is on, to the same callers as everything else.
//! - A request without valid credentials while `auth.required` is on, or with a bad token
//!   whatever the setting, is answered `UNAUTHENTICATED` with the same words every time (no hint
//!   about which part was wrong) and recorded in `_audit` with the reason.
//! - Reload reads the config file again: new principals and grants apply to requests admitted
//!   from then on, new certificates to handshakes from then on; established connections and
//!   calls in progress go on. A reload that fails keeps everything as it was. Either way it is
//!   recorded.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use http::{Request, Response};
use tokio_rustls::TlsAcceptor;
use tonic::Status;
use tonic::body::Body;

use crate::auth::{Gate, Peer, Policy, tls};
use crate::broker::Broker;
use crate::broker::audit::{AuditEvent, Decision};
use crate::config::Config;

use super::access::event;

const HEALTH: &str = "/grpc.health.v1.Health/";
const REFLECTION: &str = "/grpc.reflection.";

/// What every connection shares: the gate, the TLS acceptor, the audit trail's broker.
#[derive(Debug)]
pub struct Front {
    gate: Gate,
    tls: RwLock<Option<Arc<tokio_rustls::rustls::ServerConfig>>>,
    broker: Arc<Broker>,
    config_file: Option<PathBuf>,
}

/// A start-up problem with the security settings.
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("auth: {0}")]
    Auth(String),
}

impl Front {
    pub fn new(config: &Config, broker: Arc<Broker>) -> Result<Front, FrontError> {
        let policy = Policy::from_config(&config.auth).map_err(FrontError::Auth)?;
        let tls = tls::server_config(&config.tls)?;
        Ok(Front {
            gate: Gate::new(policy),
            tls: RwLock::new(tls),
            broker,
            config_file: config.config_file.clone(),
        })
    }

    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        self.broker.metrics()
    }

    /// Who sends a request with these headers (for the HTTP port, which has no TLS).
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// The acceptor for a new connection, if TLS is on.
    pub fn acceptor(&self) -> Option<TlsAcceptor> {
        self.tls
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .map(TlsAcceptor::from)
    }

    /// Admits a request (the caller goes into its extensions), or answers it.
    pub async fn admit(
        &self,
        req: &mut Request<Body>,
        peer: &Arc<Peer>,
    ) -> Result<(), Response<Body>> {
        let path = req.uri().path();
        if path.starts_with(HEALTH) {
            return Ok(());
        }
        match self.gate.admit(req.headers(), peer) {
            Ok(caller) => {
                if path.starts_with(REFLECTION) && !caller.policy().reflection {
                    return Err(Status::unimplemented("reflection is off").into_http());
                }
                req.extensions_mut().insert(caller);
                Ok(())
            }
            Err((caller, why)) => {
                let rpc = req.uri().path().trim_start_matches('/');
                let mut e = event(&caller, rpc, String::new(), Decision::Unauthenticated);
                e.outcome = format!("UNAUTHENTICATED: {}", why.as_str());
                let status = match self.broker.refusals().record(e).await {
                    Ok(slowed) => {
                        // A source that keeps failing waits (see `broker::refusals`).
                        tokio::time::sleep(slowed).await;
                        Status::unauthenticated("missing or invalid credentials")
                    }
                    Err(err) => super::status::status(
                        tonic::Code::Unavailable,
                        format!("audit trail: {err}"),
                    ),
                };
                Err(status.into_http())
            }
        }
    }

    /// Reads the config file again and applies its `[auth]` and `[tls]` (see the module text).
    pub async fn reload(&self) {
        let outcome = self.try_reload();
        let event = match &outcome {
            Ok(policy) => AuditEvent::system("broker/reload", "ok")
                .count("principals", policy.0 as u64)
                .count("grants", policy.1 as u64),
            Err(e) => AuditEvent::system("broker/reload", format!("refused: {e}")),
        };
        match &outcome {
            Ok(_) => tracing::info!("reloaded principals, grants and certificates"),
            Err(e) => tracing::error!(error = %e, "reload refused; serving as before"),
        }
        if let Err(e) = self.broker.audit().record(event).await {
            tracing::error!(error = %e, "cannot record the reload in the audit trail");
        }
    }

    /// Returns the counts of principals and grants now in force.
    fn try_reload(&self) -> Result<(usize, usize), String> {
        let config = Config::load(self.config_file.as_deref(), std::env::vars())
            .map_err(|e| e.to_string())?;
        let policy = Policy::from_config(&config.auth)?;
        let tls = tls::server_config(&config.tls).map_err(|e| e.to_string())?;
        let mut current = self.tls.write().unwrap_or_else(|p| p.into_inner());
        match (current.is_some(), tls) {
            (true, Some(t)) => *current = Some(t),
            (false, None) => {}
            (true, None) | (false, Some(_)) => {
                return Err("turning TLS on or off needs a restart".into());
            }
        }
        let counts = (config.auth.principals.len(), config.auth.grants.len());
        self.gate.replace(policy);
        Ok(counts)
    }
}
