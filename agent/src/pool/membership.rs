//! The pool's membership decisions as a state machine without I/O: which proxies the agent must
//! hold a tunnel to, when to dial and over which transport, what to do with a tunnel that lands
//! on a proxy already held, and when to give up for good. It takes events and the current time
//! and returns what to do; [`super::run`] does it with sockets and timers.
//!
//! Shaped like quinn-proto: `poll_dial` / `poll_timeout` ask what is due at `now`, the `handle_*`
//! methods take what happened.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use tokio::time::Instant;
use tunnel_proto::wire::{ProxyEntry, Refusal};

use super::TransportMode;
use super::timing::Backoff;
use burrow_tunnel::Transport;

/// How often `auto` tries QUIC again while it runs on TCP.
pub const QUIC_RETRY_EVERY: Duration = Duration::from_secs(10);
/// The longest wait a proxy's reconnect advisory can ask for.
pub const MAX_RECONNECT_AFTER: Duration = Duration::from_secs(60);
/// When nothing is due, the driver still wakes this often.
const IDLE_WAKE: Duration = Duration::from_secs(3600);

/// What one dial should try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DialPlan {
    /// Try QUIC first.
    pub try_quic: bool,
    /// Fall back to TCP if QUIC does not get through.
    pub fallback_to_tcp: bool,
    /// A background QUIC retry while on TCP, not a dial for a missing tunnel.
    pub quic_retry: bool,
}

/// Why a dial did not give a tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DialFailure {
    /// The proxy answered the hello with a refusal.
    Refused {
        code: Option<Refusal>,
        reason: String,
    },
    /// The connection, the handshake or the protocol failed.
    Failed(String),
}

impl std::fmt::Display for DialFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DialFailure::Refused { reason, .. } => {
                write!(f, "the proxy refused the tunnel: {reason}")
            }
            DialFailure::Failed(reason) => f.write_str(reason),
        }
    }
}

/// A tunnel a dial gave: which proxy it reached, over what, and the proxy list it was told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Landed {
    pub proxy_id: String,
    pub transport: Transport,
    pub proxies: Vec<ProxyEntry>,
}

/// How a dial ended.
#[derive(Debug)]
pub struct DialOutcome {
    pub plan: DialPlan,
    pub result: Result<Landed, DialFailure>,
    /// QUIC was tried and did not get through.
    pub quic_failed: bool,
}

/// What to do with a dial's outcome.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Run the new tunnel under this id; stop the tunnel it replaces, if any (TCP → QUIC).
    Adopt { tunnel: u64, replaces: Option<u64> },
    /// The tunnel reached a proxy already held: say goodbye and close it.
    Duplicate,
    /// Nothing to run (the dial failed; the next one is scheduled).
    Retry,
    /// The cluster refused this node for good: stop every tunnel and exit.
    GiveUp { reason: String },
}

/// What a proxy told the agent about coming back, when one of its tunnels ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Advice {
    /// The proxy's reconnect advisory (it shut down cleanly): come back after about this.
    pub reconnect_after: Option<Duration>,
    /// The window the proxy last asked its agents to spread their return over, for a loss
    /// without an advisory (it crashed).
    pub return_window: Option<Duration>,
}

/// What the pool reports for the log, alongside a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    QuicBlocked,
    QuicBack,
    DialFailed { reason: String, retry_in: Duration },
    QuicStillBlocked { reason: String },
}

struct Held {
    tunnel: u64,
    transport: Transport,
}

/// The pool's membership state.
pub struct Membership {
    mode: TransportMode,
    held: HashMap<String, Held>,
    wanted: BTreeSet<String>,
    backoff: Backoff,
    duplicates: Backoff,
    next_dial: Instant,
    dialing: bool,
    quic_broken: bool,
    next_quic_retry: Instant,
    tunnel_ids: u64,
    notes: Vec<Note>,
}

impl Membership {
    pub fn new(mode: TransportMode, now: Instant) -> Self {
        Self {
            mode,
            held: HashMap::new(),
            wanted: BTreeSet::new(),
            backoff: Backoff::default(),
            duplicates: Backoff::new(Duration::from_millis(50), Duration::from_secs(5)),
            next_dial: now,
            dialing: false,
            quic_broken: false,
            next_quic_retry: now,
            tunnel_ids: 0,
            notes: Vec::new(),
        }
    }

    /// Whether a proxy of the latest list (or any proxy, before the first) has no tunnel.
    fn missing(&self) -> bool {
        self.held.is_empty() || self.wanted.iter().any(|id| !self.held.contains_key(id))
    }

