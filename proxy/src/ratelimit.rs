//! Per-address limit on failed join attempts: a token bucket per source IP that only failures
//! drain, so a fleet joining through one NAT address is not slowed down, but guessing is.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
}
