//! Builders of the Envoy resources tests push: the shapes istiod sends, trimmed to what a
//! test needs.

use std::net::SocketAddr;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig,
};
use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, Metadata, SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener};
use envoy_types::pb::envoy::config::route::v3::route::Action;
use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier as RouteCluster;
use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType as HttpFilterConfig;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy::ClusterSpecifier;
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::{Duration, Struct, Value};
use envoy_types::util::pack_any;

/// `{ads: {}, resource_api_version: V3}`, istiod's config source for EDS and RDS.
pub fn ads_source() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        resource_api_version: ApiVersion::V3 as i32,
        ..ConfigSource::default()
    }
}

/// A socket address.
pub fn address(addr: SocketAddr) -> Address {
    Address {
        address: Some(AddressKind::SocketAddress(SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(PortSpecifier::PortValue(u32::from(addr.port()))),
            ..SocketAddress::default()
        })),
    }
}

fn cluster(name: &str, kind: DiscoveryType, connect_timeout: Duration) -> Cluster {
    Cluster {
        name: name.to_owned(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(kind as i32)),
        connect_timeout: Some(connect_timeout),
        ..Cluster::default()
    }
}

/// An EDS cluster over ADS, as istiod sends for a service port.
pub fn eds_cluster(name: &str, connect_timeout: Duration) -> Cluster {
    Cluster {
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads_source()),
            service_name: String::new(),
        }),
        ..cluster(name, DiscoveryType::Eds, connect_timeout)
    }
}

/// A STATIC cluster with its endpoints inline.
pub fn static_cluster(name: &str, endpoints: &[SocketAddr]) -> Cluster {
    let timeout = Duration {
        seconds: 1,
        nanos: 0,
    };
    Cluster {
        load_assignment: Some(assignment(name, endpoints)),
        ..cluster(name, DiscoveryType::Static, timeout)
    }
}

/// The workload behind an endpoint as istiod's `AppendLbEndpointMetadata` describes it
/// for telemetry: `NAME;NAMESPACE;CANONICAL_SERVICE;CANONICAL_REVISION;CLUSTER_ID` under
/// `filter_metadata.istio.workload` (a pod's Deployment or a WorkloadEntry; a revision of
/// `latest` empty).
pub fn workload_metadata(
    name: &str,
    namespace: &str,
    canonical_service: &str,
    canonical_revision: &str,
    cluster: &str,
) -> Metadata {
    let workload = format!("{name};{namespace};{canonical_service};{canonical_revision};{cluster}");
    Metadata {
        filter_metadata: [(
            "istio".to_owned(),
            Struct {
                fields: [(
                    "workload".to_owned(),
                    Value {
                        kind: Some(Kind::StringValue(workload)),
                    },
                )]
                .into(),
            },
        )]
        .into(),
        ..Metadata::default()
    }
}

/// The endpoints of a cluster, in one locality.
pub fn assignment(cluster: &str, endpoints: &[SocketAddr]) -> ClusterLoadAssignment {
    let lb_endpoints = endpoints
        .iter()
        .map(|addr| LbEndpoint {
            host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                address: Some(address(*addr)),
                ..Endpoint::default()
            })),
            ..LbEndpoint::default()
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: cluster.to_owned(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints,
            ..LocalityLbEndpoints::default()
        }],
        ..ClusterLoadAssignment::default()
    }
}

fn listener(
    name: &str,
    addr: Option<SocketAddr>,
    filter: &str,
    config: envoy_types::pb::google::protobuf::Any,
) -> Listener {
    Listener {
        name: name.to_owned(),
        address: addr.map(address),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: filter.to_owned(),
                config_type: Some(ConfigType::TypedConfig(config)),
            }],
            ..FilterChain::default()
        }],
        ..Listener::default()
    }
}

/// A listener whose one filter chain proxies TCP to a cluster.
pub fn tcp_proxy_listener(name: &str, addr: SocketAddr, cluster: &str) -> Listener {
    let proxy = TcpProxy {
        stat_prefix: name.to_owned(),
        cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.to_owned())),
        ..TcpProxy::default()
    };
    listener(
        name,
        Some(addr),
        "envoy.filters.network.tcp_proxy",
        pack_any(proxy),
    )
}

/// A listener whose HTTP connection manager takes its routes from RDS over ADS and ends in
/// the router, as istiod's do.
pub fn rds_listener(name: &str, addr: Option<SocketAddr>, route_config: &str) -> Listener {
    let hcm = HttpConnectionManager {
        stat_prefix: name.to_owned(),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".to_owned(),
            config_type: Some(HttpFilterConfig::TypedConfig(pack_any(Router::default()))),
            ..HttpFilter::default()
        }],
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            route_config_name: route_config.to_owned(),
            config_source: Some(ads_source()),
        })),
        ..HttpConnectionManager::default()
    };
    listener(
        name,
        addr,
        "envoy.filters.network.http_connection_manager",
        pack_any(hcm),
    )
}

/// An empty route configuration.
pub fn route_configuration(name: &str) -> RouteConfiguration {
    RouteConfiguration {
        name: name.to_owned(),
        ..RouteConfiguration::default()
    }
}

/// A route configuration whose one virtual host (every domain) sends every path to `cluster`.
pub fn route_to_cluster(name: &str, cluster: &str) -> RouteConfiguration {
    let route = Route {
        r#match: Some(RouteMatch {
            path_specifier: Some(PathSpecifier::Prefix("/".to_owned())),
            ..RouteMatch::default()
        }),
        action: Some(Action::Route(RouteAction {
            cluster_specifier: Some(RouteCluster::Cluster(cluster.to_owned())),
            ..RouteAction::default()
        })),
        ..Route::default()
    };
    RouteConfiguration {
        name: name.to_owned(),
        virtual_hosts: vec![VirtualHost {
            name: "all".to_owned(),
            domains: vec!["*".to_owned()],
            routes: vec![route],
            ..VirtualHost::default()
        }],
        ..RouteConfiguration::default()
    }
}
