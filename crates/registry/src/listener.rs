//! Listeners and their filter chains, indexed for Envoy's original-destination hand-off
//! (`use_original_dst`) and its filter chain matching.
//!
//! Envoy matches a connection against a listener's chains level by level: destination
//! port, destination address (most specific range), server name (exact, then the longest
//! `*.` wildcard), transport protocol, application protocols, source address. At each level
//! the most specific bucket that matches is taken and never left again: there is no
//! backtracking to a less specific bucket when a later level fails. The tree below has one
//! level per criterion, each a hash lookup, so the cost does not grow with the number of
//! chains.

use std::collections::hash_map::Entry;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use portcullis_envoy as envoy;

use crate::Map;
use crate::cluster::Target;
use crate::host::normalized;
use crate::route::RouteTable;
use crate::snapshot::{Wildcards, canonical};

/// What is known about a connection when its filter chain is chosen.
#[derive(Debug, Clone, Copy, Default)]
pub struct Connection<'a> {
    /// The original destination address; `None` for the explicit proxy.
    pub destination: Option<IpAddr>,
    /// The destination port.
    pub port: u16,
    /// The ClientHello's SNI.
    pub server_name: Option<&'a str>,
    /// Whether the bytes are TLS (transport protocol `tls`, else `raw_buffer`).
    pub tls: bool,
    /// The ClientHello's ALPN, or `http/1.1` / `h2c` as sniffed.
    pub application_protocols: &'a [&'a str],
    /// The client's address.
    pub source: Option<IpAddr>,
}

/// A filter chain, ready for the data path.
#[derive(Debug)]
pub struct Chain {
    /// The chain's name.
    pub name: Arc<str>,
    /// The listener it belongs to.
    pub listener: Arc<str>,
    /// Its terminal filter.
    pub filter: ChainFilter,
    /// How long a connection it carries may go with no bytes either way: `tcp_proxy`'s
    /// `idle_timeout`, `None` never. HTTP chains: `None`; the model carries no connection
    /// idle timeout for them, so the proxy's own applies.
    pub idle_timeout: Option<Duration>,
    /// How long after it was accepted a connection it carries is closed (`tcp_proxy`'s
    /// `max_downstream_connection_duration`); `None` never, and always for HTTP chains.
    pub max_duration: Option<Duration>,
}

/// The terminal filter of a [`Chain`].
#[derive(Debug)]
pub enum ChainFilter {
    /// `tcp_proxy` to these clusters.
    Tcp(Target),
    /// `http_connection_manager` with this route table.
    Http(HttpChain),
}

/// An HTTP connection manager's settings.
#[derive(Debug)]
pub struct HttpChain {
    /// The route table's name (RDS) or the inline table's.
    pub route_name: Arc<str>,
    /// The route table; `None` when RDS has not delivered it (every request: 404 `NR`).
    pub routes: Option<Arc<RouteTable>>,
    /// Whether HTTP/1.0 requests are served.
    pub accept_http_10: bool,
    /// A stream with no activity this long ends (`stream_idle_timeout`); `None` never.
    pub stream_idle_timeout: Option<Duration>,
    /// A request must be received whole within this (`request_timeout`); `None` never.
    pub request_timeout: Option<Duration>,
}

/// One listener: its chains, indexed.
#[derive(Debug)]
pub(crate) struct Listener {
    tree: PortLevel,
    chains: Vec<Arc<Chain>>,
    default_chain: Option<Arc<Chain>>,
    /// The one chain of a listener whose single chain matches everything (Istio's per-VIP
    /// TCP listeners): taken without walking the tree.
    only: Option<Arc<Chain>>,
}

/// The chains left once a connection's destination port and address are known: all that
/// can be decided without reading from the connection.
#[derive(Debug, Clone, Copy)]
pub struct Candidates<'s> {
    listener: &'s Listener,
    names: Option<&'s NameLevel>,
}

impl Listener {
    fn candidates(&self, destination: Option<IpAddr>, port: u16) -> Candidates<'_> {
        let names = match self.only {
            Some(_) => None,
            None => self.tree.get(port).and_then(|ips| ips.get(destination)),
        };
        Candidates {
            listener: self,
            names,
        }
    }
}

impl<'s> Candidates<'s> {
    /// Whether choosing among the candidates needs the connection's first bytes (a
    /// ClientHello's SNI and ALPN, or HTTP sniffing): some chain matches on them.
    pub fn needs_inspection(&self) -> bool {
        self.names.is_some_and(|n| n.inspects)
    }

