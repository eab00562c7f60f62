//! The explicit forward proxy and the outbound listener's loop guard, over real loopback
//! sockets, against upstream servers started by each test.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame};
use portcullis_proxy::{Metrics, Proxy, ProxyConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

mod common;

use common::{
    Answer, Harness, MESH_ALLOW_ANY, Upstream, dns, fetch, get, raw, read_response, refused_port,
    send, service, snapshot, within,
};

/// A raw TCP echo server on loopback.
struct Echo {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Echo {
    async fn start() -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let task_accepts = Arc::clone(&accepts);
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                task_accepts.fetch_add(1, Ordering::SeqCst);
                connections.spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        Echo {
            addr,
            accepts,
            task,
        }
    }
}

/// A request body fed chunk by chunk from a channel.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

fn assert_blocked(answer: &Answer) {
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer.header("server"), Some("envoy"));
    assert_eq!(answer.header("content-length"), Some("0"));
    assert!(answer.body.is_empty());
}

#[tokio::test]
async fn registered_host_in_absolute_form_reaches_the_upstream_in_origin_form() {
    let upstream = Upstream::start("app").await;
    let harness = Harness::start(snapshot(
        &service("app.internal", 80, "HTTP", &[upstream.port()]),
        1,
    ))
    .await;

    let mut sender = harness.client().await;
    let req = Request::get("http://app.internal/some/path?q=1")
        .header("host", "app.internal")
        .header("connection", "x-secret")
        .header("x-secret", "hop")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-kept", "end-to-end")
        .body(Full::new(Bytes::new()).boxed())
        .unwrap();
    let answer = send(&mut sender, req).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "app");
    assert_eq!(answer.header("server"), Some("envoy"));

    let seen = upstream.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/some/path?q=1");
    assert_eq!(seen[0].headers["host"], "app.internal");
    assert_eq!(seen[0].headers["x-kept"], "end-to-end");
    for hop in ["x-secret", "proxy-authorization"] {
        assert!(!seen[0].headers.contains_key(hop), "{hop} was forwarded");
    }
}

#[tokio::test]
async fn unregistered_destination_gets_502_and_is_never_contacted() {
    let upstream = Upstream::start("secret").await;
    let registered = Upstream::start("app").await;
    let harness = Harness::start(snapshot(
        &service("app.internal", 80, "HTTP", &[registered.port()]),
        1,
    ))
    .await;

    let by_ip = format!("http://127.0.0.1:{}/", upstream.port());
    let by_name = format!("http://unknown.example:{}/", upstream.port());
    for uri in [
        by_ip.as_str(),
        by_name.as_str(),
        "http://app.internal:8080/",
    ] {
        let answer = fetch(&harness, uri, None).await;
        assert_blocked(&answer);
    }
    assert_eq!(upstream.accepts(), 0);
    assert_eq!(registered.accepts(), 0);
}

/// A blocked request with a body is answered from its head, the body unread: as Envoy, the
/// 502 says `connection: close` and the connection closes. Without a body it stays open.
#[tokio::test]
async fn a_blocked_request_with_a_body_closes_the_connection() {
    let upstream = Upstream::start("secret").await;
    let harness = Harness::start(snapshot(&service("app.internal", 80, "HTTP", &[]), 1)).await;
    let uri = format!("http://127.0.0.1:{}/", upstream.port());
    let post = format!("POST {uri} HTTP/1.1\r\nHost: x\r\ncontent-length: 7\r\n\r\npayload");
    let (mut stream, head, _) = raw(harness.addr, &post).await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    let mut rest = Vec::new();
    within(stream.read_to_end(&mut rest)).await.unwrap();
    assert!(rest.is_empty(), "{rest:?}");

    let get = format!("GET {uri} HTTP/1.1\r\nHost: x\r\n\r\n");
    let (mut stream, head, _) = raw(harness.addr, &get).await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    stream.write_all(get.as_bytes()).await.unwrap();
    let (head, _) = within(read_response(&mut stream)).await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert_eq!(upstream.accepts(), 0);
}

