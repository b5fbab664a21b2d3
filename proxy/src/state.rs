//! Everything the cluster keeps in its backend, in one place: every key (and the prefix it lives
//! under), and the record of a joined node. A module that reads or writes the backend builds its
//! keys here, so the layout below is the whole of it.
//!
//! | key | value |
//! | --- | --- |
//! | `/cluster/authorities` | the CAs ([`crate::auth::ca::StoredAuthorities`]) |
//! | `/tokens/<sha256 hex>` | a dynamic join token (by hash) |
//! | `/nodes/<host id>` | [`NodeRecord`] |
//! | `/node-names/<name>` | the host id that holds the name |
//! | `/presence/<host id>/<proxy id>` | [`tunnel_proto::api::Presence`], under a TTL |
//! | `/seen/<host id>` | the node's last [`tunnel_proto::api::Presence`] anywhere: when it was last seen, for `nodes ls` and "offline since" once its presence records are gone |
//! | `/revoked/<host id>` | when the node was removed |
//! | `/proxies/<proxy id>` | [`tunnel_proto::api::ProxyInfo`], under a lease |
//! | `/sessions/<session id>` | [`tunnel_proto::api::SessionRecord`]: a stored recording and the proxy that holds it |
//! | `/recording-usage/<host id>` | bytes of recordings the node has stored (decimal) |

use serde::{Deserialize, Serialize};
use tunnel_proto::api::Labels;

pub const AUTHORITIES: &str = "/cluster/authorities";
pub const TOKENS: &str = "/tokens/";
pub const NODES: &str = "/nodes/";
pub const NODE_NAMES: &str = "/node-names/";
pub const PRESENCE: &str = "/presence/";
pub const SEEN: &str = "/seen/";
pub const REVOKED: &str = "/revoked/";
pub const PROXIES: &str = "/proxies/";
pub const SESSIONS: &str = "/sessions/";
pub const RECORDING_USAGE: &str = "/recording-usage/";

pub fn session(session_id: &str) -> String {
    format!("{SESSIONS}{session_id}")
}

pub fn recording_usage(host_id: &str) -> String {
    format!("{RECORDING_USAGE}{host_id}")
}

pub fn token(hash_hex: &str) -> String {
    format!("{TOKENS}{hash_hex}")
}

pub fn node(host_id: &str) -> String {
    format!("{NODES}{host_id}")
}

pub fn node_name(name: &str) -> String {
    format!("{NODE_NAMES}{name}")
}

/// One node's presence at one proxy.
pub fn presence(host_id: &str, proxy_id: &str) -> String {
    format!("{PRESENCE}{host_id}/{proxy_id}")
}

/// Every presence of one node.
pub fn presence_of(host_id: &str) -> String {
    format!("{PRESENCE}{host_id}/")
}

pub fn seen(host_id: &str) -> String {
    format!("{SEEN}{host_id}")
}

pub fn revoked(host_id: &str) -> String {
    format!("{REVOKED}{host_id}")
}

pub fn proxy(proxy_id: &str) -> String {
    format!("{PROXIES}{proxy_id}")
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
