//! Indexing Envoy's model into the data path's [`Snapshot`]: the one routing structure for
//! both config sources (xDS, and Istio files compiled as istiod would).

use std::collections::BTreeSet;
use std::sync::Arc;

use imbl::ordmap::DiffItem;
use portcullis_envoy as envoy;
use portcullis_model::OutboundMode;

use crate::Map;
use crate::build::DnsAnswers;
use crate::cluster::{self, Clusters};
use crate::listener::{ChainFilter, Listeners};
use crate::route::RouteTable;
use crate::snapshot::{ClusterMap, Decision, HostMap, Protocol, Snapshot};

impl Snapshot {
    /// Indexes `resources` into snapshot `version`. DNS names that clusters need are
    /// collected in [`Snapshot::dns_names`] and their current answers taken from `dns`;
    /// endpoint counters are carried over from `previous` for the same cluster and address,
    /// circuit breaker counts for the same cluster.
    /// The outbound policy is read from the hand-off listener's catch-all chain.
    ///
    /// Only the clusters whose resources changed since `previous` was indexed are built
    /// again (and those that resolve names or were warned about); the others are shared.
    pub fn index(
        resources: &envoy::Resources,
        dns: DnsAnswers<'_>,
        previous: Option<&Snapshot>,
        version: u64,
    ) -> Snapshot {
        let mut warnings = Vec::new();
        let mut dns_names = BTreeSet::new();
        let usage = protocol_usage(resources);
        let protocol = |c: &envoy::Cluster| match c.upstream_protocol {
            envoy::UpstreamProtocol::Http2 => Protocol::Http2,
            envoy::UpstreamProtocol::UseDownstream => Protocol::Auto,
            envoy::UpstreamProtocol::Http1 => usage
                .get(c.name.as_str())
                .copied()
                .unwrap_or(Protocol::Http),
        };
        let before = previous.and_then(|p| Some((p, p.indexed.as_deref()?)));
        let (mut by_name, by_host, stale, aliases) = match before {
            Some((p, was)) => {
                let aliases = was.aliases_after(resources);
                let stale = was.stale(resources, &usage, &aliases);
                (p.clusters.clone(), &p.by_host, stale, aliases)
            }
            None => (
                ClusterMap::new(),
                &HostMap::new(),
                resources
                    .clusters
                    .keys()
                    .map(|k| k.as_str().into())
                    .collect(),
                all_aliases(resources.clusters.values()),
            ),
        };
        let mut volatile = Vec::new();
        let mut changes = Vec::new();
        for name in stale {
            let Some(c) = resources.clusters.get(&*name) else {
                changes.push((by_name.remove(&*name), None));
                continue;
            };
            let protocol = protocol(c);
            let previous = by_name.get(&*name).cloned();
            if let Some(p) = &previous
                && cluster::unchanged(p, c, resources, protocol)
            {
                continue;
            }
            let built = cluster::build(
                c,
                resources,
                protocol,
                dns,
                previous.as_deref(),
                &mut dns_names,
                &mut warnings,
            );
            if built.built_from.is_none() {
                volatile.push(Arc::clone(&built.name));
            }
            let built = Arc::new(built);
            let was = by_name.insert(Arc::clone(&built.name), Arc::clone(&built));
            changes.push((was, Some(built)));
        }
        let by_host = crate::snapshot::hosts_after(by_host, changes);
        let indexed = Indexed {
            resources: resources.clone(),
            usage: usage.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            volatile,
            aliases,
        };
        let clusters = Clusters { by_name: &by_name };
        let target = |spec: &envoy::ClusterSpecifier| clusters.target(spec);
        let mut route_warnings = Vec::new();
        let routes: Map<Box<str>, Arc<RouteTable>> = resources
            .routes
            .iter()
            .map(|(name, rc)| {
                (
                    name.as_str().into(),
                    Arc::new(RouteTable::compile(rc, &target, &mut route_warnings)),
                )
            })
            .collect();
        let inline_warnings = std::cell::RefCell::new(Vec::new());
        let inline = |rc: &envoy::RouteConfiguration| {
            Arc::new(RouteTable::compile(
                rc,
                &target,
                &mut inline_warnings.borrow_mut(),
            ))
        };
        let listeners = Listeners::index(resources, &target, &routes, &inline, &mut warnings);
        warnings.extend(route_warnings);
        warnings.extend(inline_warnings.into_inner());
        let mode = listeners.catch_all().and_then(|c| match &c.filter {
            ChainFilter::Tcp(t) => match t.decide() {
                Decision::Passthrough => Some(OutboundMode::AllowAny),
                Decision::BlackHole => Some(OutboundMode::RegistryOnly),
                _ => None,
            },
            ChainFilter::Http(_) => None,
        });
        Snapshot {
            version,
            mode,
            by_host,
            clusters: by_name,
            warnings,
            dns_names,
            enforcement: None,
            listeners: Some(listeners),
            http_proxy: routes.get(crate::HTTP_PROXY_ROUTES).cloned(),
            opaque_names: None,
            indexed: Some(Box::new(indexed)),
        }
    }
}

/// What a snapshot was indexed from: enough to tell which of its clusters the next
/// resources leave as they are.
#[derive(Debug)]
pub(crate) struct Indexed {
    /// The resources, sharing their unchanged part with the next ones.
    pub(crate) resources: envoy::Resources,
    /// How listeners used each cluster ([`protocol_usage`]).
    usage: Map<String, Protocol>,
    /// Clusters built again for every snapshot: those that resolve names or were warned
    /// about.
    volatile: Vec<Arc<str>>,
    /// The clusters whose EDS service name is not their own name, by that service name.
    aliases: Aliases,
}

/// Clusters by an EDS service name that is not their own name.
type Aliases = imbl::OrdMap<String, Vec<Arc<str>>>;

impl Indexed {
    /// The clusters of `now` (or of the last snapshot) that may not be shared as they are:
    /// added, changed or removed clusters, those whose endpoints or use by listeners
    /// changed, and the volatile ones. Unchanged parts of the maps are not visited.
    fn stale(
        &self,
        now: &envoy::Resources,
        usage: &Map<&str, Protocol>,
        aliases: &Aliases,
    ) -> BTreeSet<Arc<str>> {
        let mut stale: BTreeSet<Arc<str>> = self.volatile.iter().cloned().collect();
        for change in self.resources.clusters.diff(&now.clusters) {
            stale.insert(changed_name(change).into());
        }
        for change in self.resources.endpoints.diff(&now.endpoints) {
            let service = changed_name(change);
            stale.insert(service.into());
            for name in [&self.aliases, aliases]
                .into_iter()
                .filter_map(|a| a.get(service))
                .flatten()
            {
                stale.insert(Arc::clone(name));
            }
        }
        let changed_use = self
            .usage
            .iter()
            .filter(|(k, v)| usage.get(k.as_str()) != Some(v))
            .map(|(k, _)| k.as_str())
            .chain(
                usage
                    .iter()
                    .filter(|(k, v)| self.usage.get(**k) != Some(v))
                    .map(|(k, _)| *k),
            );
        for name in changed_use {
            stale.insert(name.into());
        }
        stale
    }

    /// [`all_aliases`] of `now`'s clusters, found from the clusters that changed since.
    fn aliases_after(&self, now: &envoy::Resources) -> Aliases {
        let mut after = self.aliases.clone();
        for change in self.resources.clusters.diff(&now.clusters) {
            let (old, new) = match change {
                DiffItem::Add(_, new) => (None, Some(new)),
                DiffItem::Update { old, new } => (Some(old.1), Some(new.1)),
                DiffItem::Remove(_, old) => (Some(old), None),
            };
            if let Some((service, name)) = old.and_then(|c| alias(c))
                && let Some(names) = after.get_mut(service)
            {
                names.retain(|n| **n != *name);
                if names.is_empty() {
                    after.remove(service);
                }
            }
            if let Some((service, name)) = new.and_then(|c| alias(c)) {
                after
                    .entry(service.to_owned())
                    .or_default()
                    .push(name.into());
            }
        }
        after
    }
}

