//! What an Istio sidecar's outbound HTTP does beyond routing, checked against Envoy 1.40
//! configured as istiod configures it: one log record per request, the headers Envoy adds
//! upstream, and HTTP/1.0.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

mod common;

use common::{Harness, Upstream, fetch, snapshot};

/// An h2c (prior knowledge) server on loopback that records request headers.
struct H2Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
    accepts: Arc<std::sync::atomic::AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for H2Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl H2Upstream {
    async fn start() -> H2Upstream {
        H2Upstream::serve(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    /// Serves `listener`, which may already hold connections in its accept queue.
    fn serve(listener: TcpListener) -> H2Upstream {
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let accepts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (task_seen, task_accepts) = (Arc::clone(&seen), Arc::clone(&accepts));
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                task_accepts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let seen = Arc::clone(&task_seen);
                connections.spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        seen.lock().unwrap().push(req.headers().clone());
                        let response = Response::new(Full::new(Bytes::from_static(b"h2")));
                        async { Ok::<_, Infallible>(response) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        H2Upstream {
            addr,
            seen,
            accepts,
            task,
        }
    }
}

/// A stream of an HTTP/2 connection as `h2`'s server takes it: the request, and where its
/// response goes.
type H2Stream = (Request<h2::RecvStream>, h2::server::SendResponse<Bytes>);

/// A loopback port taking one HTTP/2 connection, and that connection's streams as they
/// arrive. `h2` moves a connection only while it is polled: a task of its own does that, so
/// a test can read a stream's body while waiting for the next stream.
async fn h2_streams() -> (u16, tokio::sync::mpsc::UnboundedReceiver<H2Stream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (streams_tx, streams) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut connection = h2::server::handshake(stream).await.unwrap();
        while let Some(Ok(stream)) = connection.accept().await {
            let _ = streams_tx.send(stream);
        }
    });
    (port, streams)
}

/// Twenty requests for `h2.internal` through `harness` at once, each on a connection of its
/// own: each answer's head and body.
fn twenty_at_once(harness: &Harness) -> JoinSet<(tokio::net::TcpStream, String, Vec<u8>)> {
    let request =
        "GET http://h2.internal/ HTTP/1.1\r\nhost: h2.internal\r\nconnection: close\r\n\r\n";
    let mut requests = JoinSet::new();
    for _ in 0..20 {
        requests.spawn(common::raw(harness.addr, request));
    }
    requests
}

/// The `istio_requests_total` samples in Prometheus text.
fn request_samples(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .collect()
}

#[tokio::test]
async fn an_http1_request_to_an_http2_port_is_counted_once() {
    let upstream = H2Upstream::start().await;
    let harness = Harness::start(snapshot(
        &common::service("h2.internal", 80, "HTTP2", &[upstream.addr.port()]),
        1,
    ))
    .await;
    let answer = fetch(&harness, "http://h2.internal/", None).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.text(), "h2");
    assert_eq!(upstream.seen.lock().unwrap().len(), 1);
    let text = harness.prometheus();
    let samples = request_samples(&text);
    assert_eq!(samples.len(), 1, "{samples:#?}");
    assert!(samples[0].contains("response_code=\"200\""), "{samples:#?}");
    assert!(samples[0].ends_with(" 1"), "{samples:#?}");
}

/// An HTTP/1.1 upstream for `app.internal` and an HTTP/2 one for `h2.internal`, and the
/// registry that serves them on port 80.
async fn app_and_h2_upstreams() -> (Upstream, H2Upstream, String) {
    let h1 = Upstream::start("app").await;
    let h2 = H2Upstream::start().await;
    let yaml = [
        common::service("app.internal", 80, "HTTP", &[h1.port()]),
        common::service("h2.internal", 80, "HTTP2", &[h2.addr.port()]),
    ]
    .concat();
    (h1, h2, yaml)
}

