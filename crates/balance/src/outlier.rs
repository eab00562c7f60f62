//! Envoy's outlier detection for one endpoint: consecutive 5xx, gateway failures and
//! local-origin failures eject it for the base ejection time times its ejection multiplier
//! (one more per ejection, one less per `interval` spent healthy), capped at the maximum
//! ejection time; it comes back at the first `interval` tick after that, as Envoy's timer
//! returns hosts. The state lives in the endpoint's [`crate::EndpointState`], so it
//! outlasts config reloads as Envoy's host monitors do.
//!
//! Time is passed in (`now`), so the logic is tested on tokio's paused clock by the callers
//! and with plain instants here.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A cluster's outlier detection, the parts the data path applies (Envoy's
/// `OutlierDetection` as istiod writes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detection {
    /// Consecutive 5xx (local-origin failures included unless split) that eject; `None`
    /// when not enforced.
    pub consecutive_5xx: Option<u32>,
    /// Consecutive 502, 503 and 504 that eject; `None` when not enforced.
    pub consecutive_gateway: Option<u32>,
    /// With `split_local_origin`: consecutive local-origin failures (connect failures,
    /// timeouts, resets) that eject.
    pub consecutive_local_origin: Option<u32>,
    /// Whether local-origin failures are counted apart from the upstream's 5xx.
    pub split_local_origin: bool,
    /// Envoy's `interval`: ejections end on its ticks, and each tick an endpoint spends
    /// healthy lowers its ejection multiplier.
    pub interval: Duration,
    /// The first ejection's length; later ones are multiplied by the multiplier.
    pub base_ejection: Duration,
    /// The longest an ejection lasts.
    pub max_ejection: Duration,
    /// The share of the cluster's endpoints that may be ejected at once (at least one is).
    pub max_ejection_percent: u32,
}

impl Default for Detection {
    /// Envoy's defaults: 5 consecutive 5xx enforced, gateway failures not, a 10 s interval,
    /// 30 s base ejection, 300 s at most, 10% of the endpoints.
    fn default() -> Self {
        Detection {
            consecutive_5xx: Some(5),
            consecutive_gateway: None,
            consecutive_local_origin: None,
            split_local_origin: false,
            interval: Duration::from_secs(10),
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 10,
        }
    }
}

/// How one request to the endpoint ended, for the detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered with this status.
    Status(u16),
    /// No answer: the connection failed, timed out or was reset (local origin).
    LocalFailure,
}

/// Why an endpoint was ejected, as Envoy's `ejections_enforced_*` stats name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `consecutive_5xx`.
    Consecutive5xx,
    /// `consecutive_gateway_failure`.
    ConsecutiveGateway,
    /// `consecutive_local_origin_failure`.
    ConsecutiveLocalOrigin,
}

/// One endpoint's detector state.
#[derive(Debug, Default)]
pub struct Outlier {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_local: AtomicU32,
    /// When the current (or last) ejection ends, in nanoseconds since [`epoch`]; 0 before
    /// the first.
    ejected_until: AtomicU64,
    /// Envoy's ejection time multiplier as of the last ejection.
    multiplier: AtomicU32,
    /// Ejections so far.
    ejections: AtomicU32,
}