    /// The chain for a connection, or `None` when none matches and there is no default
    /// chain (Envoy closes the connection, flag `NR`).
    pub fn pick(&self, conn: &Connection<'_>) -> Option<&'s Arc<Chain>> {
        if let Some(only) = &self.listener.only {
            return Some(only);
        }
        self.names
            .and_then(|n| n.pick(conn))
            .map(|i| &self.listener.chains[i])
            .or(self.listener.default_chain.as_ref())
    }
}

/// Every listener, by the address a connection's original destination is matched against.
#[derive(Debug, Default)]
pub(crate) struct Listeners {
    exact: Map<SocketAddr, Listener>,
    wildcard_v4: Map<u16, Listener>,
    wildcard_v6: Map<u16, Listener>,
    /// The listener that hands connections on (`virtualOutbound`): it keeps those that no
    /// listener is bound for.
    hand_off: Option<Listener>,
}

impl Listeners {
    /// Indexes `resources`' listeners; `target` resolves a cluster specifier and `routes`
    /// a route table by name. Problems Envoy would reject are reported in `warnings`.
    pub(crate) fn index(
        resources: &envoy::Resources,
        target: &dyn Fn(&envoy::ClusterSpecifier) -> Target,
        routes: &Map<Box<str>, Arc<RouteTable>>,
        inline: &dyn Fn(&envoy::RouteConfiguration) -> Arc<RouteTable>,
        warnings: &mut Vec<String>,
    ) -> Listeners {
        let mut index = Listeners::default();
        for l in resources.listeners.values() {
            let listener = Listener::index(l, target, routes, inline, warnings);
            if l.use_original_dst {
                if index.hand_off.is_some() {
                    warnings.push(format!(
                        "listener {}: a second listener with use_original_dst is ignored",
                        l.name
                    ));
                    continue;
                }
                index.hand_off = Some(listener);
                continue;
            }
            let address = SocketAddr::new(canonical(l.address.ip()), l.address.port());
            let fresh = match address.ip() {
                ip if !ip.is_unspecified() => insert_new(&mut index.exact, address, listener),
                IpAddr::V4(_) => insert_new(&mut index.wildcard_v4, address.port(), listener),
                IpAddr::V6(_) => insert_new(&mut index.wildcard_v6, address.port(), listener),
            };
            if !fresh {
                warnings.push(format!(
                    "listener {}: address {address} is taken by another listener; ignored",
                    l.name
                ));
            }
        }
        index
    }

    /// The chains that may take a connection to `destination:port`, as Envoy's
    /// `use_original_dst` hand-off picks the listener: the one bound to exactly that
    /// address, else the wildcard one of the port (same address family first), else the
    /// hand-off listener itself. `None` without any of them.
    pub(crate) fn candidates(
        &self,
        destination: Option<IpAddr>,
        port: u16,
    ) -> Option<Candidates<'_>> {
        let destination = destination.map(canonical);
        let exact = destination.and_then(|ip| self.exact.get(&SocketAddr::new(ip, port)));
        let wildcard = || match destination {
            Some(IpAddr::V6(_)) => self
                .wildcard_v6
                .get(&port)
                .or_else(|| self.wildcard_v4.get(&port)),
            _ => self
                .wildcard_v4
                .get(&port)
                .or_else(|| self.wildcard_v6.get(&port)),
        };
        exact
            .or_else(wildcard)
            .or(self.hand_off.as_ref())
            .map(|l| l.candidates(destination, port))
    }

    /// The chain the hand-off listener gives a connection about which nothing is known:
    /// its catch-all, which carries the outbound traffic policy.
    pub(crate) fn catch_all(&self) -> Option<&Arc<Chain>> {
        self.hand_off
            .as_ref()
            .and_then(|l| l.candidates(None, 0).pick(&Connection::default()))
    }
}

