//! The cluster's auth logic: bootstrap of the authorities, join tokens, and node joins.

pub mod ca;
pub mod rotation;
pub mod tokens;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use russh::keys::ssh_key::{Algorithm, PublicKey};
use tunnel_proto::api::{JoinRequest, JoinResponse, Role};
use tunnel_proto::wire::NodeCertificates;

use burrow_daemon::unix_now;

use self::ca::{Authorities, StoredAuthorities, new_host_id};
use self::tokens::{StaticToken, TokenError, TokenStore};
use crate::backend::{Backend, BackendError};
use crate::inventory;
use crate::state::{self, NodeRecord};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "the data dir holds cluster {stored:?}, not {requested:?}: drop --cluster-name or use another data dir"
    )]
    ClusterNameMismatch { stored: String, requested: String },
    #[error("{0}")]
    BadRequest(String),
    #[error(
        "node name {name:?} is taken by node {holder}: choose another --nodename, or remove that node first (burrowctl nodes rm {holder})"
    )]
    NameTaken { name: String, holder: String },
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    #[error(transparent)]
    Rotate(#[from] rotation::RotateError),
}

/// The authorities as loaded, with the record they were loaded from.
struct Loaded {
    raw: Vec<u8>,
    authorities: Arc<Authorities>,
}

