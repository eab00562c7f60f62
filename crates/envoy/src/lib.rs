//! Envoy's configuration model as plain Rust data: listeners and their filter chains, route
//! configurations, clusters and their endpoints.
//!
//! Both config sources end here: xDS resources from istiod are converted into these types,
//! and Istio YAML files are compiled into them the way istiod compiles them. The data path
//! is indexed from this model only, so a feature is implemented once. The types keep
//! Envoy's names and meaning (see Envoy's v3 API reference); fields Envoy has but portcullis
//! does not honour are not represented, and the converters say so instead of dropping them
//! silently. [`json`] renders them in Envoy's JSON shape, which real Envoy loads.

pub mod bootstrap;
mod defaults;
pub mod json;
pub mod state;
mod workload;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

pub use workload::{ISTIO_METADATA, WORKLOAD_KEY, WorkloadMetadata};

/// Envoy's type URL of a `Listener`.
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// Envoy's type URL of a `RouteConfiguration`.
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// Envoy's type URL of a `Cluster`.
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// Envoy's type URL of a `ClusterLoadAssignment`.
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// Istio's name of the cluster that drops what it gets.
pub const BLACKHOLE_CLUSTER: &str = "BlackHoleCluster";
/// Istio's name of the cluster that forwards to the original destination.
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
/// Istio's name of the listener on 15001 that hands intercepted connections on.
pub const VIRTUAL_OUTBOUND: &str = "virtualOutbound";

/// Resources of one type by name, in a persistent map: a copy shares the unchanged part,
/// so that a small update to a mesh-sized set costs its size, not the set's.
pub type Named<T> = imbl::OrdMap<String, T>;

/// A complete set of resources: what one snapshot of the data path is built from. Each
/// resource is shared, so that a source's state, its active set and `/config_dump` hold
/// the same one: an update copies pointers, never resources.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    /// Listeners (LDS), by name.
    pub listeners: Named<Arc<Listener>>,
    /// Route configurations (RDS), by name.
    pub routes: Named<Arc<RouteConfiguration>>,
    /// Clusters (CDS), by name.
    pub clusters: Named<Arc<Cluster>>,
    /// Endpoints of EDS clusters (EDS), by cluster (or EDS service) name.
    pub endpoints: Named<Arc<ClusterLoadAssignment>>,
}

/// A listener: an address and the filter chains that take its connections.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    /// Name, e.g. `virtualOutbound`, `0.0.0.0_80`, `10.0.0.5_443`.
    pub name: String,
    /// The address it listens on or, with `bind_to_port: false`, takes connections for.
    pub address: SocketAddr,
    /// Whether it binds a socket; Istio's per-port and per-VIP listeners do not, they only
    /// receive connections that `virtualOutbound` hands over by original destination.
    pub bind_to_port: bool,
    /// Hands each connection to the listener of its original destination (`virtualOutbound`).
    pub use_original_dst: bool,
    /// Listener filter names (`envoy.filters.listener.tls_inspector`, `http_inspector`,
    /// `original_dst`): what must be inspected before a filter chain is chosen.
    pub listener_filters: Vec<String>,
    /// Filter chains, in the order received; chosen by [`FilterChainMatch`] with Envoy's
    /// most-specific-first rules, not by order.
    pub filter_chains: Vec<FilterChain>,
    /// The chain for a connection that no chain matches; without it such a connection is
    /// closed.
    pub default_filter_chain: Option<FilterChain>,
}

/// One filter chain: when it applies, and the network filter that ends it.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterChain {
    /// Name (Istio names some, e.g. `virtualOutbound-catchall-tcp`).
    pub name: String,
    /// When the chain applies.
    pub filter_chain_match: FilterChainMatch,
    /// The terminal network filter.
    pub filter: NetworkFilter,
    /// Non-terminal filters received and skipped (Istio's metadata exchange, stats, Wasm):
    /// shown in the config dump so that nothing is dropped silently.
    pub skipped_filters: Vec<String>,
    /// How the downstream connection is secured; portcullis never terminates TLS on the
    /// outbound side, so a chain that asks for it is rejected when converted.
    pub transport_socket: Option<String>,
}

/// Envoy's `FilterChainMatch`, the criteria portcullis honours. An empty list or `None`
/// matches anything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FilterChainMatch {
    /// The destination port, when the listener takes several (`virtualOutbound`).
    pub destination_port: Option<u16>,
    /// Destination address ranges.
    pub prefix_ranges: Vec<IpNet>,
    /// Source address ranges.
    pub source_prefix_ranges: Vec<IpNet>,
    /// SNI names: exact, or `*.suffix` wildcards.
    pub server_names: Vec<String>,
    /// `tls` or `raw_buffer`, as the TLS inspector decides.
    pub transport_protocol: Option<String>,
    /// ALPN, or `http/1.1` / `h2c` as the HTTP inspector decides.
    pub application_protocols: Vec<String>,
}

