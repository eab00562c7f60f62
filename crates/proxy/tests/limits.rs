//! Limits and upstream failures of the data path, over real loopback sockets: header size
//! and count limits, the request-headers, idle and route timeouts, the connection limit,
//! each upstream failure with its status, body and response flag, retries past a dead
//! endpoint, a client leaving before its response, and an endpoint removed while a request
//! to it is in flight.
//!
//! Timeouts here are short real ones (a few hundred milliseconds) with bounded waits: real
//! sockets and tokio's paused clock do not mix. The timer logic itself is tested on the
//! paused clock with in-memory I/O in the proxy's `guard` module.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use portcullis_proxy::ProxyConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::{JoinHandle, JoinSet};

mod common;

use common::{
    Answer, Harness, Upstream, fetch, get, raw, read_response, refused_port, send, service,
    snapshot, within,
};

const APP: &str = "http://app.internal/";
const HOST: Option<&str> = Some("app.internal");

/// A short real timeout for the tests that wait for one to fire.
const SHORT: Duration = Duration::from_millis(300);

/// A proxy for `app.internal` served by `endpoints` (loopback ports), with `config`.
async fn proxy_for(endpoints: &[u16], config: ProxyConfig) -> Harness {
    Harness::start_with(
        snapshot(&service("app.internal", 80, "HTTP", endpoints), 1),
        config,
    )
    .await
}

/// `istio_requests_total` for `code` and `flags`, read from the Prometheus text.
fn requests_counted(harness: &Harness, code: u16, flags: &str) -> u64 {
    let code = format!("response_code=\"{code}\"");
    let flags = format!("response_flags=\"{flags}\"");
    harness
        .prometheus()
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains(&code))
        .filter(|l| l.contains(&flags))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Waits up to 5 s for `condition`.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads until the peer closes; `Ok` with what came (a reset counts as a close).
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    match within(stream.read_to_end(&mut received)).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("reading until the proxy closes: {e}"),
    }
    received
}

/// A raw TCP upstream on loopback that runs `script` on every connection it accepts.
struct Scripted {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Scripted {
    async fn start<F, Fut>(script: F) -> Scripted
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&accepts);
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                connections.spawn(script(stream));
            }
        });
        Scripted {
            addr,
            accepts,
            task,
        }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
}

/// Reads one request head; `false` if the connection ended first.
async fn read_head(stream: &mut TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    true
}

/// A request in raw form for `app.internal` with `extra` header lines.
fn raw_request(extra: &str) -> String {
    format!("GET {APP} HTTP/1.1\r\nHost: app.internal\r\n{extra}\r\n")
}

const TOO_LARGE: &str = "HTTP/1.1 431 Request Header Fields Too Large";

fn status_line(head: &str) -> &str {
    head.lines().next().unwrap_or_default()
}

/// A raw request for `app.internal` padded with one header to exactly `size` bytes.
fn head_of_size(size: usize) -> String {
    let bare = raw_request("x-pad: \r\n").len();
    raw_request(&format!("x-pad: {}\r\n", "a".repeat(size - bare)))
}

