//! The ADS client against the test control plane on loopback.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use envoy_types::util::pack_any;
use portcullis_control_plane::{ControlPlane, Event, EventKind, resources};
use portcullis_xds::{
    Any, Applied, Backoff, Client, ClientConfig, NodeIdentity, NodeOverrides, Protocol, Rejected,
    Sink, Update, XdsStats, type_url,
};
use prost::Message;
use tokio::sync::watch;

const CLUSTER: &str = type_url::CLUSTER;
const LISTENER: &str = type_url::LISTENER;
const ENDPOINT: &str = type_url::ENDPOINT;
const ROUTE: &str = type_url::ROUTE;

// --- resources ---

fn eds_cluster(name: &str, connect_timeout_secs: i64) -> Any {
    let timeout = PbDuration {
        seconds: connect_timeout_secs,
        nanos: 0,
    };
    pack_any(resources::eds_cluster(name, timeout))
}

fn rds_listener(name: &str, route: &str) -> Any {
    pack_any(resources::rds_listener(name, None, route))
}

fn assignment(cluster: &str) -> Any {
    pack_any(resources::assignment(cluster, &[]))
}

fn route(name: &str) -> Any {
    pack_any(resources::route_configuration(name))
}

// --- a sink that decodes what it gets, as the real one will ---

#[derive(Debug, Default)]
struct Held {
    /// type URL → name → version.
    resources: BTreeMap<String, BTreeMap<String, String>>,
    updates: Vec<Update>,
    disconnects: usize,
}

impl Held {
    fn names(&self, type_url: &str) -> BTreeSet<String> {
        self.resources
            .get(type_url)
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default()
    }
}

#[derive(Clone)]
struct TestSink {
    held: Arc<Mutex<Held>>,
    changed: Arc<watch::Sender<u64>>,
}

impl TestSink {
    fn new() -> Self {
        Self {
            held: Arc::default(),
            changed: Arc::new(watch::channel(0).0),
        }
    }

    async fn wait<T>(&self, mut check: impl FnMut(&Held) -> Option<T>) -> T {
        let mut changed = self.changed.subscribe();
        loop {
            if let Some(found) = check(&self.held.lock().unwrap()) {
                return found;
            }
            changed.changed().await.unwrap();
        }
    }
}

fn check(update: &portcullis_xds::Resource) -> Result<(), String> {
    let bytes = update.any.value.as_slice();
    match update.any.type_url.as_str() {
        CLUSTER => {
            let cluster = Cluster::decode(bytes).map_err(|e| e.to_string())?;
            if cluster.connect_timeout.is_some_and(|d| d.seconds < 0) {
                return Err("connect_timeout must not be negative".to_owned());
            }
        }
        LISTENER => drop(Listener::decode(bytes).map_err(|e| e.to_string())?),
        ENDPOINT => drop(ClusterLoadAssignment::decode(bytes).map_err(|e| e.to_string())?),
        ROUTE => drop(RouteConfiguration::decode(bytes).map_err(|e| e.to_string())?),
        other => return Err(format!("unexpected type {other}")),
    }
    Ok(())
}

impl Sink for TestSink {
    fn apply(&mut self, update: Update) -> Applied {
        let mut held = self.held.lock().unwrap();
        let mut rejected = Vec::new();
        let of_type = held.resources.entry(update.type_url.clone()).or_default();
        for resource in &update.resources {
            match check(resource) {
                Ok(()) => {
                    of_type.insert(resource.name.clone(), resource.version.clone());
                }
                Err(reason) => rejected.push(Rejected {
                    name: resource.name.clone(),
                    reason,
                }),
            }
        }
        for name in &update.removed {
            of_type.remove(name);
        }
        held.updates.push(update);
        // EDS names are the held clusters', RDS names the held listeners' route configs.
        let clusters = held.names(CLUSTER);
        let routes = held
            .resources
            .get(LISTENER)
            .map(|l| l.keys().map(|name| format!("{name}-routes")).collect())
            .unwrap_or_default();
        drop(held);
        self.changed.send_modify(|n| *n += 1);
        Applied {
            rejected,
            wants: BTreeMap::from([
                (ENDPOINT.to_owned(), clusters.into_iter().collect()),
                (ROUTE.to_owned(), routes),
            ]),
        }
    }

    fn disconnected(&mut self) {
        self.held.lock().unwrap().disconnects += 1;
        self.changed.send_modify(|n| *n += 1);
    }
}

// --- harness ---

