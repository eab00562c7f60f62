//! Envoy resources shaped the way istiod builds a sidecar's outbound side
//! (`pilot/pkg/networking/core` of istio/istio): the `virtualOutbound` listener, per-port
//! HTTP and TLS listeners on 0.0.0.0, per-VIP TCP listeners, Istio's `block_all` and
//! `allow_any` virtual hosts, and its cluster kinds. Only what changes behaviour is kept;
//! Istio-only extensions (metadata exchange, stats, ALPN) are left out, as plain Envoy 1.40
//! cannot load them and they do not touch the traffic compared here.
//!
//! [`Resources::bootstrap`] puts them into a static bootstrap; [`Resources::xds`] splits them
//! the way istiod serves them over ADS: each HTTP listener's inline `route_config` becomes an
//! RDS resource under its `name` (Istio's `rds` is the port number), and each STATIC cluster
//! with endpoints becomes an EDS cluster and its `ClusterLoadAssignment`.

use serde_json::{Value, json};

/// Istio's default text access log format (`EnvoyTextLogFormat`, Istio 1.9 onwards).
pub const ACCESS_LOG_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";

/// The mesh's default `accessLogFile`: Envoy's own stdout.
pub const ACCESS_LOG_PATH: &str = "/dev/stdout";

/// Where REGISTRY_ONLY sends what nothing else matches.
pub const BLACKHOLE: &str = "BlackHoleCluster";
/// Where ALLOW_ANY sends what nothing else matches (the original destination).
pub const PASSTHROUGH: &str = "PassthroughCluster";

/// The mesh's default `connectTimeout`.
const CONNECT_TIMEOUT: &str = "10s";
/// The mesh's default `dnsRefreshRate`.
const DNS_REFRESH_RATE: &str = "60s";
/// What the HTTP inspector matches on plaintext ports (Istio without `PILOT_HTTP10`).
const PLAINTEXT_HTTP_ALPNS: [&str; 2] = ["http/1.1", "h2c"];

/// The sidecar's `outboundTrafficPolicy.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Unregistered destinations are refused.
    RegistryOnly,
    /// Unregistered destinations are reached through `PassthroughCluster`.
    AllowAny,
}

impl Mode {
    /// The mode as the mesh ConfigMap spells it.
    pub fn mesh_name(self) -> &'static str {
        match self {
            Mode::RegistryOnly => "REGISTRY_ONLY",
            Mode::AllowAny => "ALLOW_ANY",
        }
    }

    fn fallthrough_cluster(self) -> &'static str {
        match self {
            Mode::RegistryOnly => BLACKHOLE,
            Mode::AllowAny => PASSTHROUGH,
        }
    }
}

/// Istio's outbound cluster name for `host` on service port `port`.
pub fn cluster_name(port: u16, host: &str) -> String {
    format!("outbound|{port}||{host}")
}

fn typed(type_name: &str) -> Value {
    json!({ "@type": format!("type.googleapis.com/{type_name}") })
}

fn access_log() -> Value {
    json!([{
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": ACCESS_LOG_PATH,
            "log_format": { "text_format_source": { "inline_string": ACCESS_LOG_FORMAT } }
        }
    }])
}

fn tcp_proxy(cluster: &str) -> Value {
    json!({
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": cluster,
            "cluster": cluster,
            "access_log": access_log()
        }
    })
}

/// The listener's fallback for traffic no filter chain claims (`PassthroughFilterChain`).
fn default_chain(mode: Mode) -> Value {
    json!({
        "filter_chain_match": {},
        "name": "PassthroughFilterChain",
        "filters": [tcp_proxy(mode.fallthrough_cluster())]
    })
}

fn socket_address(address: &str, port: u16) -> Value {
    json!({ "socket_address": { "address": address, "port_value": port } })
}

