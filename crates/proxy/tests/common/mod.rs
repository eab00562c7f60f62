//! The harness shared by the proxy's integration tests: upstream servers on loopback, a
//! running proxy, registry snapshots from YAML, and small HTTP clients.

// Each test executable compiles this module on its own and uses a different part of it.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use portcullis_audit::Audit;
use portcullis_dns::{DnsCache, DnsConfig, HickoryLookup};
use portcullis_proxy::{Metrics, Proxy, ProxyConfig};
use portcullis_registry::{BuildOptions, Enforcement, Snapshot, build};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

/// A static cluster of one endpoint, reached over `transport`.
pub fn static_cluster(
    name: &str,
    endpoint: SocketAddr,
    transport: portcullis_envoy::UpstreamTransport,
) -> portcullis_envoy::Cluster {
    use portcullis_envoy as envoy;
    envoy::Cluster {
        load_assignment: Some(envoy::ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![envoy::LocalityLbEndpoints {
                lb_endpoints: vec![envoy::LbEndpoint::new(envoy::EndpointAddress::Socket(
                    endpoint,
                ))],
                ..Default::default()
            }],
        }),
        transport,
        ..envoy::Cluster::new(name, envoy::Discovery::Static)
    }
}

/// A snapshot with one HTTP listener, `0.0.0.0_80`, serving the inline route `table`, and
/// `clusters`, as an istiod-built model is indexed.
pub fn http_model(
    table: portcullis_envoy::RouteConfiguration,
    clusters: impl IntoIterator<Item = portcullis_envoy::Cluster>,
) -> Snapshot {
    use portcullis_envoy::{
        FilterChain, FilterChainMatch, HttpConnectionManager, Listener, NetworkFilter, Resources,
        RouteSource,
    };
    let listener = Listener {
        name: "0.0.0.0_80".into(),
        address: "0.0.0.0:80".parse().unwrap(),
        bind_to_port: false,
        use_original_dst: false,
        listener_filters: Vec::new(),
        filter_chains: vec![FilterChain {
            name: String::new(),
            filter_chain_match: FilterChainMatch::default(),
            filter: NetworkFilter::Http(Box::new(HttpConnectionManager {
                stat_prefix: "outbound_0.0.0.0_80".into(),
                route_config: RouteSource::Inline(table),
                stream_idle_timeout: None,
                request_timeout: None,
                accept_http_10: false,
                skipped_filters: Vec::new(),
            })),
            skipped_filters: Vec::new(),
            transport_socket: None,
        }],
        default_filter_chain: None,
    };
    let mut r = Resources::default();
    r.listeners
        .insert(listener.name.clone(), Arc::new(listener));
    for c in clusters {
        r.clusters.insert(c.name.clone(), Arc::new(c));
    }
    Snapshot::index(&r, &|_| None, None, 1)
}

/// Fails a test that hangs instead of letting it run forever.
pub async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("timed out")
}

/// A request as an upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub uri: String,
    pub headers: HeaderMap,
}

/// An HTTP/1.1 server on loopback answering its `name`, or echoing the body on `/echo`;
/// `/flaky-echo` reads the body and answers the first such request 503, later ones with
/// the body.
pub struct Upstream {
    pub addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // Dropping the accept task drops its JoinSet, which aborts every connection task.
        self.task.abort();
    }
}

impl Upstream {
    pub async fn start(name: &'static str) -> Upstream {
        Upstream::answering(name, StatusCode::OK).await
    }

    /// An upstream answering everything but `/echo` and `/flaky-echo` with `status`.
    pub async fn answering(name: &'static str, status: StatusCode) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (task_accepts, task_seen) = (Arc::clone(&accepts), Arc::clone(&seen));
        let flaky = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                task_accepts.fetch_add(1, Ordering::SeqCst);
                let (seen, flaky) = (Arc::clone(&task_seen), Arc::clone(&flaky));
                connections.spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        seen.lock().unwrap().push(Seen {
                            uri: req.uri().to_string(),
                            headers: req.headers().clone(),
                        });
                        let flaky = Arc::clone(&flaky);
                        async move {
                            let (body, status) = match req.uri().path() {
                                "/echo" => (Either::Left(req.into_body()), StatusCode::OK),
                                "/flaky-echo" => {
                                    let bytes = req.into_body().collect().await.unwrap().to_bytes();
                                    let status = if flaky.fetch_add(1, Ordering::SeqCst) == 0 {
                                        StatusCode::SERVICE_UNAVAILABLE
                                    } else {
                                        StatusCode::OK
                                    };
                                    (Either::Right(Full::new(bytes)), status)
                                }
                                _ => (
                                    Either::Right(Full::new(Bytes::from_static(name.as_bytes()))),
                                    status,
                                ),
                            };
                            let mut response = Response::new(body);
                            *response.status_mut() = status;
                            response
                                .headers_mut()
                                .insert("server", "upstream".parse().unwrap());
                            Ok::<_, Infallible>(response)
                        }
                    });
                    // Above hyper's default of 100 header fields, so that the proxy's own
                    // limit is what tests meet, not this server's.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .max_headers(1000)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            accepts,
            seen,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// A loopback port with nothing listening on it.
