//! Choosing and connecting to an upstream: endpoint pick, DNS, connect timeout, loop guard.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use portcullis_balance::outlier::Reason;
use portcullis_balance::{ActiveGuard, ConnectionGuard, EndpointState, PreviousPriorities};
pub use portcullis_registry::RetryPolicy;
use portcullis_registry::{
    Decision, OutboundMode, Resolution, Resource, Route, Slot, Snapshot, TlsOrigin, UNLIMITED,
};
use rustix::io::Errno;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::Proxy;
use crate::error::ProxyError;
use crate::metrics::{ClusterLabels, Label};
use crate::origin::Transport;
use crate::pool::ConnHold;

/// Where the client meant to go, for decisions that forward to the original destination.
#[derive(Debug, Clone, Copy)]
pub enum Original<'a> {
    /// Intercepted: the `SO_ORIGINAL_DST` address.
    Address(SocketAddr),
    /// Explicit proxy: the requested host and port, resolved with DNS.
    Name(&'a str, u16),
}

/// One chosen upstream address.
pub struct Pick {
    /// Address to connect to.
    pub addr: SocketAddr,
    /// Index of the endpoint in its cluster, for retries elsewhere.
    pub index: Option<usize>,
    /// The TLS to originate to the endpoint, when its cluster says so.
    pub tls: Option<Arc<TlsOrigin>>,
    /// What the request holds until its response ends.
    pub guard: Hold,
}

/// What an upstream request or connection holds until it ends: its endpoint's active
/// count and a unit of its cluster's circuit breakers.
#[derive(Debug, Default)]
pub struct Hold {
    /// Counts the request as active on the endpoint.
    pub active: Option<ActiveGuard>,
    /// Counts it against the cluster's `max_requests` or `max_connections`.
    pub slot: Option<Slot>,
    /// Counts a connection of its own (TCP, CONNECT) open on the endpoint.
    pub connection: Option<ConnectionGuard>,
}

impl Hold {
    /// Gives back what is held.
    pub fn release(&mut self) {
        self.active = None;
        self.slot = None;
        self.connection = None;
    }

    /// Counts the connection made for it open on its endpoint until it is released.
    pub fn connected(&mut self) {
        self.connection = self.endpoint().map(EndpointState::open_connection);
    }

    /// The endpoint the request runs on, when it is a cluster's.
    pub fn endpoint(&self) -> Option<&Arc<EndpointState>> {
        self.active.as_ref().map(ActiveGuard::state)
    }
}

/// Where one upstream attempt goes.
#[derive(Clone, Copy)]
pub(crate) struct Target<'a> {
    /// The endpoint's address.
    pub addr: SocketAddr,
    /// How connections to it are made (plaintext or TLS), and pooled.
    pub transport: &'a Transport,
    /// The cluster's connect timeout.
    pub connect_timeout: Duration,
    /// The cluster's name, for its stats.
    pub cluster: &'a str,
    /// The routing decision, with the cluster's limits.
    pub decision: &'a Decision,
    /// The endpoint's counters, when it is a cluster's.
    pub endpoint: Option<&'a Arc<EndpointState>>,
}

impl Target<'_> {
    /// The limits on each connection to the endpoint: its cluster's, else Envoy's defaults.
    pub fn connection_limits(&self) -> portcullis_envoy::ConnectionLimits {
        match self.decision {
            Decision::Cluster(c) => c.connection_limits(),
            _ => portcullis_envoy::ConnectionLimits::default(),
        }
    }
}

/// How a request gets its upstream connection.
#[derive(Debug)]
pub enum Acquired<T> {
    /// An idle connection from the pool.
    Idle(T),
    /// A new connection is to be opened.
    New {
        /// Its count on the endpoint and its unit of the cluster's `max_connections`; none
        /// to an original destination.
        hold: Option<ConnHold>,
        /// The request's unit of `max_pending_requests` until the connection is ready.
        pending: Option<Slot>,
    },
}