/// The terminal network filter of a chain.
#[derive(Debug, Clone, PartialEq)]
pub enum NetworkFilter {
    /// `envoy.filters.network.tcp_proxy`.
    TcpProxy(TcpProxy),
    /// `envoy.filters.network.http_connection_manager` (out of line: a listener's many
    /// SNI chains are TCP proxies).
    Http(Box<HttpConnectionManager>),
}

/// Envoy's `TcpProxy`.
#[derive(Debug, Clone, PartialEq)]
pub struct TcpProxy {
    /// Stat prefix (Istio: the cluster name).
    pub stat_prefix: String,
    /// Where connections go.
    pub cluster: ClusterSpecifier,
    /// Closes a connection idle this long (Envoy's default 1 h); `None` never.
    pub idle_timeout: Option<Duration>,
    /// Closes a connection this long after it was accepted, busy or not
    /// (`max_downstream_connection_duration`, flag `DT`); `None` never.
    pub max_downstream_connection_duration: Option<Duration>,
}

/// One cluster, or several with weights.
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterSpecifier {
    /// A single cluster by name.
    Cluster(String),
    /// Clusters picked at random in proportion to their weights.
    Weighted(Vec<WeightedCluster>),
}

/// One cluster of a weighted set.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedCluster {
    /// Cluster name.
    pub name: String,
    /// Weight (relative).
    pub weight: u32,
    /// Headers added to requests sent to this cluster (routes only).
    pub request_headers_to_add: Vec<HeaderValueOption>,
    /// Headers removed from requests sent to this cluster (routes only).
    pub request_headers_to_remove: Vec<String>,
    /// Headers added to responses from this cluster (routes only).
    pub response_headers_to_add: Vec<HeaderValueOption>,
    /// Headers removed from responses from this cluster (routes only).
    pub response_headers_to_remove: Vec<String>,
}

impl WeightedCluster {
    /// `name` with `weight`, changing no headers.
    pub fn new(name: String, weight: u32) -> WeightedCluster {
        WeightedCluster {
            name,
            weight,
            request_headers_to_add: Vec::new(),
            request_headers_to_remove: Vec::new(),
            response_headers_to_add: Vec::new(),
            response_headers_to_remove: Vec::new(),
        }
    }
}

/// Envoy's `HttpConnectionManager`, the parts portcullis honours.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConnectionManager {
    /// Stat prefix (Istio: `outbound_0.0.0.0_80`).
    pub stat_prefix: String,
    /// Where the route table comes from.
    pub route_config: RouteSource,
    /// Closes a stream idle this long (Envoy's default 5 min); `None` never.
    pub stream_idle_timeout: Option<Duration>,
    /// Bounds receiving a whole request; `None` unbounded (Envoy's default).
    pub request_timeout: Option<Duration>,
    /// Whether HTTP/1.0 requests are served (`http_protocol_options.accept_http_10`).
    pub accept_http_10: bool,
    /// HTTP filters received and skipped (Istio's stats, metadata exchange, CORS, fault,
    /// gRPC stats, Wasm) by name; the router is implicit.
    pub skipped_filters: Vec<String>,
}

/// Where an HTTP connection manager finds its routes.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteSource {
    /// By name over RDS.
    Rds(String),
    /// Inline.
    Inline(RouteConfiguration),
}

/// Envoy's `RouteConfiguration`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteConfiguration {
    /// Name (Istio: the port, `80`, or `host:port`).
    pub name: String,
    /// Virtual hosts, chosen by domain with Envoy's precedence (exact, longest `*.suffix`,
    /// longest `prefix*`, `*`), not by order.
    pub virtual_hosts: Vec<VirtualHost>,
    /// Headers added to every request routed by this table.
    pub request_headers_to_add: Vec<HeaderValueOption>,
    /// Headers removed from every request routed by this table.
    pub request_headers_to_remove: Vec<String>,
    /// Headers added to every response.
    pub response_headers_to_add: Vec<HeaderValueOption>,
    /// Headers removed from every response.
    pub response_headers_to_remove: Vec<String>,
    /// Whether a port in the Host is ignored when matching domains (Istio sets it).
    pub ignore_port_in_host_matching: bool,
}

/// Envoy's `VirtualHost`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VirtualHost {
    /// Name (Istio: `host:port`, `allow_any`, `block_all`).
    pub name: String,
    /// Domains: exact, `*.suffix`, `prefix*`, `*`; with or without `:port`.
    pub domains: Vec<String>,
    /// Routes, tried in order; the first that matches wins.
    pub routes: Vec<Route>,
    /// Retry policy for routes without their own (out of line: istiod sets it on none).
    pub retry_policy: Option<Box<RetryPolicy>>,
    /// The request body buffer limit of its routes that set none.
    pub request_buffer_limit: Option<RequestBufferLimit>,
    /// Whether `x-envoy-attempt-count` is sent upstream.
    pub include_request_attempt_count: bool,
    /// Headers added to requests.
    pub request_headers_to_add: Vec<HeaderValueOption>,
    /// Headers removed from requests.
    pub request_headers_to_remove: Vec<String>,
    /// Headers added to responses.
    pub response_headers_to_add: Vec<HeaderValueOption>,
    /// Headers removed from responses.
    pub response_headers_to_remove: Vec<String>,
}

