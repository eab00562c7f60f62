//! Serde types for the Istio and Kubernetes resources portcullis reads.
//!
//! Only the fields portcullis acts on are modelled. serde skips the others; which of them
//! are fields of the real schema and which are misspellings is decided by the loader
//! against the schema's field lists (`schema.rs`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

mod virtual_service;

pub use virtual_service::*;

/// A list without spare capacity. Parsed resources live as long as their file's content
/// does, and a list grown by doubling while parsed keeps room for four entries where
/// there is usually one (a ServiceEntry's single endpoint or port).
fn exact<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    let mut list = Vec::deserialize(deserializer)?;
    list.shrink_to_fit();
    Ok(list)
}

/// Kubernetes object metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// Object name.
    #[serde(default)]
    pub name: String,
    /// Namespace; empty in the file means `default`, filled in by the loader.
    #[serde(default)]
    pub namespace: String,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Annotations, e.g. `proxy.istio.io/health-checks-enabled`.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// `creationTimestamp` as written (RFC 3339); Istio orders conflicting services by it.
    #[serde(default)]
    pub creation_timestamp: Option<String>,
    /// `generateName`: set on objects a controller created, whose owner istiod then
    /// names the workload after.
    #[serde(default)]
    pub generate_name: String,
    /// `ownerReferences`.
    #[serde(default, deserialize_with = "exact")]
    pub owner_references: Vec<OwnerReference>,
}

/// One of an object's `ownerReferences`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct OwnerReference {
    /// The owner's kind, e.g. `ReplicaSet`.
    #[serde(default)]
    pub kind: String,
    /// The owner's name.
    #[serde(default)]
    pub name: String,
    /// Whether the owner is the object's managing controller.
    #[serde(default)]
    pub controller: bool,
}

/// Label selector used by `workloadSelector` and Kubernetes `selector`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Labels a workload must carry (all of them) to be selected.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Where a ServiceEntry's service lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    /// Outside the mesh (Istio's default).
    #[default]
    MeshExternal,
    /// Part of the mesh.
    MeshInternal,
}

/// How a ServiceEntry's endpoints are found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    /// Forward to the original destination address.
    #[default]
    None,
    /// Use the endpoints' addresses as given.
    Static,
    /// Resolve endpoint hostnames (or the hosts) with DNS; every address is an endpoint.
    Dns,
    /// Resolve with DNS and use one address at a time.
    DnsRoundRobin,
}

/// A port of a ServiceEntry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// Port number the service is reached on.
    pub number: u32,
    /// Protocol: HTTP, HTTPS, HTTP2, GRPC, TLS, TCP, MONGO, ...
    #[serde(default)]
    pub protocol: Option<String>,
    /// Port name, used to look up endpoint port overrides.
    #[serde(default)]
    pub name: String,
    /// Port on the endpoints, when it differs from `number`.
    #[serde(default)]
    pub target_port: Option<u32>,
}

/// The spec of a WorkloadEntry, also used inline as ServiceEntry endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntrySpec {
    /// IP address or hostname of the workload.
    #[serde(default)]
    pub address: String,
    /// Port overrides keyed by the service port's name.
    #[serde(default)]
    pub ports: BTreeMap<String, u32>,
    /// Labels, matched by `workloadSelector`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Network the workload is on.
    #[serde(default)]
    pub network: String,
    /// Locality, `region/zone/subzone`.
    #[serde(default)]
    pub locality: String,
    /// Load-balancing weight; absent means 1.
    #[serde(default)]
    pub weight: Option<u32>,
    /// Service account the workload runs as.
    #[serde(default)]
    pub service_account: String,
}

/// A WorkloadEntry's status, written by istiod's health checks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntryStatus {
    /// Conditions; `Healthy` counts when health checks are enabled by annotation.
    #[serde(default, deserialize_with = "exact")]
    pub conditions: Vec<PodCondition>,
}

