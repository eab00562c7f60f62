//! Envoy's jittered exponential backoff for control-plane reconnects.

use std::time::Duration;

/// Full-jitter exponential backoff: the n-th delay is uniform in
/// `[0, min((2^n - 1) * base, max))`, as Envoy's `JitteredExponentialBackOffStrategy`.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    rng: fastrand::Rng,
}

impl Backoff {
    /// Envoy's defaults for an xDS stream: 500 ms base, 30 s cap.
    pub fn envoy_default() -> Self {
        Self::new(Duration::from_millis(500), Duration::from_secs(30))
    }

    /// A backoff with the given base and cap.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self::with_rng(base, max, fastrand::Rng::new())
    }

    /// A backoff drawing from the given generator (seeded in tests).
    pub fn with_rng(base: Duration, max: Duration, rng: fastrand::Rng) -> Self {
        Self {
            base,
            max,
            attempt: 0,
            rng,
        }
    }

    /// The upper bound of the next delay.
    pub fn ceiling(&self) -> Duration {
        let factor = 2u32
            .checked_pow(self.attempt + 1)
            .map_or(u32::MAX, |f| f - 1);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The next delay; each call widens the window until it reaches the cap.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        if ceiling < self.max {
            self.attempt += 1;
        }
        let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(self.rng.u64(0..millis.max(1)))
    }

    /// Starts over from the base, after a stream that delivered a response.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_grow_to_the_cap_and_reset() {
        let mut backoff = Backoff::with_rng(
            Duration::from_millis(500),
            Duration::from_secs(30),
            fastrand::Rng::with_seed(7),
        );
        let mut ceilings = Vec::new();
        for _ in 0..9 {
            let ceiling = backoff.ceiling();
            let delay = backoff.next_delay();
            assert!(delay < ceiling, "{delay:?} not below {ceiling:?}");
            ceilings.push(ceiling.as_millis());
        }
        assert_eq!(
            ceilings,
            [500, 1500, 3500, 7500, 15500, 30000, 30000, 30000, 30000]
        );
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_millis(500));
    }

    #[test]
    fn delays_are_spread_over_the_window() {
        let mut backoff = Backoff::with_rng(
            Duration::from_millis(500),
            Duration::from_secs(30),
            fastrand::Rng::with_seed(1),
        );
        for _ in 0..6 {
            backoff.next_delay();
        }
        let delays: Vec<_> = (0..200).map(|_| backoff.next_delay()).collect();
        assert!(delays.iter().any(|d| *d < Duration::from_secs(10)));
        assert!(delays.iter().any(|d| *d > Duration::from_secs(20)));
    }

    #[test]
    fn a_huge_attempt_count_saturates_at_the_cap() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(u64::MAX / 4));
        for _ in 0..100 {
            backoff.next_delay();
        }
        assert!(backoff.ceiling() <= Duration::from_secs(u64::MAX / 4));
    }
}
