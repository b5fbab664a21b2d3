//! Tunnel wire messages and their codec. No I/O and no clock: tested without sockets.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of JSON, one [`Message`].
//! Frames are capped at [`MAX_FRAME`]; [`decode`] tells "need more bytes" (`Ok(None)`) apart from
//! "invalid" (`Err`), never panics and never allocates more than the cap, whatever the peer sends.
//!
//! The control stream (the first stream of a tunnel, opened by the agent) starts with
//! [`Hello`] from the agent and [`Welcome`] from the proxy; both carry [`PROTOCOL_VERSION`].
//! A dial stream (opened by the proxy) starts with a [`DialRequest`] and a [`DialResult`], then
//! carries raw bytes.

use serde::{Deserialize, Serialize};

use crate::api::Labels;

/// The tunnel protocol version; a peer speaking another is refused with [`Message::Goodbye`].
pub const PROTOCOL_VERSION: u16 = 1;
/// ALPN of tunnels, on TCP (TLS + yamux) and QUIC alike.
pub const ALPN_TUNNEL: &[u8] = b"burrow-tunnel/1";
/// Largest frame accepted or produced, length prefix excluded.
pub const MAX_FRAME: usize = 64 * 1024;
const HEADER: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Agent -> proxy, first on the control stream.
    Hello(Hello),
    /// Proxy -> agent, the answer to `Hello`.
    Welcome(Welcome),
    /// Proxy -> agent, whenever the set of live proxies or the return window changes.
    Proxies {
        proxies: Vec<ProxyEntry>,
        /// See [`Welcome::return_window_ms`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        return_window_ms: Option<u64>,
    },
    /// Agent -> proxy, periodically.
    Heartbeat(Heartbeat),
    Ping {
        seq: u64,
    },
    Pong {
        seq: u64,
    },
    /// Proxy -> agent, first on a dial stream.
    Dial(DialRequest),
    /// Agent -> proxy, the answer to `Dial`; raw bytes follow when `error` is `None`.
    DialResult {
        error: Option<String>,
    },
    /// Proxy -> agent: this proxy is going away; reconnect after about `after_ms`.
    Reconnect {
        reason: String,
        after_ms: u64,
    },
    /// Agent -> proxy: an audit event (session start and end, exec, failed login).
    Audit(AuditEvent),
    /// Either way: the sender closes the tunnel, and says why; a proxy's refusal also says it
    /// in a form the agent acts on.
    Goodbye {
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<Refusal>,
    },
    /// Agent -> proxy (only if the welcome said [`Welcome::renewal`]): new certificates for the
    /// node, for the TLS key of this tunnel's certificate and this SSH host key. Who the node is
    /// comes from the tunnel's certificate, not from the request.
    Renew {
        ssh_public_key: String,
    },
    /// Proxy -> agent (only if the hello said [`Hello::trust_updates`]), after the welcome and
    /// whenever a CA rotation changes it: the CAs the node trusts from now on.
    Trust(Trust),
    /// Agent -> proxy (only if the welcome said [`Welcome::recording`]).
    Recording(RecordingChunk),
    /// Proxy -> agent, the answer to `Recording`: how many bytes of it the proxy holds (the
    /// agent goes on from there), whether it is complete and stored, or why it was refused (the
    /// agent drops it).
    RecordingAck {
        session_id: String,
        size: u64,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        stored: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// Proxy -> agent, the answer to `Renew`: both certificates, or why not.
    Renewed {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        certificates: Option<NodeCertificates>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

/// What a node trusts: the cluster's CAs, more than one of a kind while one rotates. The first
/// host CA certificate is the one that signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trust {
    /// PEM.
    pub host_ca_certs: Vec<String>,
    /// OpenSSH public keys of the host SSH CAs.
    pub host_ca_ssh: Vec<String>,
    /// OpenSSH public keys of the user SSH CAs.
    pub user_ca_ssh: Vec<String>,
    /// The node's certificates are not from the CA that signs now: renew them at once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub renew_now: bool,
}

/// A node's certificates, as a join or a renewal issues them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCertificates {
    /// PEM, signed by the host CA.
    pub tls_cert: String,
    /// OpenSSH host certificate.
    pub ssh_cert: String,
}

/// Why a proxy refuses or ends a tunnel, for the agent to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// The node was removed from the cluster: its identity will not be accepted again.
    Revoked,
    /// The agent speaks a tunnel protocol version this proxy does not.
    UnsupportedVersion,
    /// The proxy takes no more from this node for now (it holds too many tunnels).
    Overloaded,
    /// The proxy is going away; another one (or this one, restarted) will take the tunnel.
    ShuttingDown,
    /// The agent broke the protocol (a hello for another host, a flood of messages).
    Protocol,
    /// A reason this build does not know (from a newer proxy): treated as passing.
    #[serde(other)]
    Unknown,
}

impl Refusal {
    /// Whether retrying can never help.
    pub fn is_permanent(self) -> bool {
        matches!(self, Refusal::Revoked)
    }
}

