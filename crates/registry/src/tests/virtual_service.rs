//! VirtualServices and DestinationRule subsets from files, routed as the data path routes
//! requests: through the listener, its route table and the first matching route.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use portcullis_balance::Policy;
use portcullis_envoy::{AbortError, Denominator, RetryPolicy};

use super::{cluster, endpoints, load, snapshot};
use crate::route::Headers;
use crate::{BuildOptions, Connection, Decision, HttpRoute, Request, Snapshot, build};

const API: &str = "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: default}
spec:
  hosts: [api.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 10.1.0.1, labels: {version: v1}}
  - {address: 10.1.0.2, labels: {version: v2}}
  - {address: 10.1.0.3, labels: {version: v2, zone: b}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: default}
spec:
  host: api.example.com
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
";

const ROUTES: &str = "
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: default}
spec:
  hosts: [api.example.com]
  http:
  - name: canary
    match: [{headers: {x-canary: {exact: 'yes'}}}, {name: beta, queryParams: {beta: {}}}]
    route: [{destination: {host: api.example.com, subset: v2}}]
  - name: moved
    match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, redirectCode: 302}
  - name: teapot
    match: [{uri: {exact: /tea}}]
    directResponse: {status: 418, body: {string: short and stout}}
  - name: split
    match: [{uri: {prefix: /api}, withoutHeaders: {x-debug: {}}}]
    route:
    - {destination: {host: api.example.com, subset: v1}, weight: 75}
    - {destination: {host: api.example.com, subset: v2}, weight: 25}
    - {destination: {host: api.example.com}, weight: 0}
    timeout: 3s
    retries: {attempts: 4, retryOn: '5xx,retriable-4xx,409', perTryTimeout: 1s}
  - name: once
    match: [{uri: {prefix: /once}, ignoreUriCase: true}]
    route: [{destination: {host: api.example.com}}]
    retries: {attempts: 0}
    rewrite: {uri: /v2/once, authority: backend.example.com}
    headers:
      request: {set: {x-team: payments}, remove: [x-secret]}
      response: {add: {x-served-by: portcullis}}
";

struct Fields<'a>(&'a [(&'a str, &'a str)]);

impl Headers for Fields<'_> {
    fn get(&self, name: &str) -> Option<Cow<'_, str>> {
        self.0
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| Cow::Borrowed(*v))
    }
}

/// Routes an intercepted HTTP/1.1 request to `api.example.com:80` (its VIP-less port 80).
fn request(s: &Snapshot, path: &str, headers: &[(&str, &str)]) -> HttpRoute {
    let conn = Connection {
        destination: Some("10.9.9.9".parse().unwrap()),
        port: 80,
        application_protocols: &["http/1.1"],
        ..Connection::default()
    };
    let req = Request {
        authority: "api.example.com",
        path,
        method: "GET",
        scheme: "http",
        headers: &Fields(headers),
    };
    s.route_request(&conn, &req)
}

fn target(r: &HttpRoute) -> String {
    match &r.decision {
        Decision::Cluster(c) => c.name.to_string(),
        Decision::Direct(d) => format!(
            "{} {}",
            d.status,
            d.location.clone().unwrap_or_else(|| d
                .body
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default())
        ),
        other => format!("{other:?}"),
    }
}

/// The VirtualService `default/api` for `api.example.com` with the `http` routes given.
fn api_virtual_service(http: &str) -> String {
    format!(
        "
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: api, namespace: default}}
spec:
  hosts: [api.example.com]
  http:{http}"
    )
}

/// What the build said about VirtualServices (fields not applied among it).
fn virtual_service_warnings(s: &Snapshot) -> Vec<&str> {
    s.warnings
        .iter()
        .filter(|w| w.starts_with("VirtualService"))
        .map(String::as_str)
        .collect()
}

fn name(r: &HttpRoute) -> String {
    r.route.as_ref().map_or("-".into(), |r| r.name.to_string())
}

#[test]
fn subsets_are_clusters_of_the_endpoints_their_labels_select_with_their_own_policy() {
    let s = snapshot(API);
    let v1 = cluster(&s, "outbound|80|v1|api.example.com");
    let v2 = cluster(&s, "outbound|80|v2|api.example.com");
    assert_eq!(endpoints(v1), ["10.1.0.1:80 w1"]);
    assert_eq!(endpoints(v2), ["10.1.0.2:80 w1", "10.1.0.3:80 w1"]);
    // The subset's policy replaces the rule's; without one the rule's applies.
    assert_eq!(v1.balancer.policy(), Policy::Random);
    assert_eq!(v2.balancer.policy(), Policy::RoundRobin);
    let all = cluster(&s, "outbound|80||api.example.com");
    assert_eq!(endpoints(all).len(), 3);
    assert!(
        !s.warnings.iter().any(|w| w.contains("subsets")),
        "{:?}",
        s.warnings
    );
}