/// What Envoy as an Istio sidecar adds to every proxied request, on the fast path (a plain
/// GET), the general path (a chunked body) and towards an HTTP/2 upstream.
#[tokio::test]
async fn upstreams_get_envoys_request_headers_on_every_path() {
    let (h1, h2, yaml) = app_and_h2_upstreams().await;
    let config = portcullis_proxy::ProxyConfig {
        route_timeout: Some(std::time::Duration::from_secs(5)),
        ..portcullis_proxy::ProxyConfig::default()
    };
    let harness = Harness::start_with(snapshot(&yaml, 1), config).await;
    let mut sender = harness.client().await;
    let with = |uri: &str, chunked: bool| {
        let mut builder = Request::post(uri)
            .header("x-envoy-attempt-count", "7")
            .header("x-envoy-expected-rq-timeout-ms", "9");
        if chunked {
            builder = builder.header("transfer-encoding", "chunked");
        }
        builder
            .body(http_body_util::BodyExt::boxed(Full::new(
                Bytes::from_static(b"x"),
            )))
            .unwrap()
    };
    for (uri, chunked) in [
        ("http://app.internal/fast", false),
        ("http://app.internal/general", true),
        ("http://h2.internal/", false),
    ] {
        let answer = common::send(&mut sender, with(uri, chunked)).await;
        assert_eq!(answer.status, 200, "{uri}");
    }
    let mut seen: Vec<HeaderMap> = h1.requests().into_iter().map(|s| s.headers).collect();
    seen.extend(h2.seen.lock().unwrap().iter().cloned());
    assert_eq!(seen.len(), 3);
    let mut ids = Vec::new();
    for headers in &seen {
        let one = |name: &str| {
            let values: Vec<&str> = headers
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect();
            assert_eq!(values.len(), 1, "{name}: {headers:?}");
            values[0].to_owned()
        };
        assert_eq!(one("x-envoy-attempt-count"), "1", "{headers:?}");
        assert_eq!(one("x-envoy-expected-rq-timeout-ms"), "5000", "{headers:?}");
        assert_eq!(one("x-forwarded-proto"), "http", "{headers:?}");
        let id = one("x-request-id");
        assert_eq!(id.len(), 36, "{id}");
        assert_eq!(id.as_bytes()[14], b'4', "{id}");
        ids.push(id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "each request has its own id");

    // A client's own request id is kept, on both paths.
    for chunked in [false, true] {
        let mut req = with("http://app.internal/", chunked);
        req.headers_mut()
            .insert("x-request-id", "from-the-client".parse().unwrap());
        common::send(&mut sender, req).await;
    }
    for seen in &h1.requests()[2..] {
        assert_eq!(seen.headers["x-request-id"], "from-the-client");
    }
}

/// Whether `id` is shaped as Envoy's generated request ids: a UUID version 4.
fn is_uuid_v4(id: &str) -> bool {
    let groups: Vec<usize> = id.split('-').map(str::len).collect();
    groups == [8, 4, 4, 4, 12]
        && id.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit())
        && id.as_bytes()[14] == b'4'
}

/// A JSON access log in a folder of its own, removed with it.
struct JsonLog {
    log: Arc<portcullis_proxy::AccessLog>,
    dir: std::path::PathBuf,
}