fn node() -> NodeIdentity {
    let env = [
        ("POD_NAME", "app-0"),
        ("POD_NAMESPACE", "default"),
        ("INSTANCE_IP", "10.0.0.7"),
        ("ISTIO_META_CLUSTER_ID", "Kubernetes"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    NodeIdentity::from_env(env, &NodeOverrides::default())
}

const NODE_ID: &str = "sidecar~10.0.0.7~app-0.default~default.svc.cluster.local";

fn config(addr: SocketAddr, protocol: Protocol) -> ClientConfig {
    let mut config = ClientConfig::new(format!("http://{addr}"), node());
    config.protocol = protocol;
    config.token_file = "/nonexistent/istio-token".into();
    config
}

struct Running {
    sink: TestSink,
    stats: Arc<XdsStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn spawn_client(config: ClientConfig, backoff: Option<Backoff>) -> Running {
    let sink = TestSink::new();
    let stats = Arc::new(XdsStats::default());
    let mut client = Client::new(config, stats.clone()).expect("valid config");
    if let Some(backoff) = backoff {
        client = client.with_backoff(backoff);
    }
    let task = tokio::spawn({
        let sink = sink.clone();
        async move { match client.run(sink).await {} }
    });
    Running { sink, stats, task }
}

async fn start() -> ControlPlane {
    ControlPlane::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .expect("control plane starts")
}

/// Bounds a wait; generous, since under the paused clock it is virtual time and eight
/// reconnect delays may add up to 90 s.
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(300), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn acks(events: &[Event], type_url: &str) -> Vec<(String, String)> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Ack {
                type_url: t,
                version,
                nonce,
            } if t == type_url => Some((version.clone(), nonce.clone())),
            _ => None,
        })
        .collect()
}

/// Waits for the ACK of the given version of a type.
async fn acked(cp: &ControlPlane, type_url: &str, version: &str) {
    let what = format!("ACK of {type_url} {version}");
    within(
        &what,
        cp.wait_for(|e| {
            acks(e, type_url)
                .iter()
                .any(|(v, _)| v == version)
                .then_some(())
        }),
    )
    .await;
}

fn sent(events: &[Event], type_url: &str) -> Vec<(String, String)> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Sent {
                type_url: t,
                version,
                nonce,
                ..
            } if t == type_url => Some((version.clone(), nonce.clone())),
            _ => None,
        })
        .collect()
}

fn push_mesh(cp: &ControlPlane) {
    cp.push(CLUSTER, vec![eds_cluster("outbound|80||a.svc", 1)])
        .unwrap();
    cp.push(LISTENER, vec![rds_listener("0.0.0.0_80", "80")])
        .unwrap();
    cp.push(ENDPOINT, vec![assignment("outbound|80||a.svc")])
        .unwrap();
    cp.push(ROUTE, vec![route("0.0.0.0_80-routes")]).unwrap();
}

fn synced(held: &Held) -> Option<()> {
    (held.names(CLUSTER).len() == 1
        && held.names(LISTENER).len() == 1
        && held.names(ENDPOINT).len() == 1
        && held.names(ROUTE).len() == 1)
        .then_some(())
}

