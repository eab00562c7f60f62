//! Bad resources and control-plane faults through the whole xDS path: the test control plane
//! on loopback, the real ADS client, and [`XdsState`] behind it, as the binary wires them.
//! Each malformed resource is NACKed with its name and reason (or accepted, where Envoy
//! accepts it), and what was active before keeps serving.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Filter;
use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
use envoy_types::pb::envoy::config::route::v3::route::Action;
use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier;
use envoy_types::pb::envoy::config::route::v3::weighted_cluster::ClusterWeight;
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, WeightedCluster};
use envoy_types::pb::envoy::service::discovery::v3::Resource as PbResource;
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, UInt32Value};
use envoy_types::util::pack_any;
use portcullis_control_plane::{ControlPlane, Event, EventKind, resources};
use portcullis_envoy::Resources;
use portcullis_xds::{
    Backoff, Client, ClientConfig, NodeIdentity, NodeOverrides, Protocol, Sink, Update, XdsStats,
    type_url,
};
use portcullis_xds_resources::XdsState;
use prost::Message;
use tokio::sync::watch;

const CLUSTER: &str = type_url::CLUSTER;
const LISTENER: &str = type_url::LISTENER;
const ENDPOINT: &str = type_url::ENDPOINT;
const ROUTE: &str = type_url::ROUTE;

const APP: &str = "outbound|80||app.internal.com";
const STATIC: &str = "outbound|8080||static.internal.com";
const UPSTREAM: &str = "127.0.0.2:8080";

// --- the real state behind the real client ---

/// Hands each update to [`XdsState`] as the binary does and publishes what is active.
#[derive(Clone)]
struct StateSink {
    state: Arc<Mutex<XdsState>>,
    changed: Arc<watch::Sender<u64>>,
}

impl StateSink {
    fn new() -> Self {
        Self {
            state: Arc::new(Mutex::new(XdsState::default())),
            changed: Arc::new(watch::channel(0).0),
        }
    }

    fn active(&self) -> Resources {
        self.state.lock().unwrap().active()
    }

    /// Waits until `check` holds of the state.
    async fn wait(&self, mut check: impl FnMut(&XdsState) -> bool) {
        let mut changed = self.changed.subscribe();
        loop {
            if check(&self.state.lock().unwrap()) {
                return;
            }
            changed.changed().await.unwrap();
        }
    }
}

impl Sink for StateSink {
    fn apply(&mut self, update: Update) -> portcullis_xds::Applied {
        let mut state = self.state.lock().unwrap();
        let applied = if update.state_of_the_world {
            let anys: Vec<Any> = update.resources.iter().map(|r| r.any.clone()).collect();
            state.apply_sotw(&update.type_url, &update.version, &anys)
        } else {
            let added: Vec<PbResource> = update
                .resources
                .iter()
                .map(|r| PbResource {
                    name: r.name.clone(),
                    version: r.version.clone(),
                    resource: Some(r.any.clone()),
                    ..PbResource::default()
                })
                .collect();
            state.apply_delta(&update.type_url, &added, &update.removed)
        };
        drop(state);
        self.changed.send_modify(|n| *n += 1);
        portcullis_xds::Applied {
            rejected: applied
                .rejected
                .iter()
                .map(|r| portcullis_xds::Rejected {
                    name: r.name.clone(),
                    reason: r.reason.clone(),
                })
                .collect(),
            wants: BTreeMap::from([
                (ENDPOINT.to_owned(), applied.endpoints_needed.clone()),
                (ROUTE.to_owned(), applied.routes_needed.clone()),
            ]),
        }
    }
}

