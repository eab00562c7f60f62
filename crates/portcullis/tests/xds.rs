//! `portcullis run --xds-address`, end to end on loopback against the test control plane:
//! the node it presents, readiness, `/config_dump` and `/stats`; then bad input and
//! control-plane faults, with two small upstreams and a bounded request
//! loop through the explicit proxy that runs while the control plane sends malformed
//! resources, resets streams, replays stale nonces, goes silent, refuses connections and
//! restarts. No request may fail, the previous version serves after each NACK, the NACK
//! shows in `/config_dump` as `error_state`, and readiness is kept throughout.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::config::listener::v3::Filter;
use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
use envoy_types::pb::envoy::config::route::v3::route::Action;
use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier;
use envoy_types::pb::envoy::config::route::v3::weighted_cluster::ClusterWeight;
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, WeightedCluster};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, UInt32Value};
use envoy_types::util::pack_any;
use portcullis_control_plane::resources::{
    assignment, eds_cluster, rds_listener, route_to_cluster, static_cluster, tcp_proxy_listener,
    workload_metadata,
};
use portcullis_control_plane::{ControlPlane, Event, EventKind, type_url};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const CLUSTER: &str = type_url::CLUSTER;
const LISTENER: &str = type_url::LISTENER;
const ENDPOINT: &str = type_url::ENDPOINT;
const ROUTE: &str = type_url::ROUTE;

/// An EDS cluster (its endpoints from EDS).
const APP: &str = "outbound|80||app.test";
/// A STATIC cluster (its endpoints inline).
const STATIC: &str = "outbound|80||static.test";
/// A cluster that the routes name and the control plane never sends.
const MISSING: &str = "outbound|80||missing.test";
/// A TCP listener that the malformed listener replaces (never bound: on loopback without
/// a redirect, connections reach LDS listeners only through the original destination).
const TCP_LISTENER: &str = "127.0.0.1_tcp";

