//! The xDS state: every resource received, per type and by name, with Envoy's partial
//! acceptance, removal and warming.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::config::core::v3::{self as core, TrafficDirection};
use envoy_types::pb::envoy::config::{
    cluster::v3 as cds, endpoint::v3 as eds, listener::v3 as lds, route::v3 as rds,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::service::discovery::v3::Resource;
use envoy_types::pb::google::protobuf::Any;
use imbl::ordmap::DiffItem;
use portcullis_envoy::state::{ResourceState, SourceState, UpdateFailure, Versioned};
use portcullis_envoy::{
    CLUSTER_TYPE, Cluster, Discovery, ENDPOINT_TYPE, LISTENER_TYPE, Listener, Named, ROUTE_TYPE,
    Resources,
};
use prost::{Message, Name};
use tokio::time::Instant;

use crate::common::{Invalid, duration, unpack};
use crate::listener::rds_names;

/// Envoy's default `initial_fetch_timeout`: how long a cluster waits for its endpoints and a
/// listener for its routes before it is used without them, when their config source sets
/// none (zero: no end).
pub const INITIAL_FETCH_TIMEOUT: Duration = Duration::from_secs(15);

/// The four resource types portcullis takes over xDS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceType {
    /// LDS.
    Listener,
    /// RDS.
    Route,
    /// CDS.
    Cluster,
    /// EDS.
    Endpoint,
}

impl ResourceType {
    /// The type of a type URL, if portcullis takes it.
    pub fn from_type_url(type_url: &str) -> Option<ResourceType> {
        match type_url {
            LISTENER_TYPE => Some(ResourceType::Listener),
            ROUTE_TYPE => Some(ResourceType::Route),
            CLUSTER_TYPE => Some(ResourceType::Cluster),
            ENDPOINT_TYPE => Some(ResourceType::Endpoint),
            _ => None,
        }
    }

    /// The type URL.
    pub fn type_url(self) -> &'static str {
        match self {
            ResourceType::Listener => LISTENER_TYPE,
            ResourceType::Route => ROUTE_TYPE,
            ResourceType::Cluster => CLUSTER_TYPE,
            ResourceType::Endpoint => ENDPOINT_TYPE,
        }
    }
}

/// A resource of a response that was not applied, for the NACK's `error_detail`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The resource's name (or `<resource N>` when it could not even be decoded).
    pub name: String,
    /// `field: reason`.
    pub reason: String,
}

/// What applying one response did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Resources rejected; the response is NACKed when this is not empty, and the rejected
    /// resources keep their previous version.
    pub rejected: Vec<Rejected>,
    /// Route configurations the listeners now need (the RDS subscription).
    pub routes_needed: imbl::OrdSet<String>,
    /// Cluster load assignments the clusters now need (the EDS subscription).
    pub endpoints_needed: imbl::OrdSet<String>,
}

impl Applied {
    /// The NACK's `error_detail` message, one `name: field: reason` line per rejected
    /// resource; `None` when the response is to be ACKed.
    pub fn error_detail(&self) -> Option<String> {
        (!self.rejected.is_empty()).then(|| {
            self.rejected
                .iter()
                .map(|r| format!("{}: {}", r.name, r.reason))
                .collect::<Vec<_>>()
                .join("\n")
        })
    }
}

/// The resources received over xDS and what is active of them.
#[derive(Debug)]
pub struct XdsState {
    state: SourceState,
    initial_fetch_timeout: Duration,
    /// When each warming listener or cluster stops waiting (`None`: never, as with
    /// Istio's `initial_fetch_timeout: 0s`).
    warming: HashMap<(ResourceType, String), Option<Instant>>,
    lds_received: bool,
    cds_received: bool,
    /// What the listeners and clusters need, kept from their last response.
    needed: Applied,
    /// How many listener and cluster versions need each name in `needed`.
    needs: Needs,
}

