//! Half-close through a tunnel: a side that stops sending still receives, both ways.

mod common;

use common::{Harness, raw, service, snapshot, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Opens a CONNECT tunnel to `host:port` through `harness`.
async fn tunnel(harness: &Harness, host: &str, port: u16) -> tokio::net::TcpStream {
    let request = format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n");
    let (stream, head, body) = raw(harness.addr, &request).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.is_empty());
    stream
}

#[tokio::test]
async fn the_client_half_closes_and_still_gets_the_answer() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = upstream.local_addr().unwrap().port();
    // Reads everything until the client's end of stream, then answers and closes.
    let server = tokio::spawn(async move {
        let (mut s, _) = upstream.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.write_all(format!("got {}", got.len()).as_bytes())
            .await
            .unwrap();
        s.shutdown().await.unwrap();
    });
    let harness = Harness::start(snapshot(&service("db.internal", 5432, "TCP", &[port]), 1)).await;
    let mut client = tunnel(&harness, "db.internal", 5432).await;
    within(async {
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert_eq!(answer, "got 5");
    })
    .await;
    within(server).await.unwrap();
}

#[tokio::test]
async fn the_upstream_half_closes_and_still_receives() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = upstream.local_addr().unwrap().port();
    // Sends a banner and ends its side at once, then keeps reading what the client sends.
    let server = tokio::spawn(async move {
        let (mut s, _) = upstream.accept().await.unwrap();
        s.write_all(b"banner").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        got
    });
    let harness = Harness::start(snapshot(&service("db.internal", 5432, "TCP", &[port]), 1)).await;
    let mut client = tunnel(&harness, "db.internal", 5432).await;
    let got = within(async {
        let mut banner = Vec::new();
        client.read_to_end(&mut banner).await.unwrap();
        assert_eq!(banner, b"banner");
        client.write_all(b"late words").await.unwrap();
        client.shutdown().await.unwrap();
        server.await.unwrap()
    })
    .await;
    assert_eq!(got, b"late words");
}
