//! A sidecar's outbound config as istiod shapes it (`virtualOutbound` on 15001, the per-port
//! HTTP listener `0.0.0.0_80` with its routes over RDS `80`, EDS clusters), and the pushes of
//! issue 10's load test: small pushes that change endpoints or the route, one push of many
//! EDS clusters with their endpoints, and (issue 13) the pushes that add a new service.
//!
//! The same values go to portcullis and to real Envoy, so push-to-ACK times compare.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, LbPolicy,
};
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
use envoy_types::pb::envoy::config::listener::v3::listener_filter::ConfigType as ListenerFilterConfig;
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter,
};
use envoy_types::pb::envoy::config::route::v3::route::Action;
use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier as RouteCluster;
use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;
use envoy_types::pb::envoy::config::route::v3::{
    DirectResponseAction, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType as HttpFilterConfig;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::ClusterSpecifier as TcpCluster;
use envoy_types::pb::google::protobuf::{BoolValue, Duration, UInt32Value};
use envoy_types::util::pack_any;

use crate::resources::{address, ads_source, eds_cluster, workload_metadata};
use crate::{Any, ControlPlane, Error, type_url};

/// The host the load goes to; its route alternates between the two clusters.
pub const HOST: &str = "app.push.test";
/// The route configuration of port 80 (istiod names it after the port).
pub const ROUTE: &str = "80";
/// Where REGISTRY_ONLY sends what matches nothing.
pub const BLACKHOLE: &str = "BlackHoleCluster";
/// Istio's cluster for original-destination forwarding, always sent.
pub const PASSTHROUGH: &str = "PassthroughCluster";

/// One of the two clusters [`HOST`] is routed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Color {
    /// `outbound|80||blue.push.test`.
    Blue,
    /// `outbound|80||green.push.test`.
    Green,
}

impl Color {
    /// The cluster's name (also its EDS service name).
    pub fn cluster(self) -> &'static str {
        match self {
            Color::Blue => "outbound|80||blue.push.test",
            Color::Green => "outbound|80||green.push.test",
        }
    }

    /// The Deployment behind its endpoints: `app-blue` or `app-green` of namespace
    /// `default`, labelled `app: app` and `version: blue` or `green`.
    fn workload(self) -> Workload<'static> {
        let version = match self {
            Color::Blue => "blue",
            Color::Green => "green",
        };
        Workload {
            name: match self {
                Color::Blue => "app-blue",
                Color::Green => "app-green",
            },
            canonical_service: "app",
            canonical_revision: version,
        }
    }

    /// The other one.
    pub fn other(self) -> Color {
        match self {
            Color::Blue => Color::Green,
            Color::Green => Color::Blue,
        }
    }
}

/// The host name of the `n`th new service (from 0): `new-N.example`.
pub fn new_host(n: usize) -> String {
    format!("new-{n}.example")
}

/// The cluster of the `n`th new service: `outbound|80||new-N.example`.
pub fn new_cluster(n: usize) -> String {
    format!("outbound|80||{}", new_host(n))
}

/// The pushes of one new service ([`Sidecar::new_service`]).
#[derive(Debug, Clone)]
pub struct NewService {
    /// Its host name.
    pub host: String,
    /// CDS, EDS and RDS, in the order istiod sends them.
    pub pushes: [Push; 3],
}

/// The name of the `i`th cluster of the bulk push.
pub fn bulk_cluster(i: usize) -> String {
    format!("outbound|80||svc-{i}.bulk.push.test")
}

/// A workload of namespace [`NAMESPACE`] in cluster [`CLUSTER_ID`], as its endpoints' metadata
/// names it.
#[derive(Debug, Clone, Copy)]
struct Workload<'a> {
    name: &'a str,
    canonical_service: &'a str,
    /// Empty for istiod's `latest`.
    canonical_revision: &'a str,
}

/// The namespace of the workloads behind the endpoints.
pub const NAMESPACE: &str = "default";
/// The cluster they run in (istiod's default cluster id).
pub const CLUSTER_ID: &str = "Kubernetes";

