//! rustls configurations shared by the agent, the proxy and `burrowctl`.
//!
//! Only the ring provider is used, passed explicitly everywhere, so that no builder ever depends
//! on which crypto features happen to be enabled in the dependency graph.
//!
//! Proxies are verified against the cluster's host CA under one fixed internal name,
//! [`CLUSTER_SERVER_NAME`], whatever address (a load balancer, an IP) the client dialed; a proxy
//! whose web certificate comes from public PKI is accepted under its real name only where the
//! user asked for it. A certificate from the host CA passes for a proxy only if it is one
//! ([`CertRole::Proxy`] with the serverAuth usage): nodes hold certificates from the same CA.

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
/// Offered beside `http/1.1` by clients that trust only the cluster's CA (burrowctl, a proxy
/// fetching from another), never selected: it asks a proxy whose web port has a certificate from
/// public PKI for its cluster certificate instead.
pub const ALPN_CLUSTER_CERT: &[u8] = b"burrow-cluster-cert";

/// Who holds a certificate from the host CA, as written in its subject's organization. Only a
/// `Proxy` certificate (which also carries the serverAuth usage) is ever accepted as a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertRole {
    Admin,
    Node,
    Proxy,
}

impl CertRole {
    pub fn organization(self) -> &'static str {
        match self {
            CertRole::Admin => "burrow-admin",
            CertRole::Node => "burrow-node",
            CertRole::Proxy => "burrow-proxy",
        }
    }

    /// Reads the role of a DER certificate (whose chain the caller has already verified).
    pub fn of_certificate(der: &[u8]) -> Option<CertRole> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let mut orgs = cert.subject().iter_organization();
        let org = orgs.next()?.as_str().ok()?;
        if orgs.next().is_some() {
            return None;
        }
        [CertRole::Admin, CertRole::Node, CertRole::Proxy]
            .into_iter()
            .find(|r| r.organization() == org)
    }
}

/// When a PEM certificate's validity begins and ends (Unix seconds); `None` if it does not parse.
pub fn validity(pem: &str) -> Option<(u64, u64)> {
    let der = parse_certs(pem, "certificate").ok()?.into_iter().next()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let v = cert.validity();
    let secs = |t: x509_parser::time::ASN1Time| u64::try_from(t.timestamp()).unwrap_or(0);
    Some((secs(v.not_before), secs(v.not_after)))
}

/// Whether a DER certificate is within its validity at `now` (Unix seconds); `false` if it does
/// not parse. A resumed TLS session carries the certificate its first handshake checked, then:
/// whoever relies on one checks it is still current.
pub fn is_current(der: &[u8], now: u64) -> bool {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    let v = cert.validity();
    let secs = |t: x509_parser::time::ASN1Time| u64::try_from(t.timestamp()).unwrap_or(0);
    (secs(v.not_before)..secs(v.not_after)).contains(&now)
}

/// Whether a certificate (chain already verified) is a proxy's: role proxy and the serverAuth
/// usage, so that no node or admin certificate from the same CA can pass for the proxy.
fn is_proxy_certificate(der: &[u8]) -> bool {
    let server_auth = x509_parser::parse_x509_certificate(der)
        .ok()
        .and_then(|(_, c)| {
            c.extended_key_usage()
                .ok()
                .flatten()
                .map(|e| e.value.server_auth)
        })
        .unwrap_or(false);
    server_auth && CertRole::of_certificate(der) == Some(CertRole::Proxy)
}

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

/// The ring crypto provider, its TLS 1.3 suites in the order this CPU runs fastest
/// ([`suite_order`]). A server follows its client's order, so an agent picks its tunnels' suite.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    suite_order(&mut provider.cipher_suites, aes_instructions());
    Arc::new(provider)
}

