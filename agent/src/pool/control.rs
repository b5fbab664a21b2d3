//! The agent's side of a tunnel's control session, without I/O: what the answer to the hello
//! means, and, once welcomed, what each message from the proxy asks for (a new proxy list, the
//! end of the tunnel). [`super::run_tunnel`] drives it.
//!
//! An idle control session is silent: keep-alives and noticing a dead proxy belong to the
//! transport ([`burrow_tunnel::Keepalive`]), and the node speaks only when its labels change.

use std::time::Duration;

use tunnel_proto::api::Labels;
use tunnel_proto::wire::{
    Heartbeat, Hello, Message, NodeCertificates, PROTOCOL_VERSION, ProxyEntry, Trust, Welcome,
};

use super::membership::{DialFailure, MAX_RECONNECT_AFTER};
use crate::telemetry::Disconnect;

/// The first message of a tunnel; `keepalive`: the interval this tunnel's transport uses;
/// `trust_updates`: the agent follows CA rotations ([`Message::Trust`]).
pub fn hello(
    host_id: &str,
    node_name: &str,
    labels: Labels,
    keepalive: Duration,
    trust_updates: bool,
) -> Message {
    Message::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        version: tunnel_proto::VERSION.to_string(),
        host_id: host_id.to_string(),
        node_name: node_name.to_string(),
        labels,
        keepalive_ms: Some(keepalive.as_millis().try_into().unwrap_or(u64::MAX)),
        trust_updates,
    })
}

/// A heartbeat: what the node says about itself when its labels change.
pub fn heartbeat(node_name: &str, labels: Labels) -> Message {
    Message::Heartbeat(Heartbeat {
        node_name: node_name.to_string(),
        labels,
        version: tunnel_proto::VERSION.to_string(),
    })
}

/// What the proxy's answer to the hello means (`None`: the stream ended).
pub fn answer_to_hello(answer: Option<Message>) -> Result<Welcome, DialFailure> {
    match answer {
        Some(Message::Welcome(welcome)) if welcome.protocol == PROTOCOL_VERSION => Ok(welcome),
        Some(Message::Welcome(welcome)) => Err(DialFailure::Failed(format!(
            "the proxy welcomed tunnel protocol {}, this agent speaks {PROTOCOL_VERSION}",
            welcome.protocol
        ))),
        Some(Message::Goodbye { reason, code }) => Err(DialFailure::Refused { code, reason }),
        other => Err(DialFailure::Failed(format!(
            "unexpected answer to hello: {}",
            other.as_ref().map_or("end of stream", Message::kind)
        ))),
    }
}

/// A proxy's return window, within the bound the agent accepts.
fn window(ms: u64) -> Duration {
    Duration::from_millis(ms).min(MAX_RECONNECT_AFTER)
}

/// Why the agent ends a tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The proxy asked the agent to come back later (it is restarting).
    Reconnect { reason: String, after: Duration },
    /// The proxy closed the tunnel.
    Goodbye { reason: String },
    /// The proxy sent what it never sends on a control stream.
    Unexpected { kind: &'static str },
}

impl End {
    /// The proxy's reconnect advisory, if it gave one.
    pub fn reconnect_after(&self) -> Option<Duration> {
        match self {
            End::Reconnect { after, .. } => Some(*after),
            _ => None,
        }
    }

    /// Why the tunnel ended, as the agent's metrics count it.
    pub fn disconnect(&self) -> Disconnect {
        match self {
            End::Reconnect { .. } => Disconnect::ReconnectAdvised,
            End::Goodbye { .. } => Disconnect::ClosedByProxy,
            End::Unexpected { .. } => Disconnect::ProtocolError,
        }
    }
}

/// What a message from the proxy asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Nothing,
    /// A new list of live proxies, for the pool.
    Proxies(Vec<ProxyEntry>),
    /// The answer to a renewal request.
    Renewed {
        certificates: Option<NodeCertificates>,
        error: Option<String>,
    },
    /// The CAs to trust from now on (a CA rotation moved).
    Trust(Trust),
    /// The proxy's answer about a recording.
    RecordingAck {
        session_id: String,
        size: u64,
        stored: bool,
        error: Option<String>,
    },
    End(End),
}

/// An open control session on the agent's side.
pub struct AgentControl {
    node_name: String,
    return_window: Option<Duration>,
}

impl AgentControl {
    /// A session the proxy welcomed with `welcome`.
    pub fn new(node_name: &str, welcome: &Welcome) -> Self {
        Self {
            node_name: node_name.to_string(),
            return_window: welcome.return_window_ms.map(window),
        }
    }

    /// The window the proxy last asked its agents to spread their return over.
    pub fn return_window(&self) -> Option<Duration> {
        self.return_window
    }

    pub fn handle_message(&mut self, msg: Message) -> Step {
        match msg {
            // The answer to a ping from before keep-alives moved to the transport.
            Message::Pong { .. } => Step::Nothing,
            Message::Proxies {
                proxies,
                return_window_ms,
            } => {
                if let Some(ms) = return_window_ms {
                    self.return_window = Some(window(ms));
                }
                Step::Proxies(proxies)
            }
            Message::Reconnect { reason, after_ms } => Step::End(End::Reconnect {
                reason,
                after: Duration::from_millis(after_ms).min(MAX_RECONNECT_AFTER),
            }),
            Message::Goodbye { reason, .. } => Step::End(End::Goodbye { reason }),
            Message::Renewed {
                certificates,
                error,
            } => Step::Renewed {
                certificates,
                error,
            },
            Message::Trust(trust) => Step::Trust(trust),
            Message::RecordingAck {
                session_id,
                size,
                stored,
                error,
            } => Step::RecordingAck {
                session_id,
                size,
                stored,
                error,
            },
            other => Step::End(End::Unexpected { kind: other.kind() }),
        }
    }

