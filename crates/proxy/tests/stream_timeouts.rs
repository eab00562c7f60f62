//! The connection manager's stream timeouts over real loopback sockets, as Envoy 1.40
//! answers them: `stream_idle_timeout` (504 `SI` for a complete request nobody answers,
//! 408 for one still arriving, a closed connection for a response body that stalls) and
//! `request_timeout` (408), on the HTTP/1.1 fast path and the general path, beside the
//! route timeout.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use portcullis_proxy::{ProxyConfig, StreamTimeouts};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

mod common;

use common::{Harness, read_response, service, snapshot, within};

/// Short real timeouts for the tests that wait for one to fire.
const IDLE: Duration = Duration::from_millis(300);

/// An upstream that answers `/ok` (body read by its content-length), never answers
/// `/hang`, and sends `/stall`'s response head and 3 of its 100 body bytes, then nothing.
struct Stalling {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Stalling {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Stalling {
    async fn start() -> Stalling {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                connections.spawn(serve(stream));
            }
        });
        Stalling { addr, task }
    }
}

async fn serve(mut stream: TcpStream) {
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        let path = head.split(' ').nth(1).unwrap_or_default().to_string();
        if path.starts_with("/hang") {
            return std::future::pending().await;
        }
        if path.starts_with("/stall") {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc")
                .await;
            return std::future::pending().await;
        }
        while buf.len() < end + length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        }
        buf.drain(..end + length);
        if stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn proxy(upstream: &Stalling, config: ProxyConfig) -> Harness {
    let yaml = service("app.internal", 80, "HTTP", &[upstream.addr.port()]);
    Harness::start_with(snapshot(&yaml, 1), config).await
}

fn config(idle: Option<Duration>, request: Option<Duration>) -> ProxyConfig {
    ProxyConfig {
        stream_timeouts: StreamTimeouts { idle, request },
        ..ProxyConfig::default()
    }
}

const GET_OK: &str = "GET http://app.internal/ok HTTP/1.1\r\nHost: app.internal\r\n\r\n";

/// Writes `request` and reads one response; also how long it took.
async fn exchange(stream: &mut TcpStream, request: &str) -> (String, String, Duration) {
    within(async {
        let start = Instant::now();
        stream.write_all(request.as_bytes()).await.unwrap();
        let (head, body) = read_response(stream).await;
        (head, String::from_utf8(body).unwrap(), start.elapsed())
    })
    .await
}

fn status(head: &str) -> &str {
    head.split(' ').nth(1).unwrap()
}

