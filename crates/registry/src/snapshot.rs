//! The immutable routing snapshot and its lookups.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use portcullis_balance::{Balancer, EndpointState};
use portcullis_model::{OutboundMode, Resolution};

use crate::Map;
use crate::host::{Normalized, normalized, split_host_port};
use crate::listener::{Candidates, Chain, ChainFilter, Connection, Listeners};
use crate::route::{DirectResponse, HttpRoute, Request};

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
    /// Live counters, carried over across reloads for the same cluster and address.
    pub state: Arc<EndpointState>,
    /// Why the endpoint must not get a plaintext connection (it needs a TLS transport
    /// portcullis does not originate), if it must not.
    pub transport_error: Option<Arc<str>>,
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
    /// Endpoints, in the order the balancer indexes them.
    pub endpoints: Vec<Endpoint>,
    /// Picks endpoints.
    pub balancer: Balancer,
}

impl Cluster {
    /// Picks an endpoint; `None` when the cluster has none.
    pub fn pick(&self) -> Option<&Endpoint> {
        self.balancer.pick().and_then(|i| self.endpoints.get(i))
    }

    /// Picks an endpoint other than those already tried, for a retry.
    pub fn pick_excluding(&self, tried: &[usize]) -> Option<(usize, &Endpoint)> {
        let i = self.balancer.pick_excluding(tried)?;
        self.endpoints.get(i).map(|e| (i, e))
    }
}

/// What the data path does with a connection or request.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Send to this registered cluster.
    Cluster(Arc<Cluster>),
    /// A registered in-cluster pod reached by its own IP: forward to it.
    Pod(IpAddr),
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
            Decision::Pod(_) | Decision::Passthrough => PASSTHROUGH_CLUSTER,
            Decision::BlackHole => BLACKHOLE_CLUSTER,
            Decision::NoCluster(name) => name,
            Decision::Direct(_) | Decision::NoRoute | Decision::NoFilterChain => "-",
        }
    }
}

/// Hosts registered on one port.
#[derive(Debug, Default)]
pub(crate) struct HostTable {
    pub(crate) exact: Map<Box<str>, Arc<Cluster>>,
    pub(crate) wildcard: Wildcards,
    pub(crate) any: Option<Arc<Cluster>>,
}

impl HostTable {
    /// Registers `cluster` for `host` (exact, `*.` wildcard or `*`) unless a cluster holds
    /// it already; returns that one then.
    pub(crate) fn claim(&mut self, host: &str, cluster: &Arc<Cluster>) -> Option<&Arc<Cluster>> {
        if host == "*" {
            if self.any.is_none() {
                self.any = Some(Arc::clone(cluster));
                return None;
            }
            return self.any.as_ref();
        }
        if let Some(suffix) = host.strip_prefix('*') {
            if self.wildcard.get(suffix).is_none() {
                self.wildcard.insert(suffix, Arc::clone(cluster));
                return None;
            }
            return self.wildcard.get(suffix);
        }
        if !self.exact.contains_key(host) {
            self.exact.insert(host.into(), Arc::clone(cluster));
            return None;
        }
        self.exact.get(host)
    }

    fn get(&self, host: &Normalized) -> Option<&Arc<Cluster>> {
        if let Some(c) = self.exact.get(&*host.text) {
            return Some(c);
        }
        self.wildcard
            .longest_match(&host.text, host.dots)
            .or(self.any.as_ref())
    }
}

/// The `*.` wildcard names of one table (hosts on a port, SNI names of filter chains).
#[derive(Debug)]
pub(crate) struct Wildcards<T = Arc<Cluster>> {
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

/// Addresses registered on one port for opaque TCP.
#[derive(Debug, Default)]
pub(crate) struct AddressTable {
    pub(crate) exact: Map<IpAddr, Arc<Cluster>>,
    /// Ranges by prefix length, longest first: one hash lookup per distinct length, so the
    /// cost does not grow with the number of ranges.
    pub(crate) cidrs: Vec<(u8, Map<IpNet, Arc<Cluster>>)>,
    /// A service that claims the whole port (TCP port, no addresses).
    pub(crate) any: Option<Arc<Cluster>>,
    /// Whether HTTP is sniffed on the port's wildcard listener (an HTTP service, or one of
    /// undeclared protocol without an exact address, is on it): then [`Self::any`] takes
    /// only what is not HTTP.
    pub(crate) sniffed: bool,
}

impl AddressTable {
    fn get(&self, ip: IpAddr) -> Option<&Arc<Cluster>> {
        self.by_address(ip).or(self.any.as_ref())
    }