/// How many versions (active or warming) of the listeners and clusters need each route
/// configuration and cluster load assignment, counted from the changes of each response:
/// a response that adds one cluster to a mesh's thousands costs one cluster.
#[derive(Debug, Default)]
struct Needs {
    /// The listeners as last counted.
    listeners: Named<ResourceState<Listener>>,
    /// The clusters as last counted.
    clusters: Named<ResourceState<Cluster>>,
    routes: imbl::OrdMap<String, usize>,
    endpoints: imbl::OrdMap<String, usize>,
}

/// Counts the names `names` finds in each version of what changed from `counted` to
/// `now` into `counts`, keeping `needed` to the names counted at least once; returns the
/// names `needed` no longer has.
fn recount<T: Clone + PartialEq>(
    counted: &mut Named<ResourceState<T>>,
    now: &Named<ResourceState<T>>,
    counts: &mut imbl::OrdMap<String, usize>,
    needed: &mut imbl::OrdSet<String>,
    names: impl Fn(&T) -> Vec<String>,
) -> Vec<String> {
    let before = needed.clone();
    let versions = |s: Option<&ResourceState<T>>| -> Vec<String> {
        s.into_iter()
            .flat_map(|s| s.active.iter().chain(&s.warming))
            .flat_map(|v| names(&v.resource))
            .collect()
    };
    let held = |s: Option<&ResourceState<T>>| {
        let mut versions = [None, None];
        if let Some(s) = s {
            versions =
                [&s.active, &s.warming].map(|v| v.as_ref().map(|v| Arc::as_ptr(&v.resource)));
            versions.sort();
        }
        versions
    };
    for change in counted.diff(now) {
        let (old, new) = match change {
            DiffItem::Add(_, new) => (None, Some(new)),
            DiffItem::Update { old, new } => (Some(old.1), Some(new.1)),
            DiffItem::Remove(_, old) => (Some(old), None),
        };
        // The same versions, moved (a warming version promoted): the same names.
        if held(old) == held(new) {
            continue;
        }
        for name in versions(new) {
            let count = counts.entry(name.clone()).or_insert(0);
            *count += 1;
            if *count == 1 {
                needed.insert(name);
            }
        }
        for name in versions(old) {
            if let Some(count) = counts.get_mut(&name) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(&name);
                    needed.remove(&name);
                }
            }
        }
    }
    counted.clone_from(now);
    // A name may reach zero and be counted again within one response: only the sets tell.
    before
        .diff(needed)
        .filter_map(|change| match change {
            imbl::ordset::DiffItem::Remove(name) => Some(name.clone()),
            imbl::ordset::DiffItem::Add(_) => None,
        })
        .collect()
}

impl Default for XdsState {
    fn default() -> Self {
        XdsState::new(INITIAL_FETCH_TIMEOUT)
    }
}

/// A decoded, converted resource of one of the four types.
enum Converted {
    Listener(Box<Listener>, FetchTimeouts, Vec<ClusterRef>),
    /// An inbound listener (`virtualInbound`): portcullis handles outbound traffic only.
    Inbound,
    Route(portcullis_envoy::RouteConfiguration, Vec<ClusterRef>),
    Cluster(Box<Cluster>, FetchTimeouts),
    Endpoint(portcullis_envoy::ClusterLoadAssignment),
}