/// Envoy's `Route`.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Name (Istio: `default`, `allow_any`, `block_all`, or the VirtualService's).
    pub name: String,
    /// When it applies.
    pub route_match: RouteMatch,
    /// What it does.
    pub action: RouteAction,
    /// Headers added to requests.
    pub request_headers_to_add: Vec<HeaderValueOption>,
    /// Headers removed from requests.
    pub request_headers_to_remove: Vec<String>,
    /// Headers added to responses.
    pub response_headers_to_add: Vec<HeaderValueOption>,
    /// Headers removed from responses.
    pub response_headers_to_remove: Vec<String>,
    /// The fault filter's per-route config (`typed_per_filter_config` of
    /// `envoy.filters.http.fault`, where istiod puts a VirtualService's `fault`). Boxed,
    /// as the redirect below: few routes have one, and every route is a mesh's unit.
    pub fault: Option<Box<HttpFault>>,
    /// The most of a request body kept for retries and mirrors (over the virtual host's);
    /// `None`: the connection's limit.
    pub request_buffer_limit: Option<RequestBufferLimit>,
}

/// How much of a request body a route buffers for retries and mirrors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestBufferLimit {
    /// The deprecated `per_request_buffer_limit_bytes`: at most the connection's limit.
    PerRequest(u32),
    /// `request_body_buffer_limit`: as given, above the connection's limit too.
    RequestBody(u64),
}

impl RequestBufferLimit {
    /// The limit in bytes, with a connection buffer limit of `connection` bytes.
    pub fn bytes(self, connection: u64) -> u64 {
        match self {
            RequestBufferLimit::PerRequest(limit) => u64::from(limit).min(connection),
            RequestBufferLimit::RequestBody(limit) => limit,
        }
    }
}

/// Envoy's `HTTPFault`, the parts istiod sets.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpFault {
    /// Delays requests before they are forwarded.
    pub delay: Option<FaultDelay>,
    /// Answers requests with a status instead of forwarding them.
    pub abort: Option<FaultAbort>,
}

/// Envoy's `FaultDelay` (fixed).
#[derive(Debug, Clone, PartialEq)]
pub struct FaultDelay {
    /// How long.
    pub fixed_delay: Duration,
    /// Share of requests delayed.
    pub percentage: FractionalPercent,
}

/// Envoy's `FaultAbort` with an HTTP or a gRPC status.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultAbort {
    /// What the aborted request is answered with.
    pub error: AbortError,
    /// Share of requests aborted.
    pub percentage: FractionalPercent,
}

/// Envoy's `FaultAbort.error_type`, the kinds istiod sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortError {
    /// `http_status`: the local reply's status (a gRPC request gets the gRPC status it maps to).
    HttpStatus(u16),
    /// `grpc_status`: the gRPC status of a gRPC request's reply; other requests get 200.
    GrpcStatus(u32),
}

/// Envoy's `FractionalPercent`: `numerator` out of `denominator`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FractionalPercent {
    /// The share.
    pub numerator: u32,
    /// Out of how many.
    pub denominator: Denominator,
}

/// Envoy's `FractionalPercent.DenominatorType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denominator {
    /// Out of 100.
    Hundred,
    /// Out of 10,000.
    TenThousand,
    /// Out of 1,000,000.
    Million,
}

impl Denominator {
    /// The denominator's value.
    pub fn value(self) -> u32 {
        match self {
            Denominator::Hundred => 100,
            Denominator::TenThousand => 10_000,
            Denominator::Million => 1_000_000,
        }
    }
}

/// Envoy's `RequestMirrorPolicy`: a copy of each request (of a share of them) sent to
/// another cluster, its response ignored.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestMirrorPolicy {
    /// Where copies go.
    pub cluster: String,
    /// Share of requests copied (`runtime_fraction.default_value`); `None`: all.
    pub runtime_fraction: Option<FractionalPercent>,
}

/// Envoy's `RouteMatch`.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteMatch {
    /// How the path matches.
    pub path: PathMatch,
    /// Whether prefix and path comparisons are case sensitive (Envoy's default: yes).
    pub case_sensitive: bool,
    /// Every header matcher must match.
    pub headers: Vec<HeaderMatcher>,
    /// Every query parameter matcher must match.
    pub query_parameters: Vec<QueryParameterMatcher>,
}

impl RouteMatch {
    /// Matches every request (`prefix: "/"`).
    pub fn any() -> RouteMatch {
        RouteMatch {
            path: PathMatch::Prefix("/".into()),
            case_sensitive: true,
            headers: Vec::new(),
            query_parameters: Vec::new(),
        }
    }
}