/// One push: resources of one type, and the names whose ACK completes it.
#[derive(Debug, Clone)]
pub struct Push {
    /// The type pushed.
    pub type_url: &'static str,
    /// What is pushed (added or replaced).
    pub resources: Vec<Any>,
    /// The names a client ACKs once it has taken the push.
    pub names: BTreeSet<String>,
}

impl Push {
    fn new(type_url: &'static str, named: Vec<(String, Any)>) -> Push {
        let names = named.iter().map(|(n, _)| n.clone()).collect();
        Push {
            type_url,
            resources: named.into_iter().map(|(_, a)| a).collect(),
            names,
        }
    }

    /// Sends it to the control plane; returns the new version of its type.
    pub fn send(&self, control_plane: &ControlPlane) -> Result<String, Error> {
        control_plane.push(self.type_url, self.resources.clone())
    }
}

/// What a small push changes, and which cluster serves [`HOST`] after it.
#[derive(Debug, Clone)]
pub struct SmallPush {
    /// The push.
    pub push: Push,
    /// `true` for a route change (RDS), `false` for an endpoint change (EDS).
    pub route: bool,
    /// The cluster [`HOST`] is routed to once the push is taken.
    pub serving: Color,
}

/// The sidecar's config and its push sequence, given each cluster's endpoints.
#[derive(Debug, Clone)]
pub struct Sidecar {
    blue: Vec<SocketAddr>,
    green: Vec<SocketAddr>,
}

impl Sidecar {
    /// A sidecar whose two clusters have these endpoints (at least one each).
    pub fn new(blue: Vec<SocketAddr>, green: Vec<SocketAddr>) -> Sidecar {
        assert!(
            !blue.is_empty() && !green.is_empty(),
            "each cluster needs an endpoint"
        );
        Sidecar { blue, green }
    }

    /// The first config: listeners, routes (HOST to blue), clusters and endpoints, one push
    /// per type in the order a client needs them (CDS and EDS before LDS and RDS).
    pub fn initial(&self) -> Vec<Push> {
        vec![
            Push::new(
                type_url::CLUSTER,
                [
                    blackhole_cluster(),
                    passthrough_cluster(),
                    eds(Color::Blue.cluster()),
                    eds(Color::Green.cluster()),
                ]
                .into_iter()
                .map(|c| (c.name.clone(), pack_any(c)))
                .collect(),
            ),
            Push::new(
                type_url::ENDPOINT,
                [Color::Blue, Color::Green]
                    .into_iter()
                    .map(|c| (c.cluster().to_owned(), pack_any(self.assignment(c, 0))))
                    .collect(),
            ),
            Push::new(
                type_url::LISTENER,
                vec![
                    ("virtualOutbound".to_owned(), pack_any(virtual_outbound())),
                    ("0.0.0.0_80".to_owned(), pack_any(http_listener_80())),
                ],
            ),
            Push::new(
                type_url::ROUTE,
                vec![(ROUTE.to_owned(), pack_any(route_80(Color::Blue, 0)))],
            ),
        ]
    }

    /// The pushes that add the `n`th new service (from 0), as istiod pushes a new
    /// ServiceEntry for host [`new_host`]`(n)`, port 80, HTTP, static endpoints: its EDS
    /// cluster (CDS), its endpoints (EDS: the blue cluster's addresses, as a pod of
    /// Deployment `new-N` without canonical labels) and route `80` (RDS) again, now with a
    /// virtual host for it beside those of the new services before it, [`HOST`] routed to
    /// `serving`. Sent in that order; once all three are taken, [`new_host`]`(n)` is served.
    pub fn new_service(&self, n: usize, serving: Color) -> NewService {
        let host = new_host(n);
        let cluster = new_cluster(n);
        let endpoints: Vec<(SocketAddr, u32)> = self.blue.iter().map(|a| (*a, 1)).collect();
        let deployment = format!("new-{n}");
        let assignment = weighted_assignment(
            &cluster,
            &endpoints,
            Workload {
                name: &deployment,
                canonical_service: &deployment,
                canonical_revision: "",
            },
        );
        NewService {
            host,
            pushes: [
                Push::new(
                    type_url::CLUSTER,
                    vec![(cluster.clone(), pack_any(eds(&cluster)))],
                ),
                Push::new(type_url::ENDPOINT, vec![(cluster, pack_any(assignment))]),
                Push::new(
                    type_url::ROUTE,
                    vec![(ROUTE.to_owned(), pack_any(route_80(serving, n + 1)))],
                ),
            ],
        }
    }

