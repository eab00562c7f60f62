//! The decisions of [`Builder`] expressed as Envoy's model, shaped as istiod shapes a
//! sidecar's outbound side (`pilot/pkg/networking/core`): `virtualOutbound` on 15001 with
//! its catch-all, a `0.0.0.0_PORT` listener for each port that has HTTP, sniffed, CIDR, SNI
//! or port-wide services, an `IP_PORT` listener for each exact address of an opaque
//! service, route tables named by port, and `outbound|PORT||HOST` clusters.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use ipnet::IpNet;
use portcullis_envoy::{
    BLACKHOLE_CLUSTER, Cluster, ClusterLoadAssignment, ClusterSpecifier, Discovery,
    EndpointAddress as Address, FilterChain, FilterChainMatch, Forward, HealthStatus,
    HttpConnectionManager, LbEndpoint, LbPolicy, Listener, Locality, NetworkFilter, OriginalDst,
    PASSTHROUGH_CLUSTER, Resources, RetryPolicy, Route, RouteAction, RouteConfiguration,
    RouteMatch, RouteSource, TcpProxy, Thresholds, UpstreamProtocol, UpstreamTransport,
    VIRTUAL_OUTBOUND, VirtualHost,
};
use portcullis_model::{
    ConnectionPoolSettings, H2UpgradePolicy, LocalityLbSetting, OutboundMode, Resolution,
};

use super::locality;
use super::virtual_service::SubnetRoute;
use super::{
    AddressKey, BuildOptions, Builder, DnsAnswers, EndpointAddress, PendingAddress, PendingCluster,
    TcpProxyTimeouts, Traffic, conflict,
};
use crate::Map;
use crate::snapshot::Protocol;

/// Istio's route table for explicit proxying (`RDS_HTTP_PROXY`): every service on every
/// port, by `host:port`. No listener of a sidecar names it unless its Sidecar asks for an
/// HTTP proxy port; portcullis's `--http-proxy` and CONNECT route through it.
pub const HTTP_PROXY_ROUTES: &str = "http_proxy";

/// The port `virtualOutbound` listens on (Istio's `proxyListenPort`).
pub const OUTBOUND_PORT: u16 = 15001;

/// Istio's name of a listener's fallback chain when no service takes the whole port.
const PASSTHROUGH_FILTER_CHAIN: &str = "PassthroughFilterChain";

/// The application protocols the HTTP inspector reports for plaintext HTTP, as Istio
/// matches them on a sniffed listener.
const PLAINTEXT_HTTP: [&str; 3] = ["http/1.0", "http/1.1", "h2c"];

/// Istio's `connectTimeout` default.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Envoy's `tcp_proxy` idle timeout default, which Istio keeps.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// The model compiled from files, with what compiling found beside it.
#[derive(Debug, Default)]
pub struct Compiled {
    /// Listeners, routes and clusters as istiod would send them to this sidecar.
    pub resources: Resources,
    /// Conflicts and unsupported features, for logs and `/config_dump`.
    pub warnings: Vec<String>,
    /// Names whose DNS answers the result depends on: DNS endpoints and the hosts of
    /// resolution NONE services, whose answers are allowed destinations.
    pub dns_names: BTreeSet<String>,
    /// The mesh config's enforcement mode, if it sets one.
    pub enforcement: Option<crate::Enforcement>,
    /// The names of TLS and TCP ports, which Istio's `http_proxy` table leaves out, with
    /// the cluster each routes to: what a CONNECT to such a name finds.
    pub opaque_names: crate::OpaqueNames,
}

/// Compiles `resources` into Envoy's model as istiod compiles them for this sidecar's
/// outbound side. `dns` gives the current answers for resolution NONE hosts, which become
/// the destinations their clusters may forward to.
pub fn compile(
    resources: &[portcullis_model::Resource],
    options: &BuildOptions,
    dns: DnsAnswers<'_>,
) -> Compiled {
    let mut b = Builder::new(resources, options);
    b.decide();
    let mut compiled = b.compile(dns);
    compiled.enforcement = super::mesh_enforcement(resources, &mut compiled.warnings);
    compiled
}

/// The ports of each service host, which a destination without a port is inferred from.
fn service_ports(pending: &Map<Arc<str>, PendingCluster>) -> BTreeMap<String, Vec<u16>> {
    let mut ports: BTreeMap<String, Vec<u16>> = BTreeMap::new();
    for c in pending.values() {
        let list = ports.entry(c.host.to_string()).or_default();
        list.push(c.port);
        list.sort_unstable();
        list.dedup();
    }
    ports
}

/// What auto mutual TLS needs of a service port's workloads.
struct Peers<'a> {
    /// istiod's `ServiceAccounts` of the service: its workloads' identities (over all its
    /// ports), a ServiceEntry's `subjectAltNames` or a Kubernetes Service's account
    /// annotations, with the trust domain aliases, sorted.
    accounts: &'a [String],
    /// Every endpoint of the port has a sidecar (a TLS mode other than `disabled`), and
    /// there is one: istiod's inference for passthrough clusters.
    sidecars: bool,
}

/// The accounts of each service host (see [`Peers::accounts`]), each SPIFFE identity also
/// in each of the mesh's trust domain `aliases`.
fn service_accounts(
    pending: &Map<Arc<str>, PendingCluster>,
    aliases: &[String],
) -> Map<Arc<str>, Vec<String>> {
    let mut accounts: Map<Arc<str>, BTreeSet<String>> = Map::default();
    for c in pending.values() {
        let set = accounts.entry(Arc::clone(&c.host)).or_default();
        set.extend(c.service_accounts.iter().cloned());
        set.extend(
            c.endpoints
                .iter()
                .filter_map(|e| e.peer.identity.as_deref())
                .map(str::to_owned),
        );
    }
    accounts
        .into_iter()
        .map(|(host, set)| (host, super::with_trust_domain_aliases(set, aliases)))
        .collect()
}

/// Whether HTTP to a cluster's port is routed by its route table.
fn routed_by_host(protocol: Protocol) -> bool {
    matches!(protocol, Protocol::Http | Protocol::Http2 | Protocol::Auto)
}

/// What one `0.0.0.0_PORT` listener holds, gathered before it is written.
#[derive(Default)]
struct PortListener {
    /// Its route table `PORT` takes HTTP (an HTTP service, or a sniffed one, is here).
    http: bool,
    /// Ranges owned by opaque services, and whether the owner is sniffed (then HTTP to the
    /// range still goes to the route table).
    ranges: Vec<(IpNet, Arc<str>, bool)>,
    /// TLS services matched by SNI (or a VirtualService's TLS routes for them), and the
    /// names. A TLS service's range is a chain of its own among [`Self::ranges`]: either
    /// the name or the range takes a connection.
    sni: Vec<(ClusterSpecifier, Vec<String>)>,
    /// Chains VirtualServices' TCP routes add for destination ranges.
    subnets: Vec<SubnetRoute>,
    /// The service that takes the whole port.
    any: Option<Arc<str>>,
}

