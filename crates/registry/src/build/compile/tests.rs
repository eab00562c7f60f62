//! The model compiled from Istio files, checked against the shapes istiod gives a sidecar.

use std::net::IpAddr;
use std::sync::Arc;

use portcullis_envoy::{
    ClusterSpecifier, Discovery, EndpointAddress, FilterChain, LbPolicy, Listener, NetworkFilter,
    OriginalDst, RouteAction, RouteConfiguration, RouteSource, UpstreamProtocol,
};

use super::*;
use crate::tests::{MESH_ALLOW_ANY, load};

mod auto_mtls;

fn compiled_in(yaml: &str, namespace: &str, dns: DnsAnswers<'_>) -> Compiled {
    let options = BuildOptions {
        namespace: namespace.to_string(),
        ..BuildOptions::default()
    };
    compile(&load(yaml), &options, dns)
}

fn compiled(yaml: &str) -> Compiled {
    compiled_in(yaml, "default", &|_| None)
}

fn listener<'a>(c: &'a Compiled, name: &str) -> &'a Listener {
    c.resources.listeners.get(name).unwrap_or_else(|| {
        panic!(
            "no listener {name}; have {:?}",
            c.resources.listeners.keys().collect::<Vec<_>>()
        )
    })
}

fn routes<'a>(c: &'a Compiled, name: &str) -> &'a RouteConfiguration {
    c.resources
        .routes
        .get(name)
        .unwrap_or_else(|| panic!("no route table {name}"))
}

/// Where a chain sends its connections: a cluster, or `rds NAME`.
fn target(chain: &FilterChain) -> String {
    match &chain.filter {
        NetworkFilter::TcpProxy(t) => match &t.cluster {
            ClusterSpecifier::Cluster(name) => name.clone(),
            ClusterSpecifier::Weighted(_) => "weighted".to_string(),
        },
        NetworkFilter::Http(h) => match &h.route_config {
            RouteSource::Rds(name) => format!("rds {name}"),
            RouteSource::Inline(rc) => format!("inline {}", rc.name),
        },
    }
}

/// Each chain's target with its prefix ranges, server names and application protocols.
fn chains(l: &Listener) -> Vec<String> {
    l.filter_chains
        .iter()
        .map(|c| {
            let m = &c.filter_chain_match;
            let ranges: Vec<String> = m.prefix_ranges.iter().map(ToString::to_string).collect();
            format!(
                "{} ranges={ranges:?} sni={:?} alpn={}",
                target(c),
                m.server_names,
                m.application_protocols.len()
            )
        })
        .collect()
}

/// Each virtual host as `name: domains -> what its one route does`.
fn virtual_hosts(rc: &RouteConfiguration) -> Vec<String> {
    rc.virtual_hosts
        .iter()
        .map(|v| {
            let action = match &v.routes[0].action {
                RouteAction::Forward(f) => match &f.cluster {
                    ClusterSpecifier::Cluster(name) => name.clone(),
                    ClusterSpecifier::Weighted(_) => "weighted".to_string(),
                },
                RouteAction::DirectResponse { status, .. } => format!("direct {status}"),
                RouteAction::Redirect(_) => "redirect".to_string(),
            };
            format!("{}: {} -> {action}", v.name, v.domains.join(","))
        })
        .collect()
}

fn original_dst(c: &Compiled, cluster: &str) -> OriginalDst {
    match &c.resources.clusters[cluster].discovery {
        Discovery::OriginalDst(od) => od.clone(),
        other => panic!("{cluster} is {other:?}"),
    }
}

fn endpoints(c: &Compiled, cluster: &str) -> Vec<String> {
    let cluster = &c.resources.clusters[cluster];
    let assignment = cluster.load_assignment.as_ref().expect("inline endpoints");
    assignment
        .endpoints
        .iter()
        .flat_map(|g| &g.lb_endpoints)
        .map(|e| match &e.address {
            EndpointAddress::Socket(a) => format!("{a} w{}", e.load_balancing_weight),
            EndpointAddress::Name { host, port } => {
                format!("{host}:{port} w{}", e.load_balancing_weight)
            }
        })
        .collect()
}