    fn on_tcp(&self) -> bool {
        self.held.values().any(|h| h.transport == Transport::Tcp)
    }

    /// The dial to start at `now`, if one is due. One dial runs at a time.
    pub fn poll_dial(&mut self, now: Instant) -> Option<DialPlan> {
        if self.dialing {
            return None;
        }
        let retry_quic =
            self.mode == TransportMode::Auto && self.on_tcp() && now >= self.next_quic_retry;
        let missing_due = self.missing() && now >= self.next_dial;
        if !missing_due && !retry_quic {
            return None;
        }
        self.dialing = true;
        if retry_quic {
            self.next_quic_retry = now + QUIC_RETRY_EVERY;
        }
        Some(DialPlan {
            // While UDP looks blocked, only the periodic retry tries QUIC.
            try_quic: match self.mode {
                TransportMode::Quic => true,
                TransportMode::Tcp => false,
                TransportMode::Auto => !self.quic_broken || retry_quic,
            },
            fallback_to_tcp: self.mode == TransportMode::Auto && !retry_quic,
            quic_retry: retry_quic,
        })
    }

    /// When the driver must call [`Self::poll_dial`] again if nothing happens first.
    pub fn poll_timeout(&self, now: Instant) -> Instant {
        let mut wake = if self.dialing || !self.missing() {
            now + IDLE_WAKE
        } else {
            self.next_dial
        };
        if self.mode == TransportMode::Auto && self.on_tcp() {
            wake = wake.min(self.next_quic_retry);
        }
        wake
    }

    /// Takes what a dial gave.
    pub fn handle_dialed(&mut self, now: Instant, outcome: DialOutcome) -> Decision {
        self.dialing = false;
        if outcome.quic_failed && self.mode == TransportMode::Auto && !self.quic_broken {
            self.notes.push(Note::QuicBlocked);
            self.quic_broken = true;
            self.next_quic_retry = now + QUIC_RETRY_EVERY;
        }
        let landed = match outcome.result {
            Err(DialFailure::Refused {
                code: Some(code),
                reason,
            }) if code.is_permanent() => return Decision::GiveUp { reason },
            Err(failure) if outcome.plan.quic_retry => {
                self.notes.push(Note::QuicStillBlocked {
                    reason: failure.to_string(),
                });
                return Decision::Retry;
            }
            Err(failure) => {
                let (delay, _) = self.backoff.next_delay();
                self.notes.push(Note::DialFailed {
                    reason: failure.to_string(),
                    retry_in: delay,
                });
                self.next_dial = now + delay;
                return Decision::Retry;
            }
            Ok(landed) => landed,
        };
        self.backoff.reset();
        if landed.transport == Transport::Quic {
            if self.quic_broken {
                self.notes.push(Note::QuicBack);
            }
            self.quic_broken = false;
        }
        self.wanted = landed.proxies.into_iter().map(|p| p.id).collect();
        let replaces_tcp = self
            .held
            .get(&landed.proxy_id)
            .is_some_and(|h| h.transport == Transport::Tcp && landed.transport == Transport::Quic);
        if self.held.contains_key(&landed.proxy_id) && !replaces_tcp {
            let (delay, _) = self.duplicates.next_delay();
            self.next_dial = now + delay;
            return Decision::Duplicate;
        }
        self.duplicates.reset();
        self.tunnel_ids += 1;
        let replaced = self.held.insert(
            landed.proxy_id,
            Held {
                tunnel: self.tunnel_ids,
                transport: landed.transport,
            },
        );
        Decision::Adopt {
            tunnel: self.tunnel_ids,
            replaces: replaced.map(|h| h.tunnel),
        }
    }

    /// A new proxy list: returns the tunnels to let go (their proxies left the cluster).
    pub fn handle_proxies(&mut self, list: Vec<ProxyEntry>) -> Vec<(String, u64)> {
        self.wanted = list.into_iter().map(|p| p.id).collect();
        let gone: Vec<String> = self
            .held
            .keys()
            .filter(|id| !self.wanted.contains(*id))
            .cloned()
            .collect();
        gone.into_iter()
            .filter_map(|id| self.held.remove(&id).map(|h| (id, h.tunnel)))
            .collect()
    }