async fn first_sync(protocol: Protocol) {
    let cp = start().await;
    push_mesh(&cp);
    let client = spawn_client(config(cp.local_addr(), protocol), None);
    within("all four types", client.sink.wait(synced)).await;
    let events = within(
        "four ACKs",
        cp.wait_for(|events| {
            type_url::ALL
                .iter()
                .all(|t| !acks(events, t).is_empty())
                .then(|| events.to_vec())
        }),
    )
    .await;

    let connected = events
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::Connected { delta, node, .. } => Some((*delta, node.clone())),
            _ => None,
        })
        .unwrap();
    assert_eq!(connected.0, protocol == Protocol::Delta);
    let node = connected.1.expect("the first request carries the node");
    assert_eq!(node.id, NODE_ID);
    assert_eq!(node.cluster, "istio-proxy.default");
    let nodes_sent = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Connected { .. }))
        .count();
    assert_eq!(nodes_sent, 1);

    // Envoy's order: CDS and LDS first, EDS and RDS once clusters and listeners name them.
    let requested: Vec<&str> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Request { type_url, .. } => Some(type_url.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(&requested[..2], [CLUSTER, LISTENER]);
    let first_eds = requested.iter().position(|t| *t == ENDPOINT).unwrap();
    let first_cds_sent = events
        .iter()
        .position(|e| matches!(&e.kind, EventKind::Sent { type_url, .. } if type_url == CLUSTER))
        .unwrap();
    let first_eds_request = events
        .iter()
        .position(
            |e| matches!(&e.kind, EventKind::Request { type_url, .. } if type_url == ENDPOINT),
        )
        .unwrap();
    assert!(first_eds > 1 && first_eds_request > first_cds_sent);

    // Each ACK names the nonce of the response it answers, and its version.
    for t in type_url::ALL {
        let sent = sent(&events, t);
        let acked = acks(&events, t);
        assert_eq!(acked.last(), sent.last(), "{t}: {sent:?} vs {acked:?}");
    }
    assert_eq!(client.stats.connected_state.load(Ordering::Relaxed), 1);
    assert_eq!(client.stats.cds.update_success.load(Ordering::Relaxed), 1);
    assert_eq!(client.stats.lds.update_rejected.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn delta_first_sync() {
    first_sync(Protocol::Delta).await;
}

#[tokio::test]
async fn sotw_first_sync() {
    first_sync(Protocol::StateOfTheWorld).await;
}

async fn nack_keeps_the_previous_version(protocol: Protocol) {
    let cp = start().await;
    let v1 = cp.push(CLUSTER, vec![eds_cluster("good", 1)]).unwrap();
    let client = spawn_client(config(cp.local_addr(), protocol), None);
    within(
        "good cluster",
        client
            .sink
            .wait(|h| h.names(CLUSTER).contains("good").then_some(())),
    )
    .await;
    acked(&cp, CLUSTER, &v1).await;

    let v2 = cp
        .push(
            CLUSTER,
            vec![eds_cluster("bad", -5), eds_cluster("other", 2)],
        )
        .unwrap();
    let (version, nonce, error) = within(
        "NACK",
        cp.wait_for(|events| {
            events.iter().find_map(|e| match &e.kind {
                EventKind::Nack {
                    type_url,
                    version,
                    nonce,
                    error,
                } if type_url == CLUSTER => Some((version.clone(), nonce.clone(), error.clone())),
                _ => None,
            })
        }),
    )
    .await;
    assert_eq!(error.code, 3, "INVALID_ARGUMENT");
    assert_eq!(
        error.message,
        "Error adding/updating cluster(s) bad: connect_timeout must not be negative"
    );
    let events = cp.events();
    assert_eq!(sent(&events, CLUSTER).last().unwrap().1, nonce);
    if protocol == Protocol::StateOfTheWorld {
        assert_eq!(version, v1, "a SotW NACK carries the last accepted version");
    } else {
        assert_eq!(
            version, v2,
            "the control plane logs the rejected response's version"
        );
    }
    {
        let held = client.sink.held.lock().unwrap();
        assert_eq!(
            held.names(CLUSTER),
            BTreeSet::from(["good".into(), "other".into()])
        );
        // Delta resends only what changed; SotW resends everything at the response's version.
        let good = if protocol == Protocol::Delta {
            &v1
        } else {
            &v2
        };
        assert_eq!(&held.resources[CLUSTER]["good"], good);
    }
    assert_eq!(client.stats.cds.update_rejected.load(Ordering::Relaxed), 1);

    // A later good push is ACKed with its own version.
    let v3 = cp.push(CLUSTER, vec![eds_cluster("bad", 3)]).unwrap();
    acked(&cp, CLUSTER, &v3).await;
}

#[tokio::test]
async fn delta_nack_names_the_resource_and_keeps_the_version() {
    nack_keeps_the_previous_version(Protocol::Delta).await;
}

#[tokio::test]
async fn sotw_nack_names_the_resource_and_keeps_the_version() {
    nack_keeps_the_previous_version(Protocol::StateOfTheWorld).await;
}

async fn first_nack(cp: &ControlPlane, type_url: &str) -> String {
    within(
        "NACK",
        cp.wait_for(|events| {
            events.iter().find_map(|e| match &e.kind {
                EventKind::Nack {
                    type_url: t, error, ..
                } if t == type_url => Some(error.message.clone()),
                _ => None,
            })
        }),
    )
    .await
}

#[tokio::test]
async fn a_bad_envelope_is_nacked_and_the_stream_goes_on() {
    for protocol in [Protocol::Delta, Protocol::StateOfTheWorld] {
        let cp = start().await;
        let listener_as_cluster = Any {
            type_url: LISTENER.to_owned(),
            value: Listener::default().encode_to_vec(),
        };
        cp.push_named(
            CLUSTER,
            vec![("mislabelled".to_owned(), listener_as_cluster)],
        );
        let client = spawn_client(config(cp.local_addr(), protocol), None);
        let message = first_nack(&cp, CLUSTER).await;
        assert!(
            message.contains("has type type.googleapis.com/envoy.config.listener.v3.Listener"),
            "{message}"
        );
        assert!(
            client
                .sink
                .held
                .lock()
                .unwrap()
                .updates
                .iter()
                .all(|u| u.type_url != CLUSTER)
        );

        cp.remove(CLUSTER, &["mislabelled"]);
        cp.push(CLUSTER, vec![eds_cluster("fine", 1)]).unwrap();
        within(
            "the next push",
            client
                .sink
                .wait(|h| h.names(CLUSTER).contains("fine").then_some(())),
        )
        .await;
    }

    // SotW names a resource by its first field: bytes that do not decode cannot be named.
    let cp = start().await;
    let garbage = Any {
        type_url: CLUSTER.to_owned(),
        value: vec![0x0a, 0xff, 0xff],
    };
    cp.push_named(CLUSTER, vec![("garbage".to_owned(), garbage)]);
    let _client = spawn_client(config(cp.local_addr(), Protocol::StateOfTheWorld), None);
    let message = first_nack(&cp, CLUSTER).await;
    assert!(
        message.starts_with("Error processing the response: resource 0 does not decode"),
        "{message}"
    );
}

#[tokio::test]
async fn delta_undecodable_resource_is_nacked_by_the_sink() {
    let cp = start().await;
    let garbage = Any {
        type_url: CLUSTER.to_owned(),
        value: vec![0x0a, 0xff, 0xff],
    };
    cp.push_named(CLUSTER, vec![("garbage".to_owned(), garbage)]);
    let _client = spawn_client(config(cp.local_addr(), Protocol::Delta), None);
    let message = first_nack(&cp, CLUSTER).await;
    assert!(
        message.starts_with("Error adding/updating cluster(s) garbage: "),
        "{message}"
    );
}

async fn removal(protocol: Protocol) {
    let cp = start().await;
    cp.push(CLUSTER, vec![eds_cluster("a", 1), eds_cluster("b", 1)])
        .unwrap();
    let client = spawn_client(config(cp.local_addr(), protocol), None);
    within(
        "a and b",
        client
            .sink
            .wait(|h| (h.names(CLUSTER).len() == 2).then_some(())),
    )
    .await;
    cp.remove(CLUSTER, &["a"]);
    within(
        "a removed",
        client
            .sink
            .wait(|h| (h.names(CLUSTER) == BTreeSet::from(["b".to_owned()])).then_some(())),
    )
    .await;
    let held = client.sink.held.lock().unwrap();
    let last = held
        .updates
        .iter()
        .rev()
        .find(|u| u.type_url == CLUSTER)
        .unwrap();
    assert_eq!(last.removed, ["a"]);
    assert_eq!(
        last.state_of_the_world,
        protocol == Protocol::StateOfTheWorld
    );
    if protocol == Protocol::StateOfTheWorld {
        assert_eq!(last.resources.len(), 1, "the full set: b");
    } else {
        assert!(last.resources.is_empty(), "Delta sends only the removal");
    }
}

#[tokio::test]
async fn delta_removed_resources_reach_the_sink() {
    removal(Protocol::Delta).await;
}

#[tokio::test]
async fn sotw_missing_resources_are_removed() {
    removal(Protocol::StateOfTheWorld).await;
}

async fn subscriptions_follow_the_sink(protocol: Protocol) {
    let cp = start().await;
    cp.push(CLUSTER, vec![eds_cluster("a", 1)]).unwrap();
    cp.push(
        ENDPOINT,
        vec![assignment("a"), assignment("b"), assignment("c")],
    )
    .unwrap();
    let client = spawn_client(config(cp.local_addr(), protocol), None);
    within(
        "EDS of a",
        client
            .sink
            .wait(|h| h.names(ENDPOINT).contains("a").then_some(())),
    )
    .await;
    assert_eq!(
        client.sink.held.lock().unwrap().names(ENDPOINT),
        BTreeSet::from(["a".to_owned()])
    );

    cp.push(CLUSTER, vec![eds_cluster("b", 1)]).unwrap();
    within(
        "EDS of b",
        client
            .sink
            .wait(|h| h.names(ENDPOINT).contains("b").then_some(())),
    )
    .await;
    cp.remove(CLUSTER, &["a"]);
    let requests = within(
        "unsubscribe a",
        cp.wait_for(|events| {
            let requests: Vec<(Vec<String>, Vec<String>)> = events
                .iter()
                .filter_map(|e| match &e.kind {
                    EventKind::Request {
                        type_url,
                        names,
                        unsubscribe,
                        ..
                    } if type_url == ENDPOINT => Some((names.clone(), unsubscribe.clone())),
                    _ => None,
                })
                .collect();
            let done = match protocol {
                Protocol::Delta => requests.iter().any(|(_, u)| u == &["a"]),
                Protocol::StateOfTheWorld => requests.last().is_some_and(|(n, _)| n == &["b"]),
            };
            done.then_some(requests)
        }),
    )
    .await;
    if protocol == Protocol::Delta {
        assert_eq!(requests[0].0, ["a"]);
        assert!(requests.iter().any(|(s, _)| s == &["b"]));
    } else {
        assert_eq!(requests[0].0, ["a"]);
        assert!(requests.iter().any(|(n, _)| n == &["a", "b"]));
    }
    // c was never wanted: never sent.
    cp.push(ENDPOINT, vec![assignment("c")]).unwrap();
    cp.push(ENDPOINT, vec![assignment("b")]).unwrap();
    let eds_v = cp.version(ENDPOINT);
    within(
        "EDS ACK",
        cp.wait_for(|e| {
            acks(e, ENDPOINT)
                .iter()
                .any(|(v, _)| *v == eds_v)
                .then_some(())
        }),
    )
    .await;
    let never_c = cp.events().iter().all(
        |e| !matches!(&e.kind, EventKind::Sent { names, .. } if names.contains(&"c".to_owned())),
    );
    assert!(never_c);
    assert!(
        !client
            .sink
            .held
            .lock()
            .unwrap()
            .names(ENDPOINT)
            .contains("c")
    );
}

#[tokio::test]
async fn delta_eds_subscriptions_follow_the_sink() {
    subscriptions_follow_the_sink(Protocol::Delta).await;
}

#[tokio::test]
async fn sotw_eds_subscriptions_follow_the_sink() {
    subscriptions_follow_the_sink(Protocol::StateOfTheWorld).await;
}

#[tokio::test]
async fn rds_subscription_follows_the_listeners() {
    let cp = start().await;
    cp.push(LISTENER, vec![rds_listener("l1", "l1-routes")])
        .unwrap();
    cp.push(ROUTE, vec![route("l1-routes"), route("l2-routes")])
        .unwrap();
    let client = spawn_client(config(cp.local_addr(), Protocol::Delta), None);
    within(
        "RDS l1",
        client
            .sink
            .wait(|h| h.names(ROUTE).contains("l1-routes").then_some(())),
    )
    .await;
    assert!(
        !client
            .sink
            .held
            .lock()
            .unwrap()
            .names(ROUTE)
            .contains("l2-routes")
    );
    cp.push(LISTENER, vec![rds_listener("l2", "l2-routes")])
        .unwrap();
    within(
        "RDS l2",
        client
            .sink
            .wait(|h| h.names(ROUTE).contains("l2-routes").then_some(())),
    )
    .await;
}

fn streams_connected(events: &[Event]) -> Vec<(u64, tokio::time::Instant)> {
    events
        .iter()
        .filter(|e| {
            matches!(
                e.kind,
                EventKind::Connected { .. } | EventKind::Refused { .. }
            )
        })
        .map(|e| (e.stream, e.at))
        .collect()
}

fn initial_versions(
    events: &[Event],
    stream: u64,
    type_url: &str,
) -> Option<BTreeMap<String, String>> {
    events.iter().find_map(|e| match &e.kind {
        EventKind::Request {
            type_url: t,
            initial_resource_versions,
            ..
        } if e.stream == stream && t == type_url => Some(initial_resource_versions.clone()),
        _ => None,
    })
}

#[tokio::test(start_paused = true)]
async fn delta_reconnects_after_a_reset_with_initial_resource_versions() {
    let cp = start().await;
    push_mesh(&cp);
    let client = spawn_client(config(cp.local_addr(), Protocol::Delta), None);
    within("sync", client.sink.wait(synced)).await;
    let cluster_version = cp.version(CLUSTER);
    within(
        "EDS ACK",
        cp.wait_for(|e| (!acks(e, ENDPOINT).is_empty()).then_some(())),
    )
    .await;

    cp.reset_streams();
    let events = within(
        "second stream",
        cp.wait_for(|events| {
            (initial_versions(events, 2, ENDPOINT).is_some()
                && initial_versions(events, 2, ROUTE).is_some())
            .then(|| events.to_vec())
        }),
    )
    .await;
    let closed_at = events
        .iter()
        .find(|e| e.stream == 1 && matches!(e.kind, EventKind::Closed { .. }))
        .unwrap()
        .at;
    let reconnected_at = streams_connected(&events)[1].1;
    assert!(
        reconnected_at - closed_at <= Duration::from_millis(500),
        "the first retry after a stream that delivered is within the base: {:?}",
        reconnected_at - closed_at
    );
    assert_eq!(
        initial_versions(&events, 2, CLUSTER).unwrap(),
        BTreeMap::from([("outbound|80||a.svc".to_owned(), cluster_version)])
    );
    assert_eq!(
        initial_versions(&events, 2, ENDPOINT)
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["outbound|80||a.svc"]
    );
    {
        let held = client.sink.held.lock().unwrap();
        assert_eq!(held.disconnects, 1);
        assert!(synced(&held).is_some(), "a lost stream clears nothing");
    }
    // The control plane knew every version: nothing is resent, and the stream still works.
    let v = cp.push(CLUSTER, vec![eds_cluster("new", 1)]).unwrap();
    within(
        "ACK on stream 2",
        cp.wait_for(|e| {
            e.iter()
                .any(|e| {
                    e.stream == 2
                        && matches!(&e.kind, EventKind::Ack { version, .. } if *version == v)
                })
                .then_some(())
        }),
    )
    .await;
    let resent_on_2: Vec<_> = cp
        .events()
        .into_iter()
        .filter(|e| e.stream == 2)
        .filter_map(|e| match e.kind {
            EventKind::Sent { names, .. } => Some(names),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(resent_on_2, ["new"]);
    assert_eq!(client.stats.cds.update_failure.load(Ordering::Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn backoff_grows_while_refused_and_resets_after_a_response() {
    let cp = start().await;
    cp.push(CLUSTER, vec![eds_cluster("a", 1)]).unwrap();
    cp.refuse_connections(true);
    let client = spawn_client(config(cp.local_addr(), Protocol::StateOfTheWorld), None);
    let attempts = within(
        "eight refused attempts",
        cp.wait_for(|events| {
            let attempts = streams_connected(events);
            (attempts.len() >= 8).then_some(attempts)
        }),
    )
    .await;
    // Envoy's ceilings: (2^n - 1) x 500 ms, capped at 30 s; full jitter below them.
    let ceilings = [500, 1500, 3500, 7500, 15500, 30000, 30000];
    for (pair, ceiling) in attempts.windows(2).zip(ceilings) {
        let gap = pair[1].1 - pair[0].1;
        assert!(
            gap < Duration::from_millis(ceiling),
            "{gap:?} >= {ceiling} ms"
        );
    }
    assert!(
        client.sink.held.lock().unwrap().disconnects >= 7,
        "each refused stream had been opened"
    );

    cp.refuse_connections(false);
    within(
        "sync",
        client
            .sink
            .wait(|h| (!h.names(CLUSTER).is_empty()).then_some(())),
    )
    .await;
    let last_attempt = cp
        .events()
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Connected { .. }))
        .count();
    assert_eq!(last_attempt, 1);
    cp.reset_streams();
    let events = within(
        "reconnect",
        cp.wait_for(|events| {
            (events
                .iter()
                .filter(|e| matches!(e.kind, EventKind::Connected { .. }))
                .count()
                == 2)
                .then(|| events.to_vec())
        }),
    )
    .await;
    let closed = events
        .iter()
        .rev()
        .find(|e| matches!(e.kind, EventKind::Closed { .. }))
        .unwrap()
        .at;
    let again = events
        .iter()
        .rev()
        .find(|e| matches!(e.kind, EventKind::Connected { .. }))
        .unwrap()
        .at;
    assert!(
        again - closed <= Duration::from_millis(500),
        "{:?}",
        again - closed
    );
}

#[tokio::test(start_paused = true)]
async fn sotw_survives_a_control_plane_restart() {
    let cp = start().await;
    let v1 = cp.push(CLUSTER, vec![eds_cluster("a", 1)]).unwrap();
    let client = spawn_client(config(cp.local_addr(), Protocol::StateOfTheWorld), None);
    within(
        "ACK",
        cp.wait_for(|e| (!acks(e, CLUSTER).is_empty()).then_some(())),
    )
    .await;

    let cp = cp.restart().await.unwrap();
    let request = within(
        "stream 2's CDS request",
        cp.wait_for(|events| {
            events.iter().find_map(|e| match &e.kind {
                EventKind::Request { type_url, .. } if e.stream > 1 && type_url == CLUSTER => {
                    Some(e.clone())
                }
                _ => None,
            })
        }),
    )
    .await;
    // SotW resumes from the accepted version; the control plane may answer or not.
    let events = cp.events();
    let acked_v1 = events.iter().any(|e| {
        e.stream == request.stream
            && matches!(&e.kind, EventKind::Ack { version, .. } if *version == v1)
    });
    assert!(acked_v1 || sent(&events, CLUSTER).len() >= 2);
    assert!(
        client
            .sink
            .held
            .lock()
            .unwrap()
            .names(CLUSTER)
            .contains("a")
    );
    let v2 = cp.push(CLUSTER, vec![eds_cluster("b", 1)]).unwrap();
    acked(&cp, CLUSTER, &v2).await;
}

async fn stale_nonce_is_ignored(protocol: Protocol) {
    let cp = start().await;
    let v1 = cp.push(CLUSTER, vec![eds_cluster("a", 1)]).unwrap();
    let client = spawn_client(config(cp.local_addr(), protocol), None);
    acked(&cp, CLUSTER, &v1).await;

    cp.send_stale_nonce(CLUSTER);
    let v2 = cp
        .push(CLUSTER, vec![eds_cluster("a", 2), eds_cluster("b", 1)])
        .unwrap();
    let replayed = within(
        "replay",
        cp.wait_for(|events| {
            events.iter().find_map(|e| match &e.kind {
                EventKind::Replayed { nonce, .. } => Some(nonce.clone()),
                _ => None,
            })
        }),
    )
    .await;
    acked(&cp, CLUSTER, &v2).await;
    let v3 = cp.push(CLUSTER, vec![eds_cluster("c", 1)]).unwrap();
    acked(&cp, CLUSTER, &v3).await;

    let events = cp.events();
    assert!(
        events
            .iter()
            .all(|e| !matches!(&e.kind, EventKind::Stale { .. })),
        "the client never answered the replay"
    );
    assert_eq!(
        acks(&events, CLUSTER)
            .iter()
            .filter(|(_, n)| *n == replayed)
            .count(),
        1,
        "only the original was ACKed"
    );
    let held = client.sink.held.lock().unwrap();
    assert_eq!(
        held.names(CLUSTER),
        BTreeSet::from(["a".into(), "b".into(), "c".into()])
    );
    let expected_a = if protocol == Protocol::Delta { v2 } else { v3 };
    assert_eq!(
        held.resources[CLUSTER]["a"], expected_a,
        "the replayed v1 did not roll a back"
    );
}

#[tokio::test]
async fn delta_stale_nonce_is_ignored() {
    stale_nonce_is_ignored(Protocol::Delta).await;
}

#[tokio::test]
async fn sotw_stale_nonce_is_ignored() {
    stale_nonce_is_ignored(Protocol::StateOfTheWorld).await;
}

#[tokio::test(start_paused = true)]
async fn silence_clears_nothing() {
    let cp = start().await;
    let v1 = cp.push(CLUSTER, vec![eds_cluster("a", 1)]).unwrap();
    let client = spawn_client(config(cp.local_addr(), Protocol::Delta), None);
    acked(&cp, CLUSTER, &v1).await;
    cp.set_silent(true);
    let v2 = cp.push(CLUSTER, vec![eds_cluster("b", 1)]).unwrap();
    tokio::time::sleep(Duration::from_secs(3600)).await;
    {
        let held = client.sink.held.lock().unwrap();
        assert_eq!(held.names(CLUSTER), BTreeSet::from(["a".into()]));
        assert_eq!(held.disconnects, 0);
    }
    assert_eq!(client.stats.connected_state.load(Ordering::Relaxed), 1);
    cp.set_silent(false);
    acked(&cp, CLUSTER, &v2).await;
    assert!(
        client
            .sink
            .held
            .lock()
            .unwrap()
            .names(CLUSTER)
            .contains("b")
    );
}

// --- TLS and the token ---

#[path = "../../control-plane/tests/support/pki.rs"]
mod pki;
use pki::pki;

fn fast() -> Option<Backoff> {
    Some(Backoff::new(
        Duration::from_millis(20),
        Duration::from_millis(100),
    ))
}

fn authorization(events: &[Event]) -> Option<Option<String>> {
    events.iter().find_map(|e| match &e.kind {
        EventKind::Connected { authorization, .. } => Some(authorization.clone()),
        _ => None,
    })
}

#[tokio::test]
async fn tls_verified_against_the_root_with_the_bearer_token() {
    let pki = pki();
    let cp = ControlPlane::start("127.0.0.1:0".parse().unwrap(), Some(pki.server.clone()))
        .await
        .unwrap();
    cp.push(CLUSTER, vec![eds_cluster("a", 1)]).unwrap();
    let token = pki.dir.path().join("istio-token");
    std::fs::write(&token, "eyJhbGciOi.first\n").unwrap();
    let mut config = config(cp.local_addr(), Protocol::Delta);
    config.address = format!("https://{}", cp.local_addr());
    config.root_cert = Some(pki.dir.path().join("root-cert.pem"));
    config.token_file = token.clone();
    let client = spawn_client(config, fast());
    within(
        "sync over TLS",
        client
            .sink
            .wait(|h| (!h.names(CLUSTER).is_empty()).then_some(())),
    )
    .await;
    assert_eq!(
        authorization(&cp.events()),
        Some(Some("Bearer eyJhbGciOi.first".to_owned()))
    );

    // The token rotates; the next connection sends the new one.
    std::fs::write(&token, "eyJhbGciOi.second").unwrap();
    cp.reset_streams();
    let second = within(
        "reconnect",
        cp.wait_for(|events| {
            events
                .iter()
                .filter_map(|e| match &e.kind {
                    EventKind::Connected { authorization, .. } if e.stream > 1 => {
                        Some(authorization.clone())
                    }
                    _ => None,
                })
                .next()
        }),
    )
    .await;
    assert_eq!(second.as_deref(), Some("Bearer eyJhbGciOi.second"));
}

#[tokio::test]
async fn tls_rejects_a_server_the_root_did_not_sign() {
    let pki = pki();
    let other = pki::pki();
    let cp = ControlPlane::start("127.0.0.1:0".parse().unwrap(), Some(other.server))
        .await
        .unwrap();
    let token = pki.dir.path().join("istio-token");
    std::fs::write(&token, "t").unwrap();
    let mut config = config(cp.local_addr(), Protocol::Delta);
    config.address = format!("https://{}", cp.local_addr());
    config.root_cert = Some(pki.dir.path().join("root-cert.pem"));
    config.token_file = token;
    let client = spawn_client(config, fast());
    within("retries", async {
        while client.stats.cds.update_failure.load(Ordering::Relaxed) < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(cp.events().is_empty(), "no stream reached the server");
}

#[tokio::test]
async fn a_missing_token_blocks_tls_until_it_appears() {
    let pki = pki();
    let cp = ControlPlane::start("127.0.0.1:0".parse().unwrap(), Some(pki.server.clone()))
        .await
        .unwrap();
    cp.push(CLUSTER, vec![eds_cluster("a", 1)]).unwrap();
    let token = pki.dir.path().join("istio-token");
    let mut config = config(cp.local_addr(), Protocol::Delta);
    config.address = format!("https://{}", cp.local_addr());
    config.root_cert = Some(pki.dir.path().join("root-cert.pem"));
    config.token_file = token.clone();
    let client = spawn_client(config, fast());
    within("retries", async {
        while client.stats.cds.update_failure.load(Ordering::Relaxed) < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(cp.events().is_empty(), "no stream without the token");
    std::fs::write(&token, "late").unwrap();
    within(
        "sync",
        client
            .sink
            .wait(|h| (!h.names(CLUSTER).is_empty()).then_some(())),
    )
    .await;
    assert_eq!(
        authorization(&cp.events()),
        Some(Some("Bearer late".to_owned()))
    );
}

#[tokio::test]
async fn plaintext_connects_without_a_token() {
    let cp = start().await;
    cp.push(CLUSTER, vec![eds_cluster("a", 1)]).unwrap();
    let client = spawn_client(config(cp.local_addr(), Protocol::Delta), None);
    within(
        "sync",
        client
            .sink
            .wait(|h| (!h.names(CLUSTER).is_empty()).then_some(())),
    )
    .await;
    assert_eq!(authorization(&cp.events()), Some(None));
}
