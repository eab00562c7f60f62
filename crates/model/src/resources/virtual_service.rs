//! `VirtualService`: Istio's routing rules for HTTP, TLS and TCP traffic to its hosts, as
//! `networking/v1alpha3/virtual_service.proto` defines them.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::{PortSelector, Unapplied, base64_bytes, duration, exact};

/// The spec of a VirtualService.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    /// Hosts the routes apply to: names (short names are relative to the namespace),
    /// `*.suffix` wildcards or `*`.
    #[serde(default, deserialize_with = "exact")]
    pub hosts: Vec<String>,
    /// Gateways and sidecars the routes apply to; empty or `mesh` means sidecars.
    #[serde(default, deserialize_with = "exact")]
    pub gateways: Vec<String>,
    /// HTTP routes, in order; the first that matches a request takes it.
    #[serde(default, deserialize_with = "exact")]
    pub http: Vec<HttpRoute>,
    /// TLS routes by SNI, in order.
    #[serde(default, deserialize_with = "exact")]
    pub tls: Vec<TlsRoute>,
    /// TCP routes by destination, in order.
    #[serde(default, deserialize_with = "exact")]
    pub tcp: Vec<TcpRoute>,
    /// Namespaces the rules are visible to (`*` all, `.` own); empty means all.
    #[serde(default, deserialize_with = "exact")]
    pub export_to: Vec<String>,
}

impl VirtualServiceSpec {
    /// Whether the rules apply to sidecars: no gateways named, or `mesh` among them.
    pub fn applies_to_sidecars(&self) -> bool {
        self.gateways.is_empty() || self.gateways.iter().any(|g| g == "mesh")
    }
}

/// Istio's `StringMatch`: one of exact, prefix or regex (RE2, whole value); none set means
/// "present" where a header or query parameter is matched.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct StringMatch {
    /// Equal to this.
    #[serde(default)]
    pub exact: Option<String>,
    /// Starts with this.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Matches this RE2 regex entirely.
    #[serde(default)]
    pub regex: Option<String>,
}

impl StringMatch {
    /// How many of exact, prefix and regex are set (Istio allows one).
    pub fn kinds_set(&self) -> usize {
        [
            self.exact.is_some(),
            self.prefix.is_some(),
            self.regex.is_some(),
        ]
        .into_iter()
        .filter(|set| *set)
        .count()
    }
}

/// One `match` of an HTTP route: every condition set must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatchRequest {
    /// Name, appended to the route's name in Envoy's route name.
    #[serde(default)]
    pub name: String,
    /// The path.
    #[serde(default)]
    pub uri: Option<StringMatch>,
    /// The scheme.
    #[serde(default)]
    pub scheme: Option<StringMatch>,
    /// The method.
    #[serde(default)]
    pub method: Option<StringMatch>,
    /// The Host/`:authority`.
    #[serde(default)]
    pub authority: Option<StringMatch>,
    /// Headers that must match (an empty match: present).
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    /// Headers that must not match (an empty match: absent).
    #[serde(default)]
    pub without_headers: BTreeMap<String, StringMatch>,
    /// The port the request was sent to.
    #[serde(default)]
    pub port: Option<u32>,
    /// Query parameters that must match (an empty match: present).
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    /// Compares the uri ignoring case.
    #[serde(default)]
    pub ignore_uri_case: bool,
    /// Labels the calling workload must carry.
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    /// Gateways the match applies to (`mesh` for sidecars).
    #[serde(default, deserialize_with = "exact")]
    pub gateways: Vec<String>,
    /// The calling workload's namespace.
    #[serde(default)]
    pub source_namespace: String,
    /// Not applied yet (a stat prefix for the route).
    #[serde(default)]
    pub stat_prefix: Option<Unapplied>,
}

/// Where a route sends traffic: a service host, optionally a port and a subset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Destination {
    /// Service host; a short name is relative to the VirtualService's namespace.
    #[serde(default)]
    pub host: String,
    /// Subset of a DestinationRule for the host.
    #[serde(default)]
    pub subset: String,
    /// Port; may be left out when the service has one port.
    #[serde(default)]
    pub port: Option<PortSelector>,
}

/// Header changes of one direction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct HeaderOperations {
    /// Sets (replaces) these headers.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Adds these values beside any existing.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    /// Removes these headers.
    #[serde(default, deserialize_with = "exact")]
    pub remove: Vec<String>,
}

/// `headers`: changes to requests and responses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Headers {
    /// On requests.
    #[serde(default)]
    pub request: Option<HeaderOperations>,
    /// On responses.
    #[serde(default)]
    pub response: Option<HeaderOperations>,
}

/// One destination of an HTTP route, with its weight and header changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct HttpRouteDestination {
    /// Where.
    #[serde(default)]
    pub destination: Destination,
    /// Share of the traffic (relative); 0 sends none when there are several destinations.
    #[serde(default)]
    pub weight: i64,
    /// Header changes for this destination.
    #[serde(default)]
    pub headers: Option<Headers>,
}