/// The spec of a ServiceEntry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    /// Hostnames, possibly with a `*.` wildcard prefix.
    #[serde(default, deserialize_with = "exact")]
    pub hosts: Vec<String>,
    /// Virtual IPs or CIDR ranges of the service.
    #[serde(default, deserialize_with = "exact")]
    pub addresses: Vec<String>,
    /// Ports the service is reached on.
    #[serde(default, deserialize_with = "exact")]
    pub ports: Vec<ServicePort>,
    /// Inside or outside the mesh.
    #[serde(default)]
    pub location: Location,
    /// How endpoints are found.
    #[serde(default)]
    pub resolution: Resolution,
    /// Inline endpoints.
    #[serde(default, deserialize_with = "exact")]
    pub endpoints: Vec<WorkloadEntrySpec>,
    /// Selects WorkloadEntries and Pods in the same namespace as endpoints.
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelector>,
    /// Namespaces the entry is visible to (`*` all, `.` own); empty means all.
    #[serde(default, deserialize_with = "exact")]
    pub export_to: Vec<String>,
    /// Expected server identities.
    #[serde(default, deserialize_with = "exact")]
    pub subject_alt_names: Vec<String>,
}

/// `h2UpgradePolicy` of a connection pool or of the mesh: whether an HTTP service's
/// HTTP/1.1 requests go upstream as HTTP/2.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum H2UpgradePolicy {
    /// The mesh's policy (a connection pool only).
    #[default]
    Default,
    /// Keep the client's HTTP/1.1.
    DoNotUpgrade,
    /// Upgrade to HTTP/2.
    Upgrade,
}

/// Load-balancing algorithm named by a DestinationRule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SimpleLb {
    /// Istio's default: least requests (power of two choices).
    #[default]
    Unspecified,
    /// Least requests.
    LeastRequest,
    /// Least connections (an alias of least requests in Envoy).
    LeastConn,
    /// Round robin.
    RoundRobin,
    /// Uniform random.
    Random,
    /// Forward to the original destination.
    Passthrough,
}

/// A field read only to say that portcullis does not apply it yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unapplied;

impl<'de> Deserialize<'de> for Unapplied {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(deserializer)?;
        Ok(Unapplied)
    }
}

/// `trafficPolicy.loadBalancer`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerSettings {
    /// The simple algorithm.
    #[serde(default)]
    pub simple: Option<SimpleLb>,
    /// Consistent hashing (ring hash or Maglev) on a request property.
    #[serde(default)]
    pub consistent_hash: Option<ConsistentHash>,
    /// Locality-aware balancing: weights per locality or failover priorities.
    #[serde(default)]
    pub locality_lb_setting: Option<LocalityLbSetting>,
    /// Slow start of new endpoints over this window (deprecated by Istio for `warmup`).
    #[serde(default, deserialize_with = "duration")]
    pub warmup_duration_secs: Option<Duration>,
    /// Slow start of new endpoints; wins over `warmupDurationSecs`.
    #[serde(default)]
    pub warmup: Option<Warmup>,
}

/// `loadBalancer.warmup`: Envoy's slow start.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Warmup {
    /// How long a new endpoint warms up (required).
    #[serde(default, deserialize_with = "duration")]
    pub duration: Option<Duration>,
    /// The smallest share of its weight, in percent, a warming endpoint gets (Envoy's 10).
    #[serde(default)]
    pub minimum_percent: Option<f64>,
    /// The ramp's shape: 1 (the default) linear, more is faster at first.
    #[serde(default)]
    pub aggression: Option<f64>,
}

/// `loadBalancer.localityLbSetting`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalityLbSetting {
    /// `false` turns locality balancing off for the rule's destinations.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Weights of destination localities for clients in a locality.
    #[serde(default)]
    pub distribute: Vec<LocalityDistribute>,
    /// Which region a client's region fails over to.
    #[serde(default)]
    pub failover: Vec<LocalityFailover>,
    /// Labels whose match between client and endpoint orders the priorities.
    #[serde(default)]
    pub failover_priority: Vec<String>,
}

