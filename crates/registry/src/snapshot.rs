//! The immutable routing snapshot and its lookups.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use portcullis_balance::{Balancer, EndpointState, PreviousPriorities};
use portcullis_model::{OutboundMode, Resolution};

use crate::Map;
use crate::cluster::Target;
use crate::host::{normalized, split_host_port, with_host_port};
use crate::limits::CircuitBreakers;
use crate::listener::{Candidates, Chain, ChainFilter, Connection, Listeners};
use crate::route::{DirectResponse, HttpRoute, Request, RouteTable};
use crate::ssrf::RejectedAnswer;

/// Envoy's name for the cluster that drops unregistered traffic.
pub const BLACKHOLE_CLUSTER: &str = "BlackHoleCluster";
/// Envoy's name for the cluster that forwards to the original destination.
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";

/// How traffic on a service port is handled, from the port's protocol or name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP: routed by Host; HTTP/1.1 to the upstream.
    Http,
    /// HTTP/2 or gRPC: routed by `:authority`; HTTP/2 to the upstream.
    Http2,
    /// TLS or HTTPS: routed by SNI.
    Tls,
    /// Opaque TCP: routed by destination address.
    Tcp,
    /// Not declared: sniffed per connection.
    Auto,
}

/// One endpoint of a cluster.
#[derive(Debug)]
pub struct Endpoint {
    /// Address.
    pub address: IpAddr,
    /// The DNS name the address was resolved from (resolution DNS), if any.
    pub hostname: Option<Arc<str>>,
    /// Port on the endpoint.
    pub port: u16,
    /// Load-balancing weight.
    pub weight: u32,
    /// The resource that contributed it, e.g. `WorkloadEntry default/external`.
    pub source: Arc<str>,
    /// The workload behind it, which Istio's metrics label the destination with, when the
    /// control plane (or the files' pod or WorkloadEntry) says.
    pub workload: Option<Arc<crate::WorkloadMetadata>>,
    /// Live counters, carried over across reloads for the same cluster and address.
    pub state: Arc<EndpointState>,
    /// How connections to it are made.
    pub transport: EndpointTransport,
}

/// How connections to an endpoint are made, compiled with the snapshot.
#[derive(Debug, Clone)]
pub enum EndpointTransport {
    /// Plain TCP.
    Plaintext,
    /// TLS originated with this configuration (DestinationRule `tls`, an
    /// `UpstreamTlsContext`).
    Tls(Arc<crate::TlsOrigin>),
    /// Istio mutual TLS, with the workload's identity when the proxy has one.
    IstioMutual(Arc<crate::IstioPeer>),
    /// No connection at all, for this reason: the transport cannot be built (unusable TLS
    /// settings, or one portcullis does not originate); never plaintext instead.
    Refused(Arc<str>),
}

impl Endpoint {
    /// `ip:port` or `host:port`, as Envoy prints upstream hosts.
    pub fn display(&self) -> String {
        std::net::SocketAddr::new(self.address, self.port).to_string()
    }
}