/// A request's path and headers, the route it should match and where it should go.
type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str, &'a str);

#[test]
fn routes_are_tried_in_order_and_a_miss_is_no_route() {
    let s = snapshot(&[API, ROUTES].concat());
    let cases: [Case; 8] = [
        (
            "/",
            &[("x-canary", "yes")],
            "canary",
            "outbound|80|v2|api.example.com",
        ),
        (
            "/api/x?beta",
            &[],
            "canary.beta",
            "outbound|80|v2|api.example.com",
        ),
        (
            "/old/page?q=1",
            &[],
            "moved",
            "302 http://api.example.com/new?q=1",
        ),
        ("/tea", &[], "teapot", "418 short and stout"),
        ("/tea/pot", &[], "-", "NoRoute"),
        ("/ONCE/more", &[], "once", "outbound|80||api.example.com"),
        // `withoutHeaders: {x-debug: {}}`: only without the header.
        ("/api/v", &[("x-debug", "1")], "-", "NoRoute"),
        ("/elsewhere", &[], "-", "NoRoute"),
    ];
    for (path, headers, route, to) in cases {
        let r = request(&s, path, headers);
        assert_eq!((name(&r), target(&r)), (route.into(), to.into()), "{path}");
    }
}

#[test]
fn weights_split_requests_in_proportion_and_skip_zero_weights() {
    let s = snapshot(&[API, ROUTES].concat());
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    const DRAWS: u32 = 4000;
    for _ in 0..DRAWS {
        *seen.entry(target(&request(&s, "/api/v", &[]))).or_default() += 1;
    }
    let v1 = seen
        .get("outbound|80|v1|api.example.com")
        .copied()
        .unwrap_or(0);
    let v2 = seen
        .get("outbound|80|v2|api.example.com")
        .copied()
        .unwrap_or(0);
    assert_eq!(v1 + v2, DRAWS, "{seen:?}");
    // 75%: the binomial's standard deviation over 4000 draws is about 27; 6 of them is a
    // bound a fair split breaks about once in a billion runs.
    assert!((2840..=3160).contains(&v1), "{seen:?}");
}

#[test]
fn forwarding_routes_carry_istios_timeouts_retries_rewrites_and_headers() {
    let s = snapshot(&[API, ROUTES].concat());
    let split = request(&s, "/api/v", &[]).route.expect("a route");
    let f = split.forward().expect("forwards");
    assert_eq!(f.timeout, Some(Duration::from_secs(3)));
    // istiod's `ConvertPolicy`: status codes go to `retriable-status-codes`, which is added.
    assert_eq!(
        f.retry_policy.as_deref(),
        Some(&RetryPolicy {
            retry_on: vec![
                "5xx".into(),
                "retriable-4xx".into(),
                "retriable-status-codes".into()
            ],
            num_retries: 4,
            per_try_timeout: Some(Duration::from_secs(1)),
            retriable_status_codes: vec![409],
            retriable_headers: Vec::new(),
            avoid_previous_hosts: true,
            host_selection_retry_max_attempts: 5,
            previous_priorities: None,
            retry_back_off: None,
        })
    );
    // The data path reads the same policy, compiled.
    assert_eq!(
        *split.retries,
        crate::RetryPolicy::from_envoy(f.retry_policy.as_ref().unwrap()).unwrap()
    );
    // Without `retries`, Istio's default; `attempts: 0` none; no timeout unless set.
    let canary = request(&s, "/", &[("x-canary", "yes")])
        .route
        .expect("a route");
    assert_eq!(
        canary.forward().unwrap().retry_policy.as_deref(),
        Some(&crate::build::compile_default_retry_policy())
    );
    assert_eq!(*canary.retries, crate::RetryPolicy::ISTIO);
    assert_eq!(canary.forward().unwrap().timeout, Some(Duration::ZERO));
    let once = request(&s, "/once/x?y=1", &[]).route.expect("a route");
    assert_eq!(once.forward().unwrap().retry_policy, None);
    assert_eq!(*once.retries, crate::RetryPolicy::NONE);
    assert_eq!(
        once.rewrite_path("/once/x?y=1").as_deref(),
        Some("/v2/once/x?y=1")
    );
    let f = once.forward().unwrap();
    assert_eq!(
        f.host_rewrite_literal.as_deref(),
        Some("backend.example.com")
    );
    let mutations: Vec<String> = once
        .request_headers()
        .iter()
        .chain(once.response_headers())
        .map(|m| format!("{m:?}"))
        .collect();
    assert_eq!(
        mutations,
        [
            "Remove(\"x-secret\")",
            "Add(HeaderValueOption { name: \"x-team\", value: \"payments\", append: OverwriteIfExistsOrAdd })",
            "Add(HeaderValueOption { name: \"x-served-by\", value: \"portcullis\", append: AppendIfExistsOrAdd })",
        ]
    );
}

