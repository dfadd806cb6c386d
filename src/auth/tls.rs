//! TLS on the gRPC port (rustls with the `ring` provider): the `[tls]` settings, the server
//! configuration built from their files, the names a client certificate carries, and mutual TLS
//! between cluster nodes from the same files.
//!
//! Every problem with a file (unreadable, no certificate or key in it, a key that does not
//! belong to the certificate, a certificate not yet or no longer valid) is a start-up error
//! naming the file and the problem; on SIGHUP the same checks decide whether the new files
//! replace the old ones (a failed reload keeps serving with the old ones).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};

/// Whether clients must present a certificate under mutual TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// A client without a certificate signed by `client_ca_file` cannot connect.
    #[default]
    Required,
    /// A client may connect without one (and authenticate with a token instead).
    Optional,
}

/// `[tls]`. TLS is on when `cert_file` is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, the server's own certificate first. Default: empty (no TLS).
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the first certificate.
    pub key_file: PathBuf,
    /// PEM CA certificates that sign client certificates: turns on mutual TLS.
    pub client_ca_file: PathBuf,
    /// `required` or `optional` (with `client_ca_file`). Default: `required`.
    pub client_auth: ClientAuth,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        !self.cert_file.as_os_str().is_empty()
    }
}

/// A TLS setting that cannot be used, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("tls: {}: {problem}", file.display())]
pub struct TlsError {
    pub file: PathBuf,
    pub problem: String,
}

fn fail(file: &Path, problem: impl Into<String>) -> TlsError {
    TlsError {
        file: file.to_path_buf(),
        problem: problem.into(),
    }
}

/// ring's suites, AES-128-GCM first: the server picks it over AES-256-GCM (the first in rustls'
/// and most clients' lists), which spends 14 AES rounds per block where AES-128 spends 10; both
/// are approved for this data (NIST SP 800-52r2). Other suites keep their order.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| !AES_128_GCM.contains(&s.suite()));
    Arc::new(provider)
}

const AES_128_GCM: [rustls::CipherSuite; 3] = [
    rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
    rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
];