// --- processes and peers ---

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The proxy, killed when the test ends however it ends.
struct Proxy {
    child: Child,
    admin: SocketAddr,
    http_proxy: SocketAddr,
    tcp: SocketAddr,
    log: tempfile::NamedTempFile,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    fn output(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Starts a proxy against `control_plane` and waits for its admin port to answer: the
    /// status of that first `/ready`. Its ports come from `free_port`, so another process
    /// can take one before the proxy binds it; a proxy that exits for that is started again
    /// on new ports (three attempts). Any other exit, or no answer within 30 s, fails the
    /// test with the proxy's output.
    async fn start(control_plane: SocketAddr, protocol: &str) -> (Proxy, u16) {
        let mut attempt = 1;
        loop {
            let mut proxy = spawn_proxy(control_plane, protocol);
            match proxy.first_answer().await {
                Ok(status) => return (proxy, status),
                Err(output) if attempt < 3 && output.contains("cannot listen on") => {
                    eprintln!("a port was taken before the proxy bound it; again:\n{output}");
                    attempt += 1;
                }
                Err(output) => panic!("{output}"),
            }
        }
    }

    /// The status of the first answer of the admin port's `/ready`, or what the proxy
    /// printed if it ended first.
    async fn first_answer(&mut self) -> Result<u16, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((status, _)) = admin(self, "/ready").await {
                return Ok(status);
            }
            self.expect_running("before its admin port answered")?;
            assert!(
                Instant::now() < deadline,
                "the admin port never answered:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits up to 30 s for `/ready` to answer 200; fails the test with the last answer and
    /// the proxy's output if it does not, or if the proxy ends.
    async fn ready(&mut self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answer = admin(self, "/ready").await;
            if matches!(answer, Ok((200, _))) {
                return;
            }
            if let Err(output) = self.expect_running(what) {
                panic!("{output}");
            }
            assert!(
                Instant::now() < deadline,
                "not ready ({what}) within 30 s, last answer {answer:?}:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// An error with the exit status and output if the proxy has ended.
    fn expect_running(&mut self, what: &str) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(Some(exit)) => Err(format!(
                "the proxy ended ({exit}) {what}:\n{}",
                self.output()
            )),
            _ => Ok(()),
        }
    }
}

fn spawn_proxy(control_plane: SocketAddr, protocol: &str) -> Proxy {
    let (admin, http_proxy) = (free_port(), free_port());
    let port = |a: SocketAddr| a.to_string();
    let log = tempfile::NamedTempFile::new().unwrap();
    let bin = std::env::var_os("PORTCULLIS_BIN")
        .map_or_else(|| env!("CARGO_BIN_EXE_portcullis").into(), Into::into);
    let child = Command::new::<std::ffi::OsString>(bin)
        .args(["run", "--xds-address", &format!("http://{control_plane}")])
        .args(["--xds-protocol", protocol])
        .args(["--admin", &port(admin), "--http-proxy", &port(http_proxy)])
        // Ports the tests never reach are the kernel's choice: nothing can take them first.
        .args(["--outbound", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
        .args(["--health", "127.0.0.1:0"])
        .args(["--pod-name", "app-0", "--pod-namespace", "ns1"])
        .args(["--instance-ip", "10.1.2.3"])
        .args(["--xds-token-file", "/nonexistent"])
        .env("PORTCULLIS_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .spawn()
        .expect("portcullis runs");
    Proxy {
        child,
        admin,
        http_proxy,
        tcp: free_port(),
        log,
    }
}

/// One HTTP/1.1 exchange on a new connection: status and body.
async fn get(addr: SocketAddr, request: &str) -> Result<(u16, String), String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut out = Vec::new();
        stream
            .read_to_end(&mut out)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status line in {text:?}"))?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
        Ok((status, body.unwrap_or_default()))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "no answer within 5 s".to_owned())?
}

async fn admin(proxy: &Proxy, path: &str) -> Result<(u16, String), String> {
    let request = format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n");
    get(proxy.admin, &request).await
}

/// A request for `host` through the explicit proxy.
async fn via_proxy(proxy: SocketAddr, host: &str) -> Result<(u16, String), String> {
    let request =
        format!("GET http://{host}/ HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    get(proxy, &request).await
}

/// Polls `check` every 50 ms for up to 30 s.
async fn eventually<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(v) = check().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// An upstream answering every HTTP request with `200` and `body`, and every TCP
/// connection that sends no request line with `body` too (for the TCP listener).
async fn upstream(body: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut seen = Vec::new();
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if stream.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

// --- traffic ---

/// What the request loop saw: `STATUS BODY` (or the error) by host, counted.
type Outcomes = BTreeMap<String, BTreeMap<String, u64>>;

/// A request loop through the proxy, one new connection per request, alternating between
/// the hosts, bounded in count and time.
struct Traffic {
    seen: Arc<Mutex<Outcomes>>,
    /// Requests completed so far.
    completed: Arc<std::sync::atomic::AtomicU64>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

const MAX_REQUESTS: u64 = 50_000;
const MAX_TRAFFIC: Duration = Duration::from_secs(180);

impl Traffic {
    fn start(proxy: SocketAddr, hosts: &'static [&'static str]) -> Traffic {
        let seen = Arc::new(Mutex::new(Outcomes::new()));
        let completed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn({
            let seen = Arc::clone(&seen);
            let completed = Arc::clone(&completed);
            async move {
                let start = Instant::now();
                for n in 0..MAX_REQUESTS {
                    if *stopped.borrow_and_update() || start.elapsed() > MAX_TRAFFIC {
                        return;
                    }
                    let host = hosts[(n as usize) % hosts.len()];
                    let outcome = match via_proxy(proxy, host).await {
                        Ok((status, body)) => format!("{status} {body}"),
                        Err(e) => e,
                    };
                    *seen
                        .lock()
                        .unwrap()
                        .entry(host.to_owned())
                        .or_default()
                        .entry(outcome)
                        .or_default() += 1;
                    completed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        });
        Traffic {
            seen,
            completed,
            stop,
            task,
        }
    }

    /// What was seen since the last call.
    fn take(&self) -> Outcomes {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }

    /// Asserts that every request since the last check got one of `allowed` for its host,
    /// and that there were some.
    fn expect(&self, phase: &str, allowed: &[(&str, &[&str])]) {
        let total = self.check(phase, allowed);
        assert!(total > 0, "{phase}: no request was made");
    }

    /// [`Traffic::check`] once the request in flight now has ended: requests are made one
    /// at a time, so two more completions mean the one routed before a change is counted.
    async fn check_transition(&self, phase: &str, allowed: &[(&str, &[&str])]) {
        let now = || self.completed.load(std::sync::atomic::Ordering::SeqCst);
        let target = now() + 2;
        let settled = async {
            while now() < target {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), settled)
            .await
            .unwrap_or_else(|_| panic!("{phase}: the request loop stopped"));
        self.check(phase, allowed);
    }

    /// Asserts that every request since the last check got one of `allowed` for its host;
    /// returns how many there were (a short transition may have none).
    fn check(&self, phase: &str, allowed: &[(&str, &[&str])]) -> u64 {
        let seen = self.take();
        let total: u64 = seen.values().flat_map(|m| m.values()).sum();
        for (host, outcomes) in &seen {
            let ok = allowed
                .iter()
                .find(|(h, _)| h == host)
                .map(|(_, o)| *o)
                .unwrap_or_default();
            for (outcome, count) in outcomes {
                assert!(
                    ok.contains(&outcome.as_str()),
                    "{phase}: {count} request(s) for {host} got {outcome:?} (allowed: {ok:?}); all: {seen:?}"
                );
            }
        }
        total
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

// --- resources: the mesh and its malformed variants ---

fn timeout() -> PbDuration {
    PbDuration {
        seconds: 1,
        nanos: 0,
    }
}

/// Istio's explicit-proxy route table: app.test to the EDS cluster, static.test to the
/// static one, missing.test to a cluster never sent.
fn http_proxy_routes(app: &str) -> RouteConfiguration {
    let host = |name: &str, cluster: &str| {
        let mut vh = route_to_cluster("http_proxy", cluster)
            .virtual_hosts
            .remove(0);
        vh.name = format!("{name}:80");
        vh.domains = vec![name.to_owned(), format!("{name}:80")];
        vh
    };
    RouteConfiguration {
        name: "http_proxy".to_owned(),
        virtual_hosts: vec![
            host("app.test", app),
            host("static.test", STATIC),
            host("missing.test", MISSING),
        ],
        ..RouteConfiguration::default()
    }
}

struct Mesh {
    a: SocketAddr,
    b: SocketAddr,
}

impl Mesh {
    fn cluster(&self) -> Vec<Any> {
        vec![
            pack_any(eds_cluster(APP, timeout())),
            pack_any(static_cluster(STATIC, &[self.a])),
        ]
    }

    /// app.test's endpoint at `to`, a pod of Deployment `app-v1` as istiod describes it.
    fn endpoints(&self, to: SocketAddr) -> Vec<Any> {
        let mut a = assignment(APP, &[to]);
        for e in &mut a.endpoints[0].lb_endpoints {
            e.metadata = Some(workload_metadata("app-v1", "ns2", "app", "v1", "east"));
        }
        vec![pack_any(a)]
    }

    fn listeners(&self, proxy: &Proxy) -> Vec<Any> {
        vec![
            pack_any(rds_listener(
                "127.0.0.1_15080",
                Some(proxy.http_proxy),
                "http_proxy",
            )),
            pack_any(tcp_proxy_listener(TCP_LISTENER, proxy.tcp, STATIC)),
        ]
    }

    fn routes(&self) -> Vec<Any> {
        vec![pack_any(http_proxy_routes(APP))]
    }

    /// Pushes the whole mesh; endpoints of app.test at `to`.
    fn push(&self, cp: &ControlPlane, proxy: &Proxy, to: SocketAddr) {
        cp.push(CLUSTER, self.cluster()).unwrap();
        cp.push(ENDPOINT, self.endpoints(to)).unwrap();
        cp.push(LISTENER, self.listeners(proxy)).unwrap();
        cp.push(ROUTE, self.routes()).unwrap();
    }
}

fn set_ip(cla: &mut ClusterLoadAssignment, ip: &str) {
    let Some(HostIdentifier::Endpoint(endpoint)) =
        &mut cla.endpoints[0].lb_endpoints[0].host_identifier
    else {
        unreachable!("assignment() builds endpoints")
    };
    let Some(AddressKind::SocketAddress(socket)) =
        endpoint.address.as_mut().and_then(|a| a.address.as_mut())
    else {
        unreachable!("assignment() builds socket addresses")
    };
    socket.address = ip.to_owned();
}

/// A malformed replacement of one resource of the mesh, which would send app.test or
/// static.test to upstream b were it applied.
struct Malformed {
    what: &'static str,
    type_url: &'static str,
    name: &'static str,
    any: Any,
    /// What the NACK's message and the `error_state` details hold.
    detail: &'static str,
    /// Whether, under Delta and under SotW, the resource reaches the state (and
    /// `/config_dump`'s `error_state`); a bad envelope is refused by the client before.
    in_dump: [bool; 2],
}

fn malformed(mesh: &Mesh, proxy: &Proxy) -> Vec<Malformed> {
    let mut bad_ip = assignment(APP, &[mesh.b, mesh.b]);
    set_ip(&mut bad_ip, "10.0.0.300");
    let mut zero_weight = assignment(APP, &[mesh.b]);
    zero_weight.endpoints[0].lb_endpoints[0].load_balancing_weight = Some(UInt32Value { value: 0 });
    let mut static_bad_ip: Cluster = static_cluster(STATIC, &[mesh.b]);
    set_ip(static_bad_ip.load_assignment.as_mut().unwrap(), "not-an-ip");
    let mut weights = http_proxy_routes(APP);
    let Some(Action::Route(action)) = &mut weights.virtual_hosts[0].routes[0].action else {
        unreachable!("route_to_cluster() routes")
    };
    action.cluster_specifier = Some(ClusterSpecifier::WeightedClusters(WeightedCluster {
        clusters: [(APP, u32::MAX), (STATIC, 1)]
            .iter()
            .map(|(name, weight)| ClusterWeight {
                name: (*name).to_owned(),
                weight: Some(UInt32Value { value: *weight }),
                ..ClusterWeight::default()
            })
            .collect(),
        ..WeightedCluster::default()
    }));
    let mut unknown_filter = tcp_proxy_listener(TCP_LISTENER, proxy.tcp, STATIC);
    unknown_filter.filter_chains[0].filters = vec![Filter {
        name: "envoy.filters.network.mongo_proxy".to_owned(),
        config_type: Some(ConfigType::TypedConfig(Any {
            type_url:
                "type.googleapis.com/envoy.extensions.filters.network.mongo_proxy.v3.MongoProxy"
                    .to_owned(),
            value: Vec::new(),
        })),
    }];
    vec![
        Malformed {
            what: "an invalid IP in an EDS endpoint",
            type_url: ENDPOINT,
            name: APP,
            any: pack_any(bad_ip),
            detail: "malformed IP address: 10.0.0.300",
            in_dump: [true, true],
        },
        Malformed {
            what: "an endpoint weight of 0",
            type_url: ENDPOINT,
            name: APP,
            any: pack_any(zero_weight),
            detail: "load_balancing_weight: must be at least 1",
            in_dump: [true, true],
        },
        Malformed {
            what: "an invalid IP in a static cluster",
            type_url: CLUSTER,
            name: STATIC,
            any: pack_any(static_bad_ip),
            detail: "malformed IP address: not-an-ip",
            in_dump: [true, true],
        },
        Malformed {
            what: "weighted clusters above 32 bits",
            type_url: ROUTE,
            name: "http_proxy",
            any: pack_any(weights),
            detail: "the sum of the weights overflows 32 bits",
            in_dump: [true, true],
        },
        Malformed {
            what: "a listener with an unknown terminal filter",
            type_url: LISTENER,
            name: TCP_LISTENER,
            any: pack_any(unknown_filter),
            detail: "unsupported network filter envoy.filters.network.mongo_proxy",
            in_dump: [true, true],
        },
        Malformed {
            what: "an unparseable Any",
            type_url: CLUSTER,
            name: STATIC,
            // The name field claims 127 bytes and has 2.
            any: Any {
                type_url: CLUSTER.to_owned(),
                value: vec![0x0a, 0x7f, b'x', b'y'],
            },
            // Delta names it in its envelope, so the conversion fails to decode it; SotW
            // names a resource by its first field, so the client cannot even name it.
            detail: "decode",
            in_dump: [true, false],
        },
        Malformed {
            what: "an Any of the wrong type",
            type_url: CLUSTER,
            name: STATIC,
            any: pack_any(route_to_cluster(STATIC, APP)),
            detail: "has type type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            in_dump: [false, false],
        },
    ]
}

// --- the control plane's log and the admin views ---

fn nacks(events: &[Event], type_url: &str) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Nack {
                type_url: t, error, ..
            } if t == type_url => Some(error.message.clone()),
            _ => None,
        })
        .collect()
}

fn acked(events: &[Event], type_url: &str, version: &str) -> bool {
    events.iter().any(|e| {
        matches!(&e.kind, EventKind::Ack { type_url: t, version: v, .. }
            if t == type_url && v == version)
    })
}

async fn wait_ack(cp: &ControlPlane, type_url: &str, version: &str) {
    let wait = cp.wait_for(|e| acked(e, type_url, version).then_some(()));
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .unwrap_or_else(|_| panic!("no ACK of {type_url} version {version}"));
}

/// Every `error_state` in the dump, as (failed resource's name, details).
fn error_states(dump: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dump];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(o) => {
                if let Some(e) = o.get("error_state") {
                    let name = e["failed_configuration"]["name"].as_str().unwrap_or("");
                    let details = e["details"].as_str().unwrap_or("");
                    out.push((name.to_owned(), details.to_owned()));
                }
                stack.extend(o.values());
            }
            Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
    out
}

/// The `version_info` of the active (not warming) version of the resource named `name`.
fn active_version(dump: &Value, name: &str) -> Option<String> {
    let mut stack = vec![dump];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(o) => {
                let named = ["cluster", "listener", "route_config", "endpoint_config"]
                    .iter()
                    .filter_map(|k| o.get(*k))
                    .any(|r| r["name"] == name || r["cluster_name"] == name);
                if named && let Some(version) = o.get("version_info").and_then(Value::as_str) {
                    return Some(version.to_owned());
                }
                for (key, value) in o {
                    if !key.starts_with("warming") && !key.starts_with("dynamic_warming") {
                        stack.push(value);
                    }
                }
            }
            Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
    None
}

async fn config_dump(proxy: &Proxy) -> Value {
    let (status, body) = admin(proxy, "/config_dump").await.expect("config_dump");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("config_dump is JSON")
}

async fn expect_ready(proxy: &Proxy, phase: &str) {
    let ready = admin(proxy, "/ready").await;
    assert_eq!(
        ready.as_ref().map(|r| r.0),
        Ok(200),
        "{phase}: readiness lost: {ready:?}\n{}",
        proxy.output()
    );
}

/// A proxy synced to the mesh, ready, with traffic flowing to upstream a.
async fn synced(protocol: &str) -> (ControlPlane, Proxy, Mesh, Traffic) {
    let mesh = Mesh {
        a: upstream("a").await,
        b: upstream("b").await,
    };
    let cp = ControlPlane::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let (mut proxy, _) = Proxy::start(cp.local_addr(), protocol).await;
    mesh.push(&cp, &proxy, mesh.a);
    proxy.ready("the mesh pushed").await;
    eventually("app.test served", async || {
        via_proxy(proxy.http_proxy, "app.test")
            .await
            .ok()
            .filter(|r| r.0 == 200)
    })
    .await;
    let traffic = Traffic::start(proxy.http_proxy, &["app.test", "static.test"]);
    (cp, proxy, mesh, traffic)
}

const SERVED_BY_A: &[(&str, &[&str])] = &[("app.test", &["200 a"]), ("static.test", &["200 a"])];
/// While app.test moves from one upstream to the other: requests in flight may see either.
const EITHER: &[(&str, &[&str])] = &[
    ("app.test", &["200 a", "200 b"]),
    ("static.test", &["200 a"]),
];

/// Lets the loop run a little.
async fn some_traffic() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

// --- tests ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_from_the_control_plane_serves_once_complete_and_shows_in_the_admin_api() {
    let mesh = Mesh {
        a: upstream("a").await,
        b: upstream("b").await,
    };
    let cp = ControlPlane::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    // Nothing is answered until the mesh is in place: not ready before.
    cp.set_silent(true);
    let (mut proxy, first) = Proxy::start(cp.local_addr(), "delta").await;
    assert_eq!(first, 503, "ready before any config arrived");
    let node = eventually("the proxy's stream", async || {
        cp.events().into_iter().find_map(|e| match e.kind {
            EventKind::Connected { node, .. } => node,
            _ => None,
        })
    })
    .await;
    assert_eq!(node.id, "sidecar~10.1.2.3~app-0.ns1~ns1.svc.cluster.local");
    mesh.push(&cp, &proxy, mesh.a);
    cp.set_silent(false);
    proxy.ready("the mesh pushed").await;
    let served = via_proxy(proxy.http_proxy, "app.test").await;
    assert_eq!(served, Ok((200, "a".to_owned())));

    let dump = config_dump(&proxy).await;
    let clusters = dump.to_string();
    assert!(clusters.contains("dynamic_active_clusters"), "{dump}");
    assert!(clusters.contains(APP), "{dump}");
    let endpoints = dump["configs"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["dynamic_endpoint_configs"].is_array()))
        .expect("endpoints in the dump");
    assert_eq!(
        endpoints["dynamic_endpoint_configs"][0]["endpoint_config"]["endpoints"][0]["lb_endpoints"]
            [0]["metadata"]["filter_metadata"]["istio"],
        serde_json::json!({"workload": "app-v1;ns2;app;v1;east"}),
        "{dump}"
    );
    let (_, stats) = admin(&proxy, "/stats").await.unwrap();
    assert!(
        stats.contains("control_plane.connected_state: 1\n"),
        "{stats}"
    );
    assert!(
        stats.contains("cluster_manager.cds.update_success: "),
        "{stats}"
    );
    let (_, prometheus) = admin(&proxy, "/stats/prometheus").await.unwrap();
    assert!(
        prometheus.contains("envoy_control_plane_connected_state 1\n"),
        "{prometheus}"
    );
}

async fn malformed_resources_never_take_down_what_serves(protocol: &str) {
    let (cp, proxy, mesh, traffic) = synced(protocol).await;
    some_traffic().await;
    traffic.expect("before", SERVED_BY_A);

    for case in malformed(&mesh, &proxy) {
        let what = case.what;
        let in_dump = case.in_dump[usize::from(protocol != "delta")];
        let before = nacks(&cp.events(), case.type_url).len();
        let before_version = active_version(&config_dump(&proxy).await, case.name);
        assert!(before_version.is_some(), "{what}: {} is active", case.name);
        cp.push_named(case.type_url, vec![(case.name.to_owned(), case.any)]);
        let message = eventually(what, async || {
            nacks(&cp.events(), case.type_url).get(before).cloned()
        })
        .await;
        assert!(
            message.contains(case.detail),
            "{what}: NACK {message:?} lacks {:?}",
            case.detail
        );
        some_traffic().await;
        traffic.expect(what, SERVED_BY_A);
        expect_ready(&proxy, what).await;
        let dump = config_dump(&proxy).await;
        assert_eq!(
            active_version(&dump, case.name),
            before_version,
            "{what}: the previous version of {} is active",
            case.name
        );
        let errors = error_states(&dump);
        let shown = errors
            .iter()
            .any(|(name, details)| name == case.name && details.contains(case.detail));
        assert_eq!(
            shown, in_dump,
            "{what}: error_state for {} in /config_dump: {errors:?}",
            case.name
        );
        // The control plane puts it right: ACKed, the error is gone, and a still serves.
        mesh.push(&cp, &proxy, mesh.a);
        wait_ack(&cp, case.type_url, &cp.version(case.type_url)).await;
        let errors = error_states(&config_dump(&proxy).await);
        assert!(errors.is_empty(), "{what}: after the fix: {errors:?}");
        some_traffic().await;
        traffic.expect(&format!("{what}, fixed"), SERVED_BY_A);
    }

    // A route to a cluster that never arrives is no NACK: Envoy answers 503 NC for it, and
    // everything else keeps serving.
    let nacks_before = nacks(&cp.events(), ROUTE).len();
    let (status, body) = via_proxy(proxy.http_proxy, "missing.test").await.unwrap();
    assert_eq!((status, body.as_str()), (503, ""));
    assert_eq!(nacks(&cp.events(), ROUTE).len(), nacks_before);
    let routes = cp.version(ROUTE);
    assert!(acked(&cp.events(), ROUTE, &routes));
    eventually("the NC access log line", async || {
        proxy
            .output()
            .lines()
            .any(|l| l.contains("missing.test") && l.contains(" NC "))
            .then_some(())
    })
    .await;
    expect_ready(&proxy, "a route to a missing cluster").await;

    // A good change still applies: app.test moves to b.
    let moved = cp.push(ENDPOINT, mesh.endpoints(mesh.b)).unwrap();
    wait_ack(&cp, ENDPOINT, &moved).await;
    traffic.check_transition("the move", EITHER).await;
    some_traffic().await;
    traffic.expect(
        "after the move",
        &[("app.test", &["200 b"]), ("static.test", &["200 a"])],
    );
    traffic.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_malformed_resources_never_take_down_what_serves() {
    malformed_resources_never_take_down_what_serves("delta").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_malformed_resources_never_take_down_what_serves() {
    malformed_resources_never_take_down_what_serves("sotw").await;
}

/// Waits for a stream opened after the first `streams` to get its first ACK.
async fn reconnected(cp: &ControlPlane, streams: u64) {
    let wait = cp.wait_for(|events| {
        events
            .iter()
            .any(|e| e.stream > streams && matches!(e.kind, EventKind::Ack { .. }))
            .then_some(())
    });
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .expect("the proxy reconnects and ACKs");
}

fn last_stream(cp: &ControlPlane) -> u64 {
    cp.events().iter().map(|e| e.stream).max().unwrap_or(0)
}

async fn control_plane_faults_never_interrupt_traffic(protocol: &str) {
    let (cp, proxy, mesh, traffic) = synced(protocol).await;
    some_traffic().await;
    traffic.expect("before", SERVED_BY_A);

    // Stream reset: the proxy reconnects; nothing changes meanwhile.
    let streams = last_stream(&cp);
    cp.reset_streams();
    reconnected(&cp, streams).await;
    some_traffic().await;
    traffic.expect("stream reset", SERVED_BY_A);
    expect_ready(&proxy, "stream reset").await;

    // Stale nonce: the next EDS response is followed by a replay of the one before it.
    cp.send_stale_nonce(ENDPOINT);
    let to_b = cp.push(ENDPOINT, mesh.endpoints(mesh.b)).unwrap();
    let replayed = cp.wait_for(|events| {
        events
            .iter()
            .any(|e| matches!(e.kind, EventKind::Replayed { .. }))
            .then_some(())
    });
    tokio::time::timeout(Duration::from_secs(30), replayed)
        .await
        .expect("the control plane replays a stale response");
    wait_ack(&cp, ENDPOINT, &to_b).await;
    traffic
        .check_transition("stale nonce: the move", EITHER)
        .await;
    some_traffic().await;
    let moved = &[
        ("app.test", &["200 b"][..]),
        ("static.test", &["200 a"][..]),
    ];
    traffic.expect("stale nonce: the replayed old version is ignored", moved);
    // A request carrying the replayed nonce would be the proxy answering the replay. Other
    // stale nonces are no fault: the proxy's ACK of a response can cross a newer one.
    let events = cp.events();
    let replayed: Vec<&str> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Replayed { nonce, .. } => Some(nonce.as_str()),
            _ => None,
        })
        .collect();
    assert!(!replayed.is_empty());
    assert!(
        events.iter().all(|e| !matches!(
            &e.kind,
            EventKind::Stale { nonce, .. } if replayed.contains(&nonce.as_str())
        )),
        "the proxy answered the replay: {events:#?}"
    );

    // Silence: a push goes unanswered; what serves stays, the stream stays up.
    cp.set_silent(true);
    let back_to_a = cp.push(ENDPOINT, mesh.endpoints(mesh.a)).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    traffic.expect("silence", moved);
    expect_ready(&proxy, "silence").await;
    cp.set_silent(false);
    wait_ack(&cp, ENDPOINT, &back_to_a).await;
    traffic
        .check_transition("silence ended: the move back", EITHER)
        .await;
    some_traffic().await;
    traffic.expect("silence ended", SERVED_BY_A);

    // Refused connections for a while: streams end and every reconnect is refused.
    let streams = last_stream(&cp);
    cp.refuse_connections(true);
    cp.reset_streams();
    let refused = cp.wait_for(|events| {
        (events
            .iter()
            .filter(|e| matches!(e.kind, EventKind::Refused { .. }))
            .count()
            >= 2)
            .then_some(())
    });
    tokio::time::timeout(Duration::from_secs(60), refused)
        .await
        .expect("the proxy retries while refused");
    traffic.expect("refused", SERVED_BY_A);
    expect_ready(&proxy, "refused").await;
    cp.refuse_connections(false);
    reconnected(&cp, streams).await;
    traffic.expect("accepted again", SERVED_BY_A);

    // Restart: the control plane stops, comes back on the same address with the same
    // resources, and a change made after it is applied.
    let streams = last_stream(&cp);
    let cp = cp.restart().await.unwrap();
    reconnected(&cp, streams).await;
    traffic.expect("control plane restarted", SERVED_BY_A);
    expect_ready(&proxy, "control plane restarted").await;
    let version = cp.push(ENDPOINT, mesh.endpoints(mesh.b)).unwrap();
    wait_ack(&cp, ENDPOINT, &version).await;
    traffic
        .check_transition("after the restart: the move", EITHER)
        .await;
    some_traffic().await;
    traffic.expect("after the restart", moved);
    expect_ready(&proxy, "after the restart").await;

    // Gone for good: the last applied config keeps serving, still ready.
    cp.stop().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    traffic.expect("control plane gone", moved);
    expect_ready(&proxy, "control plane gone").await;
    traffic.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_control_plane_faults_never_interrupt_traffic() {
    control_plane_faults_never_interrupt_traffic("delta").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_control_plane_faults_never_interrupt_traffic() {
    control_plane_faults_never_interrupt_traffic("sotw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_that_is_not_up_yet_is_retried_until_it_is() {
    // Nothing listens on the address at first: connections are refused (TCP RST, not a gRPC
    // status), the proxy is not ready, and it keeps retrying with backoff.
    let mesh = Mesh {
        a: upstream("a").await,
        b: upstream("b").await,
    };
    // The address stays bound (not listening) until the control plane starts: connections
    // to it are refused, and no ephemeral port of this or a parallel test (a client's
    // self-connect included) can take it in the meantime.
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let address = reserved.local_addr().unwrap();
    let (mut proxy, first) = Proxy::start(address, "delta").await;
    assert_eq!(first, 503, "ready without a control plane");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(admin(&proxy, "/ready").await.map(|r| r.0), Ok(503));
    let output = proxy.output();
    assert!(
        output.contains("disconnected from the control plane"),
        "the failed attempts are logged: {output}"
    );

    drop(reserved);
    let cp = ControlPlane::start(address, None).await.unwrap();
    mesh.push(&cp, &proxy, mesh.a);
    proxy.ready("once the control plane is up").await;
    let served = via_proxy(proxy.http_proxy, "app.test").await;
    assert_eq!(served, Ok((200, "a".to_owned())));
}