impl Listener {
    fn index(
        l: &envoy::Listener,
        target: &dyn Fn(&envoy::ClusterSpecifier) -> Target,
        routes: &Map<Box<str>, Arc<RouteTable>>,
        inline: &dyn Fn(&envoy::RouteConfiguration) -> Arc<RouteTable>,
        warnings: &mut Vec<String>,
    ) -> Listener {
        let listener_name: Arc<str> = l.name.as_str().into();
        let chain = |c: &envoy::FilterChain| {
            let (idle_timeout, max_duration) = match &c.filter {
                envoy::NetworkFilter::TcpProxy(t) => {
                    (t.idle_timeout, t.max_downstream_connection_duration)
                }
                envoy::NetworkFilter::Http(_) => (None, None),
            };
            let filter = match &c.filter {
                envoy::NetworkFilter::TcpProxy(t) => ChainFilter::Tcp(target(&t.cluster)),
                envoy::NetworkFilter::Http(h) => {
                    let (route_name, table) = match &h.route_config {
                        envoy::RouteSource::Rds(name) => {
                            (name.as_str().into(), routes.get(name.as_str()).cloned())
                        }
                        envoy::RouteSource::Inline(rc) => {
                            (rc.name.as_str().into(), Some(inline(rc)))
                        }
                    };
                    ChainFilter::Http(HttpChain {
                        route_name,
                        routes: table,
                        accept_http_10: h.accept_http_10,
                        // Zero disables either, as in Envoy.
                        stream_idle_timeout: h.stream_idle_timeout.filter(|d| !d.is_zero()),
                        request_timeout: h.request_timeout.filter(|d| !d.is_zero()),
                    })
                }
            };
            Arc::new(Chain {
                name: c.name.as_str().into(),
                listener: Arc::clone(&listener_name),
                filter,
                idle_timeout,
                max_duration,
            })
        };
        let mut tree = PortLevel::default();
        let mut chains = Vec::with_capacity(l.filter_chains.len());
        for (i, c) in l.filter_chains.iter().enumerate() {
            if !tree.insert(&c.filter_chain_match, i) {
                // Envoy rejects the whole listener; keeping the first chain keeps the rest
                // of the listener working.
                warnings.push(format!(
                    "listener {}: filter chain {:?} has the same match as an earlier one; the earlier one is used",
                    l.name, c.name
                ));
            }
            chains.push(chain(c));
        }
        tree.finish();
        let only = match l.filter_chains.as_slice() {
            [one] if one.filter_chain_match == envoy::FilterChainMatch::default() => {
                chains.first().cloned()
            }
            _ => None,
        };
        Listener {
            tree,
            chains,
            default_chain: l.default_filter_chain.as_ref().map(chain),
            only,
        }
    }
}

/// Inserts unless the key is taken; whether it was inserted.
fn insert_new<K: std::hash::Hash + Eq, V>(map: &mut Map<K, V>, key: K, value: V) -> bool {
    match map.entry(key) {
        Entry::Occupied(_) => false,
        Entry::Vacant(v) => {
            v.insert(value);
            true
        }
    }
}

/// The value kept for `key` in a short list, added empty when missing.
fn slot<'a, T: Default>(list: &'a mut Vec<(Box<str>, T)>, key: &str) -> &'a mut T {
    let i = match list.iter().position(|(k, _)| **k == *key) {
        Some(i) => i,
        None => {
            list.push((key.into(), T::default()));
            list.len() - 1
        }
    };
    &mut list[i].1
}

/// A longest-prefix table: one hash lookup per distinct prefix length, longest first.
#[derive(Debug)]
struct Prefixes<T> {
    by_length: Vec<(u8, Map<IpNet, T>)>,
}

impl<T> Default for Prefixes<T> {
    fn default() -> Self {
        Prefixes {
            by_length: Vec::new(),
        }
    }
}

impl<T: Default> Prefixes<T> {
    fn entry(&mut self, net: IpNet) -> &mut T {
        let net = net.trunc();
        let len = net.prefix_len();
        let slot = match self.by_length.iter().position(|(l, _)| *l <= len) {
            Some(i) if self.by_length[i].0 == len => i,
            Some(i) => {
                self.by_length.insert(i, (len, Map::default()));
                i
            }
            None => {
                self.by_length.push((len, Map::default()));
                self.by_length.len() - 1
            }
        };
        self.by_length[slot].1.entry(net).or_default()
    }
}

impl<T> Prefixes<T> {
    fn get(&self, ip: IpAddr) -> Option<&T> {
        self.by_length.iter().find_map(|(len, nets)| {
            // A length that does not fit this address family fails and is skipped.
            IpNet::new(ip, *len)
                .ok()
                .and_then(|net| nets.get(&net.trunc()))
        })
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.by_length.iter_mut().flat_map(|(_, m)| m.values_mut())
    }
}

