//! The model in Envoy's v3 JSON shape: what `/config_dump` shows and what real Envoy loads
//! (`portcullis compile`). Proto3 JSON: durations as `"1.5s"`, enums by name, `@type` on
//! every typed config.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ipnet::IpNet;
use serde_json::{Map, Value, json};

use crate::{
    AbortError, AppendAction, Cluster, ClusterLoadAssignment, ClusterSpecifier, Denominator,
    DirectBody, Discovery, EndpointAddress, FilterChain, FilterChainMatch, FractionalPercent,
    HashKey, HashPolicy, HeaderMatch, HeaderMatcher, HeaderValueOption, HealthStatus,
    HttpConnectionManager, HttpFault, LbEndpoint, LbPolicy, Listener, NetworkFilter, PathMatch,
    QueryParameterMatcher, Redirect, RequestBufferLimit, RetryPolicy, Route, RouteAction,
    RouteConfiguration, RouteSource, SlowStartConfig, StringMatcher, StringPattern, TcpProxy,
    TlsVersion, TrustedCa, UpstreamProtocol, UpstreamTls, UpstreamTransport, VirtualHost,
};

const TCP_PROXY: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
const HTTP_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const UPSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
/// Where Debian (and the images Envoy and istio-proxy ship in) keep the system's trusted
/// CAs: what the system trust store is rendered as, so that real Envoy loads the same.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A proto3 JSON duration.
pub fn duration(d: Duration) -> Value {
    let nanos = d.subsec_nanos();
    if nanos == 0 {
        Value::String(format!("{}s", d.as_secs()))
    } else {
        let frac = format!("{nanos:09}");
        Value::String(format!("{}.{}s", d.as_secs(), frac.trim_end_matches('0')))
    }
}