/// `redirect.derivePort`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DerivePort {
    /// 80 for http, 443 for https.
    FromProtocolDefault,
    /// The port of the request.
    FromRequestPort,
}

/// `redirect`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRedirect {
    /// Replaces the path.
    #[serde(default)]
    pub uri: Option<String>,
    /// Replaces the host.
    #[serde(default)]
    pub authority: Option<String>,
    /// Replaces the port.
    #[serde(default)]
    pub port: Option<u32>,
    /// Derives the port instead.
    #[serde(default)]
    pub derive_port: Option<DerivePort>,
    /// Replaces the scheme.
    #[serde(default)]
    pub scheme: Option<String>,
    /// Status code, 301 unless set.
    #[serde(default)]
    pub redirect_code: Option<u32>,
}

/// `directResponse.body`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct HttpBody {
    /// A text body.
    #[serde(default)]
    pub string: Option<String>,
    /// A binary body, base64 in the resource.
    #[serde(default, deserialize_with = "base64_bytes")]
    pub bytes: Option<Vec<u8>>,
}

/// `directResponse`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct HttpDirectResponse {
    /// Status code.
    #[serde(default)]
    pub status: u32,
    /// Body.
    #[serde(default)]
    pub body: Option<HttpBody>,
}

/// `rewrite.uriRegexRewrite`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct RegexRewrite {
    /// RE2 pattern.
    #[serde(default, rename = "match")]
    pub pattern: String,
    /// Substitution, `\1` for a group.
    #[serde(default)]
    pub rewrite: String,
}

/// `rewrite`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRewrite {
    /// Replaces the matched part of the path (the whole path under an exact match).
    #[serde(default)]
    pub uri: Option<String>,
    /// Replaces the Host/`:authority`.
    #[serde(default)]
    pub authority: Option<String>,
    /// Rewrites the path by regex.
    #[serde(default)]
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

/// `retries`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRetry {
    /// Retries after the first attempt; 0 disables Istio's default retries.
    #[serde(default)]
    pub attempts: i64,
    /// Timeout of each attempt.
    #[serde(default, deserialize_with = "duration")]
    pub per_try_timeout: Option<Duration>,
    /// Comma-separated Envoy `retry_on` conditions and status codes.
    #[serde(default)]
    pub retry_on: String,
    /// Retries other localities.
    #[serde(default)]
    pub retry_remote_localities: Option<bool>,
    /// Whether retries avoid hosts already tried (Istio's default: yes).
    #[serde(default)]
    pub retry_ignore_previous_hosts: Option<bool>,
    /// The base interval of the jittered back-off between retries (Envoy's default 25 ms).
    #[serde(default, deserialize_with = "duration")]
    pub backoff: Option<Duration>,
}

/// Istio's `Percent`: `{value: 12.5}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
pub struct Percent {
    /// 0 to 100; always finite.
    #[serde(default, deserialize_with = "finite")]
    pub value: f64,
}

// Equality is total: a value that is not finite is refused when read.
impl Eq for Percent {}

fn finite<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    let value = f64::deserialize(deserializer)?;
    if value.is_finite() {
        Ok(value)
    } else {
        Err(serde::de::Error::custom(format!(
            "percentage {value} is not a finite number"
        )))
    }
}

/// `fault.delay`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    /// How long.
    #[serde(default, deserialize_with = "duration")]
    pub fixed_delay: Option<Duration>,
    /// Share of requests delayed.
    #[serde(default)]
    pub percentage: Option<Percent>,
    /// Deprecated share of requests delayed, a whole percentage.
    #[serde(default)]
    pub percent: Option<i64>,
    /// Not applied yet.
    #[serde(default)]
    pub exponential_delay: Option<Unapplied>,
}

/// `fault.abort`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    /// The status answered.
    #[serde(default)]
    pub http_status: Option<i64>,
    /// The gRPC status answered, by name (`UNAVAILABLE`).
    #[serde(default)]
    pub grpc_status: Option<String>,
    /// Not applied yet (an HTTP/2 error).
    #[serde(default)]
    pub http2_error: Option<Unapplied>,
    /// Share of requests aborted.
    #[serde(default)]
    pub percentage: Option<Percent>,
}

/// The gRPC codes Istio names in `fault.abort.grpcStatus` (istiod's `SupportedGRPCStatus`).
const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

impl FaultAbort {
    /// The numeric code of `grpcStatus`, `None` when unset or not a name Istio knows.
    pub fn grpc_code(&self) -> Option<u32> {
        let name = self.grpc_status.as_deref()?;
        let code = GRPC_CODES.iter().position(|known| *known == name)?;
        u32::try_from(code).ok()
    }
}