/// A ServiceEntry `name` in `default` with `spec`, the lines of its spec.
fn se(name: &str, spec: &[&str]) -> String {
    se_meta(name, "", spec)
}

/// [`se`] with `meta` added to its metadata.
fn se_meta(name: &str, meta: &str, spec: &[&str]) -> String {
    let meta = if meta.is_empty() {
        String::new()
    } else {
        format!(", {meta}")
    };
    let spec = spec.join("\n  ");
    format!(
        "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
         metadata: {{name: {name}, namespace: default{meta}}}\nspec:\n  {spec}\n"
    )
}

const SEED: &str = "
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: external, namespace: default, labels: {app: external}}
spec: {address: 10.50.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: nginx, namespace: default, labels: {app: external}}
status: {podIP: 10.50.1.3}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: app, namespace: default}
spec:
  hosts: [app.internal.com]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: external}}
";

#[test]
fn the_seed_guide_compiles_to_the_reference_sidecar() {
    let c = compiled(SEED);
    let vo = listener(&c, "virtualOutbound");
    assert!(vo.use_original_dst && vo.bind_to_port);
    assert_eq!(vo.address, "0.0.0.0:15001".parse().unwrap());
    assert_eq!(
        chains(vo),
        [
            "BlackHoleCluster ranges=[] sni=[] alpn=0",
            "PassthroughCluster ranges=[\"10.50.1.3/32\"] sni=[] alpn=0",
            "BlackHoleCluster ranges=[] sni=[] alpn=0",
        ]
    );
    assert_eq!(
        vo.filter_chains[0].filter_chain_match.destination_port,
        Some(15001)
    );
    let l80 = listener(&c, "0.0.0.0_80");
    assert!(!l80.bind_to_port);
    assert_eq!(
        l80.listener_filters,
        ["envoy.filters.listener.http_inspector"]
    );
    assert_eq!(
        chains(l80),
        [
            "rds 80 ranges=[] sni=[] alpn=3",
            "rds 80 ranges=[\"10.50.1.3/32\"] sni=[] alpn=3",
            "PassthroughCluster ranges=[\"10.50.1.3/32\"] sni=[] alpn=0",
        ]
    );
    let fallback = l80.default_filter_chain.as_ref().unwrap();
    assert_eq!(fallback.name, "PassthroughFilterChain");
    assert_eq!(target(fallback), "BlackHoleCluster");
    let rc = routes(&c, "80");
    assert!(rc.ignore_port_in_host_matching);
    assert_eq!(
        virtual_hosts(rc),
        [
            "app.internal.com:80: app.internal.com -> outbound|80||app.internal.com",
            "pods: 10.50.1.3 -> PassthroughCluster",
            "block_all: * -> direct 502",
        ]
    );
    let app = &c.resources.clusters["outbound|80||app.internal.com"];
    assert_eq!(app.discovery, Discovery::Static);
    assert_eq!(app.lb_policy, LbPolicy::LeastRequest);
    assert_eq!(app.source.as_deref(), Some("ServiceEntry default/app"));
    assert_eq!(
        endpoints(&c, "outbound|80||app.internal.com"),
        ["10.50.0.1:80 w1", "10.50.1.3:80 w1"]
    );
    assert_eq!(
        original_dst(&c, "PassthroughCluster").allowed_destinations,
        Some(vec!["10.50.1.3/32".parse().unwrap()]),
        "under REGISTRY_ONLY only registered pods pass through"
    );
    assert_eq!(
        c.resources.clusters.keys().collect::<Vec<_>>(),
        [
            "BlackHoleCluster",
            "PassthroughCluster",
            "outbound|80||app.internal.com"
        ]
    );
}

