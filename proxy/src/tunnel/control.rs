//! The proxy's side of a tunnel's control session, without I/O: whether a hello is admitted
//! ([`admit`]), and, once welcomed, what each message from the node and each tick of the clock
//! ask for ([`ProxyControl`]): a pong, a presence write, an audit line, or the end of the tunnel
//! with a typed reason ([`TunnelError`]). [`super::TunnelServer`] drives it with the tunnel's
//! streams, the backend and timers.

use std::time::{Duration, Instant};

use burrow_tunnel::FrameError;
use tunnel_proto::api::{Labels, Presence};
use tunnel_proto::wire::{
    AuditEvent, Hello, Message, PROTOCOL_VERSION, ProxyEntry, RecordingChunk, Refusal,
};

use crate::nodelimits::{self, NodeBudget, PRESENCE_MIN_INTERVAL, short};

/// Presence is rewritten this often while the tunnel is up, whether or not the node says
/// anything: an idle agent sends no messages, and its tunnel's transport (keep-alives, idle
/// timeout) is what says it is still there.
pub const PRESENCE_REFRESH: Duration = Duration::from_secs(30);
/// How long a node is told to wait before it comes back to a proxy that shuts down.
pub const RECONNECT_AFTER_SHUTDOWN: Duration = Duration::from_secs(1);

/// How many returning agents a second a proxy plans for, per core, when it asks its fleet to
/// spread out, by transport (its runtime has a worker per core, and handshakes run on all of
/// them). Measured (BENCHMARKS.md) on one 2-core machine that also ran the returning agents:
/// TCP: 10,000 agents back in 5.5 s unpaced, nothing refused. QUIC costs more a return (its
/// packets wake more tasks, and a lost Initial waits a second to be sent again): 10,000 QUIC
/// agents asked to return within 4 s overflowed the proxy's socket buffer (49,181 datagrams
/// dropped, 305 handshakes timed out, all back in 25.7 s), within 8 s still (15,846, 23.1 s),
/// within 16 s not at all (all back in 17.3 s). Rounding the window up to a power of two makes
/// the rate between half this and this.
const TCP_RETURN_RATE_PER_CORE: u64 = 2000;
const QUIC_RETURN_RATE_PER_CORE: u64 = 500;
/// The most cores the rates are counted for: beyond 4 (twice what was measured), the one socket
/// that takes every QUIC datagram and its receive buffer are untested.
const MAX_RETURN_CORES: u64 = 4;
/// The longest return window a proxy asks for.
const MAX_RETURN_WINDOW: Duration = Duration::from_secs(60);

/// The window a proxy with `cores` cores, holding `streams` TLS-over-TCP tunnels (TCP and
/// upgrade) and `quic` QUIC tunnels, asks its agents to spread their return over if they lose
/// it without an advisory: long enough that they come back at no more than
/// [`TCP_RETURN_RATE_PER_CORE`] and [`QUIC_RETURN_RATE_PER_CORE`] a second per core (counting
/// 1 to [`MAX_RETURN_CORES`]), rounded up to a power of two of milliseconds so that it changes
/// (and is pushed) rarely.
pub fn return_window(streams: usize, quic: usize, cores: usize) -> Duration {
    let cores = (cores as u64).clamp(1, MAX_RETURN_CORES);
    let tcp_ms = (streams as u64).saturating_mul(1000) / (TCP_RETURN_RATE_PER_CORE * cores);
    let quic_ms = (quic as u64).saturating_mul(1000) / (QUIC_RETURN_RATE_PER_CORE * cores);
    let ms = tcp_ms.saturating_add(quic_ms);
    Duration::from_millis(ms.max(1).next_power_of_two()).min(MAX_RETURN_WINDOW)
}