/// How resolution NONE treats destinations that do not belong to the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NonePolicy {
    /// Only the service's addresses or its host's current DNS answers (the default).
    #[default]
    Strict,
    /// Any destination, as Istio does (exact Envoy parity; Host/SNI spoofing is possible).
    Permissive,
}

/// The retries of a request: the matched route's retry policy (none without one, as
/// Envoy); Istio's default when no route of the model matched (a snapshot without
/// listeners, or a filter chain that carries bytes).
pub(crate) fn retry_policy(route: Option<&Route>) -> RetryPolicy {
    route.map_or(RetryPolicy::ISTIO, |r| RetryPolicy::clone(&r.retries))
}

impl Proxy {
    /// Picks an upstream for `decision` as of `now`, avoiding endpoints in `tried` and
    /// those outlier detection ejected, and the priorities `previous` leaves; a
    /// consistent-hash cluster picks by the request's `hash`.
    pub(crate) async fn pick(
        &self,
        decision: &Decision,
        original: Original<'_>,
        (tried, previous, hash): (&[usize], Option<PreviousPriorities<'_>>, Option<u64>),
        now: tokio::time::Instant,
    ) -> Result<Pick, ProxyError> {
        let pick = match decision {
            Decision::BlackHole => return Err(ProxyError::Blocked),
            Decision::NoRoute | Decision::NoFilterChain => return Err(ProxyError::NoRoute),
            Decision::NoCluster(name) => return Err(ProxyError::NoCluster(Arc::clone(name))),
            Decision::Direct(d) => return Err(ProxyError::Direct(Arc::clone(d))),
            Decision::Cluster(c) if c.resolution != Resolution::None => {
                let (index, endpoint) = c
                    .pick_hashed(hash, (tried, previous), now.into_std())
                    .ok_or(ProxyError::NoHealthyUpstream)?;
                let tls = self.origination(&endpoint.transport).map_err(|why| {
                    tracing::warn!(cluster = %c.name, endpoint = %endpoint.display(), reason = %why, "no connection to an endpoint whose transport cannot be built");
                    ProxyError::TransportRefused(why)
                })?;
                Pick {
                    addr: SocketAddr::new(endpoint.address, endpoint.port),
                    index: Some(index),
                    tls,
                    guard: Hold {
                        active: Some(endpoint.state.start()),
                        slot: None,
                        connection: None,
                    },
                }
            }
            Decision::Cluster(_) | Decision::Passthrough => {
                // Resolution NONE with a `targetPort`: the original address on that port,
                // with the cluster's transport.
                let (port_override, tls) = match decision {
                    Decision::Cluster(c) => {
                        let tls = self.origination(&c.passthrough_transport).map_err(|why| {
                            tracing::warn!(cluster = %c.name, reason = %why, "no connection to an original destination whose transport cannot be built");
                            ProxyError::TransportRefused(why)
                        })?;
                        (c.passthrough_port, tls)
                    }
                    _ => (None, None),
                };
                let addr = match original {
                    Original::Address(a) => {
                        SocketAddr::new(a.ip(), port_override.unwrap_or(a.port()))
                    }
                    Original::Name(host, port) => {
                        // Boxed: a name to resolve is the rare original destination.
                        Box::pin(self.resolve(host, port_override.unwrap_or(port))).await?
                    }
                };
                Pick {
                    addr,
                    index: None,
                    tls,
                    guard: Hold::default(),
                }
            }
        };
        if self.is_own_listener(pick.addr) {
            return Err(ProxyError::Loop);
        }
        Ok(pick)
    }

    /// The connect timeout for `decision`: its cluster's (Envoy's `connect_timeout`), else
    /// the proxy's own (original destinations).
    pub(crate) fn connect_timeout(&self, decision: &Decision) -> Duration {
        match decision {
            Decision::Cluster(c) => c.connect_timeout,
            _ => self.config.connect_timeout,
        }
    }

    /// Connects to `addr` within `timeout`, counting failures per cluster.
    pub(crate) async fn connect(
        &self,
        addr: SocketAddr,
        cluster: &str,
        timeout: Duration,
    ) -> Result<TcpStream, ProxyError> {
        let result = match tokio::time::timeout(timeout, connect(addr)).await {
            Ok(Ok(stream)) => {
                self.metrics
                    .upstream_cx_total
                    .get_or_create(&ClusterLabels {
                        cluster_name: Label::from(cluster),
                    })
                    .inc();
                return Ok(stream);
            }
            Ok(Err(e)) => ProxyError::ConnectFailure(e),
            Err(_) => ProxyError::ConnectTimeout,
        };
        self.count_connect_failure(cluster, &result);
        Err(result)
    }

    /// Counts a failed connection (TCP or TLS) to `cluster` in Envoy's stats.
    pub(crate) fn count_connect_failure(&self, cluster: &str, error: &ProxyError) {
        let labels = ClusterLabels {
            cluster_name: Label::from(cluster),
        };
        self.metrics.connect_fail.get_or_create(&labels).inc();
        if matches!(error, ProxyError::ConnectTimeout) {
            self.metrics.connect_timeout.get_or_create(&labels).inc();
        }
    }

    /// Counts an outlier ejection of an endpoint of `cluster` in Envoy's stats.
    pub(crate) fn count_ejection(&self, cluster: &Arc<str>, reason: Reason) {
        let labels = ClusterLabels {
            cluster_name: Label(Arc::clone(cluster)),
        };
        let m = &self.metrics;
        m.ejections_enforced_total.get_or_create(&labels).inc();
        let by_reason = match reason {
            Reason::Consecutive5xx => &m.ejections_consecutive_5xx,
            Reason::ConsecutiveGateway => &m.ejections_consecutive_gateway,
            Reason::ConsecutiveLocalOrigin => &m.ejections_consecutive_local_origin,
        };
        by_reason.get_or_create(&labels).inc();
    }

    /// Takes a unit of `resource` from the circuit breakers of `decision`'s cluster (none
    /// for original destinations), counting an overflow in Envoy's stat for it.
    pub(crate) fn admit(
        &self,
        decision: &Decision,
        resource: Resource,
    ) -> Result<Option<Slot>, ProxyError> {
        let Decision::Cluster(c) = decision else {
            return Ok(None);
        };
        c.breakers.acquire(resource).map_err(|overflow| {
            let family = match resource {
                Resource::Connections => &self.metrics.upstream_cx_overflow,
                Resource::PendingRequests | Resource::Requests => {
                    &self.metrics.upstream_rq_pending_overflow
                }
                Resource::Retries => &self.metrics.upstream_rq_retry_overflow,
            };
            family
                .get_or_create(&ClusterLabels {
                    cluster_name: Label(Arc::clone(&c.name)),
                })
                .inc();
            tracing::debug!(cluster = %c.name, ?resource, "circuit breaker overflow");
            ProxyError::Overflow(overflow)
        })
    }

    /// A connection for a request: an idle one that `idle` finds, else leave to open one.
    /// Under a cluster's `max_connections` and `max_pending_requests` this is Envoy's
    /// connection pool: a request without an idle connection is pending (503 `UO` past
    /// `max_pending_requests`) until its connection is ready, and it opens one only while
    /// the cluster is under `max_connections` or when `endpoint` has none open at all
    /// (counted as an overflow then); otherwise it waits until a connection of the cluster
    /// closes or goes back to the pool.
    pub(crate) async fn connection<T, F: Future<Output = Option<T>>>(
        &self,
        target: &Target<'_>,
        mut idle: impl FnMut() -> F,
    ) -> Result<Acquired<T>, ProxyError> {
        let Target {
            decision, endpoint, ..
        } = *target;
        if let Some(conn) = idle().await {
            return Ok(Acquired::Idle(conn));
        }
        let Decision::Cluster(c) = decision else {
            return Ok(Acquired::New {
                hold: None,
                pending: None,
            });
        };
        let breakers = &c.breakers;
        if breakers.threshold(Resource::Connections) == UNLIMITED
            && breakers.threshold(Resource::PendingRequests) == UNLIMITED
        {
            return Ok(Acquired::New {
                hold: Some(ConnHold::new(None, endpoint, &breakers.load)),
                pending: None,
            });
        }
        let pending = self.admit(decision, Resource::PendingRequests)?;
        loop {
            let released = breakers.load.released();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(conn) = idle().await {
                return Ok(Acquired::Idle(conn));
            }
            let slot = match breakers.acquire(Resource::Connections) {
                Ok(slot) => slot,
                Err(_) => {
                    self.metrics
                        .upstream_cx_overflow
                        .get_or_create(&ClusterLabels {
                            cluster_name: Label(Arc::clone(&c.name)),
                        })
                        .inc();
                    // Nothing of this endpoint's would ever free up for the request.
                    endpoint
                        .is_none_or(|e| e.connections() == 0)
                        .then(|| breakers.force(Resource::Connections))
                }
            };
            let unlimited = breakers.threshold(Resource::Connections) == UNLIMITED;
            if slot.is_some() || unlimited {
                let hold = Some(ConnHold::new(slot, endpoint, &breakers.load));
                return Ok(Acquired::New { hold, pending });
            }
            // An idle connection to the endpoint that `idle` cannot use (the other HTTP path
            // pooled it) would keep the request waiting for as long as it stays idle.
            if self.pool.close_idle(&target.transport.key) {
                continue;
            }
            tracing::debug!(cluster = %c.name, "at max_connections; waiting for a connection");
            released.await;
        }
    }

    /// Resolution NONE forwards to the original destination, but only to a destination
    /// that belongs to the service: one of its addresses, or what the requested host
    /// resolves to now. Anything else is unregistered traffic, so a registered Host or SNI
    /// cannot carry a connection to an arbitrary address. `NonePolicy::Permissive` keeps
    /// Istio's behaviour (any destination).
    pub(crate) async fn confine_none(
        &self,
        snapshot: &Snapshot,
        decision: Decision,
        dst: SocketAddr,
        requested: Option<&str>,
    ) -> Decision {
        let Decision::Cluster(cluster) = &decision else {
            return decision;
        };
        if cluster.resolution != Resolution::None
            || self.config.none_resolution == NonePolicy::Permissive
            || snapshot.outbound_mode() == OutboundMode::AllowAny
            || Snapshot::owns_destination(cluster, dst.ip())
        {
            return decision;
        }
        // A wildcard host owns what the name actually requested resolves to. Boxed: the
        // lookup's future is large, and every other decision is made above without one.
        if cluster.host.starts_with('*')
            && let Some(name) = requested
            && Box::pin(self.resolves_to(name, dst.ip())).await
        {
            return decision;
        }
        tracing::info!(
            cluster = %cluster.name,
            requested = requested.unwrap_or("-"),
            original_dst = %dst,
            "resolution NONE: destination does not belong to the service; treated as unregistered"
        );
        snapshot.unmatched()
    }

    /// Whether `name` resolves now to `ip`, among its addresses.
    async fn resolves_to(&self, name: &str, ip: IpAddr) -> bool {
        self.dns
            .resolve_now(name)
            .await
            .is_ok_and(|addrs| addrs.contains(&ip))
    }

    /// Resolves a requested name (explicit proxy) to one address.
    async fn resolve(&self, host: &str, port: u16) -> Result<SocketAddr, ProxyError> {
        if let Ok(ip) = host.parse() {
            return Ok(SocketAddr::new(ip, port));
        }
        let failure = |_| ProxyError::DnsFailure {
            host: host.to_string(),
        };
        let addrs = self.dns.resolve_now(host).await.map_err(failure)?;
        addrs
            .first()
            .map(|ip| SocketAddr::new(*ip, port))
            .ok_or(ProxyError::DnsFailure {
                host: host.to_string(),
            })
    }

    /// Whether `addr` reaches one of the proxy's own listeners: their port on their address,
    /// or, for a wildcard listener, on any address of this host. The same port elsewhere is
    /// another service.
    pub(crate) fn is_own_listener(&self, addr: SocketAddr) -> bool {
        reaches_listener(&self.own_listeners, addr)
    }
}

/// Whether a connection to `addr` lands on one of `listeners`.
fn reaches_listener(listeners: &[SocketAddr], addr: SocketAddr) -> bool {
    let mut same_port = listeners.iter().filter(|l| l.port() == addr.port());
    same_port
        .any(|l| l.ip() == addr.ip() || (l.ip().is_unspecified() && is_local_address(addr.ip())))
}

/// Whether `ip` is an address of this host. The kernel routes a local address with itself
/// as the source, so a connected UDP socket (no packet is sent) tells without listing the
/// interfaces, and keeps telling the truth when addresses change.
fn is_local_address(ip: IpAddr) -> bool {
    use socket2::{Domain, Socket, Type};
    if ip.is_loopback() || ip.is_unspecified() {
        return true;
    }
    let probe = || -> std::io::Result<bool> {
        let socket = Socket::new(
            Domain::for_address(SocketAddr::new(ip, 0)),
            Type::DGRAM,
            None,
        )?;
        socket.connect(&SocketAddr::new(ip, 9).into())?;
        Ok(socket
            .local_addr()?
            .as_socket()
            .is_some_and(|source| source.ip() == ip))
    };
    // No route at all: not an address of ours either.
    probe().unwrap_or(false)
}

/// Opens a TCP connection to `addr`, with `TCP_NODELAY` (request/response traffic: latency
/// matters more than packet count). A refusal is read from the socket's error readiness
/// (`EPOLLERR`) when the connect completes, not with the `getsockopt(SO_ERROR)` that Tokio's
/// own connect makes after every connection, refused or not.
async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&addr.into()) {
        Err(e) if e.raw_os_error() != Some(Errno::INPROGRESS.raw_os_error()) => return Err(e),
        _ => {}
    }
    let stream = TcpStream::from_std(socket.into())?;
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if ready.is_error() || ready.is_write_closed() {
        let error = stream.take_error()?;
        return Err(error.unwrap_or_else(|| io::ErrorKind::NotConnected.into()));
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_with_nodelay_and_reports_a_refusal() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stream, accepted) = tokio::join!(connect(addr), listener.accept());
        let stream = stream.unwrap();
        assert!(stream.nodelay().unwrap());
        assert_eq!(stream.local_addr().unwrap(), accepted.unwrap().1);
        // The port is free again once its listener is gone: nothing answers there.
        drop(listener);
        let refused = connect(addr).await.unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
    }

    #[test]
    fn only_this_hosts_addresses_are_local() {
        assert!(is_local_address("127.0.0.1".parse().unwrap()));
        assert!(is_local_address("127.3.4.5".parse().unwrap()));
        assert!(is_local_address("::1".parse().unwrap()));
        // Documentation ranges (RFC 5737, RFC 3849): never assigned to a host here.
        assert!(!is_local_address("192.0.2.1".parse().unwrap()));
        assert!(!is_local_address("2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn a_wildcard_listeners_port_elsewhere_is_another_service() {
        let own: Vec<SocketAddr> = ["0.0.0.0:15001", "0.0.0.0:15090", "127.0.0.1:15000"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let reaches = |a: &str| reaches_listener(&own, a.parse().unwrap());
        assert!(reaches("127.0.0.1:15001"));
        assert!(reaches("127.0.0.1:15090"));
        assert!(reaches("127.0.0.1:15000"));
        assert!(!reaches("192.0.2.1:15090"));
        assert!(!reaches("192.0.2.1:15001"));
        assert!(!reaches("192.0.2.1:15000"));
        assert!(!reaches("127.0.0.1:8080"));
    }
}
