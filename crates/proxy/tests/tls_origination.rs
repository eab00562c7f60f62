//! TLS origination to loopback TLS servers with a test CA made here: a cluster whose
//! transport is an `UpstreamTlsContext` gets TLS with the SNI and verification it says, on
//! the HTTP/1.1 fast path, the general path and HTTP/2; a wrong CA or SAN is refused with
//! Envoy's 503 and `UF`, the request never sent; a server that wants a client certificate
//! gets the one configured.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis_envoy::{
    self as envoy, DataSource, PathMatch, RouteAction, RouteMatch, StringMatcher, StringPattern,
    TlsVersion, TrustedCa, UpstreamProtocol, UpstreamTls, UpstreamTransport,
};
use portcullis_registry::Snapshot;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

mod common;

use common::{Harness, fetch};

/// A test CA: its PEM and what signs with it.
struct Ca {
    pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A certificate for the SPIFFE identity `uri` and its key, as PEM.
    fn issue_spiffe(&self, uri: &str) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A certificate for `names` and its key, as PEM.
    fn issue(&self, names: &[&str]) -> (String, String) {
        let params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A TLS server on loopback answering `name` over HTTP/1.1 or HTTP/2 (by ALPN), recording
/// the SNI of each handshake; with `clients`, it requires a client certificate of that CA.
struct TlsUpstream {
    addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    sni: Arc<Mutex<Vec<Option<String>>>>,
    alpn: Arc<Mutex<Vec<Option<Vec<u8>>>>>,
    task: JoinHandle<()>,
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsUpstream {
    async fn start(ca: &Ca, names: &[&str], clients: Option<&Ca>) -> TlsUpstream {
        TlsUpstream::serving(ca.issue(names), clients).await
    }

    /// Serves with `cert` and `key` (PEM).
    async fn serving((cert, key): (String, String), clients: Option<&Ca>) -> TlsUpstream {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match clients {
            Some(clients) => {
                let mut roots = rustls::RootCertStore::empty();
                roots
                    .add(CertificateDer::from_pem_slice(clients.pem.as_bytes()).unwrap())
                    .unwrap();
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let mut config = builder
            .with_single_cert(
                chain,
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"istio".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handshakes = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let sni = Arc::new(Mutex::new(Vec::new()));
        let alpn = Arc::new(Mutex::new(Vec::new()));
        let (task_handshakes, task_requests, task_sni, task_alpn) = (
            Arc::clone(&handshakes),
            Arc::clone(&requests),
            Arc::clone(&sni),
            Arc::clone(&alpn),
        );
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let (handshakes, requests, sni, alpn) = (
                    Arc::clone(&task_handshakes),
                    Arc::clone(&task_requests),
                    Arc::clone(&task_sni),
                    Arc::clone(&task_alpn),
                );
                connections.spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    handshakes.fetch_add(1, Ordering::SeqCst);
                    let (_, session) = tls.get_ref();
                    sni.lock()
                        .unwrap()
                        .push(session.server_name().map(str::to_owned));
                    alpn.lock()
                        .unwrap()
                        .push(session.alpn_protocol().map(<[u8]>::to_vec));
                    let h2 = session.alpn_protocol() == Some(b"h2");
                    let service = service_fn(move |_: Request<Incoming>| {
                        requests.fetch_add(1, Ordering::SeqCst);
                        let body = if h2 { "tls-app h2" } else { "tls-app" };
                        async move {
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from(body),
                            )))
                        }
                    });
                    let io = TokioIo::new(tls);
                    if h2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await;
                    }
                });
            }
        });
        TlsUpstream {
            addr,
            handshakes,
            requests,
            sni,
            alpn,
            task,
        }
    }

    fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn sni(&self) -> Vec<Option<String>> {
        self.sni.lock().unwrap().clone()
    }
}

/// istiod's context for DestinationRule `tls: {mode: SIMPLE, caCertificates: ...}`.
fn simple(ca: &Ca, sni: Option<&str>) -> UpstreamTls {
    UpstreamTls {
        sni: sni.map(str::to_owned),
        auto_sni: sni.is_none(),
        auto_san_validation: sni.is_none(),
        alpn_protocols: Vec::new(),
        min_version: TlsVersion::Tls12,
        max_version: TlsVersion::Tls13,
        client_certificate: None,
        validation: Some(envoy::CertificateValidationContext {
            trusted_ca: TrustedCa::Pem(DataSource::Inline(ca.pem.clone().into_bytes())),
            match_subject_alt_names: Vec::new(),
            crl: None,
            only_verify_leaf_cert_crl: false,
        }),
    }
}

