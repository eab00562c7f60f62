//! Envoy's slow start mode: an endpoint that joined its cluster less than the window ago
//! has its weight scaled by `max(min_weight, (age / window) ^ (1 / aggression))`, with the
//! age counted in whole milliseconds and at least one, as Envoy's
//! `EdfLoadBalancerBase::applySlowStartFactor`.

use std::time::Duration;

/// A cluster's slow start (Envoy's `SlowStartConfig`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowStart {
    /// How long an endpoint warms up; zero turns slow start off.
    pub window: Duration,
    /// The ramp's shape: 1 is linear, above 1 faster at first, below 1 slower.
    pub aggression: f64,
    /// The smallest share of its weight a warming endpoint gets, from 0 to 1.
    pub min_weight: f64,
}

impl SlowStart {
    /// Envoy's defaults for `window`: a linear ramp from 10% of the weight.
    pub fn new(window: Duration) -> Self {
        SlowStart {
            window,
            aggression: 1.0,
            min_weight: 0.1,
        }
    }

    /// The share of its weight an endpoint that joined `age` ago gets: 1 past the window.
    pub fn factor(&self, age: Duration) -> f64 {
        let window = self.window.as_millis();
        let age = age.as_millis();
        if age >= window {
            return 1.0;
        }
        // Envoy falls back to a linear ramp on an aggression it cannot use.
        let aggression = if self.aggression > 0.0 {
            self.aggression
        } else {
            1.0
        };
        let time = age.max(1) as f64 / window as f64;
        let ramp = if aggression == 1.0 {
            time
        } else {
            time.powf(1.0 / aggression)
        };
        ramp.max(self.min_weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn linear_ramp_from_the_minimum_to_full_weight() {
        let s = SlowStart::new(Duration::from_secs(10));
        assert_eq!(s.factor(ms(0)), 0.1);
        assert_eq!(s.factor(ms(500)), 0.1);
        assert!((s.factor(ms(2_500)) - 0.25).abs() < 1e-12);
        assert!((s.factor(ms(9_999)) - 0.9999).abs() < 1e-12);
        assert_eq!(s.factor(ms(10_000)), 1.0);
        assert_eq!(s.factor(Duration::from_secs(3600)), 1.0);
    }

    #[test]
    fn aggression_bends_the_ramp() {
        let fast = SlowStart {
            aggression: 2.0,
            ..SlowStart::new(Duration::from_secs(100))
        };
        // (25 / 100) ^ (1 / 2)
        assert!((fast.factor(Duration::from_secs(25)) - 0.5).abs() < 1e-12);
        let slow = SlowStart {
            aggression: 0.5,
            ..fast
        };
        // (50 / 100) ^ 2, above the 10% floor
        assert!((slow.factor(Duration::from_secs(50)) - 0.25).abs() < 1e-12);
        assert_eq!(slow.factor(Duration::from_secs(20)), 0.1);
        // An unusable aggression ramps linearly, as Envoy.
        for aggression in [0.0, -1.0, f64::NAN] {
            let bad = SlowStart { aggression, ..fast };
            assert!((bad.factor(Duration::from_secs(30)) - 0.3).abs() < 1e-12);
        }
    }

    #[test]
    fn minimum_weight_is_a_floor() {
        let s = SlowStart {
            min_weight: 0.5,
            ..SlowStart::new(Duration::from_secs(10))
        };
        assert_eq!(s.factor(ms(1)), 0.5);
        assert_eq!(s.factor(ms(4_000)), 0.5);
        assert!((s.factor(ms(6_000)) - 0.6).abs() < 1e-12);
        let none = SlowStart {
            min_weight: 0.0,
            ..s
        };
        // The age counts as at least one millisecond.
        assert!((none.factor(ms(0)) - 0.0001).abs() < 1e-12);
    }
}