/// `virtualOutbound` on 15001: hands each redirected connection to the listener of its
/// original destination; what has none goes to the mode's fallthrough cluster, and a
/// connection to 15001 itself to the black hole. A listener access log records `NR`.
pub fn virtual_outbound(mode: Mode) -> Value {
    json!({
        "name": "virtualOutbound",
        "address": socket_address("0.0.0.0", 15001),
        "use_original_dst": true,
        "traffic_direction": "OUTBOUND",
        "filter_chains": [
            {
                "name": "virtualOutbound-blackhole",
                "filter_chain_match": { "destination_port": 15001 },
                "filters": [tcp_proxy(BLACKHOLE)]
            },
            {
                "name": "virtualOutbound-catchall-tcp",
                "filters": [tcp_proxy(mode.fallthrough_cluster())]
            }
        ],
        "access_log": [{
            "name": "envoy.access_loggers.file",
            "filter": { "response_flag_filter": { "flags": ["NR"] } },
            "typed_config": access_log()[0]["typed_config"].clone()
        }]
    })
}

/// The virtual host istiod builds for a service without a VirtualService: its host and its
/// `addresses` as domains (ports are ignored in host matching) and a `default` route with the
/// mesh's retry policy.
pub fn service_vhost(host: &str, port: u16, addresses: &[&str]) -> Value {
    let mut domains = vec![host];
    domains.extend_from_slice(addresses);
    json!({
        "name": format!("{host}:{port}"),
        "domains": domains,
        "routes": [{
            "name": "default",
            "match": { "prefix": "/" },
            "route": to_cluster(&cluster_name(port, host), None),
            "decorator": { "operation": format!("{host}:{port}/*") }
        }],
        "include_request_attempt_count": true
    })
}

/// The retry policy istiod writes for a VirtualService's `retries` (`retryOn`, `attempts`):
/// other hosts first, as for the mesh default. A `retryOn` status code (`"503"`) becomes
/// `retriable-status-codes` with that code, as istiod splits it.
pub fn retry_policy(retry_on: &str, attempts: u32) -> Value {
    let (codes, conditions): (Vec<&str>, Vec<&str>) = retry_on
        .split(',')
        .partition(|c| c.bytes().all(|b| b.is_ascii_digit()));
    let mut conditions = conditions;
    if !codes.is_empty() && !conditions.contains(&"retriable-status-codes") {
        conditions.push("retriable-status-codes");
    }
    let mut policy = json!({
        "retry_on": conditions.join(","),
        "num_retries": attempts,
        "retry_host_predicate": [{
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": typed("envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate")
        }],
        "host_selection_retry_max_attempts": 5
    });
    if !codes.is_empty() {
        let codes: Vec<u32> = codes.iter().filter_map(|c| c.parse().ok()).collect();
        policy["retriable_status_codes"] = json!(codes);
    }
    policy
}

/// The mesh's default retry policy (no `retries` in a VirtualService): istiod's
/// `DefaultPolicy`, which retries a 503 through `retriable-status-codes`.
pub fn default_retry_policy() -> Value {
    retry_policy(
        "connect-failure,refused-stream,unavailable,cancelled,503",
        2,
    )
}

/// A route `action` as istiod builds it for one destination `cluster`: no timeout and
/// `retry_policy` (the mesh default for none, see [`default_retry_policy`]; `Value::Null`
/// leaves it out, as istiod does for `attempts: 0`).
pub fn to_cluster(cluster: &str, retry_policy: Option<Value>) -> Value {
    let mut action = json!({ "cluster": cluster, "timeout": "0s", "max_grpc_timeout": "0s" });
    match retry_policy {
        None => action["retry_policy"] = default_retry_policy(),
        Some(Value::Null) => {}
        Some(policy) => action["retry_policy"] = policy,
    }
    action
}

/// A route action splitting requests over `clusters` (name, weight) as a VirtualService's
/// weighted destinations do.
pub fn to_weighted(clusters: &[(&str, u32)]) -> Value {
    let clusters: Vec<Value> = clusters
        .iter()
        .map(|(name, weight)| json!({ "name": name, "weight": weight }))
        .collect();
    json!({
        "weighted_clusters": { "clusters": clusters },
        "timeout": "0s",
        "retry_policy": default_retry_policy(),
        "max_grpc_timeout": "0s"
    })
}