    /// The `i`th of the small pushes (from 0): even ones change a cluster's endpoints (which
    /// ones of its addresses, and their weights), odd ones move [`HOST`] to the other cluster.
    pub fn small(&self, i: usize) -> SmallPush {
        // Routes: blue at the start, green after push 1, blue after push 3, ...
        let serving = if (i / 2).is_multiple_of(2) {
            Color::Green
        } else {
            Color::Blue
        };
        if i % 2 == 1 {
            return SmallPush {
                push: Push::new(
                    type_url::ROUTE,
                    vec![(ROUTE.to_owned(), pack_any(route_80(serving, 0)))],
                ),
                route: true,
                serving,
            };
        }
        // Endpoint changes alternate between the cluster serving now and the idle one.
        let now = serving.other();
        let changed = if (i / 2) % 4 < 2 { now } else { now.other() };
        SmallPush {
            push: Push::new(
                type_url::ENDPOINT,
                vec![(
                    changed.cluster().to_owned(),
                    pack_any(self.assignment(changed, i / 2 + 1)),
                )],
            ),
            route: false,
            serving: now,
        }
    }

    /// A cluster's endpoints in their `round`th variant: a non-empty subset of its
    /// addresses in turn, with weights that change every round.
    fn assignment(&self, color: Color, round: usize) -> ClusterLoadAssignment {
        let all = match color {
            Color::Blue => &self.blue,
            Color::Green => &self.green,
        };
        let subsets = (1usize << all.len().min(8)) - 1;
        let mask = round % subsets + 1;
        let chosen: Vec<(SocketAddr, u32)> = all
            .iter()
            .enumerate()
            .filter(|(k, _)| *k >= 8 || mask & (1 << k) != 0)
            .map(|(k, a)| (*a, (1 + (round + k) % 5) as u32))
            .collect();
        weighted_assignment(color.cluster(), &chosen, color.workload())
    }
}

/// The bulk push of `count` EDS clusters: their endpoints (`ENDPOINT`) first, then the
/// clusters (`CLUSTER`). Each cluster has one endpoint on a TEST-NET-3 address, never dialled,
/// a pod of Deployment `svc-I` without canonical labels.
pub fn bulk(count: usize) -> [Push; 2] {
    let mut clusters = Vec::with_capacity(count);
    let mut endpoints = Vec::with_capacity(count);
    for i in 0..count {
        let name = bulk_cluster(i);
        let addr = SocketAddr::from(([203, 0, 113, (1 + i % 250) as u8], 80));
        endpoints.push((
            name.clone(),
            pack_any(weighted_assignment(
                &name,
                &[(addr, 1)],
                Workload {
                    name: &format!("svc-{i}"),
                    canonical_service: &format!("svc-{i}"),
                    canonical_revision: "",
                },
            )),
        ));
        clusters.push((name.clone(), pack_any(eds(&name))));
    }
    [
        Push::new(type_url::ENDPOINT, endpoints),
        Push::new(type_url::CLUSTER, clusters),
    ]
}

fn eds(name: &str) -> Cluster {
    Cluster {
        lb_policy: LbPolicy::LeastRequest as i32,
        ..eds_cluster(name, connect_timeout())
    }
}

fn connect_timeout() -> Duration {
    // The mesh's default `connectTimeout`.
    Duration {
        seconds: 10,
        nanos: 0,
    }
}

