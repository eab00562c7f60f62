//! The data path: listeners, original destination, protocol detection, HTTP and TCP
//! forwarding, synthetic responses and upstream connection reuse.

mod accept;
mod attempt;
mod body;
mod boxed;
pub mod detect;
mod error;
mod guard;
pub mod h1;
mod h2_client;
mod hash;
mod http;
mod io;
mod log;
pub mod metrics;
mod orig_dst;
mod origin;
mod pool;
mod splice;
mod streams;
mod tcp;
pub mod tls;
mod tunnel;
mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::accept::ClientStream;
use crate::boxed::boxed;
use arc_swap::ArcSwap;
use bytes::BytesMut;
use portcullis_audit::{Audit, Observation, Verdict};
use portcullis_dns::DnsCache;
use portcullis_registry::{Chain, ChainFilter, Connection, Decision, Snapshot};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use accept::Listener;
pub use error::ProxyError;
pub use guard::StreamTimeouts;
pub use log::{AccessLog, Format as AccessLogFormat};
pub use metrics::Metrics;
pub use upstream::NonePolicy;

use crate::detect::Detected;
use crate::guard::{GuardedIo, InFlight};
use crate::http::Downstream;
use crate::io::PrefixedIo;
use crate::metrics::LastSeries;
use crate::pool::Pool;

/// An idle timeout that never fires (a `tcp_proxy` without one): a century.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Timeouts and limits of the data path.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// How long to wait for a client's first bytes before treating it as opaque TCP.
    pub detect_timeout: Duration,
    /// How long a TLS client may take to send its whole ClientHello.
    pub client_hello_timeout: Duration,
    /// Upstream connect timeout to original destinations (PassthroughCluster, resolution
    /// NONE without a model cluster); a cluster's own `connect_timeout` wins for its
    /// endpoints (Istio's default `connectTimeout` is 10 s).
    pub connect_timeout: Duration,
    /// How long an idle pooled upstream connection is kept.
    pub pool_idle_timeout: Duration,
    /// Idle pooled connections kept per endpoint.
    pub max_idle_per_endpoint: usize,
    /// Which original destinations resolution NONE may forward to.
    pub none_resolution: NonePolicy,
    /// Connections closed after this long with no bytes either way (Envoy: 1 h).
    pub idle_timeout: Duration,
    /// A request head must be complete this long after its first byte (Envoy's
    /// `request_headers_timeout`).
    pub request_headers_timeout: Duration,
    /// Time from sending a request to its response headers (Envoy's route timeout);
    /// `None` waits forever, Istio's default.
    pub route_timeout: Option<Duration>,
    /// Stream timeouts where no HTTP connection manager gives any: the explicit proxy and
    /// snapshots without listeners (Envoy's defaults: 5 min idle, no request timeout).
    pub stream_timeouts: StreamTimeouts,
    /// Client connections open at once, per proxy; more are closed as they arrive.
    pub max_connections: usize,
    /// Largest request head in bytes (Envoy: `max_request_headers_kb` 60).
    pub max_request_headers_bytes: usize,
    /// Most header fields in a request (Envoy: `max_headers_count` 100).
    pub max_request_headers: usize,
    /// HTTP/1.0 requests are served (Envoy's `accept_http_10`, which istiod sets only for
    /// `ISTIO_META_HTTP10=1`); otherwise they get `426 Upgrade Required`.
    pub accept_http10: bool,
    /// Where access log lines go.
    pub access_log: Arc<AccessLog>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            detect_timeout: Duration::from_millis(100),
            client_hello_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            pool_idle_timeout: Duration::from_secs(60),
            max_idle_per_endpoint: 256,
            none_resolution: NonePolicy::Strict,
            idle_timeout: Duration::from_secs(3600),
            request_headers_timeout: Duration::from_secs(10),
            route_timeout: None,
            stream_timeouts: StreamTimeouts::ENVOY_DEFAULT,
            max_connections: 65_536,
            max_request_headers_bytes: 60 * 1024,
            max_request_headers: 100,
            accept_http10: false,
            access_log: Arc::new(AccessLog::off()),
        }
    }
}

