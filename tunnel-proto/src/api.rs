//! JSON messages of the proxy's web API.
//!
//! Public endpoints (no client certificate):
//! - `GET  /v1/webapi/find`: [`FindResponse`]
//! - `POST /v1/webapi/host/join`: [`JoinRequest`] -> [`JoinResponse`]
//!
//! Admin endpoints (client certificate of the admin identity, see `burrowctl`):
//! - `GET  /v1/admin/status`: [`StatusResponse`]
//! - `POST /v1/admin/tokens`: [`TokenAddRequest`] -> [`TokenAdded`]
//! - `GET  /v1/admin/tokens`: [`TokenList`]
//! - `POST /v1/admin/tokens/remove`: [`TokenRemoveRequest`] -> [`TokenRemoved`]
//! - `GET  /v1/admin/proxies`: [`ProxyList`]
//! - `GET  /v1/admin/nodes`: [`NodeList`]
//! - `POST /v1/admin/nodes/remove`: [`NodeRemoveRequest`] -> [`NodeRemoved`]
//! - `POST /v1/admin/auth/rotate`: [`RotateRequest`] -> [`StatusResponse`]
//! - `GET  /v1/admin/sessions?node=N&user=U`: [`SessionList`]
//! - `GET  /v1/admin/sessions/cast?id=ID&offset=N`: [`SessionCast`]
//!
//! Health (no authentication): `GET /readyz`: [`Readiness`] or a `not_ready` error.
//!
//! Every error is an HTTP status with an [`ApiErrorBody`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

pub const FIND_PATH: &str = "/v1/webapi/find";
pub const JOIN_PATH: &str = "/v1/webapi/host/join";
pub const STATUS_PATH: &str = "/v1/admin/status";
pub const TOKENS_PATH: &str = "/v1/admin/tokens";
pub const TOKENS_REMOVE_PATH: &str = "/v1/admin/tokens/remove";
pub const PROXIES_PATH: &str = "/v1/admin/proxies";
pub const NODES_PATH: &str = "/v1/admin/nodes";
pub const NODES_REMOVE_PATH: &str = "/v1/admin/nodes/remove";
pub const AUTH_SIGN_PATH: &str = "/v1/admin/auth/sign";
pub const AUTH_EXPORT_PATH: &str = "/v1/admin/auth/export";
pub const AUTH_RENEW_ADMIN_PATH: &str = "/v1/admin/auth/renew-admin";
pub const AUTH_ROTATE_PATH: &str = "/v1/admin/auth/rotate";
pub const SESSIONS_PATH: &str = "/v1/admin/sessions";
pub const SESSION_CAST_PATH: &str = "/v1/admin/sessions/cast";
/// Tunnels through a balancer that terminates TLS: an HTTP/1.1 `GET` with `Upgrade:`
/// [`TUNNEL_UPGRADE`], answered with `101 Switching Protocols`; the node's mutual TLS then runs
/// inside the upgraded stream.
pub const TUNNEL_UPGRADE_PATH: &str = "/v1/webapi/tunnel";
/// The `Upgrade:` protocol token of [`TUNNEL_UPGRADE_PATH`].
pub const TUNNEL_UPGRADE: &str = "burrow-tunnel/1";
/// Readiness: 200 when the proxy can reach its state backend, 503 `not_ready` when not.
pub const READY_PATH: &str = "/readyz";

/// Largest request body the web API reads; a join request is a few kilobytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Labels: ordered, so that listings and heartbeats are stable.
pub type Labels = BTreeMap<String, String>;