fn blackhole_cluster() -> Cluster {
    Cluster {
        name: BLACKHOLE.to_owned(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        connect_timeout: Some(connect_timeout()),
        ..Cluster::default()
    }
}

fn passthrough_cluster() -> Cluster {
    Cluster {
        name: PASSTHROUGH.to_owned(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(
            DiscoveryType::OriginalDst as i32,
        )),
        lb_policy: LbPolicy::ClusterProvided as i32,
        connect_timeout: Some(connect_timeout()),
        ..Cluster::default()
    }
}

fn weighted_assignment(
    cluster: &str,
    endpoints: &[(SocketAddr, u32)],
    workload: Workload<'_>,
) -> ClusterLoadAssignment {
    let metadata = workload_metadata(
        workload.name,
        NAMESPACE,
        workload.canonical_service,
        workload.canonical_revision,
        CLUSTER_ID,
    );
    ClusterLoadAssignment {
        cluster_name: cluster.to_owned(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: endpoints
                .iter()
                .map(|(addr, weight)| LbEndpoint {
                    host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                        address: Some(address(*addr)),
                        ..Endpoint::default()
                    })),
                    load_balancing_weight: Some(UInt32Value { value: *weight }),
                    metadata: Some(metadata.clone()),
                    ..LbEndpoint::default()
                })
                .collect(),
            ..LocalityLbEndpoints::default()
        }],
        ..ClusterLoadAssignment::default()
    }
}

fn filter(name: &str, config: Any) -> Filter {
    Filter {
        name: name.to_owned(),
        config_type: Some(ConfigType::TypedConfig(config)),
    }
}

fn tcp_proxy(cluster: &str) -> Filter {
    filter(
        "envoy.filters.network.tcp_proxy",
        pack_any(TcpProxy {
            stat_prefix: cluster.to_owned(),
            cluster_specifier: Some(TcpCluster::Cluster(cluster.to_owned())),
            ..TcpProxy::default()
        }),
    )
}

fn chain(
    name: &str,
    filter_chain_match: Option<FilterChainMatch>,
    filters: Vec<Filter>,
) -> FilterChain {
    FilterChain {
        name: name.to_owned(),
        filter_chain_match,
        filters,
        ..FilterChain::default()
    }
}

fn any_address(port: u16) -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], port))
}

/// `virtualOutbound` under REGISTRY_ONLY: redirected connections go to the listener of
/// their original destination, the rest to the black hole.
fn virtual_outbound() -> Listener {
    Listener {
        name: "virtualOutbound".to_owned(),
        address: Some(address(any_address(15001))),
        use_original_dst: Some(BoolValue { value: true }),
        traffic_direction: envoy_types::pb::envoy::config::core::v3::TrafficDirection::Outbound
            as i32,
        listener_filters: vec![ListenerFilter {
            name: "envoy.filters.listener.original_dst".to_owned(),
            config_type: Some(ListenerFilterConfig::TypedConfig(pack_any(OriginalDst {}))),
            ..ListenerFilter::default()
        }],
        filter_chains: vec![
            chain(
                "virtualOutbound-blackhole",
                Some(FilterChainMatch {
                    destination_port: Some(UInt32Value { value: 15001 }),
                    ..FilterChainMatch::default()
                }),
                vec![tcp_proxy(BLACKHOLE)],
            ),
            chain(
                "virtualOutbound-catchall-tcp",
                None,
                vec![tcp_proxy(BLACKHOLE)],
            ),
        ],
        ..Listener::default()
    }
}

/// `0.0.0.0_80`: not bound, handed port-80 connections by `virtualOutbound`; HTTP routed by
/// RDS [`ROUTE`].
fn http_listener_80() -> Listener {
    let hcm = HttpConnectionManager {
        stat_prefix: "outbound_0.0.0.0_80".to_owned(),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            route_config_name: ROUTE.to_owned(),
            config_source: Some(ads_source()),
        })),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".to_owned(),
            config_type: Some(HttpFilterConfig::TypedConfig(pack_any(Router::default()))),
            ..HttpFilter::default()
        }],
        ..HttpConnectionManager::default()
    };
    Listener {
        name: "0.0.0.0_80".to_owned(),
        address: Some(address(any_address(80))),
        bind_to_port: Some(BoolValue { value: false }),
        traffic_direction: envoy_types::pb::envoy::config::core::v3::TrafficDirection::Outbound
            as i32,
        filter_chains: vec![chain(
            "",
            None,
            vec![filter(
                "envoy.filters.network.http_connection_manager",
                pack_any(hcm),
            )],
        )],
        default_filter_chain: Some(chain(
            "PassthroughFilterChain",
            None,
            vec![tcp_proxy(BLACKHOLE)],
        )),
        ..Listener::default()
    }
}