/// One route of a VirtualService's `http` list: `name`, paths under `prefix`, and `action`:
/// a JSON object holding the `route`, `redirect` or `direct_response` key and anything else
/// the route carries (header additions and removals).
pub fn vs_route(name: &str, prefix: &str, action: Value) -> Value {
    let mut route = json!({ "name": name, "match": { "prefix": prefix } });
    if let (Some(route), Value::Object(action)) = (route.as_object_mut(), action) {
        route.extend(action);
    }
    route
}

/// The virtual host of `host` on `port` with a VirtualService's `routes`.
pub fn vs_vhost(host: &str, port: u16, routes: Vec<Value>) -> Value {
    json!({
        "name": format!("{host}:{port}"),
        "domains": [host],
        "routes": routes,
        "include_request_attempt_count": true
    })
}

/// Istio's catch-all virtual host: `block_all` (a 502) or `allow_any` (PassthroughCluster).
fn catch_all_vhost(mode: Mode) -> Value {
    let route = match mode {
        Mode::RegistryOnly => json!({
            "name": "block_all",
            "match": { "prefix": "/" },
            "direct_response": { "status": 502 }
        }),
        Mode::AllowAny => json!({
            "name": "allow_any",
            "match": { "prefix": "/" },
            "route": { "cluster": PASSTHROUGH, "timeout": "0s", "max_grpc_timeout": "0s" }
        }),
    };
    json!({
        "name": route["name"].clone(),
        "domains": ["*"],
        "routes": [route],
        "include_request_attempt_count": true
    })
}

fn http_filter(name: &str, type_name: &str) -> Value {
    json!({ "name": name, "typed_config": typed(type_name) })
}

/// `0.0.0.0_<port>` for a port with HTTP services: the HTTP inspector sends plaintext HTTP to
/// a connection manager routing by Host among `vhosts` then the catch-all; everything else
/// takes the default chain.
pub fn http_listener(port: u16, vhosts: Vec<Value>, mode: Mode) -> Value {
    let mut vhosts = vhosts;
    vhosts.push(catch_all_vhost(mode));
    let name = format!("0.0.0.0_{port}");
    let hcm = json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": format!("outbound_{name}"),
            "codec_type": "AUTO",
            "use_remote_address": false,
            "normalize_path": true,
            "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
            "upgrade_configs": [{ "upgrade_type": "websocket" }],
            "stream_idle_timeout": "0s",
            "access_log": access_log(),
            "route_config": {
                "name": port.to_string(),
                "virtual_hosts": vhosts,
                "validate_clusters": false,
                "max_direct_response_body_size_bytes": 1_048_576,
                "ignore_port_in_host_matching": true
            },
            "http_filters": [
                http_filter("envoy.filters.http.grpc_stats", "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig"),
                http_filter("envoy.filters.http.fault", "envoy.extensions.filters.http.fault.v3.HTTPFault"),
                http_filter("envoy.filters.http.cors", "envoy.extensions.filters.http.cors.v3.Cors"),
                http_filter("envoy.filters.http.router", "envoy.extensions.filters.http.router.v3.Router")
            ],
            "request_id_extension": {
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
                    "use_request_id_for_trace_sampling": true
                }
            }
        }
    });
    json!({
        "name": name,
        "address": socket_address("0.0.0.0", port),
        "bind_to_port": false,
        "traffic_direction": "OUTBOUND",
        "continue_on_listener_filters_timeout": true,
        "listener_filters": [{
            "name": "envoy.filters.listener.http_inspector",
            "typed_config": typed("envoy.extensions.filters.listener.http_inspector.v3.HttpInspector")
        }],
        "listener_filters_timeout": "0s",
        "filter_chains": [{
            "filter_chain_match": {
                "transport_protocol": "raw_buffer",
                "application_protocols": PLAINTEXT_HTTP_ALPNS
            },
            "filters": [hcm]
        }],
        "default_filter_chain": default_chain(mode)
    })
}