/// The cores [`return_window`] counts on this machine.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Why a tunnel was refused or ended, other than by a clean close.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("{0}")]
    Identity(&'static str),
    #[error("the client certificate cannot be read: {0}")]
    BadCertificate(String),
    #[error("no control stream")]
    NoControlStream,
    #[error("no hello")]
    NoHello,
    #[error("expected hello, got {0}")]
    NotHello(&'static str),
    #[error("bad hello: {0}")]
    BadHello(FrameError),
    /// Sent to the node as a typed refusal.
    #[error("{reason}")]
    Refused { code: Refusal, reason: String },
    #[error("the node floods its control stream")]
    Flood,
    #[error("the node keeps opening streams nobody asked for")]
    UnwantedStreams,
    #[error("the node sent nothing for {}s (its pings stopped)", .0.as_secs())]
    Silent(Duration),
    #[error("unexpected {0} message on the control stream")]
    Unexpected(&'static str),
    #[error("bad message: {0}")]
    Frame(#[from] FrameError),
}

impl TunnelError {
    fn refused(code: Refusal, reason: String) -> Self {
        TunnelError::Refused { code, reason }
    }

    /// The metrics' label for a tunnel refused before admission with this error.
    pub fn refusal_label(&self) -> &'static str {
        match self {
            TunnelError::Identity(_) | TunnelError::BadCertificate(_) => "bad_identity",
            TunnelError::Refused { code, .. } => match code {
                Refusal::Revoked => "revoked",
                Refusal::Overloaded => "over_limit",
                Refusal::ShuttingDown => "shutting_down",
                Refusal::UnsupportedVersion => "unsupported_version",
                Refusal::Protocol | Refusal::Unknown => "bad_hello",
            },
            _ => "bad_hello",
        }
    }

    /// The metrics' label for an admitted tunnel that ended with this error.
    pub fn disconnect_label(&self) -> &'static str {
        match self {
            TunnelError::Flood | TunnelError::UnwantedStreams => "flood",
            TunnelError::Silent(_) => "silent",
            _ => "protocol_error",
        }
    }
}

/// What the proxy knows about a node when its hello arrives.
pub struct Facts<'a> {
    /// The host id the node's certificate names (the tunnel is bound to it).
    pub host_id: &'a str,
    pub revoked: bool,
    pub shutting_down: bool,
    /// Tunnels this node already holds to this proxy.
    pub held: usize,
}

/// Admits a hello, or says which typed refusal it gets. Returns the labels to record: labels
/// over the node's limits are ignored, not refused.
pub fn admit(hello: &Hello, facts: &Facts<'_>) -> Result<Labels, TunnelError> {
    let host_id = facts.host_id;
    if facts.revoked {
        let reason = format!("node {host_id} was removed from the cluster");
        return Err(TunnelError::refused(Refusal::Revoked, reason));
    }
    if facts.shutting_down {
        let reason = "the proxy is shutting down".to_string();
        return Err(TunnelError::refused(Refusal::ShuttingDown, reason));
    }
    if hello.protocol != PROTOCOL_VERSION {
        let reason = format!(
            "tunnel protocol {} is not supported (this proxy speaks {PROTOCOL_VERSION})",
            hello.protocol
        );
        return Err(TunnelError::refused(Refusal::UnsupportedVersion, reason));
    }
    // The tunnel is bound to the host id in the certificate, whatever the hello says.
    if hello.host_id != host_id {
        let reason = "the hello names another host than the certificate".to_string();
        return Err(TunnelError::refused(Refusal::Protocol, reason));
    }
    if facts.held >= nodelimits::MAX_TUNNELS_PER_NODE {
        let reason = format!(
            "node {host_id} already holds {} tunnels to this proxy",
            facts.held
        );
        return Err(TunnelError::refused(Refusal::Overloaded, reason));
    }
    match nodelimits::check_labels(&hello.labels) {
        Ok(()) => Ok(hello.labels.clone()),
        Err(why) => {
            tracing::warn!(%host_id, %why, "the node's labels are ignored");
            Ok(Labels::new())
        }
    }
}

/// What a message from the node asks the proxy to do.
#[derive(Debug, PartialEq)]
pub enum Action {
    Nothing,
    Send(Message),
    /// Record the node's presence (see [`ProxyControl::presence`]).
    WritePresence,
    /// Append an event (already sanitized) to the audit log.
    Audit(AuditEvent),
    /// The node said goodbye: end the tunnel cleanly.
    Close,
    /// Sign the node's certificates again, for this SSH host key (and the tunnel's TLS key).
    Renew {
        ssh_public_key: String,
    },
    /// Store a piece of a session recording, after `wait` (the node's recording rate).
    Recording {
        chunk: RecordingChunk,
        wait: Duration,
    },
}

/// An OpenSSH public key line is a few hundred bytes; anything longer is not one.
fn short_key(key: String) -> String {
    if key.len() > 4096 { String::new() } else { key }
}

/// The least time between two renewals one tunnel may ask for: each costs two signatures.
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