/// RDS `80`: [`HOST`] to `to`, the first `new_services` new services to their clusters,
/// everything else Istio's `block_all` 502.
fn route_80(to: Color, new_services: usize) -> RouteConfiguration {
    let mut hosts: Vec<(String, String)> = (0..new_services)
        .map(|n| (new_host(n), new_cluster(n)))
        .collect();
    hosts.push((HOST.to_owned(), to.cluster().to_owned()));
    // Ordered by name, as istiod orders a route's virtual hosts, the catch-all last.
    hosts.sort();
    let mut virtual_hosts: Vec<VirtualHost> = hosts
        .iter()
        .map(|(host, cluster)| virtual_host(host, cluster))
        .collect();
    virtual_hosts.push(VirtualHost {
        name: "block_all".to_owned(),
        domains: vec!["*".to_owned()],
        routes: vec![Route {
            name: "block_all".to_owned(),
            r#match: prefix("/"),
            action: Some(Action::DirectResponse(DirectResponseAction {
                status: 502,
                ..DirectResponseAction::default()
            })),
            ..Route::default()
        }],
        ..VirtualHost::default()
    });
    RouteConfiguration {
        name: ROUTE.to_owned(),
        virtual_hosts,
        // istiod sets this on sidecar route configurations: a cluster named by a route but
        // not (yet) known is not an error.
        validate_clusters: Some(BoolValue { value: false }),
        ..RouteConfiguration::default()
    }
}

fn prefix(p: &str) -> Option<RouteMatch> {
    Some(RouteMatch {
        path_specifier: Some(PathSpecifier::Prefix(p.to_owned())),
        ..RouteMatch::default()
    })
}

