//! Node certificates renewed over the tunnel ([`Message::Renew`]). Who the node is, and which TLS
//! key to certify, come from the certificate the tunnel authenticated with, never from the
//! request; a removed node gets nothing. And what a node trusts ([`Message::Trust`]): sent after
//! the welcome and whenever a CA rotation moves, with `renew_now` when the tunnel's certificate
//! is not from the CA that signs.

use std::sync::Arc;

use burrow_tunnel::Session;
use tokio::sync::watch;
use tunnel_proto::wire::Message;

use super::TunnelServer;
use crate::auth::AuthError;
use crate::auth::ca::Authorities;

/// A tunnel's view of the cluster's authorities.
pub type TrustWatch = watch::Receiver<Arc<Authorities>>;

/// Resolves when the authorities changed (true), or never for an agent that takes no trust
/// updates; false once the proxy drops its side (shutting down).
pub(super) async fn trust_changed(trust: &mut Option<TrustWatch>) -> bool {
    match trust {
        Some(rx) => match rx.changed().await {
            Ok(()) => true,
            Err(_) => {
                *trust = None;
                false
            }
        },
        None => std::future::pending().await,
    }
}

impl TunnelServer {
    /// What the node on `session` should trust now.
    pub(super) fn trust_message(&self, session: &Session) -> Message {
        let authorities = self.auth.authorities();
        let renew_now = session
            .peer_certificates()
            .first()
            .is_some_and(|leaf| !authorities.signed_this(leaf));
        Message::Trust(authorities.trust(renew_now))
    }

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