/// A cluster: one service host on one port, Envoy-named `outbound|PORT||HOST`.
#[derive(Debug)]
pub struct Cluster {
    /// Envoy cluster name.
    pub name: Arc<str>,
    /// The service host.
    pub host: Arc<str>,
    /// The service port.
    pub port: u16,
    /// Protocol of the port.
    pub protocol: Protocol,
    /// How endpoints are found; `None` forwards to the original destination.
    pub resolution: Resolution,
    /// Resolution NONE: the port forwarded to on the original destination's address
    /// (`targetPort`), instead of the port the client dialled.
    pub passthrough_port: Option<u16>,
    /// The resource that defined the service.
    pub source: Arc<str>,
    /// Resolution NONE: the only destinations forwarded to (the service's addresses and
    /// what its non-wildcard host resolves to now); `None`: any, as Envoy.
    pub owned_destinations: Option<Vec<IpNet>>,
    /// Resolution NONE: how connections to the original destination are made (the
    /// cluster's transport; endpoints carry their own).
    pub passthrough_transport: EndpointTransport,
    /// Endpoints, in the order the balancer indexes them.
    pub endpoints: Vec<Endpoint>,
    /// DNS answers the SSRF guard kept out of `endpoints`, with the reason of each.
    pub dns_rejected: Vec<RejectedAnswer>,
    /// Picks endpoints.
    pub balancer: Balancer,
    /// Upstream connect timeout (Envoy's `connect_timeout`).
    pub connect_timeout: Duration,
    /// Limits on each upstream connection (idle timeout, requests, lifetime, keepalive),
    /// when any is set (out of line: most clusters have Envoy's defaults).
    pub(crate) limits: Option<Box<portcullis_envoy::ConnectionLimits>>,
    /// Outlier detection, when the cluster has it (out of line: most clusters have none).
    pub outlier: Option<Box<Outliers>>,
    /// Circuit breakers (default priority).
    pub breakers: CircuitBreakers,
    /// The service's short name, as Istio's metrics label it (`destination_service_name`):
    /// a Kubernetes service's name, else the host.
    pub service_name: Arc<str>,
    /// The service's namespace as Istio's metrics label it: a Kubernetes service's, else
    /// that of the resource that declared it, when known.
    pub service_namespace: Option<Arc<str>>,
    /// Whether the cluster or any of its endpoints speaks Istio mutual TLS.
    pub istio_mutual: bool,
    /// The resources it was built from, when a later snapshot may share it while they stay
    /// the same.
    pub(crate) built_from: Option<BuiltFrom>,
}

/// A cluster's outlier detection as the data path applies it.
#[derive(Debug, Clone, Copy)]
pub struct Outliers {
    /// The detectors and ejection times.
    pub detection: portcullis_balance::outlier::Detection,
    /// Below this percentage of endpoints not ejected, ejections are ignored (Envoy's
    /// `healthy_panic_threshold`; 0 never).
    pub panic_threshold: f64,
}

/// The Envoy resources a cluster was built from.
#[derive(Debug)]
pub(crate) struct BuiltFrom {
    pub(crate) cluster: Arc<portcullis_envoy::Cluster>,
    pub(crate) assignment: Option<Arc<portcullis_envoy::ClusterLoadAssignment>>,
}

impl Cluster {
    /// Limits on each upstream connection (idle timeout, requests, lifetime, keepalive).
    pub fn connection_limits(&self) -> portcullis_envoy::ConnectionLimits {
        self.limits.as_deref().copied().unwrap_or_default()
    }

    /// Whether it is a service's, not one of Istio's two catch-all clusters.
    pub fn is_service(&self) -> bool {
        ![BLACKHOLE_CLUSTER, PASSTHROUGH_CLUSTER].contains(&&*self.name)
    }

    /// Picks an endpoint; `None` when the cluster has none.
    pub fn pick(&self) -> Option<&Endpoint> {
        self.balancer.pick().and_then(|i| self.endpoints.get(i))
    }

    /// Picks an endpoint other than those tried; a consistent-hash balancer picks by the
    /// request's `hash`; a retry priority (`previous`) moves load off the priorities
    /// already attempted. With outlier detection, endpoints ejected at `now` count as
    /// unhealthy in the priority and locality load and are avoided outside panic mode;
    /// with slow start, endpoints warming up at `now` weigh less.
    /// `None`: no endpoint, or none healthy and panic mode off (Envoy's `no healthy
    /// upstream`).
    pub fn pick_hashed(
        &self,
        hash: Option<u64>,
        avoid: (&[usize], Option<PreviousPriorities<'_>>),
        now: Instant,
    ) -> Option<(usize, &Endpoint)> {
        let not_ejected = |i: usize| {
            self.endpoints
                .get(i)
                .is_some_and(|e| !e.state.outlier.ejected(now))
        };
        let i = match &self.outlier {
            Some(o) => {
                self.balancer
                    .choose(hash, avoid, Some(&not_ejected), o.panic_threshold, now)
            }
            None => self.balancer.choose(hash, avoid, None, 0.0, now),
        }?;
        self.endpoints.get(i).map(|e| (i, e))
    }
}

/// Whether a refusal is enforced or only recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    /// Unregistered traffic is refused.
    Enforce,
    /// Unregistered traffic is forwarded as ALLOW_ANY would, and recorded as a would-deny.
    Audit,
}

