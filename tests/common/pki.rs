//! Certificates for tests, made at run time (rcgen): nothing secret is committed.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// A PEM certificate and its key, on disk.
#[derive(Debug, Clone)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate authority that signs server and client certificates into a directory.
pub struct Ca {
    pub cert: PathBuf,
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let cert = dir.join(format!("{name}.ca.pem"));
        std::fs::write(&cert, issuer.pem()).unwrap();
        Ca {
            cert,
            issuer,
            dir: dir.to_path_buf(),
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self, name: &str) -> Pair {
        let params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        self.sign(name, params)
    }

    /// A client certificate with subject `CN=<cn>,O=Clinic` and `<cn>.clinic.test` as a name.
    pub fn client(&self, cn: &str) -> Pair {
        let mut params = CertificateParams::new(vec![format!("{cn}.clinic.test")]).unwrap();
        // Most general first, as certificates are usually encoded: RFC 2253 prints it reversed.
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Clinic");
        params.distinguished_name.push(DnType::CommonName, cn);
        self.sign(cn, params)
    }

    /// A server certificate that expired yesterday.
    pub fn expired_server(&self, name: &str) -> Pair {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(30);
        params.not_after = now - time::Duration::days(1);
        self.sign(name, params)
    }

    fn sign(&self, name: &str, params: CertificateParams) -> Pair {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let pair = Pair {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}.key")),
        };
        std::fs::write(&pair.cert, cert.pem()).unwrap();
        std::fs::write(&pair.key, key.serialize_pem()).unwrap();
        pair
    }
}