pub struct Auth {
    backend: Arc<dyn Backend>,
    loaded: RwLock<Loaded>,
    /// Every change of the authorities (a rotation's phase), for the tunnels and the proxy's own
    /// certificates.
    changes: watch::Sender<Arc<Authorities>>,
    node_validity: Duration,
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
        let (raw, stored) = match backend.get(state::AUTHORITIES).await? {
            Some(raw) => {
                let stored = parse_stored(&raw)?;
                (raw, stored)
            }
            None => {
                let name = requested_name.map_or_else(default_cluster_name, str::to_string);
                let fresh = StoredAuthorities::generate(&name)?;
                let json = serde_json::to_vec(&fresh).expect("authorities serialize");
                if backend
                    .compare_and_swap(state::AUTHORITIES, None, json.clone(), None)
                    .await?
                {
                    tracing::info!(cluster = %name, "created a new cluster with fresh host and user CAs");
                    (json, fresh)
                } else {
                    let raw = backend.get(state::AUTHORITIES).await?.ok_or_else(|| {
                        BackendError::Storage(
                            "cluster authorities vanished during bootstrap".into(),
                        )
                    })?;
                    let stored = parse_stored(&raw)?;
                    (raw, stored)
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
        let authorities = Arc::new(Authorities::load(&stored)?);
        Ok(Self {
            tokens: TokenStore::new(backend.clone(), static_tokens),
            backend,
            changes: watch::Sender::new(authorities.clone()),
            loaded: RwLock::new(Loaded { raw, authorities }),
            node_validity: ca::DEFAULT_NODE_VALIDITY,
        })
    }

    /// The authorities as they are now.
    pub fn authorities(&self) -> Arc<Authorities> {
        self.loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .authorities
            .clone()
    }

    /// Told of every change of the authorities.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Authorities>> {
        self.changes.subscribe()
    }

    /// How long the node (and proxy) certificates signed from now on live.
    pub fn set_node_validity(&mut self, validity: Duration) -> Result<(), AuthError> {
        self.node_validity = validity;
        let loaded = self.loaded.get_mut().unwrap_or_else(|p| p.into_inner());
        let mut authorities = Authorities::load(&parse_stored(&loaded.raw)?)?;
        authorities.set_node_validity(validity);
        loaded.authorities = Arc::new(authorities);
        self.changes.send_replace(loaded.authorities.clone());
        Ok(())
    }

    /// Reads the authorities record again and takes it if it changed (another proxy moved a
    /// rotation on). Returns whether it changed.
    pub async fn reload(&self) -> Result<bool, AuthError> {
        let Some(raw) = self.backend.get(state::AUTHORITIES).await? else {
            return Err(ca::CaError::Corrupt("the cluster authorities are gone".into()).into());
        };
        self.take(raw)
    }

    fn take(&self, raw: Vec<u8>) -> Result<bool, AuthError> {
        if self.loaded.read().unwrap_or_else(|p| p.into_inner()).raw == raw {
            return Ok(false);
        }
        let mut authorities = Authorities::load(&parse_stored(&raw)?)?;
        authorities.set_node_validity(self.node_validity);
        let authorities = Arc::new(authorities);
        *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = Loaded {
            raw,
            authorities: authorities.clone(),
        };
        if let Some(r) = authorities.rotation() {
            tracing::info!(ca = %r.ca_type, phase = %r.phase, pins = ?authorities.pins().iter().map(ToString::to_string).collect::<Vec<_>>(), "CA rotation");
        } else {
            tracing::info!(ca_pin = %authorities.pin, "CA rotation: standby");
        }
        self.changes.send_replace(authorities);
        Ok(true)
    }

    /// Moves a CA rotation (`burrowctl auth rotate`): to `target`, or, without one, starts an
    /// automatic rotation over `grace`. One compare-and-swap of the authorities record.
    pub async fn rotate(
        &self,
        ca_type: rotation::CaType,
        target: Option<rotation::Phase>,
        grace: Option<Duration>,
    ) -> Result<Arc<Authorities>, AuthError> {
        self.change(|stored| rotation::step(stored, ca_type, target, grace, unix_now()).map(Some))
            .await?;
        Ok(self.authorities())
    }

    /// Moves an automatic rotation on when its time has come (any proxy may; one wins).
    pub async fn advance_rotation(&self) -> Result<(), AuthError> {
        self.change(|stored| Ok(rotation::advance(stored, unix_now())))
            .await
    }

    /// Applies `edit` to the stored authorities with compare-and-swap, retrying on a race.
    async fn change(
        &self,
        edit: impl Fn(&StoredAuthorities) -> Result<Option<StoredAuthorities>, rotation::RotateError>,
    ) -> Result<(), AuthError> {
        for _ in 0..5 {
            let Some(raw) = self.backend.get(state::AUTHORITIES).await? else {
                return Err(ca::CaError::Corrupt("the cluster authorities are gone".into()).into());
            };
            let Some(next) = edit(&parse_stored(&raw)?)? else {
                self.take(raw)?;
                return Ok(());
            };
            let json = serde_json::to_vec(&next).expect("authorities serialize");
            if self
                .backend
                .compare_and_swap(state::AUTHORITIES, Some(&raw), json.clone(), None)
                .await?
            {
                self.take(json)?;
                return Ok(());
            }
        }
        Err(AuthError::Backend(BackendError::Storage(
            "the cluster authorities keep changing under this rotation; try again".into(),
        )))
    }

    /// Handles `POST /v1/webapi/host/join`.
    pub async fn join(&self, req: JoinRequest) -> Result<JoinResponse, AuthError> {
        validate_node_name(&req.node_name)?;
        let ssh_key = node_ssh_key(&req.ssh_public_key)?;
        if req.role != Role::Node {
            return Err(TokenError::RoleNotAllowed {
                requested: req.role.as_str().into(),
                allowed: "node (proxies join a cluster by sharing its backend)".into(),
            }
            .into());
        }
        let grant = self.tokens.check(&req.token, req.role).await?;
        // Only a token holder learns which names the cluster keeps for itself (they include the
        // proxies' host names), and only a token holder costs the backend a listing.
        self.refuse_cluster_names(&req.node_name).await?;
        let host_id = new_host_id();
        self.claim_name(&req.node_name, &host_id).await?;
        let issued = self.issue(&req, &ssh_key, &host_id, grant).await;
        if issued.is_err() {
            let _ = self.release_name(&req.node_name, &host_id).await;
        }
        issued
    }

    /// New certificates for a node that asked over its tunnel: its TLS certificate again for the
    /// key of the one it authenticated with (`spki_der`), and its SSH host key's certificate.
    /// `host_id` and `node_name` are from that certificate. A removed node gets nothing.
    pub async fn renew_node(
        &self,
        spki_der: &[u8],
        ssh_public_key: &str,
        host_id: &str,
        node_name: &str,
    ) -> Result<NodeCertificates, AuthError> {
        let ssh_key = node_ssh_key(ssh_public_key)?;
        if self.backend.get(&state::node(host_id)).await?.is_none() {
            return Err(AuthError::BadRequest(
                "this node was removed from the cluster".into(),
            ));
        }
        // One snapshot for both: a rotation between them would sign them by different CAs.
        let authorities = self.authorities();
        let tls_cert = authorities.sign_node_key(spki_der, host_id, node_name)?;
        let ssh_cert = authorities
            .sign_host_ssh(&ssh_key, host_id, node_name)?
            .to_openssh()
            .map_err(ca::CaError::from)?;
        tracing::info!(%host_id, node = %node_name, valid_for = ?self.node_validity, "renewed a node's certificates");
        Ok(NodeCertificates { tls_cert, ssh_cert })
    }

    /// Signs the node's certificates and records it, once its name is claimed.
    async fn issue(
        &self,
        req: &JoinRequest,
        ssh_key: &PublicKey,
        host_id: &str,
        grant: tokens::Grant,
    ) -> Result<JoinResponse, AuthError> {
        let host_id = host_id.to_string();
        let authorities = self.authorities();
        let tls_cert = authorities
            .sign_node_csr(&req.tls_csr, &host_id, &req.node_name)
            .map_err(|_| {
                AuthError::BadRequest("tls_csr is not a valid, signed PKCS#10 request".into())
            })?;
        let ssh_cert = authorities
            .sign_host_ssh(ssh_key, &host_id, &req.node_name)?
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
                &state::node(&host_id),
                serde_json::to_vec(&record).expect("node records serialize"),
                None,
            )
            .await?;
        tracing::info!(%host_id, node = %req.node_name, token = %grant.token_id, "node joined");
        Ok(JoinResponse {
            host_id,
            cluster_name: authorities.cluster_name.clone(),
            ssh_cert,
            tls_cert,
            host_ca_certs: authorities.host_ca_certs(),
            host_ca_ssh: authorities.host_ssh_publics(),
            user_ca_ssh: authorities.user_ssh_publics(),
            labels: grant.labels,
        })
    }
}

