//! A user's dial: which tunnel it takes (a node by host id or name, bare or `NODE.CLUSTER`), the
//! dial exchange on a new stream, and why a node cannot be reached when it has no tunnel here.

use std::time::{Duration, Instant};

use burrow_tunnel::{Framed, Session, TunnelStream};
use tunnel_proto::api::Presence;
use tunnel_proto::wire::{DialRequest, Message};

use super::{HELLO_TIMEOUT, TunnelServer};
use crate::nodelimits::short;
use crate::state;

impl TunnelServer {
    /// Opens a dial stream to `target` (a node name or host id) for `port`. Returns the stream and
    /// any bytes the node sent right after accepting (its SSH banner, say).
    pub async fn dial(
        &self,
        target: &str,
        port: u16,
        client_addr: &str,
    ) -> Result<(TunnelStream, bytes::BytesMut), DialError> {
        let start = Instant::now();
        let result = self.dial_node(target, port, client_addr).await;
        match &result {
            Ok(_) => self.metrics.dial("ok", Some(start.elapsed())),
            Err(e) => self.metrics.dial(e.label(), None),
        }
        result
    }

    async fn dial_node(
        &self,
        target: &str,
        port: u16,
        client_addr: &str,
    ) -> Result<(TunnelStream, bytes::BytesMut), DialError> {
        // `NODE.CLUSTER` (what a generated ssh_config dials) is NODE, unless a node is called that.
        let bare = target
            .strip_suffix(self.cluster_name.as_str())
            .and_then(|t| t.strip_suffix('.'))
            .filter(|t| !t.is_empty());
        let session = match self.find(target)? {
            Some(session) => Some(session),
            None => match bare {
                Some(bare) => self.find(bare)?,
                None => None,
            },
        };
        let Some(session) = session else {
            return Err(match self.offline(target).await {
                Some(e) => e,
                None => match bare {
                    Some(bare) => self
                        .offline(bare)
                        .await
                        .unwrap_or_else(|| DialError::Unknown(target.to_string())),
                    None => DialError::Unknown(target.to_string()),
                },
            });
        };
        let stream = session
            .open()
            .await
            .map_err(|e| DialError::Failed(format!("cannot open a stream to {target}: {e}")))?;
        let mut framed = Framed::new(stream);
        let exchange = async {
            framed
                .write(&Message::Dial(DialRequest {
                    port,
                    client_addr: client_addr.to_string(),
                }))
                .await?;
            framed.read().await
        };
        match tokio::time::timeout(HELLO_TIMEOUT, exchange).await {
            Ok(Ok(Some(Message::DialResult { error: None }))) => Ok(framed.into_parts()),
            Ok(Ok(Some(Message::DialResult { error: Some(e) }))) => {
                Err(DialError::Refused(short(&e)))
            }
            Ok(Ok(other)) => Err(DialError::Failed(format!(
                "unexpected answer to dial: {}",
                other.map_or("end of stream", |m| m.kind())
            ))),
            Ok(Err(e)) => Err(DialError::Failed(e.to_string())),
            Err(_) => Err(DialError::Failed(format!(
                "{target} did not answer the dial"
            ))),
        }
    }

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

impl DialError {
    /// The metrics' label for a dial that failed so.
    pub fn label(&self) -> &'static str {
        match self {
            DialError::Unknown(_) => "unknown_node",
            DialError::Offline { .. } => "offline",
            DialError::NotHere(_) => "not_here",
            DialError::Ambiguous { .. } => "ambiguous",
            DialError::Refused(_) => "refused",
            DialError::Failed(_) => "failed",
        }
    }
}