#[test]
fn allow_any_passes_the_unmatched_through() {
    let c = compiled(&format!("{SEED}---{MESH_ALLOW_ANY}"));
    let vo = listener(&c, "virtualOutbound");
    assert_eq!(
        chains(vo),
        [
            "BlackHoleCluster ranges=[] sni=[] alpn=0",
            "PassthroughCluster ranges=[] sni=[] alpn=0",
        ],
        "the loop guard stays; pods need no chain of their own"
    );
    let l80 = listener(&c, "0.0.0.0_80");
    assert_eq!(chains(l80), ["rds 80 ranges=[] sni=[] alpn=3"]);
    assert_eq!(
        target(l80.default_filter_chain.as_ref().unwrap()),
        "PassthroughCluster"
    );
    let rc = routes(&c, "80");
    assert_eq!(
        virtual_hosts(rc).last().unwrap(),
        "allow_any: * -> PassthroughCluster"
    );
    assert_eq!(
        original_dst(&c, "PassthroughCluster").allowed_destinations,
        None
    );
}

fn opaque() -> String {
    [
        se_meta(
            "db",
            "creationTimestamp: '2024-01-01T00:00:00Z'",
            &[
                "hosts: [db.internal.com]",
                "addresses: [10.9.0.5, 10.10.0.0/16]",
                "ports: [{number: 5432, name: tcp, protocol: TCP}]",
                "resolution: STATIC",
                "endpoints: [{address: 10.9.1.1}]",
            ],
        ),
        se_meta(
            "old",
            "creationTimestamp: '2020-01-01T00:00:00Z'",
            &[
                "hosts: [old.internal.com]",
                "addresses: [10.9.0.5]",
                "ports: [{number: 5432, name: tcp, protocol: TCP}]",
                "resolution: STATIC",
                "endpoints: [{address: 10.9.1.2}]",
            ],
        ),
        se(
            "any",
            &[
                "hosts: [any.internal.com]",
                "ports: [{number: 6379, name: tcp, protocol: TCP}]",
                "resolution: STATIC",
                "endpoints: [{address: 10.9.1.3}]",
            ],
        ),
    ]
    .concat()
}

#[test]
fn opaque_services_get_address_listeners_ranges_and_the_whole_port() {
    let c = compiled(&opaque());
    // An exact address is a listener of its own; the oldest service keeps it.
    let vip = listener(&c, "10.9.0.5_5432");
    assert_eq!(vip.address, "10.9.0.5:5432".parse().unwrap());
    assert_eq!(
        chains(vip),
        ["outbound|5432||old.internal.com ranges=[] sni=[] alpn=0"]
    );
    assert!(vip.default_filter_chain.is_none());
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("address 10.9.0.5 on port 5432")),
        "{:?}",
        c.warnings
    );
    // A range is a chain on the port's wildcard listener, the rest goes to the catch-all.
    let port = listener(&c, "0.0.0.0_5432");
    assert_eq!(
        chains(port),
        ["outbound|5432||db.internal.com ranges=[\"10.10.0.0/16\"] sni=[] alpn=0"]
    );
    assert_eq!(
        target(port.default_filter_chain.as_ref().unwrap()),
        "BlackHoleCluster"
    );
    assert!(port.listener_filters.is_empty());
    // Without addresses, a TCP service takes the whole port: its only chain.
    let any = listener(&c, "0.0.0.0_6379");
    assert_eq!(
        chains(any),
        ["outbound|6379||any.internal.com ranges=[] sni=[] alpn=0"]
    );
    assert!(any.default_filter_chain.is_none());
    assert!(
        c.resources.routes.keys().eq([HTTP_PROXY_ROUTES]),
        "no HTTP listener, no route table of a port"
    );
}

fn tls() -> String {
    [
        se(
            "tls",
            &[
                "hosts: [secure.example.com]",
                "ports: [{number: 443, name: https, protocol: HTTPS}]",
                "resolution: DNS",
            ],
        ),
        se(
            "wild",
            &[
                "hosts: ['*.wild.example.com']",
                "ports: [{number: 443, name: https, protocol: HTTPS}]",
                "resolution: NONE",
            ],
        ),
        se(
            "vip",
            &[
                "hosts: [vip.example.com]",
                "addresses: [10.20.0.1]",
                "ports: [{number: 443, name: tls, protocol: TLS}]",
                "resolution: STATIC",
                "endpoints: [{address: 10.20.1.1}]",
            ],
        ),
        se(
            "range",
            &[
                "hosts: [range.example.com]",
                "addresses: [10.30.0.0/16]",
                "ports: [{number: 443, name: tls, protocol: TLS}]",
                "resolution: STATIC",
                "endpoints: [{address: 10.30.1.1}]",
            ],
        ),
    ]
    .concat()
}