impl Enforcement {
    /// Parses `enforce` or `audit` (any case, surrounding blanks ignored).
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "enforce" => Some(Enforcement::Enforce),
            "audit" => Some(Enforcement::Audit),
            _ => None,
        }
    }

    /// `enforce` or `audit`.
    pub fn as_str(self) -> &'static str {
        match self {
            Enforcement::Enforce => "enforce",
            Enforcement::Audit => "audit",
        }
    }
}

/// What the data path does with a connection or request.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Send to this registered cluster.
    Cluster(Arc<Cluster>),
    /// Unregistered and REGISTRY_ONLY: refuse.
    BlackHole,
    /// Unregistered and ALLOW_ANY: forward to the original destination.
    Passthrough,
    /// Answer an HTTP request directly (a route's `direct_response` or redirect).
    Direct(Arc<DirectResponse>),
    /// No route for an HTTP request: Envoy's 404, flag `NR`.
    NoRoute,
    /// A route or filter chain names a cluster that does not exist: Envoy's 503 (HTTP) or
    /// closed connection, flag `NC`.
    NoCluster(Arc<str>),
    /// No filter chain takes the connection: closed, flag `NR`.
    NoFilterChain,
}

impl Decision {
    /// The cluster name Envoy would log for this decision.
    pub fn cluster_name(&self) -> &str {
        match self {
            Decision::Cluster(c) => &c.name,
            Decision::Passthrough => PASSTHROUGH_CLUSTER,
            Decision::BlackHole => BLACKHOLE_CLUSTER,
            Decision::NoCluster(name) => name,
            Decision::Direct(_) | Decision::NoRoute | Decision::NoFilterChain => "-",
        }
    }
}

/// The `*.` wildcard names of one table (hosts on a port, SNI names of filter chains).
#[derive(Debug)]
pub(crate) struct Wildcards<T> {
    /// Keyed by the suffix after `*`, e.g. `.example.com`.
    by_suffix: Map<Box<str>, T>,
    /// Bit `n` is set when some suffix has `n` dots (bit 63: 63 or more), so that a lookup
    /// hashes only those suffixes of the host that could be registered.
    dot_counts: u64,
}

impl<T> Default for Wildcards<T> {
    fn default() -> Self {
        Wildcards {
            by_suffix: Map::default(),
            dot_counts: 0,
        }
    }
}

impl<T> Wildcards<T> {
    /// The value registered for exactly this suffix.
    pub(crate) fn get(&self, suffix: &str) -> Option<&T> {
        self.by_suffix.get(suffix)
    }

    /// The value registered for exactly this suffix, to change it.
    pub(crate) fn get_mut(&mut self, suffix: &str) -> Option<&mut T> {
        self.by_suffix.get_mut(suffix)
    }

    /// Registers a value for a suffix, replacing any before it.
    pub(crate) fn insert(&mut self, suffix: &str, value: T) {
        self.dot_counts |= dots_bit(suffix.bytes().filter(|&b| b == b'.').count());
        self.by_suffix.insert(suffix.into(), value);
    }

    /// The values, in no order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &T> {
        self.by_suffix.values()
    }

    /// The value of the longest registered suffix of `host`, which has `dots` dots, that
    /// starts at a dot.
    pub(crate) fn longest_match(&self, host: &str, mut dots: usize) -> Option<&T> {
        if self.dot_counts == 0 {
            return None;
        }
        // Suffixes from the longest: walk the dots left to right, knowing how many dots
        // each suffix holds. The cost depends on the number of labels in the name and of
        // distinct label counts registered, never on the number of services.
        for (i, b) in host.bytes().enumerate() {
            if b != b'.' {
                continue;
            }
            let bit = dots_bit(dots);
            if self.dot_counts & bit != 0
                && let Some(c) = self.by_suffix.get(&host[i..])
            {
                return Some(c);
            }
            // Every shorter suffix has fewer dots than any registered one.
            if dots < 63 && self.dot_counts & (bit - 1) == 0 {
                return None;
            }
            dots -= 1;
        }
        None
    }
}