/// `0.0.0.0_<port>` for a port with TLS services that have no address of their own: the TLS
/// inspector reads the SNI, each service's chain matches its host, the default chain takes
/// the rest.
pub fn tls_listener(port: u16, hosts: &[&str], mode: Mode) -> Value {
    let chains: Vec<Value> = hosts
        .iter()
        .map(|host| {
            json!({
                "filter_chain_match": { "server_names": [host] },
                "filters": [tcp_proxy(&cluster_name(port, host))]
            })
        })
        .collect();
    json!({
        "name": format!("0.0.0.0_{port}"),
        "address": socket_address("0.0.0.0", port),
        "bind_to_port": false,
        "traffic_direction": "OUTBOUND",
        "continue_on_listener_filters_timeout": true,
        "listener_filters": [{
            "name": "envoy.filters.listener.tls_inspector",
            "typed_config": typed("envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector")
        }],
        "listener_filters_timeout": "0s",
        "filter_chains": chains,
        "default_filter_chain": default_chain(mode)
    })
}

/// `<vip>_<port>` for an opaque TCP service with an address: one match-all chain.
pub fn tcp_listener(vip: &str, port: u16, host: &str) -> Value {
    json!({
        "name": format!("{vip}_{port}"),
        "address": socket_address(vip, port),
        "bind_to_port": false,
        "traffic_direction": "OUTBOUND",
        "continue_on_listener_filters_timeout": true,
        "listener_filters_timeout": "0s",
        "filter_chains": [{ "filters": [tcp_proxy(&cluster_name(port, host))] }]
    })
}

/// The two clusters every sidecar has.
pub fn builtin_clusters() -> Vec<Value> {
    vec![
        json!({
            "name": BLACKHOLE,
            "type": "STATIC",
            "connect_timeout": CONNECT_TIMEOUT,
            "lb_policy": "ROUND_ROBIN"
        }),
        json!({
            "name": PASSTHROUGH,
            "type": "ORIGINAL_DST",
            "connect_timeout": CONNECT_TIMEOUT,
            "lb_policy": "CLUSTER_PROVIDED",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "use_downstream_protocol_config": {
                        "http_protocol_options": {},
                        "http2_protocol_options": {}
                    }
                }
            }
        }),
    ]
}

fn load_assignment(name: &str, endpoints: &[(&str, u16)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(address, port)| json!({ "endpoint": { "address": socket_address(address, *port) } }))
        .collect();
    json!({ "cluster_name": name, "endpoints": [{ "lb_endpoints": endpoints }] })
}

/// A STATIC (resolved) service's cluster: its endpoints (address, target port). istiod sends
/// these as EDS clusters; a static bootstrap carries the same endpoints inline.
pub fn static_cluster(port: u16, host: &str, endpoints: &[(&str, u16)]) -> Value {
    let name = cluster_name(port, host);
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": CONNECT_TIMEOUT,
        "lb_policy": "LEAST_REQUEST",
        "common_lb_config": {},
        "load_assignment": load_assignment(&name, endpoints)
    })
}

/// A `DNS` service's cluster (STRICT_DNS, every address an endpoint) or, with
/// `round_robin`, a `DNS_ROUND_ROBIN` one (LOGICAL_DNS, one address at a time).
pub fn dns_cluster(port: u16, host: &str, round_robin: bool) -> Value {
    let name = cluster_name(port, host);
    json!({
        "name": name,
        "type": if round_robin { "LOGICAL_DNS" } else { "STRICT_DNS" },
        "connect_timeout": CONNECT_TIMEOUT,
        "lb_policy": "LEAST_REQUEST",
        "common_lb_config": {},
        "dns_lookup_family": "V4_ONLY",
        "dns_refresh_rate": DNS_REFRESH_RATE,
        "respect_dns_ttl": true,
        "load_assignment": load_assignment(&name, &[(host, port)])
    })
}

/// A `NONE` service's cluster: the original destination.
pub fn original_dst_cluster(port: u16, host: &str) -> Value {
    json!({
        "name": cluster_name(port, host),
        "type": "ORIGINAL_DST",
        "connect_timeout": CONNECT_TIMEOUT,
        "lb_policy": "CLUSTER_PROVIDED",
        "common_lb_config": {}
    })
}