    /// The service registered for `ip` itself or a range holding it, not the port-wide one.
    fn by_address(&self, ip: IpAddr) -> Option<&Arc<Cluster>> {
        if let Some(c) = self.exact.get(&ip) {
            return Some(c);
        }
        for (len, nets) in &self.cidrs {
            let net = match IpNet::new(ip, *len) {
                Ok(net) => net.trunc(),
                // A length that does not fit this address family.
                Err(_) => continue,
            };
            if let Some(c) = nets.get(&net) {
                return Some(c);
            }
        }
        None
    }
}

/// One immutable version of the registry. Built off the data path, swapped in whole.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Monotonic version, for logs and the admin server.
    pub version: u64,
    /// Outbound traffic policy in force.
    pub mode: Option<OutboundMode>,
    /// Every cluster, sorted by name.
    pub clusters: Vec<Arc<Cluster>>,
    /// Warnings found while compiling (conflicts, unsupported features).
    pub warnings: Vec<String>,
    /// Hostnames the registry needs resolved: DNS endpoints and resolution-NONE hosts.
    pub dns_names: std::collections::BTreeSet<String>,
    pub(crate) hosts: Map<u16, HostTable>,
    /// Names of TLS/HTTPS ports, the only ones a ClientHello's SNI is matched against.
    pub(crate) sni: Map<u16, HostTable>,
    pub(crate) addresses: Map<u16, AddressTable>,
    pub(crate) pods: HashSet<IpAddr>,
    /// The listeners of a snapshot indexed from Envoy's model ([`Snapshot::index`]): when
    /// present, every lookup goes through them and the tables above are empty.
    pub(crate) listeners: Option<Listeners>,
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
            let decision = match conn.destination {
                Some(dst) => self.route_http_to(req.authority, dst, conn.port),
                None => self.route_http(req.authority, conn.port),
            };
            return HttpRoute {
                decision,
                route: None,
            };
        }
        match self.filter_chain(conn).map(|c| &c.filter) {
            None => HttpRoute {
                decision: Decision::NoFilterChain,
                route: None,
            },
            Some(ChainFilter::Http(h)) => match &h.routes {
                Some(table) => table.route(req),
                None => HttpRoute::none(),
            },
            // The chain has changed under a connection served as HTTP: its requests go
            // where its bytes would.
            Some(ChainFilter::Tcp(t)) => HttpRoute {
                decision: t.decide(),
                route: None,
            },
        }
    }

    /// The decision of a connection described by `conn` carried as bytes (TCP, TLS): its
    /// filter chain's clusters. A chain of HTTP routes takes no opaque bytes: the outbound
    /// policy's.
    pub fn route_connection(&self, conn: &Connection<'_>) -> Decision {
        if self.listeners.is_none() {
            let Some(dst) = conn.destination else {
                return self.unmatched();
            };
            return match conn.tls {
                true => self.route_tls(conn.server_name, dst, conn.port),
                false => self.route_tcp(dst, conn.port),
            };
        }
        match self.filter_chain(conn).map(|c| &c.filter) {
            None => Decision::NoFilterChain,
            Some(ChainFilter::Tcp(t)) => t.decide(),
            Some(ChainFilter::Http(_)) => self.unmatched(),
        }
    }

    /// Whether a connection described by `conn`, sniffed as HTTP, is served as HTTP: its
    /// filter chain is an HTTP connection manager (always, for a snapshot built from files
    /// without listeners).
    pub fn serves_http(&self, conn: &Connection<'_>) -> bool {
        self.listeners.is_none()
            || matches!(
                self.filter_chain(conn).map(|c| &c.filter),
                Some(ChainFilter::Http(_))
            )
    }

    /// The decision for an authority on `port` without an original destination (the
    /// explicit proxy): the port's HTTP routes for it as a Host, or its filter chain for its
    /// host as SNI; `None` when neither registers it.
    fn by_name(&self, authority: &str, port: u16) -> Option<Decision> {
        let candidates = self.candidates(None, port)?;
        let http = Connection {
            port,
            application_protocols: SNIFFED_HTTP1,
            ..Connection::default()
        };
        let decision = match candidates.pick(&http).map(|c| &c.filter) {
            Some(ChainFilter::Http(h)) => {
                let req = Request {
                    authority,
                    path: "/",
                    method: "GET",
                    scheme: "http",
                    headers: &(),
                };
                let table = h.routes.as_ref()?;
                table.matching(&req).map(|r| r.decide(&req))
            }
            _ => {
                let (name, _) = split_host_port(authority).ok()?;
                let tls = Connection {
                    port,
                    server_name: Some(name),
                    tls: true,
                    ..Connection::default()
                };
                match candidates.pick(&tls).map(|c| &c.filter) {
                    Some(ChainFilter::Tcp(t)) => Some(t.decide()),
                    _ => None,
                }
            }
        };
        decision.filter(|d| matches!(d, Decision::Cluster(_) | Decision::Pod(_)))
    }
}