/// A node's SSH host key, as a join or a renewal sends it: ed25519 or ECDSA only.
fn node_ssh_key(text: &str) -> Result<PublicKey, AuthError> {
    let key = PublicKey::from_openssh(text.trim())
        .map_err(|_| AuthError::BadRequest("ssh_public_key is not an OpenSSH public key".into()))?;
    if !matches!(
        key.algorithm(),
        Algorithm::Ed25519 | Algorithm::Ecdsa { .. }
    ) {
        return Err(AuthError::BadRequest(format!(
            "ssh_public_key of type {} is not accepted: use ed25519 or ECDSA",
            key.algorithm()
        )));
    }
    Ok(key)
}

impl Auth {
    /// Refuses names that belong to the cluster itself: the name clients verify proxies by, the
    /// cluster's name, and every live proxy's id, host name and addresses. A node with one of
    /// them would hold certificates (SSH host, TLS) for a name users take for the proxy.
    async fn refuse_cluster_names(&self, name: &str) -> Result<(), AuthError> {
        let mut reserved = vec![
            burrow_net::tls::CLUSTER_SERVER_NAME.to_string(),
            "localhost".to_string(),
            self.authorities().cluster_name.clone(),
        ];
        for proxy in crate::registry::list(self.backend.as_ref()).await? {
            reserved.push(proxy.id);
            reserved.push(proxy.hostname);
            for addr in std::iter::once(proxy.web_addr).chain(proxy.public_addr) {
                if let Some(host) = burrow_net::web::split_host(&addr) {
                    reserved.push(host.to_string());
                }
            }
        }
        let taken =
            name.ends_with(".localhost") || reserved.iter().any(|r| r.eq_ignore_ascii_case(name));
        if taken {
            return Err(AuthError::BadRequest(format!(
                "node name {name:?} belongs to the cluster itself (a proxy's name or address, or the cluster's): choose another --nodename"
            )));
        }
        Ok(())
    }

