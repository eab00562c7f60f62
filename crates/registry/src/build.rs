//! Compiling resources into a [`Snapshot`].

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use portcullis_envoy::{HashKey, HashPolicy, LbPolicy, Locality, RuntimeDouble, SlowStartConfig};
use portcullis_model::{
    ConnectionPoolSettings, ConsistentHash, DestinationRuleSpec, KubeServiceSpec,
    LoadBalancerSettings, LocalityLbSetting, Location, MeshConfig, Object, ObjectMeta,
    OutboundMode, OutlierDetection, PeerAuthenticationSpec, PeerMtlsMode, Pod, Resolution,
    Resource, Secret, ServiceEntrySpec, SidecarEgress, SidecarSpec, SimpleLb, Subset, TargetPort,
    TrafficPolicy, VirtualServiceSpec, WorkloadEntry, WorkloadEntrySpec,
};

mod compile;
pub mod locality;
mod tls;
mod virtual_service;
mod workload;

pub use compile::{Compiled, HTTP_PROXY_ROUTES, OUTBOUND_PORT, compile};

#[cfg(test)]
pub(crate) use compile::istio_retry_policy as compile_default_retry_policy;

use crate::Map;
use crate::order::Age;
use crate::snapshot::{Enforcement, Protocol, Snapshot};

/// Where a pending endpoint is, before DNS answers are applied.
#[derive(Clone)]
enum EndpointAddress {
    Ip(IpAddr),
    Dns(Box<str>),
}

/// An endpoint's labels, which DestinationRule subsets select by.
type Labels = Arc<BTreeMap<String, String>>;

/// An endpoint before DNS answers are applied.
#[derive(Clone)]
struct PendingEndpoint {
    address: EndpointAddress,
    port: u16,
    weight: u32,
    /// Where it came from.
    source: Arc<str>,
    labels: Labels,
    /// Its locality as istiod finds it (empty parts when unknown).
    locality: Locality,
    peer: Peer,
    /// The workload behind it, for telemetry.
    workload: Arc<portcullis_envoy::WorkloadMetadata>,
}

/// What istiod knows of the workload behind an endpoint for mutual TLS.
#[derive(Clone, Default)]
struct Peer {
    /// Istio's TLS mode of the workload (`security.istio.io/tlsMode`, or `istio` for a
    /// WorkloadEntry with a service account); `None` is `disabled`.
    tls_mode: Option<Arc<str>>,
    /// Its SPIFFE identity, `spiffe://TRUST_DOMAIN/ns/NS/sa/SA`.
    identity: Option<Arc<str>>,
}

/// The label istio-injected workloads carry: `istio` when a sidecar terminates mutual TLS.
const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";

/// Istio's `tlsMode` of a workload without one.
const TLS_MODE_DISABLED: &str = "disabled";

impl Peer {
    /// A pod's: its label, and its service account (`default` when the spec names none,
    /// as Kubernetes fills it in).
    fn of_pod(pod: &Object<Pod>, trust_domain: &str) -> Peer {
        let account = pod.spec.spec.service_account_name.as_deref();
        Peer {
            tls_mode: tls_mode(pod.meta.labels.get(TLS_MODE_LABEL).map(String::as_str)),
            identity: Some(spiffe_identity(
                trust_domain,
                &pod.meta.namespace,
                account.filter(|a| !a.is_empty()).unwrap_or("default"),
            )),
        }
    }

    /// A WorkloadEntry's with its `labels` (or a ServiceEntry's inline endpoint's, in the
    /// ServiceEntry's `namespace`), as istiod's `getTLSModeFromWorkloadEntry`: the label, else `istio`
    /// when it names a service account.
    fn of_workload(
        we: &WorkloadEntrySpec,
        labels: &BTreeMap<String, String>,
        namespace: &str,
        trust_domain: &str,
    ) -> Peer {
        let account = Some(we.service_account.as_str()).filter(|a| !a.is_empty());
        let label = labels.get(TLS_MODE_LABEL).map(String::as_str);
        Peer {
            tls_mode: tls_mode(label.or(account.map(|_| "istio"))),
            identity: account.map(|a| spiffe_identity(trust_domain, namespace, a)),
        }
    }
}

fn tls_mode(value: Option<&str>) -> Option<Arc<str>> {
    value
        .filter(|v| !v.is_empty() && *v != TLS_MODE_DISABLED)
        .map(Arc::from)
}

/// The SPIFFE identity of service account `account` of `namespace`, with `@` in the trust
/// domain written `.` as istiod's `genSpiffeURI` writes it.
fn spiffe_identity(trust_domain: &str, namespace: &str, account: &str) -> Arc<str> {
    let trust_domain = trust_domain.replace('@', ".");
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{account}").into()
}

/// Istio's annotation listing SPIFFE identities of a Kubernetes Service's workloads.
const CANONICAL_SERVICE_ACCOUNTS: &str = "alpha.istio.io/canonical-serviceaccounts";
/// Istio's annotation listing service accounts (of its namespace) a Kubernetes Service's
/// workloads run as.
const KUBERNETES_SERVICE_ACCOUNTS: &str = "alpha.istio.io/kubernetes-serviceaccounts";

/// The identities a Kubernetes Service's annotations declare, as istiod's `ConvertService`
/// reads them: the canonical ones as written, then each Kubernetes account's identity in
/// the mesh's trust domain (comma-separated, nothing trimmed).
fn kube_service_accounts(svc: &Object<KubeServiceSpec>, trust_domain: &str) -> Vec<String> {
    let annotation = |key: &str| {
        svc.meta
            .annotations
            .get(key)
            .filter(|v| !v.is_empty())
            .into_iter()
            .flat_map(|v| v.split(','))
    };
    annotation(CANONICAL_SERVICE_ACCOUNTS)
        .map(str::to_owned)
        .chain(
            annotation(KUBERNETES_SERVICE_ACCOUNTS)
                .map(|a| spiffe_identity(trust_domain, &svc.meta.namespace, a).to_string()),
        )
        .collect()
}

/// istiod's `ExpandWithTrustDomains`: `accounts`, and each SPIFFE identity among them
/// (`spiffe://DOMAIN/ns/NS/sa/SA`) again in each of the trust domain `aliases`, sorted.
fn with_trust_domain_aliases(accounts: BTreeSet<String>, aliases: &[String]) -> Vec<String> {
    let mut out = accounts.clone();
    for id in &accounts {
        let Some(rest) = id.strip_prefix("spiffe://") else {
            continue;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let [_, "ns", namespace, "sa", account] = parts[..] else {
            continue;
        };
        for alias in aliases {
            out.insert(format!("spiffe://{alias}/ns/{namespace}/sa/{account}"));
        }
    }
    out.into_iter().collect()
}

/// Current DNS answers by lower-case hostname.
pub type DnsAnswers<'a> = &'a dyn Fn(&str) -> Option<Arc<[IpAddr]>>;

/// Who the proxy is: what decides visibility (`exportTo`), short names and the Sidecar.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Namespace of the workload the proxy serves.
    pub namespace: String,
    /// Labels of the workload, matched against Sidecar `workloadSelector`.
    pub workload_labels: BTreeMap<String, String>,
    /// Kubernetes cluster domain.
    pub cluster_domain: String,
    /// The proxy's locality (`--locality`, `ISTIO_LOCALITY`): what `localityLbSetting`
    /// compares endpoints' localities with.
    pub locality: portcullis_envoy::Locality,
    /// The SSRF guard: DNS answers of `MESH_EXTERNAL` ServiceEntries that are not public
    /// addresses are not used unless the ServiceEntry names them (on by default; off is
    /// Istio's behaviour).
    pub ssrf_guard: bool,
    /// The id of the cluster the proxy runs in (`ISTIO_META_CLUSTER_ID`): the cluster of
    /// the pods and WorkloadEntries in the files, as istiod's registry is its own.
    pub cluster_id: String,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            namespace: "default".to_string(),
            workload_labels: BTreeMap::new(),
            cluster_domain: "cluster.local".to_string(),
            locality: portcullis_envoy::Locality::default(),
            ssrf_guard: true,
            cluster_id: DEFAULT_CLUSTER_ID.to_string(),
        }
    }
}