impl Drop for JsonLog {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl JsonLog {
    fn open(name: &str) -> JsonLog {
        let dir = std::env::temp_dir().join(format!("portcullis-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = Arc::new(
            portcullis_proxy::AccessLog::open(
                &dir.join("access.log"),
                portcullis_proxy::AccessLogFormat::Json,
                prometheus_client::metrics::counter::Counter::default(),
            )
            .unwrap(),
        );
        JsonLog { log, dir }
    }

    /// A proxy's configuration that writes its access log here.
    fn config(&self) -> portcullis_proxy::ProxyConfig {
        portcullis_proxy::ProxyConfig {
            access_log: Arc::clone(&self.log),
            ..portcullis_proxy::ProxyConfig::default()
        }
    }

    /// The log's text once it has `lines` lines.
    async fn text(&self, lines: usize) -> String {
        common::within(async {
            loop {
                assert!(self.log.flush(std::time::Duration::from_secs(5)));
                let text = std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default();
                if text.lines().count() >= lines {
                    break text;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await
    }
}

/// The access log's `%REQ(X-REQUEST-ID)%` is the id the upstream got: the one the proxy
/// generated when the client sent none (as Envoy's connection manager generates it before
/// routing), on the fast path, the general path and towards HTTP/2, and on local replies
/// too; a client's own id verbatim.
#[tokio::test]
async fn the_access_log_shows_the_request_id_the_upstream_got() {
    let (h1, h2, yaml) = app_and_h2_upstreams().await;
    let log = JsonLog::open("reqid");
    let harness = Harness::start_with(snapshot(&yaml, 1), log.config()).await;
    // (URI, chunked body: the general path, the client's own id)
    let requests = [
        ("http://app.internal/fast", false, None),
        ("http://app.internal/general", true, None),
        ("http://h2.internal/h2", false, None),
        ("http://unregistered.example/fast-502", false, None),
        ("http://unregistered.example/general-502", true, None),
        ("http://app.internal/fast-own", false, Some("Mine-1")),
        ("http://app.internal/general-own", true, Some("Mine-2")),
    ];
    for (uri, chunked, id) in requests {
        let mut builder = Request::post(uri);
        if chunked {
            builder = builder.header("transfer-encoding", "chunked");
        }
        if let Some(id) = id {
            builder = builder.header("x-request-id", id);
        }
        let req = builder
            .body(http_body_util::BodyExt::boxed(Full::new(
                Bytes::from_static(b"x"),
            )))
            .unwrap();
        let answer = common::send(&mut harness.client().await, req).await;
        let status = if uri.contains("502") { 502 } else { 200 };
        assert_eq!(answer.status, status, "{uri}");
        // Envoy adds no id to a response unless `always_set_request_id_in_response`.
        assert_eq!(answer.header("x-request-id"), None, "{uri}");
    }
    let mut sent: std::collections::HashMap<String, String> = h1
        .requests()
        .into_iter()
        .map(|s| {
            (
                s.uri,
                s.headers["x-request-id"].to_str().unwrap().to_owned(),
            )
        })
        .collect();
    let h2_seen = h2.seen.lock().unwrap().clone();
    assert_eq!(h2_seen.len(), 1);
    sent.insert(
        "/h2".to_owned(),
        h2_seen[0]["x-request-id"].to_str().unwrap().to_owned(),
    );
    let logged = log.text(requests.len()).await;
    assert_eq!(logged.lines().count(), requests.len(), "{logged}");
    let mut ids = std::collections::HashSet::new();
    for line in logged.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let (path, id) = (v["path"].as_str().unwrap(), v["request_id"].as_str());
        let id = id.unwrap_or_else(|| panic!("no request id logged: {line}"));
        match path {
            "/fast-own" => assert_eq!(id, "Mine-1"),
            "/general-own" => assert_eq!(id, "Mine-2"),
            "/fast-502" | "/general-502" => assert!(is_uuid_v4(id), "{line}"),
            _ => {
                assert!(is_uuid_v4(id), "{line}");
                assert_eq!(sent.get(path).map(String::as_str), Some(id), "{line}");
            }
        }
        ids.insert(id.to_owned());
    }
    assert_eq!(ids.len(), requests.len(), "one id per request: {logged}");
}

/// HTTP/1.0 as Envoy's codec treats it in Istio's default config (`426`, connection closed),
/// and with `accept_http_10` (served with a Host, `400` without one); never forwarded as a
/// Host-less HTTP/1.1 request.
#[tokio::test]
async fn http10_gets_426_by_default_and_needs_a_host_when_accepted() {
    let app = common::Upstream::start("app").await;
    let yaml = [
        common::service("app.internal", 80, "HTTP", &[app.port()]),
        common::MESH_ALLOW_ANY.to_string(),
    ]
    .concat();
    let harness = Harness::start(snapshot(&yaml, 1)).await;
    for request in [
        "GET http://app.internal/ HTTP/1.0\r\n\r\n",
        "GET http://app.internal/ HTTP/1.0\r\nHost: app.internal\r\nConnection: keep-alive\r\n\r\n",
    ] {
        let (mut stream, head, body) = common::raw(harness.addr, request).await;
        // Envoy's status line says HTTP/1.1 here; hyper answers a 1.0 client in 1.0.
        assert!(head.contains(" 426 Upgrade Required\r\n"), "{head}");
        assert!(head.contains("\r\nconnection: close"), "{head}");
        assert!(head.contains("\r\nserver: envoy\r\n"), "{head}");
        assert_eq!(body, b"Upgrade Required");
        let mut rest = Vec::new();
        let read = common::within(tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut rest));
        assert_eq!(read.await.unwrap(), 0, "the connection is closed");
    }
    assert_eq!(app.accepts(), 0);

    let config = portcullis_proxy::ProxyConfig {
        accept_http10: true,
        ..portcullis_proxy::ProxyConfig::default()
    };
    let harness = Harness::start_with(snapshot(&yaml, 1), config).await;
    let (_, head, body) = common::raw(
        harness.addr,
        "GET http://app.internal/ HTTP/1.0\r\nHost: app.internal\r\n\r\n",
    )
    .await;
    assert!(head.contains(" 200 OK\r\n"), "{head}");
    assert_eq!(body, b"app");
    let seen = app.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].headers["host"], "app.internal");
    assert!(seen[0].headers.contains_key("x-request-id"));
    assert_eq!(app.accepts(), 1);

    // Without a Host, in origin-form: nothing to route on.
    let (_, head, _) = common::raw(harness.addr, "GET / HTTP/1.0\r\n\r\n").await;
    assert!(head.contains(" 400 Bad Request\r\n"), "{head}");
    assert_eq!(app.accepts(), 1);
}

/// An HTTP/2 upstream that refuses a stream (`REFUSED_STREAM`) never processed it: the
/// request goes again at once, twice, as the same attempt, also where the route retries
/// nothing; the third refusal is a failed attempt, which Istio's `refused-stream` retries
/// as attempt 2.
#[tokio::test]
async fn a_refused_http2_stream_is_sent_again() {
    /// An upstream refusing the first `refusals` streams; the attempt counts it saw.
    async fn refusing(refusals: usize) -> (u16, tokio::sync::oneshot::Receiver<Vec<String>>) {
        let (port, mut streams) = h2_streams().await;
        let (counts_tx, counts_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut counts = Vec::new();
            let mut report = Some(counts_tx);
            while let Some((request, mut respond)) = streams.recv().await {
                let count = &request.headers()["x-envoy-attempt-count"];
                counts.push(count.to_str().unwrap().to_owned());
                if counts.len() <= refusals {
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                    continue;
                }
                respond.send_response(Response::new(()), true).unwrap();
                if let Some(tx) = report.take() {
                    let _ = tx.send(counts.clone());
                }
            }
        });
        (port, counts_rx)
    }