/// Decodes and converts one resource; the name is known whenever the bytes decode.
fn convert(ty: ResourceType, any: &Any) -> (Option<String>, Result<Converted, Invalid>) {
    // Servers may wrap each resource in a `Resource` (Envoy accepts both).
    if any.type_url == Resource::type_url() {
        return match unpack::<Resource>(any) {
            Ok(Resource {
                resource: Some(inner),
                ..
            }) => convert(ty, &inner),
            Ok(_) => (None, Err(Invalid::new("resource", "required"))),
            Err(e) => (None, Err(e)),
        };
    }
    fn go<P: Message + Name + Default, T>(
        any: &Any,
        name: impl Fn(&P) -> &str,
        f: impl Fn(&P) -> Result<T, Invalid>,
    ) -> (Option<String>, Result<T, Invalid>) {
        match unpack::<P>(any) {
            Ok(p) => (Some(name(&p).to_string()), f(&p)),
            Err(e) => (None, Err(e)),
        }
    }
    match ty {
        ResourceType::Listener => {
            let (n, r) = go(
                any,
                |l: &lds::Listener| &l.name,
                |l| {
                    if l.traffic_direction == TrafficDirection::Inbound as i32 {
                        Ok(Converted::Inbound)
                    } else {
                        let timeout = rds_fetch_timeout(l);
                        let refs = inline_cluster_refs(l);
                        crate::listener(l).map(|l| Converted::Listener(Box::new(l), timeout, refs))
                    }
                },
            );
            (n, r)
        }
        ResourceType::Route => {
            go(
                any,
                |r: &rds::RouteConfiguration| &r.name,
                |r| {
                    // RDS validates clusters only when asked to (Envoy's default for RDS).
                    let refs = cluster_refs(r, false);
                    crate::route_configuration(r).map(|c| Converted::Route(c, refs))
                },
            )
        }
        ResourceType::Cluster => {
            let (n, r) = go(
                any,
                |c: &cds::Cluster| &c.name,
                |c| {
                    let timeout = vec![fetch_timeout(
                        c.eds_cluster_config
                            .as_ref()
                            .and_then(|e| e.eds_config.as_ref()),
                    )];
                    crate::cluster(c).map(|c| Converted::Cluster(Box::new(c), timeout))
                },
            );
            (n, r)
        }
        ResourceType::Endpoint => {
            let (n, r) = go(
                any,
                |a: &eds::ClusterLoadAssignment| &a.cluster_name,
                |a| crate::load_assignment(a, false),
            );
            (n, r.map(Converted::Endpoint))
        }
    }
}

/// A cluster a route configuration names and Envoy checks exists (`validate_clusters`).
struct ClusterRef {
    name: String,
    weighted: bool,
}

/// The clusters `rc` names that must exist when it is applied: none unless its
/// `validate_clusters` (or, unset, `default`) says so. Envoy's default is true for a route
/// configuration inline in a listener, false for one from RDS.
fn cluster_refs(rc: &rds::RouteConfiguration, default: bool) -> Vec<ClusterRef> {
    if !rc.validate_clusters.map_or(default, |v| v.value) {
        return Vec::new();
    }
    use rds::route_action::ClusterSpecifier as C;
    let mut refs = Vec::new();
    for route in rc.virtual_hosts.iter().flat_map(|vh| &vh.routes) {
        let Some(rds::route::Action::Route(action)) = &route.action else {
            continue;
        };
        match &action.cluster_specifier {
            Some(C::Cluster(name)) => refs.push(ClusterRef {
                name: name.clone(),
                weighted: false,
            }),
            Some(C::WeightedClusters(w)) => refs.extend(w.clusters.iter().map(|c| ClusterRef {
                name: c.name.clone(),
                weighted: true,
            })),
            _ => {}
        }
    }
    refs
}

/// The clusters the inline route configurations of a listener's HTTP connection managers
/// must find.
fn inline_cluster_refs(l: &lds::Listener) -> Vec<ClusterRef> {
    l.filter_chains
        .iter()
        .chain(&l.default_filter_chain)
        .flat_map(|c| &c.filters)
        .filter_map(|f| match &f.config_type {
            Some(lds::filter::ConfigType::TypedConfig(any)) => {
                unpack::<hcm::HttpConnectionManager>(any).ok()
            }
            _ => None,
        })
        .flat_map(|h| match &h.route_specifier {
            Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(rc)) => {
                cluster_refs(rc, true)
            }
            _ => Vec::new(),
        })
        .collect()
}

/// The `initial_fetch_timeout`s of the config sources a resource waits for, as given
/// (`None`: unset).
type FetchTimeouts = Vec<Option<Duration>>;

fn fetch_timeout(source: Option<&core::ConfigSource>) -> Option<Duration> {
    source
        .and_then(|s| s.initial_fetch_timeout.as_ref())
        .and_then(|d| duration("initial_fetch_timeout", d).ok())
}