/// `localityLbSetting.distribute[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct LocalityDistribute {
    /// The client locality it applies to, `region/zone/subzone` with `*` wildcards.
    #[serde(default)]
    pub from: String,
    /// Destination localities (wildcards allowed) and their weights.
    #[serde(default)]
    pub to: BTreeMap<String, u32>,
}

/// `localityLbSetting.failover[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct LocalityFailover {
    /// The client's region.
    #[serde(default)]
    pub from: String,
    /// The region it fails over to.
    #[serde(default)]
    pub to: String,
}

/// `loadBalancer.consistentHash`: what a request's hash is made of, and the table it
/// picks from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsistentHash {
    /// Hash the value of this request header.
    #[serde(default)]
    pub http_header_name: Option<String>,
    /// Hash the value of this cookie (generated when absent and a `ttl` is set).
    #[serde(default)]
    pub http_cookie: Option<HttpCookie>,
    /// Hash the client's IP address.
    #[serde(default)]
    pub use_source_ip: Option<bool>,
    /// Hash the value of this query parameter.
    #[serde(default)]
    pub http_query_parameter_name: Option<String>,
    /// Ring hash, with its minimum ring size.
    #[serde(default)]
    pub ring_hash: Option<RingHash>,
    /// Maglev, with its table size.
    #[serde(default)]
    pub maglev: Option<Maglev>,
    /// Deprecated minimum ring size, used when neither `ringHash` nor `maglev` is given.
    #[serde(default)]
    pub minimum_ring_size: Option<u64>,
}

/// `consistentHash.httpCookie`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpCookie {
    /// Cookie name.
    pub name: String,
    /// `Path` of a generated cookie.
    #[serde(default)]
    pub path: Option<String>,
    /// Lifetime of a generated cookie; without it no cookie is generated.
    #[serde(default, deserialize_with = "duration")]
    pub ttl: Option<Duration>,
    /// More attributes of a generated cookie.
    #[serde(default, deserialize_with = "exact")]
    pub attributes: Vec<HttpCookieAttribute>,
}

/// `httpCookie.attributes[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct HttpCookieAttribute {
    /// Its name.
    pub name: String,
    /// Its value; absent for a flag such as `Secure`.
    #[serde(default)]
    pub value: Option<String>,
}

/// `consistentHash.ringHash`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RingHash {
    /// Fewest points on the ring; 0 or unset takes Envoy's 1024.
    #[serde(default)]
    pub minimum_ring_size: Option<u64>,
}

/// `consistentHash.maglev`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Maglev {
    /// Slots of the table, a prime; 0 or unset takes Envoy's 65537.
    #[serde(default)]
    pub table_size: Option<u64>,
}

/// `trafficPolicy` of a DestinationRule or one of its subsets.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    /// Load balancer settings.
    #[serde(default)]
    pub load_balancer: Option<Box<LoadBalancerSettings>>,
    /// Connection pool limits.
    #[serde(default)]
    pub connection_pool: Option<Box<ConnectionPoolSettings>>,
    /// Policies for single ports, each replacing the rule's parts it sets.
    #[serde(default, deserialize_with = "exact")]
    pub port_level_settings: Vec<PortTrafficPolicy>,
    /// Ejection of failing endpoints.
    #[serde(default)]
    pub outlier_detection: Option<Box<OutlierDetection>>,
    /// TLS to the upstream.
    #[serde(default)]
    pub tls: Option<ClientTlsSettings>,
    /// Not applied yet: HTTP CONNECT tunnelling through a proxy.
    #[serde(default)]
    pub tunnel: Option<Unapplied>,
    /// Not applied yet: the PROXY protocol header sent upstream.
    #[serde(default)]
    pub proxy_protocol: Option<Unapplied>,
    /// Not applied yet: a retry budget.
    #[serde(default)]
    pub retry_budget: Option<Unapplied>,
}