/// Per port: names and the cluster each routes to, in claim order.
type NameClaims = BTreeMap<u16, Vec<(Box<str>, Arc<str>)>>;

/// Who owns what on each port, once conflicts are settled as istiod settles them.
#[derive(Default)]
struct Claims {
    /// Per port: each name and the cluster it routes to, in claim order.
    hosts: NameClaims,
    /// Per port: each SNI name and the TLS cluster it routes to, in claim order.
    sni: NameClaims,
    /// Per port: exact addresses and their cluster.
    exact: BTreeMap<u16, BTreeMap<IpAddr, Arc<str>>>,
    /// Per port: ranges and their cluster.
    ranges: BTreeMap<u16, BTreeMap<IpNet, Arc<str>>>,
    /// Per port: the cluster that takes the whole port.
    any: BTreeMap<u16, Arc<str>>,
}

impl Builder<'_> {
    /// Writes the decisions as Envoy resources.
    fn compile(mut self, dns: DnsAnswers<'_>) -> Compiled {
        let mode = self.mode().unwrap_or(OutboundMode::RegistryOnly);
        let claims = self.settle_claims();
        let mut out = Compiled::default();
        let pending = std::mem::take(&mut self.clusters);
        let ports = service_ports(&pending);
        let vs_routes = self.virtual_service_routes(&pending, &ports);
        let pods: Vec<IpAddr> = self
            .pods
            .iter()
            .flat_map(|p| p.ips.iter().copied())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        // Under REGISTRY_ONLY, portcullis's registered pods are reachable by IP: Istio has
        // no such route, so they get chains and domains of their own to PassthroughCluster,
        // guarded to the pods.
        let reachable_pods: &[IpAddr] = match mode {
            OutboundMode::RegistryOnly => &pods,
            OutboundMode::AllowAny => &[],
        };
        for c in [blackhole_cluster(), passthrough_cluster(mode, &pods)] {
            out.resources.clusters.insert(c.name.clone(), Arc::new(c));
        }
        let mut listeners: BTreeMap<u16, PortListener> = BTreeMap::new();
        for port in &self.sniffed_ports {
            listeners.entry(*port).or_default().http = true;
        }
        for (port, ranges) in &claims.ranges {
            for (net, cluster) in ranges {
                let sniffed = pending
                    .get(cluster)
                    .is_some_and(|c| c.protocol == Protocol::Auto);
                listeners.entry(*port).or_default().ranges.push((
                    *net,
                    Arc::clone(cluster),
                    sniffed,
                ));
            }
        }
        for (port, names) in &claims.sni {
            let mut by_cluster: BTreeMap<&Arc<str>, Vec<String>> = BTreeMap::new();
            for (name, cluster) in names {
                if &**name != "*" {
                    by_cluster
                        .entry(cluster)
                        .or_default()
                        .push(name.to_string());
                }
            }
            for (cluster, names) in by_cluster {
                let routes = pending
                    .get(cluster)
                    .and_then(|c| self.tls_routes(&c.host, c.port, &ports));
                let l = listeners.entry(*port).or_default();
                match routes {
                    Some(routes) => l
                        .sni
                        .extend(routes.into_iter().map(|r| (r.target, r.server_names))),
                    None => l
                        .sni
                        .push((ClusterSpecifier::Cluster(cluster.to_string()), names)),
                }
            }
        }
        // TCP services' VirtualService routes: the first without subnets takes the
        // service's own chains, those with subnets get chains of their own.
        let mut tcp_targets: Map<Arc<str>, ClusterSpecifier> = Map::default();
        for c in pending.values() {
            if !matches!(c.protocol, Protocol::Tcp | Protocol::Auto) {
                continue;
            }
            for route in self.tcp_routes(&c.host, c.port, &ports) {
                if route.subnets.is_empty() {
                    tcp_targets.insert(Arc::clone(&c.name), route.target);
                } else {
                    listeners.entry(c.port).or_default().subnets.push(route);
                }
            }
        }
        for (port, cluster) in &claims.any {
            listeners.entry(*port).or_default().any = Some(Arc::clone(cluster));
        }
        let catch_all = match mode {
            OutboundMode::RegistryOnly => BLACKHOLE_CLUSTER,
            OutboundMode::AllowAny => PASSTHROUGH_CLUSTER,
        };
        out.resources.listeners.insert(
            VIRTUAL_OUTBOUND.to_string(),
            Arc::new(virtual_outbound(catch_all, reachable_pods)),
        );
        for (port, l) in &listeners {
            let listener = port_listener(*port, l, catch_all, reachable_pods, &tcp_targets);
            out.resources
                .listeners
                .insert(listener.name.clone(), Arc::new(listener));
            if l.http {
                let routes =
                    port_routes(*port, &claims, &pending, &vs_routes, mode, reachable_pods);
                out.resources
                    .routes
                    .insert(routes.name.clone(), Arc::new(routes));
            }
        }
        out.opaque_names = opaque_names(&claims, &pending);
        let proxy_routes = http_proxy_routes(&claims, &pending, &vs_routes, mode, reachable_pods);
        out.resources
            .routes
            .insert(proxy_routes.name.clone(), Arc::new(proxy_routes));
        for (port, exact) in &claims.exact {
            for (ip, cluster) in exact {
                let Some(c) = pending.get(cluster) else {
                    continue;
                };
                if !matches!(c.protocol, Protocol::Tcp | Protocol::Tls | Protocol::Auto) {
                    continue;
                }
                let (mut listener, table) =
                    address_listener(*ip, *port, c, &vs_routes, &tcp_targets);
                // A TLS service's address with TLS routes: a chain per SNI match, as
                // istiod builds them; other names find no chain.
                if c.protocol == Protocol::Tls
                    && let Some(routes) = self.tls_routes(&c.host, c.port, &ports)
                {
                    listener.filter_chains = routes
                        .into_iter()
                        .map(|r| {
                            let sni = FilterChainMatch {
                                server_names: r.server_names,
                                ..FilterChainMatch::default()
                            };
                            chain("", sni, tcp_proxy_to(r.target))
                        })
                        .collect();
                    listener.listener_filters = inspectors(&listener.filter_chains);
                }
                out.resources
                    .listeners
                    .insert(listener.name.clone(), Arc::new(listener));
                if let Some(table) = table {
                    out.resources
                        .routes
                        .insert(table.name.clone(), Arc::new(table));
                }
            }
        }
        let mut tcp_timeouts: Map<String, TcpProxyTimeouts> = Map::default();
        let accounts = service_accounts(&pending, self.trust_domain_aliases());
        for (name, p) in pending {
            let peers = Peers {
                accounts: accounts.get(&p.host).map_or(&[][..], Vec::as_slice),
                sidecars: !p.endpoints.is_empty()
                    && p.endpoints.iter().all(|e| e.peer.tls_mode.is_some()),
            };
            let timeouts = self.tcp_proxy_timeouts(&p.host);
            if let Some(t) = timeouts {
                tcp_timeouts.insert(name.to_string(), t);
            }
            // Each subset of the host's DestinationRule is a cluster of its own,
            // `outbound|PORT|SUBSET|HOST`, of the endpoints its labels select.
            for (subset, traffic) in self.subsets_for(&p.host, p.port) {
                let subset_name = format!("outbound|{}|{}|{}", p.port, subset.name, p.host);
                if let Some(t) = timeouts {
                    tcp_timeouts.insert(subset_name.clone(), t);
                }
                let endpoints = p
                    .endpoints
                    .iter()
                    .filter(|e| super::labels_match(&subset.labels, &e.labels))
                    .cloned()
                    .collect();
                let pending_subset = PendingCluster {
                    name: subset_name.as_str().into(),
                    host: Arc::clone(&p.host),
                    port: p.port,
                    protocol: p.protocol,
                    resolution: p.resolution,
                    passthrough_port: p.passthrough_port,
                    source: Arc::clone(&p.source),
                    addresses: p.addresses.clone(),
                    endpoints,
                    service_accounts: p.service_accounts.clone(),
                    service_entry: p.service_entry,
                    mesh_external: p.mesh_external,
                    namespace: Arc::clone(&p.namespace),
                };
                let cluster = self.traffic_cluster(
                    pending_subset,
                    (Some(&subset.name), &traffic, &peers),
                    dns,
                    &mut out.dns_names,
                );
                out.resources
                    .clusters
                    .insert(subset_name, Arc::new(cluster));
            }
            let traffic = self.traffic_for(&p.host, p.port);
            let cluster =
                self.traffic_cluster(p, (None, &traffic, &peers), dns, &mut out.dns_names);
            out.resources
                .clusters
                .insert(name.to_string(), Arc::new(cluster));
        }
        if !tcp_timeouts.is_empty() {
            let names: Vec<String> = out.resources.listeners.keys().cloned().collect();
            for name in names {
                if let Some(listener) = out.resources.listeners.get_mut(&name) {
                    apply_tcp_proxy_timeouts(Arc::make_mut(listener), &tcp_timeouts);
                }
            }
        }
        out.warnings = self.warnings;
        out.warnings.extend(self.vs_warnings);
        out
    }

    /// The cluster of `p` (of `subset`, if any) under a DestinationRule's `traffic`, TLS
    /// origination included: TLS that cannot be set up leaves the endpoints without a
    /// connection, never plaintext. Without DestinationRule TLS, istiod's auto mutual TLS
    /// (`buildUpstreamTLSSettings`): Istio mutual TLS to the endpoints whose workloads have
    /// sidecars, plaintext to the others; for an ORIGINAL_DST cluster, mutual TLS only when
    /// every endpoint has one. Never for a `MESH_EXTERNAL` ServiceEntry.
    fn traffic_cluster(
        &mut self,
        p: PendingCluster,
        (subset, traffic, peers): (Option<&str>, &Traffic<'_>, &Peers<'_>),
        dns: DnsAnswers<'_>,
        dns_names: &mut BTreeSet<String>,
    ) -> Cluster {
        let (name, host, port, protocol) =
            (Arc::clone(&p.name), Arc::clone(&p.host), p.port, p.protocol);
        let mesh_external = p.mesh_external;
        let plaintext_peers = self.plaintext_namespace(&p.namespace);
        // istiod's `SubjectAltNames` fallback: the service's accounts for ISTIO_MUTUAL, and
        // for SIMPLE and MUTUAL those of a ServiceEntry only.
        let simple_sans = if p.service_entry { peers.accounts } else { &[] };
        let mut cluster = service_cluster(p, traffic, self.options, dns, dns_names);
        if self.h2_upgrade(protocol, traffic.pool) {
            cluster.upstream_protocol = UpstreamProtocol::Http2;
        }
        if cluster.upstream_protocol != UpstreamProtocol::Http2 {
            cluster.connection_limits.max_concurrent_streams = None;
        }
        // istiod's `isHttp2Cluster`: ALPN offers `h2` to clusters that speak HTTP/2 upstream.
        let wire = if cluster.upstream_protocol == UpstreamProtocol::Http2 {
            Protocol::Http2
        } else {
            protocol
        };
        let original_dst = matches!(cluster.discovery, Discovery::OriginalDst(_));
        match traffic.tls {
            Some(rule) => {
                let sans = super::tls::ServiceSans {
                    istio_mutual: peers.accounts,
                    simple: simple_sans,
                };
                cluster.transport = super::tls::transport(rule, (&host, port, wire), sans, &self.secrets)
                    .unwrap_or_else(|why| {
                        self.warnings.push(format!(
                            "cluster {name}: DestinationRule tls cannot be applied ({why}); its endpoints get no connection",
                        ));
                        UpstreamTransport::Unsupported(format!("envoy.transport_sockets.tls ({why})"))
                    });
            }
            None if self.auto_mtls()
                && !mesh_external
                && !plaintext_peers
                && (!original_dst || peers.sidecars) =>
            {
                let sni = super::tls::istio_sni(port, subset, &host);
                let mutual = super::tls::istio_mutual(sni, wire, peers.accounts);
                if original_dst {
                    cluster.transport = mutual;
                } else {
                    cluster.transport_socket_matches = super::tls::auto_mtls_matches(mutual);
                }
            }
            None => {}
        }
        cluster
    }

    /// istiod's `shouldH2Upgrade`: the connection pool's `h2UpgradePolicy` decides unless it
    /// is `DEFAULT` (`useClientProtocol` wins over both), else the mesh's, for HTTP services
    /// only (a sniffed port keeps the client's protocol).
    fn h2_upgrade(&self, protocol: Protocol, pool: Option<&ConnectionPoolSettings>) -> bool {
        if let Some(http) = pool.and_then(|p| p.http.as_ref()) {
            if http.use_client_protocol == Some(true) {
                return false;
            }
            match http.h2_upgrade_policy {
                Some(H2UpgradePolicy::Upgrade) => return true,
                Some(H2UpgradePolicy::DoNotUpgrade) => return false,
                Some(H2UpgradePolicy::Default) | None => {}
            }
        }
        matches!(protocol, Protocol::Http | Protocol::Http2)
            && self
                .mesh
                .and_then(|m| m.spec.h2_upgrade_policy)
                .is_some_and(|p| p == H2UpgradePolicy::Upgrade)
    }

    /// The routes of each HTTP service's virtual host that differ from istiod's plain
    /// default, by its cluster: a VirtualService's, or the default route with the hash
    /// policy of the service's DestinationRule.
    fn virtual_service_routes(
        &mut self,
        pending: &Map<Arc<str>, PendingCluster>,
        ports: &BTreeMap<String, Vec<u16>>,
    ) -> Map<Arc<str>, Vec<Route>> {
        self.unmatched_virtual_service_hosts(ports);
        let mut routes = Map::default();
        for c in pending.values() {
            if !routed_by_host(c.protocol) {
                continue;
            }
            let list = self
                .virtual_service_for(&c.host, c.port)
                .and_then(|vs| self.http_routes(vs, c.port, ports));
            let list = list.or_else(|| {
                let hash = self.hash_for(&c.host, "", c.port)?;
                let mut spec = forward_spec(&c.name);
                spec.hash_policy.push(hash);
                Some(vec![route("default", RouteAction::Forward(Arc::new(spec)))])
            });
            if let Some(list) = list {
                routes.insert(Arc::clone(&c.name), list);
            }
        }
        routes
    }

    /// Settles who owns each name, range and address on each port: names by claim order,
    /// addresses by the oldest service, as istiod builds listeners in creation order.
    fn settle_claims(&mut self) -> Claims {
        let mut claims = Claims::default();
        let mut hosts: Map<(u16, Box<str>), Arc<str>> = Map::default();
        let mut sni: Map<(u16, Box<str>), Arc<str>> = Map::default();
        let source = |name: &Arc<str>| -> Arc<str> {
            self.clusters
                .get(name)
                .map_or_else(|| Arc::from(""), |c| Arc::clone(&c.source))
        };
        let mut warnings = Vec::new();
        for (port, host, cluster, by_sni) in std::mem::take(&mut self.hosts_pending) {
            match hosts.get(&(port, host.clone())) {
                Some(kept) => conflict(
                    &mut warnings,
                    || format!("host {host}"),
                    port,
                    (kept, &source(kept)),
                    (&cluster, &source(&cluster)),
                ),
                None => {
                    hosts.insert((port, host.clone()), Arc::clone(&cluster));
                    claims
                        .hosts
                        .entry(port)
                        .or_default()
                        .push((host.clone(), Arc::clone(&cluster)));
                }
            }
            // Conflicts are reported once, by the names above.
            if by_sni && !sni.contains_key(&(port, host.clone())) {
                sni.insert((port, host.clone()), Arc::clone(&cluster));
                claims.sni.entry(port).or_default().push((host, cluster));
            }
        }
        let mut pending = std::mem::take(&mut self.addresses_pending);
        pending.sort_by(|a, b| a.age.cmp(&b.age));
        for PendingAddress {
            port, key, cluster, ..
        } in pending
        {
            let (kept, what) = match key {
                AddressKey::Net(net) if net.prefix_len() == net.max_prefix_len() => (
                    claims
                        .exact
                        .entry(port)
                        .or_default()
                        .entry(net.addr())
                        .or_insert_with(|| Arc::clone(&cluster))
                        .clone(),
                    format!("address {}", net.addr()),
                ),
                AddressKey::Net(net) => {
                    let net = net.trunc();
                    (
                        claims
                            .ranges
                            .entry(port)
                            .or_default()
                            .entry(net)
                            .or_insert_with(|| Arc::clone(&cluster))
                            .clone(),
                        format!("address {net}"),
                    )
                }
                AddressKey::AnyOnPort => (
                    claims
                        .any
                        .entry(port)
                        .or_insert_with(|| Arc::clone(&cluster))
                        .clone(),
                    "every address".to_string(),
                ),
            };
            conflict(
                &mut warnings,
                || what,
                port,
                (&kept, &source(&kept)),
                (&cluster, &source(&cluster)),
            );
        }
        self.warnings.extend(warnings);
        claims
    }
}

