//! How an idle tunnel stays open across NAT, and how soon each end notices a dead peer.
//!
//! Only the agent, the side behind NAT, sends keep-alives, and only what the transport itself
//! offers: a QUIC PING every interval (quinn's keep-alive), or a TCP keep-alive probe (the
//! kernel's, no payload) on a connection idle for the interval. Each costs about a hundred bytes
//! with its acknowledgement. A peer that stops answering counts as dead within
//! [`Keepalive::dead_after`] of the last packet heard from it: QUIC's idle timeout (the agent's
//! value wins, being the smaller one both ends advertise), TCP's probe count and user timeout.
//! The proxy learns the agent's interval
//! from its hello and uses it for its own TCP probes, so a link configured for a long interval
//! is not probed more often from the other end.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::Transport;

/// A tunnel's keep-alive interval, within [`Keepalive::MIN`] and [`Keepalive::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    interval: Duration,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a keep-alive of {given:?} is outside {min:?}..={max:?}", min = Keepalive::MIN, max = Keepalive::MAX)]
pub struct KeepaliveError {
    pub given: Duration,
}

impl Keepalive {
    pub const MIN: Duration = Duration::from_secs(5);
    pub const MAX: Duration = Duration::from_secs(30 * 60);
    /// Under the 30 s that common NATs keep an idle UDP mapping.
    pub const QUIC_DEFAULT: Duration = Duration::from_secs(25);
    /// NATs keep TCP mappings for minutes to hours; this is what bounds noticing a dead proxy to
    /// a minute ([`Self::dead_after`]).
    pub const TCP_DEFAULT: Duration = Duration::from_secs(40);
    /// Under the 60 s after which common L7 balancers (nginx's `proxy_read_timeout`, cloud load
    /// balancers) close an idle upgraded connection.
    pub const UPGRADE_DEFAULT: Duration = Duration::from_secs(25);
    /// TCP: how long after a probe goes unanswered the peer counts as dead (`TCP_PROBES` more
    /// probes).
    pub const TCP_GRACE: Duration = Duration::from_secs(20);
    /// QUIC: how much longer than the interval the idle timeout is, so that a keep-alive lost
    /// and retransmitted (a few PTOs on a lossy cellular link) still arrives in time.
    pub const QUIC_SLACK: Duration = Duration::from_secs(10);

    pub fn new(interval: Duration) -> Result<Self, KeepaliveError> {
        if (Self::MIN..=Self::MAX).contains(&interval) {
            Ok(Self { interval })
        } else {
            Err(KeepaliveError { given: interval })
        }
    }

    /// A keep-alive a peer asked for, brought within bounds.
    pub fn clamped(interval: Duration) -> Self {
        Self {
            interval: interval.clamp(Self::MIN, Self::MAX),
        }
    }

    pub fn default_for(transport: Transport) -> Self {
        Self {
            interval: match transport {
                Transport::Quic => Self::QUIC_DEFAULT,
                Transport::Tcp => Self::TCP_DEFAULT,
                Transport::Upgrade => Self::UPGRADE_DEFAULT,
            },
        }
    }

    pub fn interval(self) -> Duration {
        self.interval
    }

    /// QUIC's idle timeout for this interval.
    pub fn quic_idle_timeout(self) -> Duration {
        self.interval + Self::QUIC_SLACK
    }

    /// At most how long after the last packet heard from it a silent peer counts as dead. QUIC
    /// restarts its idle timer when it sends the first keep-alive after hearing from the peer
    /// (RFC 9000, 10.1), so a dead peer is noticed an interval plus the idle timeout after the
    /// last packet; TCP gives up [`Self::TCP_GRACE`] after its first unanswered probe; an
    /// upgraded tunnel's ends ping every interval on the control stream
    /// ([`Transport::pings`]) and give up on a peer not heard from for an interval and that
    /// grace.
    pub fn dead_after(self, transport: Transport) -> Duration {
        match transport {
            Transport::Quic => self.interval + self.quic_idle_timeout(),
            Transport::Tcp | Transport::Upgrade => self.interval + Self::TCP_GRACE,
        }
    }