/// Whether the proxy closes `stream` (end of stream, or a reset) with no more bytes.
async fn closes(stream: &mut TcpStream) -> bool {
    let mut rest = Vec::new();
    match within(stream.read_to_end(&mut rest)).await {
        Ok(_) => rest.is_empty(),
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[tokio::test]
async fn no_response_within_the_stream_idle_timeout_is_a_504_and_the_connection_goes_on() {
    let upstream = Stalling::start().await;
    let harness = proxy(&upstream, config(Some(IDLE), None)).await;
    let mut stream = TcpStream::connect(harness.addr).await.unwrap();

    // The HTTP/1.1 fast path.
    let hang = "GET http://app.internal/hang HTTP/1.1\r\nHost: app.internal\r\n\r\n";
    let (head, body, took) = exchange(&mut stream, hang).await;
    assert_eq!((status(&head), body.as_str()), ("504", "stream timeout"));
    assert!(head.contains("server: envoy"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    assert!(took >= IDLE && took < IDLE * 5, "{took:?}");
    let (head, body, _) = exchange(&mut stream, GET_OK).await;
    assert_eq!((status(&head), body.as_str()), ("200", "ok"));
    assert_eq!(harness.metrics.rq_idle_timeout.get(), 1);

    // A chunked request body goes to the general path, which times its streams itself.
    let chunked = "POST http://app.internal/hang HTTP/1.1\r\nHost: app.internal\r\n\
                   Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    let (head, body, took) = exchange(&mut stream, chunked).await;
    assert_eq!((status(&head), body.as_str()), ("504", "stream timeout"));
    assert!(took >= IDLE && took < IDLE * 5, "{took:?}");
    let (head, body, _) = exchange(&mut stream, GET_OK).await;
    assert_eq!((status(&head), body.as_str()), ("200", "ok"));
    assert_eq!(harness.metrics.rq_idle_timeout.get(), 2);
    assert!(
        harness
            .prometheus()
            .contains("envoy_http_downstream_rq_idle_timeout 2")
    );
}

#[tokio::test]
async fn a_request_body_that_stops_is_a_408_and_the_connection_closes() {
    let upstream = Stalling::start().await;
    let harness = proxy(&upstream, config(Some(IDLE), None)).await;

    let mut stream = TcpStream::connect(harness.addr).await.unwrap();
    let partial = "POST http://app.internal/ok HTTP/1.1\r\nHost: app.internal\r\n\
                   content-length: 10\r\n\r\nabc";
    let (head, body, took) = exchange(&mut stream, partial).await;
    assert_eq!((status(&head), body.as_str()), ("408", "stream timeout"));
    assert_eq!(
        head.to_ascii_lowercase()
            .matches("connection: close")
            .count(),
        1,
        "{head}"
    );
    assert!(took >= IDLE && took < IDLE * 5, "{took:?}");
    assert!(closes(&mut stream).await);

    // A head that never ends is a stream as well.
    let mut stream = TcpStream::connect(harness.addr).await.unwrap();
    let (head, body, _) = exchange(&mut stream, "GET http://app.internal/ok HTTP/1.1\r\n").await;
    assert_eq!((status(&head), body.as_str()), ("408", "stream timeout"));
    assert!(closes(&mut stream).await);
    assert_eq!(harness.metrics.rq_idle_timeout.get(), 2);
    assert_eq!(harness.metrics.rq_timeout.get(), 0);
}

#[tokio::test]
async fn a_request_not_whole_within_the_request_timeout_is_a_408() {
    let upstream = Stalling::start().await;
    let harness = proxy(&upstream, config(Some(IDLE * 10), Some(IDLE))).await;

    let mut stream = TcpStream::connect(harness.addr).await.unwrap();
    let start = Instant::now();
    stream
        .write_all(
            b"POST http://app.internal/ok HTTP/1.1\r\nHost: app.internal\r\ncontent-length: 10\r\n\r\n",
        )
        .await
        .unwrap();
    // A body byte every 100 ms: never idle, never whole.
    let mut answer = [0u8; 1];
    for _ in 0..9 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if stream.write_all(b"x").await.is_err() {
            break;
        }
        if let Ok(Ok(1)) =
            tokio::time::timeout(Duration::from_millis(1), stream.peek(&mut answer)).await
        {
            break;
        }
    }
    let (head, body) = within(read_response(&mut stream)).await;
    let body = String::from_utf8(body).unwrap();
    assert_eq!((status(&head), body.as_str()), ("408", "request timeout"));
    assert_eq!(
        head.to_ascii_lowercase()
            .matches("connection: close")
            .count(),
        1,
        "{head}"
    );
    assert!(start.elapsed() >= IDLE && start.elapsed() < IDLE * 5);
    assert_eq!(harness.metrics.rq_timeout.get(), 1);
    assert_eq!(harness.metrics.rq_idle_timeout.get(), 0);

    // A whole request is past the request timeout: only the stream idle timeout is left,
    // and the answer comes in time.
    let mut stream = TcpStream::connect(harness.addr).await.unwrap();
    let (head, _, _) = exchange(&mut stream, GET_OK).await;
    assert_eq!(status(&head), "200");
    assert!(
        harness
            .prometheus()
            .contains("envoy_http_downstream_rq_timeout 1")
    );
}

#[tokio::test]
async fn a_response_body_that_stalls_closes_the_connection() {
    stalls_and_closes("GET http://app.internal/stall HTTP/1.1\r\nHost: app.internal\r\n\r\n").await;
}

/// Sends `request` for `/stall` and checks that the connection ends one stream idle timeout
/// after the 3 body bytes the upstream sent, counted once.
async fn stalls_and_closes(request: &str) {
    let upstream = Stalling::start().await;
    let harness = proxy(&upstream, config(Some(IDLE), None)).await;
    let mut stream = TcpStream::connect(harness.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    let read = within(stream.read_to_end(&mut got)).await;
    assert!(read.is_ok() || read.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset));
    let got = String::from_utf8(got).unwrap();
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(got.ends_with("\r\n\r\nabc"), "{got}");
    assert!(start.elapsed() >= IDLE && start.elapsed() < IDLE * 5);
    assert_eq!(harness.metrics.rq_idle_timeout.get(), 1);
}

#[tokio::test]
async fn the_shorter_of_the_route_and_stream_idle_timeouts_answers() {
    let upstream = Stalling::start().await;
    let hang = "GET http://app.internal/hang HTTP/1.1\r\nHost: app.internal\r\n\r\n";

    // The route timeout first: Envoy's 504 `UT`.
    let harness = proxy(
        &upstream,
        ProxyConfig {
            route_timeout: Some(IDLE / 3),
            ..config(Some(IDLE), None)
        },
    )
    .await;
    let mut stream = TcpStream::connect(harness.addr).await.unwrap();
    let (head, body, _) = exchange(&mut stream, hang).await;
    assert_eq!(
        (status(&head), body.as_str()),
        ("504", "upstream request timeout")
    );
    assert_eq!(harness.metrics.rq_idle_timeout.get(), 0);

    // The stream idle timeout first: `SI`.
    let harness = proxy(
        &upstream,
        ProxyConfig {
            route_timeout: Some(IDLE * 10),
            ..config(Some(IDLE), None)
        },
    )
    .await;
    let mut stream = TcpStream::connect(harness.addr).await.unwrap();
    let (head, body, took) = exchange(&mut stream, hang).await;
    assert_eq!((status(&head), body.as_str()), ("504", "stream timeout"));
    assert!(took < IDLE * 5, "{took:?}");
    assert_eq!(harness.metrics.rq_idle_timeout.get(), 1);

    // Both off: nothing answers for the stream idle timeout's worth and more.
    let harness = proxy(&upstream, config(None, None)).await;
    let mut stream = TcpStream::connect(harness.addr).await.unwrap();
    stream.write_all(hang.as_bytes()).await.unwrap();
    let mut byte = [0u8; 1];
    let waited = tokio::time::timeout(IDLE * 3, stream.read(&mut byte)).await;
    assert!(waited.is_err(), "answered with the stream idle timeout off");
}

/// On the general path (here an HTTP/1.1 request with a chunked body), a response body that
/// stalls for the stream idle timeout ends the stream: the connection closes, as on the
/// fast path. (An HTTP/2 client, which only the transparent listener serves, gets the
/// stream reset instead: the same body error, checked against Envoy in the differential
/// lab.)
#[tokio::test]
async fn a_stalled_response_body_on_the_general_path_ends_the_stream() {
    stalls_and_closes(
        "POST http://app.internal/stall HTTP/1.1\r\nHost: app.internal\r\n\
         transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
}