#[tokio::test]
async fn request_heads_over_the_size_or_count_limit_get_431() {
    const LIMIT: usize = 60 * 1024;
    let app = Upstream::start("app").await;
    let harness = proxy_for(&[app.port()], ProxyConfig::default()).await;

    // Whole heads written at once (hyper's read buffer alone would let up to ~120 KiB
    // through) and the same trickled in pieces: the limit is the same.
    for size in [LIMIT + 1, 70 * 1024, 100 * 1024] {
        let (_stream, head, _) = raw(harness.addr, &head_of_size(size)).await;
        assert_eq!(status_line(&head), TOO_LARGE, "a head of {size} bytes");
    }
    let (_stream, head, body) = raw(harness.addr, &head_of_size(LIMIT)).await;
    assert_eq!(
        status_line(&head),
        "HTTP/1.1 200 OK",
        "a head of {LIMIT} bytes"
    );
    assert_eq!(body, b"app");
    let mut stream = TcpStream::connect(harness.addr).await.unwrap();
    let trickled = head_of_size(LIMIT + 1);
    let mut sent = 0;
    for piece in trickled.as_bytes().chunks(4096) {
        // The proxy may answer and close before the whole head is written.
        if stream.write_all(piece).await.is_err() {
            break;
        }
        sent += piece.len();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (head, _) = within(read_response(&mut stream)).await;
    assert_eq!(
        status_line(&head),
        TOO_LARGE,
        "after {sent} bytes in pieces"
    );

    // Host and 99 more make 100 fields: allowed. One more is too many.
    let fields = |n: usize| {
        (0..n)
            .map(|i| format!("x-h{i}: {i}\r\n"))
            .collect::<String>()
    };
    let (_stream, head, _) = raw(harness.addr, &raw_request(&fields(99))).await;
    assert_eq!(status_line(&head), "HTTP/1.1 200 OK", "{head}");
    let (_stream, head, _) = raw(harness.addr, &raw_request(&fields(100))).await;
    assert_eq!(status_line(&head), TOO_LARGE);

    let seen = app.requests();
    assert_eq!(seen.len(), 2, "a rejected head must not reach the upstream");
    assert!(seen[1].headers.contains_key("x-h98"));
    assert_eq!(harness.metrics.protocol_error.get(), 5);
    assert!(
        harness
            .prometheus()
            .contains("envoy_http_downstream_cx_protocol_error 5"),
        "{}",
        harness.prometheus()
    );
}

#[tokio::test]
async fn a_trickled_request_head_is_cut_off_but_an_idle_keep_alive_connection_is_not() {
    let app = Upstream::start("app").await;
    let config = ProxyConfig {
        request_headers_timeout: SHORT,
        idle_timeout: Duration::from_secs(30),
        ..ProxyConfig::default()
    };
    let harness = proxy_for(&[app.port()], config).await;

    let mut keep_alive = harness.client().await;
    let answer = send(&mut keep_alive, get(APP, HOST)).await;
    assert_eq!(answer.status, StatusCode::OK);

    // A slow client: a header line every 50 ms, never the end of the head, for up to 3 s.
    let stream = TcpStream::connect(harness.addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let start = Instant::now();
    let trickle = tokio::spawn(async move {
        write
            .write_all(b"GET http://app.internal/ HTTP/1.1\r\n")
            .await?;
        for i in 0..60 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            write
                .write_all(format!("x-slow-{i}: 1\r\n").as_bytes())
                .await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let mut received = Vec::new();
    let ended = within(read.read_to_end(&mut received)).await;
    let closed_after = start.elapsed();
    assert!(ended.is_ok() || ended.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),);
    let text = String::from_utf8_lossy(&received);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "a cut-off head gets a close or a 408, got {text:?}"
    );
    assert!(
        closed_after >= SHORT && closed_after < Duration::from_secs(2),
        "closed after {closed_after:?}, while bytes were still arriving"
    );
    trickle.abort();
    assert_eq!(harness.metrics.header_timeout.get(), 1);

    // The keep-alive connection has been idle between requests for longer than the
    // request-headers timeout: only the idle timeout applies there.
    tokio::time::sleep((SHORT * 2).saturating_sub(start.elapsed())).await;
    let answer = send(&mut keep_alive, get(APP, HOST)).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(app.requests().len(), 2);
    assert_eq!(harness.metrics.header_timeout.get(), 1);
    assert_eq!(harness.metrics.http_idle_timeout.get(), 0);
}

#[tokio::test]
async fn a_new_connection_may_wait_before_its_first_byte() {
    let app = Upstream::start("app").await;
    let config = ProxyConfig {
        request_headers_timeout: SHORT,
        idle_timeout: Duration::from_secs(30),
        ..ProxyConfig::default()
    };
    let harness = proxy_for(&[app.port()], config).await;
    // The request-headers timer starts with the first byte of a head (Envoy's too), not
    // when the connection opens: a client that connects early is not cut off.
    let mut stream = TcpStream::connect(harness.addr).await.unwrap();
    tokio::time::sleep(SHORT * 2).await;
    within(stream.write_all(raw_request("").as_bytes()))
        .await
        .unwrap();
    let (head, body) = within(read_response(&mut stream)).await;
    assert_eq!(status_line(&head), "HTTP/1.1 200 OK", "{head}");
    assert_eq!(body, b"app");
    assert_eq!(harness.metrics.header_timeout.get(), 0);
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let app = Upstream::start("app").await;
    let config = ProxyConfig {
        idle_timeout: SHORT,
        ..ProxyConfig::default()
    };
    let harness = proxy_for(&[app.port()], config).await;

    // Busy for three idle timeouts, a request every 100 ms: never idle, never closed.
    let mut busy = TcpStream::connect(harness.addr).await.unwrap();
    for _ in 0..9 {
        within(busy.write_all(raw_request("").as_bytes()))
            .await
            .unwrap();
        let (head, _) = within(read_response(&mut busy)).await;
        assert_eq!(status_line(&head), "HTTP/1.1 200 OK");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(harness.metrics.http_idle_timeout.get(), 0);

    // Then silent: closed once the idle timeout has passed.
    let start = Instant::now();
    let rest = read_until_closed(&mut busy).await;
    let closed_after = start.elapsed();
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert!(
        closed_after >= SHORT - Duration::from_millis(110) && closed_after < Duration::from_secs(3),
        "closed after {closed_after:?}"
    );
    assert_eq!(harness.metrics.http_idle_timeout.get(), 1);
    assert!(
        harness
            .prometheus()
            .contains("envoy_http_downstream_cx_idle_timeout 1")
    );
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_while_open_ones_keep_working() {
    let app = Upstream::start("app").await;
    let config = ProxyConfig {
        max_connections: 2,
        ..ProxyConfig::default()
    };
    let harness = proxy_for(&[app.port()], config).await;
    let mut first = harness.client().await;
    let mut second = harness.client().await;
    for sender in [&mut first, &mut second] {
        assert_eq!(send(sender, get(APP, HOST)).await.status, StatusCode::OK);
    }

    // The third is accepted and closed at once, without an answer.
    let mut third = TcpStream::connect(harness.addr).await.unwrap();
    let _ = third.write_all(raw_request("").as_bytes()).await;
    let start = Instant::now();
    let received = read_until_closed(&mut third).await;
    assert!(
        received.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&received)
    );
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(harness.metrics.cx_overflow.get(), 1);
    assert!(
        harness
            .prometheus()
            .contains("envoy_listener_downstream_cx_overflow 1")
    );

    // The two inside keep working.
    for sender in [&mut first, &mut second] {
        assert_eq!(send(sender, get(APP, HOST)).await.status, StatusCode::OK);
    }
    assert_eq!(app.requests().len(), 4);

    // One leaves: a newcomer gets its place (once the proxy has seen the close).
    drop(first);
    let start = Instant::now();
    loop {
        let mut stream = TcpStream::connect(harness.addr).await.unwrap();
        let _ = stream.write_all(raw_request("").as_bytes()).await;
        let received = read_until_closed_or_answered(&mut stream).await;
        if received.starts_with(b"HTTP/1.1 200 OK") {
            break;
        }
        assert!(received.is_empty());
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no place freed after a connection closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        send(&mut second, get(APP, HOST)).await.status,
        StatusCode::OK
    );
}

/// Reads a whole response, or nothing if the proxy closes first.
async fn read_until_closed_or_answered(stream: &mut TcpStream) -> Vec<u8> {
    let mut first = [0u8; 1];
    match within(stream.read(&mut first)).await {
        Ok(0) | Err(_) => Vec::new(),
        Ok(_) => {
            let (head, body) = within(read_response(stream)).await;
            let mut all = first.to_vec();
            all.extend_from_slice(head.as_bytes());
            all.extend_from_slice(&body);
            all
        }
    }
}

/// Holds every connection open, reading whatever comes, never answering.
async fn silent(mut stream: TcpStream) {
    let mut sink = Vec::new();
    let _ = stream.read_to_end(&mut sink).await;
}

#[tokio::test]
async fn no_response_headers_within_the_route_timeout_is_a_504_ut() {
    let stalled = Scripted::start(silent).await;
    let config = ProxyConfig {
        route_timeout: Some(SHORT),
        ..ProxyConfig::default()
    };
    let harness = proxy_for(&[stalled.port()], config).await;
    let start = Instant::now();
    let answer = fetch(&harness, APP, HOST).await;
    let took = start.elapsed();
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(answer.text(), "upstream request timeout");
    assert_eq!(answer.header("server"), Some("envoy"));
    assert!(took >= SHORT && took < Duration::from_secs(3), "{took:?}");
    assert_eq!(requests_counted(&harness, 504, "UT"), 1);
    assert_eq!(stalled.accepts(), 1);
}

#[tokio::test]
async fn the_route_timeout_ends_at_the_response_headers() {
    // Headers at once, then the body in pieces over four route timeouts.
    let slow_body = Scripted::start(|mut stream: TcpStream| async move {
        if !read_head(&mut stream).await {
            return;
        }
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n")
            .await;
        for piece in [b"s", b"l", b"o", b"w"] {
            tokio::time::sleep(SHORT).await;
            let _ = stream.write_all(piece).await;
        }
        silent(stream).await;
    })
    .await;
    let config = ProxyConfig {
        route_timeout: Some(SHORT),
        ..ProxyConfig::default()
    };
    let harness = proxy_for(&[slow_body.port()], config).await;
    let start = Instant::now();
    let answer = fetch(&harness, APP, HOST).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "slow");
    assert!(start.elapsed() >= SHORT * 4);
    assert_eq!(requests_counted(&harness, 200, "-"), 1);
}

fn assert_503(answer: &Answer, body: &str) {
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.header("server"), Some("envoy"));
    assert_eq!(answer.text(), body);
}

const BEFORE_HEADERS: &str = "upstream connect error or disconnect/reset before headers.";

/// Closes every connection once a request head has arrived, with RST when `reset`.
async fn hang_up_after_the_head(reset: bool) -> Scripted {
    Scripted::start(move |mut stream: TcpStream| async move {
        if read_head(&mut stream).await && reset {
            // Linger 0: close with RST instead of FIN.
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        }
    })
    .await
}

#[tokio::test]
async fn an_upstream_closing_before_its_response_is_a_503_uc() {
    let closing = hang_up_after_the_head(false).await;
    let harness = proxy_for(&[closing.port()], ProxyConfig::default()).await;

    // A request with a body has streamed it away: not sent again.
    let post = "POST http://app.internal/ HTTP/1.1\r\nHost: app.internal\r\ncontent-length: 5\r\n\r\nhello";
    let (_stream, head, body) = raw(harness.addr, post).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert_eq!(
        String::from_utf8(body).unwrap(),
        format!("{BEFORE_HEADERS} reset reason: connection termination")
    );
    assert_eq!(requests_counted(&harness, 503, "UC"), 1);
    assert_eq!(closing.accepts(), 1);

    // Nor is one without: Istio's default retry policy has no `reset`.
    let answer = fetch(&harness, APP, HOST).await;
    assert_503(
        &answer,
        &format!("{BEFORE_HEADERS} reset reason: connection termination"),
    );
    assert_eq!(requests_counted(&harness, 503, "UC"), 2);
    assert_eq!(closing.accepts(), 2);
}

#[tokio::test]
async fn an_upstream_resetting_before_its_response_is_a_503_uc() {
    let resetting = hang_up_after_the_head(true).await;
    let harness = proxy_for(&[resetting.port()], ProxyConfig::default()).await;
    let answer = fetch(&harness, APP, HOST).await;
    assert_503(
        &answer,
        &format!("{BEFORE_HEADERS} reset reason: connection termination"),
    );
    assert_eq!(requests_counted(&harness, 503, "UC"), 1);
    assert_eq!(resetting.accepts(), 1);
}

/// A reset after the request was sent is not retried elsewhere (Istio's default policy has
/// no `reset`): each request is answered by the endpoint it was sent to.
#[tokio::test]
async fn a_resetting_endpoint_among_two_answers_503_uc_without_retrying() {
    let resetting = hang_up_after_the_head(true).await;
    let alive = Upstream::start("alive").await;
    let harness = proxy_for(&[resetting.port(), alive.port()], ProxyConfig::default()).await;
    let mut reset: usize = 0;
    for i in 0..12 {
        let answer = fetch(&harness, APP, HOST).await;
        if answer.status == StatusCode::OK {
            continue;
        }
        reset += 1;
        assert_503(
            &answer,
            &format!("{BEFORE_HEADERS} reset reason: connection termination"),
        );
        assert_eq!(
            requests_counted(&harness, 503, "UC"),
            reset as u64,
            "request {i}"
        );
    }
    assert_eq!(resetting.accepts(), reset);
    assert_eq!(alive.requests().len(), 12 - reset);
}

#[tokio::test]
async fn a_refused_connection_is_a_503_uf() {
    let dead = refused_port().await;
    let harness = proxy_for(&[dead], ProxyConfig::default()).await;
    let answer = fetch(&harness, APP, HOST).await;
    assert_503(
        &answer,
        &format!("{BEFORE_HEADERS} retried and the latest reset reason: remote connection failure"),
    );
    assert_eq!(requests_counted(&harness, 503, "URX,UF"), 1);
    assert!(
        harness.prometheus().contains(
            "envoy_cluster_upstream_cx_connect_fail{cluster_name=\"outbound|80||app.internal\"} 3"
        ),
        "{}",
        harness.prometheus()
    );
}

#[tokio::test]
async fn a_cluster_without_endpoints_is_a_503_uh() {
    let harness = proxy_for(&[], ProxyConfig::default()).await;
    let answer = fetch(&harness, APP, HOST).await;
    assert_503(&answer, "no healthy upstream");
    assert_eq!(requests_counted(&harness, 503, "UH"), 1);
}

#[tokio::test]
async fn one_dead_endpoint_among_three_costs_no_request() {
    let dead = refused_port().await;
    let first = Upstream::start("first").await;
    let second = Upstream::start("second").await;
    let harness = proxy_for(&[first.port(), dead, second.port()], ProxyConfig::default()).await;
    for i in 0..30 {
        let answer = fetch(&harness, APP, HOST).await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "request {i}: {}",
            answer.text()
        );
    }
    let (a, b) = (first.requests().len(), second.requests().len());
    assert_eq!(a + b, 30);
    assert!(a > 0 && b > 0, "{a} / {b}");
    assert_eq!(requests_counted(&harness, 200, "-"), 30);
    assert!(!harness.prometheus().contains("response_code=\"503\""));
}