#[test]
fn short_names_resolve_in_the_virtual_services_namespace_and_ports_are_inferred() {
    let yaml = "
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 9080}]
  selector: {app: reviews}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-1, namespace: shop, labels: {app: reviews, version: v3}}
status: {podIP: 10.244.0.7}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets: [{name: v3, labels: {version: v3}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews, subset: v3}}]
";
    let options = BuildOptions {
        namespace: "shop".into(),
        ..BuildOptions::default()
    };
    let s = build(&load(yaml), &options, None, 1);
    let conn = Connection {
        destination: Some("10.96.0.20".parse().unwrap()),
        port: 9080,
        application_protocols: &["http/1.1"],
        ..Connection::default()
    };
    for authority in ["reviews", "reviews.shop.svc.cluster.local:9080"] {
        let req = Request {
            authority,
            path: "/",
            method: "GET",
            scheme: "http",
            headers: &(),
        };
        let r = s.route_request(&conn, &req);
        assert_eq!(
            target(&r),
            "outbound|9080|v3|reviews.shop.svc.cluster.local"
        );
    }
    assert_eq!(
        endpoints(cluster(
            &s,
            "outbound|9080|v3|reviews.shop.svc.cluster.local"
        )),
        ["10.244.0.7:9080 w1"]
    );
}

#[test]
fn a_virtual_service_applies_only_where_istiod_would_send_it() {
    let vs = |extra: &str| {
        format!(
            "
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: api, namespace: other}}
spec:
  hosts: [api.example.com]
{extra}
  http: [{{directResponse: {{status: 204}}}}]
"
        )
    };
    let routed = |extra: &str| {
        let s = snapshot(&[API, &vs(extra)].concat());
        target(&request(&s, "/", &[]))
    };
    assert_eq!(routed(""), "204 ");
    // Not exported to the proxy's namespace, or bound to a gateway only: not applied.
    assert_eq!(routed("  exportTo: ['.']"), "outbound|80||api.example.com");
    assert_eq!(
        routed("  gateways: [istio-system/ingress]"),
        "outbound|80||api.example.com"
    );
    assert_eq!(routed("  gateways: [mesh, ingress]"), "204 ");
}

#[test]
fn faults_and_mirrors_are_compiled_and_applied() {
    let yaml = "
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: chaos, namespace: default}
spec:
  hosts: [api.example.com]
  http:
  - route: [{destination: {host: api.example.com, subset: v1}}]
    fault:
      abort: {httpStatus: 503, percentage: {value: 10}}
      delay: {fixedDelay: 2s, percentage: {value: 0.5}}
    mirror: {host: api.example.com, subset: v2}
    mirrorPercentage: {value: 50}
";
    let s = snapshot(&[API, yaml].concat());
    let route = request(&s, "/", &[]).route.expect("a route");
    let fault = route.fault.as_ref().expect("a fault");
    let abort = fault.abort.as_ref().expect("an abort");
    assert_eq!(abort.error, AbortError::HttpStatus(503));
    // Istio's percentages are per million in Envoy's config.
    assert_eq!(
        (abort.percentage.numerator, abort.percentage.denominator),
        (100_000, Denominator::Million)
    );
    let delay = fault.delay.as_ref().expect("a delay");
    assert_eq!(delay.fixed_delay, Duration::from_secs(2));
    assert_eq!(delay.percentage.numerator, 5_000);
    let f = route.forward().expect("forwards");
    assert_eq!(f.request_mirror_policies.len(), 1);
    assert_eq!(
        f.request_mirror_policies[0].cluster,
        "outbound|80|v2|api.example.com"
    );
    assert_eq!(route.mirrors().len(), 1);
    assert!(
        matches!(&route.mirrors()[0].decision, Decision::Cluster(c) if &*c.name == "outbound|80|v2|api.example.com")
    );
    let said = virtual_service_warnings(&s);
    assert!(said.is_empty(), "{said:?}");
}

