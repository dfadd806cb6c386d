//! Connecting the client commands to a broker: the address forms (`host:port`, `http://`,
//! `https://`), TLS and mutual TLS from the command's files, and the bearer token sent with every
//! call.

use std::time::Duration;

use tonic::Status;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::proto::v1::broker_client::BrokerClient;

use super::args::{BrokerArg, Credentials};
use super::error::CliError;

/// Largest response a client accepts.
const MAX_RESPONSE: usize = 64 << 20;

/// A connection to a broker that sends the caller's bearer token with every call.
pub type Link = InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer <token>` to every call, when there is a token.
#[derive(Debug, Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// Connects to a broker at `broker.broker` with its credentials.
pub async fn link(broker: &BrokerArg) -> Result<Link, CliError> {
    link_with(&broker.broker, &broker.credentials).await
}

/// [`link`] to an address with credentials.
pub async fn link_with(addr: &str, credentials: &Credentials) -> Result<Link, CliError> {
    Ok(InterceptedService::new(
        channel(addr, credentials).await?,
        bearer(credentials.token.as_deref())?,
    ))
}

/// The `authorization` value for a token; an empty one (`SLUICE_TOKEN=`) is no token.
fn bearer(token: Option<&str>) -> Result<Bearer, CliError> {
    match token.map(str::trim).filter(|t| !t.is_empty()) {
        None => Ok(Bearer(None)),
        Some(t) => Ok(Bearer(Some(format!("Bearer {t}").parse().map_err(
            |_| CliError::Usage("--token holds characters a header cannot carry".into()),
        )?))),
    }
}

/// Connects to a broker (`host:port` or a URL) without credentials, over plaintext unless the
/// address is `https://`.
pub async fn connect(addr: &str) -> Result<Channel, CliError> {
    channel(addr, &Credentials::default()).await
}

/// Connects to a broker (`host:port` or a URL; `https://` or any TLS file means TLS).
pub async fn channel(addr: &str, credentials: &Credentials) -> Result<Channel, CliError> {
    let c = credentials;
    let tls = addr.starts_with("https://") || c.tls_ca.is_some() || c.tls_cert.is_some();
    let url = match addr.split_once("://") {
        Some(("http", _)) if tls => {
            return Err(CliError::Usage(format!(
                "{addr}: TLS options need an https:// address (or host:port)"
            )));
        }
        Some(_) => addr.to_string(),
        None if tls => format!("https://{addr}"),
        None => format!("http://{addr}"),
    };
    let mut endpoint = Endpoint::from_shared(url).map_err(|source| CliError::Connect {
        addr: addr.to_string(),
        source,
    })?;
    if tls {
        endpoint = endpoint
            .tls_config(client_tls(c)?)
            .map_err(|source| CliError::Connect {
                addr: addr.to_string(),
                source,
            })?;
    }
    endpoint
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20))
        // A subscription's responses are up to `delivery_batch_bytes` (256 KiB): one frame each.
        .max_frame_size(1 << 20)
        .connect()
        .await
        .map_err(|source| CliError::Connect {
            addr: addr.to_string(),
            source,
        })
}

fn client_tls(c: &Credentials) -> Result<ClientTlsConfig, CliError> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| CliError::Usage(format!("cannot read {}: {e}", p.display())))
    };
    let mut tls = ClientTlsConfig::new();
    tls = match &c.tls_ca {
        Some(ca) => tls.ca_certificate(Certificate::from_pem(read(ca)?)),
        None => tls.with_native_roots(),
    };
    if let (Some(cert), Some(key)) = (&c.tls_cert, &c.tls_key) {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    if let Some(d) = &c.tls_domain {
        tls = tls.domain_name(d.clone());
    }
    Ok(tls)
}

pub fn broker_client(channel: Link) -> BrokerClient<Link> {
    BrokerClient::new(channel)
        .max_decoding_message_size(MAX_RESPONSE)
        .max_encoding_message_size(MAX_RESPONSE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_token_sends_no_authorization_and_a_real_one_is_sent_as_bearer() {
        for none in [None, Some(""), Some("  ")] {
            assert!(bearer(none).unwrap().0.is_none(), "{none:?}");
        }
        let b = bearer(Some(" abc ")).unwrap().0.unwrap();
        assert_eq!(b.to_str().unwrap(), "Bearer abc");
        assert!(bearer(Some("a\nb")).is_err());
    }
}
