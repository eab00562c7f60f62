//! The HTTP/1.1 fast path's message framing over real sockets: a scripted upstream answers
//! with exact bytes (chunked with trailers, close-delimited, HEAD, interim responses,
//! garbage) and a raw client checks what arrives and whether connections are reused.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

mod common;

use common::{Harness, read_response, service, snapshot, within};

/// One scripted answer: the bytes to send, and whether to close afterwards.
#[derive(Clone)]
struct Script(&'static str, bool);

/// An upstream that answers the n-th request it reads with the n-th script.
struct Scripted {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
    task: JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request (head and `content-length` body) from `stream`; `None` at EOF.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if buf.len() >= end + 4 + length {
                return Some(buf.drain(..end + 4 + length).collect());
            }
        }
        let mut chunk = [0u8; 65536];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

impl Scripted {
    async fn start(scripts: Vec<Script>) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (task_accepts, task_requests) = (Arc::clone(&accepts), Arc::clone(&requests));
        let next = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                task_accepts.fetch_add(1, Ordering::SeqCst);
                let (scripts, requests, next) = (
                    scripts.clone(),
                    Arc::clone(&task_requests),
                    Arc::clone(&next),
                );
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while let Some(request) = read_request(&mut stream, &mut buf).await {
                        requests.lock().unwrap().push(request);
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let Script(bytes, close) = scripts[i % scripts.len()].clone();
                        if stream.write_all(bytes.as_bytes()).await.is_err() || close {
                            return;
                        }
                    }
                });
            }
        });
        Scripted {
            addr,
            accepts,
            requests,
            task,
        }
    }

    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .collect()
    }
}

async fn proxy_for(upstream: &Scripted) -> Harness {
    Harness::start(snapshot(
        &service("app.internal", 80, "HTTP", &[upstream.addr.port()]),
        1,
    ))
    .await
}

fn get(path: &str) -> String {
    format!("GET http://app.internal{path} HTTP/1.1\r\nHost: app.internal\r\n\r\n")
}

/// Reads until `needle` has arrived (the end of a chunked body) and returns everything.
async fn read_until(stream: &mut TcpStream, needle: &[u8]) -> Vec<u8> {
    within(async {
        let mut buf = Vec::new();
        while !buf.windows(needle.len()).any(|w| w == needle) {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&buf));
            buf.extend_from_slice(&chunk[..n]);
        }
        buf
    })
    .await
}

#[tokio::test]
async fn a_chunked_response_with_trailers_passes_through_and_the_connection_is_reused() {
    const CHUNKED: &str = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nServer: up\r\n\r\n\
                           5\r\nhello\r\n6;x=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n";
    let upstream = Scripted::start(vec![Script(CHUNKED, false)]).await;
    let harness = proxy_for(&upstream).await;
    let mut client = TcpStream::connect(harness.addr).await.unwrap();
    for _ in 0..2 {
        client.write_all(get("/").as_bytes()).await.unwrap();
        let text =
            String::from_utf8(read_until(&mut client, b"X-Trailer: t\r\n\r\n").await).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(
            text.contains("\r\ntransfer-encoding: chunked\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nserver: envoy\r\n"), "{text}");
        assert!(
            text.ends_with("\r\n\r\n5\r\nhello\r\n6;x=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"),
            "{text}"
        );
    }
    assert_eq!(upstream.accepts(), 1);
}

#[tokio::test]
async fn a_close_delimited_response_is_rechunked_and_the_client_connection_stays_open() {
    const UNTIL_CLOSE: &str = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end";
    let upstream = Scripted::start(vec![Script(UNTIL_CLOSE, true)]).await;
    let harness = proxy_for(&upstream).await;
    let mut client = TcpStream::connect(harness.addr).await.unwrap();
    for _ in 0..2 {
        client.write_all(get("/").as_bytes()).await.unwrap();
        let text = String::from_utf8(read_until(&mut client, b"0\r\n\r\n").await).unwrap();
        assert!(
            text.contains("\r\ntransfer-encoding: chunked\r\n"),
            "{text}"
        );
        assert!(
            text.ends_with("\r\n\r\nd\r\nuntil the end\r\n0\r\n\r\n"),
            "{text}"
        );
    }
    // The upstream's connection ends with each body, so none is reused.
    assert_eq!(upstream.accepts(), 2);
}