/// The bit of [`Wildcards::dot_counts`] for a suffix with `dots` dots.
fn dots_bit(dots: usize) -> u64 {
    1 << dots.min(63)
}

/// One immutable version of the registry. Built off the data path, swapped in whole.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Monotonic version, for logs and the admin server.
    pub version: u64,
    /// Outbound traffic policy in force.
    pub mode: Option<OutboundMode>,
    /// Every cluster, by name (sorted); shared with the next snapshot where unchanged.
    pub clusters: ClusterMap,
    /// The services' clusters by lower-cased host, then name, kept beside `clusters`: a
    /// refusal is explained from the hosts that cover its name instead of a walk of every
    /// service.
    pub(crate) by_host: HostMap,
    /// Warnings found while compiling (conflicts, unsupported features).
    pub warnings: Vec<String>,
    /// Hostnames the registry needs resolved: DNS endpoints and resolution-NONE hosts.
    pub dns_names: std::collections::BTreeSet<String>,
    /// What the mesh config asks of refusals (`defaultConfig.proxyMetadata.PORTCULLIS_MODE`);
    /// `None` when it says nothing.
    pub enforcement: Option<Enforcement>,
    /// The listeners of a snapshot indexed from Envoy's model ([`Snapshot::index`]); an
    /// empty snapshot has none, and everything in it is unmatched.
    pub(crate) listeners: Option<Listeners>,
    /// Istio's `http_proxy` route table, when the config has one (the files' always do):
    /// the names of HTTP and sniffed ports, for explicit proxying and CONNECT.
    pub(crate) http_proxy: Option<Arc<RouteTable>>,
    /// The names of TLS and TCP ports the files claimed, by port (see [`OpaqueNames`]);
    /// `None` for a snapshot indexed from xDS, whose services are found by host instead.
    pub(crate) opaque_names: Option<OpaqueNames>,
    /// What it was indexed from, so that the next snapshot builds only the clusters that
    /// changed ([`Snapshot::index`]).
    pub(crate) indexed: Option<Box<crate::index::Indexed>>,
}

/// Per port, each name (lower case; a wildcard as `*.suffix` or `*`) of a TLS or TCP service
/// and the cluster it routes to, as the files' claims settled them: Kubernetes short names
/// and ExternalName aliases included, which a cluster's host does not tell.
pub type OpaqueNames =
    std::collections::BTreeMap<u16, std::collections::BTreeMap<Box<str>, Arc<str>>>;

/// Clusters by name, in a persistent map: the next snapshot shares every unchanged one.
pub type ClusterMap = imbl::OrdMap<Arc<str>, Arc<Cluster>>;

/// Service clusters by lower-cased host, each host's sorted by name ([`Snapshot::by_host`]).
pub(crate) type HostMap = imbl::OrdMap<Arc<str>, HostClusters>;

/// One host's service clusters, sorted by name. Most hosts have one or a few: a slice
/// costs a pointer each, where a persistent map per host cost a node of several hundred
/// bytes; a change copies the host's few pointers.
pub(crate) type HostClusters = Arc<[Arc<Cluster>]>;

/// The key of `cluster` in a [`HostMap`]; `None` for Istio's two catch-all clusters, which
/// are not services.
fn host_key(cluster: &Cluster) -> Option<Arc<str>> {
    if !cluster.is_service() {
        return None;
    }
    Some(if cluster.host.bytes().any(|b| b.is_ascii_uppercase()) {
        cluster.host.to_ascii_lowercase().into()
    } else {
        Arc::clone(&cluster.host)
    })
}

