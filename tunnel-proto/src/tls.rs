//! rustls configurations shared by the agent, the proxy and `burrowctl`.
//!
//! Only the ring provider is used, passed explicitly everywhere, so that no builder ever depends
//! on which crypto features happen to be enabled in the dependency graph.
//!
//! Proxies are verified against the cluster's host CA under one fixed internal name,
//! [`CLUSTER_SERVER_NAME`], whatever address (a load balancer, an IP) the client dialed; a proxy
//! whose web certificate comes from public PKI is accepted under its real name as a fallback.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// The DNS name every proxy certificate issued by the cluster's host CA carries.
pub const CLUSTER_SERVER_NAME: &str = "burrow.cluster.local";

/// ALPN for the web API.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no PEM certificate found in {0}")]
    NoCertificate(String),
    #[error("cannot parse PEM in {what}: {source}")]
    Pem {
        what: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("cannot build certificate verifier: {0}")]
    Verifier(String),
}

/// The ring crypto provider.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses every certificate in a PEM string; `what` names the source in errors.
pub fn parse_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what: what.to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(what.to_string()));
    }
    Ok(certs)
}

/// Parses the first private key in a PEM string.
pub fn parse_key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|source| TlsError::Pem {
        what: what.to_string(),
        source,
    })
}

/// A client identity: certificate chain and key.
pub struct ClientIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// Client config that trusts proxies whose certificate chains to one of `cluster_cas` (under
/// [`CLUSTER_SERVER_NAME`]), or, when `public_roots` is set, to the system's public roots under
/// the dialed name.
pub fn cluster_client_config(
    cluster_cas: &[CertificateDer<'static>],
    identity: Option<ClientIdentity>,
    public_roots: bool,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    for ca in cluster_cas {
        roots.add(ca.clone())?;
    }
    let cluster = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let public = if public_roots {
        let loaded = rustls_native_certs::load_native_certs();
        let mut store = RootCertStore::empty();
        let (added, _) = store.add_parsable_certificates(loaded.certs);
        if added > 0 {
            Some(
                WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
                    .build()
                    .map_err(|e| TlsError::Verifier(e.to_string()))?,
            )
        } else {
            None
        }
    } else {
        None
    };
    let verifier = Arc::new(ClusterVerifier { cluster, public });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(id.chain, id.key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Client config that accepts any server certificate (handshake signatures are still checked).
/// Used only for `find`, whose answer is then checked against the CA pin, for `--insecure`, and
/// by tests that play a misbehaving peer.
pub fn unverified_client_config(alpn: &[&[u8]]) -> Result<ClientConfig, TlsError> {
    unverified_client_config_with(None, alpn)
}

/// [`unverified_client_config`] presenting a client certificate.
pub fn unverified_client_config_with(
    identity: Option<ClientIdentity>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let algorithms = provider.signature_verification_algorithms;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCert { algorithms }));
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(id.chain, id.key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

#[derive(Debug)]
struct ClusterVerifier {
    cluster: Arc<WebPkiServerVerifier>,
    public: Option<Arc<WebPkiServerVerifier>>,
}

impl ServerCertVerifier for ClusterVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let internal = ServerName::try_from(CLUSTER_SERVER_NAME).expect("valid DNS name");
        let cluster_result = self.cluster.verify_server_cert(
            end_entity,
            intermediates,
            &internal,
            ocsp_response,
            now,
        );
        match (&cluster_result, &self.public) {
            (Ok(_), _) | (Err(_), None) => cluster_result,
            (Err(_), Some(public)) => public
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                .or(cluster_result),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.cluster.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.cluster.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.cluster.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct AnyServerCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
