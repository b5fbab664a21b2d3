//! Node certificates renewed over the tunnel ([`Message::Renew`]). Who the node is, and which TLS
//! key to certify, come from the certificate the tunnel authenticated with, never from the
//! request; a removed node gets nothing.

use burrow_tunnel::Session;
use tunnel_proto::wire::Message;

use super::TunnelServer;
use crate::auth::AuthError;

impl TunnelServer {
    /// The answer to a node's renewal request on `session`.
    pub(super) async fn renewal(
        &self,
        session: &Session,
        host_id: &str,
        node_name: &str,
        ssh_public_key: &str,
    ) -> Message {
        let refuse = |why: String| Message::Renewed {
            certificates: None,
            error: Some(why),
        };
        if self.is_revoked(host_id) {
            return refuse("this node was removed from the cluster".into());
        }
        let Some(spki) = tunnel_key(session) else {
            return refuse("the tunnel's certificate has no key the proxy can read".into());
        };
        match self
            .auth
            .renew_node(&spki, ssh_public_key, host_id, node_name)
            .await
        {
            Ok(certificates) => Message::Renewed {
                certificates: Some(certificates),
                error: None,
            },
            Err(AuthError::BadRequest(why)) => refuse(why),
            Err(e) => {
                tracing::warn!(%host_id, error = %e, "cannot renew a node's certificates");
                refuse("the proxy cannot sign certificates now; try again later".into())
            }
        }
    }
}

/// The public key (SubjectPublicKeyInfo, DER) of the tunnel's client certificate.
fn tunnel_key(session: &Session) -> Option<Vec<u8>> {
    let leaf = session.peer_certificates().first()?.clone();
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).ok()?;
    Some(cert.public_key().raw.to_vec())
}