    /// A tunnel ended, with what its proxy advised. Returns whether it was the tunnel held for
    /// that proxy (a replaced or released one is already forgotten).
    pub fn handle_closed(
        &mut self,
        now: Instant,
        proxy_id: &str,
        tunnel: u64,
        advice: Advice,
    ) -> bool {
        if self.held.get(proxy_id).is_none_or(|h| h.tunnel != tunnel) {
            return false;
        }
        self.held.remove(proxy_id);
        let delay = match advice.reconnect_after {
            // The proxy asked for it (it is restarting): come back after a jittered wait.
            Some(after) => after
                .min(MAX_RECONNECT_AFTER)
                .mul_f64(0.5 + rand::random::<f64>()),
            // Lost without a word: back off, and spread over the proxy's window, so that a
            // whole fleet does not return to a restarted proxy in the same second.
            None => {
                let backoff = self.backoff.next_delay().0;
                let window = advice
                    .return_window
                    .unwrap_or_default()
                    .min(MAX_RECONNECT_AFTER);
                backoff.max(window.mul_f64(rand::random::<f64>()))
            }
        };
        self.next_dial = self.next_dial.max(now + delay);
        true
    }

    /// Every held tunnel, forgotten: the pool is stopping.
    pub fn release_all(&mut self) -> Vec<u64> {
        self.held.drain().map(|(_, h)| h.tunnel).collect()
    }

    /// How many proxies the latest list names, and how many tunnels are held.
    pub fn counts(&self) -> (usize, usize) {
        (self.wanted.len(), self.held.len())
    }