/// A role a join token may allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Node,
    Proxy,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Proxy => "proxy",
        }
    }

    /// Parses `node`, `proxy` or a comma-separated list of them (`node,proxy`).
    pub fn parse_list(s: &str) -> Result<Vec<Role>, String> {
        let mut roles = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let role = match part {
                "node" => Role::Node,
                "proxy" => Role::Proxy,
                other => {
                    return Err(format!(
                        "unknown role {other:?}: expected node, proxy or node,proxy"
                    ));
                }
            };
            if !roles.contains(&role) {
                roles.push(role);
            }
        }
        if roles.is_empty() {
            return Err("no role given: expected node, proxy or node,proxy".into());
        }
        roles.sort();
        Ok(roles)
    }

    pub fn join_list(roles: &[Role]) -> String {
        roles
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Parses static labels, `k=v,k2=v2`. Keys are letters, digits, `-`, `_`, `.` and `/`.
pub fn parse_labels(s: &str) -> Result<Labels, String> {
    let mut labels = Labels::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("label {pair:?} is not key=value"))?;
        let k = k.trim();
        let valid_key = !k.is_empty()
            && k.len() <= 64
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
        if !valid_key {
            return Err(format!(
                "label key {k:?} is invalid: use letters, digits, '-', '_', '.' or '/'"
            ));
        }
        labels.insert(k.to_string(), v.trim().to_string());
    }
    Ok(labels)
}

/// Longest node name (a DNS name's limit).
pub const MAX_NODE_NAME: usize = 253;
/// Longest label of a node name (RFC 1123).
const MAX_LABEL: usize = 63;

/// Node names are what users type after `ssh login@`, and they end up in certificates: hostnames
/// in the RFC 1123 sense (dot-separated labels of lowercase letters, digits and `-`, no label
/// starting or ending with `-`, at most 63 bytes each and 253 in all). Names that could be taken
/// for something else are refused too: an IP address, or a host id (UUID-shaped).
pub fn validate_node_name(name: &str) -> Result<(), String> {
    let invalid = |why: &str| Err(format!("node name {name:?} is invalid: {why}"));
    if name.is_empty() || name.len() > MAX_NODE_NAME {
        return invalid(&format!("use 1 to {MAX_NODE_NAME} characters"));
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        return invalid("use lowercase letters");
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= MAX_LABEL
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return invalid(
                "it must be a hostname: labels of letters, digits and '-' (not first or last), \
                 1 to 63 characters each, separated by dots",
            );
        }
    }
    if name.parse::<std::net::IpAddr>().is_ok() {
        return invalid("it is an IP address");
    }
    if looks_like_host_id(name) {
        return invalid("it has the shape of a host id");
    }
    Ok(())
}