fn tcp_proxy(cluster: &str) -> NetworkFilter {
    tcp_proxy_to(ClusterSpecifier::Cluster(cluster.to_string()))
}

/// A `tcp_proxy` to one cluster or several by weight; istiod names its stats after the
/// (first) cluster.
fn tcp_proxy_to(cluster: ClusterSpecifier) -> NetworkFilter {
    let stat_prefix = match &cluster {
        ClusterSpecifier::Cluster(name) => name.clone(),
        ClusterSpecifier::Weighted(list) => {
            list.first().map(|w| w.name.clone()).unwrap_or_default()
        }
    };
    NetworkFilter::TcpProxy(TcpProxy {
        stat_prefix,
        cluster,
        idle_timeout: Some(TCP_IDLE_TIMEOUT),
        max_downstream_connection_duration: None,
    })
}

/// istiod's `tcp_proxy` timeouts: those of the DestinationRule of the one cluster a
/// chain's `tcp_proxy` goes to; weighted routes keep Envoy's defaults.
fn apply_tcp_proxy_timeouts(listener: &mut Listener, timeouts: &Map<String, TcpProxyTimeouts>) {
    let chains = listener
        .filter_chains
        .iter_mut()
        .chain(listener.default_filter_chain.as_mut());
    for chain in chains {
        if let NetworkFilter::TcpProxy(t) = &mut chain.filter
            && let ClusterSpecifier::Cluster(name) = &t.cluster
            && let Some(set) = timeouts.get(name)
        {
            if let Some(idle) = set.idle {
                t.idle_timeout = idle;
            }
            t.max_downstream_connection_duration = set.max_duration;
        }
    }
}