    let (port, counts) = refusing(3).await;
    let harness = Harness::start(snapshot(
        &common::service("h2.internal", 80, "HTTP2", &[port]),
        1,
    ))
    .await;
    let answer = fetch(&harness, "http://h2.internal/", None).await;
    assert_eq!(answer.status, 200);
    assert_eq!(common::within(counts).await.unwrap(), ["1", "1", "1", "2"]);

    let (port, counts) = refusing(2).await;
    let no_retries = "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: h2, namespace: default}
spec:
  hosts: [h2.internal]
  http: [{route: [{destination: {host: h2.internal}}], retries: {attempts: 0}}]
";
    let config = common::service("h2.internal", 80, "HTTP2", &[port]) + no_retries;
    let harness = Harness::start(snapshot(&config, 1)).await;
    let answer = fetch(&harness, "http://h2.internal/", None).await;
    assert_eq!(answer.status, 200);
    assert_eq!(common::within(counts).await.unwrap(), ["1", "1", "1"]);
}

/// A request whose body is still arriving when an HTTP/2 upstream refuses its stream goes
/// again with what had been sent of its body and then the rest as the client sends it (as
/// Envoy's router resends a body it is still buffering): the second stream gets the whole
/// body, once.
#[tokio::test]
async fn a_refused_http2_stream_whose_body_is_still_arriving_goes_again_whole() {
    use tokio::io::AsyncWriteExt;

    let (port, mut streams) = h2_streams().await;
    let (resumed_tx, resumed_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (request, mut respond) = streams.recv().await.unwrap();
        let first = request.into_body().data().await.unwrap().unwrap();
        assert_eq!(first, "hello ");
        respond.send_reset(h2::Reason::REFUSED_STREAM);

        // The client sends the rest of its body only once the second stream has the first
        // part: the proxy cannot have had it whole before.
        let (request, mut respond) = streams.recv().await.unwrap();
        let attempt = request.headers()["x-envoy-attempt-count"].clone();
        let mut body = request.into_body();
        let mut whole = body.data().await.unwrap().unwrap().to_vec();
        let _ = body.flow_control().release_capacity(whole.len());
        let _ = resumed_tx.send(());
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            whole.extend_from_slice(&chunk);
        }
        let response = Response::builder()
            .header("x-attempt", attempt)
            .header("content-length", whole.len())
            .body(())
            .unwrap();
        let mut send = respond.send_response(response, false).unwrap();
        send.send_data(whole.into(), true).unwrap();
        std::future::pending::<()>().await;
    });
    let harness = Harness::start(snapshot(
        &common::service("h2.internal", 80, "HTTP2", &[port]),
        1,
    ))
    .await;
    let mut client = tokio::net::TcpStream::connect(harness.addr).await.unwrap();
    let head = "POST http://h2.internal/ HTTP/1.1\r\nhost: h2.internal\r\n\
                transfer-encoding: chunked\r\n\r\n6\r\nhello \r\n";
    client.write_all(head.as_bytes()).await.unwrap();
    common::within(resumed_rx).await.unwrap();
    client.write_all(b"5\r\nworld\r\n0\r\n\r\n").await.unwrap();
    let (head, body) = common::within(common::read_response(&mut client)).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("x-attempt: 1\r\n"), "{head}");
    assert_eq!(body, b"hello world");
}

