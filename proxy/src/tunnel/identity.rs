//! Who a tunnel's node is: read from the client certificate the cluster signed at join (CN =
//! host id, the other SAN = node name), never from anything the node says.

use burrow_tunnel::Session;

use super::control::TunnelError;
use crate::auth::ca::CertRole;

/// Who a tunnel's client certificate says the node is.
pub struct NodeIdentity {
    pub host_id: String,
    pub node_name: String,
}

/// The host id (CN) and node name (the SAN beside the host id) a node certificate names; only
/// node certificates open tunnels.
pub fn node_identity(session: &Session) -> Result<NodeIdentity, TunnelError> {
    let leaf = session
        .peer_certificates()
        .first()
        .ok_or(TunnelError::Identity("no client certificate"))?;
    if CertRole::of_certificate(leaf) != Some(CertRole::Node) {
        return Err(TunnelError::Identity(
            "the client certificate is not a node's",
        ));
    }
    // Checked by the handshake's verifier already, but not again when a session ticket resumes
    // the session: a node certificate that expired since is refused here.
    if !burrow_net::tls::is_current(leaf, burrow_daemon::unix_now()) {
        return Err(TunnelError::Identity(
            "the node certificate has expired; the node must join again",
        ));
    }
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| TunnelError::BadCertificate(e.to_string()))?;
    let host_id = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
        .ok_or(TunnelError::Identity(
            "the client certificate names no host",
        ))?;
    let node_name = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) if *d != host_id => {
                    Some(d.to_string())
                }
                _ => None,
            })
        })
        .unwrap_or_else(|| host_id.clone());
    Ok(NodeIdentity { host_id, node_name })
}