/// A service's own `tcp_proxy`: to its VirtualService's TCP route when one takes it.
fn service_tcp_proxy(cluster: &str, targets: &Map<Arc<str>, ClusterSpecifier>) -> NetworkFilter {
    match targets.get(cluster) {
        Some(target) => tcp_proxy_to(target.clone()),
        None => tcp_proxy(cluster),
    }
}

fn chain(name: &str, filter_chain_match: FilterChainMatch, filter: NetworkFilter) -> FilterChain {
    FilterChain {
        name: name.to_string(),
        filter_chain_match,
        filter,
        skipped_filters: Vec::new(),
        transport_socket: None,
    }
}

fn http_manager(listener: &str, routes: &str) -> NetworkFilter {
    NetworkFilter::Http(Box::new(HttpConnectionManager {
        stat_prefix: format!("outbound_{listener}"),
        route_config: RouteSource::Rds(routes.to_string()),
        // istiod sets `stream_idle_timeout: 0s` on every sidecar connection manager: off.
        stream_idle_timeout: None,
        request_timeout: None,
        accept_http_10: false,
        skipped_filters: Vec::new(),
    }))
}

/// The match of a chain that takes plaintext HTTP, as the HTTP inspector tells it.
fn http_match(prefix_ranges: Vec<IpNet>) -> FilterChainMatch {
    FilterChainMatch {
        prefix_ranges,
        transport_protocol: Some("raw_buffer".to_string()),
        application_protocols: PLAINTEXT_HTTP.iter().map(|p| p.to_string()).collect(),
        ..FilterChainMatch::default()
    }
}

fn host_nets(ips: &[IpAddr]) -> Vec<IpNet> {
    ips.iter().map(|ip| IpNet::from(*ip)).collect()
}