/// The path part of a route match.
#[derive(Debug, Clone, PartialEq)]
pub enum PathMatch {
    /// The path (without query) starts with this.
    Prefix(String),
    /// The path (without query) is exactly this.
    Path(String),
    /// The path (without query) matches this RE2 regex entirely.
    Regex(String),
    /// Like prefix, but only at a `/` boundary.
    PathSeparatedPrefix(String),
}

/// Envoy's `HeaderMatcher`.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderMatcher {
    /// Header name, lower case (`:authority`, `:method`, `:path` included).
    pub name: String,
    /// How the value matches.
    pub matcher: HeaderMatch,
    /// Inverts the result.
    pub invert_match: bool,
    /// With `invert_match`, whether an absent header still fails the match
    /// (`treat_missing_header_as_empty` aside, Envoy's default: absent does not match).
    pub treat_missing_header_as_empty: bool,
}

/// How a header value matches.
#[derive(Debug, Clone, PartialEq)]
pub enum HeaderMatch {
    /// The header is present (true) or absent (false).
    Present(bool),
    /// A string matcher on the value.
    String(StringMatcher),
}

/// Envoy's `StringMatcher`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StringMatcher {
    /// How it compares.
    pub pattern: StringPattern,
    /// Compares ignoring ASCII case (not for regex).
    pub ignore_case: bool,
}

/// The comparison of a [`StringMatcher`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StringPattern {
    /// Equal.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Ends with.
    Suffix(String),
    /// Contains.
    Contains(String),
    /// Matches this RE2 regex entirely.
    Regex(String),
}

/// Envoy's `QueryParameterMatcher`.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryParameterMatcher {
    /// Parameter name.
    pub name: String,
    /// `None`: present with any value; else the value must match.
    pub matcher: Option<StringMatcher>,
}

/// Envoy's `HeaderValueOption`.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderValueOption {
    /// Header name, lower case.
    pub name: String,
    /// Value.
    pub value: String,
    /// What happens when the header is already there.
    pub append: AppendAction,
}

/// Envoy's `HeaderAppendAction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendAction {
    /// Adds a value beside any existing (Envoy's default).
    AppendIfExistsOrAdd,
    /// Adds only when absent.
    AddIfAbsent,
    /// Replaces any existing value.
    OverwriteIfExistsOrAdd,
    /// Replaces only an existing value.
    OverwriteIfExists,
}

/// What a matched route does.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteAction {
    /// Forward to a cluster; shared with the data path's compiled route, which reads it
    /// per request, so that a route's settings are held once.
    Forward(Arc<Forward>),
    /// Answer directly (Istio's `block_all` is a direct 502).
    DirectResponse {
        /// Status code.
        status: u16,
        /// Body, if any.
        body: Option<DirectBody>,
    },
    /// Answer with a redirect.
    Redirect(Box<Redirect>),
}

/// A direct response's body: Envoy's inline `DataSource`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectBody {
    /// `inline_string`.
    String(String),
    /// `inline_bytes`.
    Bytes(Vec<u8>),
}

impl DirectBody {
    /// The bytes sent.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            DirectBody::String(s) => s.as_bytes(),
            DirectBody::Bytes(b) => b,
        }
    }
}

/// Envoy's `RouteAction`, the parts portcullis honours.
#[derive(Debug, Clone, PartialEq)]
pub struct Forward {
    /// Where requests go.
    pub cluster: ClusterSpecifier,
    /// Whole-request timeout; `None` takes Envoy's default of 15 s, `Some(ZERO)` disables.
    pub timeout: Option<Duration>,
    /// Idle timeout of the stream on this route.
    pub idle_timeout: Option<Duration>,
    /// Retry policy; overrides the virtual host's. Shared: most routes carry Istio's one
    /// policy, and a mesh's routes hold one copy of it.
    pub retry_policy: Option<Arc<RetryPolicy>>,
    /// Replaces the Host/`:authority`.
    pub host_rewrite_literal: Option<String>,
    /// Replaces the matched prefix of the path.
    pub prefix_rewrite: Option<String>,
    /// Rewrites the path by regex substitution.
    pub regex_rewrite: Option<RegexRewrite>,
    /// Copies of requests sent elsewhere; carried in the model and the config dump, not
    /// applied by the data path yet.
    pub request_mirror_policies: Vec<RequestMirrorPolicy>,
    /// What a request's hash is computed from, for a RING_HASH or MAGLEV cluster.
    pub hash_policy: Vec<HashPolicy>,
}

/// Envoy's `RouteAction.HashPolicy`: one input to a request's hash.
#[derive(Debug, Clone, PartialEq)]
pub struct HashPolicy {
    /// What is hashed.
    pub key: HashKey,
    /// When this policy yields a hash, the ones after it are not evaluated.
    pub terminal: bool,
}

/// An attribute of a generated hash cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CookieAttribute {
    /// Its name.
    pub name: String,
    /// Its value; empty for a flag such as `Secure`.
    pub value: String,
}