#[tokio::test]
async fn head_interim_and_connection_close_responses_keep_both_sides_in_step() {
    let upstream = Scripted::start(vec![
        Script("HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", false),
        Script(
            "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            false,
        ),
        Script(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbye",
            true,
        ),
        Script("HTTP/1.1 204 No Content\r\n\r\n", false),
    ])
    .await;
    let harness = proxy_for(&upstream).await;
    let mut client = TcpStream::connect(harness.addr).await.unwrap();

    client
        .write_all(b"HEAD http://app.internal/ HTTP/1.1\r\nHost: app.internal\r\n\r\n")
        .await
        .unwrap();
    let head = read_until(&mut client, b"\r\n\r\n").await;
    let text = String::from_utf8_lossy(&head).into_owned();
    assert!(text.contains("\r\ncontent-length: 1000\r\n"), "{text}");

    client.write_all(get("/hints").as_bytes()).await.unwrap();
    let (head2, body) = within(read_response(&mut client)).await;
    assert!(head2.starts_with("HTTP/1.1 200 OK\r\n"), "{head2}");
    assert_eq!(body, b"ok");

    client.write_all(get("/close").as_bytes()).await.unwrap();
    let (head3, body) = within(read_response(&mut client)).await;
    assert!(!head3.contains("connection"), "{head3}");
    assert_eq!(body, b"bye");

    client.write_all(get("/empty").as_bytes()).await.unwrap();
    let (head4, body) = within(read_response(&mut client)).await;
    assert!(head4.starts_with("HTTP/1.1 204 No Content\r\n"), "{head4}");
    assert!(body.is_empty());
    // The HEAD and 103 exchanges shared one upstream connection; `Connection: close`
    // ended it.
    assert_eq!(upstream.accepts(), 2);
    assert_eq!(upstream.requests().len(), 4);
}

#[tokio::test]
async fn pipelined_requests_and_small_bodies_arrive_in_order() {
    let upstream = Scripted::start(vec![
        Script("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none", false),
        Script("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo", false),
    ])
    .await;
    let harness = proxy_for(&upstream).await;
    let mut client = TcpStream::connect(harness.addr).await.unwrap();
    let both = format!(
        "POST http://app.internal/1 HTTP/1.1\r\nHost: app.internal\r\nContent-Length: 5\r\n\r\nfirst{}",
        get("/2")
    );
    client.write_all(both.as_bytes()).await.unwrap();
    let (_, one) = within(read_response(&mut client)).await;
    let (_, two) = within(read_response(&mut client)).await;
    assert_eq!((one.as_slice(), two.as_slice()), (&b"one"[..], &b"two"[..]));
    let seen = upstream.requests();
    assert!(seen[0].starts_with("POST /1 HTTP/1.1\r\n"), "{}", seen[0]);
    assert!(seen[0].ends_with("\r\n\r\nfirst"), "{}", seen[0]);
    assert!(seen[1].starts_with("GET /2 HTTP/1.1\r\n"), "{}", seen[1]);
}

#[tokio::test]
async fn an_upstream_that_does_not_speak_http_is_a_503_protocol_error() {
    let upstream = Scripted::start(vec![Script("SSH-2.0-OpenSSH\r\n\r\n", true)]).await;
    let harness = proxy_for(&upstream).await;
    let mut client = TcpStream::connect(harness.addr).await.unwrap();
    client.write_all(get("/").as_bytes()).await.unwrap();
    let (head, body) = within(read_response(&mut client)).await;
    assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
    assert_eq!(
        String::from_utf8(body).unwrap(),
        "upstream connect error or disconnect/reset before headers. reset reason: protocol error"
    );
    assert!(
        harness.prometheus().contains("response_flags=\"UPE\""),
        "{}",
        harness.prometheus()
    );
}

#[tokio::test]
async fn a_body_cut_short_by_the_upstream_is_logged_at_its_end_with_uc() {
    let upstream = Scripted::start(vec![Script(
        "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc",
        true,
    )])
    .await;
    let harness = proxy_for(&upstream).await;
    let cut_short = |harness: &Harness| {
        harness
            .prometheus()
            .lines()
            .filter(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains("response_code=\"200\"")
                    && l.contains("response_flags=\"UC\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    // The HTTP/1.1 fast path, then the general path (a chunked request body).
    let requests = [
        get("/"),
        "POST http://app.internal/ HTTP/1.1\r\nHost: app.internal\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".to_owned(),
    ];
    for (i, request) in requests.iter().enumerate() {
        let mut client = TcpStream::connect(harness.addr).await.unwrap();
        client.write_all(request.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        within(client.read_to_end(&mut got))
            .await
            .unwrap_or_default();
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("HTTP/1.1 200 OK"), "{got}");
        assert!(got.ends_with("abc"), "{got}");
        within(async {
            while cut_short(&harness) < i as u64 + 1 {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await;
    }
}
