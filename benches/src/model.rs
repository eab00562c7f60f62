//! The registry of [`crate::registry_yaml`] as istiod-shaped Envoy resources, indexed
//! straight into a [`Snapshot`]: the data path's lookups over listeners, filter chains and
//! route tables, measured without the YAML compiler in between.

use portcullis_envoy::{
    self as envoy, ClusterSpecifier, Discovery, FilterChain, FilterChainMatch,
    HttpConnectionManager, Listener, NetworkFilter, Resources, RouteAction, RouteMatch,
    RouteSource, TcpProxy,
};
use portcullis_registry::Snapshot;
use std::sync::Arc;

use crate::{HTTP_PORT, Kind, TCP_PORT, TLS_PORT, cidr_base, endpoint, kind, vip};

fn cluster(
    name: &str,
    discovery: Discovery,
    endpoint: Option<std::net::SocketAddr>,
) -> envoy::Cluster {
    envoy::Cluster {
        lb_policy: envoy::LbPolicy::LeastRequest,
        load_assignment: endpoint.map(|a| envoy::ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![envoy::LocalityLbEndpoints {
                lb_endpoints: vec![envoy::LbEndpoint::new(envoy::EndpointAddress::Socket(a))],
                ..Default::default()
            }],
        }),
        ..envoy::Cluster::new(name, discovery)
    }
}

fn chain(m: FilterChainMatch, filter: NetworkFilter) -> FilterChain {
    FilterChain {
        name: String::new(),
        filter_chain_match: m,
        filter,
        skipped_filters: Vec::new(),
        transport_socket: None,
    }
}

fn tcp(cluster: &str) -> NetworkFilter {
    NetworkFilter::TcpProxy(TcpProxy {
        stat_prefix: cluster.into(),
        cluster: ClusterSpecifier::Cluster(cluster.into()),
        idle_timeout: None,
        max_downstream_connection_duration: None,
    })
}

fn listener(name: String, address: std::net::SocketAddr, chains: Vec<FilterChain>) -> Listener {
    Listener {
        name,
        address,
        bind_to_port: false,
        use_original_dst: false,
        listener_filters: Vec::new(),
        filter_chains: chains,
        default_filter_chain: None,
    }
}

fn virtual_host(name: String, domains: Vec<String>, action: RouteAction) -> envoy::VirtualHost {
    envoy::VirtualHost {
        name,
        domains,
        routes: vec![envoy::Route::new("default", RouteMatch::any(), action)],
        ..Default::default()
    }
}

fn forward(cluster: String) -> RouteAction {
    RouteAction::Forward(Arc::new(envoy::Forward::to(cluster)))
}