/// istiod's cluster id when none is configured (`constants.DefaultClusterName`).
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

/// Compiles `resources` into snapshot `version`, carrying endpoint counters over from
/// `previous` so that active-request counts survive a reload. DNS names resolve to
/// nothing: see [`build_with_dns`].
pub fn build(
    resources: &[Resource],
    options: &BuildOptions,
    previous: Option<&Snapshot>,
    version: u64,
) -> Snapshot {
    build_with_dns(resources, options, previous, version, &|_| None)
}

/// [`build`], with DNS endpoints expanded to every address in `dns`'s current answer
/// (the first only for DNS_ROUND_ROBIN), and resolution-NONE hosts owning their answers.
/// One path from files to the data path: [`compile`] into Envoy's model as istiod does,
/// then [`Snapshot::index`] as for resources from xDS.
pub fn build_with_dns(
    resources: &[Resource],
    options: &BuildOptions,
    previous: Option<&Snapshot>,
    version: u64,
    dns: DnsAnswers<'_>,
) -> Snapshot {
    let compiled = compile(resources, options, dns);
    let mut snapshot = Snapshot::index(&compiled.resources, dns, previous, version);
    let index_warnings = std::mem::replace(&mut snapshot.warnings, compiled.warnings);
    snapshot.warnings.extend(index_warnings);
    snapshot.dns_names.extend(compiled.dns_names);
    snapshot.enforcement = compiled.enforcement;
    snapshot.opaque_names = Some(compiled.opaque_names);
    snapshot
}

/// The mesh config's `defaultConfig.proxyMetadata.PORTCULLIS_MODE` (the first mesh
/// ConfigMap's, as the build uses); a value other than `enforce` or `audit` is a warning.
pub(crate) fn mesh_enforcement(
    resources: &[Resource],
    warnings: &mut Vec<String>,
) -> Option<Enforcement> {
    let value = resources
        .iter()
        .find_map(|r| match r {
            Resource::MeshConfig(o) => Some(o),
            _ => None,
        })?
        .spec
        .default_config
        .as_ref()?
        .proxy_metadata
        .get(MODE_METADATA)?;
    let parsed = Enforcement::parse(value);
    if parsed.is_none() {
        warnings.push(format!(
            "mesh config: {MODE_METADATA} {value:?} is neither enforce nor audit; ignored"
        ));
    }
    parsed
}

/// The `proxyMetadata` key that sets the enforcement mode mesh-wide.
pub const MODE_METADATA: &str = "PORTCULLIS_MODE";

/// A pod that can take traffic.
struct ReadyPod<'a> {
    object: &'a Object<Pod>,
    ips: Vec<IpAddr>,
    workload: Arc<portcullis_envoy::WorkloadMetadata>,
    /// Its locality (`region/zone/subzone`), from its label or its node's.
    locality: String,
}

impl ReadyPod<'_> {
    /// The pod's endpoints on `port`, one per IP, with its labels (and the topology labels
    /// istiod adds), locality and workload identity.
    fn endpoints(&self, port: u16, trust_domain: &str, out: &mut Vec<PendingEndpoint>) {
        let meta = &self.object.meta;
        let source: Arc<str> = format!("Pod {}/{}", meta.namespace, meta.name).into();
        let mut labels = meta.labels.clone();
        let node = self
            .object
            .spec
            .spec
            .node_name
            .as_deref()
            .unwrap_or_default();
        locality::augment(&mut labels, &self.locality, node);
        let labels = Arc::new(labels);
        let place = locality::parse(&self.locality);
        let peer = Peer::of_pod(self.object, trust_domain);
        out.extend(self.ips.iter().map(|ip| PendingEndpoint {
            address: EndpointAddress::Ip(*ip),
            port,
            weight: 1,
            source: Arc::clone(&source),
            labels: Arc::clone(&labels),
            locality: place.clone(),
            peer: peer.clone(),
            workload: Arc::clone(&self.workload),
        }));
    }
}

struct PendingCluster {
    name: Arc<str>,
    host: Arc<str>,
    port: u16,
    protocol: Protocol,
    resolution: Resolution,
    passthrough_port: Option<u16>,
    source: Arc<str>,
    addresses: Vec<IpNet>,
    endpoints: Vec<PendingEndpoint>,
    /// istiod's `Service.ServiceAccounts`: a ServiceEntry's `subjectAltNames`, a Kubernetes
    /// Service's service-account annotations.
    service_accounts: Vec<String>,
    /// From a ServiceEntry (istiod's `External` registry), not a Kubernetes Service.
    service_entry: bool,
    /// A ServiceEntry of location `MESH_EXTERNAL`.
    mesh_external: bool,
    /// The namespace of the ServiceEntry or Service.
    namespace: Arc<str>,
}

/// A warning for each part of a DestinationRule that portcullis does not apply yet.
fn unapplied_parts(o: &Object<DestinationRuleSpec>) -> Vec<String> {
    let policies = o
        .spec
        .traffic_policy
        .iter()
        .map(|tp| ("spec.trafficPolicy".to_string(), tp))
        .chain(o.spec.subsets.iter().enumerate().filter_map(|(i, s)| {
            s.traffic_policy
                .as_ref()
                .map(|tp| (format!("spec.subsets[{i}].trafficPolicy"), tp))
        }));
    policies
        .flat_map(|(at, tp)| {
            tp.unapplied().into_iter().map(move |field| {
                format!(
                    "DestinationRule {}/{}: {at}.{field} is not applied yet",
                    o.meta.namespace, o.meta.name
                )
            })
        })
        .collect()
}

/// What a DestinationRule sets on a service's cluster.
struct Traffic<'a> {
    lb: LbPolicy,
    /// The route's hash policy for a consistent-hash balancer.
    hash: Option<HashPolicy>,
    pool: Option<&'a ConnectionPoolSettings>,
    outlier: Option<&'a OutlierDetection>,
    tls: Option<tls::TlsRule<'a>>,
    /// Locality balancing; `None` when the rule turns it off.
    locality: Option<&'a LocalityLbSetting>,
    /// Slow start, for the round robin and least request balancers that read it.
    slow_start: Option<Box<SlowStartConfig>>,
}

/// What a DestinationRule sets on the `tcp_proxy` of chains to its service.
#[derive(Debug, Clone, Copy)]
struct TcpProxyTimeouts {
    /// `idleTimeout`: `Some(None)` for 0s (never), `None` when unset (Envoy's hour).
    idle: Option<Option<Duration>>,
    /// `maxConnectionDuration`: `max_downstream_connection_duration`.
    max_duration: Option<Duration>,
}

