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

use super::timing::Backoff;
use burrow_tunnel::Transport;

/// How soon `auto` first tries a better transport again (QUIC while it runs on TCP, either while
/// it runs on the HTTP upgrade); each retry that fails doubles the wait, up to [`RETRY_MAX`]. A
/// failed QUIC try costs a few KB of padded handshake packets: on a network that blocks UDP for
/// good, that is 4 tries an hour.
pub const RETRY_EVERY: Duration = Duration::from_secs(10);
pub const RETRY_MAX: Duration = Duration::from_secs(15 * 60);
/// The longest wait a proxy's reconnect advisory can ask for.
pub const MAX_RECONNECT_AFTER: Duration = Duration::from_secs(60);
/// When nothing is due, the driver still wakes this often.
const IDLE_WAKE: Duration = Duration::from_secs(3600);

/// What one dial should try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialPlan {
    /// The transports to try, best first; each is tried when the one before did not get
    /// through (a refusal is the proxy's answer whatever the transport, and ends the dial).
    pub tries: Vec<Transport>,
    /// A background retry of better transports while a tunnel runs on a worse one, not a dial
    /// for a missing tunnel.
    pub retry: bool,
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
    /// The transports that were tried and did not get through, in the order tried, with why.
    pub failed: Vec<(Transport, String)>,
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
    /// `blocked` does not get through (`reason`); tunnels use `using`, and `blocked` is tried
    /// again in the background.
    Blocked {
        blocked: Transport,
        using: Transport,
        reason: String,
    },
    /// A better transport gets through again: tunnels move to it.
    Back(Transport),
    DialFailed {
        reason: String,
        retry_in: Duration,
    },
    StillBlocked {
        reason: String,
        retry_in: Duration,
    },
}

struct Held {
    tunnel: u64,
    transport: Transport,
}

/// The pool's membership state.
pub struct Membership {
    /// The transports the agent may use, best first (one, or `auto`'s ladder).
    ladder: Vec<Transport>,
    /// The best rung of the ladder known to get through: new tunnels start there, and only the
    /// background retry tries the rungs above it.
    floor: usize,
    held: HashMap<String, Held>,
    wanted: BTreeSet<String>,
    backoff: Backoff,
    duplicates: Backoff,
    next_dial: Instant,
    dialing: bool,
    next_retry: Instant,
    retry_after: Duration,
    tunnel_ids: u64,
    notes: Vec<Note>,
}

impl Membership {
    /// `ladder`: the transports to use, best first (never empty).
    pub fn new(ladder: Vec<Transport>, now: Instant) -> Self {
        assert!(!ladder.is_empty(), "a pool needs a transport");
        Self {
            ladder,
            floor: 0,
            held: HashMap::new(),
            wanted: BTreeSet::new(),
            backoff: Backoff::default(),
            duplicates: Backoff::new(Duration::from_millis(50), Duration::from_secs(5)),
            next_dial: now,
            dialing: false,
            next_retry: now,
            retry_after: RETRY_EVERY,
            tunnel_ids: 0,
            notes: Vec::new(),
        }
    }

    /// Whether a proxy of the latest list (or any proxy, before the first) has no tunnel.
    fn missing(&self) -> bool {
        self.held.is_empty() || self.wanted.iter().any(|id| !self.held.contains_key(id))
    }

    /// A transport's place on the ladder (0 is the best).
    fn rank(&self, t: Transport) -> usize {
        self.ladder
            .iter()
            .position(|l| *l == t)
            .unwrap_or(self.ladder.len())
    }

    /// The worst rung a held tunnel runs on, when a better one exists.
    fn worst_held(&self) -> Option<usize> {
        self.held
            .values()
            .map(|h| self.rank(h.transport))
            .max()
            .filter(|r| *r > 0)
    }