#[tokio::test]
async fn a_client_gone_before_its_response_is_logged_dc() {
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let (upstream_closed_tx, mut upstream_closed) = mpsc::unbounded_channel();
    let stalled = Scripted::start(move |mut stream: TcpStream| {
        let arrived = arrived_tx.clone();
        let closed = upstream_closed_tx.clone();
        async move {
            if read_head(&mut stream).await {
                let _ = arrived.send(());
                silent(stream).await;
                let _ = closed.send(());
            }
        }
    })
    .await;
    let harness = proxy_for(&[stalled.port()], ProxyConfig::default()).await;
    let mut client = TcpStream::connect(harness.addr).await.unwrap();
    client.write_all(raw_request("").as_bytes()).await.unwrap();
    within(arrived.recv()).await.unwrap();
    drop(client);

    eventually("a DC request with status 0", || {
        requests_counted(&harness, 0, "DC") == 1
    })
    .await;
    // Nobody waits for the answer any more: the upstream request is abandoned too.
    within(upstream_closed.recv()).await.unwrap();
    assert_eq!(requests_counted(&harness, 503, "UC"), 0);
}

/// An upstream answering `name` to each request only once the test lets it through.
struct Gated {
    addr: SocketAddr,
    arrived: mpsc::UnboundedReceiver<()>,
    gate: Arc<Semaphore>,
    task: JoinHandle<()>,
}