/// One level of the chain tree: it files a chain under the match's keys for its criterion.
trait Level: Default {
    /// Files `chain`; false when some place it goes to was taken already.
    fn insert(&mut self, m: &envoy::FilterChainMatch, chain: usize) -> bool;
}

/// Files `chain` in the next level under each of `keys` (with `file`), or under `any` when
/// the match sets no key for this criterion. Every key is filed even when an earlier one
/// was taken.
fn spread<K, N: Level>(
    keys: &[K],
    any: &mut Option<N>,
    mut file: impl FnMut(&K) -> bool,
    m: &envoy::FilterChainMatch,
    chain: usize,
) -> bool {
    if keys.is_empty() {
        return any.get_or_insert_default().insert(m, chain);
    }
    keys.iter().fold(true, |fresh, key| file(key) & fresh)
}

#[derive(Debug, Default)]
struct PortLevel {
    by_port: Map<u16, AddressLevel>,
    any: Option<AddressLevel>,
}

impl Level for PortLevel {
    fn insert(&mut self, m: &envoy::FilterChainMatch, chain: usize) -> bool {
        let by_port = &mut self.by_port;
        let at = |port: &u16| by_port.entry(*port).or_default().insert(m, chain);
        spread(m.destination_port.as_slice(), &mut self.any, at, m, chain)
    }
}

impl PortLevel {
    fn get(&self, port: u16) -> Option<&AddressLevel> {
        self.by_port.get(&port).or(self.any.as_ref())
    }

    fn finish(&mut self) {
        for a in self.by_port.values_mut().chain(self.any.as_mut()) {
            for n in a.ranges.values_mut().chain(a.any.as_mut()) {
                n.finish();
            }
        }
    }
}

#[derive(Debug, Default)]
struct AddressLevel {
    ranges: Prefixes<NameLevel>,
    any: Option<NameLevel>,
}

impl Level for AddressLevel {
    fn insert(&mut self, m: &envoy::FilterChainMatch, chain: usize) -> bool {
        let ranges = &mut self.ranges;
        let at = |net: &IpNet| ranges.entry(*net).insert(m, chain);
        spread(&m.prefix_ranges, &mut self.any, at, m, chain)
    }
}

impl AddressLevel {
    fn get(&self, destination: Option<IpAddr>) -> Option<&NameLevel> {
        destination
            .and_then(|ip| self.ranges.get(ip))
            .or(self.any.as_ref())
    }
}

#[derive(Debug, Default)]
struct NameLevel {
    exact: Map<Box<str>, Named>,
    wildcard: Wildcards<TransportLevel>,
    any: Option<TransportLevel>,
    /// Whether some chain below matches on what only the connection's bytes tell.
    inspects: bool,
}

impl Level for NameLevel {
    fn insert(&mut self, m: &envoy::FilterChainMatch, chain: usize) -> bool {
        let (exact, wildcard) = (&mut self.exact, &mut self.wildcard);
        let at = |name: &String| {
            let name = name.to_ascii_lowercase();
            let next = match name.strip_prefix('*') {
                Some(suffix) => {
                    if wildcard.get(suffix).is_none() {
                        wildcard.insert(suffix, TransportLevel::default());
                    }
                    wildcard.get_mut(suffix)
                }
                None => {
                    return match exact.entry(name.into_boxed_str()) {
                        Entry::Vacant(v) => {
                            v.insert(Named::of(m, chain));
                            true
                        }
                        Entry::Occupied(mut o) => o.get_mut().insert(m, chain),
                    };
                }
            };
            next.is_none_or(|next| next.insert(m, chain))
        };
        spread(&m.server_names, &mut self.any, at, m, chain)
    }
}

/// What an exact server name leads to. A mesh's port 443 has a chain per external TLS
/// host, each matching on its name alone: such a name keeps its chain's index, where the
/// levels below it would take about a hundred bytes a name for nothing to tell apart.
#[derive(Debug)]
enum Named {
    /// The one chain filed under the name, matching on nothing else.
    Chain(usize),
    /// Chains that the transport, ALPN or source tell apart.
    Levels(Box<TransportLevel>),
}

impl Named {
    /// The place of `chain`, the first filed under its name.
    fn of(m: &envoy::FilterChainMatch, chain: usize) -> Named {
        if m.transport_protocol.is_none()
            && m.application_protocols.is_empty()
            && m.source_prefix_ranges.is_empty()
        {
            return Named::Chain(chain);
        }
        let mut levels = TransportLevel::default();
        levels.insert(m, chain);
        Named::Levels(Box::new(levels))
    }

