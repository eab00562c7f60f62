//! Envoy's outlier detection for one endpoint: consecutive 5xx, gateway failures and
//! local-origin failures eject it for the base ejection time times the number of times it
//! was ejected, capped at the maximum ejection time. The state lives in the endpoint's
//! [`crate::EndpointState`], so it outlasts config reloads as Envoy's host monitors do.
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
    /// The first ejection's length; later ones are multiplied by their count.
    pub base_ejection: Duration,
    /// The longest an ejection lasts.
    pub max_ejection: Duration,
    /// The share of the cluster's endpoints that may be ejected at once (at least one is).
    pub max_ejection_percent: u32,
}

impl Default for Detection {
    /// Envoy's defaults: 5 consecutive 5xx enforced, gateway failures not, 30 s base
    /// ejection, 300 s at most, 10% of the endpoints.
    fn default() -> Self {
        Detection {
            consecutive_5xx: Some(5),
            consecutive_gateway: None,
            consecutive_local_origin: None,
            split_local_origin: false,
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
    /// When the current ejection ends, in nanoseconds since [`epoch`]; 0 when not ejected.
    ejected_until: AtomicU64,
    /// Ejections so far (Envoy's ejection time multiplier).
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
        let times = self.ejections.fetch_add(1, Ordering::AcqRel) + 1;
        let length = detection
            .base_ejection
            .saturating_mul(times)
            .min(detection.max_ejection.max(detection.base_ejection));
        self.ejected_until
            .store(nanos(now + length), Ordering::Release);
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

    #[test]
    fn consecutive_failures_eject_and_a_success_resets_the_count() {
        let o = Outlier::default();
        let d = Detection {
            consecutive_gateway: None,
            ..detection()
        };
        let t = Instant::now();
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
        let t = Instant::now();
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
        assert!(!o.ejected(t3 + Duration::from_secs(45)));
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