/// The policy of a rule on `port`, and of a subset over it: a port's settings replace the
/// rule's load balancer and connection pool, a subset's replace what it sets, and a
/// subset's port-level settings replace both whole (unset ones revert to defaults), as
/// istiod's `MergeTrafficPolicy`.
fn traffic<'a>(
    (rule, mesh_locality): (
        Option<&'a Object<DestinationRuleSpec>>,
        Option<&'a LocalityLbSetting>,
    ),
    subset: Option<&'a TrafficPolicy>,
    port: u16,
) -> Traffic<'a> {
    let policy = rule.and_then(|dr| dr.spec.traffic_policy.as_ref());
    let at_port = |tp: &'a TrafficPolicy| {
        tp.port_level_settings.iter().find(|pls| {
            pls.port
                .as_ref()
                .is_some_and(|p| p.number == u32::from(port))
        })
    };
    let port_level = policy.and_then(at_port);
    let mut load_balancer: Option<&'a LoadBalancerSettings> = port_level
        .and_then(|pls| pls.load_balancer.as_deref())
        .or_else(|| policy.and_then(|tp| tp.load_balancer.as_deref()));
    let mut pool = port_level
        .and_then(|pls| pls.connection_pool.as_deref())
        .or_else(|| policy.and_then(|tp| tp.connection_pool.as_deref()));
    let mut tls = port_level
        .and_then(|pls| pls.tls.as_ref())
        .or_else(|| policy.and_then(|tp| tp.tls.as_ref()));
    let mut outlier = port_level
        .and_then(|pls| pls.outlier_detection.as_deref())
        .or_else(|| policy.and_then(|tp| tp.outlier_detection.as_deref()));
    if let Some(sp) = subset {
        load_balancer = sp.load_balancer.as_deref().or(load_balancer);
        pool = sp.connection_pool.as_deref().or(pool);
        tls = sp.tls.as_ref().or(tls);
        outlier = sp.outlier_detection.as_deref().or(outlier);
        if let Some(pls) = at_port(sp) {
            load_balancer = pls.load_balancer.as_deref();
            pool = pls.connection_pool.as_deref();
            tls = pls.tls.as_ref();
            outlier = pls.outlier_detection.as_deref();
        }
    }
    let consistent = load_balancer.and_then(|lb| lb.consistent_hash.as_ref());
    let lb = match (consistent, load_balancer.and_then(|lb| lb.simple)) {
        (Some(ch), _) => consistent_lb_policy(ch),
        (None, Some(SimpleLb::RoundRobin)) => LbPolicy::RoundRobin,
        (None, Some(SimpleLb::Random)) => LbPolicy::Random,
        (None, Some(SimpleLb::Passthrough)) => LbPolicy::ClusterProvided,
        _ => LbPolicy::LeastRequest,
    };
    let tls = tls.zip(rule).map(|(settings, dr)| tls::TlsRule {
        settings,
        namespace: &dr.meta.namespace,
        subset: None,
    });
    Traffic {
        slow_start: load_balancer
            .filter(|_| matches!(lb, LbPolicy::RoundRobin | LbPolicy::LeastRequest))
            .and_then(slow_start)
            .map(Box::new),
        lb,
        hash: consistent.and_then(hash_policy),
        pool,
        outlier,
        tls,
        // The rule's setting, else the mesh config's, else Istio's mesh default (on, no
        // settings), as istiod's `GetEffectiveLbSetting`; `enabled: false` turns it off.
        locality: match load_balancer
            .and_then(|lb| lb.locality_lb_setting.as_ref())
            .or(mesh_locality)
        {
            Some(l) if l.enabled == Some(false) => None,
            Some(l) => Some(l),
            None => Some(&DEFAULT_LOCALITY),
        },
    }
}

/// A load balancer's slow start as istiod's `setWarmup` and `setSlowStartConfig` write it:
/// `warmup` with Istio's defaults (aggression 1, 10%) filled in, else
/// `warmupDurationSecs` alone.
fn slow_start(lb: &LoadBalancerSettings) -> Option<SlowStartConfig> {
    match (&lb.warmup, lb.warmup_duration_secs) {
        (Some(w), _) => Some(SlowStartConfig {
            window: w.duration.unwrap_or_default(),
            aggression: Some(RuntimeDouble {
                default_value: w.aggression.unwrap_or(1.0),
                // istiod's key, one no runtime holds, so the default value always applies.
                runtime_key: "(".into(),
            }),
            min_weight_percent: Some(w.minimum_percent.unwrap_or(10.0)),
        }),
        (None, Some(window)) => Some(SlowStartConfig {
            window,
            aggression: None,
            min_weight_percent: None,
        }),
        (None, None) => None,
    }
}

/// The mesh-wide `localityLbSetting` istiod uses when a rule sets none.
static DEFAULT_LOCALITY: LocalityLbSetting = LocalityLbSetting {
    enabled: None,
    distribute: Vec::new(),
    failover: Vec::new(),
    failover_priority: Vec::new(),
};

/// The cluster policy istiod gives a `consistentHash` (`ApplyRingHashLoadBalancer`):
/// MAGLEV with its table size, else RING_HASH with its minimum ring size (the deprecated
/// top-level one when `ringHash` is absent); zero or unset sizes take Envoy's defaults.
fn consistent_lb_policy(ch: &ConsistentHash) -> LbPolicy {
    let set = |size: Option<u64>| size.filter(|&s| s != 0);
    if let Some(maglev) = &ch.maglev {
        return LbPolicy::Maglev {
            table_size: set(maglev.table_size).unwrap_or(LbPolicy::DEFAULT_MAGLEV_TABLE_SIZE),
        };
    }
    let minimum = match &ch.ring_hash {
        Some(ring) => set(ring.minimum_ring_size),
        None => set(ch.minimum_ring_size),
    };
    LbPolicy::RingHash {
        minimum_ring_size: minimum.unwrap_or(LbPolicy::DEFAULT_MINIMUM_RING_SIZE),
        maximum_ring_size: LbPolicy::DEFAULT_MAXIMUM_RING_SIZE,
    }
}

/// The route hash policy istiod makes of a `consistentHash` (`consistentHashToHashPolicy`);
/// none without a hash key, which leaves the balancer hashing at random.
fn hash_policy(ch: &ConsistentHash) -> Option<HashPolicy> {
    let key = if let Some(name) = &ch.http_header_name {
        HashKey::Header(name.to_ascii_lowercase())
    } else if let Some(cookie) = &ch.http_cookie {
        HashKey::Cookie {
            name: cookie.name.clone(),
            path: cookie.path.clone().filter(|p| !p.is_empty()),
            ttl: cookie.ttl,
            attributes: cookie
                .attributes
                .iter()
                .map(|a| portcullis_envoy::CookieAttribute {
                    name: a.name.clone(),
                    value: a.value.clone().unwrap_or_default(),
                })
                .collect(),
        }
    } else if ch.use_source_ip == Some(true) {
        HashKey::SourceIp
    } else if let Some(name) = &ch.http_query_parameter_name {
        HashKey::QueryParameter(name.clone())
    } else {
        return None;
    };
    Some(HashPolicy {
        key,
        terminal: false,
    })
}

struct Builder<'a> {
    options: &'a BuildOptions,
    service_entries: Vec<&'a Object<ServiceEntrySpec>>,
    workload_entries: Vec<&'a Object<WorkloadEntry>>,
    kube_services: Vec<&'a Object<KubeServiceSpec>>,
    destination_rules: Vec<&'a Object<DestinationRuleSpec>>,
    virtual_services: Vec<&'a Object<VirtualServiceSpec>>,
    /// Warnings about VirtualService routes, each once however many ports it is built for.
    vs_warnings: std::collections::BTreeSet<String>,
    sidecars: Vec<&'a Object<SidecarSpec>>,
    /// PeerAuthentications, oldest first (then by name and namespace), as istiod orders
    /// them.
    peer_authentications: Vec<&'a Object<PeerAuthenticationSpec>>,
    secrets: Vec<&'a Object<Secret>>,
    /// The egress listeners of the Sidecar that applies, if it has any.
    egress: Option<&'a [SidecarEgress]>,
    mesh: Option<&'a Object<MeshConfig>>,
    pods: Vec<ReadyPod<'a>>,
    /// For each service host: the namespace whose service the proxy uses, and whether that
    /// is a Kubernetes Service (which hides ServiceEntries of the same host there).
    owners: Map<Box<str>, (&'a str, bool)>,
    clusters: Map<Arc<str>, PendingCluster>,
    /// Port, name, cluster, and whether a ClientHello's SNI may match the name.
    hosts_pending: Vec<(u16, Box<str>, Arc<str>, bool)>,
    /// ExternalName Services: their names, and the host they stand for.
    aliases: Vec<(Vec<String>, String)>,
    addresses_pending: Vec<PendingAddress>,
    /// Ports whose wildcard listener sniffs HTTP.
    sniffed_ports: HashSet<u16>,
    warnings: Vec<String>,
}