impl Message {
    /// A goodbye that only says why.
    pub fn goodbye(reason: impl Into<String>) -> Self {
        Message::Goodbye {
            reason: reason.into(),
            code: None,
        }
    }

    /// A proxy's refusal, typed.
    pub fn refusal(code: Refusal, reason: impl Into<String>) -> Self {
        Message::Goodbye {
            reason: reason.into(),
            code: Some(code),
        }
    }

    /// The message's type, as on the wire: safe to log (no peer-chosen text).
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Welcome(_) => "welcome",
            Message::Proxies { .. } => "proxies",
            Message::Heartbeat(_) => "heartbeat",
            Message::Ping { .. } => "ping",
            Message::Pong { .. } => "pong",
            Message::Dial(_) => "dial",
            Message::DialResult { .. } => "dial_result",
            Message::Reconnect { .. } => "reconnect",
            Message::Audit(_) => "audit",
            Message::Goodbye { .. } => "goodbye",
            Message::Renew { .. } => "renew",
            Message::Renewed { .. } => "renewed",
            Message::Trust(_) => "trust",
            Message::Recording(_) => "recording",
            Message::RecordingAck { .. } => "recording_ack",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u16,
    pub version: String,
    pub host_id: String,
    pub node_name: String,
    pub labels: Labels,
    /// How often the agent sends keep-alives on this tunnel when idle: the proxy probes a TCP
    /// tunnel at the same interval instead of its own (an older agent sends none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_ms: Option<u64>,
    /// The agent takes [`Message::Trust`] updates (an older agent would end the tunnel on one).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub trust_updates: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol: u16,
    pub version: String,
    /// The proxy this tunnel reached.
    pub proxy_id: String,
    /// Every live proxy of the cluster, this one included.
    pub proxies: Vec<ProxyEntry>,
    /// How long this proxy's agents should spread their return over when they lose it without
    /// an advisory (it crashed): each waits a random part of it, so a restarted proxy takes its
    /// fleet back at a rate it can handshake. Grows with the tunnels it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub return_window_ms: Option<u64>,
    /// For a QUIC tunnel: the token (hex) of the datagram a restarted proxy sends the agent so
    /// that it reconnects at once (the tunnel crate's `nudge` module).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nudge_token: Option<String>,
    /// This proxy renews node certificates over the tunnel ([`Message::Renew`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub renewal: bool,
    /// Which sessions the node records and sends to the proxy ([`Message::Recording`]); none:
    /// the proxy takes no recordings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recording: Option<RecordingMode>,
}

/// Which SSH sessions a node records (the proxy's `session_recording:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordingMode {
    /// Shells and commands (not file transfers).
    All,
    /// Sessions with a terminal only.
    Pty,
    Off,
}

/// Agent -> proxy: a piece of a session recording (asciicast v2 text, whole lines), at `offset`
/// in its file. The last one carries `end`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordingChunk {
    pub session_id: String,
    pub offset: u64,
    pub data: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<RecordingEnd>,
}

