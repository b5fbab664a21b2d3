//! burrow-agent: the node side of Burrow.
//!
//! What lives here:
//! - [`config`]: flags, YAML and defaults, merged into a validated [`config::AgentConfig`].
//! - [`join`]: joining a cluster through the proxy's web port with a token and a CA pin.
//! - [`identity`]: the node's keys and certificates, stored atomically in the data dir.
//!
//! `main` parses the command line and calls [`run`], which tests can call too.

pub mod config;
pub mod identity;
pub mod join;

use tokio_util::sync::CancellationToken;
use tunnel_proto::secret::{Secret, token_from_arg};

use crate::config::{AgentConfig, TokenSource};
use crate::identity::Identity;
use crate::join::{JoinError, JoinParams};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A problem with what the user gave: exit code 2.
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Join(#[from] JoinError),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
}

impl AgentError {
    pub fn exit_code(&self) -> u8 {
        match self {
            AgentError::Config(_) => 2,
            _ => 1,
        }
    }
}

/// Runs the agent until `shutdown` is cancelled: loads the node's identity, or joins the cluster
/// to get one.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let identity = match Identity::load(&config.data_dir)? {
        Some(identity) => {
            tracing::info!(
                host_id = %identity.host_id,
                node = %identity.node_name,
                cluster = %identity.cluster_name,
                "loaded the node's identity; no token needed"
            );
            identity
        }
        None => {
            let token = read_token(&config.token)?;
            tracing::info!(proxy = %config.proxy, node = %config.nodename, "joining the cluster");
            let identity = join::join(JoinParams {
                proxy: &config.proxy,
                token,
                node_name: &config.nodename,
                ca_pins: &config.ca_pins,
                insecure: config.insecure,
            })
            .await?;
            identity.save(&config.data_dir)?;
            tracing::info!(
                host_id = %identity.host_id,
                node = %identity.node_name,
                cluster = %identity.cluster_name,
                "joined the cluster"
            );
            identity
        }
    };
    tracing::info!(host_id = %identity.host_id, "agent ready");
    shutdown.cancelled().await;
    tracing::info!("agent stopped");
    Ok(())
}

fn read_token(source: &TokenSource) -> Result<Secret, AgentError> {
    match source {
        TokenSource::Given(arg) => token_from_arg(arg).map_err(AgentError::Config),
        TokenSource::DefaultFile(path) => {
            if !path.exists() {
                return Err(AgentError::Config(format!(
                    "this node has not joined a cluster yet and has no join token: pass --token or write one to {}",
                    path.display()
                )));
            }
            token_from_arg(&path.to_string_lossy()).map_err(AgentError::Config)
        }
    }
}