#[test]
fn grpc_aborts_binary_bodies_and_per_destination_headers_compile_as_istiod_does() {
    let yaml = api_virtual_service(
        "
  - match: [{uri: {prefix: /grpc}}]
    route: [{destination: {host: api.example.com}}]
    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
  - match: [{uri: {prefix: /bytes}}]
    directResponse: {status: 200, body: {bytes: AJ-Slg}}
  - route:
    - destination: {host: api.example.com, subset: v1}
      weight: 50
      headers:
        request: {set: {x-dest: v1}}
        response: {add: {x-from: v1}, remove: [x-internal]}
    - destination: {host: api.example.com, subset: v2}
      weight: 50
      headers: {request: {set: {x-dest: v2}}}
",
    );
    let s = snapshot(&[API, &yaml].concat());
    let grpc = request(&s, "/grpc", &[]).route.expect("a route");
    let abort = grpc.fault.as_ref().and_then(|f| f.abort.as_ref());
    assert_eq!(abort.map(|a| a.error), Some(AbortError::GrpcStatus(14)));
    // URL-safe and unpadded base64 decode as the API server decodes `bytes`.
    let bytes = request(&s, "/bytes", &[]);
    let Decision::Direct(d) = &bytes.decision else {
        panic!("{:?}", bytes.decision);
    };
    assert_eq!(d.body.as_deref(), Some(&[0x00, 0x9f, 0x92, 0x96][..]));
    // Each destination's changes go with its cluster, and only with it.
    let mut seen = BTreeMap::new();
    for _ in 0..64 {
        let routed = request(&s, "/", &[]);
        let changes: Vec<String> = routed
            .cluster_headers
            .iter()
            .flat_map(|c| c.request.iter().chain(&c.response))
            .map(|m| format!("{m:?}"))
            .collect();
        seen.insert(target(&routed), changes);
    }
    let set = |value: &str| {
        format!(
            "Add(HeaderValueOption {{ name: \"x-dest\", value: \"{value}\", append: OverwriteIfExistsOrAdd }})"
        )
    };
    assert_eq!(
        seen,
        BTreeMap::from([
            (
                "outbound|80|v1|api.example.com".to_string(),
                vec![
                    set("v1"),
                    "Remove(\"x-internal\")".to_string(),
                    "Add(HeaderValueOption { name: \"x-from\", value: \"v1\", append: AppendIfExistsOrAdd })".to_string(),
                ]
            ),
            ("outbound|80|v2|api.example.com".to_string(), vec![set("v2")]),
        ])
    );
    let said = virtual_service_warnings(&s);
    assert!(said.is_empty(), "{said:?}");
}

#[test]
fn faults_and_authorities_istiod_drops_are_reported_as_not_applied() {
    let yaml = api_virtual_service(
        "
  - match: [{uri: {prefix: /h2}}]
    route: [{destination: {host: api.example.com}}]
    fault:
      abort: {http2Error: REFUSED_STREAM, percentage: {value: 100}}
      delay: {exponentialDelay: 1s, percentage: {value: 100}}
  - route:
    - destination: {host: api.example.com, subset: v1}
      headers: {request: {set: {':authority': v1.example.com}}}
      weight: 50
    - {destination: {host: api.example.com, subset: v2}, weight: 50}
",
    );
    let s = snapshot(&[API, &yaml].concat());
    let said = virtual_service_warnings(&s);
    assert_eq!(
        said,
        [
            "VirtualService default/api: spec.http[0].fault.delay.exponentialDelay is not applied yet",
            "VirtualService default/api: spec.http[0].fault.abort.http2Error is not applied yet",
            "VirtualService default/api: spec.http[1].route[].headers authority (per destination of a weighted route) is not applied yet",
        ]
    );
    // Istio's routes still route; the dropped fault injects nothing.
    let h2 = request(&s, "/h2", &[]).route.expect("a route");
    assert!(h2.fault.is_none());
}

fn connection_target(s: &Snapshot, dst: &str, port: u16, sni: Option<&str>) -> String {
    let d = s.route_connection(&Connection {
        destination: Some(dst.parse().unwrap()),
        port,
        server_name: sni,
        tls: sni.is_some(),
        ..Connection::default()
    });
    match d {
        Decision::Cluster(c) => c.name.to_string(),
        other => format!("{other:?}"),
    }
}

