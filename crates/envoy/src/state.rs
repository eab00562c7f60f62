//! What a config source holds of each resource, source-neutral: the active and warming
//! versions and the last rejected update. `/config_dump` renders it in Envoy's
//! `ConfigDump` shape whether the resources came over xDS or from files.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use crate::{Cluster, ClusterLoadAssignment, Listener, RouteConfiguration};

/// One accepted version of a resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    /// The resource, shared with the snapshots built from it.
    pub resource: Arc<T>,
    /// The version it came with (xDS `version_info` or the resource's own version).
    pub version: String,
    /// When it was accepted.
    pub last_updated: SystemTime,
}

/// Envoy's `UpdateFailureState`: the last update of a resource that was rejected.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateFailure {
    /// The type URL of what failed (its content could not be converted, so it is not kept).
    pub type_url: String,
    /// Why it was rejected: the field and the reason.
    pub details: String,
    /// The version of the rejected update.
    pub version: String,
    /// When the update was attempted.
    pub last_update_attempt: SystemTime,
}

/// What a source holds of one named resource.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceState<T> {
    /// The version in use, if any.
    pub active: Option<Versioned<T>>,
    /// A newer version waiting for what it needs (a cluster's endpoints, a listener's
    /// routes); the active one keeps serving meanwhile.
    pub warming: Option<Versioned<T>>,
    /// The last rejected update, cleared by the next accepted one.
    pub error: Option<UpdateFailure>,
}

impl<T> Default for ResourceState<T> {
    fn default() -> Self {
        ResourceState {
            active: None,
            warming: None,
            error: None,
        }
    }
}

/// Every resource a source holds, per type and by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceState {
    /// Listeners.
    pub listeners: BTreeMap<String, ResourceState<Listener>>,
    /// Route configurations.
    pub routes: BTreeMap<String, ResourceState<RouteConfiguration>>,
    /// Clusters.
    pub clusters: BTreeMap<String, ResourceState<Cluster>>,
    /// Cluster load assignments, by cluster (or EDS service) name.
    pub endpoints: BTreeMap<String, ResourceState<ClusterLoadAssignment>>,
}

impl SourceState {
    /// The active version of every resource: what the data path is built from.
    pub fn active(&self) -> crate::Resources {
        fn active<T>(m: &BTreeMap<String, ResourceState<T>>) -> BTreeMap<String, Arc<T>> {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), Arc::clone(&v.active.as_ref()?.resource))))
                .collect()
        }
        crate::Resources {
            listeners: active(&self.listeners),
            routes: active(&self.routes),
            clusters: active(&self.clusters),
            endpoints: active(&self.endpoints),
        }
    }

    /// A state holding `resources` as active, each at `version`: how a source without
    /// versions of its own (the files) shows in `/config_dump`.
    pub fn of(resources: crate::Resources, version: &str, at: SystemTime) -> SourceState {
        fn all<T>(
            m: BTreeMap<String, Arc<T>>,
            version: &str,
            at: SystemTime,
        ) -> BTreeMap<String, ResourceState<T>> {
            m.into_iter()
                .map(|(name, resource)| {
                    let active = Versioned {
                        resource,
                        version: version.to_owned(),
                        last_updated: at,
                    };
                    (
                        name,
                        ResourceState {
                            active: Some(active),
                            ..ResourceState::default()
                        },
                    )
                })
                .collect()
        }
        SourceState {
            listeners: all(resources.listeners, version, at),
            routes: all(resources.routes, version, at),
            clusters: all(resources.clusters, version, at),
            endpoints: all(resources.endpoints, version, at),
        }
    }

    /// Adds `other`'s resources under names this state does not hold: with two sources,
    /// the one merged into wins a name both use.
    pub fn fill_from(&mut self, other: SourceState) {
        fn fill<T>(
            into: &mut BTreeMap<String, ResourceState<T>>,
            from: BTreeMap<String, ResourceState<T>>,
        ) {
            for (name, state) in from {
                into.entry(name).or_insert(state);
            }
        }
        fill(&mut self.listeners, other.listeners);
        fill(&mut self.routes, other.routes);
        fill(&mut self.clusters, other.clusters);
        fill(&mut self.endpoints, other.endpoints);
    }
}
