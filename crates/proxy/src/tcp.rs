//! Opaque TCP: route by original destination, connect, splice bytes both ways.

use std::net::SocketAddr;
use std::sync::Arc;

use portcullis_registry::Decision;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::Proxy;
use crate::error::ProxyError;
use crate::guard::GuardedIo;
use crate::log::TcpLog;
use crate::metrics::{Label, TcpLabels};
use crate::upstream::{Original, Pick};

/// Forwards one intercepted TCP (or TLS) connection as `decision` says, `prefix` (the bytes
/// read to detect its protocol) first, or closes it when the destination is refused.
pub(crate) async fn forward(
    proxy: &Arc<Proxy>,
    decision: Decision,
    mut client: GuardedIo<TcpStream>,
    prefix: &[u8],
    dst: SocketAddr,
    peer: SocketAddr,
    sni: Option<&str>,
) {
    let start = Instant::now();
    let cluster: Arc<str> = match &decision {
        Decision::Cluster(c) => Arc::clone(&c.name),
        other => other.cluster_name().into(),
    };
    let service = match &decision {
        Decision::Cluster(c) => Arc::clone(&c.host),
        _ => Arc::clone(&cluster),
    };
    let mut labels = TcpLabels {
        reporter: "source",
        destination_service: Label(service),
        response_flags: "-",
    };
    let mut log = TcpLog {
        flags: "-",
        cluster: &cluster,
        upstream: None,
        original_dst: dst,
        sni,
        downstream: peer,
        sent: 0,
        received: 0,
        duration: Default::default(),
    };
    let connected = connect_once(proxy, &decision, dst, &cluster, &mut log).await;
    match connected {
        Ok((mut upstream, _active)) => {
            proxy.metrics.tcp_opened.get_or_create(&labels).inc();
            let relayed = crate::splice::relay(&mut client, prefix, &mut upstream).await;
            log.sent = relayed.sent;
            log.received = relayed.received;
            if let Err(e) = relayed.result {
                tracing::debug!(error = %e, "TCP connection ended with an error");
            }
        }
        Err(e) => {
            // Envoy's listener filters only peek: the client's first bytes are still unread
            // when it gives up on the connection, so the kernel resets it. Those bytes were
            // read here; a zero linger makes the close the same reset.
            if !prefix.is_empty()
                && let Err(error) = client.get_ref().set_zero_linger()
            {
                tracing::debug!(%error, "cannot set SO_LINGER to reset the connection");
            }
            log.flags = e.tcp_flag();
            labels.response_flags = log.flags;
            proxy.metrics.tcp_opened.get_or_create(&labels).inc();
        }
    }
    proxy
        .metrics
        .tcp_sent
        .get_or_create(&labels)
        .inc_by(log.sent);
    proxy
        .metrics
        .tcp_received
        .get_or_create(&labels)
        .inc_by(log.received);
    proxy.metrics.tcp_closed.get_or_create(&labels).inc();
    log.duration = start.elapsed();
    log.emit();
}

/// The one upstream connection attempt of Envoy's `tcp_proxy` as istiod configures it
/// (`max_connect_attempts` unset: 1), its endpoint recorded in `log`.
async fn connect_once(
    proxy: &Proxy,
    decision: &Decision,
    dst: SocketAddr,
    cluster: &str,
    log: &mut TcpLog<'_>,
) -> Result<(TcpStream, Option<portcullis_balance::ActiveGuard>), ProxyError> {
    let Pick { addr, guard, .. } = proxy.pick(decision, Original::Address(dst), &[]).await?;
    log.upstream = Some(addr);
    match proxy.connect(addr, cluster).await {
        Ok(stream) => Ok((stream, guard)),
        // Out of connect attempts: Envoy's tcp_proxy says so (`URX`) even after one.
        Err(e @ (ProxyError::ConnectFailure(_) | ProxyError::ConnectTimeout)) => {
            Err(ProxyError::Retried(Box::new(e)))
        }
        Err(e) => Err(e),
    }
}