/// The node id istio-agent gives the lab's client pod (`sidecar~IP~POD.NS~NS.svc.cluster.local`).
pub const NODE_ID: &str = "sidecar~10.50.1.1~client.default~default.svc.cluster.local";
/// The node cluster istio-agent gives it (`APP.NAMESPACE`).
pub const NODE_CLUSTER: &str = "client.default";

/// The type URL of LDS resources.
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// The type URL of RDS resources.
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// The type URL of CDS resources.
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// The type URL of EDS resources.
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// The `@type` of the HTTP connection manager.
const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

/// The config source istiod names in every RDS listener and EDS cluster: ADS, waiting for
/// the resource however long it takes.
fn ads_source() -> Value {
    json!({ "ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3" })
}

/// The same resources as ADS serves them, each list one type.
#[derive(Debug, Clone, Default)]
pub struct Xds {
    /// LDS.
    pub listeners: Vec<Value>,
    /// RDS: the HTTP listeners' route configurations.
    pub routes: Vec<Value>,
    /// CDS.
    pub clusters: Vec<Value>,
    /// EDS: the endpoints of the EDS clusters.
    pub endpoints: Vec<Value>,
}

impl Xds {
    /// Every resource with its type URL, in LDS, RDS, CDS, EDS order.
    pub fn all(&self) -> Vec<(&'static str, &Value)> {
        let mut all = Vec::new();
        all.extend(self.listeners.iter().map(|v| (LISTENER_TYPE, v)));
        all.extend(self.routes.iter().map(|v| (ROUTE_TYPE, v)));
        all.extend(self.clusters.iter().map(|v| (CLUSTER_TYPE, v)));
        all.extend(self.endpoints.iter().map(|v| (ENDPOINT_TYPE, v)));
        all
    }
}

/// Moves every inline `route_config` of `listener`'s connection managers into `routes`,
/// leaving an `rds` reference by name.
fn split_routes(mut listener: Value, routes: &mut Vec<Value>) -> Value {
    let chains = listener["filter_chains"]
        .as_array_mut()
        .into_iter()
        .flatten();
    for filter in chains.filter_map(|c| c["filters"].as_array_mut()).flatten() {
        let config = &mut filter["typed_config"];
        if config["@type"] != HCM_TYPE {
            continue;
        }
        if let Some(route) = config
            .as_object_mut()
            .and_then(|c| c.remove("route_config"))
        {
            config["rds"] =
                json!({ "config_source": ads_source(), "route_config_name": route["name"] });
            routes.push(route);
        }
    }
    listener
}

/// A STATIC cluster with endpoints becomes EDS (istiod's shape for resolved services) and
/// its endpoints go into `endpoints`; other clusters are served as they are.
fn split_endpoints(mut cluster: Value, endpoints: &mut Vec<Value>) -> Value {
    if cluster["type"] != "STATIC" {
        return cluster;
    }
    let Some(assignment) = cluster
        .as_object_mut()
        .and_then(|c| c.remove("load_assignment"))
    else {
        return cluster;
    };
    cluster["type"] = json!("EDS");
    cluster["eds_cluster_config"] =
        json!({ "eds_config": ads_source(), "service_name": cluster["name"] });
    endpoints.push(assignment);
    cluster
}

/// One sidecar's outbound resources: listeners and clusters.
#[derive(Debug, Clone)]
pub struct Resources {
    /// The outbound policy they were built for.
    pub mode: Mode,
    /// LDS: `virtualOutbound` first, then the per-port and per-VIP listeners.
    pub listeners: Vec<Value>,
    /// CDS: BlackHoleCluster, PassthroughCluster, then the services' clusters.
    pub clusters: Vec<Value>,
}

impl Resources {
    /// What a sidecar with nothing registered gets.
    pub fn new(mode: Mode) -> Resources {
        Resources {
            mode,
            listeners: vec![virtual_outbound(mode)],
            clusters: builtin_clusters(),
        }
    }

    /// Adds a listener.
    pub fn listener(mut self, listener: Value) -> Resources {
        self.listeners.push(listener);
        self
    }

    /// Adds a cluster.
    pub fn cluster(mut self, cluster: Value) -> Resources {
        self.clusters.push(cluster);
        self
    }