#[test]
fn tls_services_are_matched_by_sni_unless_they_have_an_address() {
    let c = compiled(&tls());
    let port = listener(&c, "0.0.0.0_443");
    assert_eq!(
        port.listener_filters,
        ["envoy.filters.listener.tls_inspector"]
    );
    assert_eq!(
        chains(port),
        [
            "outbound|443||range.example.com ranges=[\"10.30.0.0/16\"] sni=[] alpn=0",
            "outbound|443||*.wild.example.com ranges=[] sni=[\"*.wild.example.com\"] alpn=0",
            "outbound|443||range.example.com ranges=[] sni=[\"range.example.com\"] alpn=0",
            "outbound|443||secure.example.com ranges=[] sni=[\"secure.example.com\"] alpn=0",
        ],
        "a range and a name each take a connection (istiod asks for both on one chain)"
    );
    assert_eq!(
        chains(listener(&c, "10.20.0.1_443")),
        ["outbound|443||vip.example.com ranges=[] sni=[] alpn=0"],
        "an exact address needs no SNI"
    );
    let dns = &c.resources.clusters["outbound|443||secure.example.com"];
    assert_eq!(dns.discovery, Discovery::StrictDns);
    assert_eq!(
        endpoints(&c, "outbound|443||secure.example.com"),
        ["secure.example.com:443 w1"]
    );
    assert!(c.dns_names.contains("secure.example.com"));
    assert_eq!(
        original_dst(&c, "outbound|443||*.wild.example.com").allowed_destinations,
        Some(Vec::new()),
        "a wildcard host owns no address of its own"
    );
    assert!(!c.dns_names.iter().any(|n| n.starts_with('*')));
}

fn sniffed() -> String {
    [
        se(
            "own",
            &[
                "hosts: [own.internal.com]",
                "addresses: [10.11.0.7]",
                "ports: [{number: 7000, name: whatever}]",
                "resolution: STATIC",
                "endpoints: [{address: 10.11.1.1}]",
            ],
        ),
        se(
            "open",
            &[
                "hosts: [open.internal.com]",
                "ports: [{number: 7001, name: whatever, targetPort: 7101}]",
                "resolution: NONE",
            ],
        ),
        se(
            "grpc",
            &[
                "hosts: [rr.example.com]",
                "ports: [{number: 8081, name: grpc, protocol: GRPC}]",
                "resolution: DNS_ROUND_ROBIN",
            ],
        ),
    ]
    .concat()
}

#[test]
fn undeclared_protocols_are_sniffed_beside_a_tcp_chain() {
    let c = compiled_in(&sniffed(), "default", &|host| {
        (host == "open.internal.com").then(|| Arc::from([IpAddr::from([192, 0, 2, 7])]))
    });
    // With an address: a listener of its own, HTTP through a route table of its own that
    // takes any Host, the rest to the service as TCP.
    let own = listener(&c, "10.11.0.7_7000");
    assert_eq!(
        own.listener_filters,
        ["envoy.filters.listener.http_inspector"]
    );
    assert_eq!(
        chains(own),
        ["rds own.internal.com:7000 ranges=[] sni=[] alpn=3"]
    );
    assert_eq!(
        target(own.default_filter_chain.as_ref().unwrap()),
        "outbound|7000||own.internal.com"
    );
    assert_eq!(
        virtual_hosts(routes(&c, "own.internal.com:7000")),
        ["own.internal.com:7000: * -> outbound|7000||own.internal.com"]
    );
    assert_eq!(
        c.resources.clusters["outbound|7000||own.internal.com"].upstream_protocol,
        UpstreamProtocol::UseDownstream
    );
    // Without: on the port's wildcard listener, taking the whole port as TCP.
    let open = listener(&c, "0.0.0.0_7001");
    assert_eq!(chains(open), ["rds 7001 ranges=[] sni=[] alpn=3"]);
    assert_eq!(
        target(open.default_filter_chain.as_ref().unwrap()),
        "outbound|7001||open.internal.com"
    );
    // Resolution NONE: the original destination, on the target port, only where the
    // service's host resolves.
    let none = original_dst(&c, "outbound|7001||open.internal.com");
    assert_eq!(none.port_override, Some(7101));
    assert_eq!(
        none.allowed_destinations,
        Some(vec!["192.0.2.7/32".parse().unwrap()])
    );
    assert_eq!(
        c.resources.clusters["outbound|7001||open.internal.com"].lb_policy,
        LbPolicy::ClusterProvided
    );
    assert!(c.dns_names.contains("open.internal.com"));
    // gRPC: HTTP/2 upstream; DNS_ROUND_ROBIN is Envoy's LOGICAL_DNS.
    let rr = &c.resources.clusters["outbound|8081||rr.example.com"];
    assert_eq!(rr.discovery, Discovery::LogicalDns);
    assert_eq!(rr.upstream_protocol, UpstreamProtocol::Http2);
    assert_eq!(
        chains(listener(&c, "0.0.0.0_8081")),
        ["rds 8081 ranges=[] sni=[] alpn=3"]
    );
}