/// A Host with a trailing dot matches no registered name, as in Envoy's virtual hosts.
#[tokio::test]
async fn a_host_with_a_trailing_dot_is_unregistered() {
    let app = Upstream::start("app").await;
    let harness = Harness::start(snapshot(
        &service("app.internal", 80, "HTTP", &[app.port()]),
        1,
    ))
    .await;
    assert_blocked(&fetch(&harness, "http://app.internal./", None).await);
    assert_eq!(app.accepts(), 0);
    let answer = fetch(&harness, "http://app.internal/", None).await;
    assert_eq!(answer.status, StatusCode::OK);
}

#[tokio::test]
async fn the_absolute_form_authority_wins_over_the_host_header() {
    let secret = Upstream::start("secret").await;
    let app = Upstream::start("app").await;
    let harness = Harness::start(snapshot(
        &service("app.internal", 80, "HTTP", &[app.port()]),
        1,
    ))
    .await;

    // A registered URI with a spoofed Host goes to the URI's service, with the URI's name.
    let answer = fetch(&harness, "http://app.internal/", Some("evil.example")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "app");
    assert_eq!(app.requests()[0].headers["host"], "app.internal");

    // An unregistered URI with a registered Host is blocked.
    let uri = format!("http://127.0.0.1:{}/", secret.port());
    let answer = fetch(&harness, &uri, Some("app.internal")).await;
    assert_blocked(&answer);
    assert_eq!(secret.accepts(), 0);
    assert_eq!(app.accepts(), 1);
}

#[tokio::test]
async fn two_host_headers_are_a_bad_request() {
    let app = Upstream::start("app").await;
    let harness = Harness::start(snapshot(
        &service("app.internal", 80, "HTTP", &[app.port()]),
        1,
    ))
    .await;
    for request in [
        "GET http://app.internal/ HTTP/1.1\r\nHost: app.internal\r\nHost: app.internal\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: app.internal\r\nHost: other.example\r\n\r\n",
    ] {
        let (_stream, head, _) = raw(harness.addr, request).await;
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    }
    assert_eq!(app.accepts(), 0);
}