    /// The dial to start at `now`, if one is due. One dial runs at a time.
    pub fn poll_dial(&mut self, now: Instant) -> Option<DialPlan> {
        if self.dialing {
            return None;
        }
        let worse = self.worst_held().filter(|_| now >= self.next_retry);
        let missing_due = self.missing() && now >= self.next_dial;
        let tries = match (missing_due, worse) {
            // A missing tunnel: from the best rung known to get through, down the ladder.
            (true, _) => self.ladder[self.floor.min(self.ladder.len() - 1)..].to_vec(),
            // The background retry: the rungs better than the worst one held.
            (false, Some(worse)) => self.ladder[..worse].to_vec(),
            (false, None) => return None,
        };
        self.dialing = true;
        if !missing_due {
            self.next_retry = now + self.retry_after;
        }
        Some(DialPlan {
            tries,
            retry: !missing_due,
        })
    }

    /// When the driver must call [`Self::poll_dial`] again if nothing happens first.
    pub fn poll_timeout(&self, now: Instant) -> Instant {
        let mut wake = if self.dialing || !self.missing() {
            now + IDLE_WAKE
        } else {
            self.next_dial
        };
        if self.worst_held().is_some() {
            wake = wake.min(self.next_retry);
        }
        wake
    }

    /// Takes what a dial gave.
    pub fn handle_dialed(&mut self, now: Instant, outcome: DialOutcome) -> Decision {
        self.dialing = false;
        let landed_rank = outcome.result.as_ref().ok().map(|l| self.rank(l.transport));
        if let Some(rank) = landed_rank {
            self.moved_to(now, rank, &outcome.failed);
        }
        let landed = match outcome.result {
            Err(DialFailure::Refused {
                code: Some(code),
                reason,
            }) if code.is_permanent() => return Decision::GiveUp { reason },
            Err(failure) if outcome.plan.retry => {
                self.retry_after = (self.retry_after * 2).min(RETRY_MAX);
                self.next_retry = now + self.retry_after;
                self.notes.push(Note::StillBlocked {
                    reason: failure.to_string(),
                    retry_in: self.retry_after,
                });
                return Decision::Retry;
            }
            Err(failure) => {
                // Nothing from the best rung known down got through: the path may have changed
                // (the balancer that forced the upgrade is gone): the next dial tries them all.
                if !outcome.failed.is_empty() && outcome.failed.len() == outcome.plan.tries.len() {
                    self.floor = 0;
                }
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
        self.wanted = landed.proxies.into_iter().map(|p| p.id).collect();
        let rank = self.rank(landed.transport);
        let replaces_worse = self
            .held
            .get(&landed.proxy_id)
            .is_some_and(|h| self.rank(h.transport) > rank);
        if self.held.contains_key(&landed.proxy_id) && !replaces_worse {
            let (delay, _) = self.duplicates.next_delay();
            self.next_dial = now + delay;
            // A retry that only reached a proxy already held as well: no better, back off.
            if outcome.plan.retry {
                self.retry_after = (self.retry_after * 2).min(RETRY_MAX);
                self.next_retry = now + self.retry_after;
            }
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

    /// A tunnel landed on rung `rank` after the transports `failed` did not get through: that
    /// rung is the best known to work now (lower after a fallback, higher after a retry).
    fn moved_to(&mut self, now: Instant, rank: usize, failed: &[(Transport, String)]) {
        let using = self.ladder[rank.min(self.ladder.len() - 1)];
        if rank > self.floor {
            for (blocked, reason) in failed {
                self.notes.push(Note::Blocked {
                    blocked: *blocked,
                    using,
                    reason: reason.clone(),
                });
            }
            self.floor = rank;
            self.retry_after = RETRY_EVERY;
            self.next_retry = now + RETRY_EVERY;
        } else if rank < self.floor {
            self.notes.push(Note::Back(using));
            self.floor = rank;
            self.retry_after = RETRY_EVERY;
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

    /// How long until the next dial may start.
    pub fn dial_wait(&self, now: Instant) -> Duration {
        self.next_dial.saturating_duration_since(now)
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
mod tests;