/// Services of every shape, the `compile` end-to-end tests' too.
const EVERY_SHAPE: &str = include_str!("../../../testdata/every-shape.yaml");

#[test]
fn kubernetes_services_headless_and_external_names() {
    let c = compiled_in(EVERY_SHAPE, "shop", &|_| None);
    let port80 = virtual_hosts(routes(&c, "80"));
    assert!(
        port80.contains(
            &"api.shop.svc.cluster.local:80: api.shop.svc.cluster.local,api.shop.svc,api.shop,\
              api,10.96.0.10,alias.default.svc.cluster.local,alias.default.svc,alias.default \
              -> outbound|80||api.shop.svc.cluster.local"
                .to_string()
        ),
        "{port80:#?}"
    );
    assert_eq!(
        endpoints(&c, "outbound|80||api.shop.svc.cluster.local"),
        ["10.244.0.1:8080 w1"]
    );
    assert_eq!(
        chains(listener(&c, "10.96.0.10_5433")),
        ["outbound|5433||api.shop.svc.cluster.local ranges=[] sni=[] alpn=0"]
    );
    // Headless: forwarded to the pod the client chose, which is the service's for TCP
    // (a listener per pod) and by per-pod names for HTTP.
    assert_eq!(
        chains(listener(&c, "10.244.0.2_3306")),
        ["outbound|3306||db.shop.svc.cluster.local ranges=[] sni=[] alpn=0"]
    );
    let db = original_dst(&c, "outbound|3306||db.shop.svc.cluster.local");
    assert_eq!(
        db.allowed_destinations,
        Some(vec!["10.244.0.2/32".parse().unwrap()])
    );
    let http = virtual_hosts(routes(&c, "8000"));
    assert_eq!(
        http[0],
        "db.shop.svc.cluster.local:8000: db.shop.svc.cluster.local,db.shop.svc,db.shop,db,\
         *.db.shop.svc.cluster.local,*.db.shop.svc,*.db.shop,*.db,10.244.0.2 \
         -> outbound|8000||db.shop.svc.cluster.local"
    );
    assert_eq!(
        http[1], "pods: 10.244.0.1 -> PassthroughCluster",
        "once each domain"
    );
}

#[test]
fn invisible_and_unimported_services_compile_to_nothing() {
    let yaml = format!(
        "{SEED}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: private, namespace: other}}
spec:
  hosts: [private.internal.com]
  exportTo: ['.']
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 10.60.0.1}}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default, namespace: default}}
spec:
  egress: [{{hosts: ['./app.internal.com']}}]
"
    );
    let c = compiled(&yaml);
    assert!(
        !c.resources
            .clusters
            .contains_key("outbound|80||private.internal.com")
    );
    let imported = compiled_in(&yaml, "other", &|_| None);
    assert!(
        imported
            .resources
            .clusters
            .contains_key("outbound|80||private.internal.com")
    );
    assert!(
        imported
            .resources
            .clusters
            .contains_key("outbound|80||app.internal.com"),
        "default's Sidecar does not apply in other"
    );
}