/// The instant ejection deadlines count from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn nanos(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch()).as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// The interval timer's ticks fall on whole intervals since [`epoch`] (Envoy's start when
/// the cluster's detector is made, at a phase no client can see).
fn interval_nanos(interval: Duration) -> u64 {
    u64::try_from(interval.as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl Outlier {
    /// Whether the endpoint is ejected at `now`.
    pub fn ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Acquire);
        until != 0 && nanos(now) < until
    }

    /// Times the endpoint has been ejected.
    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Takes in how a request ended; when a threshold of `detection` is reached and
    /// `may_eject` (the cluster's `max_ejection_percent`) allows it, ejects the endpoint
    /// from `now` and says why.
    pub fn report(
        &self,
        detection: &Detection,
        outcome: Outcome,
        now: Instant,
        may_eject: impl FnOnce() -> bool,
    ) -> Option<Reason> {
        if self.ejected(now) {
            return None;
        }
        let (five_xx, gateway, local) = match outcome {
            Outcome::Status(s) => ((500..600).contains(&s), matches!(s, 502..=504), false),
            // Without the split, Envoy counts a local-origin failure as a 503 from upstream.
            Outcome::LocalFailure if !detection.split_local_origin => (true, true, false),
            Outcome::LocalFailure => (false, false, true),
        };
        let count = |counter: &AtomicU32, hit: bool| {
            if hit {
                counter.fetch_add(1, Ordering::AcqRel) + 1
            } else {
                counter.store(0, Ordering::Release);
                0
            }
        };
        let n5xx = count(&self.consecutive_5xx, five_xx);
        let ngw = count(&self.consecutive_gateway, gateway);
        let nlocal = if detection.split_local_origin {
            count(&self.consecutive_local, local)
        } else {
            0
        };
        let reached = |n: u32, threshold: Option<u32>| threshold.is_some_and(|t| t > 0 && n >= t);
        let reason = if reached(n5xx, detection.consecutive_5xx) {
            Reason::Consecutive5xx
        } else if reached(ngw, detection.consecutive_gateway) {
            Reason::ConsecutiveGateway
        } else if reached(nlocal, detection.consecutive_local_origin) {
            Reason::ConsecutiveLocalOrigin
        } else {
            return None;
        };
        for counter in [
            &self.consecutive_5xx,
            &self.consecutive_gateway,
            &self.consecutive_local,
        ] {
            counter.store(0, Ordering::Release);
        }
        if !may_eject() {
            return None;
        }
        self.ejections.fetch_add(1, Ordering::AcqRel);
        let at = nanos(now);
        let tick = interval_nanos(detection.interval);
        // Each tick since the last ejection ended, the endpoint healthy, lowered the
        // multiplier by one; it rises by one per ejection while the base times it stays
        // under the maximum.
        let last_end = self.ejected_until.load(Ordering::Acquire);
        let healthy_ticks = if last_end == 0 {
            0
        } else {
            u32::try_from(at.saturating_sub(last_end) / tick).unwrap_or(u32::MAX)
        };
        let cap = detection.max_ejection.max(detection.base_ejection);
        let mut multiplier = self
            .multiplier
            .load(Ordering::Acquire)
            .saturating_sub(healthy_ticks);
        if detection.base_ejection.saturating_mul(multiplier) < cap {
            multiplier += 1;
        }
        self.multiplier.store(multiplier, Ordering::Release);
        let length = detection.base_ejection.saturating_mul(multiplier).min(cap);
        // The host comes back at the first tick once its time is up.
        let due = nanos(now + length);
        let until = due.div_ceil(tick).saturating_mul(tick);
        self.ejected_until.store(until, Ordering::Release);
        Some(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detection() -> Detection {
        Detection {
            consecutive_5xx: Some(3),
            consecutive_gateway: Some(2),
            ..Detection::default()
        }
    }

    /// An instant on a tick of the default 10 s interval.
    fn on_tick() -> Instant {
        epoch() + Duration::from_secs(100)
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_resets_the_count() {
        let o = Outlier::default();
        let d = Detection {
            consecutive_gateway: None,
            ..detection()
        };
        let t = on_tick();
        assert_eq!(o.report(&d, Outcome::Status(500), t, || true), None);
        assert_eq!(o.report(&d, Outcome::Status(500), t, || true), None);
        assert_eq!(o.report(&d, Outcome::Status(200), t, || true), None);
        assert_eq!(o.report(&d, Outcome::Status(500), t, || true), None);
        assert_eq!(o.report(&d, Outcome::LocalFailure, t, || true), None);
        assert_eq!(
            o.report(&d, Outcome::Status(503), t, || true),
            Some(Reason::Consecutive5xx)
        );
        assert!(o.ejected(t));
        assert!(o.ejected(t + Duration::from_secs(29)));
        assert!(!o.ejected(t + Duration::from_secs(30)));
    }

    #[test]
    fn gateway_failures_and_the_ejection_multiplier() {
        let o = Outlier::default();
        let d = detection();
        let t = on_tick();
        o.report(&d, Outcome::Status(502), t, || true);
        assert_eq!(
            o.report(&d, Outcome::Status(504), t, || true),
            Some(Reason::ConsecutiveGateway)
        );
        // The second ejection lasts twice the base, capped at the maximum.
        let t2 = t + Duration::from_secs(30);
        o.report(&d, Outcome::Status(502), t2, || true);
        o.report(&d, Outcome::Status(502), t2, || true);
        assert!(o.ejected(t2 + Duration::from_secs(59)));
        assert!(!o.ejected(t2 + Duration::from_secs(60)));
        let capped = Detection {
            max_ejection: Duration::from_secs(45),
            ..d
        };
        let t3 = t2 + Duration::from_secs(60);
        o.report(&capped, Outcome::Status(502), t3, || true);
        o.report(&capped, Outcome::Status(502), t3, || true);
        assert_eq!(o.ejections(), 3);
        // 45 s are up between two ticks: the endpoint comes back at the next one.
        assert!(o.ejected(t3 + Duration::from_secs(45)));
        assert!(!o.ejected(t3 + Duration::from_secs(50)));
    }

    #[test]
    fn the_multiplier_falls_by_one_per_interval_spent_healthy() {
        let d = Detection {
            consecutive_5xx: Some(1),
            ..Detection::default()
        };
        let eject = |o: &Outlier, at: Instant| {
            assert!(o.report(&d, Outcome::Status(500), at, || true).is_some());
        };
        let t = on_tick();
        // Ejected again as soon as it is back: 30 s, then 60 s.
        let again = Outlier::default();
        eject(&again, t);
        eject(&again, t + Duration::from_secs(30));
        assert!(again.ejected(t + Duration::from_secs(89)));
        assert!(!again.ejected(t + Duration::from_secs(90)));
        // Back for two ticks first: the multiplier fell from 1 to 0, so 30 s again.
        let rested = Outlier::default();
        eject(&rested, t);
        let later = t + Duration::from_secs(55);
        eject(&rested, later);
        assert!(rested.ejected(later + Duration::from_secs(25)));
        // 30 s from 55 s end at 85 s, between ticks: back at 90 s.
        assert!(rested.ejected(later + Duration::from_secs(34)));
        assert!(!rested.ejected(later + Duration::from_secs(35)));
    }

    #[test]
    fn local_origin_failures_split_and_the_ejection_limit() {
        let o = Outlier::default();
        let split = Detection {
            consecutive_5xx: Some(2),
            consecutive_gateway: None,
            consecutive_local_origin: Some(2),
            split_local_origin: true,
            ..Detection::default()
        };
        let t = Instant::now();
        // Split: local failures do not count as 5xx.
        o.report(&split, Outcome::LocalFailure, t, || true);
        o.report(&split, Outcome::Status(500), t, || true);
        assert_eq!(
            o.report(&split, Outcome::LocalFailure, t, || true),
            None,
            "a response in between (the connection worked) resets the local count"
        );
        let o = Outlier::default();
        o.report(&split, Outcome::LocalFailure, t, || true);
        assert_eq!(
            o.report(&split, Outcome::LocalFailure, t, || true),
            Some(Reason::ConsecutiveLocalOrigin)
        );
        // At the cluster's limit the endpoint stays in, and counts again from zero.
        let o = Outlier::default();
        o.report(&split, Outcome::Status(500), t, || false);
        assert_eq!(o.report(&split, Outcome::Status(500), t, || false), None);
        assert!(!o.ejected(t));
    }
}