/// An HTTP/2 upstream that resets a stream (`INTERNAL_ERROR`) before answering gets Envoy's
/// remote reset: `503 UR`, "reset reason: remote reset", not sent again (Istio's default
/// retry policy has no `reset`), and the log does not call the local 503 the upstream's.
#[tokio::test]
async fn an_http2_stream_the_upstream_resets_is_a_503_ur() {
    let (port, mut incoming) = h2_streams().await;
    let streams = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = Arc::clone(&streams);
    tokio::spawn(async move {
        while let Some((_, mut respond)) = incoming.recv().await {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            respond.send_reset(h2::Reason::INTERNAL_ERROR);
        }
    });
    let log = JsonLog::open("ur");
    let harness = Harness::start_with(
        snapshot(&common::service("h2.internal", 80, "HTTP2", &[port]), 1),
        log.config(),
    )
    .await;
    let answer = fetch(&harness, "http://h2.internal/", None).await;
    assert_eq!(answer.status, 503);
    assert_eq!(
        answer.text(),
        "upstream connect error or disconnect/reset before headers. reset reason: remote reset"
    );
    assert_eq!(streams.load(std::sync::atomic::Ordering::SeqCst), 1);
    let text = log.text(1).await;
    let line = text.lines().next().unwrap();
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["response_flags"], "UR", "{line}");
    assert_eq!(v["response_code"], 503, "{line}");
    assert_eq!(
        v["response_code_details"],
        serde_json::Value::Null,
        "{line}"
    );
    let samples = request_samples(&harness.prometheus()).join("\n");
    assert!(samples.contains("response_flags=\"UR\""), "{samples}");
}