    /// Sets the kernel's keep-alive probes and user timeout on a tunnel's TCP socket.
    pub fn apply_tcp(self, socket: socket2::SockRef<'_>) {
        let probes = socket2::TcpKeepalive::new()
            .with_time(self.interval)
            .with_interval(TCP_PROBE_EVERY)
            .with_retries(TCP_PROBES);
        if let Err(e) = socket.set_tcp_keepalive(&probes) {
            tracing::debug!(error = %e, "cannot set TCP keep-alives");
        }
        // Unacknowledged data (a session's bytes on a dead path) is bounded by the same time as
        // an idle connection; without it Linux retries for about fifteen minutes.
        if let Err(e) = socket.set_tcp_user_timeout(Some(self.dead_after(Transport::Tcp))) {
            tracing::debug!(error = %e, "cannot set the TCP user timeout");
        }
    }
}

/// TCP probes after the first unanswered one: `TCP_PROBES` of them `TCP_PROBE_EVERY` apart fill
/// [`Keepalive::TCP_GRACE`].
const TCP_PROBE_EVERY: Duration = Duration::from_secs(5);
const TCP_PROBES: u32 = 4;
const _: () =
    assert!(TCP_PROBE_EVERY.as_secs() * TCP_PROBES as u64 == Keepalive::TCP_GRACE.as_secs());

/// A keep-alive asked of a TLS + yamux tunnel's socket, which its driver task owns: applied by
/// the socket's wrapper at its next read or write (the proxy writes its welcome right after).
#[derive(Clone, Default)]
pub(crate) struct Requested(Arc<AtomicU32>);

impl Requested {
    pub(crate) fn set(&self, k: Keepalive) {
        let secs = u32::try_from(k.interval.as_secs())
            .unwrap_or(u32::MAX)
            .max(1);
        self.0.store(secs, Ordering::Relaxed);
    }

    /// The keep-alive asked for since the last call, if any.
    pub(crate) fn take(&self) -> Option<Keepalive> {
        if self.0.load(Ordering::Relaxed) == 0 {
            return None;
        }
        match self.0.swap(0, Ordering::Relaxed) {
            0 => None,
            secs => Some(Keepalive::clamped(Duration::from_secs(secs.into()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fit_nat_and_notice_a_dead_peer_within_a_minute() {
        for t in [Transport::Quic, Transport::Tcp, Transport::Upgrade] {
            let k = Keepalive::default_for(t);
            assert!(k.dead_after(t) <= Duration::from_secs(60), "{t}: {k:?}");
        }
        // An idle QUIC connection must not time out between two keep-alives.
        let k = Keepalive::default_for(Transport::Quic);
        assert!(k.quic_idle_timeout() > k.interval());
        assert!(Keepalive::default_for(Transport::Quic).interval() < Duration::from_secs(30));
    }

    #[test]
    fn out_of_range_intervals_are_refused_or_clamped() {
        assert!(Keepalive::new(Duration::from_secs(1)).is_err());
        assert!(Keepalive::new(Duration::from_secs(3600)).is_err());
        assert_eq!(
            Keepalive::new(Duration::from_secs(90)).unwrap().interval(),
            Duration::from_secs(90)
        );
        assert_eq!(
            Keepalive::clamped(Duration::ZERO).interval(),
            Keepalive::MIN
        );
        assert_eq!(
            Keepalive::clamped(Duration::from_secs(u64::MAX / 2)).interval(),
            Keepalive::MAX
        );
    }

    #[test]
    fn a_request_is_taken_once() {
        let r = Requested::default();
        assert_eq!(r.take(), None);
        r.set(Keepalive::clamped(Duration::from_secs(120)));
        assert_eq!(
            r.take().map(Keepalive::interval),
            Some(Duration::from_secs(120))
        );
        assert_eq!(r.take(), None);
    }
}