/// ring's suites come AES-256-GCM first. Where the CPU has AES instructions, AES-128-GCM with
/// SHA-256 goes first (fewer rounds, and a key schedule on SHA-256, which such CPUs also
/// accelerate, rather than SHA-384); where it has none (a Raspberry Pi before the 5, most 32-bit
/// ARM), ChaCha20-Poly1305, several times faster in software. Only the order changes.
fn suite_order(suites: &mut [rustls::SupportedCipherSuite], aes: bool) {
    use rustls::CipherSuite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let rank = |suite: &rustls::SupportedCipherSuite| match (suite.suite(), aes) {
        (TLS13_AES_128_GCM_SHA256, true) | (TLS13_CHACHA20_POLY1305_SHA256, false) => 0,
        (TLS13_AES_256_GCM_SHA384, true) | (TLS13_AES_128_GCM_SHA256, false) => 1,
        (TLS13_CHACHA20_POLY1305_SHA256, true) | (TLS13_AES_256_GCM_SHA384, false) => 2,
        _ => 3,
    };
    suites.sort_by_key(rank);
}

/// Whether this CPU has instructions for AES-GCM (AES and carry-less multiplication).
pub fn aes_instructions() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
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
        let cluster_result = self
            .cluster
            .verify_server_cert(end_entity, intermediates, &internal, ocsp_response, now)
            .and_then(|verified| {
                if is_proxy_certificate(end_entity) {
                    Ok(verified)
                } else {
                    Err(rustls::Error::InvalidCertificate(
                        rustls::CertificateError::ApplicationVerificationFailure,
                    ))
                }
            });
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

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };

    use super::*;

    #[test]
    fn tls13_suites_come_in_the_order_the_cpu_runs_fastest() {
        use rustls::CipherSuite::*;
        let order = |aes| {
            let mut suites = rustls::crypto::ring::default_provider().cipher_suites;
            let all = suites.len();
            suite_order(&mut suites, aes);
            assert_eq!(suites.len(), all, "only the order changes");
            suites.iter().map(|s| s.suite()).take(3).collect::<Vec<_>>()
        };
        assert_eq!(
            order(true),
            [
                TLS13_AES_128_GCM_SHA256,
                TLS13_AES_256_GCM_SHA384,
                TLS13_CHACHA20_POLY1305_SHA256
            ]
        );
        assert_eq!(
            order(false),
            [
                TLS13_CHACHA20_POLY1305_SHA256,
                TLS13_AES_128_GCM_SHA256,
                TLS13_AES_256_GCM_SHA384
            ]
        );
        // The shared provider uses the order for this CPU.
        let first = provider().cipher_suites[0].suite();
        assert!(
            [TLS13_AES_128_GCM_SHA256, TLS13_CHACHA20_POLY1305_SHA256].contains(&first),
            "{first:?}"
        );
    }

    fn leaf(
        issuer: &Issuer<'_, KeyPair>,
        org: &str,
        usages: &[ExtendedKeyUsagePurpose],
    ) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec![CLUSTER_SERVER_NAME.to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, "x");
        p.distinguished_name.push(DnType::OrganizationName, org);
        p.extended_key_usages = usages.to_vec();
        p.signed_by(&key, issuer).unwrap().der().clone()
    }

    #[test]
    fn only_a_proxy_certificate_passes_for_the_proxy() {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(vec![]).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let ca_der = ca_cert.der().clone();
        let issuer = Issuer::new(ca, ca_key);
        let mut roots = RootCertStore::empty();
        roots.add(ca_der).unwrap();
        let verifier = ClusterVerifier {
            cluster: WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .unwrap(),
            public: None,
        };
        let check = |cert: &CertificateDer<'_>| {
            verifier
                .verify_server_cert(
                    cert,
                    &[],
                    &ServerName::try_from("lb.example").unwrap(),
                    &[],
                    UnixTime::now(),
                )
                .is_ok()
        };
        use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
        assert!(check(&leaf(&issuer, "burrow-proxy", &[ServerAuth])));
        // A node certificate as the cluster used to issue them: both usages, role node.
        assert!(!check(&leaf(
            &issuer,
            "burrow-node",
            &[ClientAuth, ServerAuth]
        )));
        assert!(!check(&leaf(&issuer, "burrow-node", &[ClientAuth])));
        assert!(!check(&leaf(&issuer, "burrow-admin", &[ServerAuth])));
        // The proxy role without the server usage, or with no usage extension at all.
        assert!(!check(&leaf(&issuer, "burrow-proxy", &[ClientAuth])));
        assert!(!check(&leaf(&issuer, "burrow-proxy", &[])));
    }
}
