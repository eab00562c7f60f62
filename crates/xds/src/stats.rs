//! Counters with Envoy's names, for the admin server to render.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::type_url;

/// Envoy's per-subscription counters (`update_attempt`, `update_success`, ...).
#[derive(Debug, Default)]
pub struct SubscriptionStats {
    /// Responses received.
    pub update_attempt: AtomicU64,
    /// Responses applied in full and ACKed.
    pub update_success: AtomicU64,
    /// Responses NACKed (some or all of their resources refused).
    pub update_rejected: AtomicU64,
    /// Streams that ended or failed to start while the type was subscribed.
    pub update_failure: AtomicU64,
}

/// The client's counters; shared with the admin server, updated without locks.
#[derive(Debug, Default)]
pub struct XdsStats {
    /// `control_plane.connected_state`: 1 while a stream is up.
    pub connected_state: AtomicU64,
    /// `cluster_manager.cds.*`.
    pub cds: SubscriptionStats,
    /// `listener_manager.lds.*`.
    pub lds: SubscriptionStats,
    /// RDS, summed over route configurations (Envoy keeps them per route configuration).
    pub rds: SubscriptionStats,
    /// EDS, summed over clusters (Envoy keeps them per cluster).
    pub eds: SubscriptionStats,
}

impl XdsStats {
    /// The counters of one type URL, if it is one of the four.
    pub fn subscription(&self, type_url: &str) -> Option<&SubscriptionStats> {
        match type_url {
            type_url::CLUSTER => Some(&self.cds),
            type_url::LISTENER => Some(&self.lds),
            type_url::ROUTE => Some(&self.rds),
            type_url::ENDPOINT => Some(&self.eds),
            _ => None,
        }
    }

    /// Every counter under its Envoy-style name, in a fixed order.
    pub fn entries(&self) -> Vec<(String, u64)> {
        let mut out = vec![(
            "control_plane.connected_state".to_owned(),
            self.connected_state.load(Ordering::Relaxed),
        )];
        for (prefix, s) in [
            ("cluster_manager.cds", &self.cds),
            ("listener_manager.lds", &self.lds),
            ("rds", &self.rds),
            ("eds", &self.eds),
        ] {
            for (name, counter) in [
                ("update_attempt", &s.update_attempt),
                ("update_success", &s.update_success),
                ("update_rejected", &s.update_rejected),
                ("update_failure", &s.update_failure),
            ] {
                out.push((format!("{prefix}.{name}"), counter.load(Ordering::Relaxed)));
            }
        }
        out
    }
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_carry_envoys_names() {
        let stats = XdsStats::default();
        bump(&stats.cds.update_rejected);
        stats.connected_state.store(1, Ordering::Relaxed);
        let entries = stats.entries();
        assert!(entries.contains(&("control_plane.connected_state".to_owned(), 1)));
        assert!(entries.contains(&("cluster_manager.cds.update_rejected".to_owned(), 1)));
        assert!(entries.contains(&("listener_manager.lds.update_success".to_owned(), 0)));
        assert_eq!(entries.len(), 17);
    }
}