/// The timeouts of a listener's RDS config sources.
fn rds_fetch_timeout(l: &lds::Listener) -> FetchTimeouts {
    l.filter_chains
        .iter()
        .chain(&l.default_filter_chain)
        .flat_map(|c| &c.filters)
        .filter_map(|f| match &f.config_type {
            Some(lds::filter::ConfigType::TypedConfig(any)) => {
                unpack::<hcm::HttpConnectionManager>(any).ok()
            }
            _ => None,
        })
        .filter_map(|h| match h.route_specifier {
            Some(hcm::http_connection_manager::RouteSpecifier::Rds(rds)) => {
                Some(fetch_timeout(rds.config_source.as_ref()))
            }
            _ => None,
        })
        .collect()
}

/// A new version of a resource; one equal to the active version shares it, so that the
/// snapshot built next reuses what was built from it (istiod resends unchanged resources).
fn versioned<T: PartialEq>(
    resource: T,
    version: &str,
    active: Option<&ResourceState<T>>,
) -> Versioned<T> {
    let resource = match active.and_then(|s| s.active.as_ref()) {
        Some(a) if *a.resource == resource => Arc::clone(&a.resource),
        _ => Arc::new(resource),
    };
    Versioned {
        resource,
        version: version.to_string(),
        last_updated: SystemTime::now(),
    }
}

impl XdsState {
    /// An empty state; `initial_fetch_timeout` bounds warming on config sources that set
    /// no timeout of their own (Envoy's default is [`INITIAL_FETCH_TIMEOUT`]).
    pub fn new(initial_fetch_timeout: Duration) -> XdsState {
        XdsState {
            state: SourceState::default(),
            initial_fetch_timeout,
            warming: HashMap::new(),
            needed: Applied::default(),
            needs: Needs::default(),
            lds_received: false,
            cds_received: false,
        }
    }

    /// Applies a State-of-the-World response. For LDS and CDS it is the full set, so a
    /// resource missing from it is removed; RDS and EDS responses carry only what changed
    /// (xDS protocol), and their resources go when nothing needs them any more.
    pub fn apply_sotw(&mut self, type_url: &str, version: &str, resources: &[Any]) -> Applied {
        let Some(ty) = ResourceType::from_type_url(type_url) else {
            return self.unknown_type(type_url);
        };
        let mut present = BTreeSet::new();
        let mut rejected = Vec::new();
        for (i, any) in resources.iter().enumerate() {
            let (name, result) = if any.type_url == type_url || any.type_url == Resource::type_url()
            {
                convert(ty, any)
            } else {
                (
                    None,
                    Err(Invalid::new(
                        "",
                        format!("type URL {} in a {type_url} response", any.type_url),
                    )),
                )
            };
            let name = name.unwrap_or_else(|| format!("<resource {i}>"));
            if !present.insert(name.clone()) {
                rejected.push(Rejected {
                    reason: format!("duplicate resource {name} in one response"),
                    name,
                });
                continue;
            }
            if let Some(r) = self.accept(ty, &name, version, result) {
                rejected.push(r);
            }
        }
        if matches!(ty, ResourceType::Listener | ResourceType::Cluster) {
            let gone: Vec<String> = match ty {
                ResourceType::Listener => keys_except(&self.state.listeners, &present),
                _ => keys_except(&self.state.clusters, &present),
            };
            for name in gone {
                self.remove(ty, &name);
            }
        }
        self.finish(ty, rejected)
    }