/// The stream timeouts of an HTTP connection: its connection manager's, else (no
/// listeners, or a policy catch-all chain) `otherwise`, the proxy's own.
fn stream_timeouts(chain: Option<&Arc<Chain>>, otherwise: StreamTimeouts) -> StreamTimeouts {
    match chain.map(|c| &c.filter) {
        Some(ChainFilter::Http(h)) => StreamTimeouts {
            idle: h.stream_idle_timeout,
            request: h.request_timeout,
        },
        _ => otherwise,
    }
}

/// The access log line of a connection closed before any routing: no filter chain matched,
/// in Envoy's terms (`NR`).
fn refused(log: &AccessLog, dst: SocketAddr, peer: SocketAddr) {
    log::TcpLog {
        flags: "NR",
        cluster: "-",
        upstream: None,
        original_dst: dst,
        sni: None,
        downstream: peer,
        sent: 0,
        received: 0,
        duration: Duration::ZERO,
    }
    .emit(log);
}

/// Envoy's name for the listener that takes every redirected connection.
const VIRTUAL_OUTBOUND: &str = "virtualOutbound";

/// A connection carried as bytes to `dst`, as the audit records it: named by nothing, on
/// the listener of the chain that decided (Istio's port listener), else the redirect's.
fn opaque_seen(dst: SocketAddr, chain: Option<&Arc<Chain>>) -> Observation<'_> {
    Observation {
        host: None,
        destination: Some(dst),
        port: dst.port(),
        protocol: portcullis_audit::Protocol::Tcp,
        listener: chain.map_or(VIRTUAL_OUTBOUND, |c| &c.listener),
    }
}

/// The proxy: shared by every connection task.
pub struct Proxy {
    registry: Arc<ArcSwap<Snapshot>>,
    config: ProxyConfig,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    own_listeners: Vec<SocketAddr>,
    dns: Arc<DnsCache>,
    connections: Arc<Semaphore>,
    tasks: TaskTracker,
    /// The workload's Istio identity, for Istio mutual TLS, once one is read.
    identity: arc_swap::ArcSwapOption<portcullis_registry::WorkloadIdentity>,
    /// Records refusals and decides, by the mode in force, whether they are enforced.
    audit: Arc<Audit>,
}

impl Proxy {
    /// A proxy reading `registry`, resolving names with `dns`, never forwarding to any of
    /// `own_listeners`, its refusals recorded (and in audit mode forwarded) by `audit`.
    pub fn new(
        registry: Arc<ArcSwap<Snapshot>>,
        config: ProxyConfig,
        metrics: Arc<Metrics>,
        own_listeners: Vec<SocketAddr>,
        dns: Arc<DnsCache>,
        audit: Arc<Audit>,
    ) -> Arc<Self> {
        let pool = Arc::new(Pool::new(
            config.max_idle_per_endpoint,
            config.pool_idle_timeout,
        ));
        let max_connections = config.max_connections.min(Semaphore::MAX_PERMITS);
        Arc::new(Proxy {
            registry,
            config,
            pool,
            metrics,
            own_listeners,
            dns,
            connections: Arc::new(Semaphore::new(max_connections)),
            tasks: TaskTracker::new(),
            identity: arc_swap::ArcSwapOption::empty(),
            audit,
        })
    }

    /// Passes a registry refusal (BlackHoleCluster) through the audit: recorded, logged
    /// and counted, then refused in enforce mode or, in audit mode, sent to where the
    /// client meant as ALLOW_ANY would. Any other decision is returned as it is.
    pub(crate) fn gate(
        &self,
        snapshot: &Snapshot,
        decision: Decision,
        seen: Observation<'_>,
    ) -> Decision {
        match decision {
            Decision::BlackHole => match self.audit.refused(snapshot, seen) {
                Verdict::Deny => Decision::BlackHole,
                Verdict::Forward => Decision::Passthrough,
            },
            other => other,
        }
    }