    /// The resources split into the four types ADS serves, as istiod sends them.
    pub fn xds(&self) -> Xds {
        let mut xds = Xds::default();
        for listener in &self.listeners {
            let listener = split_routes(listener.clone(), &mut xds.routes);
            xds.listeners.push(listener);
        }
        for cluster in &self.clusters {
            let cluster = split_endpoints(cluster.clone(), &mut xds.endpoints);
            xds.clusters.push(cluster);
        }
        xds
    }

    /// The bootstrap istio-agent writes for a sidecar (node, Delta ADS to the control plane
    /// at `xds` as cluster `xds-grpc`, LDS and CDS from ADS), admin on 127.0.0.1:15000; the
    /// resources themselves come from the control plane (see [`Resources::xds`]).
    pub fn ads_bootstrap(xds: (&str, u16)) -> Value {
        let (address, port) = xds;
        json!({
            "node": {
                "id": NODE_ID,
                "cluster": NODE_CLUSTER,
                "metadata": {
                    "NAMESPACE": "default",
                    "CLUSTER_ID": "Kubernetes",
                    "INTERCEPTION_MODE": "REDIRECT",
                    "INSTANCE_IPS": crate::scenario::POD_IP,
                    "WORKLOAD_NAME": "client"
                }
            },
            "admin": { "address": socket_address("127.0.0.1", 15000) },
            "dynamic_resources": {
                "lds_config": ads_source(),
                "cds_config": ads_source(),
                "ads_config": {
                    "api_type": "DELTA_GRPC",
                    "set_node_on_first_message_only": true,
                    "transport_api_version": "V3",
                    "grpc_services": [{ "envoy_grpc": { "cluster_name": "xds-grpc" } }]
                }
            },
            "static_resources": {
                "clusters": [{
                    "name": "xds-grpc",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "lb_policy": "ROUND_ROBIN",
                    "load_assignment": load_assignment("xds-grpc", &[(address, port)]),
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": { "http2_protocol_options": {} }
                        }
                    }
                }]
            }
        })
    }

    /// A bootstrap carrying these resources statically, admin on 127.0.0.1:15000.
    pub fn bootstrap(&self) -> Value {
        json!({
            "node": { "id": NODE_ID, "cluster": NODE_CLUSTER },
            "admin": { "address": socket_address("127.0.0.1", 15000) },
            "static_resources": { "listeners": self.listeners, "clusters": self.clusters }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_only_blocks_with_a_502_and_allow_any_passes_through() {
        let blocked = http_listener(
            80,
            vec![service_vhost("a.com", 80, &[])],
            Mode::RegistryOnly,
        );
        let hcm = &blocked["filter_chains"][0]["filters"][0]["typed_config"];
        let vhosts = hcm["route_config"]["virtual_hosts"].as_array().unwrap();
        assert_eq!(
            vhosts[0]["routes"][0]["route"]["cluster"],
            "outbound|80||a.com"
        );
        assert_eq!(vhosts[1]["name"], "block_all");
        assert_eq!(vhosts[1]["routes"][0]["direct_response"]["status"], 502);
        let fallback = &blocked["default_filter_chain"]["filters"][0]["typed_config"];
        assert_eq!(fallback["cluster"], BLACKHOLE);

        let open = http_listener(80, Vec::new(), Mode::AllowAny);
        let hcm = &open["filter_chains"][0]["filters"][0]["typed_config"];
        let route = &hcm["route_config"]["virtual_hosts"][0]["routes"][0];
        assert_eq!(route["name"], "allow_any");
        assert_eq!(route["route"]["cluster"], PASSTHROUGH);
    }

    #[test]
    fn tls_chains_match_each_host_by_sni() {
        let listener = tls_listener(443, &["a.com", "*.b.com"], Mode::RegistryOnly);
        let chains = listener["filter_chains"].as_array().unwrap();
        assert_eq!(chains.len(), 2);
        assert_eq!(
            chains[1]["filter_chain_match"]["server_names"][0],
            "*.b.com"
        );
        assert_eq!(
            chains[1]["filters"][0]["typed_config"]["cluster"],
            "outbound|443||*.b.com"
        );
    }
}
