//! The node's identity: keys and certificates from its join, kept in the data dir.
//!
//! One JSON file, written atomically with mode 0600 in a 0700 dir: a crash during a join leaves
//! either no identity (the next start joins again) or a whole one.

use std::path::{Path, PathBuf};

use burrow_daemon::fsutil::{ensure_private_dir, write_private_atomic};
use burrow_net::tls;
use russh::keys::ssh_key::{Certificate, PrivateKey};
use serde::{Deserialize, Serialize};
use tunnel_proto::api::Labels;
use tunnel_proto::secret::Secret;

pub const IDENTITY_FILE: &str = "identity.json";

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub format: u32,
    pub host_id: String,
    pub node_name: String,
    pub cluster_name: String,
    /// OpenSSH private host key.
    pub ssh_key: Secret,
    /// OpenSSH host certificate for `ssh_key`.
    pub ssh_cert: String,
    /// PEM private key of the TLS certificate.
    pub tls_key: Secret,
    /// PEM TLS certificate, signed by the host CA.
    pub tls_cert: String,
    pub host_ca_certs: Vec<String>,
    pub host_ca_ssh: Vec<String>,
    pub user_ca_ssh: Vec<String>,
    /// Labels inherited from the join token.
    pub labels: Labels,
    /// Unix seconds.
    pub joined: u64,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("host_id", &self.host_id)
            .field("node_name", &self.node_name)
            .field("cluster_name", &self.cluster_name)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("identity file {path} is damaged ({reason}); move it away to join the cluster again")]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot write the identity to {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Identity {
    /// The identity file format this agent writes and reads.
    pub const FORMAT: u32 = 1;

    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(IDENTITY_FILE)
    }

    /// The stored identity, or `None` if the node has not joined yet.
    pub fn load(data_dir: &Path) -> Result<Option<Self>, IdentityError> {
        let path = Self::path(data_dir);
        let raw = match std::fs::read(&path) {
            Ok(raw) => raw,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(IdentityError::Read { path, source }),
        };
        let corrupt = |reason: String| IdentityError::Corrupt {
            path: path.clone(),
            reason,
        };
        let identity: Identity =
            serde_json::from_slice(&raw).map_err(|e| corrupt(e.to_string()))?;
        if identity.format != Self::FORMAT {
            return Err(corrupt(format!("unknown format {}", identity.format)));
        }
        identity.check().map_err(corrupt)?;
        Ok(Some(identity))
    }

    /// Writes the identity atomically, creating the data dir (0700) if needed.
    pub fn save(&self, data_dir: &Path) -> Result<(), IdentityError> {
        let path = Self::path(data_dir);
        let write = |source| IdentityError::Write {
            path: path.clone(),
            source,
        };
        ensure_private_dir(data_dir).map_err(write)?;
        let json = serde_json::to_vec_pretty(self).expect("identities serialize");
        write_private_atomic(&path, &json).map_err(write)
    }

    /// Checks that every key and certificate parses and that the certificates are for the keys.
    pub fn check(&self) -> Result<(), String> {
        let key =
            PrivateKey::from_openssh(self.ssh_key.expose()).map_err(|e| format!("SSH key: {e}"))?;
        let cert = Certificate::from_openssh(&self.ssh_cert)
            .map_err(|e| format!("SSH certificate: {e}"))?;
        if cert.public_key() != key.public_key().key_data() {
            return Err("the SSH certificate is not for the SSH key".into());
        }
        tls::parse_key(self.tls_key.expose(), "TLS key").map_err(|e| e.to_string())?;
        tls::parse_certs(&self.tls_cert, "TLS certificate").map_err(|e| e.to_string())?;
        if self.host_ca_certs.is_empty() {
            return Err("no host CA certificate".into());
        }
        for ca in &self.host_ca_certs {
            tls::parse_certs(ca, "host CA certificate").map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}