impl TrafficPolicy {
    /// The fields set here that portcullis does not apply yet, by their path under the
    /// policy.
    pub fn unapplied(&self) -> Vec<&'static str> {
        [
            ("tunnel", self.tunnel.is_some()),
            ("proxyProtocol", self.proxy_protocol.is_some()),
            ("retryBudget", self.retry_budget.is_some()),
        ]
        .into_iter()
        .filter_map(|(field, set)| set.then_some(field))
        .collect()
    }
}

/// `ClientTLSSettings`: how connections to the upstream are secured.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientTlsSettings {
    /// The mode (DISABLE when unset).
    #[serde(default)]
    pub mode: TlsMode,
    /// File of the client certificate chain (MUTUAL).
    #[serde(default)]
    pub client_certificate: Option<String>,
    /// File of the client's private key (MUTUAL).
    #[serde(default)]
    pub private_key: Option<String>,
    /// File of the CA certificates that verify the server; the system's when unset.
    #[serde(default)]
    pub ca_certificates: Option<String>,
    /// A Kubernetes Secret in the rule's namespace holding the certificates.
    #[serde(default)]
    pub credential_name: Option<String>,
    /// SANs the server's certificate must carry one of.
    #[serde(default, deserialize_with = "exact")]
    pub subject_alt_names: Vec<String>,
    /// SNI sent in the handshake.
    #[serde(default)]
    pub sni: Option<String>,
    /// Skips verifying the server's certificate.
    #[serde(default)]
    pub insecure_skip_verify: Option<bool>,
    /// A PEM certificate revocation list file the server certificate is checked against.
    #[serde(default)]
    pub ca_crl: Option<String>,
}

/// `ClientTLSSettings.TLSmode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TlsMode {
    /// Plaintext.
    #[default]
    Disable,
    /// TLS, verifying the server.
    Simple,
    /// TLS with a client certificate.
    Mutual,
    /// Istio's mutual TLS with the workload's certificates.
    IstioMutual,
}

/// One entry of `trafficPolicy.portLevelSettings`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    /// The service port it applies to.
    #[serde(default)]
    pub port: Option<PortSelector>,
    /// Load balancer settings for the port.
    #[serde(default)]
    pub load_balancer: Option<Box<LoadBalancerSettings>>,
    /// Connection pool limits for the port.
    #[serde(default)]
    pub connection_pool: Option<Box<ConnectionPoolSettings>>,
    /// Ejection of failing endpoints on this port, replacing the rule's.
    #[serde(default)]
    pub outlier_detection: Option<Box<OutlierDetection>>,
    /// TLS to the upstream on this port, replacing the rule's.
    #[serde(default)]
    pub tls: Option<ClientTlsSettings>,
}

/// `portLevelSettings[].port`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct PortSelector {
    /// The port number.
    #[serde(default)]
    pub number: u32,
}

/// `trafficPolicy.connectionPool`: what istiod turns into a cluster's circuit breakers
/// and connect timeout.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPoolSettings {
    /// TCP-level limits.
    #[serde(default)]
    pub tcp: Option<TcpPoolSettings>,
    /// HTTP-level limits.
    #[serde(default)]
    pub http: Option<HttpPoolSettings>,
}