/// `by_host` after `changes` to the clusters it was built for (each the cluster a name
/// had and has, `None` for none): a snapshot that changes one service visits that one, not
/// every host.
pub(crate) fn hosts_after(
    by_host: &HostMap,
    changes: impl IntoIterator<Item = (Option<Arc<Cluster>>, Option<Arc<Cluster>>)>,
) -> HostMap {
    let mut by_host = by_host.clone();
    let others = |named: &HostClusters, name: &str| -> Vec<Arc<Cluster>> {
        named.iter().filter(|c| &*c.name != name).cloned().collect()
    };
    for (was, now) in changes {
        if let Some(c) = was
            && let Some(key) = host_key(&c)
            && let Some(named) = by_host.get(&key)
        {
            let rest = others(named, &c.name);
            if rest.is_empty() {
                by_host.remove(&key);
            } else {
                by_host.insert(key, rest.into());
            }
        }
        if let Some(c) = now
            && let Some(key) = host_key(&c)
        {
            let mut named = by_host
                .get(&key)
                .map(|named| others(named, &c.name))
                .unwrap_or_default();
            let at = named.partition_point(|n| n.name < c.name);
            named.insert(at, c);
            by_host.insert(key, named.into());
        }
    }
    by_host
}

/// The ALPN an HTTP/1 request is sniffed as, for filter chain matching.
const SNIFFED_HTTP1: &[&str] = &["http/1.1"];

