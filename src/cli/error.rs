//! The command-line tools' one error type, and the exit code each kind gets.

/// Errors of the command-line tools.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Serve(#[from] crate::server::ServeError),
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The cluster lacks something it needs (`cluster status`: a group without a leader).
    #[error("{0}")]
    Unhealthy(String),
    /// `verify` or `dump` pointed at a directory that is not a data directory (exit code 2).
    #[error("{0}")]
    NotDataDir(String),
}