/// istiod's `TranslateRouteMatch`: headers and `withoutHeaders` sorted by name, then
/// method, authority and scheme; `{}` and the regex `*` are presence checks; an inverted
/// value match treats a missing header as empty; the uri is case sensitive unless
/// `ignoreUriCase`.
#[test]
fn virtual_service_matches_compile_to_istiods_route_match() {
    use portcullis_envoy::{
        HeaderMatch, HeaderMatcher, PathMatch, QueryParameterMatcher, StringMatcher, StringPattern,
    };
    let c = compiled(
        "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api}
spec:
  hosts: [api.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 10.1.0.1}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api}
spec:
  hosts: [api.example.com]
  http:
  - name: r
    match:
    - name: m
      uri: {regex: '/v[0-9]+/.*'}
      ignoreUriCase: true
      headers: {x-b: {exact: one}, x-a: {}}
      withoutHeaders: {x-c: {prefix: bad}, x-d: {regex: '*'}}
      method: {exact: POST}
      authority: {prefix: api.}
      scheme: {exact: http}
      queryParams: {q: {regex: '*'}, v: {exact: '2'}}
    - port: 8080
      uri: {exact: /elsewhere}
    route: [{destination: {host: api.example.com}}]
",
    );
    let table = routes(&c, "80");
    let vh = table
        .virtual_hosts
        .iter()
        .find(|v| v.name == "api.example.com:80")
        .expect("the service's virtual host");
    // The match for port 8080 is left out on port 80, and no default route is added.
    assert_eq!(vh.routes.len(), 1, "{:?}", vh.routes);
    let r = &vh.routes[0];
    assert_eq!(r.name, "r.m");
    let exact = |v: &str| {
        HeaderMatch::String(StringMatcher {
            pattern: StringPattern::Exact(v.into()),
            ignore_case: false,
        })
    };
    let prefix = |v: &str| {
        HeaderMatch::String(StringMatcher {
            pattern: StringPattern::Prefix(v.into()),
            ignore_case: false,
        })
    };
    let header = |name: &str, matcher, invert: bool, missing_empty: bool| HeaderMatcher {
        name: name.into(),
        matcher,
        invert_match: invert,
        treat_missing_header_as_empty: missing_empty,
    };
    assert_eq!(
        r.route_match,
        RouteMatch {
            path: PathMatch::Regex("/v[0-9]+/.*".into()),
            case_sensitive: false,
            headers: vec![
                header("x-a", HeaderMatch::Present(true), false, false),
                header("x-b", exact("one"), false, false),
                header("x-c", prefix("bad"), true, true),
                header("x-d", HeaderMatch::Present(true), true, false),
                header(":method", exact("POST"), false, false),
                header(":authority", prefix("api."), false, false),
                header(":scheme", exact("http"), false, false),
            ],
            query_parameters: vec![
                QueryParameterMatcher {
                    name: "q".into(),
                    matcher: None,
                },
                QueryParameterMatcher {
                    name: "v".into(),
                    matcher: Some(StringMatcher {
                        pattern: StringPattern::Exact("2".into()),
                        ignore_case: false,
                    }),
                },
            ],
        }
    );
    // The same service on the HTTP proxy table (`host:port` domains) gets the same routes.
    let proxy = routes(&c, HTTP_PROXY_ROUTES);
    let vh = proxy
        .virtual_hosts
        .iter()
        .find(|v| v.name == "api.example.com:80")
        .expect("the service's virtual host");
    assert_eq!(vh.routes[0].name, "r.m");
}