/// `connectionPool.tcp`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpPoolSettings {
    /// `maxConnections`: connections to the destination's hosts at once.
    #[serde(default)]
    pub max_connections: Option<i64>,
    /// `connectTimeout`.
    #[serde(default, deserialize_with = "duration")]
    pub connect_timeout: Option<Duration>,
    /// `tcpKeepalive`: TCP keepalive on upstream sockets.
    #[serde(default)]
    pub tcp_keepalive: Option<TcpKeepaliveSettings>,
    /// `maxConnectionDuration`: how long an upstream connection may live.
    #[serde(default, deserialize_with = "duration")]
    pub max_connection_duration: Option<Duration>,
    /// `idleTimeout`: a TCP connection with no bytes either way this long is closed (0s:
    /// never); also an upstream HTTP connection's idle timeout when `http.idleTimeout` is
    /// unset.
    #[serde(default, deserialize_with = "duration")]
    pub idle_timeout: Option<Duration>,
}

/// `trafficPolicy.outlierDetection`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Deprecated `consecutiveErrors`: gateway errors before an ejection.
    #[serde(default)]
    pub consecutive_errors: Option<i32>,
    /// `consecutive5xxErrors` (5xx and, unless split, local-origin failures).
    #[serde(default, rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<u32>,
    /// `consecutiveGatewayErrors` (502, 503, 504).
    #[serde(default)]
    pub consecutive_gateway_errors: Option<u32>,
    /// `splitExternalLocalOriginErrors`: count local-origin failures apart.
    #[serde(default)]
    pub split_external_local_origin_errors: bool,
    /// `consecutiveLocalOriginFailures` (with the split).
    #[serde(default)]
    pub consecutive_local_origin_failures: Option<u32>,
    /// `interval` between ejection sweeps.
    #[serde(default, deserialize_with = "duration")]
    pub interval: Option<Duration>,
    /// `baseEjectionTime`.
    #[serde(default, deserialize_with = "duration")]
    pub base_ejection_time: Option<Duration>,
    /// `maxEjectionPercent`.
    #[serde(default)]
    pub max_ejection_percent: Option<i32>,
    /// `minHealthPercent`: below it, ejections are ignored (Envoy's panic threshold).
    #[serde(default)]
    pub min_health_percent: Option<i32>,
}

/// `connectionPool.tcp.tcpKeepalive`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpKeepaliveSettings {
    /// `probes`: unanswered probes before the connection is dead.
    #[serde(default)]
    pub probes: Option<u32>,
    /// `time`: idle time before the first probe.
    #[serde(default, deserialize_with = "duration")]
    pub time: Option<Duration>,
    /// `interval`: time between probes.
    #[serde(default, deserialize_with = "duration")]
    pub interval: Option<Duration>,
}

/// `connectionPool.http`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpPoolSettings {
    /// `http1MaxPendingRequests`: requests waiting for a connection.
    #[serde(default)]
    pub http1_max_pending_requests: Option<i64>,
    /// `http2MaxRequests`: requests in flight.
    #[serde(default)]
    pub http2_max_requests: Option<i64>,
    /// `maxRetries`: retries in flight.
    #[serde(default)]
    pub max_retries: Option<i64>,
    /// `idleTimeout`: an upstream connection idle this long is closed.
    #[serde(default, deserialize_with = "duration")]
    pub idle_timeout: Option<Duration>,
    /// `maxRequestsPerConnection`: requests one upstream connection carries.
    #[serde(default)]
    pub max_requests_per_connection: Option<i64>,
    /// `h2UpgradePolicy`: whether HTTP/1.1 requests go upstream as HTTP/2.
    #[serde(default)]
    pub h2_upgrade_policy: Option<H2UpgradePolicy>,
    /// `useClientProtocol`: the upstream speaks the client's HTTP version.
    #[serde(default)]
    pub use_client_protocol: Option<bool>,
    /// `maxConcurrentStreams`: streams one HTTP/2 connection carries at once.
    #[serde(default)]
    pub max_concurrent_streams: Option<i64>,
}

/// A duration as Istio's YAML writes one: Go's `time.ParseDuration` syntax (`30ms`, `1.5s`,
/// `1h2m`), which is what istiod reads for these fields.
fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    let Some(text) = Option::<String>::deserialize(deserializer)? else {
        return Ok(None);
    };
    parse_duration(&text)
        .map(Some)
        .ok_or_else(|| serde::de::Error::custom(format!("invalid duration {text:?}")))
}