    /// Connection tasks still running, for draining.
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Idle pooled upstream connections.
    pub fn idle_upstream_connections(&self) -> usize {
        self.pool.idle_count()
    }

    /// Accepts redirected connections until `shutdown`.
    pub async fn run_outbound(self: Arc<Self>, listener: Listener, shutdown: CancellationToken) {
        self.accept_loop(listener, shutdown, true).await;
    }

    /// Accepts explicit forward-proxy connections until `shutdown`.
    pub async fn run_http_proxy(self: Arc<Self>, listener: Listener, shutdown: CancellationToken) {
        self.accept_loop(listener, shutdown, false).await;
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: Listener,
        shutdown: CancellationToken,
        transparent: bool,
    ) {
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let Ok(permit) = Arc::clone(&self.connections).try_acquire_owned() else {
                        // At the limit: close the newcomer, keep serving those already in.
                        self.metrics.cx_overflow.inc();
                        tracing::debug!(%peer, "connection limit reached; connection closed");
                        continue;
                    };
                    let proxy = Arc::clone(&self);
                    let shutdown = shutdown.clone();
                    // The connection's future is boxed when it starts: the task then
                    // holds a pointer, and the runtime moves (and on completion overwrites)
                    // a few bytes rather than the kilobytes of the largest await.
                    self.tasks.spawn(async move {
                        let _permit = permit;
                        if transparent {
                            boxed(|| proxy.outbound(stream, peer, shutdown)).await;
                        } else {
                            boxed(|| proxy.explicit(stream, peer, shutdown)).await;
                        }
                    });
                }
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Gives a connection carried as bytes its `tcp_proxy` chain's timeouts: the chain's
    /// idle timeout (Envoy's `idle_timeout`; none is never) and maximum duration; without
    /// a `tcp_proxy` chain, the proxy's own idle timeout and no maximum.
    fn apply_chain_timeouts(
        &self,
        stream: &mut GuardedIo<ClientStream>,
        chain: Option<&Arc<Chain>>,
    ) {
        match chain {
            Some(c) if matches!(c.filter, ChainFilter::Tcp(_)) => {
                stream.set_idle_timeout(c.idle_timeout.unwrap_or(NEVER));
                stream.set_max_duration(c.max_duration);
            }
            _ => stream.set_idle_timeout(self.config.idle_timeout),
        }
    }

    /// Timeouts for a client connection; `in_flight` when it is known to speak HTTP from
    /// its first byte (the explicit proxy), so each request head gets its deadline.
    /// Its socket has `TCP_NODELAY` already, from the [`Listener`].
    fn guard(
        &self,
        stream: ClientStream,
        in_flight: Option<Arc<InFlight>>,
    ) -> GuardedIo<ClientStream> {
        GuardedIo::new(
            stream,
            self.config.idle_timeout,
            self.config.request_headers_timeout,
            in_flight,
        )
        .count_in(Arc::clone(&self.metrics))
    }