/// What a finished recording was: the node's account of its session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordingEnd {
    /// The user's certificate key id.
    pub user: String,
    pub login: String,
    /// `shell` or `exec`.
    pub kind: String,
    /// Unix milliseconds.
    pub started: u64,
    pub ended: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ProxyEntry {
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node_name: String,
    pub labels: Labels,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DialRequest {
    /// The node port the user asked for (3022: the node's SSH service).
    pub port: u16,
    /// Who the proxy dials for, for the node's audit log.
    pub client_addr: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// `session.start`, `session.end`, `exec`, `auth.failure`, ...
    pub event: String,
    /// Unix milliseconds.
    pub time: u64,
    #[serde(default)]
    pub fields: Labels,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("frame of {0} bytes is larger than the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("invalid message: {0}")]
    Invalid(String),
}

/// Appends `msg` as one frame to `out`.
pub fn encode(msg: &Message, out: &mut Vec<u8>) -> Result<(), WireError> {
    let body = serde_json::to_vec(msg).map_err(|e| WireError::Invalid(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(WireError::TooLarge(body.len()));
    }
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(())
}

/// Decodes the first frame in `buf`: `Ok(Some((message, bytes used)))`, `Ok(None)` if `buf`
/// holds only part of a frame, `Err` if the frame is too large or not a valid message.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, WireError> {
    let Some(header) = buf.get(..HEADER) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(header.try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    let Some(body) = buf.get(HEADER..HEADER + len) else {
        return Ok(None);
    };
    let msg = serde_json::from_slice(body).map_err(|e| WireError::Invalid(e.to_string()))?;
    Ok(Some((msg, HEADER + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello(Hello {
                protocol: PROTOCOL_VERSION,
                version: "0.1.0".into(),
                host_id: "h".into(),
                node_name: "pi".into(),
                labels: Labels::from([("env".into(), "lab".into())]),
                keepalive_ms: Some(25_000),
                trust_updates: true,
            }),
            Message::Welcome(Welcome {
                protocol: PROTOCOL_VERSION,
                version: "0.1.0".into(),
                proxy_id: "p1".into(),
                proxies: vec![
                    ProxyEntry { id: "p1".into() },
                    ProxyEntry { id: "p2".into() },
                ],
                return_window_ms: None,
                nudge_token: Some("00112233445566778899aabbccddeeff".into()),
                renewal: true,
                recording: Some(RecordingMode::All),
            }),
            Message::Proxies {
                proxies: vec![],
                return_window_ms: Some(1500),
            },
            Message::Heartbeat(Heartbeat {
                node_name: "pi".into(),
                labels: Labels::new(),
                version: "0.1.0".into(),
            }),
            Message::Ping { seq: 7 },
            Message::Pong { seq: u64::MAX },
            Message::Dial(DialRequest {
                port: 3022,
                client_addr: "127.0.0.1:5".into(),
            }),
            Message::DialResult {
                error: Some("no".into()),
            },
            Message::Reconnect {
                reason: "shutdown".into(),
                after_ms: 500,
            },
            Message::Audit(AuditEvent {
                event: "exec".into(),
                time: 1,
                fields: Labels::new(),
            }),
            Message::goodbye("bye"),
            Message::refusal(Refusal::Revoked, "removed"),
            Message::Renew {
                ssh_public_key: "ssh-ed25519 AAAA".into(),
            },
            Message::Renewed {
                certificates: Some(NodeCertificates {
                    tls_cert: "-----BEGIN CERTIFICATE-----".into(),
                    ssh_cert: "ssh-ed25519-cert-v01@openssh.com AAAA".into(),
                }),
                error: None,
            },
            Message::Renewed {
                certificates: None,
                error: Some("revoked".into()),
            },
        ]
    }

    #[test]
    fn every_message_round_trips_even_split_byte_by_byte() {
        let mut stream = Vec::new();
        for m in samples() {
            encode(&m, &mut stream).unwrap();
        }
        // Whole buffer: frames come out in order.
        let mut at = 0;
        for m in samples() {
            let (got, used) = decode(&stream[at..]).unwrap().unwrap();
            assert_eq!(got, m);
            at += used;
        }
        assert_eq!(at, stream.len());
        // Every prefix of the first frame is "need more bytes", never an error.
        let (_, first) = decode(&stream).unwrap().unwrap();
        for cut in 0..first {
            assert_eq!(decode(&stream[..cut]).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn oversized_and_garbage_frames_are_invalid_not_pending() {
        let mut big = (MAX_FRAME as u32 + 1).to_be_bytes().to_vec();
        assert_eq!(decode(&big), Err(WireError::TooLarge(MAX_FRAME + 1)));
        big = u32::MAX.to_be_bytes().to_vec();
        assert!(matches!(decode(&big), Err(WireError::TooLarge(_))));
        let mut garbage = 5u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(b"\xff\x00{]x");
        assert!(matches!(decode(&garbage), Err(WireError::Invalid(_))));
        let mut unknown = Vec::new();
        let body = br#"{"type":"launch_missiles"}"#;
        unknown.extend_from_slice(&(body.len() as u32).to_be_bytes());
        unknown.extend_from_slice(body);
        assert!(matches!(decode(&unknown), Err(WireError::Invalid(_))));
    }

    #[test]
    fn encode_refuses_what_decode_would_refuse() {
        let huge = Message::goodbye("x".repeat(MAX_FRAME));
        let mut out = Vec::new();
        assert!(matches!(
            encode(&huge, &mut out),
            Err(WireError::TooLarge(_))
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn refusals_are_typed_and_unknown_codes_still_parse() {
        let text = br#"{"type":"goodbye","reason":"r","code":"revoked"}"#;
        let msg: Message = serde_json::from_slice(text).unwrap();
        assert_eq!(msg, Message::refusal(Refusal::Revoked, "r"));
        let newer = br#"{"type":"goodbye","reason":"r","code":"from_the_future"}"#;
        let msg: Message = serde_json::from_slice(newer).unwrap();
        assert_eq!(msg, Message::refusal(Refusal::Unknown, "r"));
        // An older proxy's goodbye has no code.
        let older: Message = serde_json::from_slice(br#"{"type":"goodbye","reason":"r"}"#).unwrap();
        assert_eq!(older, Message::goodbye("r"));
        assert!(Refusal::Revoked.is_permanent() && !Refusal::Overloaded.is_permanent());
    }

    #[test]
    fn the_return_window_is_optional_both_ways() {
        // From an older proxy: no window; an older agent ignores the field it does not know.
        let older: Message =
            serde_json::from_slice(br#"{"type":"proxies","proxies":[{"id":"p"}]}"#).unwrap();
        let Message::Proxies {
            return_window_ms, ..
        } = older
        else {
            panic!("{older:?}")
        };
        assert_eq!(return_window_ms, None);
        let mut out = Vec::new();
        encode(
            &Message::Proxies {
                proxies: vec![],
                return_window_ms: None,
            },
            &mut out,
        )
        .unwrap();
        assert!(!String::from_utf8_lossy(&out).contains("return_window"));
    }
}