impl Snapshot {
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

    /// Routes an HTTP request by its Host/authority as received on `port`.
    ///
    /// A port in the authority is ignored: the route table of the port the request arrived
    /// on decides, as Istio's (`ignore_port_in_host_matching`).
    pub fn route_http(&self, authority: &str, port: u16) -> Decision {
        if self.listeners.is_some() {
            return self
                .by_name(authority, port)
                .unwrap_or_else(|| self.unmatched());
        }
        // Most authorities carry no port, and then the whole is the host: normalising it
        // first saves looking for a colon. Whatever `normalized` accepts has no colon, or
        // is an IPv6 literal that `split_host_port` leaves whole too. Anything ending in a
        // digit may have a port, and goes the long way.
        if !authority.ends_with(|c: char| c.is_ascii_digit())
            && let Ok(host) = normalized(authority)
        {
            return self.route_normalized(&host, port);
        }
        let Ok((host, _)) = split_host_port(authority) else {
            return self.unmatched();
        };
        self.route_host(host, port)
    }

    /// Routes an intercepted HTTP request sent to `dst`: a service of undeclared protocol
    /// that owns `dst` exactly takes it whatever its Host, as Istio gives such a service
    /// its own sniffed listener and a route table of its one host; else [`Self::route_http`].
    pub fn route_http_to(&self, authority: &str, dst: IpAddr, port: u16) -> Decision {
        if self.listeners.is_some() {
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
            return self.route_request(&conn, &req).decision;
        }
        if let Some(c) = self
            .addresses
            .get(&port)
            .and_then(|t| t.exact.get(&canonical(dst)))
            .filter(|c| c.protocol == Protocol::Auto)
        {
            return Decision::Cluster(Arc::clone(c));
        }
        self.route_http(authority, port)
    }

    /// Routes a bare hostname or IP literal on `port` (HTTP Host, CONNECT target).
    pub fn route_host(&self, host: &str, port: u16) -> Decision {
        if self.listeners.is_some() {
            return self.by_name(host, port).unwrap_or_else(|| self.unmatched());
        }
        match normalized(host) {
            Ok(host) => self.route_normalized(&host, port),
            Err(_) => self.unmatched(),
        }
    }

    // Inlined into both entry points, as `normalized` is.
    #[inline(always)]
    fn route_normalized(&self, host: &Normalized, port: u16) -> Decision {
        if let Some(c) = self.hosts.get(&port).and_then(|t| t.get(host)) {
            return Decision::Cluster(Arc::clone(c));
        }
        // `normalized` gives IP literals in canonical form already.
        if let Some(ip) = host.ip
            && self.pods.contains(&ip)
        {
            return Decision::Pod(ip);
        }
        self.unmatched()
    }