/// A stream above the last stream id of an HTTP/2 upstream's GOAWAY was never processed
/// (RFC 9113, 6.8), as a refused one: it goes again at once, as the same attempt, on a new
/// connection. nginx, the usual HTTP/2 upstream, sends such a GOAWAY every
/// `keepalive_requests` (1,000) streams, and with many streams in flight several are above it.
#[tokio::test]
async fn a_stream_above_an_http2_upstreams_goaway_is_sent_again_on_a_new_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (counts_tx, counts_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        // The first connection speaks just enough HTTP/2 by hand to send GOAWAY with a last
        // stream id of 0 once the request's HEADERS arrive: h2's server cannot be made to
        // leave a stream it has received unprocessed.
        let (mut first, _) = listener.accept().await.unwrap();
        let mut preface = [0u8; 24];
        first.read_exact(&mut preface).await.unwrap();
        assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        // SETTINGS, empty: the server's preface.
        first.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
        loop {
            let mut head = [0u8; 9];
            first.read_exact(&mut head).await.unwrap();
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            first.read_exact(&mut payload).await.unwrap();
            match (head[3], head[4] & 1) {
                // The client's SETTINGS, acknowledged.
                (4, 0) => first.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await.unwrap(),
                // HEADERS: GOAWAY, last stream id 0, NO_ERROR.
                (1, _) => {
                    let goaway = [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                    first.write_all(&goaway).await.unwrap();
                    break;
                }
                _ => {}
            }
        }
        // The rest of the connection is the proxy's to close.
        let mut rest = Vec::new();
        let _ = first.read_to_end(&mut rest).await;

        let (second, _) = listener.accept().await.unwrap();
        let mut connection = h2::server::handshake(second).await.unwrap();
        let (request, mut respond) = connection.accept().await.unwrap().unwrap();
        let count = request.headers()["x-envoy-attempt-count"]
            .to_str()
            .unwrap()
            .to_owned();
        respond.send_response(Response::new(()), true).unwrap();
        let _ = counts_tx.send(count);
        while connection.accept().await.is_some() {}
    });
    let harness = Harness::start(snapshot(
        &common::service("h2.internal", 80, "HTTP2", &[port]),
        1,
    ))
    .await;
    let answer = fetch(&harness, "http://h2.internal/", None).await;
    assert_eq!(answer.status, 200);
    assert_eq!(common::within(counts_rx).await.unwrap(), "1");
}

/// An HTTP/2 upstream that sends GOAWAY takes no new stream on that connection: each later
/// request goes on a new one, and none fails.
#[tokio::test]
async fn an_http2_upstream_that_goes_away_gets_later_requests_on_a_new_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let accepted = Arc::clone(&accepts);
    let server = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            connections.spawn(async move {
                let mut connection = h2::server::handshake(stream).await.unwrap();
                // GOAWAY goes out before the answer, so the proxy has it when the answer
                // comes: the next request cannot race it.
                let mut going = false;
                while let Some(Ok((_, mut respond))) = connection.accept().await {
                    if !going {
                        connection.graceful_shutdown();
                        going = true;
                    }
                    respond.send_response(Response::new(()), true).unwrap();
                }
            });
        }
    });
    let harness = Harness::start(snapshot(
        &common::service("h2.internal", 80, "HTTP2", &[port]),
        1,
    ))
    .await;
    for _ in 0..3 {
        let answer = fetch(&harness, "http://h2.internal/", None).await;
        assert_eq!(answer.status, 200);
    }
    assert_eq!(accepts.load(std::sync::atomic::Ordering::SeqCst), 3);
    server.abort();
}