fn cluster(name: &str, endpoint: SocketAddr, tls: UpstreamTls) -> envoy::Cluster {
    common::static_cluster(name, endpoint, UpstreamTransport::Tls(Arc::new(tls)))
}

/// One virtual host per cluster, `NAME.example.com`, on an HTTP listener; `/rewritten`
/// has a prefix rewrite, which the HTTP/1.1 fast path hands to the general path.
fn model(clusters: Vec<envoy::Cluster>) -> Snapshot {
    let virtual_hosts = clusters
        .iter()
        .map(|c| envoy::VirtualHost {
            name: c.name.clone(),
            domains: vec![format!("{}.example.com", c.name)],
            routes: vec![
                envoy::Route::new(
                    "rewritten",
                    RouteMatch {
                        path: PathMatch::Prefix("/rewritten".into()),
                        ..RouteMatch::any()
                    },
                    RouteAction::Forward(Arc::new(envoy::Forward {
                        prefix_rewrite: Some("/other".into()),
                        ..envoy::Forward::to(&c.name)
                    })),
                ),
                envoy::Route::new(
                    "default",
                    RouteMatch::any(),
                    RouteAction::Forward(Arc::new(envoy::Forward::to(&c.name))),
                ),
            ],
            ..Default::default()
        })
        .collect();
    let table = envoy::RouteConfiguration {
        name: "80".into(),
        virtual_hosts,
        ignore_port_in_host_matching: true,
        ..Default::default()
    };
    common::http_model(table, clusters)
}

/// Envoy 1.40's 503 after a failed handshake on the only attempt (a route without a retry
/// policy); the transport failure reason goes to the log, not the body.
const CONNECT_FAILED: &str = "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure";

#[tokio::test]
async fn plain_http_leaves_as_verified_tls_and_connections_are_reused() {
    let ca = Ca::new("test CA");
    let server = TlsUpstream::start(&ca, &["api.example.com"], None).await;
    let auto = simple(&ca, None);
    let fixed = simple(&ca, Some("api.example.com"));
    let harness = Harness::start(model(vec![
        cluster("api", server.addr, auto),
        cluster("fixed", server.addr, fixed),
    ]))
    .await;

    // Fast path, SNI from the request's host (istiod's auto_sni without `sni`).
    let ok = fetch(&harness, "http://api.example.com/", None).await;
    assert_eq!((ok.status.as_u16(), ok.text()), (200, "tls-app"));
    assert_eq!(server.sni(), [Some("api.example.com".to_owned())]);
    // The next request, from another client connection, reuses the TLS connection.
    let again = fetch(&harness, "http://api.example.com/", None).await;
    assert_eq!(again.text(), "tls-app");
    assert_eq!(server.handshakes(), 1);
    // General path (a rewrite), same endpoint and SNI: the fast path's pooled connection
    // is not the hyper sender's, so a second handshake; then reused too.
    for _ in 0..2 {
        let rewritten = fetch(&harness, "http://api.example.com/rewritten", None).await;
        assert_eq!(rewritten.text(), "tls-app");
    }
    assert_eq!(server.handshakes(), 2);
    // Another cluster to the same address with its own SNI: never a connection made for
    // the first one.
    let fixed = fetch(&harness, "http://fixed.example.com/", None).await;
    assert_eq!(fixed.text(), "tls-app");
    assert_eq!(server.handshakes(), 3);
    assert_eq!(server.requests(), 5);
}

#[tokio::test]
async fn http2_clusters_offer_h2_by_alpn() {
    let ca = Ca::new("test CA");
    let server = TlsUpstream::start(&ca, &["grpc.example.com"], None).await;
    let mut tls = simple(&ca, None);
    tls.alpn_protocols = vec!["h2".into()];
    let mut c = cluster("grpc", server.addr, tls);
    c.upstream_protocol = UpstreamProtocol::Http2;
    let harness = Harness::start(model(vec![c])).await;
    let ok = fetch(&harness, "http://grpc.example.com/", None).await;
    assert_eq!((ok.status.as_u16(), ok.text()), (200, "tls-app h2"));
}