/// A protobuf `bytes` field in YAML or JSON: base64, standard or URL-safe, padded or not, as
/// the Kubernetes API server's protobuf JSON decoding takes it.
fn base64_bytes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Vec<u8>>, D::Error> {
    use base64::Engine as _;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const ANY_PADDING: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let Some(text) = Option::<String>::deserialize(deserializer)? else {
        return Ok(None);
    };
    let standard = text.replace('-', "+").replace('_', "/");
    ANY_PADDING
        .decode(standard.trim_end())
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("invalid base64 {text:?}: {e}")))
}

/// Parses Go's duration syntax: one or more decimal numbers, each with a unit of `ns`,
/// `us`, `µs`, `ms`, `s`, `m` or `h`; a sign is not accepted (no negative durations here).
pub fn parse_duration(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = text;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * seconds;
    }
    Duration::try_from_secs_f64(total).ok()
}

/// A named subset of a DestinationRule.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    /// Subset name.
    pub name: String,
    /// Endpoint labels that define the subset.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Policy overriding the rule's for this subset.
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
}

/// The spec of a DestinationRule.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    /// Host the rule applies to.
    #[serde(default)]
    pub host: String,
    /// Policy for all of the host's traffic.
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
    /// Subsets.
    #[serde(default, deserialize_with = "exact")]
    pub subsets: Vec<Subset>,
    /// Namespaces the rule is visible to.
    #[serde(default, deserialize_with = "exact")]
    pub export_to: Vec<String>,
    /// The workloads of its namespace it applies to; absent: every client.
    #[serde(default)]
    pub workload_selector: Option<LabelSelector>,
}

/// Outbound traffic policy mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboundMode {
    /// Only registered destinations are reachable.
    RegistryOnly,
    /// Unregistered destinations are passed through.
    AllowAny,
}

impl<'de> Deserialize<'de> for OutboundMode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        const SUPPORTED: &str = "supported modes: REGISTRY_ONLY, ALLOW_ANY";
        let mode = String::deserialize(deserializer)?;
        match mode.as_str() {
            "REGISTRY_ONLY" => Ok(OutboundMode::RegistryOnly),
            "ALLOW_ANY" => Ok(OutboundMode::AllowAny),
            // Istio's newer mode sends unregistered HTTP to the Host header's DNS answer
            // through Envoy's dynamic forward proxy, a data path portcullis does not have.
            "ALLOW_ANY_DYNAMIC_DNS" => Err(serde::de::Error::custom(format!(
                "outbound traffic policy mode ALLOW_ANY_DYNAMIC_DNS (Istio's dynamic forward \
                 proxy for unregistered HTTP hosts) is not supported by portcullis; {SUPPORTED}"
            ))),
            other => Err(serde::de::Error::custom(format!(
                "unknown outbound traffic policy mode `{other}`; {SUPPORTED}"
            ))),
        }
    }
}

/// `outboundTrafficPolicy` in a Sidecar or in the mesh config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboundTrafficPolicy {
    /// The mode; absent means "not set here".
    #[serde(default)]
    pub mode: Option<OutboundMode>,
}

/// The port of a Sidecar egress listener.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarPort {
    /// Port number the listener takes traffic on.
    #[serde(default)]
    pub number: u32,
    /// Protocol; `HTTP_PROXY` makes the listener an explicit proxy that matches no port.
    #[serde(default)]
    pub protocol: Option<String>,
    /// Port name.
    #[serde(default)]
    pub name: String,
}

/// One `egress` listener of a Sidecar.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarEgress {
    /// The port the listener is for; absent means every port no other listener names.
    #[serde(default)]
    pub port: Option<SidecarPort>,
    /// `namespace/host` patterns the workload may reach.
    #[serde(default, deserialize_with = "exact")]
    pub hosts: Vec<String>,
}

