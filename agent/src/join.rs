//! Joining a cluster through the proxy's web port.
//!
//! 1. `GET /v1/webapi/find` without verifying the web certificate: its answer carries the host
//!    CA certificates, which are then checked against the CA pins (constant time).
//! 2. `POST /v1/webapi/host/join` over TLS verified against the pinned CA only, so the token
//!    goes to the cluster the user pinned and nobody else.

use burrow_net::tls::{self, ALPN_HTTP1};
use burrow_net::web::{WebClient, WebError};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use russh::keys::ssh_key::{Algorithm, Certificate, LineEnding, PrivateKey};
use tunnel_proto::api::{self, FindResponse, JoinRequest, JoinResponse, Role};
use tunnel_proto::pin::CaPin;
use tunnel_proto::secret::Secret;

use crate::identity::Identity;

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("{0}")]
    Web(#[from] WebError),
    #[error("the proxy refused the join: {0}")]
    Refused(String),
    #[error(
        "CA pin mismatch: the proxy at {addr} presented a host CA with pin {got}, but --ca-pin is {expected}; this is not the cluster you pinned"
    )]
    PinMismatch {
        addr: String,
        got: String,
        expected: String,
    },
    #[error("the proxy at {addr} sent an unusable answer: {reason}")]
    BadAnswer { addr: String, reason: String },
    #[error("cannot create the node's keys: {0}")]
    Keys(String),
}

pub struct JoinParams<'a> {
    pub proxy: &'a str,
    pub token: Secret,
    pub node_name: &'a str,
    pub ca_pins: &'a [CaPin],
    pub insecure: bool,
    /// Accept a web certificate from public PKI besides the cluster's CA (asked for explicitly).
    pub public_roots: bool,
}

pub async fn join(p: JoinParams<'_>) -> Result<Identity, JoinError> {
    let bad = |reason: String| JoinError::BadAnswer {
        addr: p.proxy.to_string(),
        reason,
    };
    let finder = WebClient::new(
        p.proxy,
        tls::unverified_client_config(&[ALPN_HTTP1]).map_err(|e| bad(e.to_string()))?,
    )?;
    let found: FindResponse = finder.get(api::FIND_PATH).await?;
    let trusted = trusted_cas(&found, p.ca_pins, p.proxy)?;
    if p.ca_pins.is_empty() {
        tracing::warn!(
            proxy = p.proxy,
            "no --ca-pin given: the agent cannot verify the identity of the cluster it joins and trusts \
             whichever CA the proxy at this address presents. Pass --ca-pin (see `burrowctl status`)."
        );
    }

    let ssh_key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
        .map_err(|e| JoinError::Keys(e.to_string()))?;
    let tls_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| JoinError::Keys(e.to_string()))?;
    let csr = CertificateParams::default()
        .serialize_request(&tls_key)
        .and_then(|c| c.pem())
        .map_err(|e| JoinError::Keys(e.to_string()))?;
    let request = JoinRequest {
        token: p.token,
        node_name: p.node_name.to_string(),
        role: Role::Node,
        ssh_public_key: ssh_key
            .public_key()
            .to_openssh()
            .map_err(|e| JoinError::Keys(e.to_string()))?,
        tls_csr: csr,
    };

    let config = if p.insecure {
        tls::unverified_client_config(&[ALPN_HTTP1])
    } else {
        tls::cluster_client_config(&trusted, None, p.public_roots, &[ALPN_HTTP1])
    }
    .map_err(|e| bad(e.to_string()))?;
    let joiner = WebClient::new(p.proxy, config)?;
    let answer: JoinResponse =
        joiner
            .post(api::JOIN_PATH, &request)
            .await
            .map_err(|e| match e {
                WebError::Api { status, error } if (400..500).contains(&status) => {
                    JoinError::Refused(error.message)
                }
                other => JoinError::Web(other),
            })?;

    let cert = Certificate::from_openssh(&answer.ssh_cert)
        .map_err(|e| bad(format!("SSH certificate: {e}")))?;
    if cert.public_key() != ssh_key.public_key().key_data() {
        return Err(bad("the SSH certificate is not for this node's key".into()));
    }
    let identity = Identity {
        format: Identity::FORMAT,
        host_id: answer.host_id,
        node_name: p.node_name.to_string(),
        cluster_name: answer.cluster_name,
        ssh_key: Secret::new(
            ssh_key
                .to_openssh(LineEnding::LF)
                .map_err(|e| JoinError::Keys(e.to_string()))?
                .to_string(),
        ),
        ssh_cert: answer.ssh_cert,
        tls_key: Secret::new(tls_key.serialize_pem()),
        tls_cert: answer.tls_cert,
        host_ca_certs: answer.host_ca_certs,
        host_ca_ssh: answer.host_ca_ssh,
        user_ca_ssh: answer.user_ca_ssh,
        labels: answer.labels,
        joined: burrow_daemon::unix_now(),
    };
    identity.check().map_err(bad)?;
    Ok(identity)
}

/// The host CA certificates from `find` that the agent may trust: those matching a pin, or all
/// of them when no pin was given.
fn trusted_cas(
    found: &FindResponse,
    pins: &[CaPin],
    addr: &str,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, JoinError> {
    let bad = |reason: String| JoinError::BadAnswer {
        addr: addr.to_string(),
        reason,
    };
    let mut all = Vec::new();
    for pem in &found.host_ca_certs {
        all.extend(tls::parse_certs(pem, "host CA certificate").map_err(|e| bad(e.to_string()))?);
    }
    if all.is_empty() {
        return Err(bad("no host CA certificate".into()));
    }
    if pins.is_empty() {
        return Ok(all);
    }
    let mut trusted = Vec::new();
    let mut seen = Vec::new();
    for cert in all {
        let pin = CaPin::of_certificate(&cert).map_err(|e| bad(e.to_string()))?;
        // Every pin is compared, so the time taken does not depend on which one matched.
        let matched = pins.iter().fold(false, |acc, p| acc | p.matches(&pin));
        if matched {
            trusted.push(cert);
        } else {
            seen.push(pin.to_string());
        }
    }
    if trusted.is_empty() {
        return Err(JoinError::PinMismatch {
            addr: addr.to_string(),
            got: seen.join(", "),
            expected: pins
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    Ok(trusted)
}

/// Asks the proxy (verified against the cluster's CA) where tunnels go. `None` when it names no
/// dedicated address or cannot be reached: tunnels then use the proxy address itself. Called once
/// per start; the pool never calls `find` between dials.
pub async fn find_tunnel_addr(
    proxy: &str,
    cas: &[rustls::pki_types::CertificateDer<'static>],
    public_roots: bool,
) -> Option<String> {
    let config = tls::cluster_client_config(cas, None, public_roots, &[ALPN_HTTP1]).ok()?;
    let client = WebClient::new(proxy, config).ok()?;
    match client.get::<FindResponse>(api::FIND_PATH).await {
        Ok(found) => found
            .tunnel_addrs
            .into_iter()
            .find(|a| a.transport == "tcp")
            .map(|a| a.addr),
        Err(e) => {
            tracing::debug!(error = %e, "find failed; opening tunnels to the proxy address");
            None
        }
    }
}