impl Snapshot {
    /// The chains that may take a connection to `destination:port` (`None`: the explicit
    /// proxy, which has no original destination), once the listener is chosen as Envoy's
    /// `use_original_dst` hand-off does. `None` when the snapshot has no listener for it.
    pub fn candidates(&self, destination: Option<IpAddr>, port: u16) -> Option<Candidates<'_>> {
        self.listeners.as_ref()?.candidates(destination, port)
    }

    /// The filter chain for a connection; `None` when no chain takes it.
    pub fn filter_chain(&self, conn: &Connection<'_>) -> Option<&Arc<Chain>> {
        self.candidates(conn.destination, conn.port)?.pick(conn)
    }

    /// Routes one HTTP request that arrived on a connection described by `conn`: its filter
    /// chain's route table, virtual host and first matching route.
    pub fn route_request(&self, conn: &Connection<'_>, req: &Request<'_>) -> HttpRoute {
        if self.listeners.is_none() {
            return HttpRoute::unrouted(self.unmatched());
        }
        match self.filter_chain(conn).map(|c| &c.filter) {
            None => HttpRoute::unrouted(Decision::NoFilterChain),
            Some(ChainFilter::Http(h)) => match &h.routes {
                Some(table) => table.route(req),
                None => HttpRoute::none(),
            },
            // The chain has changed under a connection served as HTTP: its requests go
            // where its bytes would.
            Some(ChainFilter::Tcp(t)) => HttpRoute::unrouted(t.decide()),
        }
    }

    /// Routes one request of the explicit proxy (no original destination) for `host` on
    /// `port`: through Istio's `http_proxy` route table when the config has one, as the
    /// listener of a sidecar's HTTP proxy port does, its authority written `host:port` as
    /// that table's domains are; else as a request on `conn`.
    pub fn route_explicit(
        &self,
        host: &str,
        conn: &Connection<'_>,
        req: &Request<'_>,
    ) -> HttpRoute {
        let Some(table) = &self.http_proxy else {
            return self.route_request(conn, req);
        };
        // A name with a trailing dot matches no domain as sent (Envoy does not strip it).
        let Some(name) = normalized(host).ok().filter(|_| !host.ends_with('.')) else {
            return table.route(req);
        };
        // The name is already normalized (an IP literal to its canonical spelling): the
        // table looks up the key written here, rather than splitting and normalizing it
        // again.
        with_host_port(&name.text, name.is_v6(), conn.port, |authority| {
            table.route_keyed(&name, &Request { authority, ..*req })
        })
    }

    /// The decision of a connection described by `conn` carried as bytes (TCP, TLS): its
    /// filter chain's clusters. A chain of HTTP routes takes no opaque bytes: the outbound
    /// policy's.
    pub fn route_connection(&self, conn: &Connection<'_>) -> Decision {
        self.route_connection_chain(conn).0
    }

    /// As [`Snapshot::route_connection`], with the filter chain that decided (`None`
    /// without listeners or when no chain matched), whose settings (its idle timeout) the
    /// connection keeps.
    pub fn route_connection_chain(&self, conn: &Connection<'_>) -> (Decision, Option<&Arc<Chain>>) {
        if self.listeners.is_none() {
            return (self.unmatched(), None);
        }
        let chain = self.filter_chain(conn);
        let decision = match chain.map(|c| &c.filter) {
            None => Decision::NoFilterChain,
            Some(ChainFilter::Tcp(t)) => t.decide(),
            Some(ChainFilter::Http(_)) => self.unmatched(),
        };
        (decision, chain)
    }

    /// Whether a connection described by `conn`, sniffed as HTTP, is served as HTTP: its
    /// filter chain is an HTTP connection manager, or ends in the outbound policy's
    /// catch-all, whose answer HTTP gets as HTTP (the 502), as it does in an empty
    /// snapshot.
    pub fn serves_http(&self, conn: &Connection<'_>) -> bool {
        self.listeners.is_none()
            || match self.filter_chain(conn).map(|c| &c.filter) {
                Some(ChainFilter::Http(_)) => true,
                Some(ChainFilter::Tcp(t)) => policy_catch_all(t),
                None => false,
            }
    }

    /// The decision for a name on `port` without an original destination (the explicit
    /// proxy): the name as a Host in Istio's `http_proxy` table or, without one, in the
    /// port's HTTP routes or as SNI in its filter chains; else the TLS or TCP service the
    /// name is a host of on `port`. `None` when nothing registers it.
    fn by_name(&self, name: &str, port: u16) -> Option<Decision> {
        let found = |d: &Decision| matches!(d, Decision::Cluster(_));
        let routed = match &self.http_proxy {
            Some(table) => {
                let host = normalized(name).ok()?;
                let authority = match host.ip.map(canonical) {
                    Some(IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
                    Some(ip) => format!("{ip}:{port}"),
                    None => format!("{}:{port}", host.text),
                };
                let req = Request {
                    authority: &authority,
                    path: "/",
                    method: "GET",
                    scheme: "http",
                    headers: &(),
                };
                Some(table.route(&req).decision)
            }
            None => self.by_port_chains(name, port),
        };
        routed
            .filter(found)
            .or_else(|| self.opaque_service(name, port))
    }

    /// `name` on `port` as the port's listener would take it without a destination: a Host
    /// of its HTTP routes, else the SNI of a TLS chain that names it.
    fn by_port_chains(&self, name: &str, port: u16) -> Option<Decision> {
        let candidates = self.candidates(None, port)?;
        let http = Connection {
            port,
            application_protocols: SNIFFED_HTTP1,
            ..Connection::default()
        };
        match candidates.pick(&http).map(|c| &c.filter) {
            Some(ChainFilter::Http(h)) => {
                let req = Request {
                    authority: name,
                    path: "/",
                    method: "GET",
                    scheme: "http",
                    headers: &(),
                };
                let table = h.routes.as_ref()?;
                table.matching(&req).map(|r| r.decide(&req).0)
            }
            _ => {
                let tls = |server_name| Connection {
                    port,
                    server_name,
                    tls: true,
                    ..Connection::default()
                };
                let chain = candidates.pick(&tls(Some(name)))?;
                // A chain that a connection without a name gets as well (a TCP service's
                // catch-all) takes any name: the name did not pick it.
                if candidates
                    .pick(&tls(None))
                    .is_some_and(|unnamed| Arc::ptr_eq(unnamed, chain))
                {
                    return None;
                }
                match &chain.filter {
                    ChainFilter::Tcp(t) => Some(t.decide()),
                    ChainFilter::Http(_) => None,
                }
            }
        }
    }

    /// The cluster of the TLS or opaque TCP service on `port` that `name` is a name of: as
    /// the files claimed it (its addresses among its names), or (from xDS) whose host
    /// covers it; the name itself before wildcards, the most specific first. Istio's
    /// `http_proxy` table has virtual hosts for HTTP ports only, and a TCP service with
    /// addresses has listeners by address only: a CONNECT to such a service's name finds
    /// it here.
    fn opaque_service(&self, name: &str, port: u16) -> Option<Decision> {
        let host = normalized(name).ok()?;
        let cluster = match &self.opaque_names {
            Some(claimed) => {
                let names = claimed.get(&port)?;
                covering(&host.text, |key| names.get(key))
                    .next()
                    .and_then(|cluster| self.clusters.get(cluster))
            }
            None => covering(&host.text, |key| {
                self.by_host
                    .get(key)?
                    .iter()
                    .find(|c| c.port == port && matches!(c.protocol, Protocol::Tls | Protocol::Tcp))
            })
            .next(),
        };
        cluster.map(|c| Decision::Cluster(Arc::clone(c)))
    }
}