/// An open control session on the proxy's side.
pub struct ProxyControl {
    presence: Presence,
    budget: NodeBudget,
    last_written: Instant,
    /// The node said something the presence record does not show yet.
    dirty: bool,
    last_renewal: Option<Instant>,
    /// When the node last said something on the control stream.
    last_heard: Instant,
    /// A tunnel whose node pings ([`burrow_tunnel::Transport::pings`]): how long it may stay
    /// silent before it counts as gone.
    silence_limit: Option<Duration>,
}

impl ProxyControl {
    /// A session whose presence was just written; `silence_limit`: see [`Self::silent`].
    pub fn new(presence: Presence, now: Instant, silence_limit: Option<Duration>) -> Self {
        Self {
            presence,
            budget: NodeBudget::new(now),
            last_written: now,
            dirty: false,
            last_renewal: None,
            last_heard: now,
            silence_limit,
        }
    }

    /// The node was heard from at `at` (bytes on any stream of its tunnel).
    pub fn heard(&mut self, at: Instant) {
        self.last_heard = self.last_heard.max(at);
    }

    /// Whether the node of a tunnel that pings has said nothing for longer than it may.
    pub fn silent(&self, now: Instant) -> Option<Duration> {
        self.silence_limit
            .filter(|limit| now.duration_since(self.last_heard) > *limit)
    }

    /// When the driver must look at the clock again: the presence record's next write
    /// ([`Self::poll_timeout`]) or the end of the silence a pinging node may keep.
    pub fn wake_at(&self) -> Instant {
        let presence = self.poll_timeout();
        match self.silence_limit {
            Some(limit) => presence.min(self.last_heard + limit + Duration::from_millis(1)),
            None => presence,
        }
    }

    /// The node's name, from its certificate.
    pub fn node_name(&self) -> &str {
        &self.presence.node_name
    }

    /// The presence record to write, stamped `last_seen` (Unix seconds).
    pub fn presence(&mut self, last_seen: u64) -> &Presence {
        self.presence.last_seen = last_seen;
        &self.presence
    }

    /// The node's host id, from its certificate.
    pub fn host_id(&self) -> &str {
        &self.presence.host_id
    }

    pub fn handle_message(&mut self, now: Instant, msg: Message) -> Result<Action, TunnelError> {
        self.last_heard = now;
        // Recordings have a rate of their own (paced, not refused): a long one is many chunks.
        if let Message::Recording(chunk) = msg {
            let wait = self.budget.recording(now);
            return Ok(Action::Recording { chunk, wait });
        }
        if !self.budget.message(now) {
            return Err(TunnelError::Flood);
        }
        let host_id = &self.presence.host_id;
        match msg {
            // Agents ping on upgraded tunnels (and did on every tunnel before keep-alives moved
            // to the transport).
            Message::Ping { seq } => Ok(Action::Send(Message::Pong { seq })),
            Message::Heartbeat(hb) => {
                // The name is the certificate's; a heartbeat cannot rename the node.
                match nodelimits::check_labels(&hb.labels) {
                    Ok(()) if hb.labels != self.presence.labels => {
                        self.presence.labels = hb.labels;
                        self.dirty = true;
                    }
                    Ok(()) => {}
                    Err(why) => tracing::debug!(%host_id, %why, "heartbeat labels ignored"),
                }
                let version = short(&hb.version);
                if version != self.presence.version {
                    self.presence.version = version;
                    self.dirty = true;
                }
                // Backend writes a node causes are bounded, whatever it sends: a change within
                // the interval is written when it ends (see `poll`).
                if self.poll(now) {
                    return Ok(Action::WritePresence);
                }
                Ok(Action::Nothing)
            }
            Message::Goodbye { reason, .. } => {
                tracing::debug!(reason = %short(&reason), "agent said goodbye");
                Ok(Action::Close)
            }
            Message::Audit(event) => {
                if !self.budget.audit(now) {
                    let dropped = self.budget.audit_dropped;
                    if dropped.is_power_of_two() {
                        tracing::warn!(%host_id, dropped, "audit events over the node's rate dropped");
                    }
                    return Ok(Action::Nothing);
                }
                Ok(nodelimits::sanitize_audit(event).map_or(Action::Nothing, Action::Audit))
            }
            Message::Renew { ssh_public_key } => {
                if self
                    .last_renewal
                    .is_some_and(|last| now.duration_since(last) < RENEW_EVERY)
                {
                    return Ok(Action::Send(Message::Renewed {
                        certificates: None,
                        error: Some(format!(
                            "renewals come at most every {}s",
                            RENEW_EVERY.as_secs()
                        )),
                    }));
                }
                self.last_renewal = Some(now);
                Ok(Action::Renew {
                    ssh_public_key: short_key(ssh_public_key),
                })
            }
            other => Err(TunnelError::Unexpected(other.kind())),
        }
    }