/// `fault`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct HttpFaultInjection {
    /// Delays requests.
    #[serde(default)]
    pub delay: Option<FaultDelay>,
    /// Answers requests with an error.
    #[serde(default)]
    pub abort: Option<FaultAbort>,
}

/// One of `mirrors`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct HttpMirrorPolicy {
    /// Where copies go.
    #[serde(default)]
    pub destination: Destination,
    /// Share of requests copied (all unless set).
    #[serde(default)]
    pub percentage: Option<Percent>,
}

/// One HTTP route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    /// Name, Envoy's route name.
    #[serde(default)]
    pub name: String,
    /// Conditions, any of which selects the route; none matches everything.
    #[serde(default, rename = "match", deserialize_with = "exact")]
    pub matches: Vec<HttpMatchRequest>,
    /// Destinations with weights.
    #[serde(default, deserialize_with = "exact")]
    pub route: Vec<HttpRouteDestination>,
    /// Answers with a redirect instead.
    #[serde(default)]
    pub redirect: Option<HttpRedirect>,
    /// Answers directly instead.
    #[serde(default)]
    pub direct_response: Option<HttpDirectResponse>,
    /// Not applied: a delegate VirtualService.
    #[serde(default)]
    pub delegate: Option<Unapplied>,
    /// Rewrites before forwarding.
    #[serde(default)]
    pub rewrite: Option<HttpRewrite>,
    /// Whole-request timeout; 0 disables it (Istio's default).
    #[serde(default, deserialize_with = "duration")]
    pub timeout: Option<Duration>,
    /// Retries; Istio's default policy unless set.
    #[serde(default)]
    pub retries: Option<HttpRetry>,
    /// Injected delays and aborts.
    #[serde(default)]
    pub fault: Option<HttpFaultInjection>,
    /// Copies requests to this destination.
    #[serde(default)]
    pub mirror: Option<Destination>,
    /// Copies requests to these destinations.
    #[serde(default, deserialize_with = "exact")]
    pub mirrors: Vec<HttpMirrorPolicy>,
    /// Share of requests `mirror` copies (all unless set).
    #[serde(default)]
    pub mirror_percentage: Option<Percent>,
    /// Deprecated whole-percentage form of `mirrorPercentage`.
    #[serde(default)]
    pub mirror_percent: Option<i64>,
    /// Not applied yet.
    #[serde(default)]
    pub cors_policy: Option<Unapplied>,
    /// Header changes.
    #[serde(default)]
    pub headers: Option<Headers>,
}

/// One destination of a TLS or TCP route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct RouteDestination {
    /// Where.
    #[serde(default)]
    pub destination: Destination,
    /// Share of the connections (relative).
    #[serde(default)]
    pub weight: i64,
}

/// A match of a TLS route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsMatchAttributes {
    /// SNI names (exact or `*.suffix`).
    #[serde(default, deserialize_with = "exact")]
    pub sni_hosts: Vec<String>,
    /// Destination addresses or ranges.
    #[serde(default, deserialize_with = "exact")]
    pub destination_subnets: Vec<String>,
    /// The port connected to.
    #[serde(default)]
    pub port: Option<u32>,
    /// Labels the calling workload must carry.
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    /// Gateways the match applies to (`mesh` for sidecars).
    #[serde(default, deserialize_with = "exact")]
    pub gateways: Vec<String>,
    /// The calling workload's namespace.
    #[serde(default)]
    pub source_namespace: String,
}

/// A TLS route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct TlsRoute {
    /// Conditions, any of which selects the route.
    #[serde(default, rename = "match", deserialize_with = "exact")]
    pub matches: Vec<TlsMatchAttributes>,
    /// Destinations with weights.
    #[serde(default, deserialize_with = "exact")]
    pub route: Vec<RouteDestination>,
}

/// A match of a TCP route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct L4MatchAttributes {
    /// Destination addresses or ranges.
    #[serde(default, deserialize_with = "exact")]
    pub destination_subnets: Vec<String>,
    /// The port connected to.
    #[serde(default)]
    pub port: Option<u32>,
    /// Labels the calling workload must carry.
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    /// Gateways the match applies to (`mesh` for sidecars).
    #[serde(default, deserialize_with = "exact")]
    pub gateways: Vec<String>,
    /// The calling workload's namespace.
    #[serde(default)]
    pub source_namespace: String,
    /// Not applied (a deprecated source address match).
    #[serde(default)]
    pub source_subnet: Option<Unapplied>,
}

/// A TCP route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct TcpRoute {
    /// Conditions, any of which selects the route; none matches every connection.
    #[serde(default, rename = "match", deserialize_with = "exact")]
    pub matches: Vec<L4MatchAttributes>,
    /// Destinations with weights.
    #[serde(default, deserialize_with = "exact")]
    pub route: Vec<RouteDestination>,
}
