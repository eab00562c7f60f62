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

use common::{Harness, fetch, snapshot};

/// An h2c (prior knowledge) server on loopback that records request headers.
struct H2Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
    task: JoinHandle<()>,
}

impl Drop for H2Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl H2Upstream {
    async fn start() -> H2Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let task_seen = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
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
        H2Upstream { addr, seen, task }
    }
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