    /// Applies a Delta response: `added` are added or updated, `removed` are removed.
    pub fn apply_delta(
        &mut self,
        type_url: &str,
        added: &[Resource],
        removed: &[String],
    ) -> Applied {
        let Some(ty) = ResourceType::from_type_url(type_url) else {
            return self.unknown_type(type_url);
        };
        let mut rejected = Vec::new();
        for (i, r) in added.iter().enumerate() {
            let (decoded_name, result) = match &r.resource {
                Some(any) if any.type_url == type_url => convert(ty, any),
                Some(any) => (
                    None,
                    Err(Invalid::new(
                        "",
                        format!("type URL {} in a {type_url} response", any.type_url),
                    )),
                ),
                None => (None, Err(Invalid::new("resource", "required"))),
            };
            let name = if r.name.is_empty() {
                decoded_name.unwrap_or_else(|| format!("<resource {i}>"))
            } else {
                r.name.clone()
            };
            if let Some(r) = self.accept(ty, &name, &r.version, result) {
                rejected.push(r);
            }
        }
        for name in removed {
            self.remove(ty, name);
        }
        self.finish(ty, rejected)
    }

    fn unknown_type(&self, type_url: &str) -> Applied {
        let mut applied = self.needed.clone();
        applied.rejected.push(Rejected {
            name: String::new(),
            reason: format!("type URL {type_url} is not supported"),
        });
        applied
    }

    /// Records an accepted resource (active, or warming when what it needs is missing) or
    /// a rejection (the previous version stays).
    fn accept(
        &mut self,
        ty: ResourceType,
        name: &str,
        version: &str,
        result: Result<Converted, Invalid>,
    ) -> Option<Rejected> {
        let result = result.and_then(|c| {
            let refs = match &c {
                Converted::Listener(_, _, refs) | Converted::Route(_, refs) => refs.as_slice(),
                _ => &[],
            };
            self.check_clusters(refs).map(|()| c)
        });
        let converted = match result {
            Ok(c) => c,
            Err(e) => {
                let failure = UpdateFailure {
                    type_url: ty.type_url().to_string(),
                    details: e.to_string(),
                    version: version.to_string(),
                    last_update_attempt: SystemTime::now(),
                };
                tracing::warn!(type_url = ty.type_url(), name, version, error = %e, "xDS resource rejected");
                match ty {
                    ResourceType::Listener => set_error(&mut self.state.listeners, name, failure),
                    ResourceType::Route => set_error(&mut self.state.routes, name, failure),
                    ResourceType::Cluster => set_error(&mut self.state.clusters, name, failure),
                    ResourceType::Endpoint => set_error(&mut self.state.endpoints, name, failure),
                }
                return Some(Rejected {
                    name: name.to_string(),
                    reason: e.to_string(),
                });
            }
        };
        match converted {
            Converted::Inbound => {
                tracing::debug!(
                    name,
                    "inbound listener ignored: portcullis serves outbound only"
                );
                self.remove(ResourceType::Listener, name);
            }
            Converted::Listener(l, timeout, _) => {
                let warm = (!self.listener_ready(&l)).then_some(timeout);
                let v = versioned(*l, version, self.state.listeners.get(name));
                self.stage(ResourceType::Listener, name, v, warm);
            }
            Converted::Cluster(c, timeout) => {
                let warm = (!self.cluster_ready(&c)).then_some(timeout);
                let v = versioned(*c, version, self.state.clusters.get(name));
                self.stage(ResourceType::Cluster, name, v, warm);
            }
            Converted::Route(r, _) => {
                let entry = self.state.routes.entry(name.to_string()).or_default();
                entry.active = Some(versioned(r, version, Some(entry)));
                entry.error = None;
            }
            Converted::Endpoint(a) => {
                let entry = self.state.endpoints.entry(name.to_string()).or_default();
                entry.active = Some(versioned(a, version, Some(entry)));
                entry.error = None;
            }
        }
        None
    }

    /// Envoy's `validate_clusters`: every named cluster must be known (active or warming)
    /// when the route configuration is applied, in Envoy's words.
    fn check_clusters(&self, refs: &[ClusterRef]) -> Result<(), Invalid> {
        match refs.iter().find(|r| {
            self.state
                .clusters
                .get(&r.name)
                .is_none_or(|c| c.active.is_none() && c.warming.is_none())
        }) {
            None => Ok(()),
            Some(r) => Err(Invalid::new(
                "route",
                format!(
                    "unknown {}cluster '{}'",
                    if r.weighted { "weighted " } else { "" },
                    r.name
                ),
            )),
        }
    }

