//! What a config source holds of each resource, source-neutral: the active and warming
//! versions and the last rejected update. `/config_dump` renders it in Envoy's
//! `ConfigDump` shape whether the resources came over xDS or from files.

use std::sync::Arc;
use std::time::SystemTime;

use imbl::ordmap::DiffItem;

use crate::{Cluster, ClusterLoadAssignment, Listener, Named, RouteConfiguration};

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
    pub listeners: Named<ResourceState<Listener>>,
    /// Route configurations.
    pub routes: Named<ResourceState<RouteConfiguration>>,
    /// Clusters.
    pub clusters: Named<ResourceState<Cluster>>,
    /// Cluster load assignments, by cluster (or EDS service) name.
    pub endpoints: Named<ResourceState<ClusterLoadAssignment>>,
}

impl SourceState {
    /// The active version of every resource: what the data path is built from.
    pub fn active(&self) -> crate::Resources {
        fn active<T: Clone>(m: &Named<ResourceState<T>>) -> Named<Arc<T>> {
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

    /// What [`SourceState::active`] returns, found from `before`'s active set `was`
    /// (`before.active()`) and what changed since `before`: a push to a mesh-sized state
    /// costs the resources it changed, as the maps share what did not.
    pub fn active_since(&self, before: &SourceState, was: &crate::Resources) -> crate::Resources {
        fn since<T: Clone + PartialEq>(
            now: &Named<ResourceState<T>>,
            before: &Named<ResourceState<T>>,
            was: &Named<Arc<T>>,
        ) -> Named<Arc<T>> {
            let mut active = was.clone();
            for change in before.diff(now) {
                let (name, state) = match change {
                    DiffItem::Add(name, state)
                    | DiffItem::Update {
                        new: (name, state), ..
                    } => (name, Some(state)),
                    DiffItem::Remove(name, _) => (name, None),
                };
                match state.and_then(|s| s.active.as_ref()) {
                    Some(v) => {
                        active.insert(name.clone(), Arc::clone(&v.resource));
                    }
                    None => {
                        active.remove(name);
                    }
                }
            }
            active
        }
        crate::Resources {
            listeners: since(&self.listeners, &before.listeners, &was.listeners),
            routes: since(&self.routes, &before.routes, &was.routes),
            clusters: since(&self.clusters, &before.clusters, &was.clusters),
            endpoints: since(&self.endpoints, &before.endpoints, &was.endpoints),
        }
    }

    /// A state holding `resources` as active, each at `version`: how a source without
    /// versions of its own (the files) shows in `/config_dump`.
    pub fn of(resources: crate::Resources, version: &str, at: SystemTime) -> SourceState {
        fn all<T: Clone>(
            m: Named<Arc<T>>,
            version: &str,
            at: SystemTime,
        ) -> Named<ResourceState<T>> {
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
        fn fill<T: Clone>(into: &mut Named<ResourceState<T>>, from: Named<ResourceState<T>>) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn versioned<T>(resource: T) -> Versioned<T> {
        Versioned {
            resource: Arc::new(resource),
            version: "1".into(),
            last_updated: SystemTime::UNIX_EPOCH,
        }
    }

    fn assignment(name: &str, priority: u32) -> ClusterLoadAssignment {
        ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![crate::LocalityLbEndpoints {
                priority,
                ..Default::default()
            }],
        }
    }

    fn active(name: &str, priority: u32) -> ResourceState<ClusterLoadAssignment> {
        ResourceState {
            active: Some(versioned(assignment(name, priority))),
            ..ResourceState::default()
        }
    }

    #[test]
    fn active_since_agrees_with_active_through_adds_updates_warming_and_removals() {
        let mut state = SourceState::default();
        for i in 0..300 {
            let name = format!("outbound|80||s{i:03}.example");
            state.endpoints.insert(name.clone(), active(&name, 0));
        }
        state.routes.insert(
            "80".into(),
            ResourceState {
                active: Some(versioned(RouteConfiguration {
                    name: "80".into(),
                    ..Default::default()
                })),
                ..ResourceState::default()
            },
        );
        let mut was = state.active();
        let steps: [&dyn Fn(&mut SourceState); 5] = [
            // An endpoint update.
            &|s| {
                let name = "outbound|80||s007.example";
                s.endpoints.insert(name.into(), active(name, 1));
            },
            // A new resource, and one removed.
            &|s| {
                let name = "outbound|80||new.example";
                s.endpoints.insert(name.into(), active(name, 0));
                s.endpoints.remove("outbound|80||s100.example");
            },
            // A resource that only failed: held, but not active.
            &|s| {
                s.endpoints.insert(
                    "outbound|80||failed.example".into(),
                    ResourceState::default(),
                );
            },
            // An active resource that loses its active version.
            &|s| {
                if let Some(e) = s.endpoints.get_mut("outbound|80||s200.example") {
                    e.active = None;
                }
            },
            // A change of another type.
            &|s| {
                s.routes.remove("80");
            },
        ];
        for step in steps {
            let before = state.clone();
            step(&mut state);
            let now = state.active_since(&before, &was);
            assert_eq!(now, state.active());
            was = now;
        }
        assert_eq!(was.endpoints.len(), 299);
        assert!(!was.endpoints.contains_key("outbound|80||failed.example"));
        assert!(was.routes.is_empty());
        assert_eq!(
            was.endpoints["outbound|80||s007.example"].endpoints[0].priority,
            1
        );
    }
}
