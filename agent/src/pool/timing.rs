//! The pool's timing decisions, as plain structs with `now` passed in (tested under a paused
//! clock): reconnect backoff with full jitter, and when a tunnel pings, heartbeats and counts as
//! dead.

use std::time::Duration;

use backon::BackoffBuilder;
use tokio::time::Instant;

const PING_EVERY: Duration = Duration::from_secs(3);
/// A tunnel that answers no ping for this long is dead.
const PONG_DEADLINE: Duration = Duration::from_secs(10);
const HEARTBEAT_EVERY: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Exponential backoff with full jitter: each delay is uniform in `[0, ceiling]`, the ceiling
/// doubling from `BACKOFF_MIN` up to `BACKOFF_MAX` (the ceilings come from backon).
pub struct Backoff {
    min: Duration,
    max: Duration,
    ceilings: backon::ExponentialBackoff,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(BACKOFF_MIN, BACKOFF_MAX)
    }
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            ceilings: backon::ExponentialBuilder::default()
                .with_min_delay(min)
                .with_max_delay(max)
                .with_factor(2.0)
                .without_max_times()
                .build(),
        }
    }

    /// The next delay and the ceiling it was drawn under.
    pub fn next_delay(&mut self) -> (Duration, Duration) {
        let ceiling = self.ceilings.next().unwrap_or(self.max);
        (ceiling.mul_f64(rand::random::<f64>()), ceiling)
    }

    /// Back to the smallest ceiling (after a success).
    pub fn reset(&mut self) {
        *self = Self::new(self.min, self.max);
    }
}

/// When a tunnel pings and heartbeats, and when it counts as dead. Pure timing, so it is tested
/// with a paused clock.
#[derive(Debug)]
pub struct Liveness {
    last_pong: Instant,
    next_ping: Instant,
    next_heartbeat: Instant,
    seq: u64,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Due {
    pub ping: Option<u64>,
    pub heartbeat: bool,
    pub dead: bool,
}

impl Liveness {
    pub fn new(now: Instant) -> Self {
        Self {
            last_pong: now,
            next_ping: now + PING_EVERY,
            next_heartbeat: now + HEARTBEAT_EVERY,
            seq: 0,
        }
    }

    pub fn next_wake(&self) -> Instant {
        self.next_ping.min(self.next_heartbeat)
    }

    pub fn pong(&mut self, now: Instant) {
        self.last_pong = now;
    }

    /// A heartbeat was just sent (for another reason, like changed labels).
    pub fn heartbeat_sent(&mut self, now: Instant) {
        self.next_heartbeat = now + HEARTBEAT_EVERY;
    }

    pub fn poll(&mut self, now: Instant) -> Due {
        let mut due = Due::default();
        if now.duration_since(self.last_pong) >= PONG_DEADLINE {
            due.dead = true;
            return due;
        }
        if now >= self.next_ping {
            self.seq += 1;
            due.ping = Some(self.seq);
            self.next_ping = now + PING_EVERY;
        }
        if now >= self.next_heartbeat {
            due.heartbeat = true;
            self.next_heartbeat = now + HEARTBEAT_EVERY;
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_ceilings_double_to_the_cap_and_delays_stay_under_them() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            let (delay, ceiling) = b.next_delay();
            assert!(delay <= ceiling, "{delay:?} > {ceiling:?}");
            ceilings.push(ceiling.as_millis());
        }
        assert_eq!(
            ceilings,
            [
                500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000
            ]
        );
        b.reset();
        assert_eq!(b.next_delay().1, Duration::from_millis(500));
        // A reset keeps the backoff's own bounds.
        let mut short = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        short.reset();
        let ceilings: Vec<u128> = (0..9).map(|_| short.next_delay().1.as_millis()).collect();
        assert_eq!(ceilings, [50, 100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }

    #[test]
    fn full_jitter_spreads_a_thousand_agents_over_the_whole_window() {
        // A thousand agents at the cap: their delays cover [0, 30s], not one instant.
        let delays: Vec<Duration> = (0..1000)
            .map(|_| {
                let mut b = Backoff::new(Duration::from_secs(30), Duration::from_secs(30));
                b.next_delay().0
            })
            .collect();
        let in_first_second = delays
            .iter()
            .filter(|d| **d < Duration::from_secs(1))
            .count();
        let in_last_10 = delays
            .iter()
            .filter(|d| **d > Duration::from_secs(20))
            .count();
        assert!(
            in_first_second < 100,
            "{in_first_second} of 1000 would return in the first second"
        );
        assert!(
            in_last_10 > 200,
            "only {in_last_10} of 1000 wait more than 20s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn liveness_pings_heartbeats_and_notices_a_dead_tunnel_within_seconds() {
        let start = Instant::now();
        let mut l = Liveness::new(start);
        let mut pings = 0;
        let mut heartbeats = 0;
        // Pongs answer every ping: 35 s of healthy tunnel.
        while Instant::now() < start + Duration::from_secs(35) {
            tokio::time::sleep_until(l.next_wake()).await;
            let due = l.poll(Instant::now());
            assert!(!due.dead);
            if due.ping.is_some() {
                pings += 1;
                l.pong(Instant::now());
            }
            heartbeats += usize::from(due.heartbeat);
        }
        assert_eq!(pings, 12, "a ping every 3s");
        assert_eq!(heartbeats, 3, "a heartbeat every 10s");
        // Then the peer goes silent: dead within the pong deadline plus one ping period.
        let silent_from = Instant::now();
        loop {
            tokio::time::sleep_until(l.next_wake()).await;
            if l.poll(Instant::now()).dead {
                break;
            }
        }
        let noticed = Instant::now() - silent_from;
        assert!(noticed <= PONG_DEADLINE + PING_EVERY, "{noticed:?}");
    }
}