/// A DestinationRule's subsets are clusters of their own beside the service's, and TCP and
/// TLS routes of a VirtualService become `tcp_proxy` chains to their (weighted)
/// destinations, as istiod builds them.
#[test]
fn subsets_and_l4_routes_compile_to_istiods_clusters_and_chains() {
    let c = compiled(
        "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db}
spec:
  hosts: [db.example.com]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 10.1.0.1, labels: {role: primary}}, {address: 10.1.0.2, labels: {role: replica}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: db}
spec:
  host: db.example.com
  subsets: [{name: primary, labels: {role: primary}}, {name: replica, labels: {role: replica}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db}
spec:
  hosts: [db.example.com]
  tcp:
  - route:
    - {destination: {host: db.example.com, subset: primary}, weight: 90}
    - {destination: {host: db.example.com, subset: replica}, weight: 10}
",
    );
    let names: Vec<&str> = c.resources.clusters.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "BlackHoleCluster",
            "PassthroughCluster",
            "outbound|5432|primary|db.example.com",
            "outbound|5432|replica|db.example.com",
            "outbound|5432||db.example.com",
        ]
    );
    let endpoints = |name: &str| -> Vec<String> {
        c.resources.clusters[name]
            .load_assignment
            .iter()
            .flat_map(|a| &a.endpoints)
            .flat_map(|l| &l.lb_endpoints)
            .map(|e| format!("{:?}", e.address))
            .collect()
    };
    assert_eq!(
        endpoints("outbound|5432|replica|db.example.com"),
        ["Socket(10.1.0.2:5432)"]
    );
    assert_eq!(endpoints("outbound|5432||db.example.com").len(), 2);
    let l = listener(&c, "0.0.0.0_5432");
    let chain = l
        .default_filter_chain
        .as_ref()
        .or(l.filter_chains.first())
        .expect("the port's chain");
    let NetworkFilter::TcpProxy(t) = &chain.filter else {
        panic!("{chain:?}");
    };
    assert_eq!(t.stat_prefix, "outbound|5432|primary|db.example.com");
    let ClusterSpecifier::Weighted(w) = &t.cluster else {
        panic!("{t:?}");
    };
    let weights: Vec<(&str, u32)> = w.iter().map(|w| (w.name.as_str(), w.weight)).collect();
    assert_eq!(
        weights,
        [
            ("outbound|5432|primary|db.example.com", 90),
            ("outbound|5432|replica|db.example.com", 10)
        ]
    );
}

/// A rule's `warmupDurationSecs` and `warmup` become the `slow_start_config` of the round
/// robin and least request clusters they reach, as istiod's `setSlowStartConfig` and
/// `setWarmup` write it; a consistent hash or RANDOM has none.
#[test]
fn warmup_becomes_slow_start_of_round_robin_and_least_request_clusters() {
    use portcullis_envoy::{RuntimeDouble, SlowStartConfig};
    let c = compiled(
        "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: app}
spec:
  hosts: [app.internal.com]
  ports: [{number: 80, name: http, protocol: HTTP}, {number: 8080, name: http-alt, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 10.1.0.1, labels: {v: one}}, {address: 10.1.0.2, labels: {v: two}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: app}
spec:
  host: app.internal.com
  trafficPolicy:
    loadBalancer: {warmupDurationSecs: 45s}
    portLevelSettings:
    - port: {number: 8080}
      loadBalancer: {simple: ROUND_ROBIN, warmup: {duration: 20s, aggression: 1.5}}
  subsets:
  - {name: one, labels: {v: one}, trafficPolicy: {loadBalancer: {simple: RANDOM, warmupDurationSecs: 9s}}}
  - {name: two, labels: {v: two}, trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x}, warmupDurationSecs: 9s}}}
",
    );
    let slow_start = |name: &str| {
        let cluster = &c.resources.clusters[name];
        (cluster.lb_policy, cluster.slow_start.as_deref().cloned())
    };
    assert_eq!(
        slow_start("outbound|80||app.internal.com"),
        (
            LbPolicy::LeastRequest,
            Some(SlowStartConfig {
                window: std::time::Duration::from_secs(45),
                aggression: None,
                min_weight_percent: None,
            })
        )
    );
    assert_eq!(
        slow_start("outbound|8080||app.internal.com"),
        (
            LbPolicy::RoundRobin,
            Some(SlowStartConfig {
                window: std::time::Duration::from_secs(20),
                aggression: Some(RuntimeDouble {
                    default_value: 1.5,
                    runtime_key: "(".into(),
                }),
                min_weight_percent: Some(10.0),
            })
        )
    );
    assert_eq!(slow_start("outbound|80|one|app.internal.com").1, None);
    assert_eq!(slow_start("outbound|80|two|app.internal.com").1, None);
    assert!(
        c.warnings.iter().all(|w| !w.contains("warmup")),
        "{:?}",
        c.warnings
    );
}