    /// Makes `v` active, or warming (the active version keeps serving) when `warm` says
    /// which config sources it waits for.
    fn stage<T: Clone>(
        &mut self,
        ty: ResourceType,
        name: &str,
        v: Versioned<T>,
        warm: Option<FetchTimeouts>,
    ) where
        XdsState: Staged<T>,
    {
        let key = (ty, name.to_string());
        let deadline = warm.map(|timeouts| self.deadline(&timeouts));
        let entry = self.entries().entry(name.to_string()).or_default();
        entry.error = None;
        match deadline {
            None => {
                entry.active = Some(v);
                entry.warming = None;
                self.warming.remove(&key);
            }
            Some(deadline) => {
                entry.warming = Some(v);
                self.warming.insert(key, deadline);
            }
        }
    }

    /// When a resource waiting on these sources stops waiting: at the longest of their
    /// timeouts (unset: the default), never if one of them is zero.
    fn deadline(&self, timeouts: &[Option<Duration>]) -> Option<Instant> {
        let mut longest = if timeouts.is_empty() {
            self.initial_fetch_timeout
        } else {
            Duration::ZERO
        };
        for t in timeouts {
            match t {
                None => longest = longest.max(self.initial_fetch_timeout),
                Some(t) if t.is_zero() => return None,
                Some(t) => longest = longest.max(*t),
            }
        }
        Instant::now().checked_add(longest)
    }

    fn remove(&mut self, ty: ResourceType, name: &str) {
        let removed = match ty {
            ResourceType::Listener => self.state.listeners.remove(name).is_some(),
            ResourceType::Route => self.state.routes.remove(name).is_some(),
            ResourceType::Cluster => self.state.clusters.remove(name).is_some(),
            ResourceType::Endpoint => self.state.endpoints.remove(name).is_some(),
        };
        self.warming.remove(&(ty, name.to_string()));
        if removed {
            tracing::info!(type_url = ty.type_url(), name, "xDS resource removed");
        }
    }

    /// Promotes what can be, drops routes and endpoints nothing needs any more (Envoy
    /// unsubscribes from them), and says what is needed now.
    fn finish(&mut self, ty: ResourceType, rejected: Vec<Rejected>) -> Applied {
        self.promote();
        // Only listeners and clusters say what is needed, so only their responses change it.
        match ty {
            ResourceType::Listener => {
                self.lds_received = true;
                let dropped = recount(
                    &mut self.needs.listeners,
                    &self.state.listeners,
                    &mut self.needs.routes,
                    &mut self.needed.routes_needed,
                    |l| rds_names(l).into_iter().map(str::to_owned).collect(),
                );
                for name in dropped {
                    self.state.routes.remove(&name);
                }
            }
            ResourceType::Cluster => {
                self.cds_received = true;
                let dropped = recount(
                    &mut self.needs.clusters,
                    &self.state.clusters,
                    &mut self.needs.endpoints,
                    &mut self.needed.endpoints_needed,
                    |c| match &c.discovery {
                        Discovery::Eds { service_name } => vec![service_name.clone()],
                        _ => Vec::new(),
                    },
                );
                for name in dropped {
                    self.state.endpoints.remove(&name);
                }
            }
            ResourceType::Route | ResourceType::Endpoint => {}
        }
        Applied {
            rejected,
            ..self.needed.clone()
        }
    }

    fn listener_ready(&self, l: &Listener) -> bool {
        rds_names(l).into_iter().all(|name| {
            self.state
                .routes
                .get(name)
                .is_some_and(|r| r.active.is_some())
        })
    }

    fn cluster_ready(&self, c: &Cluster) -> bool {
        match &c.discovery {
            Discovery::Eds { service_name } => self
                .state
                .endpoints
                .get(service_name)
                .is_some_and(|e| e.active.is_some()),
            _ => true,
        }
    }