/// The listener filters a listener's chains need: the TLS inspector for server names, the
/// HTTP inspector for application protocols.
fn inspectors(chains: &[FilterChain]) -> Vec<String> {
    let mut filters = Vec::new();
    if chains
        .iter()
        .any(|c| !c.filter_chain_match.server_names.is_empty())
    {
        filters.push("envoy.filters.listener.tls_inspector".to_string());
    }
    if chains
        .iter()
        .any(|c| !c.filter_chain_match.application_protocols.is_empty())
    {
        filters.push("envoy.filters.listener.http_inspector".to_string());
    }
    filters
}

fn wildcard(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)
}

/// Istio's `virtualOutbound`: hands connections to the listener of their original
/// destination; what none takes ends in the catch-all, and a connection to 15001 itself
/// is dropped.
fn virtual_outbound(catch_all: &str, pods: &[IpAddr]) -> Listener {
    let mut chains = vec![chain(
        "virtualOutbound-blackhole",
        FilterChainMatch {
            destination_port: Some(OUTBOUND_PORT),
            ..FilterChainMatch::default()
        },
        tcp_proxy(BLACKHOLE_CLUSTER),
    )];
    if !pods.is_empty() {
        chains.push(chain(
            "virtualOutbound-pods",
            FilterChainMatch {
                prefix_ranges: host_nets(pods),
                ..FilterChainMatch::default()
            },
            tcp_proxy(PASSTHROUGH_CLUSTER),
        ));
    }
    chains.push(chain(
        "virtualOutbound-catchall-tcp",
        FilterChainMatch::default(),
        tcp_proxy(catch_all),
    ));
    Listener {
        name: VIRTUAL_OUTBOUND.to_string(),
        address: wildcard(OUTBOUND_PORT),
        bind_to_port: true,
        use_original_dst: true,
        listener_filters: Vec::new(),
        filter_chains: chains,
        default_filter_chain: None,
    }
}

/// Chains for destinations in `nets`: with `http`, plaintext HTTP to it beside the rest to
/// `cluster`, both on the raw-buffer transport; without the same transport on both, Envoy
/// would pick the HTTP chain for its more specific transport and, the application
/// protocols failing, fall to the default chain, as it never goes back a level.
fn range_chains(
    chains: &mut Vec<FilterChain>,
    nets: Vec<IpNet>,
    http: Option<NetworkFilter>,
    tcp_filter: NetworkFilter,
) {
    let mut tcp = FilterChainMatch {
        prefix_ranges: nets.clone(),
        ..FilterChainMatch::default()
    };
    if let Some(http) = http {
        tcp.transport_protocol = Some("raw_buffer".to_string());
        chains.push(chain("", http_match(nets), http));
    }
    chains.push(chain("", tcp, tcp_filter));
}

/// A `0.0.0.0_PORT` listener: HTTP to the port's route table, ranges and SNI names to their
/// services, the port-wide service (or the catch-all) for the rest.
fn port_listener(
    port: u16,
    l: &PortListener,
    catch_all: &str,
    pods: &[IpAddr],
    targets: &Map<Arc<str>, ClusterSpecifier>,
) -> Listener {
    let name = format!("0.0.0.0_{port}");
    let routes = port.to_string();
    let mut chains = Vec::new();
    if l.http {
        chains.push(chain(
            "",
            http_match(Vec::new()),
            http_manager(&name, &routes),
        ));
    }
    for route in &l.subnets {
        chains.push(chain(
            "",
            FilterChainMatch {
                prefix_ranges: route.subnets.clone(),
                ..FilterChainMatch::default()
            },
            tcp_proxy_to(route.target.clone()),
        ));
    }
    for (net, cluster, sniffed) in &l.ranges {
        let http = sniffed.then(|| http_manager(&name, &routes));
        range_chains(
            &mut chains,
            vec![*net],
            http,
            service_tcp_proxy(cluster, targets),
        );
    }
    for (target, names) in &l.sni {
        chains.push(chain(
            "",
            FilterChainMatch {
                server_names: names.clone(),
                ..FilterChainMatch::default()
            },
            tcp_proxy_to(target.clone()),
        ));
    }
    // A port-wide service takes pods' addresses too; else pods outside the ranges here get
    // their own chains, since this listener, not virtualOutbound's, takes their traffic.
    let pods: Vec<IpAddr> = pods
        .iter()
        .copied()
        .filter(|ip| l.any.is_none() && !l.ranges.iter().any(|(net, ..)| net.contains(ip)))
        .collect();
    if !pods.is_empty() {
        let http = l.http.then(|| http_manager(&name, &routes));
        range_chains(
            &mut chains,
            host_nets(&pods),
            http,
            tcp_proxy(PASSTHROUGH_CLUSTER),
        );
    }
    let default = match &l.any {
        Some(cluster) => chain(
            "",
            FilterChainMatch::default(),
            service_tcp_proxy(cluster, targets),
        ),
        None => chain(
            PASSTHROUGH_FILTER_CHAIN,
            FilterChainMatch::default(),
            tcp_proxy(catch_all),
        ),
    };
    let (filter_chains, default_filter_chain) = if chains.is_empty() {
        (vec![default], None)
    } else {
        (chains, Some(default))
    };
    let listener_filters = inspectors(&filter_chains);
    Listener {
        name,
        address: wildcard(port),
        bind_to_port: false,
        use_original_dst: false,
        listener_filters,
        filter_chains,
        default_filter_chain,
    }
}

/// An `IP_PORT` listener for an opaque service's exact address: all its traffic goes to
/// the service; a sniffed one sends HTTP through a route table of its own (`host:port`)
/// that takes any Host.
fn address_listener(
    ip: IpAddr,
    port: u16,
    c: &PendingCluster,
    vs_routes: &Map<Arc<str>, Vec<Route>>,
    targets: &Map<Arc<str>, ClusterSpecifier>,
) -> (Listener, Option<RouteConfiguration>) {
    let name = format!("{ip}_{port}");
    let tcp = chain(
        "",
        FilterChainMatch::default(),
        service_tcp_proxy(&c.name, targets),
    );
    let mut listener = Listener {
        name,
        address: SocketAddr::new(ip, port),
        bind_to_port: false,
        use_original_dst: false,
        listener_filters: Vec::new(),
        filter_chains: vec![tcp],
        default_filter_chain: None,
    };
    if c.protocol != Protocol::Auto {
        return (listener, None);
    }
    let routes_name = format!("{}:{port}", c.host);
    let http = chain(
        "",
        http_match(Vec::new()),
        http_manager(&listener.name, &routes_name),
    );
    listener.default_filter_chain = listener.filter_chains.pop();
    listener.filter_chains = vec![http];
    listener.listener_filters = inspectors(&listener.filter_chains);
    let routes = RouteConfiguration {
        name: routes_name.clone(),
        virtual_hosts: vec![VirtualHost {
            name: routes_name,
            domains: vec!["*".to_string()],
            routes: service_routes(&c.name, vs_routes),
            include_request_attempt_count: true,
            ..VirtualHost::default()
        }],
        ignore_port_in_host_matching: true,
        ..RouteConfiguration::default()
    };
    (listener, Some(routes))
}

