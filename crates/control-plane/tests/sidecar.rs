//! The sidecar config and pushes of `portcullis_control_plane::sidecar` are what portcullis's
//! xDS conversion accepts, and a client's ACKs of them are found in the log.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::Resource;

use portcullis_control_plane::sidecar::{Color, Sidecar, bulk};
use portcullis_control_plane::{ControlPlane, type_url};
use portcullis_xds::{
    Applied, Client, ClientConfig, NodeIdentity, NodeOverrides, Sink, Update, XdsStats,
};
use portcullis_xds_resources::XdsState;

fn sidecar() -> Sidecar {
    Sidecar::new(
        vec![
            "10.0.0.1:80".parse().unwrap(),
            "[fd00::1]:80".parse().unwrap(),
        ],
        vec!["10.0.0.2:80".parse().unwrap()],
    )
}

#[test]
fn portcullis_accepts_the_initial_config_the_small_pushes_and_the_bulk_push() {
    let sidecar = sidecar();
    let mut state = XdsState::default();
    let mut version = 0;
    let mut apply = |state: &mut XdsState, type_url: &str, resources: &[_]| {
        version += 1;
        let applied = state.apply_sotw(type_url, &version.to_string(), resources);
        assert_eq!(applied.error_detail(), None, "{type_url} rejected");
        applied
    };
    for push in sidecar.initial() {
        apply(&mut state, push.type_url, &push.resources);
    }
    assert!(state.initial_set_complete(), "nothing left warming");
    let active = state.active();
    assert_eq!(active.listeners.len(), 2);
    assert_eq!(active.clusters.len(), 4);
    assert_eq!(active.endpoints.len(), 2);
    assert_eq!(active.routes.len(), 1);

    for i in 0..100 {
        let small = sidecar.small(i);
        // EDS and RDS responses carry only what changed.
        apply(&mut state, small.push.type_url, &small.push.resources);
    }

    let [endpoints, clusters] = bulk(10_000);
    let all_endpoints: Vec<_> = endpoints.resources.clone();
    apply(&mut state, type_url::ENDPOINT, &all_endpoints);
    // CDS is the whole set in SotW: the first four and the bulk.
    let mut every_cluster = sidecar
        .initial()
        .into_iter()
        .find(|p| p.type_url == type_url::CLUSTER)
        .unwrap()
        .resources;
    every_cluster.extend(clusters.resources.iter().cloned());
    let applied = apply(&mut state, type_url::CLUSTER, &every_cluster);
    assert_eq!(applied.endpoints_needed.len(), 10_002);
    let active = state.active();
    assert_eq!(
        active.clusters.len(),
        10_004,
        "every EDS cluster has its endpoints"
    );
    assert_eq!(active.endpoints.len(), 10_002);
}

/// Takes every update, applied to an [`XdsState`] as portcullis does.
struct State(XdsState);

impl Sink for State {
    fn apply(&mut self, update: Update) -> Applied {
        let applied = if update.state_of_the_world {
            let resources: Vec<_> = update.resources.into_iter().map(|r| r.any).collect();
            self.0
                .apply_sotw(&update.type_url, &update.version, &resources)
        } else {
            let resources: Vec<_> = update
                .resources
                .into_iter()
                .map(|r| Resource {
                    name: r.name,
                    version: r.version,
                    resource: Some(r.any),
                    ..Resource::default()
                })
                .collect();
            self.0
                .apply_delta(&update.type_url, &resources, &update.removed)
        };
        Applied {
            rejected: applied
                .rejected
                .into_iter()
                .map(|r| portcullis_xds::Rejected {
                    name: r.name,
                    reason: r.reason,
                })
                .collect(),
            wants: [
                (type_url::ROUTE.to_owned(), applied.routes_needed),
                (type_url::ENDPOINT.to_owned(), applied.endpoints_needed),
            ]
            .into(),
        }
    }
}

#[tokio::test]
async fn wait_acked_finds_the_acks_of_each_push() {
    let sidecar = sidecar();
    let cp = ControlPlane::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let start = tokio::time::Instant::now();
    for push in sidecar.initial() {
        push.send(&cp).unwrap();
    }
    let node = NodeIdentity::from_env(
        [
            ("POD_NAME".to_owned(), "push-0".to_owned()),
            ("POD_NAMESPACE".to_owned(), "default".to_owned()),
            ("INSTANCE_IP".to_owned(), "10.0.0.9".to_owned()),
        ],
        &NodeOverrides::default(),
    );
    let client = Client::new(
        ClientConfig::new(format!("http://{}", cp.local_addr()), node.clone()),
        Arc::new(XdsStats::default()),
    )
    .unwrap();
    let task = tokio::spawn(client.run(State(XdsState::default())));
    let within = Duration::from_secs(20);
    for push in sidecar.initial() {
        tokio::time::timeout(
            within,
            cp.wait_acked(&node.id, push.type_url, &push.names, start),
        )
        .await
        .expect("ACKed in time")
        .expect("not NACKed");
    }
    for i in 0..6 {
        let small = sidecar.small(i);
        let at = tokio::time::Instant::now();
        small.push.send(&cp).unwrap();
        let acked = tokio::time::timeout(
            within,
            cp.wait_acked(&node.id, small.push.type_url, &small.push.names, at),
        )
        .await
        .expect("ACKed in time")
        .expect("not NACKed");
        assert!(acked >= at);
    }
    let at = tokio::time::Instant::now();
    let pushes = bulk(500);
    for push in &pushes {
        push.send(&cp).unwrap();
    }
    for push in &pushes {
        tokio::time::timeout(
            within,
            cp.wait_acked(&node.id, push.type_url, &push.names, at),
        )
        .await
        .expect("the bulk push is ACKed in time")
        .expect("not NACKed");
    }
    // A name never pushed is never ACKed.
    let never: BTreeSet<String> = [Color::Blue.cluster().to_owned() + "-never"].into();
    assert!(
        tokio::time::timeout(
            Duration::from_millis(300),
            cp.wait_acked(&node.id, type_url::ENDPOINT, &never, at)
        )
        .await
        .is_err()
    );
    task.abort();
}
