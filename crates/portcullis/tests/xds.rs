//! `portcullis run --xds-address`: config from a control plane, end to end on loopback.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use envoy_types::pb::envoy::config::route::v3::route::Action;
use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier;
use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
};
use envoy_types::util::pack_any;
use portcullis_control_plane::resources::{assignment, eds_cluster, rds_listener};
use portcullis_control_plane::{ControlPlane, EventKind, type_url};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CLUSTER: &str = "outbound|80||app.test";

/// A port nothing listens on now.
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
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_proxy(control_plane: SocketAddr) -> Proxy {
    let (admin, http_proxy) = (free_port(), free_port());
    let port = |a: SocketAddr| a.to_string();
    let child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["run", "--xds-address", &format!("http://{control_plane}")])
        .args(["--admin", &port(admin), "--http-proxy", &port(http_proxy)])
        .args(["--outbound", &port(free_port())])
        .args([
            "--metrics",
            &port(free_port()),
            "--health",
            &port(free_port()),
        ])
        .args(["--pod-name", "sleep-1", "--pod-namespace", "ns1"])
        .args([
            "--instance-ip",
            "10.1.2.3",
            "--xds-token-file",
            "/nonexistent",
        ])
        .env("PORTCULLIS_LOG", "info")
        .stdout(Stdio::null())
        .spawn()
        .expect("portcullis runs");
    Proxy {
        child,
        admin,
        http_proxy,
    }
}

/// One HTTP/1.1 exchange; the status and body.
async fn get(addr: SocketAddr, request: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

async fn admin(proxy: &Proxy, path: &str) -> Option<(u16, String)> {
    get(
        proxy.admin,
        &format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n"),
    )
    .await
}

async fn through_proxy(proxy: &Proxy) -> Option<(u16, String)> {
    get(
        proxy.http_proxy,
        "GET http://app.test/ HTTP/1.1\r\nhost: app.test\r\nconnection: close\r\n\r\n",
    )
    .await
}

/// Polls `check` for up to 20 s.
async fn eventually<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    for _ in 0..200 {
        if let Some(v) = check().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

/// An upstream answering every request with `200 ok`.
async fn upstream() -> SocketAddr {
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
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Istio's explicit-proxy route table (`http_proxy`, sent when the node asks for an HTTP
/// proxy port) with one virtual host.
fn http_proxy_routes() -> RouteConfiguration {
    RouteConfiguration {
        name: "http_proxy".into(),
        virtual_hosts: vec![VirtualHost {
            name: "app.test:80".into(),
            domains: vec!["app.test".into(), "app.test:80".into()],
            routes: vec![Route {
                name: "default".into(),
                r#match: Some(RouteMatch {
                    path_specifier: Some(PathSpecifier::Prefix("/".into())),
                    ..RouteMatch::default()
                }),
                action: Some(Action::Route(RouteAction {
                    cluster_specifier: Some(ClusterSpecifier::Cluster(CLUSTER.into())),
                    ..RouteAction::default()
                })),
                ..Route::default()
            }],
            ..VirtualHost::default()
        }],
        ..RouteConfiguration::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_from_the_control_plane_serves_and_a_bad_push_is_nacked() {
    let app = upstream().await;
    let cp = ControlPlane::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    // Nothing answers until the test says so: the proxy must not be ready before.
    cp.set_silent(true);
    let proxy = start_proxy(cp.local_addr());
    let node = eventually("the proxy's stream", async || {
        cp.events().into_iter().find_map(|e| match e.kind {
            EventKind::Connected { node, .. } => node,
            _ => None,
        })
    })
    .await;
    assert_eq!(
        node.id,
        "sidecar~10.1.2.3~sleep-1.ns1~ns1.svc.cluster.local"
    );
    let (status, _) = eventually("the admin port", async || admin(&proxy, "/ready").await).await;
    assert_eq!(status, 503, "ready before any config arrived");

    cp.push(
        type_url::CLUSTER,
        vec![pack_any(eds_cluster(
            CLUSTER,
            envoy_types::pb::google::protobuf::Duration {
                seconds: 1,
                nanos: 0,
            },
        ))],
    )
    .unwrap();
    cp.push(
        type_url::ENDPOINT,
        vec![pack_any(assignment(CLUSTER, &[app]))],
    )
    .unwrap();
    cp.push(
        type_url::LISTENER,
        vec![pack_any(rds_listener(
            "127.0.0.1_15080",
            Some(proxy.http_proxy),
            "http_proxy",
        ))],
    )
    .unwrap();
    cp.push(type_url::ROUTE, vec![pack_any(http_proxy_routes())])
        .unwrap();
    cp.set_silent(false);
    eventually("readiness", async || {
        admin(&proxy, "/ready").await.filter(|(s, _)| *s == 200)
    })
    .await;
    let (status, body) = eventually("a routed request", async || {
        through_proxy(&proxy).await.filter(|(s, _)| *s == 200)
    })
    .await;
    assert_eq!((status, body.as_str()), (200, "ok"));

    let (_, dump) = admin(&proxy, "/config_dump").await.unwrap();
    assert!(dump.contains("dynamic_active_clusters"), "{dump}");
    assert!(dump.contains(CLUSTER), "{dump}");
    let (_, stats) = admin(&proxy, "/stats").await.unwrap();
    assert!(
        stats.contains("control_plane.connected_state: 1"),
        "{stats}"
    );
    assert!(
        stats.contains("cluster_manager.cds.update_success: "),
        "{stats}"
    );

    // A static cluster with an address that is no IP: NACKed, the rest keeps serving.
    let bad = Cluster {
        name: "outbound|443||bad.test".into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        load_assignment: Some(assignment("outbound|443||bad.test", &[app])),
        ..Cluster::default()
    };
    let mut bad = bad;
    if let Some(la) = bad.load_assignment.as_mut() {
        for group in &mut la.endpoints {
            for e in &mut group.lb_endpoints {
                if let Some(
                    envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(ep),
                ) = e.host_identifier.as_mut()
                    && let Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(sa)) =
                        ep.address.as_mut().and_then(|a| a.address.as_mut())
                {
                    sa.address = "not-an-ip".into();
                }
            }
        }
    }
    cp.push(type_url::CLUSTER, vec![pack_any(bad)]).unwrap();
    let detail = cp
        .wait_for(|events| {
            events.iter().find_map(|e| match &e.kind {
                EventKind::Nack {
                    type_url, error, ..
                } if type_url == type_url::CLUSTER => Some(error.message.clone()),
                _ => None,
            })
        })
        .await;
    assert!(detail.contains("outbound|443||bad.test"), "{detail}");
    let (status, _) = through_proxy(&proxy).await.unwrap();
    assert_eq!(status, 200);
    let (_, dump) = admin(&proxy, "/config_dump").await.unwrap();
    assert!(dump.contains("error_state"), "{dump}");
    assert!(dump.contains("not-an-ip"), "{dump}");

    // The control plane goes away: the last applied config keeps serving, still ready.
    cp.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(through_proxy(&proxy).await.map(|r| r.0), Some(200));
    assert_eq!(admin(&proxy, "/ready").await.map(|r| r.0), Some(200));
}