/// Istio's default retry policy for a service route: two retries on connect failure,
/// refused stream, unavailable, cancelled and 503, each to another host where possible.
pub(crate) fn istio_retry_policy() -> RetryPolicy {
    RetryPolicy {
        retry_on: [
            "connect-failure",
            "refused-stream",
            "unavailable",
            "cancelled",
            "retriable-status-codes",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        num_retries: 2,
        per_try_timeout: None,
        retriable_status_codes: vec![503],
        retriable_headers: Vec::new(),
        avoid_previous_hosts: true,
        host_selection_retry_max_attempts: 5,
        previous_priorities: None,
        retry_back_off: None,
    }
}

/// `policy`, shared with every other route that has it when it is Istio's default (a
/// mesh's routes nearly all have it).
pub(crate) fn shared_retry_policy(policy: RetryPolicy) -> Arc<RetryPolicy> {
    if policy == **ISTIO_RETRY_POLICY {
        Arc::clone(&ISTIO_RETRY_POLICY)
    } else {
        Arc::new(policy)
    }
}

/// Istio's default retry policy, allocated once for the process's every route.
static ISTIO_RETRY_POLICY: LazyLock<Arc<RetryPolicy>> =
    LazyLock::new(|| Arc::new(istio_retry_policy()));

/// Istio's default route to a service's cluster.
fn forward_spec(cluster: &str) -> Forward {
    Forward {
        cluster: ClusterSpecifier::Cluster(cluster.to_string()),
        // Istio disables the route timeout unless a VirtualService sets one.
        timeout: Some(Duration::ZERO),
        idle_timeout: None,
        retry_policy: Some(Arc::clone(&ISTIO_RETRY_POLICY)),
        host_rewrite_literal: None,
        prefix_rewrite: None,
        regex_rewrite: None,
        request_mirror_policies: Vec::new(),
        hash_policy: Vec::new(),
    }
}

fn forward(cluster: &str) -> RouteAction {
    RouteAction::Forward(Arc::new(forward_spec(cluster)))
}

/// Istio's `allow_any` action: PassthroughCluster, no timeout, no retries.
fn passthrough() -> RouteAction {
    RouteAction::Forward(Arc::new(Forward {
        retry_policy: None,
        ..forward_spec(PASSTHROUGH_CLUSTER)
    }))
}

fn route(name: &str, action: RouteAction) -> Route {
    Route::new(name, RouteMatch::any(), action)
}

/// The routes of a service's virtual host: its VirtualService's, else istiod's default.
fn service_routes(cluster: &Arc<str>, vs_routes: &Map<Arc<str>, Vec<Route>>) -> Vec<Route> {
    vs_routes
        .get(cluster)
        .cloned()
        .unwrap_or_else(|| vec![route("default", forward(cluster))])
}

/// The route table `PORT`: a virtual host per HTTP or sniffed service (`host:port`) with
/// every name it won on the port, then the outbound policy's `allow_any` or `block_all`.
fn port_routes(
    port: u16,
    claims: &Claims,
    clusters: &Map<Arc<str>, PendingCluster>,
    vs_routes: &Map<Arc<str>, Vec<Route>>,
    mode: OutboundMode,
    pods: &[IpAddr],
) -> RouteConfiguration {
    let mut by_cluster: BTreeMap<&Arc<str>, Vec<String>> = BTreeMap::new();
    let mut any_host = false;
    for (host, cluster) in claims.hosts.get(&port).into_iter().flatten() {
        if clusters
            .get(cluster)
            .is_some_and(|c| routed_by_host(c.protocol))
        {
            any_host |= &**host == "*";
            by_cluster
                .entry(cluster)
                .or_default()
                .push(host.to_string());
        }
    }
    let mut virtual_hosts: Vec<VirtualHost> = by_cluster
        .into_iter()
        .filter_map(|(cluster, domains)| {
            let c = clusters.get(cluster)?;
            Some(VirtualHost {
                name: format!("{}:{port}", c.host),
                domains,
                routes: service_routes(cluster, vs_routes),
                include_request_attempt_count: true,
                ..VirtualHost::default()
            })
        })
        .collect();
    let claimed: BTreeSet<&str> = claims
        .hosts
        .get(&port)
        .into_iter()
        .flatten()
        .map(|(h, _)| &**h)
        .collect();
    let pod_domains: Vec<String> = pods
        .iter()
        .map(IpAddr::to_string)
        .filter(|ip| !claimed.contains(ip.as_str()))
        .collect();
    if !pod_domains.is_empty() {
        virtual_hosts.push(VirtualHost {
            name: "pods".to_string(),
            domains: pod_domains,
            routes: vec![route("pods", passthrough())],
            include_request_attempt_count: true,
            ..VirtualHost::default()
        });
    }
    if !any_host {
        virtual_hosts.push(catch_all_host(mode));
    }
    // Grown by doubling; kept for `/config_dump` until the next build.
    virtual_hosts.shrink_to_fit();
    RouteConfiguration {
        name: port.to_string(),
        virtual_hosts,
        ignore_port_in_host_matching: true,
        ..RouteConfiguration::default()
    }
}

/// `host:port` as a domain, an IPv6 literal in brackets as in a Host header.
fn with_port(host: &str, port: &str) -> String {
    match host.parse::<std::net::Ipv6Addr>() {
        Ok(_) => format!("[{host}]:{port}"),
        Err(_) => format!("{host}:{port}"),
    }
}

/// The outbound policy's catch-all virtual host: Istio's `block_all` (a direct 502) or
/// `allow_any` (PassthroughCluster).
fn catch_all_host(mode: OutboundMode) -> VirtualHost {
    let (name, action) = match mode {
        OutboundMode::RegistryOnly => (
            "block_all",
            RouteAction::DirectResponse {
                status: 502,
                body: None,
            },
        ),
        OutboundMode::AllowAny => ("allow_any", passthrough()),
    };
    VirtualHost {
        name: name.to_string(),
        domains: vec!["*".to_string()],
        routes: vec![route(name, action)],
        include_request_attempt_count: true,
        ..VirtualHost::default()
    }
}

/// The route table [`HTTP_PROXY_ROUTES`]: a virtual host per HTTP or sniffed service port
/// (`host:port`) with every name it won there, as istiod writes it (TLS and TCP ports get
/// none: CONNECT finds their names in [`opaque_names`]); the pods by IP on any port; then
/// the outbound policy's catch-all.
fn http_proxy_routes(
    claims: &Claims,
    clusters: &Map<Arc<str>, PendingCluster>,
    vs_routes: &Map<Arc<str>, Vec<Route>>,
    mode: OutboundMode,
    pods: &[IpAddr],
) -> RouteConfiguration {
    let mut by_cluster: BTreeMap<&Arc<str>, (&PendingCluster, Vec<String>)> = BTreeMap::new();
    for (port, names) in &claims.hosts {
        let port = port.to_string();
        for (host, name) in names {
            let Some(c) = clusters.get(name).filter(|c| routed_by_host(c.protocol)) else {
                continue;
            };
            by_cluster
                .entry(name)
                .or_insert_with(|| (c, Vec::new()))
                .1
                .push(with_port(host, &port));
        }
    }
    let mut virtual_hosts: Vec<VirtualHost> = by_cluster
        .into_iter()
        .map(|(name, (c, domains))| VirtualHost {
            name: format!("{}:{}", c.host, c.port),
            domains,
            routes: service_routes(name, vs_routes),
            include_request_attempt_count: true,
            ..VirtualHost::default()
        })
        .collect();
    if !pods.is_empty() {
        virtual_hosts.push(VirtualHost {
            name: "pods".to_string(),
            domains: pods
                .iter()
                .map(|ip| with_port(&ip.to_string(), "*"))
                .collect(),
            routes: vec![route("pods", passthrough())],
            include_request_attempt_count: true,
            ..VirtualHost::default()
        });
    }
    virtual_hosts.push(catch_all_host(mode));
    virtual_hosts.shrink_to_fit();
    RouteConfiguration {
        name: HTTP_PROXY_ROUTES.to_string(),
        virtual_hosts,
        ..RouteConfiguration::default()
    }
}

/// Every name claimed on each port whose service is neither HTTP nor sniffed, with its
/// cluster: the names [`http_proxy_routes`] leaves out, as istiod does.
fn opaque_names(claims: &Claims, clusters: &Map<Arc<str>, PendingCluster>) -> crate::OpaqueNames {
    let mut out = crate::OpaqueNames::new();
    for (port, names) in &claims.hosts {
        for (host, name) in names {
            if clusters
                .get(name)
                .is_some_and(|c| !routed_by_host(c.protocol))
            {
                out.entry(*port)
                    .or_default()
                    .entry(host.clone())
                    .or_insert_with(|| Arc::clone(name));
            }
        }
    }
    out
}

/// Istio's circuit breaker thresholds: unlimited unless a DestinationRule sets them.
fn istio_thresholds() -> Thresholds {
    Thresholds {
        max_connections: u32::MAX,
        max_pending_requests: u32::MAX,
        max_requests: u32::MAX,
        max_retries: u32::MAX,
    }
}

fn bare_cluster(name: &str, discovery: Discovery, lb_policy: LbPolicy) -> Cluster {
    Cluster {
        name: name.to_string(),
        discovery,
        lb_policy,
        connect_timeout: CONNECT_TIMEOUT,
        upstream_protocol: UpstreamProtocol::Http1,
        circuit_breakers: istio_thresholds(),
        connection_limits: portcullis_envoy::ConnectionLimits::default(),
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

/// A DestinationRule's `connectionPool` on a cluster, as istiod writes it: each limit that
/// is set and above zero becomes the default-priority threshold (zero keeps Istio's
/// unlimited), `tcp.connectTimeout` the cluster's connect timeout, the per-connection
/// settings (`http.idleTimeout`, `http.maxRequestsPerConnection`,
/// `http.maxConcurrentStreams`, `tcp.maxConnectionDuration`, `tcp.tcpKeepalive`) the
/// connection limits, and
/// `http.useClientProtocol` the downstream's protocol upstream.
fn apply_connection_pool(cluster: &mut Cluster, pool: &ConnectionPoolSettings) {
    let limit = |v: Option<i64>| v.filter(|v| *v > 0).and_then(|v| u32::try_from(v).ok());
    let t = &mut cluster.circuit_breakers;
    if let Some(http) = &pool.http {
        if let Some(v) = limit(http.http2_max_requests) {
            t.max_requests = v;
        }
        if let Some(v) = limit(http.http1_max_pending_requests) {
            t.max_pending_requests = v;
        }
        if let Some(v) = limit(http.max_retries) {
            t.max_retries = v;
        }
    }
    let limits = &mut cluster.connection_limits;
    // `http.idleTimeout`, else `tcp.idleTimeout`, is the connections' idle timeout.
    let idle = pool.http.as_ref().and_then(|h| h.idle_timeout);
    if let Some(idle) = idle.or(pool.tcp.as_ref().and_then(|t| t.idle_timeout)) {
        limits.idle_timeout = Some(idle);
    }
    if let Some(http) = &pool.http {
        if let Some(v) = limit(http.max_requests_per_connection) {
            limits.max_requests_per_connection = Some(v);
        }
        // Kept only where the cluster speaks HTTP/2 upstream after any h2 upgrade: istiod
        // writes it into the explicit HTTP/2 options alone.
        limits.max_concurrent_streams = limit(http.max_concurrent_streams);
        if http.use_client_protocol == Some(true) {
            cluster.upstream_protocol = UpstreamProtocol::UseDownstream;
        }
    }
    if let Some(tcp) = &pool.tcp {
        if let Some(v) = limit(tcp.max_connections) {
            t.max_connections = v;
        }
        if let Some(timeout) = tcp.connect_timeout {
            cluster.connect_timeout = timeout;
        }
        if let Some(d) = tcp.max_connection_duration.filter(|d| !d.is_zero()) {
            limits.max_connection_duration = Some(d);
        }
        if let Some(k) = &tcp.tcp_keepalive {
            limits.tcp_keepalive = Some(portcullis_envoy::TcpKeepalive {
                probes: k.probes,
                time: k.time,
                interval: k.interval,
            });
        }
    }
}

/// A DestinationRule's `outlierDetection` as istiod writes it (`applyOutlierDetection`):
/// the consecutive 5xx and gateway detectors enforced when their counts are above zero,
/// the deprecated `consecutiveErrors` as gateway errors only, local-origin failures apart
/// when split, and `minHealthPercent` (0 unless set) as the panic threshold, which turns
/// Envoy's default of 50% off.
fn apply_outlier_detection(cluster: &mut Cluster, o: &portcullis_model::OutlierDetection) {
    let mut out = portcullis_envoy::OutlierDetection::default();
    let enforced = |v: u32| if v > 0 { 100 } else { 0 };
    if let Some(n) = o
        .consecutive_errors
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n > 0)
    {
        out.consecutive_gateway_failure = n;
        out.enforcing_consecutive_gateway_failure = 100;
        out.enforcing_consecutive_5xx = 0;
    }
    if let Some(n) = o.consecutive_5xx_errors {
        out.consecutive_5xx = n;
        out.enforcing_consecutive_5xx = enforced(n);
    }
    if let Some(n) = o.consecutive_gateway_errors {
        out.consecutive_gateway_failure = n;
        out.enforcing_consecutive_gateway_failure = enforced(n);
    }
    if let Some(interval) = o.interval {
        out.interval = interval;
    }
    if let Some(base) = o.base_ejection_time {
        out.base_ejection_time = base;
    }
    if let Some(p) = o
        .max_ejection_percent
        .and_then(|p| u32::try_from(p).ok())
        .filter(|p| *p > 0)
    {
        out.max_ejection_percent = p;
    }
    if o.split_external_local_origin_errors {
        out.split_external_local_origin_errors = true;
        if let Some(n) = o.consecutive_local_origin_failures.filter(|n| *n > 0) {
            out.consecutive_local_origin_failure = n;
            out.enforcing_consecutive_local_origin_failure = 100;
        }
    }
    cluster.outlier_detection = Some(Box::new(out));
    let min_health = o.min_health_percent.unwrap_or(0);
    if min_health >= 0 {
        cluster.healthy_panic_threshold = Some(f64::from(min_health));
    }
}

fn blackhole_cluster() -> Cluster {
    bare_cluster(BLACKHOLE_CLUSTER, Discovery::Static, LbPolicy::RoundRobin)
}

/// Istio's PassthroughCluster; under REGISTRY_ONLY only pods reach it, so it forwards only
/// to them.
fn passthrough_cluster(mode: OutboundMode, pods: &[IpAddr]) -> Cluster {
    let allowed_destinations = match mode {
        OutboundMode::RegistryOnly => Some(host_nets(pods)),
        OutboundMode::AllowAny => None,
    };
    bare_cluster(
        PASSTHROUGH_CLUSTER,
        Discovery::OriginalDst(OriginalDst {
            port_override: None,
            allowed_destinations,
        }),
        LbPolicy::ClusterProvided,
    )
}

/// A service's `outbound|PORT||HOST` cluster: STATIC with its endpoints, STRICT_DNS or
/// LOGICAL_DNS with names, ORIGINAL_DST for resolution NONE and for a DestinationRule's
/// `simple: PASSTHROUGH` (istiod drops the endpoints then); the DestinationRule's
/// balancer, LEAST_REQUEST by default as Istio.
fn service_cluster(
    p: PendingCluster,
    traffic: &Traffic<'_>,
    client: &BuildOptions,
    dns: DnsAnswers<'_>,
    dns_names: &mut BTreeSet<String>,
) -> Cluster {
    let lb_policy = traffic.lb;
    let passthrough = lb_policy == LbPolicy::ClusterProvided;
    let discovery = match p.resolution {
        Resolution::Static if !passthrough => Discovery::Static,
        Resolution::Dns if !passthrough => Discovery::StrictDns,
        Resolution::DnsRoundRobin if !passthrough => Discovery::LogicalDns,
        Resolution::Static | Resolution::Dns | Resolution::DnsRoundRobin | Resolution::None => {
            // The original destination must still be one of the service's: its addresses,
            // its host's current DNS answers and, under PASSTHROUGH, its endpoints' (a
            // request naming the host cannot take the client anywhere else).
            let mut allowed = p.addresses.clone();
            if passthrough {
                let endpoints = p.endpoints.iter().filter_map(|e| match &e.address {
                    EndpointAddress::Ip(ip) => Some(IpNet::from(*ip)),
                    EndpointAddress::Dns(_) => None,
                });
                for net in endpoints {
                    if !allowed.contains(&net) {
                        allowed.push(net);
                    }
                }
            }
            if !p.host.starts_with('*') {
                dns_names.insert(p.host.to_string());
                let answer = dns(&p.host).unwrap_or_default();
                allowed.extend(answer.iter().map(|ip| IpNet::from(*ip)));
            }
            Discovery::OriginalDst(OriginalDst {
                port_override: p.passthrough_port,
                allowed_destinations: Some(allowed),
            })
        }
    };
    let original_dst = matches!(discovery, Discovery::OriginalDst(_));
    let mut cluster = bare_cluster(
        &p.name,
        discovery,
        if original_dst {
            LbPolicy::ClusterProvided
        } else {
            lb_policy
        },
    );
    cluster.upstream_protocol = match p.protocol {
        Protocol::Http2 => UpstreamProtocol::Http2,
        Protocol::Auto => UpstreamProtocol::UseDownstream,
        Protocol::Http | Protocol::Tcp | Protocol::Tls => UpstreamProtocol::Http1,
    };
    cluster.source = Some(Arc::clone(&p.source));
    if client.ssrf_guard
        && p.mesh_external
        && matches!(
            cluster.discovery,
            Discovery::StrictDns | Discovery::LogicalDns
        )
    {
        // What the ServiceEntry itself names (its addresses, its endpoints' IPs) is allowed
        // even when private: the guard is against names pointing elsewhere.
        let mut allowed = p.addresses.clone();
        allowed.extend(p.endpoints.iter().filter_map(|e| match &e.address {
            EndpointAddress::Ip(ip) => Some(IpNet::from(*ip)),
            EndpointAddress::Dns(_) => None,
        }));
        cluster.ssrf_guard = Some(allowed);
    }
    if !original_dst {
        cluster.slow_start.clone_from(&traffic.slow_start);
    }
    if let Some(pool) = traffic.pool {
        apply_connection_pool(&mut cluster, pool);
    }
    if let Some(outlier) = traffic.outlier {
        apply_outlier_detection(&mut cluster, outlier);
    }
    if !original_dst {
        let failover = cluster.outlier_detection.is_some();
        let mut by_locality: BTreeMap<Locality, Vec<locality::Labelled<'_>>> = BTreeMap::new();
        for e in &p.endpoints {
            let endpoint = LbEndpoint {
                address: match &e.address {
                    EndpointAddress::Ip(ip) => Address::Socket(SocketAddr::new(*ip, e.port)),
                    EndpointAddress::Dns(host) => {
                        dns_names.insert(host.to_string());
                        Address::Name {
                            host: host.to_string(),
                            port: e.port,
                        }
                    }
                },
                health: HealthStatus::Unknown,
                load_balancing_weight: e.weight,
                // istiod's `AppendLbEndpointMetadata`: a workload's TLS mode unless disabled.
                transport_socket_match: e
                    .peer
                    .tls_mode
                    .iter()
                    .map(|mode| (super::tls::TLS_MODE_KEY.to_owned(), mode.to_string()))
                    .collect(),
                hostname: None,
                workload: Some(Arc::clone(&e.workload)),
                source: Some(Arc::clone(&e.source)),
            };
            by_locality
                .entry(e.locality.clone())
                .or_default()
                .push((endpoint, &*e.labels));
        }
        let groups = by_locality.into_iter().collect();
        let endpoints = match traffic.locality {
            Some(setting) => {
                cluster.locality_weighted = locality::weighted(setting, failover);
                locality::apply(
                    groups,
                    setting,
                    failover,
                    &client.locality,
                    &client.workload_labels,
                )
            }
            None => locality::apply(
                groups,
                &LocalityLbSetting::default(),
                false,
                &client.locality,
                &client.workload_labels,
            ),
        };
        cluster.load_assignment = Some(ClusterLoadAssignment {
            cluster_name: p.name.to_string(),
            endpoints,
        });
    }
    cluster
}

#[cfg(test)]
mod tests;