    /// What happened since the last call, for the log.
    pub fn take_notes(&mut self) -> Vec<Note> {
        std::mem::take(&mut self.notes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(ids: &[&str]) -> Vec<ProxyEntry> {
        ids.iter()
            .map(|id| ProxyEntry { id: id.to_string() })
            .collect()
    }

    fn landed(plan: DialPlan, proxy: &str, transport: Transport, list: &[&str]) -> DialOutcome {
        DialOutcome {
            plan,
            result: Ok(Landed {
                proxy_id: proxy.to_string(),
                transport,
                proxies: proxies(list),
            }),
            quic_failed: false,
        }
    }

    fn advised(after: Duration) -> Advice {
        Advice {
            reconnect_after: Some(after),
            return_window: None,
        }
    }

    fn refused(plan: DialPlan, code: Refusal) -> DialOutcome {
        DialOutcome {
            plan,
            result: Err(DialFailure::Refused {
                code: Some(code),
                reason: format!("{code:?}"),
            }),
            quic_failed: false,
        }
    }

    /// Dials until no dial is due, letting each land on the next proxy of `landings`; returns
    /// the decisions.
    fn dial_all(
        m: &mut Membership,
        now: &mut Instant,
        landings: &[(&str, Transport)],
        list: &[&str],
    ) -> Vec<Decision> {
        let mut decisions = Vec::new();
        for (proxy, transport) in landings {
            *now = m.poll_timeout(*now).max(*now);
            let plan = m.poll_dial(*now).expect("a dial is due");
            decisions.push(m.handle_dialed(*now, landed(plan, proxy, *transport, list)));
        }
        decisions
    }

    #[test]
    fn the_first_dial_is_due_at_once_and_one_dial_runs_at_a_time() {
        let now = Instant::now();
        let mut m = Membership::new(TransportMode::Auto, now);
        let plan = m.poll_dial(now).unwrap();
        assert_eq!(
            plan,
            DialPlan {
                try_quic: true,
                fallback_to_tcp: true,
                quic_retry: false
            }
        );
        assert_eq!(m.poll_dial(now), None, "a second dial while one runs");
        assert!(m.poll_timeout(now) >= now + Duration::from_secs(60));
    }

    #[test]
    fn a_tunnel_to_a_proxy_already_held_is_closed_and_the_next_dial_comes_soon() {
        let mut now = Instant::now();
        let mut m = Membership::new(TransportMode::Tcp, now);
        let d = dial_all(
            &mut m,
            &mut now,
            &[
                ("a", Transport::Tcp),
                ("a", Transport::Tcp),
                ("b", Transport::Tcp),
            ],
            &["a", "b"],
        );
        assert_eq!(
            d,
            [
                Decision::Adopt {
                    tunnel: 1,
                    replaces: None
                },
                Decision::Duplicate,
                Decision::Adopt {
                    tunnel: 2,
                    replaces: None
                },
            ]
        );
        assert_eq!(m.counts(), (2, 2));
        // Every proxy held: no dial is due.
        assert_eq!(m.poll_dial(now + Duration::from_secs(600)), None);
    }

    #[test]
    fn duplicates_back_off_from_50ms_up_to_5s() {
        let mut now = Instant::now();
        let mut m = Membership::new(TransportMode::Tcp, now);
        dial_all(&mut m, &mut now, &[("a", Transport::Tcp)], &["a", "b"]);
        let mut waits = Vec::new();
        for _ in 0..12 {
            let plan = m.poll_dial(now).unwrap();
            assert_eq!(
                m.handle_dialed(now, landed(plan, "a", Transport::Tcp, &["a", "b"])),
                Decision::Duplicate
            );
            let due = m.poll_timeout(now);
            waits.push(due - now);
            now = due;
        }
        assert!(
            waits.iter().all(|w| *w <= Duration::from_secs(5)),
            "{waits:?}"
        );
        assert!(waits[0] <= Duration::from_millis(50), "{waits:?}");
    }

    #[test]
    fn a_proxy_leaving_the_list_is_let_go_and_one_joining_is_dialed() {
        let mut now = Instant::now();
        let mut m = Membership::new(TransportMode::Tcp, now);
        dial_all(
            &mut m,
            &mut now,
            &[("a", Transport::Tcp), ("b", Transport::Tcp)],
            &["a", "b"],
        );
        assert_eq!(m.poll_dial(now), None);
        // b leaves: its tunnel (2) is let go, nothing to dial.
        assert_eq!(m.handle_proxies(proxies(&["a"])), [("b".to_string(), 2)]);
        assert_eq!(m.counts(), (1, 1));
        assert_eq!(m.poll_dial(now), None);
        // c joins: a dial is due at once.
        assert!(m.handle_proxies(proxies(&["a", "c"])).is_empty());
        let plan = m.poll_dial(now).expect("dial for the new proxy");
        assert_eq!(
            m.handle_dialed(now, landed(plan, "c", Transport::Tcp, &["a", "c"])),
            Decision::Adopt {
                tunnel: 3,
                replaces: None
            }
        );
        // The released tunnel's end is not a loss: no reconnect is scheduled for it.
        assert!(!m.handle_closed(now, "b", 2, Advice::default()));
        assert_eq!(m.poll_dial(now), None);
    }

    #[test]
    fn blocked_udp_falls_back_to_tcp_and_quic_replaces_each_tcp_tunnel_when_it_returns() {
        let mut now = Instant::now();
        let mut m = Membership::new(TransportMode::Auto, now);
        let plan = m.poll_dial(now).unwrap();
        let mut first = landed(plan, "a", Transport::Tcp, &["a"]);
        first.quic_failed = true;
        assert_eq!(
            m.handle_dialed(now, first),
            Decision::Adopt {
                tunnel: 1,
                replaces: None
            }
        );
        assert_eq!(m.take_notes(), [Note::QuicBlocked]);
        // Held on TCP: the next wake is the QUIC retry, QUIC_RETRY_EVERY later.
        assert_eq!(m.poll_dial(now), None);
        let retry_at = m.poll_timeout(now);
        assert_eq!(retry_at - now, QUIC_RETRY_EVERY);
        now = retry_at;
        let retry = m.poll_dial(now).unwrap();
        assert_eq!(
            retry,
            DialPlan {
                try_quic: true,
                fallback_to_tcp: false,
                quic_retry: true
            }
        );
        // Still blocked: nothing changes, no backoff grows, the retry comes again later.
        let blocked = DialOutcome {
            plan: retry,
            result: Err(DialFailure::Failed("no QUIC answer".into())),
            quic_failed: true,
        };
        assert_eq!(m.handle_dialed(now, blocked), Decision::Retry);
        assert!(matches!(
            m.take_notes()[..],
            [Note::QuicStillBlocked { .. }]
        ));
        now = m.poll_timeout(now);
        let retry = m.poll_dial(now).unwrap();
        assert!(retry.quic_retry);
        // QUIC gets through: the QUIC tunnel replaces the TCP one to the same proxy.
        assert_eq!(
            m.handle_dialed(now, landed(retry, "a", Transport::Quic, &["a"])),
            Decision::Adopt {
                tunnel: 2,
                replaces: Some(1)
            }
        );
        assert_eq!(m.take_notes(), [Note::QuicBack]);
        // The replaced tunnel's end changes nothing; on QUIC no retry is due any more.
        assert!(!m.handle_closed(now, "a", 1, Advice::default()));
        assert_eq!(m.poll_dial(now + QUIC_RETRY_EVERY * 3), None);
    }

    #[test]
    fn a_quic_tunnel_is_not_replaced_by_tcp() {
        let mut now = Instant::now();
        let mut m = Membership::new(TransportMode::Auto, now);
        let d = dial_all(
            &mut m,
            &mut now,
            &[("a", Transport::Quic), ("a", Transport::Tcp)],
            &["a", "b"],
        );
        assert_eq!(d[1], Decision::Duplicate);
    }

    #[test]
    fn revocation_arriving_in_the_handshake_ends_the_pool_even_with_tunnels_held() {
        let mut now = Instant::now();
        let mut m = Membership::new(TransportMode::Tcp, now);
        dial_all(&mut m, &mut now, &[("a", Transport::Tcp)], &["a", "b"]);
        let plan = m.poll_dial(now).unwrap();
        assert_eq!(
            m.handle_dialed(now, refused(plan, Refusal::Revoked)),
            Decision::GiveUp {
                reason: "Revoked".into()
            }
        );
        assert_eq!(m.release_all(), [1]);
    }

    #[test]
    fn transient_refusals_back_off_and_keep_dialing() {
        for code in [
            Refusal::UnsupportedVersion,
            Refusal::Overloaded,
            Refusal::ShuttingDown,
            Refusal::Protocol,
            Refusal::Unknown,
        ] {
            let mut now = Instant::now();
            let mut m = Membership::new(TransportMode::Tcp, now);
            let mut ceilings = Vec::new();
            for _ in 0..4 {
                let plan = m.poll_dial(now).expect("still dialing");
                assert_eq!(m.handle_dialed(now, refused(plan, code)), Decision::Retry);
                match &m.take_notes()[..] {
                    [Note::DialFailed { retry_in, reason }] => {
                        assert!(reason.contains(&format!("{code:?}")), "{reason}");
                        ceilings.push(*retry_in);
                    }
                    other => panic!("{other:?}"),
                }
                now = m.poll_timeout(now);
            }
            assert!(
                ceilings.iter().all(|d| *d <= Duration::from_secs(4)),
                "{code:?}: {ceilings:?}"
            );
        }
    }

    #[test]
    fn a_reconnect_advisory_brings_the_agent_back_after_a_jittered_wait() {
        let mut now = Instant::now();
        let mut m = Membership::new(TransportMode::Tcp, now);
        dial_all(&mut m, &mut now, &[("a", Transport::Tcp)], &["a"]);
        let after = Duration::from_secs(2);
        assert!(m.handle_closed(now, "a", 1, advised(after)));
        let wait = m.poll_timeout(now) - now;
        assert!(wait >= after / 2 && wait <= after * 3 / 2, "{wait:?}");
        assert_eq!(m.poll_dial(now + wait / 2), None, "not before the advisory");
        assert!(m.poll_dial(now + wait).is_some());
    }

    #[test]
    fn a_reconnect_advisory_cannot_park_the_agent_for_more_than_a_minute_and_a_half() {
        let mut now = Instant::now();
        let mut m = Membership::new(TransportMode::Tcp, now);
        dial_all(&mut m, &mut now, &[("a", Transport::Tcp)], &["a"]);
        assert!(m.handle_closed(now, "a", 1, advised(Duration::from_secs(86_400))));
        assert!(m.poll_timeout(now) - now <= MAX_RECONNECT_AFTER * 3 / 2);
    }

    #[test]
    fn a_fleet_losing_its_proxy_spreads_its_return_over_the_proxys_window() {
        let window = Duration::from_millis(16_384);
        let mut waits = Vec::new();
        for _ in 0..1000 {
            let mut now = Instant::now();
            let mut m = Membership::new(TransportMode::Tcp, now);
            dial_all(&mut m, &mut now, &[("a", Transport::Tcp)], &["a"]);
            let lost = Advice {
                reconnect_after: None,
                return_window: Some(window),
            };
            assert!(m.handle_closed(now, "a", 1, lost));
            waits.push(m.poll_timeout(now) - now);
        }
        assert!(
            waits.iter().all(|w| *w <= window),
            "a wait beyond the window"
        );
        // Spread over the whole window, not bunched in the first backoff (0-0.5 s).
        let late = waits.iter().filter(|w| **w > window / 2).count();
        assert!(
            late > 350 && late < 650,
            "{late} of 1000 in the second half"
        );
        // Without a window, the first backoff step (at most 0.5 s) is all the agent waits.
        let mut now = Instant::now();
        let mut m = Membership::new(TransportMode::Tcp, now);
        dial_all(&mut m, &mut now, &[("a", Transport::Tcp)], &["a"]);
        assert!(m.handle_closed(now, "a", 1, Advice::default()));
        assert!(m.poll_timeout(now) - now <= Duration::from_millis(500));
    }
}