/// The request property a [`HashPolicy`] hashes.
#[derive(Debug, Clone, PartialEq)]
pub enum HashKey {
    /// The value of a request header (lower-case name).
    Header(String),
    /// The value of a cookie; with a `ttl` and no such cookie in the request, the proxy
    /// makes one up and sends it back in `set-cookie`.
    Cookie {
        /// Cookie name.
        name: String,
        /// `Path` of a generated cookie.
        path: Option<String>,
        /// `Max-Age` of a generated cookie; zero makes a session cookie.
        ttl: Option<Duration>,
        /// More attributes of a generated cookie (`name` or `name=value`), e.g. `SameSite`.
        attributes: Vec<CookieAttribute>,
    },
    /// The downstream connection's source IP (`connection_properties.source_ip`).
    SourceIp,
    /// The value of a query parameter.
    QueryParameter(String),
}

/// Envoy's `RegexMatchAndSubstitute`.
#[derive(Debug, Clone, PartialEq)]
pub struct RegexRewrite {
    /// RE2 pattern.
    pub pattern: String,
    /// Substitution, with `\1` style groups.
    pub substitution: String,
}

/// Envoy's `RedirectAction`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Redirect {
    /// New scheme (`https_redirect` is `Some("https")`).
    pub scheme: Option<String>,
    /// New host.
    pub host: Option<String>,
    /// New port.
    pub port: Option<u16>,
    /// New path.
    pub path: Option<String>,
    /// Replaces the matched prefix.
    pub prefix_rewrite: Option<String>,
    /// Status code: 301 (Envoy's default), 302, 303, 307 or 308.
    pub status: u16,
    /// Drops the query string.
    pub strip_query: bool,
}

/// Envoy's `RetryPolicy`.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Conditions, e.g. `connect-failure`, `refused-stream`, `5xx`, `gateway-error`,
    /// `reset`, `retriable-status-codes`, `retriable-4xx`.
    pub retry_on: Vec<String>,
    /// Retries after the first attempt.
    pub num_retries: u32,
    /// Timeout of each attempt.
    pub per_try_timeout: Option<Duration>,
    /// Status codes retried under `retriable-status-codes`.
    pub retriable_status_codes: Vec<u16>,
    /// Response headers retried under `retriable-headers`: any one matching is enough.
    pub retriable_headers: Vec<HeaderMatcher>,
    /// Whether a retry avoids hosts already tried (Istio's `previous_hosts` predicate).
    pub avoid_previous_hosts: bool,
    /// How many times a host pick is retried to avoid previous hosts.
    pub host_selection_retry_max_attempts: u32,
    /// The `previous_priorities` retry priority's `update_frequency` (Istio's
    /// `retryRemoteLocalities`: 2): every that many attempts, retries leave the priorities
    /// already tried.
    pub previous_priorities: Option<u32>,
    /// `retry_back_off`; `None`: Envoy's 25 ms base and 250 ms ceiling.
    pub retry_back_off: Option<Box<RetryBackOff>>,
}

/// Envoy's `RetryBackOff`: a retry waits a random time below a ceiling that starts at the
/// base interval and doubles with each retry, up to the maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryBackOff {
    /// `base_interval`, above zero.
    pub base_interval: Duration,
    /// `max_interval`, at least the base; `None`: ten times the base.
    pub max_interval: Option<Duration>,
}

/// Envoy's `Cluster`, the parts portcullis honours.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    /// Name (Istio: `outbound|PORT|SUBSET|HOST`, `BlackHoleCluster`, `PassthroughCluster`).
    pub name: String,
    /// How its endpoints are found.
    pub discovery: Discovery,
    /// How an endpoint is picked.
    pub lb_policy: LbPolicy,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// The protocol spoken upstream for HTTP.
    pub upstream_protocol: UpstreamProtocol,
    /// Circuit breaker thresholds at default priority.
    pub circuit_breakers: Thresholds,
    /// Limits on each upstream connection.
    pub connection_limits: ConnectionLimits,
    /// Ejection of failing endpoints, when configured. Boxed, as slow start below: few
    /// clusters have it, and a mesh has thousands of clusters.
    pub outlier_detection: Option<Box<OutlierDetection>>,
    /// `common_lb_config.healthy_panic_threshold`: below this percentage of healthy
    /// endpoints, health (ejections included) is ignored; `None`: Envoy's 50.
    pub healthy_panic_threshold: Option<f64>,
    /// `common_lb_config.locality_weighted_lb_config`: a pick first draws a locality of
    /// the priority by its `load_balancing_weight`.
    pub locality_weighted: bool,
    /// `round_robin_lb_config.slow_start_config` or
    /// `least_request_lb_config.slow_start_config`, whichever the policy reads.
    pub slow_start: Option<Box<SlowStartConfig>>,
    /// Endpoints given inline (STATIC, STRICT_DNS, LOGICAL_DNS).
    pub load_assignment: Option<ClusterLoadAssignment>,
    /// Transport of every endpoint, unless a match below applies.
    pub transport: UpstreamTransport,
    /// Istio's `transport_socket_matches`: endpoints whose metadata
    /// `envoy.transport_socket_match` carries these keys get that transport.
    pub transport_socket_matches: Vec<TransportSocketMatch>,
    /// How often DNS names are re-resolved (DNS types).
    pub dns_refresh_rate: Option<Duration>,
    /// Where the cluster came from, e.g. Istio's `metadata.filter_metadata.istio.config`
    /// (`/apis/networking.istio.io/v1/namespaces/default/service-entry/external`); shared
    /// with the snapshot's cluster and the resource it was compiled from.
    pub source: Option<Arc<str>>,
    /// Portcullis' SSRF guard (not Envoy's): when set, the answers for this cluster's names
    /// that are not public addresses are not used, unless inside one of these networks. Set
    /// for an external ServiceEntry compiled from files; xDS does not say where a cluster's
    /// service lives, so clusters from xDS have none.
    pub ssrf_guard: Option<Vec<IpNet>>,
}

