//! What a config source holds of each resource, source-neutral: the active and warming
//! versions and the last rejected update. `/config_dump` renders it in Envoy's
//! `ConfigDump` shape whether the resources came over xDS or from files.

use std::collections::BTreeMap;
use std::time::SystemTime;

use crate::{Cluster, ClusterLoadAssignment, Listener, RouteConfiguration};

/// One accepted version of a resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    /// The resource.
    pub resource: T,
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
