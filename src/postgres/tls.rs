//! TLS for every connection to PostgreSQL, on one stack: rustls, which the replication
//! client (pgwire-replication) already uses, so the SQL connections (through
//! tokio-postgres-rustls) and the replication stream verify certificates with the same
//! library, the same root certificates and the same rules (docs/adr/0007).
//!
//! One job: turn [`TlsSettings`] into what each client needs, and turn a failed
//! handshake into a reason a person can act on (unknown CA, name mismatch, expired).
//! Files are read at every connection attempt, so rotated certificates are picked up.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::target::{RootCert, Server, SslMode, TlsSettings, Verification};

/// A TLS setting cannot be used (a file is missing or unreadable, a key is encrypted).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(pub String);

/// Where the operating system keeps its trusted certificates, in the order OpenSSL's
/// own builds look (Debian/Ubuntu, RHEL/Fedora, SUSE, Alpine/macOS).
const SYSTEM_BUNDLES: [&str; 5] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
];

/// The PEM file of root certificates for `root`: the file given, or the operating
/// system's bundle (`SSL_CERT_FILE` first, as OpenSSL honours it).
pub fn root_file(root: &RootCert) -> Result<PathBuf, TlsError> {
    match root {
        RootCert::File(path) => {
            if path.exists() {
                Ok(path.clone())
            } else {
                Err(TlsError(format!(
                    "root certificate file {} does not exist: give sslrootcert=<file> (or sslrootcert=system for the operating system's trust store), or use an sslmode that does not verify",
                    path.display()
                )))
            }
        }
        RootCert::System => std::env::var_os("SSL_CERT_FILE")
            .map(PathBuf::from)
            .into_iter()
            .chain(SYSTEM_BUNDLES.iter().map(PathBuf::from))
            .find(|path| path.exists())
            .ok_or_else(|| {
                TlsError(format!(
                    "sslrootcert=system: no trust store found (SSL_CERT_FILE, {}); install ca-certificates or give sslrootcert=<file>",
                    SYSTEM_BUNDLES.join(", ")
                ))
            }),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls configuration for the SQL connections (tokio-postgres).
pub fn client_config(settings: &TlsSettings) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?;
    let verifier: Arc<dyn ServerCertVerifier> = match settings.verification() {
        Verification::None => Arc::new(RelaxedVerifier {
            provider: Arc::clone(&provider),
            chain: None,
        }),
        verification => {
            let root = settings
                .root_cert
                .as_ref()
                .ok_or_else(|| TlsError("verifying the server's certificate needs sslrootcert".into()))?;
            let roots = Arc::new(load_roots(&root_file(root)?)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
                .build()
                .map_err(|e| TlsError(format!("cannot build the certificate verifier: {e}")))?;
            match verification {
                Verification::Chain => Arc::new(RelaxedVerifier {
                    provider: Arc::clone(&provider),
                    chain: Some(webpki),
                }),
                _ => webpki,
            }
        }
    };
    let builder = builder.dangerous().with_custom_certificate_verifier(verifier);
    match &settings.client_cert {
        Some(client) => {
            let chain = load_chain(&client.cert)?;
            let key = load_key(&client.key)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError(format!("client certificate {}: {e}", client.cert.display())))
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

/// The replication client's TLS settings for `server`, equivalent to [`client_config`].
/// `mode` is the mode of this attempt (`allow` makes a plain attempt first).
pub fn replication_tls(
    settings: &TlsSettings,
    mode: SslMode,
    server: &Server,
) -> Result<pgwire_replication::TlsConfig, TlsError> {
    use pgwire_replication::{SslMode as Mode, TlsConfig};
    if server.is_unix() {
        // libpq never uses TLS on a Unix socket.
        return Ok(TlsConfig::disabled());
    }
    let mut config = match (mode, settings.verification()) {
        (SslMode::Disable | SslMode::Allow, _) => return Ok(TlsConfig::disabled()),
        (SslMode::Prefer, _) => TlsConfig {
            mode: Mode::Prefer,
            ..TlsConfig::default()
        },
        (_, Verification::None) => TlsConfig::require(),
        (_, verification) => {
            let root = settings
                .root_cert
                .as_ref()
                .ok_or_else(|| TlsError("verifying the server's certificate needs sslrootcert".into()))?;
            let path = Some(root_file(root)?);
            if verification == Verification::Full {
                // The host as the name to verify, also an IP address (pgwire-replication
                // otherwise refuses IP addresses for verify-full; rustls checks IP SANs).
                TlsConfig::verify_full(path).with_sni_hostname(server.host_name())
            } else {
                TlsConfig::verify_ca(path)
            }
        }
    };
    if let Some(client) = &settings.client_cert {
        // Read here too, so that an encrypted or broken key fails with our message.
        load_key(&client.key)?;
        config = config.with_client_cert(client.cert.clone(), client.key.clone());
    }
    Ok(config)
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let certificates = load_chain(path)?;
    let (added, _) = roots.add_parsable_certificates(certificates);
    if added == 0 {
        return Err(TlsError(format!("no usable CA certificate in {}", path.display())));
    }
    Ok(roots)
}

fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError(format!("cannot read certificate file {}: {e}", path.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError(format!("certificate file {} is not PEM: {e}", path.display())))?;
    if certificates.is_empty() {
        return Err(TlsError(format!("no certificate in {}", path.display())));
    }
    Ok(certificates)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| TlsError(format!("cannot read client key {}: {e}", path.display())))?;
    if text.contains("ENCRYPTED") {
        return Err(TlsError(format!(
            "client key {} is encrypted, which is not supported: decrypt it (openssl pkey -in {} -out client.plain.key) and keep the plain key readable only by the relay",
            path.display(),
            path.display()
        )));
    }
    PrivateKeyDer::from_pem_slice(text.as_bytes())
        .map_err(|e| TlsError(format!("client key {} is not a PEM private key: {e}", path.display())))
}

type Certificate<'a> = CertificateDer<'a>;
type Signed = DigitallySignedStruct;
type SignatureCheck = Result<HandshakeSignatureValid, rustls::Error>;

/// The weaker checks libpq makes, on rustls: `require`/`prefer` encrypt without
/// authenticating the server (`chain: None`); `verify-ca` needs a chain to a trusted root
/// and does not check the name. Handshake signatures are checked in both.
#[derive(Debug)]
struct RelaxedVerifier {
    provider: Arc<CryptoProvider>,
    chain: Option<Arc<WebPkiServerVerifier>>,
}

impl ServerCertVerifier for RelaxedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &Certificate<'_>, dss: &Signed) -> SignatureCheck {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &Certificate<'_>, dss: &Signed) -> SignatureCheck {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A certificate failure in a client's error text, said plainly; `None` if the text is
/// not about the server's certificate. Both clients report rustls's own wording, so one
/// reading serves both.
pub fn explain_certificate_failure(text: &str) -> Option<String> {
    if !text.contains("invalid peer certificate") {
        return None;
    }
    let reason = if text.contains("UnknownIssuer") {
        "unknown CA: the server's certificate is not signed by a certificate in sslrootcert"
    } else if text.contains("NotValidForName") || text.contains("not valid for name") {
        "name mismatch: the server's certificate does not name the host connected to (use the name in the certificate as host, or sslmode=verify-ca)"
    } else if text.contains("Expired") || text.contains("expired") {
        "expired: the server's certificate is past its validity period"
    } else if text.contains("NotValidYet") || text.contains("not valid yet") {
        "not yet valid: the server's certificate starts in the future (check the clocks)"
    } else if text.contains("Revoked") {
        "revoked: the server's certificate has been revoked"
    } else {
        "the server's certificate was rejected"
    };
    Some(format!(
        "the server's certificate does not verify: {reason} ({})",
        text.trim()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_failures_name_their_reason() {
        let cases = [
            ("TLS handshake failed: invalid peer certificate: UnknownIssuer", "unknown CA"),
            (
                "error performing TLS handshake: invalid peer certificate: certificate not valid for name \"x\"; certificate is only valid for DnsName(\"localhost\")",
                "name mismatch",
            ),
            ("invalid peer certificate: certificate expired: verification time 1 (UNIX), but certificate is not valid after 0 (1 seconds ago)", "expired"),
        ];
        for (text, reason) in cases {
            let explained = explain_certificate_failure(text).unwrap_or_default();
            assert!(explained.contains(reason), "{text} -> {explained}");
        }
        assert_eq!(explain_certificate_failure("connection refused"), None);
    }

    #[test]
    fn missing_files_and_encrypted_keys_are_explained() {
        let missing = root_file(&RootCert::File("/nonexistent/ca.pem".into()))
            .err()
            .unwrap_or_else(|| TlsError(String::new()));
        assert!(
            missing.to_string().contains("/nonexistent/ca.pem does not exist"),
            "{missing}"
        );
        let dir = std::env::temp_dir().join(format!("outbox-relay-tls-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let key = dir.join("key.pem");
        let _ = std::fs::write(
            &key,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        );
        let error = load_key(&key).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains("is encrypted"), "{error}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
