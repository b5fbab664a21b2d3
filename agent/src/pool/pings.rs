//! Pings on the control stream of a tunnel whose transport does not tell when the proxy is gone
//! ([`burrow_tunnel::Transport::pings`]: the HTTP upgrade, through a balancer that terminates TLS and closes
//! idle connections).

use std::time::Duration;

use burrow_tunnel::Session;
use tokio::time::Instant;
use tunnel_proto::wire::Message;

use super::PoolConfig;

/// The pings of a tunnel whose transport does not say when the proxy is gone
/// ([`burrow_tunnel::Transport::pings`]): one every keep-alive interval on the control stream (the proxy
/// answers each), and the tunnel is given up when nothing came back for
/// [`burrow_tunnel::Keepalive::dead_after`].
pub(super) struct Pings {
    /// `None`: the transport keeps the tunnel alive itself.
    every: Option<(Duration, Duration)>,
    next: Instant,
    last_heard: Instant,
    seq: u64,
}

impl Pings {
    pub(super) fn new(config: &PoolConfig, session: &Session) -> Self {
        let over = session.transport();
        let keepalive = super::connect::keepalive_for(config, over);
        let every = over
            .pings()
            .then(|| (keepalive.interval(), keepalive.dead_after(over)));
        Self::with(every, Instant::now())
    }

    /// `every`: the interval and how long the proxy may stay silent.
    fn with(every: Option<(Duration, Duration)>, now: Instant) -> Self {
        Self {
            next: now + every.map_or(Duration::ZERO, |(interval, _)| interval),
            every,
            last_heard: now,
            seq: 0,
        }
    }

    /// Resolves when a ping or the silence check is due; never for a transport that keeps
    /// itself alive.
    pub(super) async fn due(&self) {
        match self.every {
            Some((_, dead_after)) => {
                tokio::time::sleep_until(self.next.min(self.last_heard + dead_after)).await
            }
            None => std::future::pending().await,
        }
    }

    /// The ping to send at `now`, if one is due; how long the proxy has been silent, when that
    /// is too long.
    pub(super) fn poll(&mut self, now: Instant) -> Result<Option<Message>, Duration> {
        let Some((every, dead_after)) = self.every else {
            return Ok(None);
        };
        let silent = now.duration_since(self.last_heard);
        if silent >= dead_after {
            return Err(silent);
        }
        if now < self.next {
            return Ok(None);
        }
        self.next = now + every;
        self.seq += 1;
        Ok(Some(Message::Ping { seq: self.seq }))
    }

    /// The proxy was heard from at `at` (a control message, or bytes on any stream).
    pub(super) fn heard(&mut self, at: Instant) {
        self.last_heard = self.last_heard.max(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ping_every_interval_and_a_silent_proxy_is_given_up() {
        let s = Duration::from_secs;
        let t0 = Instant::now();
        let mut p = Pings::with(Some((s(25), s(45))), t0);
        assert_eq!(p.poll(t0), Ok(None));
        assert_eq!(p.poll(t0 + s(25)), Ok(Some(Message::Ping { seq: 1 })));
        assert_eq!(p.poll(t0 + s(30)), Ok(None));
        p.heard(t0 + s(30));
        assert_eq!(p.poll(t0 + s(50)), Ok(Some(Message::Ping { seq: 2 })));
        // The answer to the second ping never comes.
        assert_eq!(p.poll(t0 + s(74)), Ok(None));
        assert_eq!(p.poll(t0 + s(75)), Err(s(45)));
        // A transport that keeps itself alive never pings.
        let mut quiet = Pings::with(None, t0);
        assert_eq!(quiet.poll(t0 + s(3600)), Ok(None));
    }
}