enum AddressKey {
    Net(IpNet),
    AnyOnPort,
}

/// A claim on a port's destination addresses, settled in Istio's service order.
struct PendingAddress {
    age: Age,
    port: u16,
    key: AddressKey,
    cluster: Arc<str>,
}

/// Whether a service with `addresses` lands on its port's wildcard listener, as Istio builds
/// them: without addresses or with a range; an exact address has its own listener.
fn on_wildcard_listener(addresses: &[IpNet]) -> bool {
    addresses.is_empty()
        || addresses
            .iter()
            .any(|n| n.prefix_len() < n.max_prefix_len())
}

/// Whether SNI routes to a TLS service: Istio matches it only on the wildcard listener.
fn routed_by_sni(protocol: Protocol, addresses: &[IpNet]) -> bool {
    protocol == Protocol::Tls && on_wildcard_listener(addresses)
}

fn labels_match(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Protocol of a port from its declared protocol, else its name's prefix, as Istio does.
fn protocol_of(protocol: Option<&str>, name: &str) -> Protocol {
    const KNOWN: [(&str, Protocol); 12] = [
        ("HTTP", Protocol::Http),
        ("GRPC-WEB", Protocol::Http),
        ("HTTP_PROXY", Protocol::Http),
        ("HTTP2", Protocol::Http2),
        ("GRPC", Protocol::Http2),
        ("HTTPS", Protocol::Tls),
        ("TLS", Protocol::Tls),
        ("TCP", Protocol::Tcp),
        ("MONGO", Protocol::Tcp),
        ("MYSQL", Protocol::Tcp),
        ("REDIS", Protocol::Tcp),
        ("UDP", Protocol::Auto),
    ];
    let declared = protocol.unwrap_or("");
    let from_name = name.split('-').next().unwrap_or("");
    [declared, from_name]
        .iter()
        .find_map(|candidate| {
            KNOWN
                .iter()
                .find(|(known, _)| known.eq_ignore_ascii_case(candidate))
                .map(|(_, p)| *p)
        })
        .unwrap_or(Protocol::Auto)
}

fn visible(export_to: &[String], own_ns: &str, proxy_ns: &str) -> bool {
    export_to.is_empty()
        || export_to
            .iter()
            .any(|e| e == "*" || (e == "." && own_ns == proxy_ns) || e == proxy_ns)
}

/// Annotation with which a WorkloadEntry's `Healthy` condition takes effect.
const HEALTH_CHECKS_ENABLED: &str = "proxy.istio.io/health-checks-enabled";

fn workload_entry_healthy(we: &Object<WorkloadEntry>) -> bool {
    // As istiod: without health checks an entry is healthy; with them only a Healthy=True
    // condition makes it so, since a new entry is unhealthy until a probe succeeds.
    let checked = we
        .meta
        .annotations
        .get(HEALTH_CHECKS_ENABLED)
        .is_some_and(|v| matches!(v.as_str(), "1" | "t" | "T" | "true" | "True" | "TRUE"));
    !checked
        || we
            .spec
            .status
            .conditions
            .iter()
            .find(|c| c.kind == "Healthy")
            .is_some_and(|c| c.status == "True")
}

/// A WorkloadEntry's labels as selectors and its workload see them: spec labels, and over
/// them metadata labels (istiod's `ConvertWorkloadEntry`).
fn workload_entry_labels(we: &Object<WorkloadEntry>) -> BTreeMap<String, String> {
    let mut labels = we.spec.spec.labels.clone();
    labels.extend(we.meta.labels.clone());
    labels
}

/// Whether a service's `host` is within a Sidecar egress host pattern (`*`, `*.suffix` or
/// exact); a wildcard service host only within a wildcard at least as wide.
fn host_within(host: &str, pattern: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => host
            .strip_prefix('*')
            .unwrap_or(host)
            .ends_with(&*suffix.to_ascii_lowercase()),
        None => !host.starts_with('*') && host.eq_ignore_ascii_case(pattern),
    }
}

/// Whether a Sidecar egress listener imports `host` of namespace `ns`. Hosts are
/// `namespace/host` with namespace `*` (any), `.` (the proxy's), or a name; a `~` prefix
/// excludes (`~/host`: from every namespace), and an exclusion beats any import.
fn listener_imports(listener: &SidecarEgress, proxy_ns: &str, ns: &str, host: &str) -> bool {
    let mut imported = false;
    for entry in &listener.hosts {
        let Some((namespace, pattern)) = entry.split_once('/') else {
            continue;
        };
        if pattern.contains('/') {
            continue;
        }
        let (excluded, namespace) = match namespace.strip_prefix('~') {
            Some("") => (true, "*"),
            Some(namespace) => (true, namespace),
            None => (false, namespace),
        };
        let namespace = if namespace == "." {
            proxy_ns
        } else {
            namespace
        };
        if (namespace == "*" || namespace == ns) && host_within(host, pattern) {
            if excluded {
                return false;
            }
            imported = true;
        }
    }
    imported
}

/// Annotation listing the namespaces a Kubernetes Service is visible to.
const EXPORT_TO: &str = "networking.istio.io/exportTo";

fn kube_export_to(svc: &Object<KubeServiceSpec>) -> Vec<String> {
    svc.meta
        .annotations
        .get(EXPORT_TO)
        .map(|v| v.split(',').map(|e| e.trim().to_string()).collect())
        .unwrap_or_default()
}

/// The target of an ExternalName Service.
fn external_name(svc: &Object<KubeServiceSpec>) -> Option<&str> {
    svc.spec
        .external_name
        .as_deref()
        .filter(|_| svc.spec.kind.as_deref() == Some("ExternalName"))
}

fn kube_fqdn(svc: &Object<KubeServiceSpec>, domain: &str) -> String {
    format!("{}.{}.svc.{domain}", svc.meta.name, svc.meta.namespace).to_ascii_lowercase()
}

fn pod_ready(pod: &Pod) -> bool {
    // A hand-written Pod document often carries only an IP: without a phase it is taken
    // as running. A phase other than Running, or a Ready condition that is not True,
    // takes it out of load balancing, as the kubelet's readiness does in a cluster.
    let running = pod.status.phase.as_deref().is_none_or(|p| p == "Running");
    let ready = pod
        .status
        .conditions
        .iter()
        .find(|c| c.kind == "Ready")
        .is_none_or(|c| c.status == "True");
    running && ready
}

fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = pod
        .status
        .pod_ip
        .iter()
        .chain(pod.status.pod_ips.iter().map(|p| &p.ip))
        .filter_map(|s| s.parse().ok())
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// Warns when `other` lost `what` on `port` to `kept` (each a cluster's name and source);
/// `what` is only formatted then.
fn conflict(
    warnings: &mut Vec<String>,
    what: impl FnOnce() -> String,
    port: u16,
    kept: (&str, &str),
    other: (&str, &str),
) {
    if kept.0 != other.0 {
        warnings.push(format!(
            "{} on port {port} is claimed by both {} ({}) and {} ({}); the first is used",
            what(),
            kept.0,
            kept.1,
            other.0,
            other.1
        ));
    }
}

fn parse_net(address: &str) -> Option<IpNet> {
    address
        .parse::<IpNet>()
        .ok()
        .or_else(|| address.parse::<IpAddr>().ok().map(IpNet::from))
}