/// The spec of a Sidecar.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    /// Workloads the Sidecar applies to; absent means the whole namespace.
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelector>,
    /// Outbound policy for the selected workloads.
    #[serde(default)]
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
    /// Egress listeners.
    #[serde(default, deserialize_with = "exact")]
    pub egress: Vec<SidecarEgress>,
}

/// The spec of a `security.istio.io` PeerAuthentication: what mutual TLS the selected
/// workloads accept. Only its namespace- and mesh-wide mode matters to a client sidecar
/// (istiod's `BestEffortInferServiceMTLSMode`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// Workloads it applies to; absent or empty: the whole namespace (the root namespace:
    /// the mesh).
    #[serde(default)]
    pub selector: Option<LabelSelector>,
    /// The mutual TLS mode.
    #[serde(default)]
    pub mtls: Option<PeerMtls>,
}

/// Kubernetes' `matchLabels` selector.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Labels a workload must carry.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// A PeerAuthentication's `mtls`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct PeerMtls {
    /// `UNSET` (inherit), `DISABLE`, `PERMISSIVE` or `STRICT`.
    #[serde(default)]
    pub mode: Option<PeerMtlsMode>,
}

/// A PeerAuthentication's mutual TLS mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PeerMtlsMode {
    /// Inherits the parent's (the mesh's for a namespace, permissive for the mesh).
    #[default]
    Unset,
    /// Plaintext only.
    Disable,
    /// Both.
    Permissive,
    /// Mutual TLS only.
    Strict,
}

/// A container port of a Pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    /// Port number.
    pub container_port: u32,
    /// Port name.
    #[serde(default)]
    pub name: String,
    /// TCP, UDP or SCTP.
    #[serde(default)]
    pub protocol: Option<String>,
}

/// A container of a Pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    /// Container name.
    #[serde(default)]
    pub name: String,
    /// Declared ports.
    #[serde(default, deserialize_with = "exact")]
    pub ports: Vec<ContainerPort>,
}

/// A Pod's spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    /// Containers.
    #[serde(default, deserialize_with = "exact")]
    pub containers: Vec<Container>,
    /// The service account the pod runs as (Kubernetes fills in `default`).
    #[serde(default)]
    pub service_account_name: Option<String>,
    /// The node the scheduler put the pod on, whose topology labels give its locality.
    #[serde(default)]
    pub node_name: Option<String>,
}

/// A Pod condition such as `Ready`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodCondition {
    /// Condition type, e.g. `Ready`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
}

/// One of a Pod's IPs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct PodIp {
    /// The address.
    pub ip: String,
}

/// A Pod's status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    /// Primary pod IP.
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    /// All pod IPs (dual stack).
    #[serde(default, deserialize_with = "exact", rename = "podIPs")]
    pub pod_ips: Vec<PodIp>,
    /// `Pending`, `Running`, `Succeeded`, `Failed`, `Unknown`.
    #[serde(default)]
    pub phase: Option<String>,
    /// Conditions; a `Ready` condition set to `False` takes the pod out of load balancing.
    #[serde(default, deserialize_with = "exact")]
    pub conditions: Vec<PodCondition>,
}

/// A Kubernetes Service port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KubePort {
    /// Port name.
    #[serde(default)]
    pub name: String,
    /// Port the service is reached on.
    pub port: u32,
    /// Port on the pods: a number or a container port name.
    #[serde(default)]
    pub target_port: Option<TargetPort>,
    /// TCP, UDP or SCTP.
    #[serde(default)]
    pub protocol: Option<String>,
    /// Application protocol, e.g. `http`.
    #[serde(default)]
    pub app_protocol: Option<String>,
}

/// A Service `targetPort`: a number or a named container port.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum TargetPort {
    /// A port number.
    Number(u32),
    /// A container port name.
    Name(String),
}