struct Running {
    sink: StateSink,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn node() -> NodeIdentity {
    let env = [
        ("POD_NAME", "app-0"),
        ("POD_NAMESPACE", "default"),
        ("INSTANCE_IP", "10.0.0.7"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    NodeIdentity::from_env(env, &NodeOverrides::default())
}

fn spawn_client(addr: SocketAddr, protocol: Protocol) -> Running {
    let mut config = ClientConfig::new(format!("http://{addr}"), node());
    config.protocol = protocol;
    config.token_file = "/nonexistent/istio-token".into();
    let sink = StateSink::new();
    let client = Client::new(config, Arc::new(XdsStats::default()))
        .expect("valid config")
        .with_backoff(Backoff::new(
            Duration::from_millis(20),
            Duration::from_millis(200),
        ));
    let task = tokio::spawn({
        let sink = sink.clone();
        async move { match client.run(sink).await {} }
    });
    Running { sink, task }
}

async fn start() -> ControlPlane {
    ControlPlane::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .expect("control plane starts")
}

/// Bounds a wait (virtual time under a paused clock).
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn acked_version(events: &[Event], type_url: &str, wanted: &str) -> bool {
    events.iter().any(|e| {
        matches!(&e.kind, EventKind::Ack { type_url: t, version, .. }
            if t == type_url && version == wanted)
    })
}

async fn acked(cp: &ControlPlane, type_url: &str, version: &str) {
    let what = format!("ACK of {type_url} {version}");
    within(
        &what,
        cp.wait_for(|e| acked_version(e, type_url, version).then_some(())),
    )
    .await;
}

/// The error message of the first NACK of `type_url` on stream `stream` or later.
async fn nacked(cp: &ControlPlane, type_url: &str, from_stream: u64) -> String {
    within(
        "NACK",
        cp.wait_for(|events| {
            events.iter().find_map(|e| match &e.kind {
                EventKind::Nack {
                    type_url: t, error, ..
                } if t == type_url && e.stream >= from_stream => {
                    assert_eq!(error.code, 3, "INVALID_ARGUMENT");
                    Some(error.message.clone())
                }
                _ => None,
            })
        }),
    )
    .await
}

// --- resources ---

fn upstream() -> SocketAddr {
    UPSTREAM.parse().unwrap()
}

fn eds_cluster(name: &str) -> Cluster {
    let timeout = PbDuration {
        seconds: 1,
        nanos: 0,
    };
    resources::eds_cluster(name, timeout)
}

/// A mesh as istiod would send it: an HTTP listener on RDS, its route to an EDS cluster, a
/// static cluster and a TCP listener to it.
fn push_mesh(cp: &ControlPlane) {
    let listen = |port| SocketAddr::from(([127, 0, 0, 1], port));
    cp.push(
        CLUSTER,
        vec![
            pack_any(eds_cluster(APP)),
            pack_any(resources::static_cluster(STATIC, &[upstream()])),
        ],
    )
    .unwrap();
    cp.push(
        ENDPOINT,
        vec![pack_any(resources::assignment(APP, &[upstream()]))],
    )
    .unwrap();
    cp.push(
        LISTENER,
        vec![
            pack_any(resources::rds_listener(
                "0.0.0.0_80",
                Some(listen(80)),
                "80",
            )),
            pack_any(resources::tcp_proxy_listener(
                "0.0.0.0_8080",
                listen(8080),
                STATIC,
            )),
        ],
    )
    .unwrap();
    cp.push(
        ROUTE,
        vec![pack_any(resources::route_to_cluster("80", APP))],
    )
    .unwrap();
}

fn complete(s: &XdsState) -> bool {
    let active = s.active();
    s.initial_set_complete()
        && active.listeners.len() == 2
        && active.clusters.len() == 2
        && active.routes.len() == 1
        && active.endpoints.len() == 1
}

/// Starts a control plane with the mesh and a client synced to it.
async fn synced(protocol: Protocol) -> (ControlPlane, Running, Resources) {
    let cp = start().await;
    push_mesh(&cp);
    let client = spawn_client(cp.local_addr(), protocol);
    within("the first complete set", client.sink.wait(complete)).await;
    for t in type_url::ALL {
        let version = cp.version(t);
        acked(&cp, t, &version).await;
    }
    let active = client.sink.active();
    (cp, client, active)
}

/// The error a resource's last rejected update left in the state (`/config_dump`'s
/// `error_state`), with the version it came in.
fn error_state(s: &XdsState, type_url: &str, name: &str) -> Option<(String, String)> {
    let state = s.state();
    let error = match type_url {
        LISTENER => state.listeners.get(name).and_then(|r| r.error.as_ref()),
        ROUTE => state.routes.get(name).and_then(|r| r.error.as_ref()),
        CLUSTER => state.clusters.get(name).and_then(|r| r.error.as_ref()),
        _ => state.endpoints.get(name).and_then(|r| r.error.as_ref()),
    };
    error.map(|e| (e.version.clone(), e.details.clone()))
}

// --- malformed resources ---

/// One malformed replacement of a resource of the mesh.
struct Malformed {
    what: &'static str,
    type_url: &'static str,
    name: &'static str,
    any: Any,
    /// What the NACK's message must hold.
    message: &'static str,
    /// Whether the sink sees it under `Protocol::Delta` and under SotW (else the client
    /// rejects the envelope, and the state holds no error for it).
    reaches_the_state: [bool; 2],
}

fn with_endpoint_ip(ip: &str) -> ClusterLoadAssignment {
    let mut cla = resources::assignment(APP, &[upstream()]);
    set_ip(&mut cla, ip);
    cla
}

fn set_ip(cla: &mut ClusterLoadAssignment, ip: &str) {
    use envoy_types::pb::envoy::config::core::v3::address::Address as Kind;
    use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
    let Some(HostIdentifier::Endpoint(endpoint)) =
        &mut cla.endpoints[0].lb_endpoints[0].host_identifier
    else {
        unreachable!("assignment() builds endpoints")
    };
    let Some(Kind::SocketAddress(socket)) =
        endpoint.address.as_mut().and_then(|a| a.address.as_mut())
    else {
        unreachable!("assignment() builds socket addresses")
    };
    socket.address = ip.to_owned();
}

fn weighted_route(weights: &[u32]) -> RouteConfiguration {
    let mut rc = resources::route_to_cluster("80", APP);
    let Some(Action::Route(action)) = &mut rc.virtual_hosts[0].routes[0].action else {
        unreachable!("route_to_cluster() routes")
    };
    action.cluster_specifier = Some(ClusterSpecifier::WeightedClusters(WeightedCluster {
        clusters: weights
            .iter()
            .map(|w| ClusterWeight {
                name: APP.to_owned(),
                weight: Some(UInt32Value { value: *w }),
                ..ClusterWeight::default()
            })
            .collect(),
        ..WeightedCluster::default()
    }));
    rc
}

fn malformed() -> Vec<Malformed> {
    let mut zero_endpoint_weight = resources::assignment(APP, &[upstream()]);
    zero_endpoint_weight.endpoints[0].lb_endpoints[0].load_balancing_weight =
        Some(UInt32Value { value: 0 });
    let mut zero_locality_weight = resources::assignment(APP, &[upstream()]);
    zero_locality_weight.endpoints[0].load_balancing_weight = Some(UInt32Value { value: 0 });
    let mut static_bad_ip = resources::static_cluster(STATIC, &[upstream()]);
    set_ip(
        static_bad_ip.load_assignment.as_mut().unwrap(),
        "127.0.0.256",
    );
    let mut unknown_filter = resources::tcp_proxy_listener(
        "0.0.0.0_8080",
        SocketAddr::from(([127, 0, 0, 1], 8080)),
        STATIC,
    );
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
            any: pack_any(with_endpoint_ip("10.0.0.300")),
            message: "endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address: malformed IP address: 10.0.0.300",
            reaches_the_state: [true, true],
        },
        Malformed {
            what: "an invalid IP in a static cluster",
            type_url: CLUSTER,
            name: STATIC,
            any: pack_any(static_bad_ip),
            message: "malformed IP address: 127.0.0.256",
            reaches_the_state: [true, true],
        },
        Malformed {
            what: "an endpoint weight of 0",
            type_url: ENDPOINT,
            name: APP,
            any: pack_any(zero_endpoint_weight),
            message: "endpoints[0].lb_endpoints[0].load_balancing_weight: must be at least 1",
            reaches_the_state: [true, true],
        },
        Malformed {
            what: "a locality weight of 0",
            type_url: ENDPOINT,
            name: APP,
            any: pack_any(zero_locality_weight),
            message: "endpoints[0].load_balancing_weight: must be at least 1",
            reaches_the_state: [true, true],
        },
        Malformed {
            what: "weighted clusters summing to 0",
            type_url: ROUTE,
            name: "80",
            any: pack_any(weighted_route(&[0, 0])),
            message: "the sum of the weights must be greater than 0",
            reaches_the_state: [true, true],
        },
        Malformed {
            what: "weighted clusters above 32 bits",
            type_url: ROUTE,
            name: "80",
            any: pack_any(weighted_route(&[u32::MAX, 1])),
            message: "the sum of the weights overflows 32 bits",
            reaches_the_state: [true, true],
        },
        Malformed {
            what: "a listener with an unknown terminal filter",
            type_url: LISTENER,
            name: "0.0.0.0_8080",
            any: pack_any(unknown_filter),
            message: "filter_chains[0].filters[0]: unsupported network filter envoy.filters.network.mongo_proxy",
            reaches_the_state: [true, true],
        },
        Malformed {
            what: "an unparseable Any",
            type_url: CLUSTER,
            name: STATIC,
            // Field 1 (the name) claims 127 bytes and has 2.
            any: Any {
                type_url: CLUSTER.to_owned(),
                value: vec![0x0a, 0x7f, b'x', b'y'],
            },
            // Delta names it in its envelope, so the state fails to decode it; SotW names a
            // resource by its first field, so the client cannot even name it.
            message: "decode",
            reaches_the_state: [true, false],
        },
        Malformed {
            what: "an Any of the wrong type",
            type_url: CLUSTER,
            name: STATIC,
            any: pack_any(resources::route_to_cluster(STATIC, APP)),
            message: "has type type.googleapis.com/envoy.config.route.v3.RouteConfiguration, expected type.googleapis.com/envoy.config.cluster.v3.Cluster",
            reaches_the_state: [false, false],
        },
    ]
}

async fn malformed_resources_keep_the_previous_version(protocol: Protocol) {
    for case in malformed() {
        let what = case.what;
        let reaches_the_state = case.reaches_the_state[usize::from(protocol != Protocol::Delta)];
        let (cp, client, before) = synced(protocol).await;
        let bad = cp.push_named(case.type_url, vec![(case.name.to_owned(), case.any)]);
        let message = nacked(&cp, case.type_url, 1).await;
        assert!(
            message.contains(case.message),
            "{what}: NACK message {message:?} lacks {:?}",
            case.message
        );
        if reaches_the_state {
            assert!(
                message.contains(case.name),
                "{what}: NACK message {message:?} does not name {}",
                case.name
            );
        }
        {
            let state = client.sink.state.lock().unwrap();
            assert_eq!(
                state.active(),
                before,
                "{what}: the previous version serves"
            );
            assert!(state.initial_set_complete(), "{what}: readiness is kept");
            let error = error_state(&state, case.type_url, case.name);
            if reaches_the_state {
                let (version, details) = error.unwrap_or_else(|| panic!("{what}: no error state"));
                // Delta names the resource's version, SotW the response's: both are the push's.
                assert_eq!(version, bad, "{what}");
                assert!(details.contains(case.message), "{what}: {details}");
            } else {
                assert_eq!(error, None, "{what}: the envelope never reached the state");
            }
        }
        // The control plane puts it right: ACKed, applied, and the error is gone.
        push_mesh(&cp);
        let fixed = cp.version(case.type_url);
        acked(&cp, case.type_url, &fixed).await;
        let state = client.sink.state.lock().unwrap();
        assert_eq!(
            error_state(&state, case.type_url, case.name),
            None,
            "{what}"
        );
        assert_eq!(state.active(), before, "{what}: the same mesh again");
    }
}

#[tokio::test]
async fn delta_malformed_resources_are_nacked_and_the_previous_version_serves() {
    malformed_resources_keep_the_previous_version(Protocol::Delta).await;
}

#[tokio::test]
async fn sotw_malformed_resources_are_nacked_and_the_previous_version_serves() {
    malformed_resources_keep_the_previous_version(Protocol::StateOfTheWorld).await;
}

#[tokio::test]
async fn a_negative_weight_on_the_wire_is_read_as_envoy_reads_it() {
    // Weights are uint32: a control plane that writes -1 sends a ten-byte varint, which
    // protobuf (Envoy's C++ and prost alike) truncates to 32 bits: 4294967295, a valid
    // weight. Envoy 1.40 serves such an endpoint; so does portcullis.
    let cla = resources::assignment(APP, &[upstream()]);
    let mut bytes = Vec::new();
    let mut endpoint = cla.endpoints[0].lb_endpoints[0].encode_to_vec();
    // LbEndpoint.load_balancing_weight (4) = UInt32Value { value (1) = varint(-1) }.
    let minus_one: [u8; 11] = [
        0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
    ];
    endpoint.extend([0x22, minus_one.len() as u8]);
    endpoint.extend(minus_one);
    let mut locality = Vec::new();
    // LocalityLbEndpoints.lb_endpoints (2).
    locality.extend([0x12, endpoint.len() as u8]);
    locality.extend(endpoint);
    // ClusterLoadAssignment.cluster_name (1), endpoints (2).
    bytes.extend([0x0a, APP.len() as u8]);
    bytes.extend(APP.as_bytes());
    bytes.extend([0x12, locality.len() as u8]);
    bytes.extend(locality);
    let decoded = ClusterLoadAssignment::decode(bytes.as_slice()).unwrap();
    assert_eq!(
        decoded.endpoints[0].lb_endpoints[0].load_balancing_weight,
        Some(UInt32Value { value: u32::MAX })
    );

    let (cp, client, _) = synced(Protocol::Delta).await;
    let version = cp.push_named(
        ENDPOINT,
        vec![(
            APP.to_owned(),
            Any {
                type_url: ENDPOINT.to_owned(),
                value: bytes,
            },
        )],
    );
    acked(&cp, ENDPOINT, &version).await;
    let active = client.sink.active();
    assert_eq!(
        active.endpoints[APP].endpoints[0].lb_endpoints[0].load_balancing_weight,
        u32::MAX
    );
}

// --- warming ---

#[tokio::test]
async fn a_route_to_a_cluster_that_never_arrives_is_acked_not_warmed() {
    // Envoy applies the route and answers 503 NC for it at request time; it does not NACK
    // RDS, nor hold the listener back for clusters its routes name.
    for protocol in [Protocol::Delta, Protocol::StateOfTheWorld] {
        let (cp, client, before) = synced(protocol).await;
        let missing = "outbound|80||never.internal.com";
        let version = cp
            .push(
                ROUTE,
                vec![pack_any(resources::route_to_cluster("80", missing))],
            )
            .unwrap();
        acked(&cp, ROUTE, &version).await;
        let state = client.sink.state.lock().unwrap();
        let active = state.active();
        assert!(state.initial_set_complete());
        assert_eq!(active.listeners, before.listeners);
        assert_eq!(active.clusters, before.clusters);
        assert!(!active.clusters.contains_key(missing));
        assert_ne!(
            active.routes["80"], before.routes["80"],
            "the new route is in use"
        );
        assert_eq!(error_state(&state, ROUTE, "80"), None);
    }
}

// --- faults: a NACKed version stays NACKed across streams ---

#[tokio::test]
async fn a_nacked_resource_is_nacked_again_on_the_next_stream_and_never_applied() {
    for protocol in [Protocol::Delta, Protocol::StateOfTheWorld] {
        let (cp, client, before) = synced(protocol).await;
        cp.push_named(
            ENDPOINT,
            vec![(APP.to_owned(), pack_any(with_endpoint_ip("10.0.0.300")))],
        );
        nacked(&cp, ENDPOINT, 1).await;
        // Delta's initial_resource_versions claims the version it accepted, not the one it
        // refused, so the control plane sends the bad one again; SotW resumes from the
        // accepted version_info.
        cp.reset_streams();
        let message = nacked(&cp, ENDPOINT, 2).await;
        assert!(message.contains("malformed IP address"), "{message}");
        assert_eq!(client.sink.active(), before, "{protocol:?}");

        let streams = cp
            .events()
            .iter()
            .map(|e| e.stream)
            .max()
            .unwrap_or_default();
        let cp = cp.restart().await.unwrap();
        let message = nacked(&cp, ENDPOINT, streams + 1).await;
        assert!(message.contains("malformed IP address"), "{message}");
        assert_eq!(client.sink.active(), before, "{protocol:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_control_plane_silent_from_the_start_leaves_readiness_off_until_it_speaks() {
    let cp = start().await;
    cp.set_silent(true);
    push_mesh(&cp);
    let client = spawn_client(cp.local_addr(), Protocol::Delta);
    within(
        "the client's first requests",
        cp.wait_for(|e| {
            e.iter()
                .any(|e| matches!(&e.kind, EventKind::Request { type_url, .. } if type_url == LISTENER))
                .then_some(())
        }),
    )
    .await;
    // Far beyond the initial fetch timeout: with nothing received there is nothing to warm
    // and nothing to serve, and the stream stays up.
    tokio::time::sleep(Duration::from_secs(600)).await;
    {
        let state = client.sink.state.lock().unwrap();
        assert!(!state.initial_set_complete());
        assert_eq!(state.active(), Resources::default());
    }
    let streams: BTreeSet<u64> = cp.events().iter().map(|e| e.stream).collect();
    assert_eq!(streams.len(), 1, "one stream, never dropped");
    cp.set_silent(false);
    within("the first complete set", client.sink.wait(complete)).await;
}