/// A request still sending its body when the route timeout answers 504 has its HTTP/2 stream
/// reset upstream (`CANCEL`), while the client's connection stays open: the upstream is not
/// left holding a stream that nobody waits for.
#[tokio::test]
async fn a_timed_out_http2_request_still_sending_its_body_is_reset_upstream() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (reset_tx, reset_rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut connection = h2::server::handshake(stream).await.unwrap();
        let (request, _respond) = connection.accept().await.unwrap().unwrap();
        let mut body = request.into_body();
        let watch = tokio::spawn(async move {
            let mut received = Vec::new();
            let reason = loop {
                match body.data().await {
                    Some(Ok(chunk)) => {
                        let _ = body.flow_control().release_capacity(chunk.len());
                        received.extend_from_slice(&chunk);
                    }
                    Some(Err(e)) => break e.reason(),
                    None => break None,
                }
            };
            let _ = reset_tx.send((received, reason));
        });
        while let Some(Ok(_)) = connection.accept().await {}
        let _ = watch.await;
    });
    let config = portcullis_proxy::ProxyConfig {
        route_timeout: Some(std::time::Duration::from_millis(200)),
        ..portcullis_proxy::ProxyConfig::default()
    };
    let harness = Harness::start_with(
        snapshot(&common::service("h2.internal", 80, "HTTP2", &[port]), 1),
        config,
    )
    .await;
    // One chunk of a chunked body, and then nothing: the body never ends.
    let (_client, head, _) = common::raw(
        harness.addr,
        "POST http://h2.internal/ HTTP/1.1\r\nHost: h2.internal\r\n\
         transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n",
    )
    .await;
    assert!(head.contains(" 504 Gateway Timeout\r\n"), "{head}");
    let (received, reason) = common::within(reset_rx).await.unwrap();
    assert_eq!(received, b"abc");
    assert_eq!(reason, Some(h2::Reason::CANCEL));
    server.abort();
}

/// Each attempt carries its number: with a refusing endpoint beside a good one, a request
/// whose first pick was the refusing one reaches the good one with
/// `x-envoy-attempt-count: 2` (Istio's default retries connect failures only).
#[tokio::test]
async fn a_retried_request_carries_its_attempt_number() {
    let good = Upstream::start("good").await;
    let refused = common::refused_port().await;
    let harness = Harness::start(snapshot(
        &common::service("app.internal", 80, "HTTP", &[refused, good.port()]),
        1,
    ))
    .await;
    // The first pick is random: 40 requests all going to the good one first is 1 in 2^40.
    for _ in 0..40 {
        let answer = fetch(&harness, "http://app.internal/", None).await;
        assert_eq!(answer.status, 200);
        let counts: Vec<String> = good
            .requests()
            .iter()
            .map(|seen| {
                seen.headers["x-envoy-attempt-count"]
                    .to_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert!(counts.iter().all(|c| c == "1" || c == "2"), "{counts:?}");
        if counts.iter().any(|c| c == "2") {
            return;
        }
    }
    panic!("no request was retried after the refused endpoint");
}

/// Requests that arrive together for an HTTP/2 endpoint with no connection yet share the
/// one the first of them makes, as Envoy's HTTP/2 pool gives streams to a connection still
/// connecting: one upstream connection, not one per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_arriving_together_share_the_http2_connection_being_made() {
    // The upstream's accept queue (backlog 1: two connections) is full until it starts
    // serving, so the proxy's connection takes a SYN retransmission (about a second) to be
    // made: every request arrives while it is being made.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let fillers = [
        tokio::net::TcpStream::connect(addr).await.unwrap(),
        tokio::net::TcpStream::connect(addr).await.unwrap(),
    ];
    let harness = Harness::start(snapshot(
        &common::service("h2.internal", 80, "HTTP2", &[addr.port()]),
        1,
    ))
    .await;
    let mut requests = twenty_at_once(&harness);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let upstream = H2Upstream::serve(listener);
    while let Some(answer) = requests.join_next().await {
        let (_, head, body) = answer.unwrap();
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        assert_eq!(body, b"h2");
    }
    drop(fillers);
    assert_eq!(upstream.seen.lock().unwrap().len(), 20);
    // The two that filled the queue, and the proxy's one.
    assert_eq!(
        upstream.accepts.load(std::sync::atomic::Ordering::SeqCst),
        3
    );
}

/// When the HTTP/2 connection that requests wait for cannot be made, they fail as the
/// request that tried did (`503 UF`), and none waits on: nothing listens on the endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_for_an_http2_connection_that_fails_fail_with_it() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let harness = Harness::start(snapshot(
        &common::service("h2.internal", 80, "HTTP2", &[port]),
        1,
    ))
    .await;
    let mut requests = twenty_at_once(&harness);
    while let Some(answer) = requests.join_next().await {
        let (_, head, body) = answer.unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(
            String::from_utf8_lossy(&body).contains("remote connection failure"),
            "{head}"
        );
    }
}

