//! The cluster's auth logic: bootstrap of the authorities, join tokens, and node joins.

pub mod ca;
pub mod tokens;

use std::sync::Arc;

use russh::keys::ssh_key::{Algorithm, PublicKey};
use serde::{Deserialize, Serialize};
use tunnel_proto::api::{JoinRequest, JoinResponse, Labels, Role};

use tunnel_proto::unix_now;

use self::ca::{Authorities, StoredAuthorities, new_host_id};
use self::tokens::{StaticToken, TokenError, TokenStore};
use crate::backend::{Backend, BackendError};

const AUTHORITIES_KEY: &str = "/cluster/authorities";
const NODES_PREFIX: &str = "/nodes/";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "the data dir holds cluster {stored:?}, not {requested:?}: drop --cluster-name or use another data dir"
    )]
    ClusterNameMismatch { stored: String, requested: String },
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Ca(#[from] ca::CaError),
}

/// What the cluster remembers about a joined node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRecord {
    pub host_id: String,
    pub node_name: String,
    pub labels: Labels,
    pub token_id: String,
    pub joined: u64,
}

pub struct Auth {
    backend: Arc<dyn Backend>,
    pub authorities: Authorities,
    pub tokens: TokenStore,
}

impl Auth {
    /// Loads the cluster from the backend, creating it if the backend is empty. Proxies that
    /// start together on one backend agree through compare-and-swap: one creates, the others
    /// load what it wrote.
    pub async fn bootstrap(
        backend: Arc<dyn Backend>,
        requested_name: Option<&str>,
        static_tokens: Vec<StaticToken>,
    ) -> Result<Self, AuthError> {
        let stored = match backend.get(AUTHORITIES_KEY).await? {
            Some(raw) => parse_stored(&raw)?,
            None => {
                let name = requested_name.map_or_else(default_cluster_name, str::to_string);
                let fresh = StoredAuthorities::generate(&name)?;
                let json = serde_json::to_vec(&fresh).expect("authorities serialize");
                if backend
                    .compare_and_swap(AUTHORITIES_KEY, None, json, None)
                    .await?
                {
                    tracing::info!(cluster = %name, "created a new cluster with fresh host and user CAs");
                    fresh
                } else {
                    let raw = backend.get(AUTHORITIES_KEY).await?.ok_or_else(|| {
                        BackendError::Storage(
                            "cluster authorities vanished during bootstrap".into(),
                        )
                    })?;
                    parse_stored(&raw)?
                }
            }
        };
        if let Some(requested) = requested_name
            && requested != stored.cluster_name
        {
            return Err(AuthError::ClusterNameMismatch {
                stored: stored.cluster_name,
                requested: requested.to_string(),
            });
        }
        let authorities = Authorities::load(&stored)?;
        Ok(Self {
            tokens: TokenStore::new(backend.clone(), static_tokens),
            backend,
            authorities,
        })
    }

    /// Handles `POST /v1/webapi/host/join`.
    pub async fn join(&self, req: JoinRequest) -> Result<JoinResponse, AuthError> {
        validate_node_name(&req.node_name)?;
        let ssh_key = PublicKey::from_openssh(req.ssh_public_key.trim()).map_err(|_| {
            AuthError::BadRequest("ssh_public_key is not an OpenSSH public key".into())
        })?;
        if !matches!(
            ssh_key.algorithm(),
            Algorithm::Ed25519 | Algorithm::Ecdsa { .. }
        ) {
            return Err(AuthError::BadRequest(format!(
                "ssh_public_key of type {} is not accepted: use ed25519 or ECDSA",
                ssh_key.algorithm()
            )));
        }
        if req.role != Role::Node {
            return Err(TokenError::RoleNotAllowed {
                requested: req.role.as_str().into(),
                allowed: "node (proxies join a cluster by sharing its backend)".into(),
            }
            .into());
        }
        let grant = self.tokens.check(&req.token, req.role).await?;
        let host_id = new_host_id();
        let tls_cert = self
            .authorities
            .sign_node_csr(&req.tls_csr, &host_id, &req.node_name)
            .map_err(|_| {
                AuthError::BadRequest("tls_csr is not a valid, signed PKCS#10 request".into())
            })?;
        let ssh_cert = self
            .authorities
            .sign_host_ssh(&ssh_key, &host_id, &req.node_name)?
            .to_openssh()
            .map_err(ca::CaError::from)?;
        let record = NodeRecord {
            host_id: host_id.clone(),
            node_name: req.node_name.clone(),
            labels: grant.labels.clone(),
            token_id: grant.token_id.clone(),
            joined: unix_now(),
        };
        self.backend
            .put(
                &format!("{NODES_PREFIX}{host_id}"),
                serde_json::to_vec(&record).expect("node records serialize"),
                None,
            )
            .await?;
        tracing::info!(%host_id, node = %req.node_name, token = %grant.token_id, "node joined");
        Ok(JoinResponse {
            host_id,
            cluster_name: self.authorities.cluster_name.clone(),
            ssh_cert,
            tls_cert,
            host_ca_certs: vec![self.authorities.host_tls_cert_pem.clone()],
            host_ca_ssh: vec![self.authorities.host_ssh_public()?],
            user_ca_ssh: vec![self.authorities.user_ssh_public()?],
            labels: grant.labels,
        })
    }
}

fn parse_stored(raw: &[u8]) -> Result<StoredAuthorities, AuthError> {
    serde_json::from_slice(raw)
        .map_err(|e| ca::CaError::Corrupt(format!("cluster authorities: {e}")).into())
}

/// Node names are what users type after `ssh login@`.
pub fn validate_node_name(name: &str) -> Result<(), AuthError> {
    tunnel_proto::api::validate_node_name(name).map_err(AuthError::BadRequest)
}

fn default_cluster_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "burrow".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::RedbBackend;

    #[tokio::test]
    async fn bootstrap_creates_once_and_then_loads() {
        let dir = tempfile::tempdir().unwrap();
        let b: Arc<dyn Backend> = Arc::new(RedbBackend::open(&dir.path().join("s")).unwrap());
        let a = Auth::bootstrap(b.clone(), Some("c1"), vec![])
            .await
            .unwrap();
        let again = Auth::bootstrap(b.clone(), None, vec![]).await.unwrap();
        assert_eq!(a.authorities.pin, again.authorities.pin);
        assert_eq!(again.authorities.cluster_name, "c1");
        let err = Auth::bootstrap(b, Some("other"), vec![])
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("holds cluster \"c1\""), "{err}");
    }

    #[test]
    fn node_names_are_checked() {
        for ok in ["pi", "edge-01.lab", "a_b"] {
            validate_node_name(ok).unwrap();
        }
        for bad in ["", "-x", "a b", "a/b", &"x".repeat(300), "é"] {
            assert!(validate_node_name(bad).is_err(), "{bad:?}");
        }
    }
}
