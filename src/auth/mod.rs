//! Access control: who is calling ([`Gate::admit`], per request, from the bearer token and the
//! connection's client certificate) and what they may do ([`Caller::allows`]). The policy and
//! the TLS files are replaced as a whole on SIGHUP; a call in progress keeps the policy it was
//! admitted under.
//!
//! See docs/security.md for the threat model and the settings.

pub mod policy;
pub mod tls;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use base64::Engine;

pub use policy::{Action, AuthConfig, Policy, Resource};
pub use tls::{ClientAuth, TlsConfig};

/// The far end of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The verified client certificate's subject then alternative names; empty without one.
    pub certificate_names: Vec<String>,
}

impl Peer {
    pub fn tls_subject(&self) -> &str {
        self.certificate_names
            .first()
            .map(String::as_str)
            .unwrap_or("")
    }
}

/// Who a request comes from, as admitted: carried in the request's extensions.
#[derive(Debug, Clone)]
pub struct Caller {
    /// `None`: no credentials (allowed only while `auth.required` is off).
    pub principal: Option<Arc<str>>,
    pub peer: Arc<Peer>,
    pub request_id: RequestId,
    policy: Arc<Policy>,
}

/// A request's id in the audit trail: the client's `x-request-id` (1 to 128 visible ASCII
/// characters), or a number the broker gives it. Kept as it came; text only when recorded.
#[derive(Debug, Clone)]
pub enum RequestId {
    Client(http::HeaderValue),
    Broker(u64),
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // Checked to be visible ASCII when admitted.
            RequestId::Client(v) => f.write_str(v.to_str().unwrap_or_default()),
            RequestId::Broker(n) => write!(f, "r{n}"),
        }
    }
}

impl Caller {
    /// The principal's name, or `anonymous`.
    pub fn name(&self) -> &str {
        self.principal.as_deref().unwrap_or(policy::ANONYMOUS)
    }

    pub fn allows(&self, action: Action, resource: Resource<'_>) -> bool {
        self.policy
            .allows(self.principal.as_deref(), action, resource)
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }
}

/// Why a request was not admitted. Recorded in the audit trail, never told to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No token and no known certificate, with `auth.required` on.
    NoCredentials,
    /// A token that is malformed or belongs to no principal.
    BadToken,
    /// The token and the certificate name different principals.
    Mismatch,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::NoCredentials => "no credentials",
            Rejection::BadToken => "unknown or malformed bearer token",
            Rejection::Mismatch => "token and client certificate name different principals",
        }
    }
}

/// Admits requests under the current policy.
#[derive(Debug)]
pub struct Gate {
    policy: RwLock<Arc<Policy>>,
    next_request: AtomicU64,
}

impl Gate {
    pub fn new(policy: Policy) -> Gate {
        Gate {
            policy: RwLock::new(Arc::new(policy)),
            next_request: AtomicU64::new(1),
        }
    }

    pub fn policy(&self) -> Arc<Policy> {
        Arc::clone(&self.policy.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Replaces the policy for requests admitted from now on.
    pub fn replace(&self, policy: Policy) {
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
    }

    /// Who sends a request with these headers over this connection. On rejection, the caller
    /// as far as it is known (for the audit record).
    pub fn admit(
        &self,
        headers: &http::HeaderMap,
        peer: &Arc<Peer>,
    ) -> Result<Caller, (Caller, Rejection)> {
        let policy = self.policy();
        let request_id = match headers.get("x-request-id") {
            Some(v) if (1..=128).contains(&v.len()) && v.to_str().is_ok() => {
                RequestId::Client(v.clone())
            }
            _ => RequestId::Broker(self.next_request.fetch_add(1, Ordering::Relaxed)),
        };
        let by_certificate = policy
            .by_certificate(&peer.certificate_names)
            .map(|p| Arc::clone(&p.name));
        let mut caller = Caller {
            principal: None,
            peer: Arc::clone(peer),
            request_id,
            policy: Arc::clone(&policy),
        };
        let token = match headers.get(http::header::AUTHORIZATION) {
            None => None,
            Some(v) => match v.to_str().ok().and_then(bearer) {
                Some(t) => Some(t),
                None => return Err((caller, Rejection::BadToken)),
            },
        };
        let principal = match token {
            Some(t) => {
                let Some(p) = policy.by_token(t) else {
                    return Err((caller, Rejection::BadToken));
                };
                if by_certificate.as_ref().is_some_and(|c| *c != p.name) {
                    return Err((caller, Rejection::Mismatch));
                }
                Some(Arc::clone(&p.name))
            }
            None => by_certificate,
        };
        if principal.is_none() && policy.required {
            return Err((caller, Rejection::NoCredentials));
        }
        caller.principal = principal;
        Ok(caller)
    }
}

/// The token of an `authorization: Bearer <token>` value.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A new bearer token: 32 random bytes, base64url without padding (43 characters).
pub fn new_token() -> Result<String, String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "the system's random source failed".to_string())?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}