impl Snapshot {
    /// The Envoy resources it was indexed from; `None` for a snapshot not indexed from any.
    pub fn resources(&self) -> Option<&portcullis_envoy::Resources> {
        self.indexed.as_ref().map(|i| &i.resources)
    }

    /// The effective outbound mode (REGISTRY_ONLY unless configured otherwise).
    pub fn outbound_mode(&self) -> OutboundMode {
        self.mode.unwrap_or(OutboundMode::RegistryOnly)
    }

    /// The decision for traffic that matches nothing: the outbound policy's.
    pub fn unmatched(&self) -> Decision {
        match self.outbound_mode() {
            OutboundMode::RegistryOnly => Decision::BlackHole,
            OutboundMode::AllowAny => Decision::Passthrough,
        }
    }

    /// Routes an HTTP request by its Host/authority for `port`, without an original
    /// destination (the explicit proxy). A port in the authority is ignored: `port` decides.
    pub fn route_http(&self, authority: &str, port: u16) -> Decision {
        let Ok((host, _)) = split_host_port(authority) else {
            return self.unmatched();
        };
        self.route_host(host, port)
    }

    /// Routes an intercepted HTTP request sent to `dst`: a service of undeclared protocol
    /// that owns `dst` exactly takes it whatever its Host, as Istio gives such a service
    /// its own sniffed listener and a route table of its one host; else [`Self::route_http`].
    pub fn route_http_to(&self, authority: &str, dst: IpAddr, port: u16) -> Decision {
        let conn = Connection {
            destination: Some(dst),
            port,
            application_protocols: SNIFFED_HTTP1,
            ..Connection::default()
        };
        let req = Request {
            authority,
            path: "/",
            method: "GET",
            scheme: "http",
            headers: &(),
        };
        self.route_request(&conn, &req).decision
    }

    /// Routes a bare hostname or IP literal on `port` (HTTP Host, CONNECT target).
    pub fn route_host(&self, host: &str, port: u16) -> Decision {
        self.by_name(host, port).unwrap_or_else(|| self.unmatched())
    }

    /// Routes opaque TCP by its original destination address and port.
    pub fn route_tcp(&self, ip: IpAddr, port: u16) -> Decision {
        self.route_connection(&Connection {
            destination: Some(ip),
            port,
            ..Connection::default()
        })
    }

    /// Routes by a name if it is registered on `port` (TLS SNI, CONNECT target), else by a
    /// destination address (the original destination, or the IP literal a client named),
    /// else by the outbound policy.
    pub fn route_name_or_address(
        &self,
        name: Option<&str>,
        address: Option<IpAddr>,
        port: u16,
    ) -> Decision {
        let found = |d: &Decision| matches!(d, Decision::Cluster(_));
        name.and_then(|n| self.by_name(n, port))
            .or_else(|| address.map(|ip| self.route_tcp(ip, port)).filter(found))
            .unwrap_or_else(|| self.unmatched())
    }