/// The resources istiod would send a REGISTRY_ONLY sidecar for [`crate::registry_yaml`]`(n)`:
/// RDS `80` with a virtual host per HTTP host, SNI chains on `0.0.0.0_443`, a listener per
/// virtual IP and range chains on `0.0.0.0_5432`.
pub fn model(n: usize) -> Resources {
    let mut r = Resources::default();
    let mut vhosts = Vec::new();
    let mut sni = Vec::new();
    let mut ranges = Vec::new();
    for i in 0..n {
        let ep = std::net::SocketAddr::new(endpoint(i).into(), 80);
        let (host, http_and_tls) = match kind(i) {
            Kind::Exact => (format!("svc-{i}.ns-{}.example.com", i % 97), true),
            Kind::Wildcard => (format!("*.wild-{i}.example.org"), true),
            Kind::Address => (format!("db-{i}.example.net"), false),
            Kind::Cidr => (format!("range-{i}.example.net"), false),
        };
        if http_and_tls {
            let http = format!("outbound|{HTTP_PORT}||{host}");
            let tls = format!("outbound|{TLS_PORT}||{host}");
            vhosts.push(virtual_host(
                format!("{host}:{HTTP_PORT}"),
                vec![host.clone(), format!("{host}:{HTTP_PORT}")],
                forward(http.clone()),
            ));
            sni.push(chain(
                FilterChainMatch {
                    server_names: vec![host],
                    transport_protocol: Some("tls".into()),
                    ..Default::default()
                },
                tcp(&tls),
            ));
            r.clusters.insert(
                http.clone(),
                Arc::new(cluster(&http, Discovery::Static, Some(ep))),
            );
            r.clusters.insert(
                tls.clone(),
                Arc::new(cluster(&tls, Discovery::Static, Some(ep))),
            );
            continue;
        }
        let name = format!("outbound|{TCP_PORT}||{host}");
        r.clusters.insert(
            name.clone(),
            Arc::new(cluster(&name, Discovery::Static, Some(ep))),
        );
        if kind(i) == Kind::Address {
            let address = std::net::SocketAddr::new(vip(i).into(), TCP_PORT);
            let l = listener(
                format!("{}_{TCP_PORT}", vip(i)),
                address,
                vec![chain(FilterChainMatch::default(), tcp(&name))],
            );
            r.listeners.insert(l.name.clone(), Arc::new(l));
        } else {
            let net = ipnet::IpNet::new(cidr_base(i).into(), 28).expect("a /28 fits IPv4");
            ranges.push(chain(
                FilterChainMatch {
                    prefix_ranges: vec![net],
                    ..Default::default()
                },
                tcp(&name),
            ));
        }
    }
    vhosts.push(virtual_host(
        "block_all".into(),
        vec!["*".into()],
        RouteAction::DirectResponse {
            status: 502,
            body: None,
        },
    ));
    r.routes.insert(
        HTTP_PORT.to_string(),
        Arc::new(envoy::RouteConfiguration {
            name: HTTP_PORT.to_string(),
            virtual_hosts: vhosts,
            ignore_port_in_host_matching: true,
            ..Default::default()
        }),
    );
    let blackhole = envoy::BLACKHOLE_CLUSTER;
    sni.push(chain(FilterChainMatch::default(), tcp(blackhole)));
    ranges.push(chain(FilterChainMatch::default(), tcp(blackhole)));
    let http = chain(
        FilterChainMatch::default(),
        NetworkFilter::Http(Box::new(HttpConnectionManager {
            stat_prefix: format!("outbound_0.0.0.0_{HTTP_PORT}"),
            route_config: RouteSource::Rds(HTTP_PORT.to_string()),
            stream_idle_timeout: None,
            request_timeout: None,
            accept_http_10: false,
            skipped_filters: Vec::new(),
        })),
    );
    let mut outbound = listener(
        envoy::VIRTUAL_OUTBOUND.into(),
        ([0, 0, 0, 0], 15001).into(),
        vec![chain(FilterChainMatch::default(), tcp(blackhole))],
    );
    outbound.use_original_dst = true;
    for l in [
        outbound,
        listener(
            format!("0.0.0.0_{HTTP_PORT}"),
            ([0, 0, 0, 0], HTTP_PORT).into(),
            vec![http],
        ),
        listener(
            format!("0.0.0.0_{TLS_PORT}"),
            ([0, 0, 0, 0], TLS_PORT).into(),
            sni,
        ),
        listener(
            format!("0.0.0.0_{TCP_PORT}"),
            ([0, 0, 0, 0], TCP_PORT).into(),
            ranges,
        ),
    ] {
        r.listeners.insert(l.name.clone(), Arc::new(l));
    }
    for (name, discovery) in [
        (blackhole, Discovery::Static),
        (
            envoy::PASSTHROUGH_CLUSTER,
            Discovery::OriginalDst(Default::default()),
        ),
    ] {
        r.clusters
            .insert(name.into(), Arc::new(cluster(name, discovery, None)));
    }
    r
}

/// [`model`]`(n)` indexed into a snapshot.
pub fn indexed(n: usize) -> Snapshot {
    Snapshot::index(&model(n), &|_| None, None, 1)
}