/// Envoy's `SlowStartConfig`: new endpoints' weights ramp up over a window.
#[derive(Debug, Clone, PartialEq)]
pub struct SlowStartConfig {
    /// `slow_start_window`.
    pub window: Duration,
    /// `aggression` (Envoy's default 1.0); only its default value is read, portcullis has
    /// no runtime.
    pub aggression: Option<RuntimeDouble>,
    /// `min_weight_percent` (Envoy's default 10).
    pub min_weight_percent: Option<f64>,
}

/// Envoy's `RuntimeDouble`.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeDouble {
    /// `default_value`.
    pub default_value: f64,
    /// `runtime_key`.
    pub runtime_key: String,
}

/// Envoy's limits on each upstream connection of a cluster: the HTTP protocol options'
/// `common_http_protocol_options` and HTTP/2 `max_concurrent_streams`, and
/// `upstream_connection_options.tcp_keepalive`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Closes a connection idle this long; `None`: Envoy's default of 1 h.
    pub idle_timeout: Option<Duration>,
    /// Closes a connection after this many requests; `None`: unlimited.
    pub max_requests_per_connection: Option<u32>,
    /// Closes a connection this long after it opened; `None`: never.
    pub max_connection_duration: Option<Duration>,
    /// Streams one HTTP/2 connection carries at once, below the server's own limit
    /// (`http2_protocol_options.max_concurrent_streams`); `None`: the server's limit alone.
    pub max_concurrent_streams: Option<u32>,
    /// TCP keepalive on upstream sockets; `None`: the system's (off).
    pub tcp_keepalive: Option<TcpKeepalive>,
}

/// Envoy's `OutlierDetection`, the consecutive-failure detectors (success-rate and
/// failure-percentage detection are not applied; istiod turns them off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierDetection {
    /// `consecutive_5xx` (Envoy's default 5).
    pub consecutive_5xx: u32,
    /// `enforcing_consecutive_5xx`, percent (default 100).
    pub enforcing_consecutive_5xx: u32,
    /// `consecutive_gateway_failure` (default 5).
    pub consecutive_gateway_failure: u32,
    /// `enforcing_consecutive_gateway_failure`, percent (default 0).
    pub enforcing_consecutive_gateway_failure: u32,
    /// `split_external_local_origin_errors`.
    pub split_external_local_origin_errors: bool,
    /// `consecutive_local_origin_failure` (default 5).
    pub consecutive_local_origin_failure: u32,
    /// `enforcing_consecutive_local_origin_failure`, percent (default 100).
    pub enforcing_consecutive_local_origin_failure: u32,
    /// `interval` (default 10 s).
    pub interval: Duration,
    /// `base_ejection_time` (default 30 s).
    pub base_ejection_time: Duration,
    /// `max_ejection_time` (default 300 s).
    pub max_ejection_time: Duration,
    /// `max_ejection_percent` (default 10).
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_5xx: 5,
            enforcing_consecutive_5xx: 100,
            consecutive_gateway_failure: 5,
            enforcing_consecutive_gateway_failure: 0,
            split_external_local_origin_errors: false,
            consecutive_local_origin_failure: 5,
            enforcing_consecutive_local_origin_failure: 100,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
        }
    }
}

/// Envoy's `TcpKeepalive`; unset fields take the system's values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpKeepalive {
    /// Unanswered probes before the connection is dead.
    pub probes: Option<u32>,
    /// Idle time before the first probe.
    pub time: Option<Duration>,
    /// Time between probes.
    pub interval: Option<Duration>,
}

/// Envoy's cluster discovery type.
#[derive(Debug, Clone, PartialEq)]
pub enum Discovery {
    /// Endpoints inline, fixed addresses.
    Static,
    /// Endpoints inline, names resolved to every address.
    StrictDns,
    /// Endpoints inline, a name resolved to its first address for each new connection.
    LogicalDns,
    /// Endpoints over EDS, under this name (`eds_cluster_config.service_name`, else the
    /// cluster's name).
    Eds {
        /// The ClusterLoadAssignment name to subscribe to.
        service_name: String,
    },
    /// The original destination of the connection.
    OriginalDst(OriginalDst),
}

