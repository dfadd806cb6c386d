//! The server's one error type: what stops it from starting or running.

use std::net::SocketAddr;

/// Errors that stop the server from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Broker(#[from] crate::broker::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Security(#[from] super::front::FrontError),
    #[error("http: {0}")]
    Http(String),
    #[error("cannot watch for SIGHUP: {0}")]
    Signal(std::io::Error),
}