    async fn outbound(
        self: Arc<Self>,
        stream: ClientStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) {
        // The futures awaited below are boxed, but for HTTP/1.1's: this future is the
        // connection's task for its whole life, sized by its largest await, and an idle
        // keep-alive connection should not carry the size of a TCP relay.
        let dst = match orig_dst::original_dst(&stream, peer) {
            Ok(dst) => dst,
            Err(e) => {
                tracing::warn!(error = %e, %peer, "cannot read the original destination");
                return;
            }
        };
        // Its own listener as the destination: either a direct connection that was never
        // redirected (the original destination is then the listener's own address) or one
        // that would come straight back. Closed, as Istio's virtualOutbound-blackhole chain
        // does, before a byte is read.
        if self.is_own_listener(dst) {
            tracing::warn!(%peer, original_dst = %dst, "connection to the proxy's own listener closed (loop guard)");
            let stream = self.guard(stream, None);
            boxed(|| tcp::forward(&self, Decision::BlackHole, stream, &[], dst, peer, None)).await;
            return;
        }
        let mut stream = self.guard(stream, None);
        // TCP and TLS connections keep this registry version for their whole life; HTTP
        // requests each take the version current when they start.
        let snapshot = self.registry.load_full();
        let opaque = Connection {
            destination: Some(dst.ip()),
            port: dst.port(),
            source: Some(peer.ip()),
            ..Connection::default()
        };
        if snapshot.is_tcp_destination(dst.ip(), dst.port()) {
            let (decision, chain) = snapshot.route_connection_chain(&opaque);
            self.apply_chain_timeouts(&mut stream, chain);
            let decision = self.confine_none(&snapshot, decision, dst, None).await;
            let decision = self.gate(&snapshot, decision, opaque_seen(dst, chain));
            boxed(|| tcp::forward(&self, decision, stream, &[], dst, peer, None)).await;
            return;
        }
        let (detected, prefix) = match detect::detect(&mut stream, self.config.detect_timeout).await
        {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, %peer, "client failed during protocol detection");
                return;
            }
        };
        if detected == Detected::Tls {
            let mut buf = prefix;
            let hello =
                tls::peek_client_hello(&mut stream, &mut buf, self.config.client_hello_timeout)
                    .await;
            match hello {
                Ok(hello) => {
                    let sni = hello.sni.as_deref();
                    // By the destination's own service, else by SNI among the port's TLS
                    // names, else by the destination address as opaque TCP would be.
                    let alpn: Vec<&str> = hello.alpn.iter().map(String::as_str).collect();
                    let (decision, chain) = snapshot.route_connection_chain(&Connection {
                        destination: Some(dst.ip()),
                        port: dst.port(),
                        server_name: sni,
                        tls: true,
                        application_protocols: &alpn,
                        source: Some(peer.ip()),
                    });
                    self.apply_chain_timeouts(&mut stream, chain);
                    let decision = self.confine_none(&snapshot, decision, dst, sni).await;
                    let seen = Observation {
                        host: sni,
                        protocol: portcullis_audit::Protocol::Tls,
                        ..opaque_seen(dst, chain)
                    };
                    let decision = self.gate(&snapshot, decision, seen);
                    boxed(|| tcp::forward(&self, decision, stream, &buf, dst, peer, sni)).await;
                }
                // Garbage, oversized or too slow: close without forwarding a byte.
                Err(e) => {
                    tracing::info!(error = %e, %peer, original_dst = %dst, "TLS ClientHello rejected; connection closed");
                    refused(&self.config.access_log, dst, peer);
                }
            }
            return;
        }
        if matches!(detected, Detected::Http1 | Detected::Http2) {
            let conn = Connection {
                destination: Some(dst.ip()),
                port: dst.port(),
                application_protocols: if detected == Detected::Http2 {
                    &["h2c"]
                } else {
                    http::SNIFFED_HTTP1
                },
                source: Some(peer.ip()),
                ..Connection::default()
            };
            // Sniffed as HTTP, yet the chain for it carries bytes: as Envoy's tcp_proxy.
            if !snapshot.serves_http(&conn) {
                let (decision, chain) = snapshot.route_connection_chain(&conn);
                self.apply_chain_timeouts(&mut stream, chain);
                let decision = self.confine_none(&snapshot, decision, dst, None).await;
                let decision = self.gate(&snapshot, decision, opaque_seen(dst, chain));
                boxed(|| tcp::forward(&self, decision, stream, &prefix, dst, peer, None)).await;
                return;
            }
            let chain = snapshot.route_connection_chain(&conn).1;
            let streams = stream_timeouts(chain, self.config.stream_timeouts);
            // HTTP/1.1 has one stream at a time: the connection's guard times it, with no
            // timer of its own per request. HTTP/2 streams are timed one by one.
            let in_flight = Arc::new(if detected == Detected::Http2 {
                InFlight::default()
            } else {
                InFlight::with_streams(streams)
            });
            stream.watch_requests(Arc::clone(&in_flight));
            let downstream = Arc::new(Downstream {
                in_flight: Some(in_flight),
                original_dst: Some(dst),
                peer,
                streams,
                series: LastSeries::default(),
            });
            if detected == Detected::Http2 {
                let io = PrefixedIo::new(prefix, stream);
                boxed(|| http::serve_h2(self, downstream, io, shutdown)).await;
            } else {
                h1::serve(self, downstream, stream, prefix, shutdown).await;
            }
            return;
        }
        let (decision, chain) = snapshot.route_connection_chain(&opaque);
        self.apply_chain_timeouts(&mut stream, chain);
        let decision = self.confine_none(&snapshot, decision, dst, None).await;
        let decision = self.gate(&snapshot, decision, opaque_seen(dst, chain));
        boxed(|| tcp::forward(&self, decision, stream, &prefix, dst, peer, None)).await;
    }

    async fn explicit(
        self: Arc<Self>,
        stream: ClientStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) {
        // The request-head deadline starts with the first byte, not at connect.
        let streams = self.config.stream_timeouts;
        let in_flight = Arc::new(InFlight::with_streams(streams));
        let stream = self.guard(stream, Some(Arc::clone(&in_flight)));
        let downstream = Arc::new(Downstream {
            in_flight: Some(in_flight),
            original_dst: None,
            peer,
            streams,
            series: LastSeries::default(),
        });
        h1::serve(self, downstream, stream, BytesMut::new(), shutdown).await;
    }
}

