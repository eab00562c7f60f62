//! DestinationRule `consistentHash` compiled as istiod compiles it: the cluster's
//! `lb_policy` and ring or Maglev config (`ApplyRingHashLoadBalancer`), the route's
//! `hash_policy` (`consistentHashToHashPolicy`), and retries that keep to the hashed host.

use std::time::Duration;

use portcullis_envoy::{
    ClusterSpecifier, Forward, HashKey, HashPolicy, LbPolicy, Resources, RouteAction,
};

use super::load;
use crate::BuildOptions;
use crate::build::compile;

const API: &str = "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: default}
spec:
  hosts: [api.example.com]
  ports:
  - {number: 80, name: http, protocol: HTTP}
  - {number: 8080, name: http-alt, protocol: HTTP}
  resolution: STATIC
  endpoints:
  - {address: 10.1.0.1, labels: {version: v1}}
  - {address: 10.1.0.2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: default}
spec:
  host: api.example.com
  trafficPolicy:
    loadBalancer:
      consistentHash: {httpHeaderName: X-User, ringHash: {minimumRingSize: 2048}}
    portLevelSettings:
    - port: {number: 8080}
      loadBalancer: {consistentHash: {useSourceIp: true, minimumRingSize: 64}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer:
        consistentHash:
          httpCookie: {name: session, path: /, ttl: 30s, attributes: [{name: SameSite, value: Strict}, {name: Secure}]}
          maglev: {tableSize: 257}
";

const SPLIT: &str = "
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: default}
spec:
  hosts: [api.example.com]
  http:
  - name: pinned
    match: [{uri: {prefix: /v2}}]
    route: [{destination: {host: api.example.com, subset: v2}}]
  - name: split
    route:
    - {destination: {host: api.example.com, subset: v1}, weight: 50}
    - {destination: {host: api.example.com, subset: v2}, weight: 50}
";

fn compiled(yaml: &str) -> Resources {
    let out = compile(&load(yaml), &BuildOptions::default(), &|_| None);
    assert!(out.warnings.is_empty(), "{:#?}", out.warnings);
    out.resources
}

fn forward<'a>(r: &'a Resources, table: &str, vhost: &str, route: &str) -> &'a Forward {
    let vh = r.routes[table]
        .virtual_hosts
        .iter()
        .find(|v| v.name == vhost)
        .unwrap_or_else(|| panic!("no virtual host {vhost}"));
    let found = vh
        .routes
        .iter()
        .find(|r| r.name == route)
        .unwrap_or_else(|| panic!("no route {route} in {vhost}"));
    match &found.action {
        RouteAction::Forward(f) => f,
        other => panic!("{other:?}"),
    }
}

fn hash(key: HashKey) -> HashPolicy {
    HashPolicy {
        key,
        terminal: false,
    }
}

fn header() -> HashPolicy {
    hash(HashKey::Header("x-user".into()))
}

fn cookie() -> HashPolicy {
    hash(HashKey::Cookie {
        name: "session".into(),
        path: Some("/".into()),
        ttl: Some(Duration::from_secs(30)),
        attributes: vec![
            portcullis_envoy::CookieAttribute {
                name: "SameSite".into(),
                value: "Strict".into(),
            },
            portcullis_envoy::CookieAttribute {
                name: "Secure".into(),
                value: String::new(),
            },
        ],
    })
}

#[test]
fn clusters_get_istiods_ring_hash_and_maglev() {
    let r = compiled(API);
    let policy = |name: &str| r.clusters[name].lb_policy;
    let ring = |minimum_ring_size| LbPolicy::RingHash {
        minimum_ring_size,
        maximum_ring_size: LbPolicy::DEFAULT_MAXIMUM_RING_SIZE,
    };
    assert_eq!(policy("outbound|80||api.example.com"), ring(2048));
    // The port's settings replace the rule's; the deprecated ring size applies there.
    assert_eq!(policy("outbound|8080||api.example.com"), ring(64));
    // The subset without a policy of its own takes the rule's.
    assert_eq!(policy("outbound|80|v1|api.example.com"), ring(2048));
    assert_eq!(
        policy("outbound|80|v2|api.example.com"),
        LbPolicy::Maglev { table_size: 257 }
    );
}

#[test]
fn default_routes_carry_the_rules_hash_policy() {
    let r = compiled(API);
    let f = forward(&r, "80", "api.example.com:80", "default");
    assert_eq!(f.hash_policy, [header()]);
    // The default route keeps Istio's default retries, previous hosts avoided.
    assert!(
        f.retry_policy
            .as_ref()
            .is_some_and(|p| p.avoid_previous_hosts)
    );
    let f = forward(&r, "8080", "api.example.com:8080", "default");
    assert_eq!(f.hash_policy, [hash(HashKey::SourceIp)]);
}

#[test]
fn virtual_service_routes_take_each_destinations_hash_policy() {
    let r = compiled(&[API, SPLIT].concat());
    let pinned = forward(&r, "80", "api.example.com:80", "pinned");
    assert_eq!(
        pinned.cluster,
        ClusterSpecifier::Cluster("outbound|80|v2|api.example.com".into())
    );
    assert_eq!(pinned.hash_policy, [cookie()]);
    // A route hashed to one destination retries on the same host, as istiod's
    // `DefaultConsistentHashPolicy`.
    assert!(
        pinned
            .retry_policy
            .as_ref()
            .is_some_and(|p| !p.avoid_previous_hosts)
    );
    // Weighted destinations append their policies in order; retries avoid previous hosts.
    let split = forward(&r, "80", "api.example.com:80", "split");
    assert_eq!(split.hash_policy, [header(), cookie()]);
    assert!(
        split
            .retry_policy
            .as_ref()
            .is_some_and(|p| p.avoid_previous_hosts)
    );
}

#[test]
fn a_rule_without_a_hash_key_hashes_at_random_on_a_ring() {
    let r = compiled(
        "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: default}
spec:
  hosts: [api.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 10.1.0.1}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: default}
spec:
  host: api.example.com
  trafficPolicy: {loadBalancer: {consistentHash: {ringHash: {}}}}
",
    );
    assert_eq!(
        r.clusters["outbound|80||api.example.com"].lb_policy,
        LbPolicy::ring_hash()
    );
    let f = forward(&r, "80", "api.example.com:80", "default");
    assert!(f.hash_policy.is_empty());
}