fn socket_address(addr: SocketAddr) -> Value {
    json!({"socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()}})
}

fn cidr(net: &IpNet) -> Value {
    json!({"address_prefix": net.network().to_string(), "prefix_len": net.prefix_len()})
}

/// Inserts `key: value` unless the value is an empty list, `null` or `false`, as proto3
/// JSON leaves defaults out.
fn put(obj: &mut Map<String, Value>, key: &str, value: Value) {
    let empty = match &value {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => s.is_empty(),
        Value::Number(_) | Value::Bool(true) => false,
    };
    if !empty {
        obj.insert(key.to_string(), value);
    }
}

fn opt<T>(value: Option<T>, f: impl FnOnce(T) -> Value) -> Value {
    value.map_or(Value::Null, f)
}

/// Envoy's `SlowStartConfig`, the fields that are set.
fn slow_start(s: &SlowStartConfig) -> Value {
    let mut o = Map::new();
    o.insert("slow_start_window".into(), duration(s.window));
    if let Some(a) = &s.aggression {
        o.insert(
            "aggression".into(),
            json!({ "default_value": a.default_value, "runtime_key": a.runtime_key }),
        );
    }
    put(
        &mut o,
        "min_weight_percent",
        opt(s.min_weight_percent, |p| json!({ "value": p })),
    );
    Value::Object(o)
}

/// A listener.
pub fn listener(l: &Listener) -> Value {
    let mut o = Map::new();
    put(&mut o, "name", json!(l.name));
    put(&mut o, "address", socket_address(l.address));
    if !l.bind_to_port {
        o.insert("bind_to_port".into(), json!(false));
    }
    put(&mut o, "use_original_dst", json!(l.use_original_dst));
    put(
        &mut o,
        "listener_filters",
        l.listener_filters
            .iter()
            .map(|name| listener_filter(name))
            .collect(),
    );
    put(
        &mut o,
        "filter_chains",
        l.filter_chains.iter().map(filter_chain).collect(),
    );
    put(
        &mut o,
        "default_filter_chain",
        opt(l.default_filter_chain.as_ref(), filter_chain),
    );
    Value::Object(o)
}

fn listener_filter(name: &str) -> Value {
    let ty = match name {
        "envoy.filters.listener.original_dst" => "original_dst.v3.OriginalDst",
        "envoy.filters.listener.tls_inspector" => "tls_inspector.v3.TlsInspector",
        "envoy.filters.listener.http_inspector" => "http_inspector.v3.HttpInspector",
        _ => return json!({ "name": name }),
    };
    json!({
        "name": name,
        "typed_config": {"@type": format!("type.googleapis.com/envoy.extensions.filters.listener.{ty}")},
    })
}

fn filter_chain(c: &FilterChain) -> Value {
    let mut o = Map::new();
    put(&mut o, "name", json!(c.name));
    put(
        &mut o,
        "filter_chain_match",
        filter_chain_match(&c.filter_chain_match),
    );
    let terminal = match &c.filter {
        NetworkFilter::TcpProxy(t) => json!({
            "name": "envoy.filters.network.tcp_proxy",
            "typed_config": tcp_proxy(t),
        }),
        NetworkFilter::Http(h) => json!({
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": http_connection_manager(h),
        }),
    };
    o.insert("filters".into(), Value::Array(vec![terminal]));
    let mut notes = Map::new();
    put(&mut notes, "skipped_filters", json!(c.skipped_filters));
    if let NetworkFilter::Http(h) = &c.filter {
        put(&mut notes, "skipped_http_filters", json!(h.skipped_filters));
    }
    portcullis_metadata(&mut o, notes);
    Value::Object(o)
}

fn filter_chain_match(m: &FilterChainMatch) -> Value {
    let mut o = Map::new();
    put(
        &mut o,
        "destination_port",
        opt(m.destination_port, |p| json!(p)),
    );
    put(
        &mut o,
        "prefix_ranges",
        m.prefix_ranges.iter().map(cidr).collect(),
    );
    put(
        &mut o,
        "source_prefix_ranges",
        m.source_prefix_ranges.iter().map(cidr).collect(),
    );
    put(&mut o, "server_names", json!(m.server_names));
    put(
        &mut o,
        "transport_protocol",
        opt(m.transport_protocol.as_ref(), |t| json!(t)),
    );
    put(
        &mut o,
        "application_protocols",
        json!(m.application_protocols),
    );
    Value::Object(o)
}

fn tcp_proxy(t: &TcpProxy) -> Value {
    let mut o = Map::new();
    o.insert("@type".into(), json!(TCP_PROXY));
    put(&mut o, "stat_prefix", json!(t.stat_prefix));
    match &t.cluster {
        ClusterSpecifier::Cluster(name) => put(&mut o, "cluster", json!(name)),
        ClusterSpecifier::Weighted(ws) => put(
            &mut o,
            "weighted_clusters",
            json!({"clusters": ws.iter().map(|w| json!({"name": w.name, "weight": w.weight})).collect::<Vec<_>>()}),
        ),
    }
    put(&mut o, "idle_timeout", opt(t.idle_timeout, duration));
    put(
        &mut o,
        "max_downstream_connection_duration",
        opt(t.max_downstream_connection_duration, duration),
    );
    Value::Object(o)
}

fn http_connection_manager(h: &HttpConnectionManager) -> Value {
    let mut o = Map::new();
    o.insert("@type".into(), json!(HCM));
    put(&mut o, "stat_prefix", json!(h.stat_prefix));
    match &h.route_config {
        RouteSource::Rds(name) => put(
            &mut o,
            "rds",
            json!({
                "route_config_name": name,
                "config_source": {"ads": {}, "resource_api_version": "V3"},
            }),
        ),
        RouteSource::Inline(rc) => put(&mut o, "route_config", route_configuration(rc)),
    }
    // Absent means Envoy's 5 min: the model's `None` (off) is written as `0s`.
    put(
        &mut o,
        "stream_idle_timeout",
        duration(h.stream_idle_timeout.unwrap_or_default()),
    );
    put(&mut o, "request_timeout", opt(h.request_timeout, duration));
    if h.accept_http_10 {
        o.insert(
            "http_protocol_options".into(),
            json!({"accept_http_10": true}),
        );
    }
    o.insert(
        "http_filters".into(),
        json!([{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}]),
    );
    Value::Object(o)
}

/// A route configuration.
pub fn route_configuration(rc: &RouteConfiguration) -> Value {
    let mut o = Map::new();
    put(&mut o, "name", json!(rc.name));
    put(
        &mut o,
        "virtual_hosts",
        rc.virtual_hosts.iter().map(virtual_host).collect(),
    );
    headers(
        &mut o,
        &rc.request_headers_to_add,
        &rc.request_headers_to_remove,
        &rc.response_headers_to_add,
        &rc.response_headers_to_remove,
    );
    put(
        &mut o,
        "ignore_port_in_host_matching",
        json!(rc.ignore_port_in_host_matching),
    );
    Value::Object(o)
}

fn virtual_host(v: &VirtualHost) -> Value {
    let mut o = Map::new();
    put(&mut o, "name", json!(v.name));
    put(&mut o, "domains", json!(v.domains));
    put(&mut o, "routes", v.routes.iter().map(route).collect());
    put(
        &mut o,
        "retry_policy",
        opt(v.retry_policy.as_deref(), retry),
    );
    buffer_limit(&mut o, v.request_buffer_limit);
    put(
        &mut o,
        "include_request_attempt_count",
        json!(v.include_request_attempt_count),
    );
    headers(
        &mut o,
        &v.request_headers_to_add,
        &v.request_headers_to_remove,
        &v.response_headers_to_add,
        &v.response_headers_to_remove,
    );
    Value::Object(o)
}

fn headers(
    o: &mut Map<String, Value>,
    request_add: &[HeaderValueOption],
    request_remove: &[String],
    response_add: &[HeaderValueOption],
    response_remove: &[String],
) {
    put(
        o,
        "request_headers_to_add",
        request_add.iter().map(header_value_option).collect(),
    );
    put(o, "request_headers_to_remove", json!(request_remove));
    put(
        o,
        "response_headers_to_add",
        response_add.iter().map(header_value_option).collect(),
    );
    put(o, "response_headers_to_remove", json!(response_remove));
}

fn header_value_option(h: &HeaderValueOption) -> Value {
    let action = match h.append {
        AppendAction::AppendIfExistsOrAdd => "APPEND_IF_EXISTS_OR_ADD",
        AppendAction::AddIfAbsent => "ADD_IF_ABSENT",
        AppendAction::OverwriteIfExistsOrAdd => "OVERWRITE_IF_EXISTS_OR_ADD",
        AppendAction::OverwriteIfExists => "OVERWRITE_IF_EXISTS",
    };
    json!({"header": {"key": h.name, "value": h.value}, "append_action": action})
}

/// A route's or virtual host's request body buffer limit, in the field it came from.
fn buffer_limit(o: &mut Map<String, Value>, limit: Option<RequestBufferLimit>) {
    match limit {
        Some(RequestBufferLimit::PerRequest(b)) => {
            o.insert("per_request_buffer_limit_bytes".into(), json!(b));
        }
        Some(RequestBufferLimit::RequestBody(b)) => {
            o.insert("request_body_buffer_limit".into(), json!(b.to_string()));
        }
        None => {}
    }
}

fn route(r: &Route) -> Value {
    let mut o = Map::new();
    put(&mut o, "name", json!(r.name));
    buffer_limit(&mut o, r.request_buffer_limit);
    let m = &r.route_match;
    let mut mo = Map::new();
    match &m.path {
        PathMatch::Prefix(p) => mo.insert("prefix".into(), json!(p)),
        PathMatch::Path(p) => mo.insert("path".into(), json!(p)),
        PathMatch::Regex(re) => mo.insert("safe_regex".into(), json!({ "regex": re })),
        PathMatch::PathSeparatedPrefix(p) => mo.insert("path_separated_prefix".into(), json!(p)),
    };
    if !m.case_sensitive {
        mo.insert("case_sensitive".into(), json!(false));
    }
    put(
        &mut mo,
        "headers",
        m.headers.iter().map(header_matcher).collect(),
    );
    put(
        &mut mo,
        "query_parameters",
        m.query_parameters.iter().map(query_parameter).collect(),
    );
    o.insert("match".into(), Value::Object(mo));
    match &r.action {
        RouteAction::Forward(f) => {
            let mut a = Map::new();
            match &f.cluster {
                ClusterSpecifier::Cluster(name) => put(&mut a, "cluster", json!(name)),
                ClusterSpecifier::Weighted(ws) => {
                    let clusters: Vec<Value> = ws
                        .iter()
                        .map(|w| {
                            let mut c = Map::new();
                            put(&mut c, "name", json!(w.name));
                            put(&mut c, "weight", json!(w.weight));
                            headers(
                                &mut c,
                                &w.request_headers_to_add,
                                &w.request_headers_to_remove,
                                &w.response_headers_to_add,
                                &w.response_headers_to_remove,
                            );
                            Value::Object(c)
                        })
                        .collect();
                    put(&mut a, "weighted_clusters", json!({ "clusters": clusters }));
                }
            }
            put(&mut a, "timeout", opt(f.timeout, duration));
            put(&mut a, "idle_timeout", opt(f.idle_timeout, duration));
            put(
                &mut a,
                "retry_policy",
                opt(f.retry_policy.as_deref(), retry),
            );
            put(
                &mut a,
                "host_rewrite_literal",
                opt(f.host_rewrite_literal.as_ref(), |h| json!(h)),
            );
            put(
                &mut a,
                "prefix_rewrite",
                opt(f.prefix_rewrite.as_ref(), |p| json!(p)),
            );
            put(
                &mut a,
                "regex_rewrite",
                opt(
                    f.regex_rewrite.as_ref(),
                    |r| json!({"pattern": {"regex": r.pattern}, "substitution": r.substitution}),
                ),
            );
            put(
                &mut a,
                "request_mirror_policies",
                f.request_mirror_policies
                    .iter()
                    .map(|m| {
                        let mut p = Map::new();
                        put(&mut p, "cluster", json!(m.cluster));
                        put(
                            &mut p,
                            "runtime_fraction",
                            opt(
                                m.runtime_fraction,
                                |f| json!({ "default_value": fraction(f) }),
                            ),
                        );
                        Value::Object(p)
                    })
                    .collect(),
            );
            put(
                &mut a,
                "hash_policy",
                f.hash_policy.iter().map(hash_policy).collect(),
            );
            o.insert("route".into(), Value::Object(a));
        }
        RouteAction::DirectResponse { status, body } => {
            let mut d = Map::new();
            d.insert("status".into(), json!(status));
            put(
                &mut d,
                "body",
                opt(body.as_ref(), |b| match b {
                    DirectBody::String(s) => json!({ "inline_string": s }),
                    // Proto JSON writes `bytes` as standard base64.
                    DirectBody::Bytes(b) => json!({ "inline_bytes": STANDARD.encode(b) }),
                }),
            );
            o.insert("direct_response".into(), Value::Object(d));
        }
        RouteAction::Redirect(r) => {
            o.insert("redirect".into(), redirect(r));
        }
    }
    headers(
        &mut o,
        &r.request_headers_to_add,
        &r.request_headers_to_remove,
        &r.response_headers_to_add,
        &r.response_headers_to_remove,
    );
    if let Some(f) = &r.fault {
        o.insert(
            "typed_per_filter_config".into(),
            json!({ FAULT_FILTER: fault(f) }),
        );
    }
    Value::Object(o)
}

/// The HTTP filter name istiod keys a route's fault config by.
pub const FAULT_FILTER: &str = "envoy.filters.http.fault";

fn fraction(f: FractionalPercent) -> Value {
    let denominator = match f.denominator {
        Denominator::Hundred => "HUNDRED",
        Denominator::TenThousand => "TEN_THOUSAND",
        Denominator::Million => "MILLION",
    };
    json!({"numerator": f.numerator, "denominator": denominator})
}

fn fault(f: &HttpFault) -> Value {
    let mut o = Map::new();
    o.insert(
        "@type".into(),
        json!("type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"),
    );
    put(
        &mut o,
        "delay",
        opt(
            f.delay.as_ref(),
            |d| json!({"fixed_delay": duration(d.fixed_delay), "percentage": fraction(d.percentage)}),
        ),
    );
    put(
        &mut o,
        "abort",
        opt(f.abort.as_ref(), |a| {
            let (field, code) = match a.error {
                AbortError::HttpStatus(status) => ("http_status", u32::from(status)),
                AbortError::GrpcStatus(status) => ("grpc_status", status),
            };
            json!({field: code, "percentage": fraction(a.percentage)})
        }),
    );
    Value::Object(o)
}

fn redirect(r: &Redirect) -> Value {
    let mut o = Map::new();
    put(
        &mut o,
        "scheme_redirect",
        opt(r.scheme.as_ref(), |s| json!(s)),
    );
    put(&mut o, "host_redirect", opt(r.host.as_ref(), |h| json!(h)));
    put(&mut o, "port_redirect", opt(r.port, |p| json!(p)));
    put(&mut o, "path_redirect", opt(r.path.as_ref(), |p| json!(p)));
    put(
        &mut o,
        "prefix_rewrite",
        opt(r.prefix_rewrite.as_ref(), |p| json!(p)),
    );
    let code = match r.status {
        302 => "FOUND",
        303 => "SEE_OTHER",
        307 => "TEMPORARY_REDIRECT",
        308 => "PERMANENT_REDIRECT",
        _ => "MOVED_PERMANENTLY",
    };
    if code != "MOVED_PERMANENTLY" {
        o.insert("response_code".into(), json!(code));
    }
    put(&mut o, "strip_query", json!(r.strip_query));
    Value::Object(o)
}

fn retry(r: &RetryPolicy) -> Value {
    let mut o = Map::new();
    put(&mut o, "retry_on", json!(r.retry_on.join(",")));
    o.insert("num_retries".into(), json!(r.num_retries));
    put(&mut o, "per_try_timeout", opt(r.per_try_timeout, duration));
    put(
        &mut o,
        "retriable_status_codes",
        json!(r.retriable_status_codes),
    );
    put(
        &mut o,
        "retriable_headers",
        Value::Array(r.retriable_headers.iter().map(header_matcher).collect()),
    );
    if r.avoid_previous_hosts {
        o.insert(
            "retry_host_predicate".into(),
            json!([{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}]),
        );
    }
    put(
        &mut o,
        "host_selection_retry_max_attempts",
        if r.host_selection_retry_max_attempts == 0 {
            Value::Null
        } else {
            json!(r.host_selection_retry_max_attempts.to_string())
        },
    );
    if let Some(update_frequency) = r.previous_priorities {
        o.insert(
            "retry_priority".into(),
            json!({"name": "envoy.retry_priorities.previous_priorities", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig", "update_frequency": update_frequency}}),
        );
    }
    Value::Object(o)
}

fn header_matcher(h: &HeaderMatcher) -> Value {
    let mut o = Map::new();
    o.insert("name".into(), json!(h.name));
    match &h.matcher {
        HeaderMatch::Present(p) => {
            o.insert("present_match".into(), json!(p));
        }
        HeaderMatch::String(s) => {
            o.insert("string_match".into(), string_matcher(s));
        }
    }
    put(&mut o, "invert_match", json!(h.invert_match));
    put(
        &mut o,
        "treat_missing_header_as_empty",
        json!(h.treat_missing_header_as_empty),
    );
    Value::Object(o)
}

fn query_parameter(q: &QueryParameterMatcher) -> Value {
    match &q.matcher {
        Some(m) => json!({"name": q.name, "string_match": string_matcher(m)}),
        None => json!({"name": q.name, "present_match": true}),
    }
}

fn string_matcher(s: &StringMatcher) -> Value {
    let mut o = Map::new();
    match &s.pattern {
        StringPattern::Exact(v) => o.insert("exact".into(), json!(v)),
        StringPattern::Prefix(v) => o.insert("prefix".into(), json!(v)),
        StringPattern::Suffix(v) => o.insert("suffix".into(), json!(v)),
        StringPattern::Contains(v) => o.insert("contains".into(), json!(v)),
        StringPattern::Regex(v) => o.insert("safe_regex".into(), json!({ "regex": v })),
    };
    put(&mut o, "ignore_case", json!(s.ignore_case));
    Value::Object(o)
}

fn hash_policy(h: &HashPolicy) -> Value {
    let mut o = Map::new();
    match &h.key {
        HashKey::Header(name) => {
            o.insert("header".into(), json!({ "header_name": name }));
        }
        HashKey::Cookie {
            name,
            path,
            ttl,
            attributes,
        } => {
            let mut c = Map::new();
            c.insert("name".into(), json!(name));
            put(&mut c, "path", opt(path.as_ref(), |p| json!(p)));
            put(&mut c, "ttl", opt(*ttl, duration));
            put(
                &mut c,
                "attributes",
                Value::Array(
                    attributes
                        .iter()
                        .map(|a| {
                            let mut o = Map::new();
                            o.insert("name".into(), json!(a.name));
                            put(&mut o, "value", json!(a.value));
                            Value::Object(o)
                        })
                        .collect(),
                ),
            );
            o.insert("cookie".into(), Value::Object(c));
        }
        HashKey::SourceIp => {
            o.insert("connection_properties".into(), json!({ "source_ip": true }));
        }
        HashKey::QueryParameter(name) => {
            o.insert("query_parameter".into(), json!({ "name": name }));
        }
    }
    if h.terminal {
        o.insert("terminal".into(), json!(true));
    }
    Value::Object(o)
}

/// A cluster.
pub fn cluster(c: &Cluster) -> Value {
    let mut o = Map::new();
    put(&mut o, "name", json!(c.name));
    let ty = match &c.discovery {
        Discovery::Static => "STATIC",
        Discovery::StrictDns => "STRICT_DNS",
        Discovery::LogicalDns => "LOGICAL_DNS",
        Discovery::Eds { .. } => "EDS",
        Discovery::OriginalDst(_) => "ORIGINAL_DST",
    };
    o.insert("type".into(), json!(ty));
    match &c.discovery {
        Discovery::Eds { service_name } => {
            let mut eds = Map::new();
            eds.insert(
                "eds_config".into(),
                json!({"ads": {}, "resource_api_version": "V3"}),
            );
            if *service_name != c.name {
                eds.insert("service_name".into(), json!(service_name));
            }
            o.insert("eds_cluster_config".into(), Value::Object(eds));
        }
        Discovery::OriginalDst(od) => {
            put(
                &mut o,
                "original_dst_lb_config",
                opt(od.port_override, |p| json!({ "upstream_port_override": p })),
            );
        }
        Discovery::Static | Discovery::StrictDns | Discovery::LogicalDns => {}
    }
    o.insert("connect_timeout".into(), duration(c.connect_timeout));
    let lb = match c.lb_policy {
        LbPolicy::RoundRobin => None,
        LbPolicy::LeastRequest => Some("LEAST_REQUEST"),
        LbPolicy::Random => Some("RANDOM"),
        LbPolicy::ClusterProvided => Some("CLUSTER_PROVIDED"),
        LbPolicy::RingHash { .. } => Some("RING_HASH"),
        LbPolicy::Maglev { .. } => Some("MAGLEV"),
    };
    put(&mut o, "lb_policy", opt(lb, |l| json!(l)));
    match c.lb_policy {
        LbPolicy::RingHash {
            minimum_ring_size,
            maximum_ring_size,
        } => {
            o.insert(
                "ring_hash_lb_config".into(),
                json!({
                    "minimum_ring_size": minimum_ring_size.to_string(),
                    "maximum_ring_size": maximum_ring_size.to_string(),
                }),
            );
        }
        LbPolicy::Maglev { table_size } => {
            o.insert(
                "maglev_lb_config".into(),
                json!({ "table_size": table_size.to_string() }),
            );
        }
        LbPolicy::RoundRobin | LbPolicy::LeastRequest => {
            if let Some(s) = &c.slow_start {
                let key = if c.lb_policy == LbPolicy::RoundRobin {
                    "round_robin_lb_config"
                } else {
                    "least_request_lb_config"
                };
                o.insert(key.into(), json!({ "slow_start_config": slow_start(s) }));
            }
        }
        LbPolicy::Random | LbPolicy::ClusterProvided => {}
    }
    let t = c.circuit_breakers;
    o.insert(
        "circuit_breakers".into(),
        json!({"thresholds": [{
            "max_connections": t.max_connections,
            "max_pending_requests": t.max_pending_requests,
            "max_requests": t.max_requests,
            "max_retries": t.max_retries,
        }]}),
    );
    let mut h2 = Map::new();
    put(
        &mut h2,
        "max_concurrent_streams",
        opt(c.connection_limits.max_concurrent_streams, |n| json!(n)),
    );
    let mut protocol = match c.upstream_protocol {
        UpstreamProtocol::Http1 => None,
        UpstreamProtocol::Http2 => {
            Some(json!({"explicit_http_config": {"http2_protocol_options": h2}}))
        }
        UpstreamProtocol::UseDownstream if h2.is_empty() => {
            Some(json!({"use_downstream_protocol_config": {}}))
        }
        UpstreamProtocol::UseDownstream => {
            Some(json!({"use_downstream_protocol_config": {"http2_protocol_options": h2}}))
        }
    };
    if let Some(od) = &c.outlier_detection {
        o.insert(
            "outlier_detection".into(),
            json!({
                "consecutive_5xx": od.consecutive_5xx,
                "enforcing_consecutive_5xx": od.enforcing_consecutive_5xx,
                "consecutive_gateway_failure": od.consecutive_gateway_failure,
                "enforcing_consecutive_gateway_failure": od.enforcing_consecutive_gateway_failure,
                "split_external_local_origin_errors": od.split_external_local_origin_errors,
                "consecutive_local_origin_failure": od.consecutive_local_origin_failure,
                "enforcing_consecutive_local_origin_failure": od.enforcing_consecutive_local_origin_failure,
                "interval": duration(od.interval),
                "base_ejection_time": duration(od.base_ejection_time),
                "max_ejection_time": duration(od.max_ejection_time),
                "max_ejection_percent": od.max_ejection_percent,
                "enforcing_success_rate": 0,
            }),
        );
    }
    let mut lb = Map::new();
    if let Some(threshold) = c.healthy_panic_threshold {
        lb.insert(
            "healthy_panic_threshold".into(),
            json!({ "value": threshold }),
        );
    }
    if c.locality_weighted {
        lb.insert("locality_weighted_lb_config".into(), json!({}));
    }
    if !lb.is_empty() {
        o.insert("common_lb_config".into(), Value::Object(lb));
    }
    let limits = c.connection_limits;
    let mut common = Map::new();
    put(
        &mut common,
        "idle_timeout",
        opt(limits.idle_timeout, duration),
    );
    put(
        &mut common,
        "max_requests_per_connection",
        opt(limits.max_requests_per_connection, |n| json!(n)),
    );
    put(
        &mut common,
        "max_connection_duration",
        opt(limits.max_connection_duration, duration),
    );
    if !common.is_empty() {
        let options = protocol
            .get_or_insert_with(|| json!({"explicit_http_config": {"http_protocol_options": {}}}));
        options["common_http_protocol_options"] = Value::Object(common);
    }
    if let Some(k) = limits.tcp_keepalive {
        let mut keepalive = Map::new();
        put(
            &mut keepalive,
            "keepalive_probes",
            opt(k.probes, |n| json!(n)),
        );
        let seconds = |d: Duration| json!(d.as_secs());
        put(&mut keepalive, "keepalive_time", opt(k.time, seconds));
        put(
            &mut keepalive,
            "keepalive_interval",
            opt(k.interval, seconds),
        );
        o.insert(
            "upstream_connection_options".into(),
            json!({ "tcp_keepalive": keepalive }),
        );
    }
    if let UpstreamTransport::Tls(tls) = &c.transport
        && (tls.auto_sni || tls.auto_san_validation)
    {
        let options = protocol
            .get_or_insert_with(|| json!({"explicit_http_config": {"http_protocol_options": {}}}));
        options["upstream_http_protocol_options"] = json!({
            "auto_sni": tls.auto_sni,
            "auto_san_validation": tls.auto_san_validation,
        });
    }
    if let Some(Value::Object(mut options)) = protocol {
        options.insert(
            "@type".into(),
            json!(format!("type.googleapis.com/{HTTP_OPTIONS}")),
        );
        o.insert(
            "typed_extension_protocol_options".into(),
            json!({ HTTP_OPTIONS: options }),
        );
    }
    put(
        &mut o,
        "load_assignment",
        opt(c.load_assignment.as_ref(), load_assignment),
    );
    let mut notes = Map::new();
    if let Discovery::OriginalDst(od) = &c.discovery
        && let Some(nets) = &od.allowed_destinations
    {
        // Shown even when empty: an empty guard lets nothing through.
        notes.insert(
            "allowed_destinations".into(),
            nets.iter().map(|n| json!(n.to_string())).collect(),
        );
    }
    if let Some(allowed) = &c.ssrf_guard {
        notes.insert(
            "ssrf_guard".into(),
            json!({"allowed_non_public": allowed.iter().map(ToString::to_string).collect::<Vec<_>>()}),
        );
    }
    put(
        &mut o,
        "transport_socket",
        transport(&c.transport, &mut notes),
    );
    let matches: Vec<Value> = c
        .transport_socket_matches
        .iter()
        .map(|m| {
            let mut t = Map::new();
            t.insert("name".into(), json!(m.name));
            t.insert("match".into(), json!(m.match_metadata));
            // A match needs a socket of its own; istiod names raw_buffer for plaintext.
            let socket = match &m.transport {
                UpstreamTransport::Plaintext => json!({
                    "name": "envoy.transport_sockets.raw_buffer",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"},
                }),
                other => transport(other, &mut notes),
            };
            t.insert("transport_socket".into(), socket);
            Value::Object(t)
        })
        .collect();
    put(&mut o, "transport_socket_matches", Value::Array(matches));
    put(
        &mut o,
        "dns_refresh_rate",
        opt(c.dns_refresh_rate, duration),
    );
    if let Some(source) = c.source.as_deref() {
        o.insert(
            "metadata".into(),
            json!({"filter_metadata": {"istio": {"config": source}}}),
        );
    }
    portcullis_metadata(&mut o, notes);
    Value::Object(o)
}

/// Adds portcullis's own notes (skipped filters, unsupported transports, guards beyond
/// Envoy's) under `metadata.filter_metadata.portcullis`, where Envoy accepts and ignores them.
fn portcullis_metadata(o: &mut Map<String, Value>, notes: Map<String, Value>) {
    if notes.is_empty() {
        return;
    }
    let metadata = o
        .entry("metadata")
        .or_insert_with(|| json!({"filter_metadata": {}}));
    if let Some(fm) = metadata
        .get_mut("filter_metadata")
        .and_then(Value::as_object_mut)
    {
        fm.insert("portcullis".into(), Value::Object(notes));
    }
}

/// The transport socket of an endpoint; one portcullis cannot build is named, with a note.
fn transport(t: &UpstreamTransport, notes: &mut Map<String, Value>) -> Value {
    let name = match t {
        UpstreamTransport::Plaintext => return Value::Null,
        UpstreamTransport::Tls(tls) => {
            return json!({ "name": "envoy.transport_sockets.tls", "typed_config": upstream_tls(tls) });
        }
        UpstreamTransport::IstioMutualTls(m) => {
            return json!({ "name": "envoy.transport_sockets.tls", "typed_config": istio_mutual(m) });
        }
        UpstreamTransport::Unsupported(what) => what.as_str(),
    };
    let unsupported = notes
        .entry("unsupported_transports")
        .or_insert_with(|| json!([]));
    if let Some(list) = unsupported.as_array_mut() {
        list.push(json!(format!(
            "{name}: not supported yet; connections to endpoints that need it fail"
        )));
    }
    json!({ "name": "envoy.transport_sockets.tls" })
}

/// Istio's mutual TLS context, as istiod writes it: the workload certificate and root
/// from SDS.
fn istio_mutual(m: &crate::IstioMutual) -> Value {
    let sds = |name: &str| json!({ "name": name, "sds_config": { "ads": {}, "resource_api_version": "V3" } });
    let mut validation = Map::new();
    put(
        &mut validation,
        "match_subject_alt_names",
        m.match_subject_alt_names
            .iter()
            .map(string_matcher)
            .collect(),
    );
    let mut common = Map::new();
    common.insert(
        "tls_params".into(),
        json!({
            "tls_minimum_protocol_version": "TLSv1_2",
            "tls_maximum_protocol_version": "TLSv1_3",
        }),
    );
    put(&mut common, "alpn_protocols", json!(m.alpn_protocols));
    common.insert(
        "tls_certificate_sds_secret_configs".into(),
        json!([sds("default")]),
    );
    common.insert(
        "combined_validation_context".into(),
        json!({
            "default_validation_context": Value::Object(validation),
            "validation_context_sds_secret_config": sds("ROOTCA"),
        }),
    );
    let mut o = Map::new();
    o.insert("@type".into(), json!(UPSTREAM_TLS));
    put(&mut o, "sni", opt(m.sni.as_ref(), |s| json!(s)));
    o.insert("common_tls_context".into(), Value::Object(common));
    Value::Object(o)
}

/// An `UpstreamTlsContext`.
fn upstream_tls(tls: &UpstreamTls) -> Value {
    let version = |v: TlsVersion| match v {
        TlsVersion::Tls10 => "TLSv1_0",
        TlsVersion::Tls11 => "TLSv1_1",
        TlsVersion::Tls12 => "TLSv1_2",
        TlsVersion::Tls13 => "TLSv1_3",
    };
    let mut common = Map::new();
    common.insert(
        "tls_params".into(),
        json!({
            "tls_minimum_protocol_version": version(tls.min_version),
            "tls_maximum_protocol_version": version(tls.max_version),
        }),
    );
    put(&mut common, "alpn_protocols", json!(tls.alpn_protocols));
    if let Some(cert) = &tls.client_certificate {
        common.insert(
            "tls_certificates".into(),
            json!([{
                "certificate_chain": data_source(&cert.certificate_chain),
                // Envoy's config dump never shows a key given inline; neither does this.
                "private_key": match &cert.private_key {
                    crate::DataSource::Inline(_) => json!({ "inline_string": "[redacted]" }),
                    file => data_source(file),
                },
            }]),
        );
    }
    if let Some(v) = &tls.validation {
        let trusted_ca = match &v.trusted_ca {
            TrustedCa::Pem(source) => data_source(source),
            TrustedCa::System => json!({ "filename": SYSTEM_CA_BUNDLE }),
        };
        let mut validation = Map::new();
        validation.insert("trusted_ca".into(), trusted_ca);
        put(
            &mut validation,
            "match_subject_alt_names",
            v.match_subject_alt_names
                .iter()
                .map(string_matcher)
                .collect(),
        );
        put(&mut validation, "crl", opt(v.crl.as_ref(), data_source));
        put(
            &mut validation,
            "only_verify_leaf_cert_crl",
            json!(v.only_verify_leaf_cert_crl),
        );
        common.insert("validation_context".into(), Value::Object(validation));
    }
    let mut o = Map::new();
    o.insert("@type".into(), json!(UPSTREAM_TLS));
    put(&mut o, "sni", opt(tls.sni.as_ref(), |s| json!(s)));
    o.insert("common_tls_context".into(), Value::Object(common));
    Value::Object(o)
}

/// A `DataSource`: a file by name, inline bytes as base64 (proto3 JSON's `bytes`).
fn data_source(d: &crate::DataSource) -> Value {
    match d {
        crate::DataSource::File(path) => json!({ "filename": path }),
        crate::DataSource::Inline(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => json!({ "inline_string": text }),
            Err(_) => json!({ "inline_bytes": base64(bytes) }),
        },
    }
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A cluster load assignment.
pub fn load_assignment(a: &ClusterLoadAssignment) -> Value {
    let groups: Vec<Value> = a
        .endpoints
        .iter()
        .map(|g| {
            let mut o = Map::new();
            let mut loc = Map::new();
            put(&mut loc, "region", json!(g.locality.region));
            put(&mut loc, "zone", json!(g.locality.zone));
            put(&mut loc, "sub_zone", json!(g.locality.sub_zone));
            put(&mut o, "locality", Value::Object(loc));
            put(
                &mut o,
                "lb_endpoints",
                g.lb_endpoints.iter().map(lb_endpoint).collect(),
            );
            put(
                &mut o,
                "load_balancing_weight",
                opt(g.load_balancing_weight, |w| json!(w)),
            );
            put(
                &mut o,
                "priority",
                if g.priority == 0 {
                    Value::Null
                } else {
                    json!(g.priority)
                },
            );
            Value::Object(o)
        })
        .collect();
    let mut o = Map::new();
    o.insert("cluster_name".into(), json!(a.cluster_name));
    put(&mut o, "endpoints", Value::Array(groups));
    Value::Object(o)
}

fn lb_endpoint(e: &LbEndpoint) -> Value {
    let address = match &e.address {
        EndpointAddress::Socket(a) => socket_address(*a),
        EndpointAddress::Name { host, port } => {
            json!({"socket_address": {"address": host, "port_value": port}})
        }
    };
    let mut endpoint = Map::new();
    endpoint.insert("address".into(), address);
    put(
        &mut endpoint,
        "hostname",
        opt(e.hostname.as_ref(), |h| json!(h)),
    );
    let mut o = Map::new();
    o.insert("endpoint".into(), Value::Object(endpoint));
    let health = match e.health {
        HealthStatus::Unknown => None,
        HealthStatus::Healthy => Some("HEALTHY"),
        HealthStatus::Unhealthy => Some("UNHEALTHY"),
        HealthStatus::Draining => Some("DRAINING"),
        HealthStatus::Timeout => Some("TIMEOUT"),
        HealthStatus::Degraded => Some("DEGRADED"),
    };
    put(&mut o, "health_status", opt(health, |h| json!(h)));
    if e.load_balancing_weight != 1 {
        o.insert(
            "load_balancing_weight".into(),
            json!(e.load_balancing_weight),
        );
    }
    let mut filter_metadata = Map::new();
    if !e.transport_socket_match.is_empty() {
        filter_metadata.insert(
            "envoy.transport_socket_match".into(),
            json!(e.transport_socket_match),
        );
    }
    if let Some(w) = &e.workload {
        filter_metadata.insert(
            crate::ISTIO_METADATA.into(),
            json!({ crate::WORKLOAD_KEY: w.to_string() }),
        );
    }
    if let Some(source) = e.source.as_deref() {
        filter_metadata.insert("portcullis".into(), json!({ "source": source }));
    }
    if !filter_metadata.is_empty() {
        o.insert(
            "metadata".into(),
            json!({ "filter_metadata": filter_metadata }),
        );
    }
    Value::Object(o)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{LocalityLbEndpoints, RouteMatch, Thresholds};

    #[test]
    fn an_upstream_tls_context_renders_as_istiod_writes_it_keys_redacted() {
        let tls = UpstreamTls {
            sni: None,
            auto_sni: true,
            auto_san_validation: true,
            alpn_protocols: Vec::new(),
            min_version: TlsVersion::Tls12,
            max_version: TlsVersion::Tls13,
            client_certificate: Some(crate::TlsCertificate {
                certificate_chain: crate::DataSource::File("/certs/cert.pem".into()),
                private_key: crate::DataSource::Inline(b"-----BEGIN PRIVATE KEY-----".to_vec()),
            }),
            validation: Some(crate::CertificateValidationContext {
                trusted_ca: TrustedCa::System,
                match_subject_alt_names: vec![StringMatcher {
                    pattern: StringPattern::Exact("api.example.com".into()),
                    ignore_case: false,
                }],
                crl: None,
                only_verify_leaf_cert_crl: false,
            }),
        };
        let mut c = Cluster::new("outbound|443||api.example.com", Discovery::Static);
        c.transport = UpstreamTransport::Tls(std::sync::Arc::new(tls));
        let v = cluster(&c);
        assert_eq!(
            v["transport_socket"],
            json!({
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": UPSTREAM_TLS,
                    "common_tls_context": {
                        "tls_params": {
                            "tls_minimum_protocol_version": "TLSv1_2",
                            "tls_maximum_protocol_version": "TLSv1_3",
                        },
                        "tls_certificates": [{
                            "certificate_chain": {"filename": "/certs/cert.pem"},
                            "private_key": {"inline_string": "[redacted]"},
                        }],
                        "validation_context": {
                            "trusted_ca": {"filename": SYSTEM_CA_BUNDLE},
                            "match_subject_alt_names": [{"exact": "api.example.com"}],
                        },
                    },
                },
            })
        );
        assert_eq!(
            v["typed_extension_protocol_options"][HTTP_OPTIONS]["upstream_http_protocol_options"],
            json!({"auto_sni": true, "auto_san_validation": true})
        );
        assert!(!v.to_string().contains("BEGIN PRIVATE KEY"));
        assert_eq!(base64(b"abcde"), "YWJjZGU=");
    }

    #[test]
    fn durations_are_proto3_json() {
        assert_eq!(duration(Duration::from_secs(10)), json!("10s"));
        assert_eq!(duration(Duration::from_millis(250)), json!("0.25s"));
        assert_eq!(
            duration(Duration::from_micros(1_500_001)),
            json!("1.500001s")
        );
    }

    #[test]
    fn slow_start_renders_under_the_policy_that_reads_it() {
        let mut c = Cluster::new("outbound|80||a.example", Discovery::Static);
        c.slow_start = Some(Box::new(SlowStartConfig {
            window: Duration::from_secs(30),
            aggression: Some(crate::RuntimeDouble {
                default_value: 1.5,
                runtime_key: "(".into(),
            }),
            min_weight_percent: Some(5.0),
        }));
        assert_eq!(
            cluster(&c)["round_robin_lb_config"],
            json!({"slow_start_config": {
                "slow_start_window": "30s",
                "aggression": {"default_value": 1.5, "runtime_key": "("},
                "min_weight_percent": {"value": 5.0},
            }})
        );
        c.lb_policy = LbPolicy::LeastRequest;
        c.slow_start = Some(Box::new(SlowStartConfig {
            window: Duration::from_secs(10),
            aggression: None,
            min_weight_percent: None,
        }));
        let v = cluster(&c);
        assert_eq!(
            v["least_request_lb_config"],
            json!({"slow_start_config": {"slow_start_window": "10s"}})
        );
        assert!(v.get("round_robin_lb_config").is_none());
    }

    #[test]
    fn http2_max_concurrent_streams_renders_in_the_http2_options() {
        let mut c = Cluster::new("outbound|80||a.example", Discovery::Static);
        c.upstream_protocol = UpstreamProtocol::Http2;
        c.connection_limits.max_concurrent_streams = Some(50);
        let options = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
        let protocol =
            |c: &Cluster| cluster(c)["typed_extension_protocol_options"][options].clone();
        assert_eq!(
            protocol(&c)["explicit_http_config"],
            json!({"http2_protocol_options": {"max_concurrent_streams": 50}})
        );
        c.upstream_protocol = UpstreamProtocol::UseDownstream;
        assert_eq!(
            protocol(&c)["use_downstream_protocol_config"],
            json!({"http2_protocol_options": {"max_concurrent_streams": 50}})
        );
    }

    #[test]
    fn a_static_cluster_renders_as_the_reference_config_writes_it() {
        let c = Cluster {
            name: "outbound|80||app.internal.com".into(),
            discovery: Discovery::Static,
            lb_policy: LbPolicy::LeastRequest,
            connect_timeout: Duration::from_secs(10),
            upstream_protocol: UpstreamProtocol::Http1,
            circuit_breakers: Thresholds::default(),
            connection_limits: crate::ConnectionLimits::default(),
            outlier_detection: None,
            healthy_panic_threshold: None,
            locality_weighted: false,
            slow_start: None,
            load_assignment: Some(ClusterLoadAssignment {
                cluster_name: "outbound|80||app.internal.com".into(),
                endpoints: vec![LocalityLbEndpoints {
                    lb_endpoints: vec![LbEndpoint {
                        address: EndpointAddress::Socket("10.50.0.1:80".parse().unwrap()),
                        health: HealthStatus::Unknown,
                        load_balancing_weight: 1,
                        transport_socket_match: Default::default(),
                        hostname: None,
                        workload: None,
                        source: None,
                    }],
                    ..Default::default()
                }],
            }),
            transport: UpstreamTransport::Plaintext,
            transport_socket_matches: Vec::new(),
            dns_refresh_rate: None,
            source: None,
            ssrf_guard: None,
        };
        let v = cluster(&c);
        assert_eq!(v["type"], json!("STATIC"));
        assert_eq!(v["lb_policy"], json!("LEAST_REQUEST"));
        assert_eq!(v["connect_timeout"], json!("10s"));
        assert_eq!(
            v["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"],
            json!({"socket_address": {"address": "10.50.0.1", "port_value": 80}})
        );
        assert!(v.get("transport_socket").is_none());
    }

    #[test]
    fn faults_and_mirrors_render_as_istiod_writes_them() {
        let million = |numerator| FractionalPercent {
            numerator,
            denominator: Denominator::Million,
        };
        let mut r = Route::new(
            "r",
            RouteMatch::any(),
            RouteAction::Forward(Arc::new(crate::Forward {
                request_mirror_policies: vec![crate::RequestMirrorPolicy {
                    cluster: "outbound|80||b".into(),
                    runtime_fraction: Some(million(50_000)),
                }],
                ..crate::Forward::to("outbound|80||a")
            })),
        );
        r.fault = Some(Box::new(HttpFault {
            delay: Some(crate::FaultDelay {
                fixed_delay: Duration::from_secs(2),
                percentage: million(1_000_000),
            }),
            abort: None,
        }));
        assert_eq!(
            route(&r),
            json!({
                "name": "r",
                "match": {"prefix": "/"},
                "route": {
                    "cluster": "outbound|80||a",
                    "request_mirror_policies": [{
                        "cluster": "outbound|80||b",
                        "runtime_fraction": {"default_value": {"numerator": 50_000, "denominator": "MILLION"}},
                    }],
                },
                "typed_per_filter_config": {"envoy.filters.http.fault": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
                    "delay": {"fixed_delay": "2s", "percentage": {"numerator": 1_000_000, "denominator": "MILLION"}},
                }},
            })
        );
    }

    #[test]
    fn grpc_aborts_binary_bodies_and_weighted_headers_render_as_envoy_reads_them() {
        let mut aborted = Route::new(
            "aborted",
            RouteMatch::any(),
            RouteAction::Forward(Arc::new(crate::Forward::to("a"))),
        );
        aborted.fault = Some(Box::new(HttpFault {
            delay: None,
            abort: Some(crate::FaultAbort {
                error: AbortError::GrpcStatus(14),
                percentage: FractionalPercent {
                    numerator: 100,
                    denominator: Denominator::Hundred,
                },
            }),
        }));
        assert_eq!(
            route(&aborted)["typed_per_filter_config"]["envoy.filters.http.fault"]["abort"],
            json!({"grpc_status": 14, "percentage": {"numerator": 100, "denominator": "HUNDRED"}})
        );
        let binary = Route::new(
            "binary",
            RouteMatch::any(),
            RouteAction::DirectResponse {
                status: 200,
                body: Some(DirectBody::Bytes(vec![0x00, 0x9f, 0x92, 0x96])),
            },
        );
        assert_eq!(
            route(&binary)["direct_response"]["body"],
            json!({"inline_bytes": "AJ+Slg=="})
        );
        let split = Route::new(
            "split",
            RouteMatch::any(),
            RouteAction::Forward(Arc::new(crate::Forward {
                cluster: ClusterSpecifier::Weighted(vec![crate::WeightedCluster {
                    response_headers_to_remove: vec!["x-internal".into()],
                    ..crate::WeightedCluster::new("a".into(), 1)
                }]),
                ..crate::Forward::to("")
            })),
        );
        assert_eq!(
            route(&split)["route"]["weighted_clusters"],
            json!({"clusters": [{"name": "a", "weight": 1, "response_headers_to_remove": ["x-internal"]}]})
        );
    }

    #[test]
    fn istios_block_all_route_is_a_direct_502() {
        let rc = RouteConfiguration {
            name: "80".into(),
            virtual_hosts: vec![VirtualHost {
                name: "block_all".into(),
                domains: vec!["*".into()],
                routes: vec![Route::new(
                    "block_all",
                    RouteMatch::any(),
                    RouteAction::DirectResponse {
                        status: 502,
                        body: None,
                    },
                )],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            route_configuration(&rc),
            json!({"name": "80", "virtual_hosts": [{
                "name": "block_all", "domains": ["*"],
                "routes": [{"name": "block_all", "match": {"prefix": "/"}, "direct_response": {"status": 502}}],
            }]})
        );
    }
}