    /// The labels changed: the heartbeat that says so.
    pub fn labels_changed(&self, labels: Labels) -> Message {
        heartbeat(&self.node_name, labels)
    }
}

#[cfg(test)]
mod tests {
    use tunnel_proto::wire::Refusal;

    use super::*;

    fn welcome_of(protocol: u16) -> Welcome {
        Welcome {
            protocol,
            version: "9.9.9".into(),
            proxy_id: "p1".into(),
            proxies: vec![ProxyEntry { id: "p1".into() }],
            return_window_ms: Some(2048),
            nudge_token: None,
            renewal: false,
            recording: None,
        }
    }

    fn welcome(protocol: u16) -> Message {
        Message::Welcome(welcome_of(protocol))
    }

    #[test]
    fn the_answer_to_hello_is_a_welcome_a_typed_refusal_or_a_failure() {
        assert_eq!(
            answer_to_hello(Some(welcome(PROTOCOL_VERSION)))
                .unwrap()
                .proxy_id,
            "p1"
        );
        assert_eq!(
            answer_to_hello(Some(Message::refusal(
                Refusal::Revoked,
                "node x was removed"
            ))),
            Err(DialFailure::Refused {
                code: Some(Refusal::Revoked),
                reason: "node x was removed".into()
            })
        );
        assert_eq!(
            answer_to_hello(Some(Message::refusal(
                Refusal::UnsupportedVersion,
                "v2 only"
            ))),
            Err(DialFailure::Refused {
                code: Some(Refusal::UnsupportedVersion),
                reason: "v2 only".into()
            })
        );
        // A welcome in another protocol version is not a tunnel this agent can use.
        let Err(DialFailure::Failed(why)) = answer_to_hello(Some(welcome(PROTOCOL_VERSION + 1)))
        else {
            panic!("a welcome in another version was taken");
        };
        assert!(why.contains("protocol"), "{why}");
        assert_eq!(
            answer_to_hello(None),
            Err(DialFailure::Failed(
                "unexpected answer to hello: end of stream".into()
            ))
        );
        assert_eq!(
            answer_to_hello(Some(Message::Ping { seq: 1 })),
            Err(DialFailure::Failed(
                "unexpected answer to hello: ping".into()
            ))
        );
    }

    #[test]
    fn proxy_messages_feed_the_pool_or_end_the_tunnel() {
        let mut c = AgentControl::new("n1", &welcome_of(PROTOCOL_VERSION));
        assert_eq!(c.handle_message(Message::Pong { seq: 1 }), Step::Nothing);
        let list = vec![ProxyEntry { id: "p2".into() }];
        let update = Message::Proxies {
            proxies: list.clone(),
            return_window_ms: None,
        };
        assert_eq!(c.handle_message(update), Step::Proxies(list.clone()));
        // The window comes with the welcome, and later updates replace it (capped at a minute).
        assert_eq!(c.return_window(), Some(Duration::from_millis(2048)));
        let update = Message::Proxies {
            proxies: list,
            return_window_ms: Some(u64::MAX),
        };
        c.handle_message(update);
        assert_eq!(c.return_window(), Some(MAX_RECONNECT_AFTER));
        let Step::End(end) = c.handle_message(Message::Reconnect {
            reason: "restart".into(),
            after_ms: 1500,
        }) else {
            panic!("a reconnect advisory must end the tunnel");
        };
        assert_eq!(end.reconnect_after(), Some(Duration::from_millis(1500)));
        // A huge advisory is capped.
        let Step::End(end) = c.handle_message(Message::Reconnect {
            reason: "later".into(),
            after_ms: u64::MAX,
        }) else {
            panic!()
        };
        assert_eq!(end.reconnect_after(), Some(MAX_RECONNECT_AFTER));
        assert_eq!(
            c.handle_message(Message::goodbye("bye")),
            Step::End(End::Goodbye {
                reason: "bye".into()
            })
        );
        assert_eq!(
            c.handle_message(welcome(PROTOCOL_VERSION)),
            Step::End(End::Unexpected { kind: "welcome" })
        );
    }

    #[test]
    fn the_node_speaks_only_when_its_labels_change_and_says_its_keepalive() {
        let c = AgentControl::new("n1", &welcome_of(PROTOCOL_VERSION));
        let mut labels = Labels::new();
        labels.insert("env".into(), "prod".into());
        let Message::Heartbeat(hb) = c.labels_changed(labels.clone()) else {
            panic!()
        };
        assert_eq!(hb.labels.get("env").map(String::as_str), Some("prod"));
        assert_eq!(hb.node_name, "n1");
        let Message::Hello(h) = hello("h1", "n1", labels, Duration::from_secs(25), true) else {
            panic!()
        };
        assert_eq!(h.keepalive_ms, Some(25_000));
    }
}
