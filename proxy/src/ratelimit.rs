//! Limits per source address, for what anonymous clients can make the proxy hold:
//! - [`FailureLimiter`]: failed join attempts, a token bucket per source that only failures
//!   drain, so a fleet joining through one NAT address is not slowed down, but guessing is.
//! - [`ConnectionGate`]: concurrent connections not yet authenticated (the SSH port, like sshd's
//!   MaxStartups) or not yet a tunnel (the web port), globally and per source.
//!
//! A source is an IPv4 address, or an IPv6 /64 (one subscriber usually holds a whole /64).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The key a client's address is limited under: IPv4 (also when mapped into IPv6) as it is,
/// IPv6 by its /64.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))),
        },
        v4 => v4,
    }
}

/// Counts concurrent connections, globally and per source; a connection holds a
/// [`GatePermit`] while it counts.
pub struct ConnectionGate {
    global: usize,
    per_source: usize,
    state: Mutex<GateState>,
}

#[derive(Default)]
struct GateState {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// One counted connection; dropping it frees its place.
pub struct GatePermit {
    gate: Arc<ConnectionGate>,
    source: IpAddr,
}

impl ConnectionGate {
    pub fn new(global: usize, per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            global,
            per_source,
            state: Mutex::new(GateState::default()),
        })
    }

    /// A place for a connection from `ip`, or `None` when the source or the proxy is at its cap.
    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<GatePermit> {
        let source = source_key(ip);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let held = state.by_source.get(&source).copied().unwrap_or(0);
        if state.total >= self.global || held >= self.per_source {
            return None;
        }
        state.total += 1;
        state.by_source.insert(source, held + 1);
        Some(GatePermit {
            gate: self.clone(),
            source,
        })
    }
}

impl Drop for GatePermit {
    fn drop(&mut self) {
        let mut state = self.gate.state.lock().unwrap_or_else(|p| p.into_inner());
        state.total = state.total.saturating_sub(1);
        if let Some(n) = state.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                state.by_source.remove(&self.source);
            }
        }
    }
}

/// How many entries the table may hold before full buckets are dropped.
const MAX_TRACKED: usize = 16_384;

pub struct FailureLimiter {
    capacity: f64,
    refill_every: Duration,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl FailureLimiter {
    /// `capacity` failures in a burst, then one more per `refill_every`.
    pub fn new(capacity: u32, refill_every: Duration) -> Self {
        Self {
            capacity: f64::from(capacity),
            refill_every,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `ip` may make another attempt now.
    pub fn allowed(&self, ip: IpAddr, now: Instant) -> bool {
        let ip = source_key(ip);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        match buckets.get_mut(&ip) {
            Some(b) => {
                self.refill(b, now);
                b.tokens >= 1.0
            }
            None => true,
        }
    }

    /// Records a failed attempt from `ip`.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        let ip = source_key(ip);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&ip) {
            buckets.retain(|_, b| {
                self.refill(b, now);
                b.tokens < self.capacity
            });
        }
        let capacity = self.capacity;
        let b = buckets.entry(ip).or_insert(Bucket {
            tokens: capacity,
            updated: now,
        });
        self.refill(b, now);
        b.tokens = (b.tokens - 1.0).max(0.0);
    }

    fn refill(&self, b: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(b.updated);
        let gained = elapsed.as_secs_f64() / self.refill_every.as_secs_f64();
        b.tokens = (b.tokens + gained).min(self.capacity);
        b.updated = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_failures_is_limited_then_refills() {
        let l = FailureLimiter::new(3, Duration::from_secs(10));
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.allowed(ip, t0));
            l.failed(ip, t0);
        }
        assert!(!l.allowed(ip, t0));
        assert!(l.allowed(other, t0), "other addresses are not affected");
        assert!(!l.allowed(ip, t0 + Duration::from_secs(9)));
        assert!(l.allowed(ip, t0 + Duration::from_secs(10)));
    }

    #[test]
    fn ipv6_sources_are_limited_by_their_64() {
        let l = FailureLimiter::new(1, Duration::from_secs(10));
        let t0 = Instant::now();
        l.failed("2001:db8:1:2::1".parse().unwrap(), t0);
        assert!(!l.allowed("2001:db8:1:2:ffff::9".parse().unwrap(), t0));
        assert!(l.allowed("2001:db8:1:3::1".parse().unwrap(), t0));
        assert_eq!(
            source_key("::ffff:10.0.0.1".parse().unwrap()),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn the_gate_counts_per_source_and_in_all() {
        let gate = ConnectionGate::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = gate.enter(a).unwrap();
        let _p2 = gate.enter(a).unwrap();
        assert!(gate.enter(a).is_none(), "per source");
        let _p3 = gate.enter(b).unwrap();
        assert!(gate.enter(b).is_none(), "global");
        drop(p1);
        assert!(gate.enter(a).is_some(), "a dropped permit frees its place");
    }
}