    /// The node opened a stream nobody asked for (the driver resets it).
    pub fn handle_unwanted_stream(&mut self) -> Result<(), TunnelError> {
        if self.budget.unexpected_stream() {
            Ok(())
        } else {
            Err(TunnelError::UnwantedStreams)
        }
    }

    /// When the presence record is next due: a change as soon as the write interval allows,
    /// else the refresh.
    pub fn poll_timeout(&self) -> Instant {
        self.last_written
            + if self.dirty {
                PRESENCE_MIN_INTERVAL
            } else {
                PRESENCE_REFRESH
            }
    }

    /// Whether the presence record is due at `now` ([`Self::poll_timeout`]); if so it counts
    /// as written.
    pub fn poll(&mut self, now: Instant) -> bool {
        if now < self.poll_timeout() {
            return false;
        }
        self.last_written = now;
        self.dirty = false;
        true
    }

    /// The cluster's live proxies or the return window changed: the update to push.
    pub fn proxies_changed(list: Vec<ProxyEntry>, return_window: Duration) -> Message {
        Message::Proxies {
            proxies: list,
            return_window_ms: Some(return_window.as_millis() as u64),
        }
    }

    /// The proxy is shutting down: the advisory that brings the node back elsewhere soon.
    pub fn shutting_down() -> Message {
        Message::Reconnect {
            reason: "the proxy is shutting down".into(),
            after_ms: RECONNECT_AFTER_SHUTDOWN.as_millis() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use tunnel_proto::wire::Heartbeat;

    use super::*;

    fn hello(host_id: &str, protocol: u16) -> Hello {
        Hello {
            protocol,
            version: "0.1.0".into(),
            host_id: host_id.into(),
            node_name: "n1".into(),
            labels: Labels::from([("env".to_string(), "prod".to_string())]),
            keepalive_ms: None,
            trust_updates: false,
        }
    }

    fn facts(host_id: &str) -> Facts<'_> {
        Facts {
            host_id,
            revoked: false,
            shutting_down: false,
            held: 0,
        }
    }

    fn code(r: Result<Labels, TunnelError>) -> Refusal {
        match r {
            Err(TunnelError::Refused { code, .. }) => code,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn hellos_are_admitted_or_refused_with_a_typed_reason() {
        let h = hello("h1", PROTOCOL_VERSION);
        assert_eq!(admit(&h, &facts("h1")).unwrap()["env"], "prod");
        let revoked = Facts {
            revoked: true,
            ..facts("h1")
        };
        assert_eq!(code(admit(&h, &revoked)), Refusal::Revoked);
        // A revoked node is told so whatever else is wrong with its hello.
        assert_eq!(
            code(admit(&hello("h2", PROTOCOL_VERSION + 1), &revoked)),
            Refusal::Revoked
        );
        let stopping = Facts {
            shutting_down: true,
            ..facts("h1")
        };
        assert_eq!(code(admit(&h, &stopping)), Refusal::ShuttingDown);
        let Err(TunnelError::Refused {
            code: refusal,
            reason,
        }) = admit(&hello("h1", PROTOCOL_VERSION + 1), &facts("h1"))
        else {
            panic!("another protocol version was admitted");
        };
        assert_eq!(refusal, Refusal::UnsupportedVersion);
        assert!(
            reason.contains(&format!("protocol {}", PROTOCOL_VERSION + 1)),
            "{reason}"
        );
        assert_eq!(
            code_of_other_host(),
            Refusal::Protocol,
            "a hello for another host than the certificate"
        );
        let full = Facts {
            held: nodelimits::MAX_TUNNELS_PER_NODE,
            ..facts("h1")
        };
        assert_eq!(code(admit(&h, &full)), Refusal::Overloaded);
        let one_less = Facts {
            held: nodelimits::MAX_TUNNELS_PER_NODE - 1,
            ..facts("h1")
        };
        assert!(admit(&h, &one_less).is_ok());
    }

    fn code_of_other_host() -> Refusal {
        code(admit(
            &hello("someone-else", PROTOCOL_VERSION),
            &facts("h1"),
        ))
    }

    #[test]
    fn labels_over_the_limits_are_ignored_not_refused() {
        let mut h = hello("h1", PROTOCOL_VERSION);
        h.labels.insert("bad\nkey".into(), "v".into());
        assert_eq!(admit(&h, &facts("h1")).unwrap(), Labels::new());
    }

    fn presence() -> Presence {
        Presence {
            host_id: "h1".into(),
            node_name: "n1".into(),
            version: "0.1.0".into(),
            labels: Labels::new(),
            proxy_id: "p1".into(),
            transport: "quic".into(),
            remote_addr: "127.0.0.1:1".into(),
            connected: 1,
            last_seen: 1,
            nudge: None,
        }
    }

    fn heartbeat(env: &str) -> Message {
        Message::Heartbeat(Heartbeat {
            node_name: "renamed".into(),
            labels: Labels::from([("env".to_string(), env.to_string())]),
            version: "0.1.0".into(),
        })
    }

    #[test]
    fn pings_are_answered_and_goodbyes_close() {
        let now = Instant::now();
        let mut c = ProxyControl::new(presence(), now, None);
        assert_eq!(
            c.handle_message(now, Message::Ping { seq: 7 }).unwrap(),
            Action::Send(Message::Pong { seq: 7 })
        );
        assert_eq!(
            c.handle_message(now, Message::goodbye("bye")).unwrap(),
            Action::Close
        );
        assert!(matches!(
            c.handle_message(now, Message::Pong { seq: 1 }),
            Err(TunnelError::Unexpected("pong"))
        ));
    }

    #[test]
    fn heartbeats_update_presence_at_most_every_few_seconds_and_never_rename_the_node() {
        let start = Instant::now();
        let mut c = ProxyControl::new(presence(), start, None);
        let at = |s: u64| start + Duration::from_secs(s);
        // Changed labels right after the last write: recorded, written once the interval passed.
        assert_eq!(
            c.handle_message(at(1), heartbeat("a")).unwrap(),
            Action::Nothing
        );
        let due = PRESENCE_MIN_INTERVAL.as_secs();
        assert_eq!(
            c.handle_message(at(due), heartbeat("b")).unwrap(),
            Action::WritePresence
        );
        let p = c.presence(42).clone();
        assert_eq!(p.labels["env"], "b");
        assert_eq!(p.node_name, "n1", "a heartbeat renamed the node");
        assert_eq!(p.last_seen, 42);
        // Nothing changed: the next write is the refresh.
        let mut writes = 0;
        for s in due + 1..=due + PRESENCE_REFRESH.as_secs() {
            writes += usize::from(
                c.handle_message(at(s), heartbeat("b")).unwrap() == Action::WritePresence,
            );
        }
        assert_eq!(writes, 1);
    }

    #[test]
    fn presence_of_a_silent_node_is_refreshed_and_a_late_change_written_when_due() {
        let start = Instant::now();
        let mut c = ProxyControl::new(presence(), start, None);
        // The node says nothing at all: presence is still rewritten every refresh.
        assert_eq!(c.poll_timeout(), start + PRESENCE_REFRESH);
        assert!(!c.poll(start + PRESENCE_REFRESH / 2));
        let refresh = start + PRESENCE_REFRESH;
        assert!(c.poll(refresh));
        assert!(!c.poll(refresh), "written twice for one refresh");
        assert_eq!(c.poll_timeout(), refresh + PRESENCE_REFRESH);
        // A label change right after a write waits for the interval, then is written by the
        // timer even if the node says nothing more.
        let soon = refresh + Duration::from_secs(1);
        assert_eq!(
            c.handle_message(soon, heartbeat("z")).unwrap(),
            Action::Nothing
        );
        assert_eq!(c.poll_timeout(), refresh + PRESENCE_MIN_INTERVAL);
        assert!(c.poll(c.poll_timeout()));
        assert_eq!(c.presence(7).labels["env"], "z");
    }

    #[test]
    fn a_flood_or_unwanted_streams_end_the_tunnel() {
        let now = Instant::now();
        let mut c = ProxyControl::new(presence(), now, None);
        let flooded = (0..100_000)
            .map(|seq| c.handle_message(now, Message::Ping { seq }))
            .find_map(Result::err);
        assert!(matches!(flooded, Some(TunnelError::Flood)), "{flooded:?}");
        let mut c = ProxyControl::new(presence(), now, None);
        let closed = (0..1000)
            .map(|_| c.handle_unwanted_stream())
            .find_map(Result::err);
        assert!(matches!(closed, Some(TunnelError::UnwantedStreams)));
    }

    #[test]
    fn the_return_window_grows_with_the_fleet_in_rare_steps() {
        // The rates were measured on 2 cores.
        let tcp = |n| return_window(n, 0, 2);
        assert_eq!(tcp(0), Duration::from_millis(1));
        assert_eq!(tcp(1000), Duration::from_millis(256));
        assert_eq!(tcp(10_000), Duration::from_millis(4096));
        assert_eq!(tcp(1_000_000), MAX_RETURN_WINDOW);
        // From 4,100 to 8,192 tunnels the window stays put: nothing is pushed.
        assert_eq!(tcp(4100), tcp(8192));
        let steps = (0..=10_000)
            .map(tcp)
            .collect::<std::collections::BTreeSet<_>>();
        assert!(steps.len() <= 16, "{}", steps.len());
        // QUIC's returns are paced four times slower; a mixed fleet's windows add up.
        assert_eq!(return_window(0, 1000, 2), Duration::from_millis(1024));
        assert_eq!(return_window(0, 10_000, 2), Duration::from_millis(16_384));
        assert_eq!(return_window(8000, 6000, 2), Duration::from_millis(8192));
        assert_eq!(return_window(0, 100_000, 2), MAX_RETURN_WINDOW);
        assert_eq!(
            return_window(usize::MAX, usize::MAX, usize::MAX),
            MAX_RETURN_WINDOW,
            "no overflow"
        );
    }

    #[test]
    fn a_proxy_with_more_cores_takes_its_fleet_back_faster_up_to_four() {
        let quic = |cores| return_window(0, 10_000, cores);
        assert_eq!(quic(1), Duration::from_millis(32_768));
        assert_eq!(
            quic(0),
            quic(1),
            "a machine that reports no cores counts as one"
        );
        assert_eq!(quic(2), Duration::from_millis(16_384));
        assert_eq!(quic(4), Duration::from_millis(8192));
        assert_eq!(quic(64), quic(4), "beyond four cores is untested");
        assert_eq!(return_window(10_000, 0, 4), Duration::from_millis(2048));
        assert!(cores() >= 1);
    }

    #[test]
    fn shutdown_advises_a_reconnect_soon() {
        let Message::Reconnect { after_ms, .. } = ProxyControl::shutting_down() else {
            panic!()
        };
        assert_eq!(after_ms, 1000);
    }

    #[test]
    fn renewals_are_asked_of_the_proxy_at_most_every_five_seconds_per_tunnel() {
        let start = Instant::now();
        let mut c = ProxyControl::new(presence(), start, None);
        let renew = || Message::Renew {
            ssh_public_key: "ssh-ed25519 AAAA".into(),
        };
        let asked = Action::Renew {
            ssh_public_key: "ssh-ed25519 AAAA".into(),
        };
        assert_eq!(c.handle_message(start, renew()).unwrap(), asked);
        match c
            .handle_message(start + Duration::from_secs(4), renew())
            .unwrap()
        {
            Action::Send(Message::Renewed {
                certificates: None,
                error: Some(why),
            }) => assert!(why.contains("at most every 5s"), "{why}"),
            other => panic!("a second renewal within 5 s: {other:?}"),
        }
        let later = start + RENEW_EVERY + Duration::from_secs(1);
        assert_eq!(c.handle_message(later, renew()).unwrap(), asked);
        // Nothing a node sends as its key costs more than a bounded string.
        let huge = Message::Renew {
            ssh_public_key: "A".repeat(10_000),
        };
        let later = later + RENEW_EVERY + Duration::from_secs(1);
        assert_eq!(
            c.handle_message(later, huge).unwrap(),
            Action::Renew {
                ssh_public_key: String::new()
            }
        );
    }

    #[test]
    fn a_pinging_node_that_goes_silent_is_gone_and_its_pings_keep_it() {
        let start = Instant::now();
        let limit = Duration::from_secs(45);
        let mut c = ProxyControl::new(presence(), start, Some(limit));
        assert_eq!(c.silent(start + limit), None);
        assert!(c.wake_at() <= start + limit + Duration::from_secs(1));
        let later = start + Duration::from_secs(25);
        assert_eq!(
            c.handle_message(later, Message::Ping { seq: 1 }).unwrap(),
            Action::Send(Message::Pong { seq: 1 })
        );
        assert_eq!(c.silent(start + limit + Duration::from_secs(1)), None);
        assert_eq!(
            c.silent(later + limit + Duration::from_secs(1)),
            Some(limit)
        );
        // A tunnel whose transport says when the node is gone never counts silence.
        let quiet = ProxyControl::new(presence(), start, None);
        assert_eq!(quiet.silent(start + Duration::from_secs(3600)), None);
    }
}
