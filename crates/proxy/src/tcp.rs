//! Opaque TCP: route by original destination, connect, splice bytes both ways.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use portcullis_registry::{Decision, Resource};
use tokio::time::Instant;

use crate::Proxy;
use crate::accept::ClientStream;
use crate::attempt::{Attempt, Attempts};
use crate::error::ProxyError;
use crate::guard::{Expired, GuardedIo};
use crate::io::PrefixedIo;
use crate::log::TcpLog;
use crate::metrics::Destination;
use crate::origin::{Transport, UpstreamIo};
use crate::upstream::{Original, RetryPolicy};

/// Forwards one intercepted TCP (or TLS) connection as `decision` says, `prefix` (the bytes
/// read to detect its protocol) first, or closes it when the destination is refused.
pub(crate) async fn forward(
    proxy: &Arc<Proxy>,
    decision: Decision,
    mut client: GuardedIo<ClientStream>,
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
    let mut destination = match &decision {
        Decision::Cluster(c) => Destination::of_cluster(c),
        _ => Destination::named(Arc::clone(&cluster)),
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
    let connected = connect_once(
        proxy,
        &decision,
        dst,
        &cluster,
        (&mut log, &mut destination),
    )
    .await;
    let series = match connected {
        Ok((upstream, _active)) => {
            let mut series = proxy.metrics.tcp_series_to(&destination, log.flags);
            series.opened.inc();
            let relayed = match upstream {
                UpstreamIo::Plain(mut upstream) => {
                    crate::splice::relay(&mut client, prefix, &mut upstream).await
                }
                // TLS originated here: the bytes pass through user space to be encrypted.
                UpstreamIo::Tls(mut upstream) => {
                    let mut client = PrefixedIo::new(BytesMut::from(prefix), client);
                    let copied = crate::io::copy_both(&mut client, &mut upstream).await;
                    let (sent, received) = copied.as_ref().map_or((0, 0), |&(s, r)| (s, r));
                    crate::splice::Relayed {
                        sent,
                        received,
                        result: copied.map(|_| ()),
                    }
                }
            };
            log.sent = relayed.sent;
            log.received = relayed.received;
            if let Err(e) = relayed.result {
                tracing::debug!(error = %e, "TCP connection ended with an error");
                if Expired::of(&e) == Some(Expired::MaxDuration) {
                    log.flags = "DT";
                    series = proxy.metrics.tcp_series_to(&destination, log.flags);
                }
            }
            series
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
            let series = proxy.metrics.tcp_series_to(&destination, log.flags);
            series.opened.inc();
            series
        }
    };
    series.sent.inc_by(log.sent);
    series.received.inc_by(log.received);
    series.closed.inc();
    log.duration = start.elapsed();
    log.emit(&proxy.config.access_log);
}

/// The one upstream connection attempt of Envoy's `tcp_proxy` as istiod configures it
/// (`max_connect_attempts` unset: 1), its endpoint recorded in `log` and `destination`.
/// Envoy's tcp_proxy refuses the connection at the cluster's `max_connections` before
/// choosing a host.
async fn connect_once(
    proxy: &Proxy,
    decision: &Decision,
    dst: SocketAddr,
    cluster: &str,
    (log, destination): (&mut TcpLog<'_>, &mut Destination),
) -> Result<(UpstreamIo, crate::upstream::Hold), ProxyError> {
    let mut attempts = Attempts::new(
        proxy,
        (decision, Original::Address(dst)),
        cluster,
        RetryPolicy::NONE,
        Some(Resource::Connections),
    );
    let Attempt { pick, .. } = attempts.start().await?;
    log.upstream = Some(pick.addr);
    destination.reached(pick.index);
    // No request here whose host could be the SNI: `auto_sni` is HTTP's.
    let transport = Transport::new(pick.addr, pick.tls.as_ref(), None);
    match proxy
        .connect_upstream(&attempts.target(&pick, &transport))
        .await
    {
        Ok(stream) => {
            let mut held = pick.guard;
            held.connected();
            Ok((stream, held))
        }
        // Out of connect attempts: Envoy's tcp_proxy says so (`URX`) even after one.
        Err(
            e @ (ProxyError::ConnectFailure(_)
            | ProxyError::TlsHandshake(_)
            | ProxyError::ConnectTimeout),
        ) => Err(ProxyError::Retried(Box::new(e))),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use portcullis_envoy::{self as envoy, Discovery, Resources, Thresholds};
    use portcullis_registry::Snapshot;
    use prometheus_client::registry::Registry;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::Proxy;
    use crate::metrics::{ClusterLabels, Destination, Label, Metrics};

    /// A proxy serving `r`, the decision for its cluster `db`, and the proxy's metrics.
    fn serving(r: &Resources) -> (Arc<Proxy>, Decision, Arc<Metrics>) {
        let snapshot = Snapshot::index(r, &|_| None, None, 1);
        let decision = Decision::Cluster(Arc::clone(snapshot.cluster("db").unwrap()));
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let proxy = Proxy::for_tests(snapshot, Arc::clone(&metrics));
        (proxy, decision, metrics)
    }

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// Fails the test instead of hanging.
    async fn bounded<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .expect("timed out")
    }

    #[tokio::test]
    async fn max_connections_closes_the_connection_over_it_with_uo() {
        // An upstream that holds each connection until its client closes, then closes.
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream_addr = upstream.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&accepted);
        let server = tokio::spawn(async move {
            while let Ok((mut s, _)) = upstream.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut sink = Vec::new();
                    let _ = s.read_to_end(&mut sink).await;
                });
            }
        });
        let mut r = Resources::default();
        let mut c = envoy::Cluster::new("db", Discovery::Static);
        c.load_assignment = Some(envoy::ClusterLoadAssignment {
            cluster_name: "db".into(),
            endpoints: vec![envoy::LocalityLbEndpoints {
                lb_endpoints: vec![envoy::LbEndpoint::new(envoy::EndpointAddress::Socket(
                    upstream_addr,
                ))],
                ..Default::default()
            }],
        });
        c.circuit_breakers = Thresholds {
            max_connections: 1,
            ..Thresholds::default()
        };
        r.clusters.insert(c.name.clone(), Arc::new(c));
        let (proxy, decision, metrics) = serving(&r);
        let dst = upstream_addr;
        let connection = |decision: Decision| {
            let proxy = Arc::clone(&proxy);
            async move {
                let (client, proxy_side) = pair().await;
                let guarded = GuardedIo::new(
                    ClientStream::from(proxy_side),
                    Duration::from_secs(60),
                    Duration::ZERO,
                    None,
                );
                let peer = client.local_addr().unwrap();
                let task = tokio::spawn(async move {
                    forward(&proxy, decision, guarded, b"", dst, peer, None).await;
                });
                (client, task)
            }
        };
        let (mut first, first_task) = connection(decision.clone()).await;
        bounded(async {
            while accepted.load(Ordering::SeqCst) < 1 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        // The cluster's one connection is open: the next is closed without an upstream.
        let (mut second, second_task) = connection(decision.clone()).await;
        bounded(second_task).await.unwrap();
        let mut got = Vec::new();
        let _ = bounded(second.read_to_end(&mut got)).await;
        assert!(got.is_empty());
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        let labels = ClusterLabels {
            cluster_name: Label::from("db"),
        };
        assert_eq!(metrics.upstream_cx_overflow.get_or_create(&labels).get(), 1);
        let Decision::Cluster(cluster) = &decision else {
            panic!("a cluster decision");
        };
        let destination = Destination::of_cluster(cluster);
        let uo = metrics.tcp_labels(&destination, "UO");
        assert_eq!(metrics.tcp_opened.get_or_create(&uo).get(), 1);
        // The first ends; its connection is given back and the next one gets through.
        first.write_all(b"bye").await.unwrap();
        first.shutdown().await.unwrap();
        drop(first);
        bounded(first_task).await.unwrap();
        let (third, _third_task) = connection(decision).await;
        bounded(async {
            while accepted.load(Ordering::SeqCst) < 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        drop(third);
        server.abort();
    }

    #[tokio::test]
    async fn a_tls_cluster_gets_tls_and_the_clients_first_bytes_inside_it() {
        // An upstream speaking TLS with a certificate of a CA made here, echoing one line.
        let key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&key).unwrap().pem();
        let issuer = rcgen::Issuer::new(ca, key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["db.example.com".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream_addr = upstream.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = upstream.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            let sni = tls.get_ref().1.server_name().map(str::to_owned);
            let mut line = [0u8; 6];
            tls.read_exact(&mut line).await.unwrap();
            tls.write_all(&line).await.unwrap();
            tls.shutdown().await.unwrap();
            sni
        });
        let mut r = Resources::default();
        let mut c = envoy::Cluster::new("db", Discovery::Static);
        c.load_assignment = Some(envoy::ClusterLoadAssignment {
            cluster_name: "db".into(),
            endpoints: vec![envoy::LocalityLbEndpoints {
                lb_endpoints: vec![envoy::LbEndpoint::new(envoy::EndpointAddress::Socket(
                    upstream_addr,
                ))],
                ..Default::default()
            }],
        });
        c.transport = envoy::UpstreamTransport::Tls(Arc::new(envoy::UpstreamTls {
            sni: Some("db.example.com".into()),
            auto_sni: false,
            auto_san_validation: false,
            alpn_protocols: Vec::new(),
            min_version: envoy::TlsVersion::Tls12,
            max_version: envoy::TlsVersion::Tls13,
            client_certificate: None,
            validation: Some(envoy::CertificateValidationContext {
                trusted_ca: envoy::TrustedCa::Pem(envoy::DataSource::Inline(ca_pem.into_bytes())),
                match_subject_alt_names: Vec::new(),
                crl: None,
                only_verify_leaf_cert_crl: false,
            }),
        }));
        r.clusters.insert(c.name.clone(), Arc::new(c));
        let (proxy, decision, _) = serving(&r);
        let (mut client, proxy_side) = pair().await;
        let guarded = GuardedIo::new(
            ClientStream::from(proxy_side),
            Duration::from_secs(60),
            Duration::ZERO,
            None,
        );
        let peer = client.local_addr().unwrap();
        let task = tokio::spawn(async move {
            // "hel" was read to detect the protocol: it must go first, inside TLS.
            forward(&proxy, decision, guarded, b"hel", upstream_addr, peer, None).await;
        });
        client.write_all(b"lo!").await.unwrap();
        let mut echoed = Vec::new();
        bounded(client.read_to_end(&mut echoed)).await.unwrap();
        assert_eq!(echoed, b"hello!");
        assert_eq!(
            bounded(server).await.unwrap().as_deref(),
            Some("db.example.com")
        );
        drop(client);
        bounded(task).await.unwrap();
    }
}