    /// Routes opaque TCP by its original destination address and port.
    pub fn route_tcp(&self, ip: IpAddr, port: u16) -> Decision {
        if self.listeners.is_some() {
            return self.route_connection(&Connection {
                destination: Some(ip),
                port,
                ..Connection::default()
            });
        }
        let ip = canonical(ip);
        if let Some(c) = self.addresses.get(&port).and_then(|t| t.get(ip)) {
            return Decision::Cluster(Arc::clone(c));
        }
        if self.pods.contains(&ip) {
            return Decision::Pod(ip);
        }
        self.unmatched()
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
        let found = |d: &Decision| matches!(d, Decision::Cluster(_) | Decision::Pod(_));
        if self.listeners.is_some() {
            return name
                .and_then(|n| self.by_name(n, port))
                .or_else(|| address.map(|ip| self.route_tcp(ip, port)).filter(found))
                .unwrap_or_else(|| self.unmatched());
        }
        if let Some(name) = name {
            let by_name = self.route_host(name, port);
            if found(&by_name) {
                return by_name;
            }
        }
        if let Some(ip) = address {
            let by_address = self.route_tcp(ip, port);
            if found(&by_address) {
                return by_address;
            }
        }
        self.unmatched()
    }

    /// Routes a TLS connection on `port` as Istio's listeners do: a service of the exact
    /// destination address first (its own listener), then the SNI among the port's TLS/HTTPS
    /// names without an exact address, then the destination as opaque TCP, then the
    /// outbound policy. Names of HTTP ports never match: TLS bytes on an HTTP port get no
    /// SNI route.
    pub fn route_tls(&self, sni: Option<&str>, dst: IpAddr, port: u16) -> Decision {
        if self.listeners.is_some() {
            return self.route_connection(&Connection {
                destination: Some(dst),
                port,
                server_name: sni,
                tls: true,
                ..Connection::default()
            });
        }
        let dst = canonical(dst);
        if let Some(c) = self.addresses.get(&port).and_then(|t| t.exact.get(&dst)) {
            return Decision::Cluster(Arc::clone(c));
        }
        if let Some(table) = self.sni.get(&port)
            && let Some(name) = sni
            && let Ok(name) = normalized(name)
            && let Some(c) = table.get(&name)
        {
            return Decision::Cluster(Arc::clone(c));
        }
        self.route_tcp(dst, port)
    }

    /// Whether `ip:port` belongs to a service whose port is opaque TCP, so that the
    /// connection must not be sniffed as HTTP: a TCP service of the address (or a range
    /// holding it), or a port-wide TCP service on a port where no HTTP is sniffed.
    pub fn is_tcp_destination(&self, ip: IpAddr, port: u16) -> bool {
        if self.listeners.is_some() {
            return self.candidates(Some(ip), port).is_some_and(|c| {
                !c.needs_inspection()
                    && matches!(
                        c.pick(&Connection {
                            destination: Some(ip),
                            port,
                            ..Connection::default()
                        })
                        .map(|c| &c.filter),
                        Some(ChainFilter::Tcp(_))
                    )
            });
        }
        let Some(table) = self.addresses.get(&port) else {
            return false;
        };
        match table.by_address(canonical(ip)) {
            Some(c) => c.protocol == Protocol::Tcp,
            None => {
                !table.sniffed
                    && table
                        .any
                        .as_ref()
                        .is_some_and(|c| c.protocol == Protocol::Tcp)
            }
        }
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

    /// Looks up a cluster by its Envoy name.
    pub fn cluster(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters
            .binary_search_by(|c| (*c.name).cmp(name))
            .ok()
            .map(|i| &self.clusters[i])
    }
}

/// IPv4-mapped IPv6 addresses are the IPv4 address they carry.
pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}