impl<'a> Builder<'a> {
    fn new(resources: &'a [Resource], options: &'a BuildOptions) -> Self {
        let mut nodes: BTreeMap<&str, &BTreeMap<String, String>> = BTreeMap::new();
        let mut b = Builder {
            options,
            service_entries: Vec::new(),
            workload_entries: Vec::new(),
            kube_services: Vec::new(),
            destination_rules: Vec::new(),
            virtual_services: Vec::new(),
            vs_warnings: std::collections::BTreeSet::new(),
            sidecars: Vec::new(),
            peer_authentications: Vec::new(),
            secrets: Vec::new(),
            egress: None,
            mesh: None,
            pods: Vec::new(),
            owners: Map::default(),
            clusters: Map::default(),
            hosts_pending: Vec::new(),
            aliases: Vec::new(),
            addresses_pending: Vec::new(),
            sniffed_ports: HashSet::new(),
            warnings: Vec::new(),
        };
        for r in resources {
            match r {
                Resource::ServiceEntry(o) => b.service_entries.push(o),
                Resource::WorkloadEntry(o) => {
                    if workload_entry_healthy(o) {
                        b.workload_entries.push(o);
                    }
                }
                Resource::DestinationRule(o) => {
                    // A rule with a workload selector is only for the workloads of its
                    // namespace it selects.
                    let for_us = o.spec.workload_selector.as_ref().is_none_or(|s| {
                        o.meta.namespace == options.namespace
                            && labels_match(&s.match_labels, &options.workload_labels)
                    });
                    if for_us {
                        b.warnings.extend(unapplied_parts(o));
                        b.destination_rules.push(o);
                    }
                }
                Resource::VirtualService(o) => {
                    b.warnings.extend(virtual_service::unapplied(o));
                    b.virtual_services.push(o);
                }
                Resource::Sidecar(o) => b.sidecars.push(o),
                Resource::PeerAuthentication(o) => b.peer_authentications.push(o),
                Resource::Pod(o) => {
                    if pod_ready(&o.spec) {
                        let ips = pod_ips(&o.spec);
                        if !ips.is_empty() {
                            b.pods.push(ReadyPod {
                                object: o,
                                ips,
                                workload: workload::of_pod(&o.meta, &options.cluster_id),
                                locality: String::new(),
                            });
                        }
                    }
                }
                Resource::Service(o) => b.kube_services.push(o),
                Resource::Node(o) => {
                    nodes.insert(&o.meta.name, &o.meta.labels);
                }
                Resource::Secret(o) => b.secrets.push(o),
                Resource::MeshConfig(o) => {
                    if b.mesh.is_some() {
                        b.warnings.push(
                            "more than one mesh ConfigMap istio-system/istio; the first is used"
                                .to_string(),
                        );
                    } else {
                        b.mesh = Some(o);
                    }
                }
            }
        }
        b.peer_authentications.sort_by_cached_key(|pa| {
            let meta = &pa.meta;
            Age::new(
                meta.creation_timestamp.as_deref(),
                &meta.name,
                &meta.namespace,
            )
        });
        for pod in &mut b.pods {
            let spec = &pod.object.spec.spec;
            let node = spec
                .node_name
                .as_deref()
                .and_then(|n| nodes.get(n).copied());
            pod.locality = locality::of_pod(&pod.object.meta.labels, node);
        }
        // Services of the proxy's own namespace win host conflicts, then namespace and name order.
        let ns = options.namespace.as_str();
        b.service_entries.sort_by(|a, b| {
            (a.meta.namespace != ns, &a.meta.namespace, &a.meta.name).cmp(&(
                b.meta.namespace != ns,
                &b.meta.namespace,
                &b.meta.name,
            ))
        });
        b.egress = b
            .sidecar()
            .map(|s| &s.spec.egress[..])
            .filter(|e| !e.is_empty());
        b
    }