#[cfg(test)]
impl Proxy {
    /// A proxy for unit tests: `snapshot` with the default config, counting into `metrics`,
    /// resolving with the system's DNS settings, enforcing refusals.
    pub(crate) fn for_tests(snapshot: Snapshot, metrics: Arc<Metrics>) -> Arc<Self> {
        let dns = DnsCache::new(
            portcullis_dns::HickoryLookup::from_system_conf().expect("the system's DNS settings"),
            portcullis_dns::DnsConfig::default(),
        );
        let audit = Audit::new(
            portcullis_registry::Enforcement::Enforce,
            "default",
            &mut prometheus_client::registry::Registry::default(),
        );
        Proxy::new(
            Arc::new(ArcSwap::from_pointee(snapshot)),
            ProxyConfig::default(),
            metrics,
            Vec::new(),
            dns,
            Arc::new(audit),
        )
    }

    /// [`Proxy::for_tests`] with metrics nobody reads.
    pub(crate) fn for_tests_unmetered(snapshot: Snapshot) -> Arc<Self> {
        let metrics = Metrics::new(&mut prometheus_client::registry::Registry::default());
        Proxy::for_tests(snapshot, Arc::new(metrics))
    }
}

#[cfg(test)]
mod tests {
    use portcullis_registry::HttpChain;

    use super::*;

    fn http_chain(idle: Option<Duration>, request: Option<Duration>) -> Arc<Chain> {
        Arc::new(Chain {
            name: "chain".into(),
            listener: "0.0.0.0_80".into(),
            filter: ChainFilter::Http(HttpChain {
                route_name: "80".into(),
                routes: None,
                accept_http_10: false,
                stream_idle_timeout: idle,
                request_timeout: request,
            }),
            idle_timeout: None,
            max_duration: None,
        })
    }

    #[test]
    fn stream_timeouts_come_from_the_chains_connection_manager() {
        let own = StreamTimeouts::ENVOY_DEFAULT;
        let second = Some(Duration::from_secs(1));
        let chain = http_chain(None, second);
        assert_eq!(
            stream_timeouts(Some(&chain), own),
            StreamTimeouts {
                idle: None,
                request: second,
            }
        );
        let chain = http_chain(second, None);
        assert_eq!(stream_timeouts(Some(&chain), own).idle, second);
        // No listeners (or no chain): the proxy's own.
        assert_eq!(stream_timeouts(None, own), own);
    }
}
