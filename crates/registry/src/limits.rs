//! Circuit breakers: a cluster's thresholds (Envoy's default priority) and the counts held
//! against them, in atomics only, so that the data path never takes a lock for them. Requests
//! waiting for a connection of a cluster that limits connections are woken when one of its
//! connections is closed or goes back to the pool.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use portcullis_envoy::Thresholds;
use thiserror::Error;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;

/// A threshold at this value is unlimited (Istio's default for every threshold): nothing is
/// counted against it, so the default path costs no atomic operation.
pub const UNLIMITED: u32 = u32::MAX;

/// A resource of a cluster that a circuit breaker bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// Upstream connections open (`max_connections`).
    Connections,
    /// Requests waiting for a connection (`max_pending_requests`).
    PendingRequests,
    /// Requests in flight upstream (`max_requests`).
    Requests,
    /// Retries in flight (`max_retries`).
    Retries,
}

/// What is held against a cluster's circuit breakers now. Carried across snapshots for the
/// same cluster name, so that a reload neither forgets nor double-counts what is in flight.
#[derive(Debug, Default)]
pub struct ClusterLoad {
    connections: AtomicU32,
    pending: AtomicU32,
    requests: AtomicU32,
    retries: AtomicU32,
    /// Signalled when a connection of a limited cluster closes or becomes idle.
    released: Notify,
}

impl ClusterLoad {
    fn counter(&self, resource: Resource) -> &AtomicU32 {
        match resource {
            Resource::Connections => &self.connections,
            Resource::PendingRequests => &self.pending,
            Resource::Requests => &self.requests,
            Resource::Retries => &self.retries,
        }
    }

    /// Units of `resource` held now (those of limited thresholds only).
    pub fn held(&self, resource: Resource) -> u32 {
        self.counter(resource).load(Ordering::Relaxed)
    }

    /// Resolves at the next [`ClusterLoad::wake`] after it is enabled or first polled: a
    /// waiter enables it before looking for a connection, so that no release is missed.
    pub fn released(&self) -> Notified<'_> {
        self.released.notified()
    }

    /// Wakes every request waiting for a connection of this cluster: one was closed or
    /// went back to the pool.
    pub fn wake(&self) {
        self.released.notify_waiters();
    }
}

/// The threshold of `resource` was reached: Envoy's overflow (`UO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("circuit breaker {0:?} overflow")]
pub struct Overflow(pub Resource);

/// One unit of a cluster resource, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    load: Arc<ClusterLoad>,
    resource: Resource,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.load
            .counter(self.resource)
            .fetch_sub(1, Ordering::AcqRel);
    }
}

/// A cluster's circuit breakers: thresholds from this snapshot, counts shared with the
/// same cluster in earlier and later snapshots.
#[derive(Debug, Clone)]
pub struct CircuitBreakers {
    /// The thresholds.
    pub thresholds: Thresholds,
    /// The counts held against them.
    pub load: Arc<ClusterLoad>,
}

impl CircuitBreakers {
    /// Every threshold unlimited.
    pub fn unlimited() -> Self {
        CircuitBreakers {
            thresholds: Thresholds {
                max_connections: UNLIMITED,
                max_pending_requests: UNLIMITED,
                max_requests: UNLIMITED,
                max_retries: UNLIMITED,
            },
            load: Arc::default(),
        }
    }

    /// The threshold of `resource`.
    pub fn threshold(&self, resource: Resource) -> u32 {
        let t = &self.thresholds;
        match resource {
            Resource::Connections => t.max_connections,
            Resource::PendingRequests => t.max_pending_requests,
            Resource::Requests => t.max_requests,
            Resource::Retries => t.max_retries,
        }
    }

    /// Takes one unit of `resource`, held until the slot is dropped. `Ok(None)` when the
    /// threshold is unlimited: nothing is counted then. A unit taken while a threshold was
    /// unlimited is not counted after a reload limits it, as it was never taken.
    pub fn acquire(&self, resource: Resource) -> Result<Option<Slot>, Overflow> {
        let max = self.threshold(resource);
        if max == UNLIMITED {
            return Ok(None);
        }
        self.load
            .counter(resource)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| Overflow(resource))?;
        Ok(Some(Slot {
            load: Arc::clone(&self.load),
            resource,
        }))
    }

    /// Whether one more unit of `resource` could be taken now.
    pub fn has_room(&self, resource: Resource) -> bool {
        let max = self.threshold(resource);
        max == UNLIMITED || self.load.held(resource) < max
    }

    /// Takes one unit of `resource` over its threshold: Envoy's connection pool opens a
    /// first connection to an endpoint even when the cluster is at `max_connections`, and
    /// counts it.
    pub fn force(&self, resource: Resource) -> Slot {
        self.load.counter(resource).fetch_add(1, Ordering::AcqRel);
        Slot {
            load: Arc::clone(&self.load),
            resource,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_threshold_admits_that_many_at_once_and_frees_on_drop() {
        let breakers = CircuitBreakers {
            thresholds: Thresholds {
                max_requests: 2,
                ..CircuitBreakers::unlimited().thresholds
            },
            load: Arc::default(),
        };
        let a = breakers.acquire(Resource::Requests).unwrap();
        let b = breakers.acquire(Resource::Requests).unwrap();
        assert!(a.is_some() && b.is_some());
        assert_eq!(
            breakers.acquire(Resource::Requests).unwrap_err(),
            Overflow(Resource::Requests)
        );
        assert_eq!(breakers.load.held(Resource::Requests), 2);
        drop(a);
        assert_eq!(breakers.load.held(Resource::Requests), 1);
        let c = breakers.acquire(Resource::Requests).unwrap();
        assert!(c.is_some());
        // Other resources are bounded apart.
        assert!(breakers.acquire(Resource::Retries).unwrap().is_none());
        drop((b, c));
        assert_eq!(breakers.load.held(Resource::Requests), 0);
    }

    #[test]
    fn unlimited_counts_nothing() {
        let breakers = CircuitBreakers::unlimited();
        let slots: Vec<_> = (0..10)
            .map(|_| breakers.acquire(Resource::Connections).unwrap())
            .collect();
        assert!(slots.iter().all(Option::is_none));
        assert_eq!(breakers.load.held(Resource::Connections), 0);
    }

    #[test]
    fn a_forced_unit_counts_over_the_threshold() {
        let breakers = CircuitBreakers {
            thresholds: Thresholds {
                max_connections: 1,
                ..CircuitBreakers::unlimited().thresholds
            },
            load: Arc::default(),
        };
        let first = breakers.acquire(Resource::Connections).unwrap();
        let over = breakers.force(Resource::Connections);
        assert_eq!(breakers.load.held(Resource::Connections), 2);
        drop(first);
        // Still at the threshold while the forced one is open.
        assert!(breakers.acquire(Resource::Connections).is_err());
        drop(over);
        assert!(breakers.acquire(Resource::Connections).unwrap().is_some());
    }

    #[tokio::test]
    async fn a_waiter_enabled_before_the_release_sees_it() {
        let load = ClusterLoad::default();
        let released = load.released();
        tokio::pin!(released);
        released.as_mut().enable();
        load.wake();
        released.await;
    }

    #[test]
    fn zero_admits_nothing() {
        let breakers = CircuitBreakers {
            thresholds: Thresholds {
                max_retries: 0,
                ..CircuitBreakers::unlimited().thresholds
            },
            load: Arc::default(),
        };
        assert!(breakers.acquire(Resource::Retries).is_err());
    }
}