    /// Files another chain under the name; false when its place was taken.
    fn insert(&mut self, m: &envoy::FilterChainMatch, chain: usize) -> bool {
        let mut levels = match std::mem::replace(self, Named::Chain(chain)) {
            Named::Levels(levels) => levels,
            Named::Chain(first) => {
                let mut levels = Box::<TransportLevel>::default();
                levels.insert(&envoy::FilterChainMatch::default(), first);
                levels
            }
        };
        let fresh = levels.insert(m, chain);
        *self = Named::Levels(levels);
        fresh
    }

    fn pick(&self, conn: &Connection<'_>) -> Option<usize> {
        match self {
            Named::Chain(chain) => Some(*chain),
            Named::Levels(levels) => levels.pick(conn),
        }
    }
}

impl NameLevel {
    fn finish(&mut self) {
        let below = |t: &TransportLevel| t.inspects();
        self.inspects = !self.exact.is_empty()
            || self.wildcard.values().next().is_some()
            || self.any.as_ref().is_some_and(below);
    }

    fn pick(&self, conn: &Connection<'_>) -> Option<usize> {
        if let Some(name) = conn.server_name.and_then(|name| normalized(name).ok()) {
            if let Some(named) = self.exact.get(&*name.text) {
                return named.pick(conn);
            }
            if let Some(levels) = self.wildcard.longest_match(&name.text, name.dots) {
                return levels.pick(conn);
            }
        }
        self.any.as_ref()?.pick(conn)
    }
}

#[derive(Debug, Default)]
struct TransportLevel {
    by_protocol: Vec<(Box<str>, ProtocolLevel)>,
    any: Option<ProtocolLevel>,
}

impl Level for TransportLevel {
    fn insert(&mut self, m: &envoy::FilterChainMatch, chain: usize) -> bool {
        let by_protocol = &mut self.by_protocol;
        let at = |p: &String| slot(by_protocol, p).insert(m, chain);
        spread(m.transport_protocol.as_slice(), &mut self.any, at, m, chain)
    }
}

impl TransportLevel {
    fn inspects(&self) -> bool {
        !self.by_protocol.is_empty() || self.any.as_ref().is_some_and(|a| !a.by_protocol.is_empty())
    }

    fn pick(&self, conn: &Connection<'_>) -> Option<usize> {
        let transport = if conn.tls { "tls" } else { "raw_buffer" };
        self.by_protocol
            .iter()
            .find(|(k, _)| **k == *transport)
            .map(|(_, v)| v)
            .or(self.any.as_ref())?
            .pick(conn)
    }
}

#[derive(Debug, Default)]
struct ProtocolLevel {
    by_protocol: Vec<(Box<str>, SourceLevel)>,
    any: Option<SourceLevel>,
}

impl Level for ProtocolLevel {
    fn insert(&mut self, m: &envoy::FilterChainMatch, chain: usize) -> bool {
        let by_protocol = &mut self.by_protocol;
        let at = |p: &String| slot(by_protocol, p).insert(m, chain);
        spread(&m.application_protocols, &mut self.any, at, m, chain)
    }
}

impl ProtocolLevel {
    fn pick(&self, conn: &Connection<'_>) -> Option<usize> {
        // The connection's protocols in its own order: the first with chains decides.
        conn.application_protocols
            .iter()
            .find_map(|p| self.by_protocol.iter().find(|(k, _)| **k == **p))
            .map(|(_, v)| v)
            .or(self.any.as_ref())?
            .pick(conn)
    }
}

#[derive(Debug, Default)]
struct SourceLevel {
    ranges: Prefixes<Option<usize>>,
    any: Option<usize>,
}

impl Level for SourceLevel {
    fn insert(&mut self, m: &envoy::FilterChainMatch, chain: usize) -> bool {
        let claim = |slot: &mut Option<usize>| {
            let fresh = slot.is_none();
            slot.get_or_insert(chain);
            fresh
        };
        if m.source_prefix_ranges.is_empty() {
            return claim(&mut self.any);
        }
        let mut fresh = true;
        for net in &m.source_prefix_ranges {
            fresh &= claim(self.ranges.entry(*net));
        }
        fresh
    }
}

impl SourceLevel {
    fn pick(&self, conn: &Connection<'_>) -> Option<usize> {
        conn.source
            .and_then(|ip| self.ranges.get(canonical(ip)).copied().flatten())
            .or(self.any)
    }
}
