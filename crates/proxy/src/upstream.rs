//! Choosing and connecting to an upstream: endpoint pick, DNS, connect timeout, loop guard.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use portcullis_balance::ActiveGuard;
use portcullis_registry::{Decision, OutboundMode, Resolution, Route, Snapshot};
use tokio::net::TcpStream;

use crate::Proxy;
use crate::error::ProxyError;
use crate::metrics::{ClusterLabels, Label};

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
    /// Counts the request as active on the endpoint while held.
    pub guard: Option<ActiveGuard>,
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

/// Upstream connection attempts for one request: the first plus Istio's default 2 retries.
pub const ATTEMPTS: usize = 3;

/// How an HTTP request is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Retries {
    /// Attempts in all, the first included.
    pub attempts: usize,
    /// Whether a failed connection is retried (`connect-failure`, `5xx`, `gateway-error`).
    pub connect_failure: bool,
    /// Whether a request without a body is sent again after the upstream reset or closed
    /// before a response (`reset`, `5xx`, `gateway-error`, `refused-stream`).
    pub reset: bool,
}

impl Retries {
    /// The retries of a request: the matched route's retry policy (none without one, as
    /// Envoy); Istio's default when no route of the model matched (a snapshot without
    /// listeners, or a filter chain that carries bytes).
    pub(crate) fn of(route: Option<&Route>) -> Retries {
        let Some(route) = route else {
            return Retries {
                attempts: ATTEMPTS,
                connect_failure: true,
                reset: true,
            };
        };
        let Some(policy) = &route.retry_policy else {
            return Retries {
                attempts: 1,
                connect_failure: false,
                reset: false,
            };
        };
        let on = |conditions: &[&str]| {
            policy
                .retry_on
                .iter()
                .any(|c| conditions.contains(&c.as_str()))
        };
        Retries {
            attempts: usize::try_from(policy.num_retries)
                .unwrap_or(usize::MAX)
                .saturating_add(1),
            connect_failure: on(&["connect-failure", "5xx", "gateway-error"]),
            reset: on(&["reset", "5xx", "gateway-error", "refused-stream"]),
        }
    }
}

impl Proxy {
    /// Picks an upstream for `decision`, avoiding endpoints in `tried`.
    pub(crate) async fn pick(
        &self,
        decision: &Decision,
        original: Original<'_>,
        tried: &[usize],
    ) -> Result<Pick, ProxyError> {
        let pick = match decision {
            Decision::BlackHole => return Err(ProxyError::Blocked),
            Decision::NoRoute | Decision::NoFilterChain => return Err(ProxyError::NoRoute),
            Decision::NoCluster(name) => return Err(ProxyError::NoCluster(Arc::clone(name))),
            Decision::Direct(d) => return Err(ProxyError::Direct(Arc::clone(d))),
            Decision::Cluster(c) if c.resolution != Resolution::None => {
                let (index, endpoint) = c
                    .pick_excluding(tried)
                    .ok_or(ProxyError::NoHealthyUpstream)?;
                if let Some(why) = &endpoint.transport_error {
                    tracing::warn!(cluster = %c.name, endpoint = %endpoint.display(), reason = %why, "no plaintext connection to an endpoint that needs TLS");
                    return Err(ProxyError::TransportRefused(Arc::clone(why)));
                }
                Pick {
                    addr: SocketAddr::new(endpoint.address, endpoint.port),
                    index: Some(index),
                    guard: Some(endpoint.state.start()),
                }
            }
            Decision::Pod(ip) => {
                let port = match original {
                    Original::Address(a) => a.port(),
                    Original::Name(_, port) => port,
                };
                Pick {
                    addr: SocketAddr::new(*ip, port),
                    index: None,
                    guard: None,
                }
            }
            Decision::Cluster(_) | Decision::Passthrough => {
                // Resolution NONE with a `targetPort`: the original address on that port.
                let port_override = match decision {
                    Decision::Cluster(c) => c.passthrough_port,
                    _ => None,
                };
                let addr = match original {
                    Original::Address(a) => {
                        SocketAddr::new(a.ip(), port_override.unwrap_or(a.port()))
                    }
                    Original::Name(host, port) => {
                        self.resolve(host, port_override.unwrap_or(port)).await?
                    }
                };
                Pick {
                    addr,
                    index: None,
                    guard: None,
                }
            }
        };
        if self.is_own_listener(pick.addr) {
            return Err(ProxyError::Loop);
        }
        Ok(pick)
    }

    /// Connects to `addr` within the connect timeout, counting failures per cluster.
    pub(crate) async fn connect(
        &self,
        addr: SocketAddr,
        cluster: &str,
    ) -> Result<TcpStream, ProxyError> {
        let result =
            match tokio::time::timeout(self.config.connect_timeout, TcpStream::connect(addr)).await
            {
                Ok(Ok(stream)) => {
                    // Request/response traffic: latency matters more than packet count.
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Ok(Err(e)) => ProxyError::ConnectFailure(e),
                Err(_) => ProxyError::ConnectTimeout,
            };
        self.metrics
            .connect_fail
            .get_or_create(&ClusterLabels {
                cluster_name: Label::from(cluster),
            })
            .inc();
        Err(result)
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
        // A wildcard host owns what the name actually requested resolves to.
        if cluster.host.starts_with('*')
            && let Some(name) = requested
            && let Ok(addrs) = self.dns.resolve_now(name).await
            && addrs.contains(&dst.ip())
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

/// Whether a failed attempt may be retried: on a cluster's endpoints (another one when
/// there is one, else the same, as Envoy's retry policy does), never on an original
/// destination.
pub fn can_retry(decision: &Decision, pick_index: Option<usize>) -> bool {
    matches!(decision, Decision::Cluster(_)) && pick_index.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

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