/// The name a map difference is about.
fn changed_name<'a, V>(change: DiffItem<'a, 'a, String, V>) -> &'a str {
    match change {
        DiffItem::Add(name, _) | DiffItem::Remove(name, _) => name,
        DiffItem::Update { new: (name, _), .. } => name,
    }
}

/// A cluster's EDS service name and its own name, when they differ.
fn alias(c: &envoy::Cluster) -> Option<(&str, &str)> {
    match &c.discovery {
        envoy::Discovery::Eds { service_name } if *service_name != c.name => {
            Some((service_name.as_str(), c.name.as_str()))
        }
        _ => None,
    }
}

/// The clusters of `clusters` whose EDS service name is not their own, by service name.
fn all_aliases<'a>(clusters: impl Iterator<Item = &'a Arc<envoy::Cluster>>) -> Aliases {
    let mut out = Aliases::new();
    for (service, name) in clusters.filter_map(|c| alias(c)) {
        out.entry(service.to_owned()).or_default().push(name.into());
    }
    out
}

/// How listeners use each cluster, for clusters whose upstream protocol does not say: HTTP
/// when a route forwards to it, else TLS when a chain that matches on SNI or on the TLS
/// transport sends to it, else opaque TCP.
fn protocol_usage(resources: &envoy::Resources) -> Map<&str, Protocol> {
    fn names(spec: &envoy::ClusterSpecifier) -> Vec<&str> {
        match spec {
            envoy::ClusterSpecifier::Cluster(n) => vec![n.as_str()],
            envoy::ClusterSpecifier::Weighted(w) => w.iter().map(|w| w.name.as_str()).collect(),
        }
    }
    fn routed<'a>(rc: &'a envoy::RouteConfiguration, usage: &mut Map<&'a str, Protocol>) {
        for vh in &rc.virtual_hosts {
            for r in &vh.routes {
                if let envoy::RouteAction::Forward(f) = &r.action {
                    for n in names(&f.cluster) {
                        usage.insert(n, Protocol::Http);
                    }
                }
            }
        }
    }
    let mut usage = Map::default();
    // The explicit proxy's table is no listener's: how connections use a cluster is what
    // the listeners and their own tables say.
    for rc in resources
        .routes
        .values()
        .filter(|rc| rc.name != crate::HTTP_PROXY_ROUTES)
    {
        routed(rc, &mut usage);
    }
    for l in resources.listeners.values() {
        for c in l.filter_chains.iter().chain(&l.default_filter_chain) {
            match &c.filter {
                envoy::NetworkFilter::Http(h) => {
                    if let envoy::RouteSource::Inline(rc) = &h.route_config {
                        routed(rc, &mut usage);
                    }
                }
                envoy::NetworkFilter::TcpProxy(t) => {
                    let m = &c.filter_chain_match;
                    let tls = !m.server_names.is_empty()
                        || m.transport_protocol.as_deref() == Some("tls");
                    for n in names(&t.cluster) {
                        let p = if tls { Protocol::Tls } else { Protocol::Tcp };
                        usage
                            .entry(n)
                            .and_modify(|old| {
                                if *old == Protocol::Tcp {
                                    *old = p;
                                }
                            })
                            .or_insert(p);
                    }
                }
            }
        }
    }
    usage
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::IpAddr;

    use envoy::{
        ClusterSpecifier, Discovery, FilterChain, FilterChainMatch, HealthStatus,
        HttpConnectionManager, LbEndpoint, LbPolicy, Listener, LocalityLbEndpoints, NetworkFilter,
        Resources, RouteAction, RouteMatch, RouteSource, TcpProxy, UpstreamTransport,
    };
    use ipnet::IpNet;

    use super::*;
    use crate::listener::Connection;
    use crate::route::{Headers, Request};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn cluster(name: &str, discovery: Discovery, endpoints: &[&str]) -> envoy::Cluster {
        envoy::Cluster {
            lb_policy: LbPolicy::LeastRequest,
            load_assignment: Some(envoy::ClusterLoadAssignment {
                cluster_name: name.into(),
                endpoints: vec![LocalityLbEndpoints {
                    lb_endpoints: endpoints.iter().map(|e| endpoint(e)).collect(),
                    ..Default::default()
                }],
            }),
            ..envoy::Cluster::new(name, discovery)
        }
    }

    fn endpoint(address: &str) -> LbEndpoint {
        LbEndpoint::new(match address.parse() {
            Ok(a) => envoy::EndpointAddress::Socket(a),
            Err(_) => {
                let (host, port) = address.rsplit_once(':').unwrap();
                envoy::EndpointAddress::Name {
                    host: host.into(),
                    port: port.parse().unwrap(),
                }
            }
        })
    }

    fn chain(name: &str, m: FilterChainMatch, filter: NetworkFilter) -> FilterChain {
        FilterChain {
            name: name.into(),
            filter_chain_match: m,
            filter,
            skipped_filters: Vec::new(),
            transport_socket: None,
        }
    }

    fn tcp(cluster: &str) -> NetworkFilter {
        NetworkFilter::TcpProxy(TcpProxy {
            stat_prefix: cluster.into(),
            cluster: ClusterSpecifier::Cluster(cluster.into()),
            idle_timeout: None,
            max_downstream_connection_duration: None,
        })
    }

    fn hcm(rds: &str) -> NetworkFilter {
        NetworkFilter::Http(Box::new(HttpConnectionManager {
            stat_prefix: format!("outbound_0.0.0.0_{rds}"),
            route_config: RouteSource::Rds(rds.into()),
            stream_idle_timeout: None,
            request_timeout: None,
            accept_http_10: false,
            skipped_filters: Vec::new(),
        }))
    }

    fn listener(name: &str, address: &str, chains: Vec<FilterChain>) -> Listener {
        Listener {
            name: name.into(),
            address: address.parse().unwrap(),
            bind_to_port: false,
            use_original_dst: false,
            listener_filters: Vec::new(),
            filter_chains: chains,
            default_filter_chain: None,
        }
    }

    fn vhost(name: &str, domains: &[&str], routes: Vec<envoy::Route>) -> envoy::VirtualHost {
        envoy::VirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            routes,
            ..Default::default()
        }
    }

    fn route(name: &str, m: RouteMatch, action: RouteAction) -> envoy::Route {
        envoy::Route::new(name, m, action)
    }

    fn forward(cluster: &str) -> RouteAction {
        RouteAction::Forward(Arc::new(envoy::Forward::to(cluster)))
    }

    const BLOCK_ALL: RouteAction = RouteAction::DirectResponse {
        status: 502,
        body: None,
    };

    /// The seed guide as istiod builds it for REGISTRY_ONLY (or ALLOW_ANY): virtualOutbound
    /// with its catch-all, `0.0.0.0_80` with RDS `80` holding `app.internal.com` and
    /// `block_all` (or `allow_any`).
    fn seed(allow_any: bool) -> Resources {
        let policy = if allow_any {
            envoy::PASSTHROUGH_CLUSTER
        } else {
            envoy::BLACKHOLE_CLUSTER
        };
        let mut r = Resources::default();
        let mut vo = listener(
            envoy::VIRTUAL_OUTBOUND,
            "0.0.0.0:15001",
            vec![chain(
                "virtualOutbound-catchall-tcp",
                FilterChainMatch::default(),
                tcp(policy),
            )],
        );
        vo.use_original_dst = true;
        vo.bind_to_port = true;
        r.listeners.insert(vo.name.clone(), Arc::new(vo));
        let l80 = listener(
            "0.0.0.0_80",
            "0.0.0.0:80",
            vec![chain("", FilterChainMatch::default(), hcm("80"))],
        );
        r.listeners.insert(l80.name.clone(), Arc::new(l80));
        let fallback = if allow_any {
            vhost(
                "allow_any",
                &["*"],
                vec![route(
                    "allow_any",
                    RouteMatch::any(),
                    forward(envoy::PASSTHROUGH_CLUSTER),
                )],
            )
        } else {
            vhost(
                "block_all",
                &["*"],
                vec![route("block_all", RouteMatch::any(), BLOCK_ALL)],
            )
        };
        r.routes.insert(
            "80".into(),
            Arc::new(envoy::RouteConfiguration {
                name: "80".into(),
                virtual_hosts: vec![
                    vhost(
                        "app.internal.com:80",
                        &["app.internal.com", "app.internal.com:80"],
                        vec![route(
                            "default",
                            RouteMatch::any(),
                            forward("outbound|80||app.internal.com"),
                        )],
                    ),
                    fallback,
                ],
                ignore_port_in_host_matching: false,
                ..Default::default()
            }),
        );
        for c in [
            cluster(envoy::BLACKHOLE_CLUSTER, Discovery::Static, &[]),
            cluster(
                envoy::PASSTHROUGH_CLUSTER,
                Discovery::OriginalDst(Default::default()),
                &[],
            ),
            cluster(
                "outbound|80||app.internal.com",
                Discovery::Static,
                &["127.0.0.2:8080"],
            ),
        ] {
            r.clusters.insert(c.name.clone(), Arc::new(c));
        }
        r
    }

    fn index(r: &Resources) -> Snapshot {
        Snapshot::index(r, &|_| None, None, 1)
    }

    fn add_cluster(r: &mut Resources, c: envoy::Cluster) {
        r.clusters.insert(c.name.clone(), Arc::new(c));
    }

    fn add_listener(r: &mut Resources, l: Listener) {
        r.listeners.insert(l.name.clone(), Arc::new(l));
    }

    /// The cluster name a decision sends to, or the decision's kind.
    fn named(d: &Decision) -> String {
        match d {
            Decision::Cluster(c) => c.name.to_string(),
            Decision::Direct(r) => format!("direct {}", r.status),
            other => format!("{other:?}"),
        }
    }

    struct Fields(&'static [(&'static str, &'static str)]);

    impl Headers for Fields {
        fn get(&self, name: &str) -> Option<std::borrow::Cow<'_, str>> {
            self.0
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| std::borrow::Cow::Borrowed(*v))
        }
    }

    fn http(
        s: &Snapshot,
        dst: &str,
        authority: &str,
        path: &str,
        headers: &'static [(&'static str, &'static str)],
    ) -> crate::route::HttpRoute {
        let dst: std::net::SocketAddr = dst.parse().unwrap();
        let conn = Connection {
            destination: Some(dst.ip()),
            port: dst.port(),
            application_protocols: &["http/1.1"],
            ..Connection::default()
        };
        let req = Request {
            authority,
            path,
            method: "GET",
            scheme: "http",
            headers: &Fields(headers),
        };
        s.route_request(&conn, &req)
    }

    fn tls(s: &Snapshot, dst: &str, sni: Option<&str>) -> String {
        let dst: std::net::SocketAddr = dst.parse().unwrap();
        named(&s.route_connection(&Connection {
            destination: Some(dst.ip()),
            port: dst.port(),
            server_name: sni,
            tls: true,
            ..Connection::default()
        }))
    }

    #[test]
    fn the_seed_guide_routes_registered_hosts_and_blocks_the_rest() {
        let s = index(&seed(false));
        assert_eq!(s.outbound_mode(), OutboundMode::RegistryOnly);
        let app = http(&s, "10.0.0.9:80", "app.internal.com", "/", &[]);
        assert_eq!(named(&app.decision), "outbound|80||app.internal.com");
        assert_eq!(&*app.route.unwrap().name, "default");
        assert_eq!(
            named(&http(&s, "10.0.0.9:80", "APP.internal.com:80", "/x", &[]).decision),
            "outbound|80||app.internal.com"
        );
        let blocked = http(&s, "10.0.0.9:80", "example.org", "/", &[]);
        assert_eq!(named(&blocked.decision), "direct 502");
        assert_eq!(&*blocked.route.unwrap().name, "block_all");
        // Another port: no listener, so virtualOutbound's catch-all.
        assert!(matches!(
            s.route_tcp(ip("10.0.0.9"), 5432),
            Decision::BlackHole
        ));
        // Sniffed all the same, so that HTTP there gets the 502 (the registry's tests).
        assert!(!s.is_tcp_destination(ip("10.0.0.9"), 5432));
        assert!(!s.is_tcp_destination(ip("10.0.0.9"), 80));
        // The explicit proxy: the port's listener, no original destination.
        assert_eq!(
            named(&s.route_http("app.internal.com", 80)),
            "outbound|80||app.internal.com"
        );
        let c = s.cluster("outbound|80||app.internal.com").unwrap();
        assert_eq!(
            (&*c.host, c.port, c.protocol),
            ("app.internal.com", 80, Protocol::Http)
        );
        assert_eq!(c.endpoints[0].display(), "127.0.0.2:8080");
    }

    #[test]
    fn allow_any_passes_unregistered_traffic_through() {
        let s = index(&seed(true));
        assert_eq!(s.outbound_mode(), OutboundMode::AllowAny);
        let any = http(&s, "10.0.0.9:80", "example.org", "/", &[]);
        assert!(matches!(any.decision, Decision::Passthrough));
        assert_eq!(&*any.route.unwrap().name, "allow_any");
        assert!(matches!(
            s.route_tcp(ip("10.0.0.9"), 5432),
            Decision::Passthrough
        ));
    }

    /// SNI chains on `0.0.0.0_443`, a per-VIP TCP listener on the same port, and the
    /// port's catch-all chain.
    fn tls_port() -> Resources {
        let mut r = seed(false);
        let sni = |name: &str, names: &[&str], cluster: &str| {
            chain(
                name,
                FilterChainMatch {
                    server_names: names.iter().map(|n| n.to_string()).collect(),
                    transport_protocol: Some("tls".into()),
                    ..Default::default()
                },
                tcp(cluster),
            )
        };
        add_listener(
            &mut r,
            listener(
                "0.0.0.0_443",
                "0.0.0.0:443",
                vec![
                    sni("a", &["api.example.com"], "outbound|443||api.example.com"),
                    sni("b", &["*.example.com"], "outbound|443||*.example.com"),
                    sni("c", &["*.eu.example.com"], "outbound|443||*.eu.example.com"),
                    chain(
                        "catchall",
                        FilterChainMatch::default(),
                        tcp(envoy::BLACKHOLE_CLUSTER),
                    ),
                ],
            ),
        );
        add_listener(
            &mut r,
            listener(
                "10.0.0.5_443",
                "10.0.0.5:443",
                vec![chain(
                    "",
                    FilterChainMatch::default(),
                    tcp("outbound|443||db.internal"),
                )],
            ),
        );
        for name in [
            "outbound|443||api.example.com",
            "outbound|443||*.example.com",
            "outbound|443||*.eu.example.com",
            "outbound|443||db.internal",
        ] {
            add_cluster(
                &mut r,
                cluster(name, Discovery::OriginalDst(Default::default()), &[]),
            );
        }
        r
    }

    #[test]
    fn a_name_with_one_chain_and_a_name_told_apart_by_alpn_pick_as_envoy_does() {
        let mut r = seed(false);
        let by_name = |name: &str, server: &str, alpn: &[&str], cluster: &str| {
            chain(
                name,
                FilterChainMatch {
                    server_names: vec![server.to_string()],
                    application_protocols: alpn.iter().map(|p| p.to_string()).collect(),
                    ..Default::default()
                },
                tcp(cluster),
            )
        };
        let (one, h2, other) = (
            "outbound|443||one.example.com",
            "outbound|443|h2|two.example.com",
            "outbound|443||two.example.com",
        );
        add_listener(
            &mut r,
            listener(
                "0.0.0.0_443",
                "0.0.0.0:443",
                vec![
                    by_name("one", "one.example.com", &[], one),
                    // The name's first chain matches on the name alone; the next ones,
                    // under the same name, are told apart by ALPN or taken already.
                    by_name("two", "two.example.com", &[], other),
                    by_name("two-h2", "two.example.com", &["h2"], h2),
                    by_name("two-again", "two.example.com", &[], one),
                ],
            ),
        );
        for name in [one, h2, other] {
            add_cluster(
                &mut r,
                cluster(name, Discovery::OriginalDst(Default::default()), &[]),
            );
        }
        let s = index(&r);
        let pick = |sni: &str, alpn: &'static [&'static str]| {
            named(&s.route_connection(&Connection {
                destination: Some(ip("1.2.3.4")),
                port: 443,
                server_name: Some(sni),
                tls: true,
                application_protocols: alpn,
                ..Connection::default()
            }))
        };
        assert_eq!(pick("one.example.com", &[]), one);
        assert_eq!(pick("One.Example.com", &["h2"]), one);
        assert_eq!(pick("two.example.com", &["h2", "http/1.1"]), h2);
        assert_eq!(pick("two.example.com", &["http/1.1"]), other);
        assert_eq!(pick("two.example.com", &[]), other);
        // No chain for the name and no default chain: Envoy closes the connection (NR).
        assert_eq!(pick("three.example.com", &[]), "NoFilterChain");
        assert!(
            s.warnings
                .iter()
                .any(|w| w.contains("\"two-again\" has the same match as an earlier one")),
            "{:?}",
            s.warnings
        );
    }

    #[test]
    fn sni_picks_exact_then_longest_wildcard_and_the_exact_listener_comes_first() {
        let s = index(&tls_port());
        let api = "outbound|443||api.example.com";
        let wild = "outbound|443||*.example.com";
        for (dst, sni, want) in [
            ("1.2.3.4:443", Some("api.example.com"), api),
            ("1.2.3.4:443", Some("API.example.com."), api),
            ("1.2.3.4:443", Some("www.example.com"), wild),
            ("1.2.3.4:443", Some("a.b.example.com"), wild),
            (
                "1.2.3.4:443",
                Some("x.eu.example.com"),
                "outbound|443||*.eu.example.com",
            ),
            // `*.example.com` does not take `example.com` itself.
            ("1.2.3.4:443", Some("example.com"), "BlackHole"),
            ("1.2.3.4:443", None, "BlackHole"),
            // The listener bound to the exact destination wins over SNI on the wildcard one.
            (
                "10.0.0.5:443",
                Some("api.example.com"),
                "outbound|443||db.internal",
            ),
        ] {
            assert_eq!(tls(&s, dst, sni), want, "{dst} {sni:?}");
        }
        assert!(s.is_tcp_destination(ip("10.0.0.5"), 443));
        assert!(!s.is_tcp_destination(ip("10.0.0.6"), 443));
        let cands = s.candidates(Some(ip("1.2.3.4")), 443).unwrap();
        assert!(cands.needs_inspection());
        // The explicit proxy's CONNECT: the name as SNI on the port's listener.
        assert_eq!(
            named(&s.route_name_or_address(Some("api.example.com"), None, 443)),
            "outbound|443||api.example.com"
        );
        assert_eq!(
            named(&s.route_name_or_address(Some("nope.org"), None, 443)),
            "BlackHole"
        );
        assert_eq!(
            named(&s.route_name_or_address(Some("10.0.0.5"), Some(ip("10.0.0.5")), 443)),
            "outbound|443||db.internal"
        );
        assert_eq!(
            s.cluster("outbound|443||api.example.com").unwrap().protocol,
            Protocol::Tls
        );
        assert_eq!(
            s.cluster("outbound|443||db.internal").unwrap().protocol,
            Protocol::Tcp
        );
    }

    #[test]
    fn the_most_specific_destination_range_wins_without_backtracking() {
        let mut r = seed(false);
        let ranged = |name: &str, ranges: &[&str], names: &[&str], cluster: &str| {
            chain(
                name,
                FilterChainMatch {
                    prefix_ranges: ranges.iter().map(|n| net(n)).collect(),
                    server_names: names.iter().map(|n| n.to_string()).collect(),
                    ..Default::default()
                },
                tcp(cluster),
            )
        };
        add_listener(
            &mut r,
            listener(
                "0.0.0.0_6379",
                "0.0.0.0:6379",
                vec![
                    ranged("wide", &["10.0.0.0/8"], &[], "wide"),
                    ranged("narrow", &["10.1.0.0/16", "192.168.0.0/24"], &[], "narrow"),
                    ranged("named", &["172.16.0.0/12"], &["only.example"], "named"),
                    ranged("rest", &[], &[], "rest"),
                ],
            ),
        );
        for n in ["wide", "narrow", "named", "rest"] {
            add_cluster(&mut r, cluster(n, Discovery::Static, &["127.0.0.1:1"]));
        }
        let s = index(&r);
        let tcp_to = |d: &str| named(&s.route_tcp(ip(d), 6379));
        assert_eq!(tcp_to("10.1.2.3"), "narrow");
        assert_eq!(tcp_to("10.2.0.1"), "wide");
        assert_eq!(tcp_to("192.168.0.7"), "narrow");
        assert_eq!(tcp_to("8.8.8.8"), "rest");
        assert_eq!(tcp_to("::ffff:10.1.0.1"), "narrow");
        // 172.16/12 has a chain, for one SNI only: Envoy does not fall back to the chain
        // without ranges (checked against Envoy 1.40: the connection is closed).
        assert_eq!(tcp_to("172.16.0.1"), "NoFilterChain");
        assert_eq!(tls(&s, "172.16.0.1:6379", Some("only.example")), "named");
        assert!(s.is_tcp_destination(ip("10.1.2.3"), 6379));
        assert!(!s.is_tcp_destination(ip("172.16.0.1"), 6379));
    }

    #[test]
    fn virtual_outbound_chains_match_destination_port_and_default_chain() {
        let mut r = seed(false);
        let vo = Arc::make_mut(r.listeners.get_mut(envoy::VIRTUAL_OUTBOUND).unwrap());
        vo.filter_chains.push(chain(
            "pods",
            FilterChainMatch {
                destination_port: Some(9000),
                prefix_ranges: vec![net("10.244.0.7/32")],
                ..Default::default()
            },
            tcp(envoy::PASSTHROUGH_CLUSTER),
        ));
        let mut only_named = listener(
            "0.0.0.0_7000",
            "0.0.0.0:7000",
            vec![chain(
                "n",
                FilterChainMatch {
                    server_names: vec!["x.example".into()],
                    ..Default::default()
                },
                tcp("outbound|80||app.internal.com"),
            )],
        );
        let s = index(&r);
        assert!(matches!(
            s.route_tcp(ip("10.244.0.7"), 9000),
            Decision::Passthrough
        ));
        // Port 9000 has chains of its own, so the port-less catch-all is not consulted:
        // Envoy's matching never backtracks to a less specific level (checked against
        // Envoy 1.40: `no_filter_chain_match`, connection closed).
        assert!(matches!(
            s.route_tcp(ip("10.244.0.8"), 9000),
            Decision::NoFilterChain
        ));
        assert!(matches!(
            s.route_tcp(ip("10.244.0.7"), 9001),
            Decision::BlackHole
        ));
        assert_eq!(s.outbound_mode(), OutboundMode::RegistryOnly);
        add_listener(&mut r, only_named.clone());
        let s = index(&r);
        assert_eq!(tls(&s, "1.1.1.1:7000", Some("y.example")), "NoFilterChain");
        only_named.default_filter_chain = Some(chain(
            "default",
            FilterChainMatch::default(),
            tcp(envoy::PASSTHROUGH_CLUSTER),
        ));
        add_listener(&mut r, only_named);
        let s = index(&r);
        assert_eq!(tls(&s, "1.1.1.1:7000", Some("y.example")), "Passthrough");
        assert_eq!(
            tls(&s, "1.1.1.1:7000", Some("x.example")),
            "outbound|80||app.internal.com"
        );
    }

    #[test]
    fn sniffed_ports_split_http_from_other_bytes() {
        let mut r = seed(false);
        add_listener(
            &mut r,
            listener(
                "0.0.0.0_8080",
                "0.0.0.0:8080",
                vec![
                    chain(
                        "http",
                        FilterChainMatch {
                            application_protocols: vec!["http/1.1".into(), "h2c".into()],
                            transport_protocol: Some("raw_buffer".into()),
                            ..Default::default()
                        },
                        hcm("80"),
                    ),
                    chain(
                        "tcp",
                        FilterChainMatch {
                            transport_protocol: Some("raw_buffer".into()),
                            ..Default::default()
                        },
                        tcp("outbound|80||app.internal.com"),
                    ),
                    chain(
                        "tls",
                        FilterChainMatch {
                            transport_protocol: Some("tls".into()),
                            ..Default::default()
                        },
                        tcp(envoy::PASSTHROUGH_CLUSTER),
                    ),
                ],
            ),
        );
        let s = index(&r);
        assert!(!s.is_tcp_destination(ip("10.0.0.1"), 8080));
        assert!(
            s.candidates(Some(ip("10.0.0.1")), 8080)
                .unwrap()
                .needs_inspection()
        );
        let conn = |alpn: &'static [&'static str]| Connection {
            destination: Some(ip("10.0.0.1")),
            port: 8080,
            application_protocols: alpn,
            ..Connection::default()
        };
        assert!(s.serves_http(&conn(&["h2c"])));
        assert!(!s.serves_http(&conn(&[])));
        assert_eq!(
            named(&s.route_connection(&conn(&[]))),
            "outbound|80||app.internal.com"
        );
        assert_eq!(
            named(&http(&s, "10.0.0.1:8080", "app.internal.com", "/", &[]).decision),
            "outbound|80||app.internal.com"
        );
        assert_eq!(tls(&s, "10.0.0.1:8080", Some("x.example")), "Passthrough");
        // Without `raw_buffer` on the TCP chain, raw bytes that are not HTTP land in the
        // raw_buffer bucket, which has no chain for them: closed, as Envoy 1.40 does
        // (checked with tls_inspector and http_inspector on a static listener).
        let l = Arc::make_mut(r.listeners.get_mut("0.0.0.0_8080").unwrap());
        l.filter_chains[1].filter_chain_match.transport_protocol = None;
        let s = index(&r);
        assert_eq!(named(&s.route_connection(&conn(&[]))), "NoFilterChain");
    }

    fn table(vhosts: Vec<envoy::VirtualHost>, ignore_port: bool) -> Snapshot {
        let mut r = seed(false);
        r.routes.insert(
            "80".into(),
            Arc::new(envoy::RouteConfiguration {
                name: "80".into(),
                virtual_hosts: vhosts,
                ignore_port_in_host_matching: ignore_port,
                ..Default::default()
            }),
        );
        for name in ["exact", "suffix", "longer", "prefix", "any", "other"] {
            add_cluster(&mut r, cluster(name, Discovery::Static, &["127.0.0.1:1"]));
        }
        index(&r)
    }

    fn to(name: &str) -> Vec<envoy::Route> {
        vec![route("r", RouteMatch::any(), forward(name))]
    }

    /// Every case below was checked against Envoy 1.40 with the same domains in a static
    /// route configuration.
    #[test]
    fn virtual_hosts_follow_envoys_domain_precedence() {
        let vhosts = vec![
            vhost("any", &["*"], to("any")),
            vhost("prefix", &["api.*"], to("prefix")),
            vhost("suffix", &["*.example.com"], to("suffix")),
            vhost(
                "longer",
                &["*-x.eu.example.com", "*.eu.example.com"],
                to("longer"),
            ),
            vhost(
                "exact",
                &["api.example.com", "api.example.com:8080"],
                to("exact"),
            ),
        ];
        let s = table(vhosts, true);
        let host = |h: &str| named(&http(&s, "10.0.0.1:80", h, "/", &[]).decision);
        for (authority, want) in [
            ("api.example.com", "exact"),
            ("api.example.com:9999", "exact"),
            ("www.example.com", "suffix"),
            ("a.eu.example.com", "longer"),
            ("a-x.eu.example.com", "longer"),
            ("api.other.org", "prefix"),
            ("example.com", "any"),
            ("api", "any"),
        ] {
            assert_eq!(host(authority), want, "{authority}");
        }
        let vhosts = vec![
            vhost("exact", &["api.example.com"], to("exact")),
            vhost("other", &["api.example.com:8080"], to("other")),
        ];
        // Without ignore_port_in_host_matching the port is part of the domain.
        let s = table(vhosts, false);
        let host = |h: &str| named(&http(&s, "10.0.0.1:80", h, "/", &[]).decision);
        assert_eq!(host("api.example.com"), "exact");
        assert_eq!(host("api.example.com:8080"), "other");
        assert_eq!(host("api.example.com:9999"), "NoRoute");
    }

    #[test]
    fn routes_match_in_order_on_path_headers_and_query() {
        use envoy::{
            HeaderMatch, HeaderMatcher, PathMatch, QueryParameterMatcher, StringMatcher,
            StringPattern,
        };
        let m = |path: PathMatch, case_sensitive: bool| RouteMatch {
            path,
            case_sensitive,
            headers: Vec::new(),
            query_parameters: Vec::new(),
        };
        let mut header = m(PathMatch::Prefix("/h".into()), true);
        header.headers = vec![
            HeaderMatcher {
                name: "x-team".into(),
                matcher: HeaderMatch::String(StringMatcher {
                    pattern: StringPattern::Exact("Blue".into()),
                    ignore_case: true,
                }),
                invert_match: false,
                treat_missing_header_as_empty: false,
            },
            HeaderMatcher {
                name: "x-debug".into(),
                matcher: HeaderMatch::Present(true),
                invert_match: true,
                treat_missing_header_as_empty: false,
            },
        ];
        let mut query = m(PathMatch::Prefix("/q".into()), true);
        query.query_parameters = vec![QueryParameterMatcher {
            name: "v".into(),
            matcher: Some(StringMatcher {
                pattern: StringPattern::Regex("[0-9]+".into()),
                ignore_case: false,
            }),
        }];
        let routes = vec![
            route(
                "exact-path",
                m(PathMatch::Path("/exact".into()), true),
                forward("exact"),
            ),
            route(
                "insensitive",
                m(PathMatch::Prefix("/CASE".into()), false),
                forward("prefix"),
            ),
            route(
                "separated",
                m(PathMatch::PathSeparatedPrefix("/api".into()), true),
                forward("suffix"),
            ),
            route(
                "regex",
                m(PathMatch::Regex("/r/[a-z]+".into()), true),
                forward("longer"),
            ),
            route("header", header, forward("other")),
            route("query", query, forward("any")),
            route(
                "missing",
                m(PathMatch::Prefix("/missing".into()), true),
                forward("no-such-cluster"),
            ),
            route(
                "blocked",
                m(PathMatch::Prefix("/blocked".into()), true),
                BLOCK_ALL,
            ),
            route(
                "redirect",
                m(PathMatch::Prefix("/old".into()), true),
                RouteAction::Redirect(Box::new(envoy::Redirect {
                    scheme: Some("https".into()),
                    prefix_rewrite: Some("/new".into()),
                    status: 301,
                    ..Default::default()
                })),
            ),
        ];
        let s = table(vec![vhost("all", &["*"], routes)], true);
        let go = |path: &str, headers: &'static [(&'static str, &'static str)]| {
            named(&http(&s, "10.0.0.1:80", "h.example", path, headers).decision)
        };
        let none = "NoRoute";
        for (path, headers, want) in [
            ("/exact", &[][..], "exact"),
            ("/exact?x=1", &[], "exact"),
            ("/exact/more", &[], none),
            ("/case/x", &[], "prefix"),
            ("/api", &[], "suffix"),
            ("/api/v1", &[], "suffix"),
            ("/apiv1", &[], none),
            ("/r/abc", &[], "longer"),
            ("/r/abc1", &[], none),
            ("/h", &[("x-team", "blue")], "other"),
            ("/h", &[("x-team", "blue"), ("x-debug", "1")], none),
            ("/h", &[], none),
            ("/q?a=b&v=42", &[], "any"),
            ("/q?v=x", &[], none),
            ("/q", &[], none),
            ("/missing", &[], "NoCluster(\"no-such-cluster\")"),
            ("/blocked", &[], "direct 502"),
        ] {
            assert_eq!(go(path, headers), want, "{path} {headers:?}");
        }
        let Decision::Direct(redirect) =
            http(&s, "10.0.0.1:80", "h.example:8080", "/old/page?k=v", &[]).decision
        else {
            panic!("not a redirect");
        };
        assert_eq!(redirect.status, 301);
        assert_eq!(
            redirect.location.as_deref(),
            Some("https://h.example/new/page?k=v")
        );
    }

    #[test]
    fn paths_are_rewritten_by_prefix_or_by_regex_with_re2_groups() {
        let rewrite = |m: RouteMatch, prefix: Option<&str>, regex: Option<(&str, &str)>| {
            let action = RouteAction::Forward(Arc::new(envoy::Forward {
                prefix_rewrite: prefix.map(str::to_string),
                regex_rewrite: regex.map(|(pattern, substitution)| envoy::RegexRewrite {
                    pattern: pattern.into(),
                    substitution: substitution.into(),
                }),
                ..envoy::Forward::to("exact")
            }));
            let s = table(
                vec![vhost("all", &["*"], vec![route("r", m, action)])],
                true,
            );
            move |path: &str| {
                http(&s, "10.0.0.1:80", "h", path, &[])
                    .route
                    .and_then(|r| r.rewrite_path(path))
            }
        };
        let by_prefix = rewrite(
            RouteMatch {
                path: envoy::PathMatch::Prefix("/old".into()),
                ..RouteMatch::any()
            },
            Some("/new"),
            None,
        );
        assert_eq!(by_prefix("/old/a?q=1").as_deref(), Some("/new/a?q=1"));
        let by_regex = rewrite(
            RouteMatch::any(),
            None,
            Some((r"^/v(\d+)/(.*)$", r"/api/\2/v\1")),
        );
        assert_eq!(
            by_regex("/v2/users?x=1").as_deref(),
            Some("/api/users/v2?x=1")
        );
        assert_eq!(by_regex("/other").as_deref(), Some("/other"));
        let none = rewrite(RouteMatch::any(), None, None);
        assert_eq!(none("/a"), None);
    }

    #[test]
    fn weighted_clusters_are_drawn_in_proportion() {
        let weighted = RouteAction::Forward(Arc::new(envoy::Forward {
            cluster: ClusterSpecifier::Weighted(
                [("exact", 1), ("other", 1), ("any", 0)]
                    .iter()
                    .map(|(n, w)| envoy::WeightedCluster::new(n.to_string(), *w))
                    .collect(),
            ),
            ..envoy::Forward::to("")
        }));
        let s = table(
            vec![vhost(
                "all",
                &["*"],
                vec![route("w", RouteMatch::any(), weighted)],
            )],
            true,
        );
        let mut seen = BTreeMap::new();
        for _ in 0..2000 {
            *seen
                .entry(named(&http(&s, "10.0.0.1:80", "h", "/", &[]).decision))
                .or_insert(0) += 1;
        }
        assert_eq!(seen.keys().collect::<Vec<_>>(), ["exact", "other"]);
        assert!(seen.values().all(|n| *n > 700), "{seen:?}");
    }

    #[test]
    fn original_dst_clusters_carry_port_override_and_allowed_destinations() {
        let mut r = seed(false);
        add_cluster(
            &mut r,
            cluster(
                "outbound|80||none.example",
                Discovery::OriginalDst(envoy::OriginalDst {
                    port_override: Some(9090),
                    allowed_destinations: Some(vec![net("10.9.0.0/16")]),
                }),
                &[],
            ),
        );
        let s = index(&r);
        let c = s.cluster("outbound|80||none.example").unwrap();
        assert_eq!(
            (c.resolution, c.passthrough_port),
            (portcullis_model::Resolution::None, Some(9090))
        );
        assert!(Snapshot::owns_destination(c, ip("10.9.1.1")));
        assert!(!Snapshot::owns_destination(c, ip("10.8.1.1")));
        // Without a guard, as Envoy: any destination.
        let pass = s.cluster(envoy::PASSTHROUGH_CLUSTER).unwrap();
        assert!(Snapshot::owns_destination(pass, ip("10.8.1.1")));
    }

    #[test]
    fn eds_uses_the_lowest_priority_with_usable_endpoints() {
        let mut r = seed(false);
        add_cluster(
            &mut r,
            cluster(
                "outbound|80||eds.example",
                Discovery::Eds {
                    service_name: "eds".into(),
                },
                &[],
            ),
        );
        let with = |address: &str, health: HealthStatus, weight: u32| LbEndpoint {
            health,
            load_balancing_weight: weight,
            ..endpoint(address)
        };
        let locality = |priority: u32, endpoints: Vec<LbEndpoint>| LocalityLbEndpoints {
            priority,
            lb_endpoints: endpoints,
            ..Default::default()
        };
        let assign = |r: &mut Resources, localities: Vec<LocalityLbEndpoints>| {
            r.endpoints.insert(
                "eds".into(),
                Arc::new(envoy::ClusterLoadAssignment {
                    cluster_name: "eds".into(),
                    endpoints: localities,
                }),
            );
        };
        assign(
            &mut r,
            vec![
                locality(
                    1,
                    vec![
                        with("10.0.1.1:80", HealthStatus::Healthy, 3),
                        with("10.0.1.2:80", HealthStatus::Draining, 1),
                    ],
                ),
                locality(
                    0,
                    vec![
                        with("10.0.0.1:80", HealthStatus::Unhealthy, 1),
                        with("10.0.0.2:80", HealthStatus::Timeout, 1),
                    ],
                ),
            ],
        );
        let s = index(&r);
        let eps = |s: &Snapshot| {
            s.cluster("outbound|80||eds.example")
                .unwrap()
                .endpoints
                .iter()
                .map(|e| format!("{} w{}", e.display(), e.weight))
                .collect::<Vec<_>>()
        };
        assert_eq!(eps(&s), ["10.0.1.1:80 w3"]);
        assign(
            &mut r,
            vec![locality(
                0,
                vec![
                    with("10.0.0.1:80", HealthStatus::Degraded, 1),
                    with("10.0.0.2:80", HealthStatus::Healthy, 2),
                ],
            )],
        );
        assert_eq!(eps(&index(&r)), ["10.0.0.2:80 w2"]);
        assign(
            &mut r,
            vec![locality(
                0,
                vec![with("10.0.0.1:80", HealthStatus::Degraded, 1)],
            )],
        );
        assert_eq!(eps(&index(&r)), ["10.0.0.1:80 w1"]);
        r.endpoints.clear();
        assert!(eps(&index(&r)).is_empty());
    }

    #[test]
    fn eds_priorities_and_localities_reach_the_balancer() {
        let mut r = seed(false);
        add_cluster(
            &mut r,
            envoy::Cluster {
                locality_weighted: true,
                ..cluster(
                    "outbound|80||eds.example",
                    Discovery::Eds {
                        service_name: "eds".into(),
                    },
                    &[],
                )
            },
        );
        let locality =
            |zone: &str, priority: u32, weight: u32, addresses: &[&str]| LocalityLbEndpoints {
                locality: envoy::Locality {
                    zone: zone.into(),
                    ..Default::default()
                },
                priority,
                load_balancing_weight: Some(weight),
                lb_endpoints: addresses.iter().map(|a| endpoint(a)).collect(),
            };
        r.endpoints.insert(
            "eds".into(),
            Arc::new(envoy::ClusterLoadAssignment {
                cluster_name: "eds".into(),
                endpoints: vec![
                    locality("a", 0, 1, &["10.0.0.1:80"]),
                    locality("b", 0, 3, &["10.0.0.2:80"]),
                    locality("c", 1, 1, &["10.0.0.3:80"]),
                ],
            }),
        );
        let s = index(&r);
        let c = s.cluster("outbound|80||eds.example").unwrap();
        let now = std::time::Instant::now();
        let mut counts = [0usize; 3];
        for _ in 0..20_000 {
            let (i, _) = c.pick_hashed(None, (&[], None), now).expect("picks");
            counts[i] += 1;
        }
        // Priority 1 idles while priority 0 is healthy; zones a and b split 1:3.
        assert_eq!(counts[2], 0, "{counts:?}");
        let share = counts[1] as f64 / 20_000.0;
        assert!((share - 0.75).abs() < 0.02, "{counts:?}");
    }

    #[test]
    fn dns_clusters_resolve_through_the_lookup_and_report_their_names() {
        let mut r = seed(false);
        add_cluster(
            &mut r,
            cluster(
                "outbound|443||strict.example",
                Discovery::StrictDns,
                &["Strict.example:443"],
            ),
        );
        add_cluster(
            &mut r,
            cluster(
                "outbound|443||logical.example",
                Discovery::LogicalDns,
                &["logical.example:443"],
            ),
        );
        let answers = |name: &str| -> Option<Arc<[IpAddr]>> {
            (name.ends_with(".example")).then(|| Arc::from(vec![ip("192.0.2.1"), ip("192.0.2.2")]))
        };
        let s = Snapshot::index(&r, &answers, None, 1);
        assert_eq!(
            s.dns_names.iter().collect::<Vec<_>>(),
            ["logical.example", "strict.example"]
        );
        let eps = |name: &str| {
            s.cluster(name)
                .unwrap()
                .endpoints
                .iter()
                .map(|e| (e.display(), e.hostname.as_deref().unwrap_or("").to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            eps("outbound|443||strict.example"),
            [
                ("192.0.2.1:443".into(), "strict.example".into()),
                ("192.0.2.2:443".into(), "strict.example".into())
            ]
        );
        assert_eq!(
            eps("outbound|443||logical.example"),
            [("192.0.2.1:443".to_string(), "logical.example".to_string())]
        );
    }

    #[test]
    fn endpoints_needing_tls_are_marked_and_counters_survive_a_reload() {
        let mut r = seed(false);
        let mut c = cluster(
            "outbound|80||mesh.internal",
            Discovery::Static,
            &["10.0.0.1:80", "10.0.0.2:80"],
        );
        c.transport_socket_matches = vec![
            envoy::TransportSocketMatch {
                name: "tlsMode-istio".into(),
                match_metadata: BTreeMap::from([("tlsMode".to_string(), "istio".to_string())]),
                transport: UpstreamTransport::IstioMutualTls(Default::default()),
            },
            envoy::TransportSocketMatch {
                name: "tlsMode-disabled".into(),
                match_metadata: BTreeMap::new(),
                transport: UpstreamTransport::Plaintext,
            },
        ];
        let eps = &mut c.load_assignment.as_mut().unwrap().endpoints[0].lb_endpoints;
        eps[0]
            .transport_socket_match
            .insert("tlsMode".into(), "istio".into());
        add_cluster(&mut r, c);
        let first = index(&r);
        let c = first.cluster("outbound|80||mesh.internal").unwrap();
        assert!(matches!(
            c.endpoints[0].transport,
            crate::EndpointTransport::IstioMutual(_)
        ));
        assert!(matches!(
            c.endpoints[1].transport,
            crate::EndpointTransport::Plaintext
        ));
        let _active = c.endpoints[1].state.start();
        // A new version of the cluster is built again.
        Arc::make_mut(r.clusters.get_mut("outbound|80||mesh.internal").unwrap()).connect_timeout =
            std::time::Duration::from_millis(1234);
        let second = Snapshot::index(&r, &|_| None, Some(&first), 2);
        let rebuilt = second.cluster("outbound|80||mesh.internal").unwrap();
        assert!(!Arc::ptr_eq(
            rebuilt,
            first.cluster("outbound|80||mesh.internal").unwrap()
        ));
        let c = second.cluster("outbound|80||mesh.internal").unwrap();
        assert_eq!(
            (c.endpoints[1].state.active(), c.endpoints[0].state.active()),
            (1, 0)
        );
        assert_eq!(second.version, 2);
    }

    #[test]
    fn a_cluster_built_from_the_same_resources_is_shared_by_the_next_snapshot() {
        let mut r = seed(false);
        let a = || {
            cluster(
                "outbound|80||a.internal",
                Discovery::Static,
                &["10.0.0.1:80"],
            )
        };
        add_cluster(&mut r, a());
        let eds = |name: &str| envoy::Cluster {
            discovery: Discovery::Eds {
                service_name: name.into(),
            },
            ..cluster(name, Discovery::Static, &[])
        };
        // Each endpoint is its own workload, named after its address.
        let assignment = |name: &str, ep: &str| envoy::ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![envoy::LocalityLbEndpoints {
                lb_endpoints: vec![envoy::LbEndpoint {
                    workload: envoy::WorkloadMetadata::parse(&format!("{ep};ns;svc;v1;c"))
                        .map(Arc::new),
                    ..envoy::LbEndpoint::new(envoy::EndpointAddress::Socket(ep.parse().unwrap()))
                }],
                ..Default::default()
            }],
        };
        let workload = |s: &Snapshot, name: &str| {
            s.cluster(name).unwrap().endpoints[0]
                .workload
                .as_ref()
                .map(|w| w.name.to_string())
        };
        for name in ["outbound|80||b.internal", "outbound|80||c.internal"] {
            add_cluster(&mut r, eds(name));
            r.endpoints
                .insert(name.into(), Arc::new(assignment(name, "10.0.0.2:80")));
        }
        add_cluster(
            &mut r,
            cluster("outbound|80||d.internal", Discovery::StrictDns, &[]),
        );
        let first = index(&r);
        let same = |s: &Snapshot, name: &str| {
            Arc::ptr_eq(s.cluster(name).unwrap(), first.cluster(name).unwrap())
        };
        // One endpoint update (EDS) to c: only c is built again.
        r.endpoints.insert(
            "outbound|80||c.internal".into(),
            Arc::new(assignment("outbound|80||c.internal", "10.0.0.3:80")),
        );
        let second = Snapshot::index(&r, &|_| None, Some(&first), 2);
        assert!(same(&second, "outbound|80||a.internal"));
        assert!(same(&second, "outbound|80||b.internal"));
        assert!(!same(&second, "outbound|80||c.internal"));
        let c = second.cluster("outbound|80||c.internal").unwrap();
        assert_eq!(c.endpoints[0].display(), "10.0.0.3:80");
        // The shared cluster keeps its endpoints' workloads; the rebuilt one has the new.
        assert_eq!(
            workload(&second, "outbound|80||b.internal").as_deref(),
            Some("10.0.0.2:80")
        );
        assert_eq!(
            workload(&second, "outbound|80||c.internal").as_deref(),
            Some("10.0.0.3:80")
        );
        // Names resolve anew every time.
        assert!(!same(&second, "outbound|80||d.internal"));
        // A cluster replaced by an equal one is shared, as Envoy skips an update that does
        // not change a cluster; a changed one is built again.
        add_cluster(&mut r, a());
        let third = Snapshot::index(&r, &|_| None, Some(&second), 3);
        assert!(same(&third, "outbound|80||a.internal"));
        let mut changed = a();
        changed.connect_timeout = std::time::Duration::from_millis(1234);
        add_cluster(&mut r, changed);
        let fourth = Snapshot::index(&r, &|_| None, Some(&third), 4);
        assert!(!same(&fourth, "outbound|80||a.internal"));
        assert!(same(&fourth, "outbound|80||b.internal"));
    }

    #[test]
    fn a_cluster_is_built_again_when_its_eds_service_or_its_use_by_listeners_changes() {
        let mut r = seed(false);
        let web = "outbound|80||web.internal";
        add_cluster(
            &mut r,
            envoy::Cluster {
                discovery: Discovery::Eds {
                    service_name: "web-endpoints".into(),
                },
                ..cluster(web, Discovery::Static, &[])
            },
        );
        let endpoints = |r: &mut Resources, ep: &str| {
            r.endpoints.insert(
                "web-endpoints".into(),
                Arc::new(envoy::ClusterLoadAssignment {
                    cluster_name: "web-endpoints".into(),
                    endpoints: vec![envoy::LocalityLbEndpoints {
                        lb_endpoints: vec![envoy::LbEndpoint::new(envoy::EndpointAddress::Socket(
                            ep.parse().unwrap(),
                        ))],
                        ..Default::default()
                    }],
                }),
            );
        };
        endpoints(&mut r, "10.0.0.2:80");
        add_listener(
            &mut r,
            listener(
                "10.0.0.9_80",
                "10.0.0.9:80",
                vec![chain("", FilterChainMatch::default(), tcp(web))],
            ),
        );
        let first = index(&r);
        let web_of = |s: &Snapshot| Arc::clone(s.cluster(web).unwrap());
        assert_eq!(web_of(&first).protocol, Protocol::Tcp);
        // The endpoints of the service the cluster names, under another name than its own.
        endpoints(&mut r, "10.0.0.3:80");
        let second = Snapshot::index(&r, &|_| None, Some(&first), 2);
        assert_eq!(web_of(&second).endpoints[0].display(), "10.0.0.3:80");
        // Unchanged: shared.
        let third = Snapshot::index(&r, &|_| None, Some(&second), 3);
        assert!(Arc::ptr_eq(&web_of(&second), &web_of(&third)));
        // No listener proxies TCP to it any more: HTTP, as routes would use it.
        r.listeners.remove("10.0.0.9_80");
        let fourth = Snapshot::index(&r, &|_| None, Some(&third), 4);
        assert_eq!(web_of(&fourth).protocol, Protocol::Http);
        // Removed with its resource.
        r.clusters.remove(web);
        let fifth = Snapshot::index(&r, &|_| None, Some(&fourth), 5);
        assert!(fifth.cluster(web).is_none());
        assert_eq!(fifth.clusters.len(), first.clusters.len() - 1);
    }

    #[test]
    fn circuit_breakers_and_connect_timeout_reach_the_cluster_and_counts_survive_a_reload() {
        use crate::limits::Resource;
        use std::time::Duration;
        let mut r = seed(false);
        let mut c = cluster(
            "outbound|80||limited.internal",
            Discovery::Static,
            &["10.0.0.1:80"],
        );
        c.connect_timeout = Duration::from_millis(250);
        c.circuit_breakers = envoy::Thresholds {
            max_connections: 1,
            max_pending_requests: 2,
            max_requests: 3,
            max_retries: 0,
        };
        add_cluster(&mut r, c);
        let first = index(&r);
        let c = first.cluster("outbound|80||limited.internal").unwrap();
        assert_eq!(c.connect_timeout, Duration::from_millis(250));
        assert_eq!(c.breakers.threshold(Resource::Requests), 3);
        assert_eq!(c.breakers.threshold(Resource::PendingRequests), 2);
        let held = c.breakers.acquire(Resource::Connections).unwrap();
        assert!(held.is_some());
        assert!(c.breakers.acquire(Resource::Retries).is_err());
        // A cluster that sets no thresholds has Envoy's defaults.
        let seeded = first.cluster("outbound|80||app.internal.com").unwrap();
        assert_eq!(seeded.breakers.threshold(Resource::Connections), 1024);
        assert_eq!(seeded.breakers.threshold(Resource::Retries), 3);
        // A reload keeps what is held: the one connection still counts against the limit,
        // in the new snapshot's cluster as in the old one's, also when the cluster is
        // built again from a new version of its resource.
        Arc::make_mut(r.clusters.get_mut("outbound|80||limited.internal").unwrap());
        let second = Snapshot::index(&r, &|_| None, Some(&first), 2);
        let c2 = second.cluster("outbound|80||limited.internal").unwrap();
        assert_eq!(c2.breakers.load.held(Resource::Connections), 1);
        assert!(c2.breakers.acquire(Resource::Connections).is_err());
        drop(held);
        assert!(
            c2.breakers
                .acquire(Resource::Connections)
                .unwrap()
                .is_some()
        );
        // A cluster of another name starts from nothing.
        let mut renamed = r.clone();
        let mut c = Arc::unwrap_or_clone(
            renamed
                .clusters
                .remove("outbound|80||limited.internal")
                .unwrap(),
        );
        c.name = "outbound|81||limited.internal".into();
        add_cluster(&mut renamed, c);
        let _held = c2.breakers.acquire(Resource::Connections).unwrap();
        let third = Snapshot::index(&renamed, &|_| None, Some(&second), 3);
        let c3 = third.cluster("outbound|81||limited.internal").unwrap();
        assert_eq!(c3.breakers.load.held(Resource::Connections), 0);
    }

    #[test]
    fn a_tcp_chain_carries_its_idle_timeout_and_max_duration() {
        use std::time::Duration;
        let mut r = seed(false);
        add_cluster(
            &mut r,
            cluster(
                "outbound|5432||db.internal",
                Discovery::Static,
                &["10.0.0.9:5432"],
            ),
        );
        add_cluster(
            &mut r,
            cluster(
                "outbound|6379||cache.internal",
                Discovery::Static,
                &["10.0.0.8:6379"],
            ),
        );
        let mut idle = tcp("outbound|5432||db.internal");
        if let NetworkFilter::TcpProxy(t) = &mut idle {
            t.idle_timeout = Some(Duration::from_secs(30));
            t.max_downstream_connection_duration = Some(Duration::from_secs(600));
        }
        add_listener(
            &mut r,
            listener(
                "10.0.0.9_5432",
                "10.0.0.9:5432",
                vec![chain("", FilterChainMatch::default(), idle)],
            ),
        );
        add_listener(
            &mut r,
            listener(
                "10.0.0.8_6379",
                "10.0.0.8:6379",
                vec![chain(
                    "",
                    FilterChainMatch::default(),
                    tcp("outbound|6379||cache.internal"),
                )],
            ),
        );
        let s = index(&r);
        let conn = |dst: &str| {
            let dst: std::net::SocketAddr = dst.parse().unwrap();
            Connection {
                destination: Some(dst.ip()),
                port: dst.port(),
                ..Connection::default()
            }
        };
        let (decision, chain) = s.route_connection_chain(&conn("10.0.0.9:5432"));
        assert_eq!(named(&decision), "outbound|5432||db.internal");
        let chain = chain.unwrap();
        assert_eq!(chain.idle_timeout, Some(Duration::from_secs(30)));
        assert_eq!(chain.max_duration, Some(Duration::from_secs(600)));
        // `None` in the model is Envoy's 0: never.
        let (decision, chain) = s.route_connection_chain(&conn("10.0.0.8:6379"));
        assert_eq!(named(&decision), "outbound|6379||cache.internal");
        let chain = chain.unwrap();
        assert_eq!(chain.idle_timeout, None);
        assert_eq!(chain.max_duration, None);
        // Without listeners there is no chain: the proxy's own timeout applies.
        let empty = Snapshot::index(&Resources::default(), &|_| None, None, 1);
        assert!(
            empty
                .route_connection_chain(&conn("10.0.0.9:5432"))
                .1
                .is_none()
        );
    }
}