#[tokio::test]
async fn keep_alive_reuses_one_upstream_connection() {
    let app = Upstream::start("app").await;
    let harness = Harness::start(snapshot(
        &service("app.internal", 80, "HTTP", &[app.port()]),
        1,
    ))
    .await;
    let mut sender = harness.client().await;
    for path in ["/one", "/two", "/three"] {
        let answer = send(
            &mut sender,
            get(&format!("http://app.internal{path}"), Some("app.internal")),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    let uris: Vec<String> = app.requests().into_iter().map(|s| s.uri).collect();
    assert_eq!(uris, ["/one", "/two", "/three"]);
    assert_eq!(app.accepts(), 1);
}

#[tokio::test]
async fn large_streamed_bodies_arrive_intact() {
    const SIZE: usize = 8 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    let app = Upstream::start("app").await;
    let harness = Harness::start(snapshot(
        &service("app.internal", 80, "HTTP", &[app.port()]),
        1,
    ))
    .await;
    let pattern: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    let pattern = Bytes::from(pattern);

    let (tx, rx) = mpsc::channel(4);
    let chunks = pattern.clone();
    let feeder = tokio::spawn(async move {
        for start in (0..SIZE).step_by(CHUNK) {
            tx.send(chunks.slice(start..start + CHUNK)).await.unwrap();
        }
    });
    let mut sender = harness.client().await;
    let req = Request::post("http://app.internal/echo")
        .header("host", "app.internal")
        .body(ChannelBody(rx).boxed())
        .unwrap();
    let answer = send(&mut sender, req).await;
    feeder.await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body.len(), SIZE);
    assert!(answer.body == pattern, "echoed body differs");
    let seen = app.requests();
    assert_eq!(seen[0].headers["transfer-encoding"], "chunked");
}

#[tokio::test]
async fn least_request_spreads_requests_over_both_endpoints() {
    let first = Upstream::start("first").await;
    let second = Upstream::start("second").await;
    let harness = Harness::start(snapshot(
        &service("app.internal", 80, "HTTP", &[first.port(), second.port()]),
        1,
    ))
    .await;
    let mut sender = harness.client().await;
    for _ in 0..40 {
        let answer = send(
            &mut sender,
            get("http://app.internal/", Some("app.internal")),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    let (a, b) = (first.requests().len(), second.requests().len());
    assert_eq!(a + b, 40);
    assert!(a >= 5 && b >= 5, "uneven spread: {a} / {b}");
}

#[tokio::test]
async fn a_refusing_endpoint_is_retried_on_another() {
    let alive = Upstream::start("alive").await;
    let dead = refused_port().await;
    let harness = Harness::start(snapshot(
        &service("app.internal", 80, "HTTP", &[dead, alive.port()]),
        1,
    ))
    .await;
    for _ in 0..20 {
        let answer = fetch(&harness, "http://app.internal/", Some("app.internal")).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        assert_eq!(answer.text(), "alive");
    }
    assert_eq!(alive.requests().len(), 20);
}

#[tokio::test]
async fn the_only_endpoint_refusing_is_a_503() {
    let dead = refused_port().await;
    let harness = Harness::start(snapshot(&service("app.internal", 80, "HTTP", &[dead]), 1)).await;
    let answer = fetch(&harness, "http://app.internal/", Some("app.internal")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.header("server"), Some("envoy"));
    assert!(
        answer.text().starts_with("upstream connect error"),
        "{}",
        answer.text()
    );
}

#[tokio::test]
async fn a_cluster_without_endpoints_is_a_503() {
    let harness = Harness::start(snapshot(&service("app.internal", 80, "HTTP", &[]), 1)).await;
    let answer = fetch(&harness, "http://app.internal/", Some("app.internal")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.header("server"), Some("envoy"));
    assert_eq!(answer.text(), "no healthy upstream");
}

#[tokio::test]
async fn connect_tunnels_to_registered_hosts_only() {
    let echo = Echo::start().await;
    let harness = Harness::start(snapshot(
        &service("echo.internal", 7000, "TLS", &[echo.addr.port()]),
        1,
    ))
    .await;

    let (mut stream, head, body) = raw(
        harness.addr,
        "CONNECT echo.internal:7000 HTTP/1.1\r\nHost: echo.internal:7000\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.is_empty());
    within(async {
        for message in [&b"ping"[..], b"\x16\x03\x01 not http at all"] {
            stream.write_all(message).await.unwrap();
            let mut back = vec![0u8; message.len()];
            stream.read_exact(&mut back).await.unwrap();
            assert_eq!(back, message);
        }
    })
    .await;
    assert_eq!(echo.accepts.load(Ordering::SeqCst), 1);

    let request = format!(
        "CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n",
        port = echo.addr.port()
    );
    let (_stream, head, body) = raw(harness.addr, &request).await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("server: envoy"),
        "{head}"
    );
    assert!(body.is_empty());
    let (_stream, head, _) = raw(
        harness.addr,
        "CONNECT echo.internal:7001 HTTP/1.1\r\nHost: echo.internal:7001\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert_eq!(echo.accepts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn bytes_sent_with_the_connect_head_go_through_first_and_in_order() {
    let echo = Echo::start().await;
    let harness = Harness::start(snapshot(
        &service("echo.internal", 7000, "TLS", &[echo.addr.port()]),
        1,
    ))
    .await;
    // Early bytes arrive with the head and are read by the proxy before the tunnel
    // exists; they must reach the upstream before anything sent later.
    let early: Vec<u8> = (0..40_000u32).map(|i| (i % 241) as u8).collect();
    let mut request =
        b"CONNECT echo.internal:7000 HTTP/1.1\r\nHost: echo.internal:7000\r\n\r\n".to_vec();
    request.extend_from_slice(&early);
    within(async {
        let mut stream = TcpStream::connect(harness.addr).await.unwrap();
        stream.write_all(&request).await.unwrap();
        let (head, mut back) = read_response(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        stream.write_all(b"late").await.unwrap();
        let mut rest = vec![0u8; early.len() + 4 - back.len()];
        stream.read_exact(&mut rest).await.unwrap();
        back.extend_from_slice(&rest);
        assert!(back[..early.len()] == early[..], "early bytes reordered");
        assert_eq!(&back[early.len()..], b"late");
    })
    .await;
}

#[tokio::test]
async fn a_drain_closes_an_idle_keep_alive_connection() {
    let outside = Upstream::start("outside").await;
    let harness = Harness::start(snapshot(MESH_ALLOW_ANY, 1)).await;
    let port = outside.port();
    let request =
        format!("GET http://127.0.0.1:{port}/a HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    within(async {
        let mut stream = TcpStream::connect(harness.addr).await.unwrap();
        // Two requests: the connection is kept alive, and idle after each.
        for _ in 0..2 {
            stream.write_all(request.as_bytes()).await.unwrap();
            let (head, body) = read_response(&mut stream).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            assert!(!head.contains("connection: close"), "{head}");
            let mut body = body;
            while body.len() < "outside".len() {
                let mut more = [0u8; 64];
                let n = stream.read(&mut more).await.unwrap();
                assert!(n > 0, "closed mid-body");
                body.extend_from_slice(&more[..n]);
            }
            assert_eq!(body, b"outside");
        }
        harness.shut_down();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    })
    .await;
}

#[tokio::test]
async fn allow_any_passes_unregistered_requests_through() {
    let outside = Upstream::start("outside").await;
    let harness = Harness::start(snapshot(MESH_ALLOW_ANY, 1)).await;
    let uri = format!("http://127.0.0.1:{}/through", outside.port());
    let answer = fetch(&harness, &uri, None).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "outside");
    assert_eq!(answer.header("server"), Some("envoy"));
    assert_eq!(outside.requests()[0].uri, "/through");
}

#[tokio::test]
async fn each_request_routes_with_the_registry_current_when_it_starts() {
    let old = Upstream::start("old").await;
    let new = Upstream::start("new").await;
    let added = Upstream::start("added").await;
    let harness = Harness::start(snapshot(
        &service("app.internal", 80, "HTTP", &[old.port()]),
        1,
    ))
    .await;

    let mut before = harness.client().await;
    let answer = send(
        &mut before,
        get("http://app.internal/", Some("app.internal")),
    )
    .await;
    assert_eq!(answer.text(), "old");

    let yaml = [
        service("app.internal", 80, "HTTP", &[new.port()]),
        service("added.internal", 80, "HTTP", &[added.port()]),
    ]
    .concat();
    harness.registry.store(Arc::new(snapshot(&yaml, 2)));

    // The next request on the open connection already routes with version 2: a removed
    // endpoint gets no new requests, an added service is reachable.
    let answer = send(
        &mut before,
        get("http://app.internal/", Some("app.internal")),
    )
    .await;
    assert_eq!(answer.text(), "new");
    let answer = send(
        &mut before,
        get("http://added.internal/", Some("added.internal")),
    )
    .await;
    assert_eq!(answer.text(), "added");

    // So does a new connection.
    let mut after = harness.client().await;
    let answer = send(
        &mut after,
        get("http://app.internal/", Some("app.internal")),
    )
    .await;
    assert_eq!(answer.text(), "new");
    let answer = send(
        &mut after,
        get("http://added.internal/", Some("added.internal")),
    )
    .await;
    assert_eq!(answer.text(), "added");

    assert_eq!(old.requests().len(), 1);
    assert_eq!(new.requests().len(), 2);
    assert_eq!(added.requests().len(), 2);
}

#[tokio::test]
async fn a_direct_connection_to_the_outbound_listener_is_closed_unforwarded() {
    let app = Upstream::start("app").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let registry = Arc::new(ArcSwap::from_pointee(snapshot(
        &[
            service("app.internal", 80, "HTTP", &[app.port()]),
            MESH_ALLOW_ANY.to_string(),
        ]
        .concat(),
        1,
    )));
    let mut prometheus = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::new(&mut prometheus));
    let audit = Arc::new(portcullis_audit::Audit::new(
        portcullis_registry::Enforcement::Enforce,
        "default",
        &mut prometheus,
    ));
    let proxy = Proxy::new(
        registry,
        ProxyConfig::default(),
        metrics,
        vec![addr],
        dns(),
        audit,
    );
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(
        Arc::clone(&proxy).run_outbound(listener.try_into().unwrap(), shutdown.clone()),
    );

    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: app.internal\r\n\r\n")
        .await
        .unwrap();
    let mut received = Vec::new();
    let read = within(stream.read_to_end(&mut received)).await;
    assert!(
        read.is_ok()
            || read
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "{read:?}"
    );
    assert!(
        received.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&received)
    );
    assert_eq!(app.accepts(), 0);

    shutdown.cancel();
    within(server).await.unwrap();
    proxy.tasks().close();
    within(proxy.tasks().wait()).await;
}

/// Audit mode through the explicit proxy: a request or CONNECT the registry refuses reaches
/// where the client meant, each is recorded as a would-deny, and the entries learned from
/// the records let the same requests through once enforced.
#[tokio::test]
async fn audit_mode_forwards_refusals_and_learns_entries_that_allow_them() {
    let echo = Echo::start().await;
    let upstream = Upstream::start("outside").await;
    let harness = Harness::start(snapshot("", 1)).await;
    harness
        .audit
        .mode()
        .set_admin(Some(portcullis_registry::Enforcement::Audit));
    let by_ip = format!("http://127.0.0.1:{}/", upstream.port());
    let answer = fetch(&harness, &by_ip, None).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "outside");
    let request = format!(
        "CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n",
        port = echo.addr.port()
    );
    let (mut stream, head, _) = raw(harness.addr, &request).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    within(async {
        stream.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ping");
    })
    .await;

    let denials: serde_json::Value =
        serde_json::from_str(&harness.audit.denials_json(None)).unwrap();
    let records = denials["denials"].as_array().unwrap();
    assert_eq!(records.len(), 2, "{denials:#}");
    for (port, protocol) in [(upstream.port(), "HTTP"), (echo.addr.port(), "CONNECT")] {
        let record = records
            .iter()
            .find(|r| r["port"] == port)
            .unwrap_or_else(|| panic!("no record for port {port}: {denials:#}"));
        assert_eq!(record["protocol"], protocol);
        assert_eq!(record["would_deny"], 1);
        assert_eq!(record["address"], "127.0.0.1");
        assert_eq!(record["listener"], "http_proxy");
        assert_eq!(
            record["reason"],
            format!("port {port} has no TCP service at 127.0.0.1")
        );
    }
    assert!(
        harness
            .prometheus()
            .contains("portcullis_denials_total{action=\"would_deny\""),
        "{}",
        harness.prometheus()
    );

    // Enforced, and with the learned entries applied, both still go through.
    let learned = harness.audit.learned();
    harness.registry.store(Arc::new(snapshot(&learned, 2)));
    harness.audit.mode().set_admin(None);
    let answer = fetch(&harness, &by_ip, None).await;
    assert_eq!(answer.status, StatusCode::OK, "{learned}");
    let (_stream, head, _) = raw(harness.addr, &request).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{learned}");
    let other = format!("http://127.0.0.1:{}/", echo.addr.port() + 1);
    assert_blocked(&fetch(&harness, &other, None).await);
}