/// Reads every certificate of a PEM file, checking each is valid now.
fn certificates(file: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(file).map_err(|e| fail(file, format!("cannot read: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(file, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(fail(file, "holds no certificate"));
    }
    let now = x509_parser::time::ASN1Time::now();
    for (i, der) in certs.iter().enumerate() {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| fail(file, format!("certificate {i} does not parse: {e}")))?;
        let v = cert.validity();
        if now < v.not_before {
            return Err(fail(
                file,
                format!("certificate {i} is not valid before {}", v.not_before),
            ));
        }
        if now > v.not_after {
            return Err(fail(
                file,
                format!("certificate {i} expired at {}", v.not_after),
            ));
        }
    }
    Ok(certs)
}

/// The server's rustls configuration from `[tls]`, or `None` when TLS is off. HTTP/2 only.
pub fn server_config(tls: &TlsConfig) -> Result<Option<Arc<ServerConfig>>, TlsError> {
    if !tls.enabled() {
        if !tls.key_file.as_os_str().is_empty() || !tls.client_ca_file.as_os_str().is_empty() {
            return Err(fail(
                &tls.key_file,
                "tls.key_file and tls.client_ca_file need tls.cert_file",
            ));
        }
        return Ok(None);
    }
    let chain = certificates(&tls.cert_file)?;
    let key_file = &tls.key_file;
    if key_file.as_os_str().is_empty() {
        return Err(fail(&tls.cert_file, "tls.key_file is not set"));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| fail(key_file, format!("no usable private key: {e}")))?;
    let provider = provider();
    let certified = rustls::sign::CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
        fail(
            key_file,
            format!(
                "does not match the certificate in {}: {e}",
                tls.cert_file.display()
            ),
        )
    })?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(&tls.cert_file, e.to_string()))?;
    let builder = if tls.client_ca_file.as_os_str().is_empty() {
        builder.with_no_client_auth()
    } else {
        let ca_file = &tls.client_ca_file;
        let mut roots = RootCertStore::empty();
        for ca in certificates(ca_file)? {
            roots
                .add(ca)
                .map_err(|e| fail(ca_file, format!("not a usable CA certificate: {e}")))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
        let verifier = match tls.client_auth {
            ClientAuth::Required => verifier,
            ClientAuth::Optional => verifier.allow_unauthenticated(),
        };
        let verifier = verifier.build().map_err(|e| fail(ca_file, e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    };
    let mut config = builder.with_cert_resolver(Arc::new(Single(Arc::new(certified))));
    config.alpn_protocols = vec![b"h2".to_vec()];
    // The server's order of suites, not the client's: see `provider`.
    config.ignore_client_order = true;
    Ok(Some(Arc::new(config)))
}

/// Mutual TLS on the cluster port, from the same `[tls]` files as the client port: each node
/// serves its certificate, presents the same one as a client to the other nodes, and accepts
/// only peers whose certificate `client_ca_file` signed (required, whatever `client_auth` says
/// for clients; the cluster port also checks the certificate names a peer's host, see
/// [`certificate_hosts`]). The files are checked as for the client port. Returns the cluster
/// port's server configuration and tonic's for its channels to the peers.
pub fn cluster_tls(
    tls: &TlsConfig,
) -> Result<(Arc<ServerConfig>, tonic::transport::ClientTlsConfig), TlsError> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    if tls.client_ca_file.as_os_str().is_empty() {
        return Err(fail(
            &tls.cert_file,
            "a cluster node with TLS needs tls.client_ca_file: the CA that signed every node's \
             certificate (nodes authenticate each other with mutual TLS)",
        ));
    }
    let required = TlsConfig {
        client_auth: ClientAuth::Required,
        ..tls.clone()
    };
    let server = server_config(&required)?.ok_or_else(|| fail(&tls.cert_file, "TLS is off"))?;
    let read =
        |file: &Path| std::fs::read(file).map_err(|e| fail(file, format!("cannot read: {e}")));
    let identity = Identity::from_pem(read(&tls.cert_file)?, read(&tls.key_file)?);
    let ca = Certificate::from_pem(read(&tls.client_ca_file)?);
    let client = ClientTlsConfig::new()
        .ca_certificate(ca)
        .identity(identity)
        .assume_http2(true);
    Ok((server, client))
}

/// One certificate for every handshake.
#[derive(Debug)]
struct Single(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Single {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// The hosts a certificate names in its alternative names: DNS names (lower case) and IP
/// addresses (as text, `10.0.0.2`).
pub fn certificate_hosts(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(s) => Some(s.to_ascii_lowercase()),
            GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b)
                    .ok()
                    .map(|a| std::net::Ipv4Addr::from(a).to_string()),
                16 => <[u8; 16]>::try_from(*b)
                    .ok()
                    .map(|a| std::net::Ipv6Addr::from(a).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// A client certificate's names: its subject (RFC 2253 order, as `openssl x509 -subject
/// -nameopt RFC2253` prints it) first, then its DNS, email and URI alternative names.
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names = vec![rfc2253(cert.subject())];
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        use x509_parser::extensions::GeneralName;
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => {
                    names.push((*s).to_string())
                }
                _ => {}
            }
        }
    }
    names
}

/// `CN=alice,O=Clinic`: the subject's attributes, most specific first, comma separated.
fn rfc2253(name: &x509_parser::x509::X509Name<'_>) -> String {
    let mut parts: Vec<String> = Vec::new();
    for rdn in name.iter() {
        let attrs: Vec<String> = rdn
            .iter()
            .map(|a| {
                let key = x509_parser::objects::oid2abbrev(
                    a.attr_type(),
                    x509_parser::objects::oid_registry(),
                )
                .map(str::to_string)
                .unwrap_or_else(|_| a.attr_type().to_id_string());
                let value = a.as_str().map(str::to_string).unwrap_or_default();
                format!("{key}={value}")
            })
            .collect();
        parts.push(attrs.join("+"));
    }
    parts.reverse();
    parts.join(",")
}