const BACKENDS: &str = "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: one, namespace: default}
spec:
  hosts: [one.backend.test]
  ports: [{number: 443, name: tls, protocol: TLS}, {number: 5432, name: tcp, protocol: TCP}]
  addresses: [10.7.0.1]
  resolution: STATIC
  endpoints: [{address: 10.7.1.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: two, namespace: default}
spec:
  hosts: [two.backend.test]
  ports: [{number: 443, name: tls, protocol: TLS}, {number: 5432, name: tcp, protocol: TCP}]
  addresses: [10.7.0.2]
  resolution: STATIC
  endpoints: [{address: 10.7.1.2}]
";

#[test]
fn tls_routes_send_their_sni_names_to_the_weighted_destinations() {
    let yaml = "
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: front, namespace: default}
spec:
  hosts: [front.tls.test, other.tls.test]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: STATIC
  endpoints: [{address: 10.8.0.1}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: front, namespace: default}
spec:
  hosts: [front.tls.test]
  tls:
  - match: [{sniHosts: [front.tls.test], port: 8443}]
    route: [{destination: {host: front.tls.test}}]
  - match: [{sniHosts: [front.tls.test]}]
    route:
    - {destination: {host: one.backend.test, port: {number: 443}}, weight: 50}
    - {destination: {host: two.backend.test, port: {number: 443}}, weight: 50}
";
    let s = snapshot(&[BACKENDS, yaml].concat());
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..64 {
        seen.insert(connection_target(
            &s,
            "10.9.9.9",
            443,
            Some("front.tls.test"),
        ));
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        [
            "outbound|443||one.backend.test",
            "outbound|443||two.backend.test"
        ]
    );
    // A name without a TLS route keeps its service's chain.
    assert_eq!(
        connection_target(&s, "10.9.9.9", 443, Some("other.tls.test")),
        "outbound|443||other.tls.test"
    );
}

#[test]
fn tcp_routes_send_destination_subnets_and_the_port_where_they_say() {
    let yaml = "
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: default}
spec:
  hosts: [db.test]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 10.8.0.2}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: default}
spec:
  hosts: [db.test]
  tcp:
  - match: [{destinationSubnets: [10.6.0.0/16], port: 5432}]
    route: [{destination: {host: two.backend.test, port: {number: 5432}}}]
  - route: [{destination: {host: one.backend.test, port: {number: 5432}}}]
";
    let s = snapshot(&[BACKENDS, yaml].concat());
    assert_eq!(
        connection_target(&s, "10.6.3.4", 5432, None),
        "outbound|5432||two.backend.test"
    );
    assert_eq!(
        connection_target(&s, "10.9.9.9", 5432, None),
        "outbound|5432||one.backend.test"
    );
    // The backends' own addresses stay theirs.
    assert_eq!(
        connection_target(&s, "10.7.0.1", 5432, None),
        "outbound|5432||one.backend.test"
    );
}

#[test]
fn tls_routes_also_apply_on_a_tls_services_own_address() {
    let yaml = "
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: one, namespace: default}
spec:
  hosts: [one.backend.test]
  tls:
  - match: [{sniHosts: [one.backend.test]}]
    route: [{destination: {host: two.backend.test, port: {number: 443}}}]
";
    let s = snapshot(&[BACKENDS, yaml].concat());
    assert_eq!(
        connection_target(&s, "10.7.0.1", 443, Some("one.backend.test")),
        "outbound|443||two.backend.test"
    );
    // Another name to that address matches no chain, as with Envoy fed by istiod.
    assert_eq!(
        connection_target(&s, "10.7.0.1", 443, Some("other.test")),
        "NoFilterChain"
    );
}

#[test]
fn retry_options_and_unregistered_hosts_are_handled_as_istiod_does() {
    let yaml = "
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: default}
spec:
  hosts: [api.example.com, nowhere.example.com]
  http:
  - route: [{destination: {host: api.example.com}}]
    retries: {attempts: 1, retryIgnorePreviousHosts: false, retryRemoteLocalities: true}
";
    let s = snapshot(&[API, yaml].concat());
    let route = request(&s, "/", &[]).route.expect("a route");
    // `retryOn` unset keeps the default conditions; the host predicate can be turned off;
    // `retryRemoteLocalities` is istiod's `previous_priorities` updated every 2 attempts.
    let want = RetryPolicy {
        num_retries: 1,
        avoid_previous_hosts: false,
        previous_priorities: Some(2),
        ..crate::build::compile_default_retry_policy()
    };
    assert_eq!(
        route.forward().unwrap().retry_policy.as_deref(),
        Some(&want)
    );
    assert_eq!(
        *route.retries,
        crate::RetryPolicy::from_envoy(&want).unwrap()
    );
    assert!(
        s.warnings.iter().any(|w| w
            == "VirtualService default/api: host nowhere.example.com is no registered service of this proxy; its rules apply to nothing here (register it with a ServiceEntry)"),
        "{:?}",
        s.warnings
    );
    assert!(
        !s.warnings
            .iter()
            .any(|w| w.contains("host api.example.com") || w.contains("retryRemoteLocalities")),
        "{:?}",
        s.warnings
    );
}