    /// Routes a TLS connection on `port` as Istio's listeners do: a service of the exact
    /// destination address first (its own listener), then the SNI among the port's TLS/HTTPS
    /// names without an exact address, then the destination as opaque TCP, then the
    /// outbound policy. Names of HTTP ports never match: TLS bytes on an HTTP port get no
    /// SNI route.
    pub fn route_tls(&self, sni: Option<&str>, dst: IpAddr, port: u16) -> Decision {
        self.route_connection(&Connection {
            destination: Some(dst),
            port,
            server_name: sni,
            tls: true,
            ..Connection::default()
        })
    }

    /// Whether `ip:port` belongs to a service whose port is opaque TCP, so that the
    /// connection must not be sniffed as HTTP: a TCP service of the address (or a range
    /// holding it), or a port-wide TCP service on a port where no HTTP is sniffed. What
    /// ends in the outbound policy's catch-all is no service's: it is sniffed, so that
    /// HTTP gets the policy's answer (the 502).
    pub fn is_tcp_destination(&self, ip: IpAddr, port: u16) -> bool {
        self.candidates(Some(ip), port).is_some_and(|c| {
            !c.needs_inspection()
                && matches!(
                    c.pick(&Connection {
                        destination: Some(ip),
                        port,
                        ..Connection::default()
                    })
                    .map(|c| &c.filter),
                    Some(ChainFilter::Tcp(t)) if !policy_catch_all(t)
                )
        })
    }

    /// Whether forwarding to `dst` under resolution NONE stays within `cluster`: the
    /// destination is one of its addresses or a current DNS answer for its host.
    pub fn owns_destination(cluster: &Cluster, dst: IpAddr) -> bool {
        let dst = canonical(dst);
        cluster
            .owned_destinations
            .as_ref()
            .is_none_or(|nets| nets.iter().any(|net| net.contains(&dst)))
    }

    /// The services' clusters: all but Istio's BlackHoleCluster and PassthroughCluster.
    pub fn services(&self) -> impl Iterator<Item = &Arc<Cluster>> {
        self.clusters.values().filter(|c| c.is_service())
    }

    /// The service clusters whose host covers `name` (lower case, no port): its own, and
    /// every wildcard host whose suffix ends it (`*.suffix` for each of the name's parent
    /// domains, and `*`; a wildcard is only ever written that way).
    pub(crate) fn services_covering<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = &'a Arc<Cluster>> + 'a {
        covering(name, |key| self.by_host.get(key)).flat_map(|named| named.iter())
    }

    /// Looks up a cluster by its Envoy name.
    pub fn cluster(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters.get(name)
    }
}

/// What `get` finds for `name` itself, then for each wildcard that covers it from the most
/// specific (`*.suffix` for each parent domain, then `*`), looked up only as far as the
/// caller reads.
fn covering<'a, T>(
    name: &'a str,
    mut get: impl FnMut(&str) -> Option<T> + 'a,
) -> impl Iterator<Item = T> + 'a {
    let mut key = String::with_capacity(name.len() + 1);
    let suffixes = name
        .match_indices('.')
        .map(|(i, _)| Some(i))
        .chain([Some(name.len())]);
    std::iter::once(None)
        .chain(suffixes)
        .filter_map(move |suffix| match suffix {
            None => get(name),
            Some(i) => {
                key.clear();
                key.push('*');
                key.push_str(&name[i..]);
                get(&key)
            }
        })
}

/// Whether a TCP chain ends in the outbound policy's answer (BlackHoleCluster or an
/// unguarded PassthroughCluster) rather than in a service.
fn policy_catch_all(t: &Target) -> bool {
    matches!(t.decide(), Decision::BlackHole | Decision::Passthrough)
}

/// IPv4-mapped IPv6 addresses are the IPv4 address they carry.
pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}