/// The virtual host istiod writes for an HTTP service on port 80: `host:80`, matched with
/// and without the port, everything to `cluster`.
fn virtual_host(host: &str, cluster: &str) -> VirtualHost {
    VirtualHost {
        name: format!("{host}:80"),
        domains: vec![host.to_owned(), format!("{host}:80")],
        routes: vec![Route {
            name: "default".to_owned(),
            r#match: prefix("/"),
            action: Some(Action::Route(RouteAction {
                cluster_specifier: Some(RouteCluster::Cluster(cluster.to_owned())),
                // Istio's default: no route timeout.
                timeout: Some(Duration {
                    seconds: 0,
                    nanos: 0,
                }),
                ..RouteAction::default()
            })),
            ..Route::default()
        }],
        ..VirtualHost::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sidecar() -> Sidecar {
        Sidecar::new(
            vec![
                "10.0.0.1:80".parse().unwrap(),
                "[fd00::1]:80".parse().unwrap(),
            ],
            vec!["10.0.0.2:80".parse().unwrap()],
        )
    }

    #[test]
    fn small_pushes_alternate_endpoints_and_routes_and_every_one_changes_something() {
        let sidecar = sidecar();
        let mut route = Color::Blue;
        let mut last: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
        for p in sidecar.initial() {
            for (name, any) in p.names.iter().zip(&p.resources) {
                last.insert(format!("{} {name}", p.type_url), any.value.clone());
            }
        }
        let mut routes = 0;
        for i in 0..100 {
            let small = sidecar.small(i);
            assert_eq!(small.route, i % 2 == 1);
            if small.route {
                routes += 1;
                assert_ne!(small.serving, route, "push {i} moves the route");
                route = small.serving;
            } else {
                assert_eq!(small.serving, route, "push {i} keeps the route");
            }
            assert_eq!(small.push.resources.len(), 1);
            let name = small.push.names.iter().next().unwrap();
            let key = format!("{} {name}", small.push.type_url);
            let value = small.push.resources[0].value.clone();
            assert_ne!(last.get(&key), Some(&value), "push {i} changes {key}");
            last.insert(key, value);
        }
        assert_eq!(routes, 50);
        // Both clusters see endpoint changes.
        let changed: BTreeSet<String> = (0..4)
            .step_by(2)
            .flat_map(|i| sidecar.small(i).push.names)
            .collect();
        assert_eq!(changed.len(), 2);
    }

    /// The workload string of each endpoint of the EDS resources in `push`, as portcullis
    /// reads it.
    fn workloads(push: &Push) -> Vec<String> {
        push.resources
            .iter()
            .flat_map(|any| {
                let cla = <ClusterLoadAssignment as prost::Message>::decode(&*any.value).unwrap();
                let a = portcullis_xds_resources::load_assignment(&cla, false).unwrap();
                a.endpoints
                    .into_iter()
                    .flat_map(|g| g.lb_endpoints)
                    .map(|e| e.workload.map_or("-".into(), |w| w.to_string()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn endpoints_carry_their_workload_as_istiod_sends_it() {
        let initial = sidecar().initial();
        let endpoints = initial
            .iter()
            .find(|p| p.type_url == type_url::ENDPOINT)
            .unwrap();
        assert_eq!(
            workloads(endpoints),
            [
                "app-blue;default;app;blue;Kubernetes",
                "app-green;default;app;green;Kubernetes",
            ]
        );
        let [bulk_endpoints, _] = bulk(2);
        assert_eq!(
            workloads(&bulk_endpoints),
            [
                "svc-0;default;svc-0;;Kubernetes",
                "svc-1;default;svc-1;;Kubernetes"
            ]
        );
    }

    #[test]
    fn a_new_service_adds_its_cluster_endpoints_and_virtual_host_keeping_the_ones_before() {
        let sidecar = sidecar();
        let first = sidecar.new_service(0, Color::Green);
        let third = sidecar.new_service(2, Color::Blue);
        assert_eq!(first.host, "new-0.example");
        assert_eq!(third.host, "new-2.example");
        let [cds, eds, rds] = &third.pushes;
        assert_eq!(
            [cds.type_url, eds.type_url, rds.type_url],
            [type_url::CLUSTER, type_url::ENDPOINT, type_url::ROUTE]
        );
        let cluster = "outbound|80||new-2.example";
        assert_eq!(cds.names, BTreeSet::from([cluster.to_owned()]));
        assert_eq!(eds.names, cds.names);
        assert_eq!(rds.names, BTreeSet::from([ROUTE.to_owned()]));
        assert_eq!(
            workloads(eds),
            [
                "new-2;default;new-2;;Kubernetes",
                "new-2;default;new-2;;Kubernetes"
            ]
        );

        let route =
            <RouteConfiguration as prost::Message>::decode(&*rds.resources[0].value).unwrap();
        let hosts: Vec<(&str, Vec<&str>, &str)> = route
            .virtual_hosts
            .iter()
            .map(|v| {
                let to = match &v.routes[0].action {
                    Some(Action::Route(RouteAction {
                        cluster_specifier: Some(RouteCluster::Cluster(c)),
                        ..
                    })) => c.as_str(),
                    _ => "-",
                };
                (
                    v.name.as_str(),
                    v.domains.iter().map(String::as_str).collect(),
                    to,
                )
            })
            .collect();
        assert_eq!(
            hosts,
            [
                (
                    "app.push.test:80",
                    vec!["app.push.test", "app.push.test:80"],
                    Color::Blue.cluster()
                ),
                (
                    "new-0.example:80",
                    vec!["new-0.example", "new-0.example:80"],
                    "outbound|80||new-0.example"
                ),
                (
                    "new-1.example:80",
                    vec!["new-1.example", "new-1.example:80"],
                    "outbound|80||new-1.example"
                ),
                (
                    "new-2.example:80",
                    vec!["new-2.example", "new-2.example:80"],
                    cluster
                ),
                ("block_all", vec!["*"], "-"),
            ]
        );
    }

    #[test]
    fn the_bulk_push_names_every_cluster_once() {
        let [endpoints, clusters] = bulk(1_000);
        assert_eq!(endpoints.type_url, type_url::ENDPOINT);
        assert_eq!(clusters.type_url, type_url::CLUSTER);
        assert_eq!(clusters.names.len(), 1_000);
        assert_eq!(endpoints.names, clusters.names);
        assert!(clusters.names.contains(&bulk_cluster(999)));
    }
}