/// How an ORIGINAL_DST cluster forwards.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OriginalDst {
    /// Forwards to this port instead of the original one (`upstream_port_override`; Istio
    /// sets it for a resolution NONE service whose endpoints use another `targetPort`).
    pub port_override: Option<u16>,
    /// Portcullis's guard for resolution NONE services compiled from files: only these
    /// destinations are forwarded to (the service's addresses and its host's current DNS
    /// answers; for `PassthroughCluster` under REGISTRY_ONLY, the registered pods). `None`:
    /// any destination, as Envoy; `Some` of an empty list: none yet.
    pub allowed_destinations: Option<Vec<IpNet>>,
}

/// Envoy's `lb_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    /// Weighted round robin (Envoy's default).
    RoundRobin,
    /// Least request, power of two choices (Istio's default).
    LeastRequest,
    /// Random.
    Random,
    /// The cluster picks (ORIGINAL_DST).
    ClusterProvided,
    /// Consistent hashing on a ring (`ring_hash_lb_config`).
    RingHash {
        /// `minimum_ring_size`, Envoy's default 1024.
        minimum_ring_size: u64,
        /// `maximum_ring_size`, Envoy's default 8M.
        maximum_ring_size: u64,
    },
    /// Consistent hashing with a Maglev table (`maglev_lb_config`).
    Maglev {
        /// `table_size`, a prime, Envoy's default 65537.
        table_size: u64,
    },
}

/// The HTTP protocol spoken upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 (Envoy's default).
    Http1,
    /// HTTP/2 (`explicit_http_config.http2_protocol_options`).
    Http2,
    /// The downstream's (`use_downstream_protocol_config`).
    UseDownstream,
}

/// Circuit breaker thresholds (Envoy's defaults: 1024, 1024, 1024, 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Connections to the cluster.
    pub max_connections: u32,
    /// Requests waiting for a connection.
    pub max_pending_requests: u32,
    /// Requests in flight.
    pub max_requests: u32,
    /// Retries in flight.
    pub max_retries: u32,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
        }
    }
}

/// How bytes to an endpoint are carried.
#[derive(Debug, Clone, PartialEq)]
pub enum UpstreamTransport {
    /// Plain TCP (`raw_buffer`).
    Plaintext,
    /// Istio mutual TLS: the workload's certificate (SDS `default`) and the mesh root
    /// (`ROOTCA`), with the SNI, ALPN and peer SANs istiod sets. The certificates come from
    /// istio-agent's output files when portcullis is given them; otherwise an endpoint that
    /// needs it is refused a connection rather than sent plaintext.
    IstioMutualTls(Arc<IstioMutual>),
    /// TLS originated by portcullis (`envoy.transport_sockets.tls` with an
    /// `UpstreamTlsContext` whose certificates are given as data or files).
    Tls(Arc<UpstreamTls>),
    /// A TLS transport portcullis cannot build (named by its type), kept for the config
    /// dump; connections to endpoints that need it fail.
    Unsupported(String),
}

/// Envoy's `UpstreamTlsContext`, the parts istiod sets for a DestinationRule's `tls`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamTls {
    /// The SNI sent; `None` sends none (or, with `auto_sni`, the request's host).
    pub sni: Option<String>,
    /// Sends the HTTP request's host as SNI when `sni` is unset (`auto_sni` of the
    /// cluster's `upstream_http_protocol_options`; istiod sets it when the rule names no
    /// SNI).
    pub auto_sni: bool,
    /// Verifies the certificate's SANs against the SNI sent (`auto_san_validation`).
    pub auto_san_validation: bool,
    /// ALPN protocols offered, in order.
    pub alpn_protocols: Vec<String>,
    /// `tls_params.tls_minimum_protocol_version` (Envoy's client default: TLS 1.2).
    pub min_version: TlsVersion,
    /// `tls_params.tls_maximum_protocol_version` (Envoy's client default: TLS 1.2;
    /// istiod sets 1.3).
    pub max_version: TlsVersion,
    /// The client certificate presented, if any (`tls_certificates`).
    pub client_certificate: Option<TlsCertificate>,
    /// How the server's certificate is verified; `None` accepts any (Envoy's behaviour
    /// without a validation context).
    pub validation: Option<CertificateValidationContext>,
}

/// What istiod sets in an Istio mutual TLS context besides the workload's certificates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct IstioMutual {
    /// The SNI (istiod: `outbound_.PORT_._.HOST`).
    pub sni: Option<String>,
    /// ALPN (istiod: `istio-peer-exchange`, `istio`, and `h2` for HTTP/2 clusters).
    pub alpn_protocols: Vec<String>,
    /// The peer's identities (`spiffe://TRUST_DOMAIN/ns/NS/sa/SA`); empty: any.
    pub match_subject_alt_names: Vec<StringMatcher>,
}

/// A TLS protocol version of `TlsParameters`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TlsVersion {
    /// `TLSv1_0`.
    Tls10,
    /// `TLSv1_1`.
    Tls11,
    /// `TLSv1_2`.
    Tls12,
    /// `TLSv1_3`.
    Tls13,
}