impl Drop for Gated {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Gated {
    async fn start(name: &'static str) -> Gated {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, arrived) = mpsc::unbounded_channel();
        let gate = Arc::new(Semaphore::new(0));
        let task_gate = Arc::clone(&gate);
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (tx, gate) = (tx.clone(), Arc::clone(&task_gate));
                connections.spawn(async move {
                    let service = service_fn(move |_: Request<Incoming>| {
                        let (tx, gate) = (tx.clone(), Arc::clone(&gate));
                        async move {
                            let _ = tx.send(());
                            gate.acquire().await.unwrap().forget();
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                                name.as_bytes(),
                            ))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Gated {
            addr,
            arrived,
            gate,
            task,
        }
    }
}

#[tokio::test]
async fn an_endpoint_removed_mid_request_finishes_it_and_gets_no_more() {
    let mut leaving = Gated::start("leaving").await;
    let staying = Upstream::start("staying").await;
    let harness = proxy_for(&[leaving.addr.port()], ProxyConfig::default()).await;

    let mut in_flight_client = harness.client().await;
    let in_flight = tokio::spawn(async move {
        let answer = send(&mut in_flight_client, get(APP, HOST)).await;
        (answer.status, answer.text().to_owned(), in_flight_client)
    });
    within(leaving.arrived.recv()).await.unwrap();

    harness.registry.store(Arc::new(snapshot(
        &service("app.internal", 80, "HTTP", &[staying.port()]),
        2,
    )));
    for _ in 0..3 {
        let answer = fetch(&harness, APP, HOST).await;
        assert_eq!(answer.text(), "staying");
    }

    // The request that started before the removal completes from the removed endpoint.
    leaving.gate.add_permits(1);
    let (status, text, mut client) = within(in_flight).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(text, "leaving");
    // Its connection's next request goes to the remaining endpoint.
    assert_eq!(send(&mut client, get(APP, HOST)).await.text(), "staying");
    assert!(
        leaving.arrived.try_recv().is_err(),
        "the removed endpoint got a new request"
    );
    assert_eq!(staying.requests().len(), 4);
}
