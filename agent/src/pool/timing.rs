//! The pool's reconnect backoff, with full jitter. (When a tunnel counts as dead is the
//! transport's business: [`burrow_tunnel::Keepalive`].)

use std::time::Duration;

use backon::BackoffBuilder;

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
}