    /// Claims `name` for `host_id` with compare-and-swap, so that of two joins racing for one
    /// name only one wins.
    async fn claim_name(&self, name: &str, host_id: &str) -> Result<(), AuthError> {
        let key = state::node_name(name);
        if self
            .backend
            .compare_and_swap(&key, None, host_id.as_bytes().to_vec(), None)
            .await?
        {
            return Ok(());
        }
        let holder = self
            .backend
            .get(&key)
            .await?
            .map(|h| String::from_utf8_lossy(&h).into_owned())
            .unwrap_or_else(|| "(just removed: try again)".into());
        Err(AuthError::NameTaken {
            name: name.to_string(),
            holder,
        })
    }

    async fn release_name(&self, name: &str, host_id: &str) -> Result<(), AuthError> {
        inventory::release_name(self.backend.as_ref(), name, host_id).await?;
        Ok(())
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
    burrow_daemon::hostname().unwrap_or_else(|| "burrow".to_string())
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
        assert_eq!(a.authorities().pin, again.authorities().pin);
        assert_eq!(again.authorities().cluster_name, "c1");
        let err = Auth::bootstrap(b, Some("other"), vec![])
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("holds cluster \"c1\""), "{err}");
    }

    fn join_request(name: &str) -> JoinRequest {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let ssh =
            russh::keys::ssh_key::PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap();
        JoinRequest {
            token: tunnel_proto::secret::Secret::new("static-token-value-0123456789"),
            node_name: name.into(),
            role: Role::Node,
            ssh_public_key: ssh.public_key().to_openssh().unwrap(),
            tls_csr: csr,
        }
    }

    #[tokio::test]
    async fn joins_racing_for_one_name_cannot_both_win() {
        let dir = tempfile::tempdir().unwrap();
        let b: Arc<dyn Backend> = Arc::new(RedbBackend::open(&dir.path().join("s")).unwrap());
        let token = StaticToken {
            roles: vec![Role::Node],
            value: tunnel_proto::secret::Secret::new("static-token-value-0123456789"),
        };
        let auth = Arc::new(
            Auth::bootstrap(b.clone(), Some("c1"), vec![token])
                .await
                .unwrap(),
        );
        let mut racing = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let auth = auth.clone();
            racing.spawn(async move { auth.join(join_request("pi")).await });
        }
        let results = racing.join_all().await;
        let won: Vec<&JoinResponse> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(won.len(), 1, "exactly one join gets the name");
        for r in &results {
            if let Err(e) = r {
                assert!(matches!(e, AuthError::NameTaken { .. }), "{e}");
            }
        }
        let holder = inventory::name_holder(b.as_ref(), "pi").await.unwrap();
        assert_eq!(holder.as_deref(), Some(won[0].host_id.as_str()));
        // Released only by its holder.
        inventory::release_name(b.as_ref(), "pi", "someone-else")
            .await
            .unwrap();
        let still = inventory::name_holder(b.as_ref(), "pi").await.unwrap();
        assert!(still.is_some());
        inventory::release_name(b.as_ref(), "pi", &won[0].host_id)
            .await
            .unwrap();
        assert!(auth.join(join_request("pi")).await.is_ok());
        // The cluster's own names are refused.
        for reserved in ["burrow.cluster.local", "localhost", "c1", "x.localhost"] {
            let err = auth.join(join_request(reserved)).await.err().unwrap();
            assert!(err.to_string().contains("belongs to the cluster"), "{err}");
        }
    }

    #[test]
    fn node_names_are_checked() {
        for ok in ["pi", "edge-01.lab", "a1", "1a", &"x".repeat(63)] {
            validate_node_name(ok).unwrap();
        }
        let uuid = "0b5e0c2a-7d4e-4f3b-9a61-2c8f4e1d9b07";
        for bad in [
            "",
            "-x",
            "x-",
            "a..b",
            ".a",
            "a b",
            "a/b",
            "a_b",
            "Pi",
            &"x".repeat(64),
            &"x".repeat(300),
            "é",
            "10.0.0.1",
            uuid,
        ] {
            assert!(validate_node_name(bad).is_err(), "{bad:?}");
        }
    }
}
