//! Constructors that fill in Envoy's defaults, so that code building resources by hand
//! (converters, tests, benchmarks) states only what differs from them.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::{
    Cluster, ClusterSpecifier, ConnectionLimits, Discovery, EndpointAddress, Forward, HealthStatus,
    LbEndpoint, LbPolicy, Route, RouteAction, RouteMatch, Thresholds, UpstreamProtocol,
    UpstreamTransport,
};

impl Cluster {
    /// A cluster with Envoy's defaults: round robin, a 5 s connect timeout, HTTP/1.1 and
    /// plaintext upstream, default circuit breakers, no endpoints.
    pub fn new(name: impl Into<String>, discovery: Discovery) -> Cluster {
        Cluster {
            name: name.into(),
            discovery,
            lb_policy: LbPolicy::RoundRobin,
            connect_timeout: Duration::from_secs(5),
            upstream_protocol: UpstreamProtocol::Http1,
            circuit_breakers: Thresholds::default(),
            connection_limits: ConnectionLimits::default(),
            outlier_detection: None,
            healthy_panic_threshold: None,
            locality_weighted: false,
            slow_start: None,
            load_assignment: None,
            transport: UpstreamTransport::Plaintext,
            transport_socket_matches: Vec::new(),
            dns_refresh_rate: None,
            source: None,
            ssrf_guard: None,
        }
    }
}

impl LbEndpoint {
    /// An endpoint of weight 1 whose health is not reported, without metadata.
    pub fn new(address: EndpointAddress) -> LbEndpoint {
        LbEndpoint {
            address,
            health: HealthStatus::Unknown,
            load_balancing_weight: 1,
            transport_socket_match: BTreeMap::new(),
            hostname: None,
            workload: None,
            source: None,
        }
    }
}

impl Forward {
    /// Forwarding to one cluster with Envoy's defaults: no rewrites, no retry policy, the
    /// default timeout.
    pub fn to(cluster: impl Into<String>) -> Forward {
        Forward {
            cluster: ClusterSpecifier::Cluster(cluster.into()),
            timeout: None,
            idle_timeout: None,
            retry_policy: None,
            host_rewrite_literal: None,
            prefix_rewrite: None,
            regex_rewrite: None,
            request_mirror_policies: Vec::new(),
            hash_policy: Vec::new(),
        }
    }
}

impl LbPolicy {
    /// Envoy's `minimum_ring_size` default.
    pub const DEFAULT_MINIMUM_RING_SIZE: u64 = 1024;
    /// Envoy's `maximum_ring_size` default.
    pub const DEFAULT_MAXIMUM_RING_SIZE: u64 = 8 * 1024 * 1024;
    /// Envoy's Maglev `table_size` default.
    pub const DEFAULT_MAGLEV_TABLE_SIZE: u64 = 65537;

    /// Ring hash with Envoy's default ring sizes.
    pub fn ring_hash() -> LbPolicy {
        LbPolicy::RingHash {
            minimum_ring_size: Self::DEFAULT_MINIMUM_RING_SIZE,
            maximum_ring_size: Self::DEFAULT_MAXIMUM_RING_SIZE,
        }
    }
}

impl Route {
    /// A route without header changes.
    pub fn new(name: impl Into<String>, route_match: RouteMatch, action: RouteAction) -> Route {
        Route {
            name: name.into(),
            route_match,
            action,
            request_headers_to_add: Vec::new(),
            request_headers_to_remove: Vec::new(),
            response_headers_to_add: Vec::new(),
            response_headers_to_remove: Vec::new(),
            fault: None,
            request_buffer_limit: None,
        }
    }
}