/// A Kubernetes Service's spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeServiceSpec {
    /// Cluster IP, or `None` for a headless service.
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    /// All cluster IPs (dual stack).
    #[serde(default, deserialize_with = "exact", rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    /// Ports.
    #[serde(default, deserialize_with = "exact")]
    pub ports: Vec<KubePort>,
    /// Pod selector; absent means endpoints are managed elsewhere.
    #[serde(default)]
    pub selector: Option<BTreeMap<String, String>>,
    /// `ClusterIP`, `NodePort`, `LoadBalancer`, `ExternalName`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Target of an `ExternalName` service.
    #[serde(default)]
    pub external_name: Option<String>,
}

/// The parts of Istio's `MeshConfig` portcullis uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfig {
    /// Mesh-wide outbound traffic policy.
    #[serde(default)]
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
    /// Root namespace for mesh-wide resources (default `istio-system`).
    #[serde(default)]
    pub root_namespace: Option<String>,
    /// Where services without `exportTo` are visible; empty means everywhere (`*`).
    #[serde(default, deserialize_with = "exact")]
    pub default_service_export_to: Vec<String>,
    /// `h2UpgradePolicy`: whether HTTP services' HTTP/1.1 requests go upstream as HTTP/2
    /// (Istio's default: no).
    #[serde(default)]
    pub h2_upgrade_policy: Option<H2UpgradePolicy>,
    /// `enableAutoMtls`: whether clusters without DestinationRule TLS speak Istio mutual TLS
    /// to endpoints with sidecars (Istio's default: yes).
    #[serde(default)]
    pub enable_auto_mtls: Option<bool>,
    /// `trustDomain`, the domain of the mesh's SPIFFE identities (Istio's default:
    /// `cluster.local`).
    #[serde(default)]
    pub trust_domain: Option<String>,
    /// `trustDomainAliases`: other domains the mesh's identities may be issued in; istiod
    /// adds each service account's identity in each of them to the SANs it verifies.
    #[serde(default, deserialize_with = "exact")]
    pub trust_domain_aliases: Vec<String>,
    /// `localityLbSetting`: the locality balancing of destinations whose DestinationRule
    /// sets none (Istio's default: on, no settings).
    #[serde(default)]
    pub locality_lb_setting: Option<LocalityLbSetting>,
    /// `defaultConfig`: the proxies' default `ProxyConfig`.
    #[serde(default)]
    pub default_config: Option<ProxyConfig>,
}

/// The parts of Istio's `ProxyConfig` portcullis uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyConfig {
    /// `proxyMetadata`: environment the proxies run with (portcullis reads
    /// `PORTCULLIS_MODE` from it).
    #[serde(default)]
    pub proxy_metadata: std::collections::BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_as_protobuf_json_writes_them() {
        let body = |text: &str| {
            serde_saphyr::from_str::<HttpBody>(&format!("bytes: {text:?}")).map(|b| b.bytes)
        };
        let want = Some(vec![0x00, 0x9f, 0x92, 0x96]);
        for text in ["AJ+Slg==", "AJ+Slg", "AJ-Slg==", "AJ-Slg"] {
            assert_eq!(body(text).ok(), Some(want.clone()), "{text}");
        }
        assert!(body("not base64!").is_err());
    }

    #[test]
    fn durations_read_as_go_writes_them() {
        let ms = Duration::from_millis;
        for (text, want) in [
            ("30ms", ms(30)),
            ("1.5s", ms(1500)),
            ("1h2m", Duration::from_secs(3720)),
            ("250us", Duration::from_micros(250)),
            ("250µs", Duration::from_micros(250)),
            ("10ns", Duration::from_nanos(10)),
            ("0", Duration::ZERO),
        ] {
            assert_eq!(parse_duration(text), Some(want), "{text}");
        }
        for bad in ["", "10", "s", "1x", "-1s", "1.2.3s", "ms10"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
