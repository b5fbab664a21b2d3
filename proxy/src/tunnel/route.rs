//! Which tunnel a user's dial takes: a node by host id or name (bare or `NODE.CLUSTER`), and
//! why a node cannot be reached when it has no tunnel here.

use std::time::Duration;

use burrow_tunnel::Session;
use tunnel_proto::api::Presence;

use super::TunnelServer;
use crate::state;

impl TunnelServer {
    /// The newest tunnel of the one node whose host id or name is `target`.
    pub(super) fn find(&self, target: &str) -> Result<Option<Session>, DialError> {
        let tunnels = self.tunnels.lock().unwrap_or_else(|p| p.into_inner());
        tunnels.find(target)
    }

    /// Why a joined node (by host id or name) that holds no tunnel here cannot be reached;
    /// `None` if no node is called `target`.
    pub(super) async fn offline(&self, target: &str) -> Option<DialError> {
        let backend = self.backend.as_ref();
        let record = match backend.get(&state::node(target)).await.ok().flatten() {
            Some(record) => record,
            None => {
                let holder = crate::inventory::name_holder(backend, target)
                    .await
                    .ok()
                    .flatten()?;
                backend.get(&state::node(&holder)).await.ok().flatten()?
            }
        };
        let record: state::NodeRecord = serde_json::from_slice(&record).ok()?;
        let present = backend
            .list(&state::presence_of(&record.host_id))
            .await
            .is_ok_and(|p| !p.is_empty());
        if present {
            return Some(DialError::NotHere(target.to_string()));
        }
        let seen = backend
            .get(&state::seen(&record.host_id))
            .await
            .ok()
            .flatten()
            .and_then(|v| serde_json::from_slice::<Presence>(&v).ok());
        Some(DialError::Offline {
            name: target.to_string(),
            since: humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH
                    + Duration::from_secs(seen.map_or(record.joined, |p| p.last_seen)),
            )
            .to_string(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("no node is called {0:?} in this cluster")]
    Unknown(String),
    #[error("node {name:?} is offline since {since}")]
    Offline { name: String, since: String },
    #[error("node {0:?} holds no tunnel to this proxy yet; try again in a few seconds")]
    NotHere(String),
    #[error("several nodes are called {name:?}; use a host id: {}", host_ids.join(", "))]
    Ambiguous { name: String, host_ids: Vec<String> },
    #[error("the node refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}