/// A DestinationRule for `h2.internal` whose connection pool has these `http` settings.
fn h2_pool_rule(http: &str) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: h2, namespace: default}}
spec:
  host: h2.internal
  trafficPolicy:
    connectionPool:
      http: {http}
"
    )
}

/// A DestinationRule's `http.maxRequestsPerConnection` on an HTTP/2 upstream: the shared
/// connection takes that many streams, then a new one is opened.
#[tokio::test]
async fn a_shared_http2_connection_carries_max_requests_per_connection() {
    let upstream = H2Upstream::start().await;
    let rule = h2_pool_rule("{maxRequestsPerConnection: 2}");
    let yaml = common::service("h2.internal", 80, "HTTP2", &[upstream.addr.port()]) + &rule;
    let harness = Harness::start(snapshot(&yaml, 1)).await;
    for _ in 0..5 {
        let answer = fetch(&harness, "http://h2.internal/", None).await;
        assert_eq!(answer.text(), "h2");
    }
    assert_eq!(
        upstream.accepts.load(std::sync::atomic::Ordering::SeqCst),
        3
    );
}

/// An HTTP/2 upstream taking `server_limit` streams at a time per connection, which answers
/// none of `held` requests for `/held` until it holds them all at once, behind a proxy given
/// `extra` config: checks that each is answered, and says how many connections the upstream
/// took. A request for `/now` goes first, so that the pool has heard the server's SETTINGS.
async fn held_streams(server_limit: u32, extra: &str, held: usize) -> usize {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (held_tx, seen) = tokio::sync::watch::channel(0);
    let held_tx = Arc::new(held_tx);
    let accepts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let task_accepts = Arc::clone(&accepts);
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            task_accepts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (held_tx, seen) = (Arc::clone(&held_tx), seen.clone());
            tokio::spawn(async move {
                let mut connection = h2::server::Builder::new()
                    .max_concurrent_streams(server_limit)
                    .handshake::<_, Bytes>(stream)
                    .await
                    .unwrap();
                while let Some(Ok((request, mut respond))) = connection.accept().await {
                    let mut seen = seen.clone();
                    let held_tx = Arc::clone(&held_tx);
                    tokio::spawn(async move {
                        if request.uri().path() == "/held" {
                            held_tx.send_modify(|n| *n += 1);
                            let _ = seen.wait_for(|n| *n >= held).await;
                        }
                        let _ = respond.send_response(Response::new(()), true);
                    });
                }
            });
        }
    });
    let config = common::service("h2.internal", 80, "HTTP2", &[port]) + extra;
    let harness = Harness::start(snapshot(&config, 1)).await;
    assert_eq!(
        fetch(&harness, "http://h2.internal/now", None).await.status,
        200
    );
    let request = "GET http://h2.internal/held HTTP/1.1\r\nhost: h2.internal\r\n\r\n";
    let mut requests = JoinSet::new();
    for _ in 0..held {
        requests.spawn(common::raw(harness.addr, request));
    }
    while let Some(answer) = requests.join_next().await {
        let (_, head, _) = answer.unwrap();
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    }
    server.abort();
    accepts.load(std::sync::atomic::Ordering::SeqCst)
}

/// An HTTP/2 upstream whose server takes two streams at a time gets no more than two on a
/// connection: the streams beyond them go on new connections, as Envoy's pool opens them,
/// rather than waiting behind those two, which would never be answered here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_an_http2_servers_limit_go_on_new_connections() {
    // Three, or four when the first request's stream was still counted open on the first.
    let made = held_streams(2, "", 6).await;
    assert!((3..=4).contains(&made), "{made} connections");
}

/// A DestinationRule's `http.maxConcurrentStreams` holds each connection below what its
/// server allows, as Envoy's `max_concurrent_streams`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_rules_max_concurrent_streams_caps_each_http2_connection() {
    let made = held_streams(100, &h2_pool_rule("{maxConcurrentStreams: 1}"), 3).await;
    assert!((3..=4).contains(&made), "{made} connections");
}