/// Envoy's `TlsCertificate`: a certificate chain and its private key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TlsCertificate {
    /// The PEM certificate chain, leaf first.
    pub certificate_chain: DataSource,
    /// The PEM private key.
    pub private_key: DataSource,
}

/// Envoy's `CertificateValidationContext`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CertificateValidationContext {
    /// PEM CA certificates the chain must end in; [`TrustedCa::System`] for the system's.
    pub trusted_ca: TrustedCa,
    /// The certificate must carry a SAN (DNS, URI, email or IP) that one of these matches;
    /// empty: any.
    pub match_subject_alt_names: Vec<StringMatcher>,
    /// PEM certificate revocation lists (`crl`): a revoked certificate is refused, and so is
    /// one whose issuer has no list here.
    pub crl: Option<DataSource>,
    /// `only_verify_leaf_cert_crl`: only the server's own certificate is checked.
    pub only_verify_leaf_cert_crl: bool,
}

/// Where the trusted CA certificates come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TrustedCa {
    /// PEM data, inline or in a file.
    Pem(DataSource),
    /// The operating system's trust store (istiod's `file-root:system`).
    System,
}

/// Envoy's `DataSource`: bytes given inline or read from a file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DataSource {
    /// `filename`: read when the snapshot is built.
    File(String),
    /// `inline_bytes` / `inline_string`.
    Inline(Vec<u8>),
}

/// One of Istio's `transport_socket_matches`.
#[derive(Debug, Clone, PartialEq)]
pub struct TransportSocketMatch {
    /// Name (Istio: `tlsMode-istio`, `tlsMode-disabled`).
    pub name: String,
    /// Endpoint metadata under `envoy.transport_socket_match` that must all be present.
    pub match_metadata: BTreeMap<String, String>,
    /// The transport used for matching endpoints.
    pub transport: UpstreamTransport,
}

/// Envoy's `ClusterLoadAssignment`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterLoadAssignment {
    /// The cluster (or EDS service) name.
    pub cluster_name: String,
    /// Endpoints grouped by locality and priority.
    pub endpoints: Vec<LocalityLbEndpoints>,
}

/// Envoy's `LocalityLbEndpoints`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalityLbEndpoints {
    /// Region, zone and sub-zone.
    pub locality: Locality,
    /// Priority: 0 is used first; higher ones only when lower ones are unhealthy.
    pub priority: u32,
    /// Weight of the locality (locality-weighted balancing), if set.
    pub load_balancing_weight: Option<u32>,
    /// The endpoints.
    pub lb_endpoints: Vec<LbEndpoint>,
}

/// Envoy's `Locality`.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Locality {
    /// Region.
    pub region: String,
    /// Zone.
    pub zone: String,
    /// Sub-zone.
    pub sub_zone: String,
}

/// Envoy's `LbEndpoint`.
#[derive(Debug, Clone, PartialEq)]
pub struct LbEndpoint {
    /// Where it is.
    pub address: EndpointAddress,
    /// Health as the control plane reports it.
    pub health: HealthStatus,
    /// Weight (Envoy's default 1).
    pub load_balancing_weight: u32,
    /// Metadata under `envoy.transport_socket_match` (Istio: `tlsMode: istio`).
    pub transport_socket_match: BTreeMap<String, String>,
    /// The endpoint's hostname (`endpoint.hostname`; Istio sets it for DNS endpoints),
    /// used as the upstream Host when a route asks for auto host rewrite.
    pub hostname: Option<String>,
    /// The workload behind it, for telemetry (`filter_metadata.istio.workload`), when
    /// known.
    pub workload: Option<Arc<WorkloadMetadata>>,
    /// Where the endpoint came from, e.g. `WorkloadEntry default/external` (portcullis's
    /// files; not an Envoy field), shared with its resource's other endpoints.
    pub source: Option<Arc<str>>,
}

/// An endpoint's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointAddress {
    /// An IP address and port.
    Socket(SocketAddr),
    /// A DNS name and port (DNS clusters).
    Name {
        /// The name.
        host: String,
        /// The port.
        port: u16,
    },
}

impl EndpointAddress {
    /// The IP address, when the endpoint has one.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            EndpointAddress::Socket(a) => Some(a.ip()),
            EndpointAddress::Name { .. } => None,
        }
    }
}

/// Envoy's endpoint `HealthStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthStatus {
    /// Not reported: treated as healthy.
    Unknown,
    /// Healthy.
    Healthy,
    /// Unhealthy: not used.
    Unhealthy,
    /// Draining: not used for new requests.
    Draining,
    /// Timed out: not used.
    Timeout,
    /// Degraded: used only when no healthy endpoint is left.
    Degraded,
}

impl HealthStatus {
    /// Whether the endpoint takes new traffic.
    pub fn is_usable(self) -> bool {
        matches!(
            self,
            HealthStatus::Unknown | HealthStatus::Healthy | HealthStatus::Degraded
        )
    }
}