    /// The mesh's trust domain aliases (`trustDomainAliases`).
    fn trust_domain_aliases(&self) -> &'a [String] {
        self.mesh
            .map_or(&[][..], |m| &m.spec.trust_domain_aliases[..])
    }

    /// The mesh's trust domain (`trustDomain`, Istio's default `cluster.local`).
    fn trust_domain(&self) -> &'a str {
        self.mesh
            .and_then(|m| m.spec.trust_domain.as_deref())
            .filter(|d| !d.is_empty())
            .unwrap_or("cluster.local")
    }

    /// Whether clusters without DestinationRule TLS get Istio's auto mutual TLS
    /// (`enableAutoMtls`, on unless the mesh config turns it off).
    fn auto_mtls(&self) -> bool {
        self.mesh
            .and_then(|m| m.spec.enable_auto_mtls)
            .unwrap_or(true)
    }

    /// Whether the workloads of `namespace` accept only plaintext as far as istiod infers
    /// it for a client (`BestEffortInferServiceMTLSMode`): the mode of the namespace's
    /// PeerAuthentication without a selector (`UNSET` inherits the mesh's), else the
    /// mesh's (the root namespace's). The oldest of each namespace counts, as istiod keeps
    /// it.
    fn plaintext_namespace(&self, namespace: &str) -> bool {
        let root = self
            .mesh
            .and_then(|m| m.spec.root_namespace.as_deref())
            .unwrap_or("istio-system");
        let wide = |ns: &str| {
            self.peer_authentications
                .iter()
                .find(|pa| {
                    pa.meta.namespace == ns
                        && pa
                            .spec
                            .selector
                            .as_ref()
                            .is_none_or(|s| s.match_labels.is_empty())
                })
                .map(|pa| {
                    pa.spec
                        .mtls
                        .as_ref()
                        .and_then(|m| m.mode)
                        .unwrap_or_default()
                })
        };
        let mesh = wide(root).unwrap_or_default();
        let mode = match wide(namespace) {
            Some(PeerMtlsMode::Unset) | None => mesh,
            Some(mode) => mode,
        };
        mode == PeerMtlsMode::Disable
    }

    /// Decides every service, cluster and claim on names and addresses, as istiod does.
    fn decide(&mut self) {
        self.host_owners();
        self.service_entries();
        self.kube_services();
        self.service_aliases();
    }

    /// The Sidecar that applies to the proxy: the one selecting its workload, else its
    /// namespace's default, else the root namespace's.
    fn sidecar(&self) -> Option<&'a Object<SidecarSpec>> {
        let ns = &self.options.namespace;
        let root = self
            .mesh
            .and_then(|m| m.spec.root_namespace.clone())
            .unwrap_or_else(|| "istio-system".to_string());
        let selected = self.sidecars.iter().find(|s| {
            s.meta.namespace == *ns
                && s.spec
                    .workload_selector
                    .as_ref()
                    .is_some_and(|sel| labels_match(&sel.labels, &self.options.workload_labels))
        });
        let namespace_wide = || {
            self.sidecars
                .iter()
                .find(|s| s.meta.namespace == *ns && s.spec.workload_selector.is_none())
        };
        let mesh_wide = || {
            self.sidecars
                .iter()
                .find(|s| s.meta.namespace == root && s.spec.workload_selector.is_none())
        };
        selected.or_else(namespace_wide).or_else(mesh_wide).copied()
    }

    fn mode(&self) -> Option<OutboundMode> {
        let sidecar_mode = self
            .sidecar()
            .and_then(|s| s.spec.outbound_traffic_policy.as_ref())
            .and_then(|p| p.mode);
        sidecar_mode.or_else(|| {
            self.mesh
                .and_then(|m| m.spec.outbound_traffic_policy.as_ref())
                .and_then(|p| p.mode)
        })
    }

    /// The DestinationRule for `host`: the most specific, as in Istio: an exact host, then
    /// the longest wildcard suffix (`*` last), one selecting this workload before one for
    /// every client; the first of equals.
    fn rule_for(&self, host: &str) -> Option<&'a Object<DestinationRuleSpec>> {
        let mut rule = None;
        for dr in &self.destination_rules {
            let dr_host = if dr.spec.host.contains('.') || dr.spec.host == "*" {
                dr.spec.host.to_ascii_lowercase()
            } else {
                format!(
                    "{}.{}.svc.{}",
                    dr.spec.host.to_ascii_lowercase(),
                    dr.meta.namespace,
                    self.options.cluster_domain
                )
            };
            let selected = dr.spec.workload_selector.is_some();
            let rank = if dr_host == host {
                (1, dr_host.len(), selected)
            } else if let Some(suffix) = dr_host
                .strip_prefix('*')
                .filter(|suffix| host.ends_with(suffix))
            {
                (0, suffix.len(), selected)
            } else {
                continue;
            };
            if rule.is_none_or(|(best, _)| rank > best) {
                rule = Some((rank, *dr));
            }
        }
        rule.map(|(_, dr)| dr)
    }

    /// The DestinationRule's traffic policy for `host`'s clusters on `port`.
    fn traffic_for(&self, host: &str, port: u16) -> Traffic<'a> {
        traffic((self.rule_for(host), self.mesh_locality()), None, port)
    }

    /// The mesh config's `localityLbSetting`, if it sets one.
    fn mesh_locality(&self) -> Option<&'a LocalityLbSetting> {
        self.mesh.and_then(|m| m.spec.locality_lb_setting.as_ref())
    }

    /// The `tcp_proxy` timeouts istiod gives `host`'s TCP chains, from its
    /// DestinationRule's top-level `connectionPool.tcp` (port-level settings and subsets do
    /// not count); `None` when the rule sets neither.
    fn tcp_proxy_timeouts(&self, host: &str) -> Option<TcpProxyTimeouts> {
        let tcp = self
            .rule_for(host)?
            .spec
            .traffic_policy
            .as_ref()?
            .connection_pool
            .as_ref()?
            .tcp
            .as_ref()?;
        let t = TcpProxyTimeouts {
            idle: tcp
                .idle_timeout
                .map(|idle| (!idle.is_zero()).then_some(idle)),
            max_duration: tcp.max_connection_duration.filter(|d| !d.is_zero()),
        };
        (t.idle.is_some() || t.max_duration.is_some()).then_some(t)
    }

    /// The route hash policy for `host`'s `subset` (empty: the service) on `port`.
    fn hash_for(&self, host: &str, subset: &str, port: u16) -> Option<HashPolicy> {
        let rule = self.rule_for(host);
        let subset_policy = if subset.is_empty() {
            None
        } else {
            rule.and_then(|dr| dr.spec.subsets.iter().find(|s| s.name == subset))
                .and_then(|s| s.traffic_policy.as_ref())
        };
        traffic((rule, self.mesh_locality()), subset_policy, port).hash
    }

    /// The subsets of `host`'s DestinationRule, each with its traffic policy on `port`: the
    /// subset's own over the rule's, as istiod merges them.
    fn subsets_for(&self, host: &str, port: u16) -> Vec<(&'a Subset, Traffic<'a>)> {
        let Some(dr) = self.rule_for(host) else {
            return Vec::new();
        };
        dr.spec
            .subsets
            .iter()
            .map(|subset| {
                let mut policy = traffic(
                    (Some(dr), self.mesh_locality()),
                    subset.traffic_policy.as_ref(),
                    port,
                );
                if let Some(tls) = &mut policy.tls {
                    tls.subset = Some(&subset.name);
                }
                (subset, policy)
            })
            .collect()
    }

    /// Whether the Sidecar's egress listeners let the proxy reach `host` of namespace `ns`
    /// on `port`: the listener for that port if there is one, else the one without a port
    /// (the only one asked when `port` is `None`). Without a Sidecar, or one without egress
    /// listeners, everything visible is imported.
    fn imports(&self, ns: &str, host: &str, port: Option<u16>) -> bool {
        let Some(listeners) = self.egress else {
            return true;
        };
        // A listener's port; none for the catch-all (also an HTTP_PROXY listener, which
        // matches services on every port). Port 0 is a Unix socket's, which no traffic here
        // reaches.
        let port_of = |l: &SidecarEgress| {
            l.port
                .as_ref()
                .filter(|p| {
                    !p.protocol
                        .as_deref()
                        .is_some_and(|p| p.eq_ignore_ascii_case("HTTP_PROXY"))
                })
                .map(|p| p.number)
        };
        listeners
            .iter()
            .find(|l| port.is_some() && port_of(l) == port.map(u32::from))
            .or_else(|| listeners.iter().find(|l| port_of(l).is_none()))
            .is_some_and(|l| listener_imports(l, &self.options.namespace, ns, host))
    }

    /// Chooses, for every service host, the namespace whose service the proxy uses, as
    /// istiod does: among visible services the Sidecar imports, the proxy's own namespace
    /// first, then a Kubernetes Service, then the first ServiceEntry in namespace and name
    /// order. Within a namespace a Kubernetes Service hides ServiceEntries of its host.
    fn host_owners(&mut self) {
        let proxy_ns = self.options.namespace.as_str();
        let mesh_default = self
            .mesh
            .map_or(&[][..], |m| &m.spec.default_service_export_to[..]);
        let export_to = |own: &'a [String]| if own.is_empty() { mesh_default } else { own };
        let mut candidates: Vec<(Age, Box<str>, &'a str, bool)> = Vec::new();
        for se in &self.service_entries {
            let ns = se.meta.namespace.as_str();
            if !visible(export_to(&se.spec.export_to), ns, proxy_ns) {
                continue;
            }
            for host in &se.spec.hosts {
                let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
                let imported = se.spec.ports.iter().any(|p| {
                    u16::try_from(p.number)
                        .is_ok_and(|number| self.imports(ns, &host, Some(number)))
                });
                if imported {
                    let age = Age::new(se.meta.creation_timestamp.as_deref(), &host, ns);
                    candidates.push((age, host.into(), ns, false));
                }
            }
        }
        for svc in &self.kube_services {
            let ns = svc.meta.namespace.as_str();
            let annotated = kube_export_to(svc);
            let exported = if annotated.is_empty() {
                mesh_default
            } else {
                &annotated[..]
            };
            if !visible(exported, ns, proxy_ns) {
                continue;
            }
            let host = kube_fqdn(svc, &self.options.cluster_domain);
            // An alias takes its target's ports, so only a listener without a port can
            // import it as such.
            let imported = if external_name(svc).is_some() {
                self.imports(ns, &host, None)
            } else {
                svc.spec.ports.iter().any(|p| {
                    u16::try_from(p.port).is_ok_and(|number| self.imports(ns, &host, Some(number)))
                })
            };
            if imported {
                let age = Age::new(svc.meta.creation_timestamp.as_deref(), &svc.meta.name, ns);
                candidates.push((age, host.into(), ns, true));
            }
        }
        // Among equals the oldest service wins, as Istio orders services by creation time.
        candidates.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, host, ns, kube) in candidates {
            let rank = |(ns, kube): (&str, bool)| (ns == proxy_ns, kube);
            match self.owners.get(&host) {
                Some(&owner) if rank(owner) >= rank((ns, kube)) => {}
                _ => {
                    self.owners.insert(host, (ns, kube));
                }
            }
        }
    }

    /// Whether the service of `ns` (a Kubernetes Service if `kube`) is the one used for
    /// `host`.
    fn owns(&self, host: &str, ns: &str, kube: bool) -> bool {
        self.owners.get(host) == Some(&(ns, kube))
    }

    fn add_cluster(&mut self, cluster: PendingCluster) -> bool {
        if let Some(existing) = self.clusters.get(&cluster.name) {
            self.warnings.push(format!(
                "{} is defined by both {} and {}; the first is used",
                cluster.name, existing.source, cluster.source
            ));
            return false;
        }
        self.clusters.insert(Arc::clone(&cluster.name), cluster);
        true
    }

    fn service_entries(&mut self) {
        let entries = std::mem::take(&mut self.service_entries);
        for se in entries {
            let ns = se.meta.namespace.as_str();
            let source: Arc<str> = format!("ServiceEntry {ns}/{}", se.meta.name).into();
            for host in &se.spec.hosts {
                let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
                if !self.owns(&host, ns, false) {
                    continue;
                }
                for port in &se.spec.ports {
                    let Ok(number) = u16::try_from(port.number) else {
                        continue;
                    };
                    if !self.imports(ns, &host, Some(number)) {
                        continue;
                    }
                    let protocol = protocol_of(port.protocol.as_deref(), &port.name);
                    let name: Arc<str> = format!("outbound|{number}||{host}").into();
                    let endpoints = self.se_endpoints(se, &host, port);
                    let addresses: Vec<IpNet> = se
                        .spec
                        .addresses
                        .iter()
                        .filter_map(|a| parse_net(a))
                        .collect();
                    // Istio's ORIGINAL_DST cluster takes `targetPort` as its upstream port.
                    let passthrough_port = port
                        .target_port
                        .filter(|_| se.spec.resolution == Resolution::None)
                        .and_then(|p| u16::try_from(p).ok());
                    let added = self.add_cluster(PendingCluster {
                        name: Arc::clone(&name),
                        host: host.as_str().into(),
                        port: number,
                        protocol,
                        resolution: se.spec.resolution,
                        passthrough_port,
                        source: Arc::clone(&source),
                        addresses: addresses.clone(),
                        endpoints,
                        service_accounts: se.spec.subject_alt_names.clone(),
                        service_entry: true,
                        mesh_external: se.spec.location == Location::MeshExternal,
                        namespace: ns.into(),
                    });
                    if !added {
                        continue;
                    }
                    let sni = routed_by_sni(protocol, &addresses);
                    self.hosts_pending
                        .push((number, host.as_str().into(), Arc::clone(&name), sni));
                    let age = Age::new(
                        se.meta.creation_timestamp.as_deref(),
                        &host,
                        &se.meta.namespace,
                    );
                    let port_wide = se.spec.addresses.is_empty();
                    self.claim_port(age, number, protocol, &addresses, port_wide, &name);
                }
            }
        }
    }

    /// Registers a service port's claims on destinations as Istio's outbound listeners make
    /// them: an exact address is also a name for Host routing; opaque (TCP, TLS, undeclared)
    /// services own their addresses or ranges, and with `port_wide` (TCP or undeclared
    /// without addresses) the whole port; HTTP services live on the port's wildcard listener
    /// and own no address, and make that listener sniff HTTP, as undeclared ones do there.
    fn claim_port(
        &mut self,
        age: Age,
        port: u16,
        protocol: Protocol,
        addresses: &[IpNet],
        port_wide: bool,
        cluster: &Arc<str>,
    ) {
        for net in addresses {
            if net.prefix_len() == net.max_prefix_len() {
                self.hosts_pending.push((
                    port,
                    net.addr().to_string().into(),
                    Arc::clone(cluster),
                    false,
                ));
            }
        }
        let on_wildcard = on_wildcard_listener(addresses);
        match protocol {
            Protocol::Http | Protocol::Http2 => {
                self.sniffed_ports.insert(port);
                return;
            }
            Protocol::Auto if on_wildcard => {
                self.sniffed_ports.insert(port);
            }
            Protocol::Auto | Protocol::Tcp | Protocol::Tls => {}
        }
        let mut keys: Vec<AddressKey> = addresses.iter().map(|n| AddressKey::Net(*n)).collect();
        if port_wide && matches!(protocol, Protocol::Tcp | Protocol::Auto) {
            keys.push(AddressKey::AnyOnPort);
        }
        for key in keys {
            self.addresses_pending.push(PendingAddress {
                age: age.clone(),
                port,
                key,
                cluster: Arc::clone(cluster),
            });
        }
    }

    fn se_endpoints(
        &self,
        se: &Object<ServiceEntrySpec>,
        host: &str,
        port: &portcullis_model::ServicePort,
    ) -> Vec<PendingEndpoint> {
        let spec = &se.spec;
        let dns = matches!(spec.resolution, Resolution::Dns | Resolution::DnsRoundRobin);
        let default_port = port.target_port.unwrap_or(port.number);
        let trust_domain = self.trust_domain();
        let mut out = Vec::new();
        let cluster_id = &self.options.cluster_id;
        let mut push_workload = |we: &WorkloadEntrySpec,
                                 source: Arc<str>,
                                 labels: Labels,
                                 ns: &str,
                                 name: &str,
                                 meta: Option<&ObjectMeta>| {
            let target = we.ports.get(&port.name).copied().unwrap_or(default_port);
            let Ok(target) = u16::try_from(target) else {
                return;
            };
            let address = match we.address.parse::<IpAddr>() {
                Ok(ip) => EndpointAddress::Ip(ip),
                Err(_) if dns && !we.address.starts_with("unix://") => {
                    EndpointAddress::Dns(we.address.to_ascii_lowercase().into())
                }
                Err(_) => return,
            };
            let mut labels = labels;
            let place = locality::of_workload_entry(&we.locality, &labels);
            locality::augment(Arc::make_mut(&mut labels), &place, "");
            out.push(PendingEndpoint {
                address,
                port: target,
                weight: we.weight.unwrap_or(1).max(1),
                source,
                locality: locality::parse(&place),
                peer: Peer::of_workload(we, &labels, ns, trust_domain),
                workload: workload::of_workload_entry(name, meta, ns, &labels, cluster_id),
                labels,
            });
        };
        // Resolution NONE keeps its endpoints too, as istiod's: its ORIGINAL_DST cluster
        // sends no endpoints, but who they are decides its mutual TLS and identities.
        match spec.resolution {
            _ if !spec.endpoints.is_empty() => {
                let source: Arc<str> = format!(
                    "ServiceEntry {}/{} endpoints",
                    se.meta.namespace, se.meta.name
                )
                .into();
                // istiod names an inline endpoint's workload `SERVICEENTRY-INDEX`.
                for (i, we) in spec.endpoints.iter().enumerate() {
                    push_workload(
                        we,
                        Arc::clone(&source),
                        Arc::new(we.labels.clone()),
                        &se.meta.namespace,
                        &format!("{}-{i}", se.meta.name),
                        None,
                    );
                }
            }
            _ if spec.workload_selector.is_some() => {
                let selector = spec
                    .workload_selector
                    .as_ref()
                    .map(|s| &s.labels)
                    .cloned()
                    .unwrap_or_default();
                for we in &self.workload_entries {
                    let labels = workload_entry_labels(we);
                    if we.meta.namespace == se.meta.namespace && labels_match(&selector, &labels) {
                        let source =
                            format!("WorkloadEntry {}/{}", we.meta.namespace, we.meta.name).into();
                        push_workload(
                            &we.spec.spec,
                            source,
                            Arc::new(labels),
                            &we.meta.namespace,
                            &we.meta.name,
                            Some(&we.meta),
                        );
                    }
                }
                if let Ok(target) = u16::try_from(default_port) {
                    for pod in &self.pods {
                        let meta = &pod.object.meta;
                        if meta.namespace == se.meta.namespace
                            && labels_match(&selector, &meta.labels)
                        {
                            pod.endpoints(target, trust_domain, &mut out);
                        }
                    }
                }
            }
            _ if dns && !host.starts_with('*') => {
                if let Ok(target) = u16::try_from(default_port) {
                    out.push(PendingEndpoint {
                        address: EndpointAddress::Dns(host.into()),
                        port: target,
                        weight: 1,
                        source: format!("ServiceEntry {}/{}", se.meta.namespace, se.meta.name)
                            .into(),
                        labels: Labels::default(),
                        locality: Locality::default(),
                        peer: Peer::default(),
                        // istiod's endpoint for the host itself is the ServiceEntry's
                        // workload, without labels.
                        workload: workload::metadata(
                            &se.meta.name,
                            &se.meta.namespace,
                            &BTreeMap::new(),
                            cluster_id,
                        ),
                    });
                }
            }
            _ => {}
        }
        if spec.resolution == Resolution::DnsRoundRobin {
            // Envoy's LOGICAL_DNS: one endpoint, whichever address it resolves to now.
            out.truncate(1);
        }
        out
    }

    fn kube_services(&mut self) {
        let services = std::mem::take(&mut self.kube_services);
        let domain = self.options.cluster_domain.clone();
        for svc in services {
            let ns = &svc.meta.namespace;
            let fqdn = kube_fqdn(svc, &domain);
            if !self.owns(&fqdn, ns, true) {
                continue;
            }
            let mut names = vec![
                fqdn.clone(),
                format!("{}.{ns}.svc", svc.meta.name).to_ascii_lowercase(),
                format!("{}.{ns}", svc.meta.name).to_ascii_lowercase(),
            ];
            if *ns == self.options.namespace {
                names.push(svc.meta.name.to_ascii_lowercase());
            }
            let vips: Vec<IpAddr> = svc
                .spec
                .cluster_ip
                .iter()
                .chain(svc.spec.cluster_ips.iter())
                .filter_map(|s| s.parse().ok())
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            if let Some(target) = external_name(svc) {
                let target = target.strip_suffix('.').unwrap_or(target);
                self.aliases.push((names, target.to_ascii_lowercase()));
                continue;
            }
            let source: Arc<str> = format!("Service {ns}/{}", svc.meta.name).into();
            // Headless: clients reach the pods directly, also as `pod.service...` (a
            // StatefulSet's per-pod names), and the proxy forwards to the pod they chose.
            let headless = svc.spec.cluster_ip.as_deref() == Some("None");
            if headless {
                let wildcards: Vec<String> = names.iter().map(|n| format!("*.{n}")).collect();
                names.extend(wildcards);
            }
            for port in &svc.spec.ports {
                let Ok(number) = u16::try_from(port.port) else {
                    continue;
                };
                if !self.imports(ns, &fqdn, Some(number)) {
                    continue;
                }
                let protocol = protocol_of(
                    port.app_protocol
                        .as_deref()
                        .or(port.protocol.as_deref())
                        .filter(|p| *p != "TCP"),
                    &port.name,
                );
                let name: Arc<str> = format!("outbound|{number}||{fqdn}").into();
                let (resolution, endpoints) = if headless {
                    (Resolution::None, self.service_endpoints(svc, port))
                } else {
                    let mut endpoints = self.service_endpoints(svc, port);
                    if let Some(selector) = &svc.spec.selector {
                        self.service_workload_entries(svc, selector, port, &mut endpoints);
                    }
                    (Resolution::Static, endpoints)
                };
                // A headless service's addresses are its pods'.
                let destinations: Vec<IpAddr> = if headless {
                    endpoints
                        .iter()
                        .filter_map(|e| match &e.address {
                            EndpointAddress::Ip(ip) => Some(*ip),
                            EndpointAddress::Dns(_) => None,
                        })
                        .collect()
                } else {
                    vips.clone()
                };
                let added = self.add_cluster(PendingCluster {
                    name: Arc::clone(&name),
                    host: fqdn.as_str().into(),
                    port: number,
                    protocol,
                    resolution,
                    passthrough_port: None,
                    source: Arc::clone(&source),
                    addresses: destinations.iter().map(|ip| IpNet::from(*ip)).collect(),
                    endpoints,
                    service_accounts: kube_service_accounts(svc, self.trust_domain()),
                    service_entry: false,
                    mesh_external: false,
                    namespace: ns.as_str().into(),
                });
                if !added {
                    continue;
                }
                let addresses: Vec<IpNet> =
                    destinations.iter().map(|ip| IpNet::from(*ip)).collect();
                let sni = routed_by_sni(protocol, &addresses);
                for host in &names {
                    self.hosts_pending
                        .push((number, host.as_str().into(), Arc::clone(&name), sni));
                }
                let age = Age::new(svc.meta.creation_timestamp.as_deref(), &svc.meta.name, ns);
                self.claim_port(age, number, protocol, &addresses, false, &name);
            }
        }
    }

    /// Registers each ExternalName Service's names on every port of the service it names,
    /// as istiod's aliases do (following an alias of an alias); a name that is no
    /// registered service's host gives the alias nothing to route to.
    fn service_aliases(&mut self) {
        let aliases = std::mem::take(&mut self.aliases);
        for (names, target) in &aliases {
            let mut target = target.as_str();
            // A loop of aliases names nothing, as Kubernetes DNS answers NXDOMAIN for it.
            for _ in 0..=aliases.len() {
                match aliases.iter().find(|(n, _)| n[0] == target) {
                    Some((_, next)) => target = next,
                    None => break,
                }
            }
            // An alias matches SNI wherever the service it names does.
            let ports: Vec<(u16, Arc<str>, bool)> = self
                .clusters
                .values()
                .filter(|c| &*c.host == target)
                .map(|c| {
                    let sni = routed_by_sni(c.protocol, &c.addresses);
                    (c.port, Arc::clone(&c.name), sni)
                })
                .collect();
            for (port, cluster, sni) in ports {
                for name in names {
                    self.hosts_pending.push((
                        port,
                        name.as_str().into(),
                        Arc::clone(&cluster),
                        sni,
                    ));
                }
            }
        }
    }

    fn service_endpoints(
        &self,
        svc: &Object<KubeServiceSpec>,
        port: &portcullis_model::KubePort,
    ) -> Vec<PendingEndpoint> {
        let Some(selector) = &svc.spec.selector else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for pod in &self.pods {
            let meta = &pod.object.meta;
            if meta.namespace != svc.meta.namespace || !labels_match(selector, &meta.labels) {
                continue;
            }
            let target = match &port.target_port {
                None => Some(port.port),
                Some(TargetPort::Number(n)) => Some(*n),
                Some(TargetPort::Name(name)) => pod
                    .object
                    .spec
                    .spec
                    .containers
                    .iter()
                    .flat_map(|c| &c.ports)
                    .find(|p| p.name == *name)
                    .map(|p| p.container_port),
            };
            let Some(target) = target.and_then(|t| u16::try_from(t).ok()) else {
                continue;
            };
            pod.endpoints(target, self.trust_domain(), &mut out);
        }
        out
    }

    /// WorkloadEntries a Kubernetes Service selects, as istiod adds them to the Service's
    /// endpoints: the port is a numeric targetPort (or the service port), overridden by the
    /// entry's port of the service port's name; a named targetPort must be among the
    /// entry's ports.
    fn service_workload_entries(
        &self,
        svc: &Object<KubeServiceSpec>,
        selector: &BTreeMap<String, String>,
        port: &portcullis_model::KubePort,
        out: &mut Vec<PendingEndpoint>,
    ) {
        for we in &self.workload_entries {
            let labels = workload_entry_labels(we);
            if we.meta.namespace != svc.meta.namespace
                || labels.is_empty()
                || !labels_match(selector, &labels)
            {
                continue;
            }
            let spec = &we.spec.spec;
            let target = match &port.target_port {
                Some(TargetPort::Name(name)) => spec.ports.get(name).copied(),
                Some(TargetPort::Number(n)) if *n > 0 => {
                    Some(spec.ports.get(&port.name).copied().unwrap_or(*n))
                }
                _ => Some(spec.ports.get(&port.name).copied().unwrap_or(port.port)),
            };
            let (Some(target), Ok(ip)) = (
                target.and_then(|t| u16::try_from(t).ok()),
                spec.address.parse::<IpAddr>(),
            ) else {
                continue;
            };
            let peer = Peer::of_workload(spec, &labels, &we.meta.namespace, self.trust_domain());
            let workload = workload::of_workload_entry(
                &we.meta.name,
                Some(&we.meta),
                &we.meta.namespace,
                &labels,
                &self.options.cluster_id,
            );
            let mut labels = labels;
            let place = locality::of_workload_entry(&spec.locality, &labels);
            locality::augment(&mut labels, &place, "");
            out.push(PendingEndpoint {
                address: EndpointAddress::Ip(ip),
                port: target,
                weight: spec.weight.unwrap_or(1).max(1),
                source: format!("WorkloadEntry {}/{}", we.meta.namespace, we.meta.name).into(),
                labels: Arc::new(labels),
                locality: locality::parse(&place),
                peer,
                workload,
            });
        }
    }
}