#[tokio::test]
async fn a_wrong_ca_or_san_is_refused_with_envoys_reason_and_never_sent_the_request() {
    let (ca, other) = (Ca::new("test CA"), Ca::new("other CA"));
    let server = TlsUpstream::start(&ca, &["api.example.com"], None).await;
    let mut wrong_san = simple(&ca, Some("api.example.com"));
    if let Some(v) = &mut wrong_san.validation {
        v.match_subject_alt_names = vec![StringMatcher {
            pattern: StringPattern::Exact("billing.example.com".into()),
            ignore_case: false,
        }];
    }
    let mut wrong_host = simple(&ca, None);
    wrong_host.sni = None;
    let harness = Harness::start(model(vec![
        cluster("wrongca", server.addr, simple(&other, None)),
        cluster("wrongsan", server.addr, wrong_san),
        // auto_san_validation: the certificate is for api.example.com, not this host.
        cluster("wronghost", server.addr, wrong_host),
    ]))
    .await;
    for host in ["wrongca", "wrongsan", "wronghost"] {
        for path in ["/", "/rewritten"] {
            let refused = fetch(&harness, &format!("http://{host}.example.com{path}"), None).await;
            assert_eq!(refused.status.as_u16(), 503, "{host}{path}");
            assert_eq!(refused.text(), CONNECT_FAILED, "{host}{path}");
        }
    }
    assert_eq!(server.requests(), 0);
    let metrics = harness.prometheus();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total{") && l.contains("\"UF\"")),
        "{metrics}"
    );
}

#[tokio::test]
async fn mutual_tls_presents_the_configured_client_certificate() {
    let (ca, clients) = (Ca::new("server CA"), Ca::new("client CA"));
    let server = TlsUpstream::start(&ca, &["api.example.com"], Some(&clients)).await;
    let (cert, key) = clients.issue(&["client.example.com"]);
    let mut mutual = simple(&ca, Some("api.example.com"));
    mutual.client_certificate = Some(envoy::TlsCertificate {
        certificate_chain: DataSource::Inline(cert.into_bytes()),
        private_key: DataSource::Inline(key.into_bytes()),
    });
    let harness = Harness::start(model(vec![
        cluster("mutual", server.addr, mutual),
        cluster(
            "anonymous",
            server.addr,
            simple(&ca, Some("api.example.com")),
        ),
    ]))
    .await;
    let ok = fetch(&harness, "http://mutual.example.com/", None).await;
    assert_eq!((ok.status.as_u16(), ok.text()), (200, "tls-app"));
    // TLS 1.3: the client's handshake ends before the server judges the (missing)
    // certificate; its alert ends the connection before any response.
    let refused = fetch(&harness, "http://anonymous.example.com/", None).await;
    assert_eq!(refused.status.as_u16(), 503);
    assert_eq!(server.requests(), 1);
}

/// Istio mutual TLS: a mesh CA, a peer whose certificate names its SPIFFE identity and that
/// requires the workload's certificate; the proxy gets the workload's identity (as read from
/// istio-agent's files) at run time.
#[tokio::test]
async fn istio_mutual_tls_presents_the_workload_identity_and_checks_the_peers() {
    let mesh = Ca::new("mesh root");
    let peer_id = "spiffe://cluster.local/ns/default/sa/api";
    let server = TlsUpstream::serving(mesh.issue_spiffe(peer_id), Some(&mesh)).await;
    let istio = |san: &str| envoy::IstioMutual {
        sni: Some("outbound_.80_._.api.example.com".into()),
        alpn_protocols: vec!["istio-peer-exchange".into(), "istio".into()],
        match_subject_alt_names: vec![StringMatcher {
            pattern: StringPattern::Exact(san.into()),
            ignore_case: false,
        }],
    };
    let mtls = |name: &str, san: &str| envoy::Cluster {
        transport: UpstreamTransport::IstioMutualTls(Arc::new(istio(san))),
        ..cluster(name, server.addr, simple(&mesh, None))
    };
    let harness = Harness::start(model(vec![
        mtls("mesh", peer_id),
        mtls("impostor", "spiffe://cluster.local/ns/default/sa/billing"),
    ]))
    .await;
    // No workload certificates yet: refused, never plaintext.
    let refused = fetch(&harness, "http://mesh.example.com/", None).await;
    assert_eq!(refused.status.as_u16(), 503);
    assert_eq!(server.handshakes(), 0);

    let (cert, key) = mesh.issue_spiffe("spiffe://cluster.local/ns/default/sa/client");
    harness
        .proxy
        .set_workload_identity(Arc::new(portcullis_registry::WorkloadIdentity {
            cert_chain: cert.into_bytes(),
            key: key.into_bytes(),
            root: mesh.pem.clone().into_bytes(),
        }));
    let ok = fetch(&harness, "http://mesh.example.com/", None).await;
    assert_eq!((ok.status.as_u16(), ok.text()), (200, "tls-app"));
    assert_eq!(
        server.sni(),
        [Some("outbound_.80_._.api.example.com".to_owned())]
    );
    assert_eq!(
        server.alpn.lock().unwrap()[0].as_deref(),
        Some(&b"istio"[..])
    );
    // A peer that is not the identity the cluster names.
    let impostor = fetch(&harness, "http://impostor.example.com/", None).await;
    assert_eq!(impostor.status.as_u16(), 503);
    assert_eq!(server.requests(), 1);
}