/// Whether `s` has the shape of a host id (a UUID: 8-4-4-4-12 hex digits).
pub fn looks_like_host_id(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Where agents open tunnels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelAddr {
    /// `tcp` (TLS + yamux) or `quic`.
    pub transport: String,
    /// `host:port`.
    pub addr: String,
    /// The ALPN protocol the tunnel speaks.
    pub alpn: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FindResponse {
    pub cluster_name: String,
    pub server_version: String,
    /// PEM certificates of the host CA (more than one during a rotation).
    pub host_ca_certs: Vec<String>,
    pub tunnel_addrs: Vec<TunnelAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub token: Secret,
    pub node_name: String,
    pub role: Role,
    /// The node's SSH public key, OpenSSH `authorized_keys` format.
    pub ssh_public_key: String,
    /// A PEM PKCS#10 request for the node's TLS certificate (proves the key is held).
    pub tls_csr: String,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct JoinResponse {
    pub host_id: String,
    pub cluster_name: String,
    /// OpenSSH host certificate for `ssh_public_key`.
    pub ssh_cert: String,
    /// PEM TLS client/server certificate for the CSR's key, signed by the host CA.
    pub tls_cert: String,
    pub host_ca_certs: Vec<String>,
    /// Host CA SSH public keys (`authorized_keys` format).
    pub host_ca_ssh: Vec<String>,
    /// User CA SSH public keys: which user certificates the node trusts.
    pub user_ca_ssh: Vec<String>,
    /// Labels the node inherits from its join token.
    pub labels: Labels,
}

impl std::fmt::Debug for JoinResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinResponse")
            .field("host_id", &self.host_id)
            .field("cluster_name", &self.cluster_name)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusResponse {
    pub cluster_name: String,
    pub version: String,
    pub ca_pins: Vec<String>,
    /// The address agents should be given, if the proxy knows it.
    pub public_addr: Option<String>,
    /// Where users jump through to nodes (HOST:PORT), if this proxy serves SSH.
    #[serde(default)]
    pub ssh_addr: Option<String>,
    /// A CA rotation under way, if any (`ca_pins` then holds the pins of both host CAs, the one
    /// that signs first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationStatus>,
}

/// A CA rotation's state (`burrowctl auth rotate`, `burrowctl status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationStatus {
    /// `host` or `user`.
    #[serde(rename = "type")]
    pub ca_type: String,
    /// `init`, `update_clients`, `update_servers` or `rollback`.
    pub phase: String,
    /// Unix seconds: when the current phase began.
    pub phase_started: u64,
    /// Automatic rotations: when the proxies move it to its next phase (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_phase_at: Option<u64>,
}

/// A stored session recording, as the backend indexes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub session_id: String,
    /// The node, from its certificate.
    pub host_id: String,
    pub node: String,
    /// The user's certificate key id and the login, as the node reported them.
    pub user: String,
    pub login: String,
    /// `shell` or `exec`.
    pub kind: String,
    /// Unix milliseconds.
    pub started: u64,
    pub ended: u64,
    /// Bytes of the `.cast` file.
    pub size: u64,
    /// The proxy that holds the file.
    pub proxy_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionList {
    pub sessions: Vec<SessionRecord>,
}

/// A piece of a recording: whole lines of its asciicast text from `offset`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionCast {
    pub session: SessionRecord,
    pub offset: u64,
    pub data: String,
}

/// `POST /v1/admin/auth/rotate`: start a rotation, move one to a phase, or roll it back.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// `host` or `user`.
    #[serde(rename = "type")]
    pub ca_type: String,
    /// The phase to move to; none: an automatic rotation over `grace_period_secs`.
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default)]
    pub grace_period_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenAddRequest {
    pub roles: Vec<Role>,
    pub ttl_seconds: u64,
    /// A value chosen by the admin; the proxy generates one when absent.
    pub value: Option<Secret>,
    #[serde(default)]
    pub labels: Labels,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenAdded {
    pub token: Secret,
    pub id: String,
    pub roles: Vec<Role>,
    pub labels: Labels,
    /// Unix seconds.
    pub expires: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    Dynamic,
    Static,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenInfo {
    /// The first 16 hex digits of the token's SHA-256: names a token without revealing it.
    pub id: String,
    pub kind: TokenKind,
    pub roles: Vec<Role>,
    pub labels: Labels,
    /// Unix seconds; `None` for static tokens, which never expire.
    pub expires: Option<u64>,
    /// Only with `?with_secrets=true`, and only for static tokens: dynamic tokens are stored by
    /// hash and shown once, when they are created.
    pub value: Option<Secret>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenList {
    pub tokens: Vec<TokenInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRemoveRequest {
    /// The token's value or its id.
    pub token: Secret,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRemoved {
    pub id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignRequest {
    pub user: String,
    pub logins: Vec<String>,
    pub ttl_seconds: u64,
    /// The user's public key, OpenSSH format; the private key never leaves burrowctl.
    pub public_key: String,
    /// What the certificate permits beyond a session; absent: what OpenSSH's ssh-keygen grants.
    #[serde(default)]
    pub permissions: Permissions,
}

/// The `permit-*` extensions and the `force-command` option of a user certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permissions {
    pub pty: bool,
    pub port_forwarding: bool,
    /// Runs instead of whatever the user asks for (shell, command or subsystem).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_command: Option<String>,
}

impl Default for Permissions {
    fn default() -> Self {
        Self {
            pty: true,
            port_forwarding: true,
            force_command: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignResponse {
    /// The OpenSSH user certificate.
    pub certificate: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportResponse {
    /// `host`, `user` or `krl`.
    pub kind: String,
    /// CA public keys, OpenSSH format (for `krl`: the host CAs the revocations are under).
    pub keys: Vec<String>,
    pub cluster_name: String,
    /// `krl`: the key IDs of removed nodes' host certificates ([`host_cert_key_id`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_key_ids: Vec<String>,
}

/// A new admin identity (`burrowctl auth renew`): the whole identity file, certificate, key and
/// host CA, as the proxy writes `DATA_DIR/admin-identity`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminIdentity {
    pub identity: crate::secret::Secret,
}

/// The key ID of a node's SSH host certificate: what a revocation list names it by.
pub fn host_cert_key_id(host_id: &str) -> String {
    format!("host:{host_id}")
}

/// A live proxy, as registered in the backend under a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyInfo {
    pub id: String,
    pub hostname: String,
    pub version: String,
    /// The address the proxy's web API is bound to.
    pub web_addr: String,
    pub public_addr: Option<String>,
    /// Unix seconds.
    pub started: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxyList {
    pub proxies: Vec<ProxyInfo>,
}

/// One tunnel of a node to one proxy, as that proxy last recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub host_id: String,
    pub node_name: String,
    pub version: String,
    pub labels: Labels,
    pub proxy_id: String,
    /// `quic` or `tcp`.
    pub transport: String,
    pub remote_addr: String,
    /// Unix seconds.
    pub connected: u64,
    /// Unix seconds of the last heartbeat the proxy recorded.
    pub last_seen: u64,
    /// A QUIC tunnel's restart-nudge token (hex), for the proxy's next start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nudge: Option<String>,
}

/// A joined node: online, with every proxy it holds a tunnel to, or offline (no proxies) as it
/// was last seen (`last_seen`: when; its join if it never connected).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub host_id: String,
    pub node_name: String,
    pub version: String,
    pub labels: Labels,
    pub proxies: Vec<String>,
    pub transports: Vec<String>,
    /// Unix seconds.
    pub last_seen: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeList {
    pub nodes: Vec<NodeInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRemoveRequest {
    pub host_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRemoved {
    pub host_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Readiness {
    pub status: String,
    pub proxy_id: String,
}

/// The body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiErrorBody {
    pub error: ApiError,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    /// Stable, machine-readable: `token_not_found`, `token_expired`, `token_revoked`,
    /// `role_not_allowed`, `bad_request`, `payload_too_large`, `rate_limited`, `unauthorized`,
    /// `not_found`, `not_ready`, `internal`.
    pub code: String,
    /// One sentence for people.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_lists_parse_and_deduplicate() {
        assert_eq!(Role::parse_list("node").unwrap(), vec![Role::Node]);
        assert_eq!(
            Role::parse_list("proxy, node,node").unwrap(),
            vec![Role::Node, Role::Proxy]
        );
        assert!(Role::parse_list("").is_err());
        assert!(Role::parse_list("auth").unwrap_err().contains("\"auth\""));
    }

    #[test]
    fn labels_parse() {
        let l = parse_labels("env=prod, role = db ,,").unwrap();
        assert_eq!(l.get("env").map(String::as_str), Some("prod"));
        assert_eq!(l.get("role").map(String::as_str), Some("db"));
        assert!(parse_labels("novalue").is_err());
        assert!(parse_labels("bad key=v").is_err());
        assert!(parse_labels("").unwrap().is_empty());
    }

    #[test]
    fn join_request_rejects_unknown_fields_and_hides_the_token() {
        let err = serde_json::from_str::<JoinRequest>(
            r#"{"token":"t","node_name":"n","role":"node","ssh_public_key":"k","tls_csr":"c","x":1}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field"));
        let ok: JoinRequest = serde_json::from_str(
            r#"{"token":"s3cret","node_name":"n","role":"node","ssh_public_key":"k","tls_csr":"c"}"#,
        )
        .unwrap();
        assert!(!format!("{ok:?}").contains("s3cret"));
    }
}