pub async fn refused_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

pub fn snapshot(yaml: &str, version: u64) -> Snapshot {
    let loaded = portcullis_model::load_str(yaml, &Arc::new(PathBuf::from("t.yaml")));
    assert!(!loaded.has_errors(), "{:#?}", loaded.findings);
    build(&loaded.resources, &BuildOptions::default(), None, version)
}

/// A ServiceEntry for `host` on `port` whose endpoints are loopback ports.
pub fn service(host: &str, port: u16, protocol: &str, endpoints: &[u16]) -> String {
    let endpoints: String = endpoints
        .iter()
        .map(|p| format!("  - {{address: 127.0.0.1, ports: {{main: {p}}}}}\n"))
        .collect();
    let endpoints = if endpoints.is_empty() {
        "  workloadSelector: {labels: {app: nothing-matches}}\n".to_string()
    } else {
        format!("  endpoints:\n{endpoints}")
    };
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [{host}]
  ports: [{{number: {port}, name: main, protocol: {protocol}}}]
  resolution: STATIC
{endpoints}",
        name = host.replace('.', "-"),
    )
}

pub const MESH_ALLOW_ANY: &str = "---
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    outboundTrafficPolicy:
      mode: ALLOW_ANY
";

/// A running explicit proxy; stops accepting when dropped.
pub struct Harness {
    pub addr: SocketAddr,
    pub proxy: Arc<Proxy>,
    pub registry: Arc<ArcSwap<Snapshot>>,
    pub metrics: Arc<Metrics>,
    pub audit: Arc<Audit>,
    /// The metrics as Prometheus text, through the registry they are registered in.
    prometheus: prometheus_client::registry::Registry,
    shutdown: CancellationToken,
}

impl Harness {
    /// Starts the proxy's drain, as a shutdown does.
    pub fn shut_down(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Harness {
    pub async fn start(snapshot: Snapshot) -> Harness {
        Harness::start_with(snapshot, ProxyConfig::default()).await
    }

    /// A proxy with `config`'s timeouts and limits.
    pub async fn start_with(snapshot: Snapshot, config: ProxyConfig) -> Harness {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let registry = Arc::new(ArcSwap::from_pointee(snapshot));
        let mut prometheus = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(Metrics::new(&mut prometheus));
        let audit = Arc::new(Audit::new(Enforcement::Enforce, "default", &mut prometheus));
        let proxy = Proxy::new(
            Arc::clone(&registry),
            config,
            Arc::clone(&metrics),
            vec![addr],
            dns(),
            Arc::clone(&audit),
        );
        let shutdown = CancellationToken::new();
        tokio::spawn(
            Arc::clone(&proxy).run_http_proxy(listener.try_into().unwrap(), shutdown.clone()),
        );
        Harness {
            addr,
            proxy,
            registry,
            metrics,
            audit,
            prometheus,
            shutdown,
        }
    }

    pub async fn client(&self) -> SendRequest<ClientBody> {
        let stream = TcpStream::connect(self.addr).await.unwrap();
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        sender
    }

    /// The metrics as `/stats/prometheus` shows them.
    pub fn prometheus(&self) -> String {
        portcullis_admin::prometheus(&self.prometheus, &[], &[])
    }
}

pub type ClientBody = BoxBody<Bytes, Infallible>;

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

pub fn get(uri: &str, host: Option<&str>) -> Request<ClientBody> {
    let mut builder = Request::get(uri);
    if let Some(host) = host {
        builder = builder.header("host", host);
    }
    builder.body(Full::new(Bytes::new()).boxed()).unwrap()
}

pub async fn send(sender: &mut SendRequest<ClientBody>, req: Request<ClientBody>) -> Answer {
    within(async {
        sender.ready().await.unwrap();
        let response = sender.send_request(req).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    })
    .await
}

/// One request on a new client connection.
pub async fn fetch(harness: &Harness, uri: &str, host: Option<&str>) -> Answer {
    let mut sender = harness.client().await;
    send(&mut sender, get(uri, host)).await
}

/// Writes `request` on a new raw connection and reads one response: head and body.
pub async fn raw(addr: SocketAddr, request: &str) -> (TcpStream, String, Vec<u8>) {
    within(async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let (head, body) = read_response(&mut stream).await;
        (stream, head, body)
    })
    .await
}

pub async fn read_response(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before a response head: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..end].to_vec()).unwrap();
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().unwrap())
        })
        .unwrap_or(0);
    let mut body = buf[end..].to_vec();
    while body.len() < length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed inside the body");
        body.extend_from_slice(&chunk[..n]);
    }
    (head, body)
}

/// The system resolver, as the binary uses it.
pub fn dns() -> Arc<DnsCache> {
    let lookup = HickoryLookup::from_system_conf().expect("system resolver configuration");
    DnsCache::new(lookup, DnsConfig::default())
}