    /// Makes active every warming resource whose dependencies arrived or whose
    /// `initial_fetch_timeout` passed. Returns whether anything changed.
    pub fn promote(&mut self) -> bool {
        let now = Instant::now();
        let expired = |deadline: Option<&Option<Instant>>| {
            deadline.is_some_and(|d| d.is_some_and(|d| now >= d))
        };
        // Only warming resources are visited: a mesh holds many clusters, few warm.
        let ready: Vec<(ResourceType, String)> = self
            .warming
            .iter()
            .filter(|((ty, name), deadline)| {
                let ready = match ty {
                    ResourceType::Cluster => self
                        .state
                        .clusters
                        .get(name)
                        .and_then(|e| e.warming.as_ref())
                        .is_some_and(|w| self.cluster_ready(&w.resource)),
                    _ => self
                        .state
                        .listeners
                        .get(name)
                        .and_then(|e| e.warming.as_ref())
                        .is_some_and(|w| self.listener_ready(&w.resource)),
                };
                ready || expired(Some(deadline))
            })
            .map(|(key, _)| key.clone())
            .collect();
        let changed = !ready.is_empty();
        // Promotion moves versions without changing which are held, so what was counted
        // stays counted: the counted maps take the promoted ones and keep sharing them,
        // and the next response's recount walks what it changed, not every promoted entry.
        let listeners_counted = self.needs.listeners.ptr_eq(&self.state.listeners);
        let clusters_counted = self.needs.clusters.ptr_eq(&self.state.clusters);
        for key in ready {
            self.warming.remove(&key);
            match key.0 {
                ResourceType::Cluster => promote_entry(self.state.clusters.get_mut(&key.1)),
                _ => promote_entry(self.state.listeners.get_mut(&key.1)),
            }
        }
        if listeners_counted {
            self.needs.listeners.clone_from(&self.state.listeners);
        }
        if clusters_counted {
            self.needs.clusters.clone_from(&self.state.clusters);
        }
        changed
    }

    /// When the next warming resource times out, if any is warming: call [`Self::promote`]
    /// then.
    pub fn next_warming_deadline(&self) -> Option<Instant> {
        self.warming.values().flatten().min().copied()
    }

    /// The route configurations and cluster load assignments the current listeners and
    /// clusters (active or warming) need.
    pub fn needed(&self) -> &Applied {
        &self.needed
    }

    /// The active resources: what the data path is built from.
    pub fn active(&self) -> Resources {
        self.state.active()
    }

    /// Whether readiness may turn on: CDS and LDS have answered, and nothing they brought
    /// is still warming (it got what it needs or timed out).
    pub fn initial_set_complete(&self) -> bool {
        self.lds_received && self.cds_received && self.warming.is_empty()
    }

    /// Everything held, with versions, warming and errors: what `/config_dump` shows.
    pub fn state(&self) -> &SourceState {
        &self.state
    }
}

/// Gives [`XdsState::stage`] the map of a warming type.
trait Staged<T> {
    fn entries(&mut self) -> &mut Named<ResourceState<T>>;
}

impl Staged<Listener> for XdsState {
    fn entries(&mut self) -> &mut Named<ResourceState<Listener>> {
        &mut self.state.listeners
    }
}

impl Staged<Cluster> for XdsState {
    fn entries(&mut self) -> &mut Named<ResourceState<Cluster>> {
        &mut self.state.clusters
    }
}

fn promote_entry<T>(entry: Option<&mut ResourceState<T>>) {
    if let Some(entry) = entry
        && let Some(w) = entry.warming.take()
    {
        entry.active = Some(w);
    }
}

fn set_error<T: Clone>(m: &mut Named<ResourceState<T>>, name: &str, failure: UpdateFailure) {
    m.entry(name.to_string()).or_default().error = Some(failure);
}

fn keys_except<T: Clone>(m: &Named<ResourceState<T>>, keep: &BTreeSet<String>) -> Vec<String> {
    m.keys().filter(|k| !keep.contains(*k)).cloned().collect()
}
