//! Tests of the registry build and the snapshot's lookups, on resources loaded from YAML.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use portcullis_balance::Policy;
use portcullis_model::{Resource, Severity, load_str};
use proptest::prelude::*;

use crate::{
    BuildOptions, Cluster, Decision, OutboundMode, PASSTHROUGH_CLUSTER, Protocol, Snapshot, build,
    build_with_dns, normalize_host,
};

/// Loads YAML text, failing the test on any error finding.
pub(crate) fn load(yaml: &str) -> Vec<Resource> {
    let loaded = load_str(yaml, &Arc::new(PathBuf::from("t.yaml")));
    let errors: Vec<_> = loaded
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .map(ToString::to_string)
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
    loaded.resources
}

pub(crate) fn snapshot(yaml: &str) -> Snapshot {
    build(&load(yaml), &BuildOptions::default(), None, 1)
}

fn in_namespace(yaml: &str, namespace: &str) -> Snapshot {
    let options = BuildOptions {
        namespace: namespace.to_string(),
        ..BuildOptions::default()
    };
    build(&load(yaml), &options, None, 1)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The cluster name a decision routes to, or the decision's kind.
fn routed(d: &Decision) -> String {
    match d {
        Decision::Cluster(c) => c.name.to_string(),
        Decision::BlackHole => "blackhole".to_string(),
        Decision::Passthrough => "passthrough".to_string(),
        // Istio's block_all: what BlackHoleCluster is for HTTP.
        Decision::Direct(d) if d.status == 502 && d.body.is_none() => "blackhole".to_string(),
        Decision::Direct(d) => format!("direct {}", d.status),
        other => format!("{other:?}"),
    }
}

fn cluster<'a>(s: &'a Snapshot, name: &str) -> &'a Arc<Cluster> {
    s.cluster(name)
        .unwrap_or_else(|| panic!("no cluster {name}; have {:?}", names(s)))
}

fn names(s: &Snapshot) -> Vec<&str> {
    s.services().map(|c| &*c.name).collect()
}

/// `address:port weight` of each endpoint, sorted.
fn endpoints(c: &Cluster) -> Vec<String> {
    let mut out: Vec<String> = c
        .endpoints
        .iter()
        .map(|e| format!("{} w{}", e.display(), e.weight))
        .collect();
    out.sort();
    out
}

pub(crate) const MESH_ALLOW_ANY: &str = "
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    outboundTrafficPolicy:
      mode: ALLOW_ANY
";

const APP: &str = "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: app, namespace: default}
spec:
  hosts: [app.internal.com, api.internal.com]
  ports:
  - {number: 80, name: http, protocol: HTTP}
  - {number: 8080, name: http-alt, protocol: HTTP}
  resolution: STATIC
  endpoints:
  - address: 10.50.0.1
";

#[test]
fn clusters_are_named_outbound_port_host() {
    let s = snapshot(APP);
    assert_eq!(
        names(&s),
        [
            "outbound|8080||api.internal.com",
            "outbound|8080||app.internal.com",
            "outbound|80||api.internal.com",
            "outbound|80||app.internal.com",
        ]
    );
    let c = cluster(&s, "outbound|8080||app.internal.com");
    assert_eq!(&*c.host, "app.internal.com");
    assert_eq!(c.port, 8080);
    assert_eq!(c.protocol, Protocol::Http);
    assert_eq!(&*c.source, "ServiceEntry default/app");
    assert_eq!(s.version, 1);
}

#[test]
fn http_routes_by_exact_host_and_port() {
    let s = snapshot(APP);
    let app80 = "outbound|80||app.internal.com";
    assert_eq!(routed(&s.route_http("app.internal.com", 80)), app80);
    assert_eq!(routed(&s.route_http("app.internal.com:80", 80)), app80);
    assert_eq!(
        routed(&s.route_http("app.internal.com", 8080)),
        "outbound|8080||app.internal.com"
    );
    assert_eq!(
        routed(&s.route_http("api.internal.com", 80)),
        "outbound|80||api.internal.com"
    );
    // The port in an authority is ignored: the port the request arrived on decides, as
    // Istio's route tables (`ignore_port_in_host_matching`).
    assert_eq!(routed(&s.route_http("app.internal.com:8080", 80)), app80);
    assert_eq!(routed(&s.route_http("app.internal.com:12345", 80)), app80);
    assert_eq!(
        routed(&s.route_http("app.internal.com:80", 8080)),
        "outbound|8080||app.internal.com"
    );
    // A port the service does not declare.
    assert_eq!(routed(&s.route_http("app.internal.com", 81)), "blackhole");
    assert_eq!(
        routed(&s.route_http("app.internal.com:81", 81)),
        "blackhole"
    );
    assert_eq!(
        routed(&s.route_http("other.internal.com:80", 80)),
        "blackhole"
    );
    // Names that only look alike.
    for authority in [
        "internal.com",
        "xapp.internal.com",
        "app.internal.co",
        "app.internal.com.evil",
    ] {
        assert_eq!(
            routed(&s.route_http(authority, 80)),
            "blackhole",
            "{authority}"
        );
    }
}

#[test]
fn http_routing_ignores_case_and_one_trailing_dot() {
    let s = snapshot(APP);
    let app80 = "outbound|80||app.internal.com";
    for authority in [
        "APP.Internal.COM",
        "app.internal.com.",
        "App.Internal.Com.:80",
    ] {
        assert_eq!(routed(&s.route_http(authority, 80)), app80, "{authority}");
    }
    for authority in [
        "app.internal.com..",
        "app.internal.com:0",
        "app.internal.com:+80",
        "app.internal.com:080x",
        "app internal.com",
        "user@app.internal.com",
        "",
        ".",
    ] {
        assert_eq!(
            routed(&s.route_http(authority, 80)),
            "blackhole",
            "{authority:?}"
        );
    }
}

#[test]
fn an_authority_loses_its_port_only_when_it_has_one() {
    let s = snapshot(&format!(
        "{APP}{}{}",
        pod("v4", "default", "10.0.0.5", "{}", ""),
        pod("v6", "default", "fe80::5", "{}", ""),
    ));
    let app80 = "outbound|80||app.internal.com";
    for (authority, want) in [
        ("app.internal.com:80", app80),
        ("app.internal.com.:80", app80),
        ("app.internal.com:", "blackhole"),
        ("app.internal.com:80.", "blackhole"),
        ("app.internal.com:8080", app80),
        ("10.0.0.5", "PassthroughCluster"),
        ("10.0.0.5:80", "PassthroughCluster"),
        ("10.0.0.5:81", "PassthroughCluster"),
        ("::FFFF:10.0.0.5.", "PassthroughCluster"),
        ("[::ffff:10.0.0.5]:80", "PassthroughCluster"),
        ("fe80::5", "PassthroughCluster"),
        ("[fe80::5]", "PassthroughCluster"),
        ("[fe80::5]:80", "PassthroughCluster"),
        // A bare IPv6 literal keeps its last group: another address.
        ("fe80::5:80", "blackhole"),
        ("fe80::5]:80", "blackhole"),
    ] {
        assert_eq!(routed(&s.route_http(authority, 80)), want, "{authority}");
    }
}

const WILDCARDS: &str = "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wide, namespace: default}
spec:
  hosts: ['*.example.com']
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: narrow, namespace: default}
spec:
  hosts: ['*.b.example.com']
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: exact, namespace: default}
spec:
  hosts: [x.b.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: NONE
";

/// Wildcards two and four labels apart, and exact names under them.
const WILDCARDS_ORG: &str = "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: org, namespace: default}
spec:
  hosts: ['*.z.y.x.w.example.org', '*.x.w.example.org', y.x.w.example.org]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: NONE
";

#[test]
fn wildcards_match_subdomains_longest_suffix_first() {
    let s = snapshot(WILDCARDS);
    let wide = "outbound|80||*.example.com";
    let narrow = "outbound|80||*.b.example.com";
    assert_eq!(routed(&s.route_http("a.example.com", 80)), wide);
    assert_eq!(routed(&s.route_http("A.Example.Com.", 80)), wide);
    assert_eq!(routed(&s.route_http("b.example.com", 80)), wide);
    assert_eq!(routed(&s.route_http("a.b.example.com", 80)), narrow);
    assert_eq!(routed(&s.route_http("z.a.b.example.com", 80)), narrow);
    assert_eq!(routed(&s.route_http("a.c.example.com", 80)), wide);
    // Exact beats any wildcard.
    assert_eq!(
        routed(&s.route_http("x.b.example.com", 80)),
        "outbound|80||x.b.example.com"
    );
    // The wildcard never matches the bare domain or a lookalike.
    for authority in [
        "example.com",
        ".example.com",
        "example.com.",
        "aexample.com",
        "a.example.org",
        "a..example.com",
        "a.b.example.com..",
    ] {
        assert_eq!(
            routed(&s.route_http(authority, 80)),
            "blackhole",
            "{authority}"
        );
    }
    assert_eq!(routed(&s.route_http("a.example.com", 8080)), "blackhole");
}

/// Wildcards that differ in depth, one deeper than the lookup's per-depth index tells
/// apart (63 dots), and one on another port.
fn deep_wildcards(deep: &str) -> Snapshot {
    snapshot(&format!(
        "{WILDCARDS}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: deep, namespace: default}}
spec:
  hosts: ['*.{deep}', '*.z.y.x.w.example.org']
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: other-port, namespace: default}}
spec:
  hosts: ['*.example.org']
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  resolution: NONE
"
    ))
}

#[test]
fn wildcards_of_any_depth_match_the_longest_suffix() {
    // 71 dots: more than the index has bits.
    let deep = format!("{}example.com", "a.".repeat(70));
    let s = deep_wildcards(&deep);
    let wide = "outbound|80||*.example.com";
    let narrow = "outbound|80||*.b.example.com";
    let deepest = format!("outbound|80||*.{deep}");
    let org = "outbound|80||*.z.y.x.w.example.org";
    let org_8080 = "outbound|8080||*.example.org";
    for (authority, port, want) in [
        (format!("x.{deep}"), 80, deepest.as_str()),
        (format!("x.y.{deep}"), 80, &deepest),
        (format!("X.{}", deep.to_uppercase()), 80, &deepest),
        // One label short of the deep suffix: every long suffix misses, then the wide one.
        (deep.clone(), 80, wide),
        (format!("x.{}", &deep[2..]), 80, wide),
        ("q.a.b.example.com:80".into(), 80, narrow),
        ("Q.A.B.Example.Com.".into(), 80, narrow),
        ("q.z.y.x.w.example.org".into(), 80, org),
        ("p.q.z.y.x.w.example.org.".into(), 80, org),
        ("z.y.x.w.example.org".into(), 80, "blackhole"),
        ("q.y.x.w.example.org".into(), 80, "blackhole"),
        ("q.z.y.x.w.example.org".into(), 8080, org_8080),
        ("w.example.org".into(), 8080, org_8080),
        ("example.org".into(), 8080, "blackhole"),
        ("q.example.com".into(), 8080, "blackhole"),
        ("com".into(), 80, "blackhole"),
        ("localhost".into(), 80, "blackhole"),
    ] {
        assert_eq!(
            routed(&s.route_http(&authority, port)),
            want,
            "{authority}:{port}"
        );
    }
}

#[test]
fn unregistered_follows_the_outbound_mode() {
    let s = snapshot(APP);
    assert_eq!(s.outbound_mode(), OutboundMode::RegistryOnly);
    assert_eq!(routed(&s.route_http("other.com", 80)), "blackhole");
    assert_eq!(routed(&s.route_tcp(ip("192.0.2.1"), 5432)), "blackhole");
    assert_eq!(routed(&s.route_http("bad host", 80)), "blackhole");

    let s = snapshot(&format!("{APP}\n---\n{MESH_ALLOW_ANY}"));
    assert_eq!(s.outbound_mode(), OutboundMode::AllowAny);
    assert_eq!(routed(&s.route_http("other.com", 80)), "passthrough");
    assert_eq!(routed(&s.route_http("bad host", 80)), "passthrough");
    assert_eq!(routed(&s.route_tcp(ip("192.0.2.1"), 5432)), "passthrough");
    assert_eq!(
        routed(&s.route_http("app.internal.com", 80)),
        "outbound|80||app.internal.com"
    );
}

const TCP: &str = "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: default}
spec:
  hosts: [db.internal]
  addresses: [10.1.2.3]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 10.60.0.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wide, namespace: default}
spec:
  hosts: [wide.internal]
  addresses: [10.0.0.0/8]
  ports: [{number: 9000, name: tcp, protocol: TCP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: narrow, namespace: default}
spec:
  hosts: [narrow.internal]
  addresses: [10.1.0.0/16]
  ports: [{number: 9000, name: tcp, protocol: TCP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: redis, namespace: default}
spec:
  hosts: [redis.internal]
  ports: [{number: 6379, name: tcp, protocol: TCP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: default}
spec:
  hosts: [web.internal]
  addresses: [10.9.9.9]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: NONE
";

#[test]
fn tcp_routes_by_address_cidr_and_port() {
    let s = snapshot(TCP);
    let db = "outbound|5432||db.internal";
    assert_eq!(routed(&s.route_tcp(ip("10.1.2.3"), 5432)), db);
    assert_eq!(routed(&s.route_tcp(ip("::ffff:10.1.2.3"), 5432)), db);
    assert_eq!(routed(&s.route_tcp(ip("10.1.2.4"), 5432)), "blackhole");
    assert_eq!(routed(&s.route_tcp(ip("10.1.2.3"), 5433)), "blackhole");
    // A VIP is also the service's name for HTTP-style routing on its port.
    assert_eq!(routed(&s.route_host("10.1.2.3", 5432)), db);
    assert_eq!(routed(&s.route_host("::FFFF:10.1.2.3", 5432)), db);

    let wide = "outbound|9000||wide.internal";
    let narrow = "outbound|9000||narrow.internal";
    assert_eq!(routed(&s.route_tcp(ip("10.1.200.7"), 9000)), narrow);
    assert_eq!(routed(&s.route_tcp(ip("::ffff:10.1.200.7"), 9000)), narrow);
    assert_eq!(routed(&s.route_tcp(ip("10.2.0.1"), 9000)), wide);
    assert_eq!(routed(&s.route_tcp(ip("10.255.255.255"), 9000)), wide);
    assert_eq!(routed(&s.route_tcp(ip("11.0.0.1"), 9000)), "blackhole");
    assert_eq!(routed(&s.route_tcp(ip("10.1.200.7"), 9001)), "blackhole");

    // A TCP port without addresses claims the port on every IP.
    let redis = "outbound|6379||redis.internal";
    assert_eq!(routed(&s.route_tcp(ip("192.0.2.77"), 6379)), redis);
    assert_eq!(routed(&s.route_tcp(ip("2001:db8::1"), 6379)), redis);

    // An HTTP service owns no address for what is not HTTP (Istio puts it on the port's
    // wildcard listener), but its address is a name for Host routing.
    assert_eq!(routed(&s.route_tcp(ip("10.9.9.9"), 80)), "blackhole");
    assert_eq!(routed(&s.route_tcp(ip("10.9.9.8"), 80)), "blackhole");
    assert_eq!(
        routed(&s.route_http("10.9.9.9", 80)),
        "outbound|80||web.internal"
    );
}

#[test]
fn an_exact_address_beats_a_port_wide_claim() {
    let s = snapshot(&format!(
        "{TCP}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: cache, namespace: default}}
spec:
  hosts: [cache.internal]
  addresses: [10.7.7.7]
  ports: [{{number: 6379, name: tcp, protocol: TCP}}]
  resolution: NONE
"
    ));
    assert_eq!(
        routed(&s.route_tcp(ip("10.7.7.7"), 6379)),
        "outbound|6379||cache.internal"
    );
    assert_eq!(
        routed(&s.route_tcp(ip("10.7.7.8"), 6379)),
        "outbound|6379||redis.internal"
    );
}

#[test]
fn tcp_destinations_are_only_opaque_tcp_services() {
    let s = snapshot(TCP);
    assert!(s.is_tcp_destination(ip("10.1.2.3"), 5432));
    assert!(s.is_tcp_destination(ip("::ffff:10.1.2.3"), 5432));
    assert!(s.is_tcp_destination(ip("10.3.4.5"), 9000));
    assert!(s.is_tcp_destination(ip("198.51.100.1"), 6379));
    assert!(!s.is_tcp_destination(ip("10.9.9.9"), 80), "HTTP service");
    assert!(!s.is_tcp_destination(ip("10.1.2.3"), 80), "other port");
    assert!(!s.is_tcp_destination(ip("192.0.2.1"), 5432), "unregistered");
}

#[test]
fn inline_endpoints_with_port_overrides_target_port_and_weights() {
    let s = snapshot(
        "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: app, namespace: default}
spec:
  hosts: [app.internal.com]
  ports:
  - {number: 80, name: http, protocol: HTTP, targetPort: 9090}
  - {number: 443, name: https, protocol: HTTPS}
  resolution: STATIC
  endpoints:
  - address: 10.0.0.1
  - {address: 10.0.0.2, ports: {http: 8080}, weight: 5}
  - {address: 'fd00::3', weight: 2}
",
    );
    let http = cluster(&s, "outbound|80||app.internal.com");
    assert_eq!(
        endpoints(http),
        ["10.0.0.1:9090 w1", "10.0.0.2:8080 w5", "[fd00::3]:9090 w2"]
    );
    assert_eq!(http.balancer.len(), 3);
    assert_eq!(http.balancer.weight(1), Some(5));
    let https = cluster(&s, "outbound|443||app.internal.com");
    assert_eq!(https.protocol, Protocol::Tls);
    assert_eq!(
        endpoints(https),
        ["10.0.0.1:443 w1", "10.0.0.2:443 w5", "[fd00::3]:443 w2"]
    );
    assert_eq!(
        &*http.endpoints[0].source,
        "ServiceEntry default/app endpoints"
    );
}

#[test]
fn dns_resolution_without_endpoints_resolves_the_host() {
    let s = snapshot(
        "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: default}
spec:
  hosts: [api.example.org]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
",
    );
    // Never resolved: no endpoints (the proxy answers 503 UH), and the name is wanted.
    let c = cluster(&s, "outbound|443||api.example.org");
    assert!(c.endpoints.is_empty());
    assert!(s.dns_names.contains("api.example.org"));
}

#[test]
fn dns_answers_become_endpoints() {
    let yaml = "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: default}
spec:
  hosts: [api.example.org, rr.example.org]
  location: MESH_INTERNAL
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: rr, namespace: default}
spec:
  hosts: [one.example.org]
  location: MESH_INTERNAL
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS_ROUND_ROBIN
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: none, namespace: default}
spec:
  hosts: [none.example.org, \"*.wild.example.org\"]
  addresses: [192.0.2.0/24]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: NONE
";
    let answers = |name: &str| -> Option<Arc<[IpAddr]>> {
        match name {
            "api.example.org" => Some(Arc::new([ip("10.0.0.1"), ip("10.0.0.2")])),
            "one.example.org" => Some(Arc::new([ip("10.0.1.1"), ip("10.0.1.2")])),
            "none.example.org" => Some(Arc::new([ip("10.0.2.1")])),
            _ => None,
        }
    };
    let s = build_with_dns(&load(yaml), &BuildOptions::default(), None, 1, &answers);
    let c = cluster(&s, "outbound|443||api.example.org");
    assert_eq!(endpoints(c), ["10.0.0.1:443 w1", "10.0.0.2:443 w1"]);
    assert_eq!(c.endpoints[0].hostname.as_deref(), Some("api.example.org"));
    assert!(
        cluster(&s, "outbound|443||rr.example.org")
            .endpoints
            .is_empty()
    );
    // DNS_ROUND_ROBIN uses one address at a time.
    let c = cluster(&s, "outbound|80||one.example.org");
    assert_eq!(endpoints(c), ["10.0.1.1:80 w1"]);
    // NONE owns its addresses and its host's current answer, never anything else.
    let none = cluster(&s, "outbound|80||none.example.org");
    assert!(Snapshot::owns_destination(none, ip("10.0.2.1")));
    assert!(Snapshot::owns_destination(none, ip("192.0.2.77")));
    assert!(!Snapshot::owns_destination(none, ip("10.0.0.1")));
    let wild = cluster(&s, "outbound|80||*.wild.example.org");
    assert!(!Snapshot::owns_destination(wild, ip("10.0.2.1")));
    let wanted: Vec<&str> = s.dns_names.iter().map(String::as_str).collect();
    assert_eq!(
        wanted,
        [
            "api.example.org",
            "none.example.org",
            "one.example.org",
            "rr.example.org"
        ]
    );
}

const METADATA_SE: &str = "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: default}
spec:
  hosts: [metadata.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: default}
spec:
  hosts: [db.example.com]
  addresses: [10.0.0.7]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  resolution: DNS_ROUND_ROBIN
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: lit, namespace: default}
spec:
  hosts: [lit.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
  endpoints: [{address: lit.example.com}, {address: 192.168.7.7}]
";

/// What `METADATA_SE`'s names resolve to: a link-local, a loopback and a public address each.
fn guarded_answers(name: &str) -> Option<Arc<[IpAddr]>> {
    let addrs: &[&str] = match name {
        "metadata.example.com" => &["169.254.169.254", "2606:4700::1111"],
        "db.example.com" => &["127.0.0.1", "10.0.0.7"],
        "lit.example.com" => &["192.168.7.7", "192.168.7.8"],
        _ => return None,
    };
    Some(addrs.iter().map(|a| ip(a)).collect())
}

#[test]
fn ssrf_guard_drops_non_public_answers_of_external_services() {
    let s = build_with_dns(
        &load(METADATA_SE),
        &BuildOptions::default(),
        None,
        1,
        &guarded_answers,
    );
    let c = cluster(&s, "outbound|80||metadata.example.com");
    assert_eq!(endpoints(c), ["[2606:4700::1111]:80 w1"]);
    let rejected: Vec<String> = c.dns_rejected.iter().map(ToString::to_string).collect();
    assert_eq!(
        rejected,
        [
            r#"DNS answer 169.254.169.254 for "metadata.example.com" is link-local (cloud metadata) (SSRF guard)"#
        ]
    );
    assert!(s.warnings.iter().any(|w| w.contains("169.254.169.254")));
    // The ServiceEntry's own addresses allow what they cover; the round robin then takes
    // the first allowed answer.
    let db = cluster(&s, "outbound|5432||db.example.com");
    assert_eq!(endpoints(db), ["10.0.0.7:5432 w1"]);
    assert_eq!(db.dns_rejected[0].reason, "loopback");
    // An endpoint naming an IP allows that IP only: the named endpoint's answer joins the
    // literal one.
    let lit = cluster(&s, "outbound|80||lit.example.com");
    assert_eq!(endpoints(lit), ["192.168.7.7:80 w1", "192.168.7.7:80 w1"]);
    assert_eq!(lit.dns_rejected.len(), 1);
    assert_eq!(lit.dns_rejected[0].address, ip("192.168.7.8"));
}

#[test]
fn ssrf_guard_off_and_internal_services_use_every_answer() {
    let off = BuildOptions {
        ssrf_guard: false,
        ..BuildOptions::default()
    };
    let s = build_with_dns(&load(METADATA_SE), &off, None, 1, &guarded_answers);
    let c = cluster(&s, "outbound|80||metadata.example.com");
    assert_eq!(
        endpoints(c),
        ["169.254.169.254:80 w1", "[2606:4700::1111]:80 w1"]
    );
    assert!(c.dns_rejected.is_empty());
    let internal = METADATA_SE.replacen(
        "resolution: DNS\n",
        "resolution: DNS\n  location: MESH_INTERNAL\n",
        1,
    );
    let s = build_with_dns(
        &load(&internal),
        &BuildOptions::default(),
        None,
        1,
        &guarded_answers,
    );
    let c = cluster(&s, "outbound|80||metadata.example.com");
    assert_eq!(endpoints(c).len(), 2);
    assert!(c.dns_rejected.is_empty());
}

const SELECTED: &str = "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: app, namespace: default}
spec:
  hosts: [app.internal.com]
  ports:
  - {number: 80, name: http, protocol: HTTP}
  - {number: 81, name: admin, protocol: HTTP, targetPort: 9081}
  location: MESH_INTERNAL
  resolution: STATIC
  workloadSelector: {labels: {app: external}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: external, namespace: default}
spec:
  address: 10.50.0.1
  labels: {app: external}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: heavy, namespace: default}
spec:
  address: 10.50.0.2
  labels: {app: external, tier: x}
  ports: {http: 8080}
  weight: 3
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: elsewhere, namespace: other}
spec:
  address: 10.50.0.3
  labels: {app: external}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: unrelated, namespace: default}
spec:
  address: 10.50.0.4
  labels: {app: other}
";

#[test]
fn workload_entries_selected_in_the_same_namespace() {
    let s = snapshot(SELECTED);
    let http = cluster(&s, "outbound|80||app.internal.com");
    assert_eq!(endpoints(http), ["10.50.0.1:80 w1", "10.50.0.2:8080 w3"]);
    let admin = cluster(&s, "outbound|81||app.internal.com");
    assert_eq!(endpoints(admin), ["10.50.0.1:9081 w1", "10.50.0.2:9081 w3"]);
    let sources: Vec<&str> = http.endpoints.iter().map(|e| &*e.source).collect();
    assert!(
        sources.contains(&"WorkloadEntry default/external"),
        "{sources:?}"
    );
}

fn pod(name: &str, namespace: &str, ip: &str, labels: &str, status: &str) -> String {
    format!(
        "
---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {namespace}, labels: {labels}}}
spec:
  containers:
  - name: main
    ports: [{{name: web, containerPort: 9000}}]
status:
  podIP: {ip}
{status}"
    )
}

#[test]
fn only_running_ready_pods_are_endpoints() {
    let yaml = [
        SELECTED.to_string(),
        pod("bare", "default", "10.244.0.1", "{app: external}", ""),
        pod(
            "running",
            "default",
            "10.244.0.2",
            "{app: external}",
            "  phase: Running\n  conditions: [{type: Ready, status: 'True'}]\n",
        ),
        pod(
            "pending",
            "default",
            "10.244.0.3",
            "{app: external}",
            "  phase: Pending\n",
        ),
        pod(
            "unready",
            "default",
            "10.244.0.4",
            "{app: external}",
            "  phase: Running\n  conditions: [{type: Ready, status: 'False'}]\n",
        ),
        pod(
            "done",
            "default",
            "10.244.0.5",
            "{app: external}",
            "  phase: Succeeded\n",
        ),
        pod("other-ns", "other", "10.244.0.6", "{app: external}", ""),
        pod("other-app", "default", "10.244.0.7", "{app: nope}", ""),
    ]
    .concat();
    let s = snapshot(&yaml);
    let http = cluster(&s, "outbound|80||app.internal.com");
    assert_eq!(
        endpoints(http),
        [
            "10.244.0.1:80 w1",
            "10.244.0.2:80 w1",
            "10.50.0.1:80 w1",
            "10.50.0.2:8080 w3"
        ]
    );
    let admin = cluster(&s, "outbound|81||app.internal.com");
    assert!(endpoints(admin).contains(&"10.244.0.2:9081 w1".to_string()));
    let pod_sources: Vec<&str> = http
        .endpoints
        .iter()
        .map(|e| &*e.source)
        .filter(|s| s.starts_with("Pod "))
        .collect();
    assert_eq!(pod_sources.len(), 2);
    assert!(pod_sources.contains(&"Pod default/running"));

    // Ready pods are registered destinations by IP; the others are not.
    assert_eq!(
        routed(&s.route_tcp(ip("10.244.0.2"), 1234)),
        "PassthroughCluster"
    );
    assert_eq!(
        routed(&s.route_tcp(ip("::ffff:10.244.0.2"), 1234)),
        "PassthroughCluster"
    );
    assert_eq!(
        routed(&s.route_http("10.244.0.1:8080", 8080)),
        "PassthroughCluster"
    );
    assert_eq!(
        routed(&s.route_host("10.244.0.6", 80)),
        "PassthroughCluster"
    );
    assert_eq!(
        routed(&s.route_http("[::FFFF:10.244.0.1]:8080", 8080)),
        "PassthroughCluster"
    );
    assert_eq!(
        routed(&s.route_host("10.244.0.6.", 80)),
        "PassthroughCluster"
    );
    // Forwarded to the original destination, but only to a ready pod.
    let pods = cluster(&s, PASSTHROUGH_CLUSTER);
    assert!(Snapshot::owns_destination(pods, ip("10.244.0.2")));
    assert!(!Snapshot::owns_destination(pods, ip("10.244.0.3")));
    for unready in ["10.244.0.3", "10.244.0.4", "10.244.0.5"] {
        assert_eq!(
            routed(&s.route_tcp(ip(unready), 1234)),
            "blackhole",
            "{unready}"
        );
        assert_eq!(routed(&s.route_http(unready, 80)), "blackhole", "{unready}");
    }
}

const KUBE_SERVICE: &str = "
apiVersion: v1
kind: Service
metadata: {name: Shop-API, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: api}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: web, port: 81, targetPort: web}
  - {name: tcp-db, port: 5432}
  - {name: http-missing, port: 82, targetPort: nosuchport}
";

#[test]
fn kubernetes_services_register_their_names_and_cluster_ip() {
    let yaml = [
        KUBE_SERVICE.to_string(),
        pod("api-1", "shop", "10.244.1.1", "{app: api}", ""),
        pod("api-2", "default", "10.244.1.2", "{app: api}", ""),
    ]
    .concat();
    let fqdn80 = "outbound|80||shop-api.shop.svc.cluster.local";
    let s = in_namespace(&yaml, "shop");
    for host in [
        "shop-api.shop.svc.cluster.local",
        "shop-api.shop.svc",
        "shop-api.shop",
        "shop-api",
        "Shop-API.shop.svc.cluster.local.",
        "10.96.0.10",
    ] {
        assert_eq!(routed(&s.route_http(host, 80)), fqdn80, "{host}");
    }
    // The cluster IP on an HTTP port is a name for Host routing only; on other ports it
    // takes opaque traffic.
    assert_eq!(routed(&s.route_tcp(ip("10.96.0.10"), 80)), "blackhole");
    assert_eq!(
        routed(&s.route_tcp(ip("10.96.0.10"), 81)),
        "outbound|81||shop-api.shop.svc.cluster.local"
    );
    assert_eq!(routed(&s.route_tcp(ip("10.96.0.10"), 9999)), "blackhole");
    assert_eq!(routed(&s.route_http("shop-api.other", 80)), "blackhole");

    let c = cluster(&s, fqdn80);
    assert_eq!(&*c.source, "Service shop/Shop-API");
    assert_eq!(c.protocol, Protocol::Http);
    assert_eq!(endpoints(c), ["10.244.1.1:8080 w1"]);
    // A named targetPort resolves to the pod's container port of that name.
    assert_eq!(
        endpoints(cluster(&s, "outbound|81||shop-api.shop.svc.cluster.local")),
        ["10.244.1.1:9000 w1"]
    );
    // No targetPort: the service port.
    let db = cluster(&s, "outbound|5432||shop-api.shop.svc.cluster.local");
    assert_eq!(endpoints(db), ["10.244.1.1:5432 w1"]);
    assert_eq!(db.protocol, Protocol::Tcp);
    assert!(s.is_tcp_destination(ip("10.96.0.10"), 5432));
    // A named targetPort no container declares: no endpoint.
    assert!(
        cluster(&s, "outbound|82||shop-api.shop.svc.cluster.local")
            .endpoints
            .is_empty()
    );

    // The bare name is only a name inside the service's own namespace.
    let s = in_namespace(&yaml, "default");
    assert_eq!(routed(&s.route_http("shop-api", 80)), "blackhole");
    assert_eq!(routed(&s.route_http("shop-api.shop", 80)), fqdn80);
    assert_eq!(routed(&s.route_http("shop-api.shop.svc", 80)), fqdn80);
}

#[test]
fn export_to_limits_visibility() {
    let entry = |name: &str, export: &str| {
        format!(
            "
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: team-a}}
spec:
  hosts: [{name}.internal]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: NONE
  exportTo: {export}
"
        )
    };
    let yaml = [
        entry("private", "['.']"),
        entry("public", "['*']"),
        entry("shared", "[team-b]"),
        entry("default-export", "[]"),
    ]
    .concat();
    let visible = |ns: &str| {
        let s = in_namespace(&yaml, ns);
        let mut hosts: Vec<String> = s.services().map(|c| c.host.to_string()).collect();
        hosts.sort();
        for h in &hosts {
            assert!(matches!(s.route_http(h, 80), Decision::Cluster(_)));
        }
        hosts
    };
    assert_eq!(
        visible("team-a"),
        [
            "default-export.internal",
            "private.internal",
            "public.internal"
        ]
    );
    assert_eq!(
        visible("team-b"),
        [
            "default-export.internal",
            "public.internal",
            "shared.internal"
        ]
    );
    assert_eq!(
        visible("team-c"),
        ["default-export.internal", "public.internal"]
    );
    let s = in_namespace(&yaml, "team-c");
    assert_eq!(routed(&s.route_http("private.internal", 80)), "blackhole");
    assert_eq!(routed(&s.route_http("shared.internal", 80)), "blackhole");
}

fn sidecar(name: &str, namespace: &str, selector: Option<&str>, mode: &str) -> String {
    let selector = selector
        .map(|l| format!("  workloadSelector: {{labels: {l}}}\n"))
        .unwrap_or_default();
    format!(
        "
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: {name}, namespace: {namespace}}}
spec:
{selector}  outboundTrafficPolicy: {{mode: {mode}}}
"
    )
}

#[test]
fn outbound_mode_precedence() {
    let options = BuildOptions {
        namespace: "web".to_string(),
        workload_labels: BTreeMap::from([("app".to_string(), "frontend".to_string())]),
        ..BuildOptions::default()
    };
    let mode = |docs: &[String]| build(&load(&docs.concat()), &options, None, 1).outbound_mode();

    assert_eq!(mode(&[]), OutboundMode::RegistryOnly);
    let mut docs = vec![MESH_ALLOW_ANY.to_string()];
    assert_eq!(mode(&docs), OutboundMode::AllowAny);
    docs.push(sidecar("root", "istio-system", None, "REGISTRY_ONLY"));
    assert_eq!(mode(&docs), OutboundMode::RegistryOnly);
    docs.push(sidecar("ns", "web", None, "ALLOW_ANY"));
    assert_eq!(mode(&docs), OutboundMode::AllowAny);
    // Sidecars that do not apply to this workload change nothing.
    docs.push(sidecar(
        "other-labels",
        "web",
        Some("{app: backend}"),
        "REGISTRY_ONLY",
    ));
    docs.push(sidecar(
        "other-ns",
        "shop",
        Some("{app: frontend}"),
        "REGISTRY_ONLY",
    ));
    docs.push(sidecar("other-ns-wide", "shop", None, "REGISTRY_ONLY"));
    assert_eq!(mode(&docs), OutboundMode::AllowAny);
    docs.push(sidecar(
        "selected",
        "web",
        Some("{app: frontend}"),
        "REGISTRY_ONLY",
    ));
    assert_eq!(mode(&docs), OutboundMode::RegistryOnly);

    // A root-namespace Sidecar alone beats the mesh config.
    let docs = [
        MESH_ALLOW_ANY.to_string(),
        sidecar("root", "istio-system", None, "REGISTRY_ONLY"),
    ];
    assert_eq!(mode(&docs), OutboundMode::RegistryOnly);
    let docs = [sidecar("root", "istio-system", None, "ALLOW_ANY")];
    assert_eq!(mode(&docs), OutboundMode::AllowAny);
}

fn destination_rule(host: &str, namespace: &str, simple: &str) -> String {
    format!(
        "
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: dr-{simple}, namespace: {namespace}}}
spec:
  host: '{host}'
  trafficPolicy: {{loadBalancer: {{simple: {simple}}}}}
"
    )
}

#[test]
fn destination_rules_choose_the_balancer() {
    let policy = |docs: &[String], name: &str| {
        let s = in_namespace(&docs.concat(), "shop");
        cluster(&s, name).balancer.policy()
    };
    let app = "outbound|80||app.internal.com";
    assert_eq!(policy(&[APP.to_string()], app), Policy::LeastRequest);
    for (simple, expected) in [
        ("ROUND_ROBIN", Policy::RoundRobin),
        ("RANDOM", Policy::Random),
        ("LEAST_REQUEST", Policy::LeastRequest),
        ("LEAST_CONN", Policy::LeastRequest),
    ] {
        let docs = [
            APP.to_string(),
            destination_rule("app.internal.com", "default", simple),
        ];
        assert_eq!(policy(&docs, app), expected, "{simple}");
        assert_eq!(
            policy(&docs, "outbound|8080||app.internal.com"),
            expected,
            "{simple} applies to every port"
        );
        assert_eq!(
            policy(&docs, "outbound|80||api.internal.com"),
            Policy::LeastRequest
        );
    }
    let docs = [
        APP.to_string(),
        destination_rule("*.internal.com", "default", "RANDOM"),
    ];
    assert_eq!(policy(&docs, app), Policy::Random);
    assert_eq!(
        policy(&docs, "outbound|80||api.internal.com"),
        Policy::Random
    );

    // A short host is the Kubernetes service of that name in the rule's namespace.
    let svc = "outbound|80||shop-api.shop.svc.cluster.local";
    let docs = [
        KUBE_SERVICE.to_string(),
        destination_rule("shop-api", "shop", "ROUND_ROBIN"),
    ];
    assert_eq!(policy(&docs, svc), Policy::RoundRobin);
    let docs = [
        KUBE_SERVICE.to_string(),
        destination_rule("shop-api", "default", "ROUND_ROBIN"),
    ];
    assert_eq!(policy(&docs, svc), Policy::LeastRequest);
}

/// A DestinationRule `default/app` for `app.internal.com` with `spec` after its host.
fn app_rule(spec: &str) -> String {
    format!(
        "
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: app, namespace: default}}
spec:
  host: app.internal.com
{spec}"
    )
}

/// `http.maxConcurrentStreams` caps the streams of each HTTP/2 connection, where the
/// cluster speaks HTTP/2 upstream: its port's protocol, or an h2 upgrade of an HTTP port.
#[test]
fn max_concurrent_streams_applies_to_clusters_speaking_http2_upstream() {
    let service = APP.replace(
        "protocol: HTTP}\n  - {number: 8080",
        "protocol: HTTP2}\n  - {number: 8080",
    );
    let rule = &app_rule(
        "  trafficPolicy:
    connectionPool:
      http: {maxConcurrentStreams: 50}
    portLevelSettings:
    - port: {number: 8080}
      connectionPool:
        http: {maxConcurrentStreams: 20, h2UpgradePolicy: UPGRADE}
",
    );
    let s = snapshot(&[service.as_str(), rule].concat());
    let streams = |name| cluster(&s, name).connection_limits().max_concurrent_streams;
    assert_eq!(streams("outbound|80||app.internal.com"), Some(50));
    assert_eq!(streams("outbound|8080||app.internal.com"), Some(20));
    let plain = &app_rule(
        "  trafficPolicy:
    connectionPool:
      http: {maxConcurrentStreams: 50}
",
    );
    let s = snapshot(&[APP, plain].concat());
    let c = cluster(&s, "outbound|80||app.internal.com");
    assert_eq!(c.connection_limits().max_concurrent_streams, None);
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
}

#[test]
fn a_connection_pool_becomes_the_clusters_circuit_breakers_as_istiod_writes_them() {
    use crate::Resource as Limit;
    let rule = &app_rule(
        "  trafficPolicy:
    loadBalancer: {simple: RANDOM}
    connectionPool:
      tcp:
        maxConnections: 1
        connectTimeout: 250ms
        maxConnectionDuration: 30m
        tcpKeepalive: {probes: 3, time: 600s, interval: 75s}
      http:
        http1MaxPendingRequests: 2
        http2MaxRequests: 3
        maxRetries: 0
        idleTimeout: 30s
        maxRequestsPerConnection: 10
        maxConcurrentStreams: 50
        useClientProtocol: true
    portLevelSettings:
    - port: {number: 8080}
      connectionPool:
        http: {http2MaxRequests: 7}
",
    );
    let s = snapshot(&[APP, rule].concat());
    let c = cluster(&s, "outbound|80||app.internal.com");
    let b = &c.breakers;
    assert_eq!(b.threshold(Limit::Connections), 1);
    assert_eq!(b.threshold(Limit::PendingRequests), 2);
    assert_eq!(b.threshold(Limit::Requests), 3);
    // Zero is Istio's "not set": unlimited.
    assert_eq!(b.threshold(Limit::Retries), u32::MAX);
    assert_eq!(c.connect_timeout, std::time::Duration::from_millis(250));
    assert_eq!(c.balancer.policy(), Policy::Random);
    let secs = std::time::Duration::from_secs;
    assert_eq!(
        c.connection_limits(),
        portcullis_envoy::ConnectionLimits {
            idle_timeout: Some(secs(30)),
            max_requests_per_connection: Some(10),
            max_connection_duration: Some(secs(1800)),
            // Not HTTP/2 upstream: istiod writes no HTTP/2 options to hold it.
            max_concurrent_streams: None,
            tcp_keepalive: Some(portcullis_envoy::TcpKeepalive {
                probes: Some(3),
                time: Some(secs(600)),
                interval: Some(secs(75)),
            }),
        }
    );
    // `useClientProtocol`: the client's HTTP version upstream.
    assert_eq!(c.protocol, crate::Protocol::Auto);
    // The port's pool replaces the rule's whole; its balancer is still the rule's.
    let alt = cluster(&s, "outbound|8080||app.internal.com");
    assert_eq!(alt.breakers.threshold(Limit::Requests), 7);
    assert_eq!(alt.breakers.threshold(Limit::Connections), u32::MAX);
    assert_eq!(alt.connect_timeout, std::time::Duration::from_secs(10));
    assert_eq!(
        alt.connection_limits(),
        portcullis_envoy::ConnectionLimits::default()
    );
    assert_eq!(alt.balancer.policy(), Policy::Random);
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    // Other hosts keep Istio's defaults.
    let api = cluster(&s, "outbound|80||api.internal.com");
    assert_eq!(api.breakers.threshold(Limit::Connections), u32::MAX);
    assert_eq!(api.connect_timeout, std::time::Duration::from_secs(10));
}

fn origin(t: &crate::EndpointTransport) -> Option<Arc<crate::TlsOrigin>> {
    match t {
        crate::EndpointTransport::Tls(origin) => Some(Arc::clone(origin)),
        _ => None,
    }
}

fn refused(e: &crate::Endpoint) -> Option<&str> {
    match &e.transport {
        crate::EndpointTransport::Refused(why) => Some(why),
        _ => None,
    }
}

#[test]
fn a_destination_rules_tls_originates_on_the_port_it_names() {
    let rule = &app_rule(
        "  trafficPolicy:
    tls: {mode: SIMPLE, insecureSkipVerify: true}
    portLevelSettings:
    - port: {number: 8080}
      tls: {mode: DISABLE}
",
    );
    let s = snapshot(&[APP, rule].concat());
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    let tls = cluster(&s, "outbound|80||app.internal.com").endpoints[0]
        .transport
        .clone();
    let tls = origin(&tls).expect("TLS on port 80");
    // No SNI in the rule: the request's host is sent (auto_sni).
    assert!(tls.auto_sni && tls.sni.is_none());
    assert_eq!(
        tls.server_name(Some("app.internal.com:80")).as_deref(),
        Some("app.internal.com")
    );
    // The port's own `tls` (DISABLE) replaces the rule's; other hosts are untouched.
    assert!(matches!(
        cluster(&s, "outbound|8080||app.internal.com").endpoints[0].transport,
        crate::EndpointTransport::Plaintext
    ));
    assert!(matches!(
        cluster(&s, "outbound|80||api.internal.com").endpoints[0].transport,
        crate::EndpointTransport::Plaintext
    ));
}

#[test]
fn tls_that_cannot_be_set_up_refuses_connections_rather_than_send_plaintext() {
    let rule = &app_rule(
        "  trafficPolicy:
    tls: {mode: MUTUAL, credentialName: missing}
",
    );
    let s = snapshot(&[APP, rule].concat());
    let e = &cluster(&s, "outbound|80||app.internal.com").endpoints[0];
    assert!(
        refused(e).is_some_and(|w| w.contains("missing")),
        "{:?}",
        refused(e)
    );
    assert!(
        s.warnings
            .iter()
            .any(|w| w.contains("outbound|80||app.internal.com")
                && w.contains("no Secret default/missing")),
        "{:?}",
        s.warnings
    );
    // A CA file that does not exist: the same.
    let rule = &app_rule(
        "  trafficPolicy:
    tls: {mode: SIMPLE, caCertificates: /nonexistent/ca.pem}
",
    );
    let s = snapshot(&[APP, rule].concat());
    let e = &cluster(&s, "outbound|80||app.internal.com").endpoints[0];
    assert!(refused(e).is_some());
}

#[test]
fn credential_name_is_read_from_a_secret_in_the_rules_namespace() {
    let ca = {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    };
    let indented: String = ca.lines().map(|l| format!("    {l}\n")).collect();
    let secret = format!(
        "
---
apiVersion: v1
kind: Secret
metadata: {{name: api-cacert, namespace: default}}
stringData:
  ca.crt: |
{indented}"
    );
    let rule = &app_rule(
        "  trafficPolicy:
    tls: {mode: SIMPLE, credentialName: api, sni: api.example.com}
",
    );
    let s = snapshot(&[APP, rule, &secret].concat());
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    let tls = cluster(&s, "outbound|80||app.internal.com").endpoints[0]
        .transport
        .clone();
    let tls = origin(&tls).expect("TLS");
    assert_eq!(tls.sni.as_deref(), Some("api.example.com"));
}

#[test]
fn every_part_of_a_destination_rule_is_applied() {
    let rule = &app_rule(
        "  trafficPolicy:
    loadBalancer: {consistentHash: {httpHeaderName: x-user}}
    connectionPool:
      tcp: {maxConnections: 1, tcpKeepalive: {time: 7200s}}
      http: {maxRequestsPerConnection: 1}
    outlierDetection: {consecutive5xxErrors: 5}
    portLevelSettings:
    - port: {number: 8080}
      tls: {mode: SIMPLE, caCrl: /etc/crl.pem}
  subsets:
  - {name: v1, labels: {version: v1}, trafficPolicy: {outlierDetection: {consecutive5xxErrors: 1}}}
  - {name: v2, labels: {version: v2}, trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}}
",
    );
    let s = snapshot(&[APP, rule].concat());
    assert!(
        s.warnings.iter().all(|w| !w.contains("not applied")),
        "{:?}",
        s.warnings
    );
    // The revocation list is read with the port's TLS settings: a missing file leaves its
    // endpoints without a connection, never unchecked.
    match &cluster(&s, "outbound|8080||app.internal.com").endpoints[0].transport {
        crate::EndpointTransport::Refused(why) => assert!(why.contains("/etc/crl.pem"), "{why}"),
        other => panic!("{other:?}"),
    }
    let c = cluster(&s, "outbound|80||app.internal.com");
    assert_eq!(c.breakers.threshold(crate::Resource::Connections), 1);
    assert!(c.balancer.policy().is_consistent_hash());
}

#[test]
fn a_destination_rule_with_a_workload_selector_applies_only_to_the_workloads_it_selects() {
    let rule = |name: &str, namespace: &str, selector: &str, lb: &str| {
        format!(
            "
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  host: app.internal.com
{selector}  trafficPolicy:
    loadBalancer: {{simple: {lb}}}
"
        )
    };
    let frontend = "  workloadSelector: {matchLabels: {app: frontend}}\n";
    let as_frontend = |yaml: &str, namespace: &str| {
        let options = BuildOptions {
            namespace: namespace.to_string(),
            workload_labels: BTreeMap::from([("app".to_string(), "frontend".to_string())]),
            ..BuildOptions::default()
        };
        let s = build(&load(yaml), &options, None, 1);
        cluster(&s, "outbound|80||app.internal.com")
            .balancer
            .policy()
    };
    let general = rule("general", "default", "", "RANDOM");
    let selecting = rule("selecting", "default", frontend, "ROUND_ROBIN");
    // Selected: it wins over the rule for every client, in either order.
    for docs in [[&general, &selecting], [&selecting, &general]] {
        let yaml = format!("{APP}{}{}", docs[0], docs[1]);
        assert_eq!(
            as_frontend(&yaml, "default"),
            portcullis_balance::Policy::RoundRobin
        );
    }
    // Another workload, or the same labels in another namespace: not for them.
    let yaml = format!("{APP}{general}{selecting}");
    assert_eq!(
        cluster(&snapshot(&yaml), "outbound|80||app.internal.com")
            .balancer
            .policy(),
        portcullis_balance::Policy::Random
    );
    assert_eq!(
        as_frontend(&yaml, "shop"),
        portcullis_balance::Policy::Random
    );
}

#[test]
fn the_parts_of_a_destination_rule_not_applied_yet_are_named() {
    let rule = &app_rule(
        "  trafficPolicy:
    tunnel: {protocol: CONNECT, targetHost: egress.example.com, targetPort: 8080}
    proxyProtocol: {version: V1}
  subsets:
  - {name: v1, labels: {version: v1}, trafficPolicy: {retryBudget: {percent: {value: 20}}}}
",
    );
    let s = snapshot(&[APP, rule].concat());
    assert_eq!(
        s.warnings,
        [
            "DestinationRule default/app: spec.trafficPolicy.tunnel is not applied yet",
            "DestinationRule default/app: spec.trafficPolicy.proxyProtocol is not applied yet",
            "DestinationRule default/app: spec.subsets[0].trafficPolicy.retryBudget is not applied yet",
        ]
    );
}

#[test]
fn the_most_specific_destination_rule_applies() {
    let app = "outbound|80||app.internal.com";
    let api = "outbound|80||api.internal.com";
    // Whatever the order, an exact host beats a wildcard, which beats `*`.
    let rules = [
        destination_rule("*", "default", "RANDOM"),
        destination_rule("*.internal.com", "default", "LEAST_REQUEST"),
        destination_rule("app.internal.com", "default", "ROUND_ROBIN"),
    ];
    for order in [[0, 1, 2], [2, 1, 0], [1, 0, 2]] {
        let mut docs = vec![APP.to_string()];
        docs.extend(order.iter().map(|&i| rules[i].clone()));
        let s = snapshot(&docs.concat());
        assert_eq!(
            cluster(&s, app).balancer.policy(),
            Policy::RoundRobin,
            "{order:?}"
        );
        assert_eq!(
            cluster(&s, api).balancer.policy(),
            Policy::LeastRequest,
            "{order:?}"
        );
    }
    let s = snapshot(&[APP.to_string(), rules[0].clone()].concat());
    assert_eq!(cluster(&s, api).balancer.policy(), Policy::Random);
}

/// The instant `address` of cluster `name` joined it.
fn added(s: &Snapshot, name: &str, address: &str) -> std::time::Instant {
    cluster(s, name)
        .endpoints
        .iter()
        .find(|e| e.display() == address)
        .unwrap_or_else(|| panic!("{name} has no {address}"))
        .state
        .added()
}

#[tokio::test(start_paused = true)]
async fn a_reload_keeps_the_warm_up_of_endpoints_it_keeps() {
    let rule = app_rule("  trafficPolicy: {loadBalancer: {warmupDurationSecs: 60s}}\n");
    let name = "outbound|80||app.internal.com";
    let options = BuildOptions::default();
    let first = build(&load(&[APP, &rule].concat()), &options, None, 1);
    let started = tokio::time::Instant::now().into_std();
    assert_eq!(added(&first, name, "10.50.0.1:80"), started);
    tokio::time::advance(std::time::Duration::from_secs(30)).await;
    // A second endpoint joins; the first keeps its place in the ramp.
    let two = APP.replace(
        "  - address: 10.50.0.1\n",
        "  - address: 10.50.0.1\n  - address: 10.50.0.2\n",
    );
    let second = build(
        &load(&[two.as_str(), &rule].concat()),
        &options,
        Some(&first),
        2,
    );
    assert_eq!(added(&second, name, "10.50.0.1:80"), started);
    let joined = added(&second, name, "10.50.0.2:80");
    assert_eq!(joined, started + std::time::Duration::from_secs(30));
    // Half way through its own warm-up the older endpoint weighs 0.5, the new one 0.1.
    let c = cluster(&second, name);
    let now = tokio::time::Instant::now().into_std();
    let picks = 20_000;
    let newest = (0..picks)
        .filter(|_| {
            c.pick_hashed(None, (&[], None), now)
                .expect("picks")
                .1
                .display()
                == "10.50.0.2:80"
        })
        .count();
    let share = newest as f64 / f64::from(picks);
    assert!((share - 0.1 / 0.6).abs() < 0.02, "{share}");
    // An endpoint that leaves and comes back starts over.
    tokio::time::advance(std::time::Duration::from_secs(1)).await;
    let third = build(&load(&[APP, &rule].concat()), &options, Some(&second), 3);
    let fourth = build(
        &load(&[two.as_str(), &rule].concat()),
        &options,
        Some(&third),
        4,
    );
    assert!(added(&fourth, name, "10.50.0.2:80") > joined);
}

#[test]
fn endpoint_state_survives_a_rebuild_for_the_same_cluster_and_address() {
    let resources = load(SELECTED);
    let options = BuildOptions::default();
    let first = build(&resources, &options, None, 1);
    let name = "outbound|80||app.internal.com";
    let old = cluster(&first, name);
    let index = old
        .endpoints
        .iter()
        .position(|e| e.display() == "10.50.0.1:80")
        .unwrap();
    let _active = old.endpoints[index].state.start();
    assert_eq!(old.endpoints[index].state.active(), 1);

    let second = build(&resources, &options, Some(&first), 2);
    assert_eq!(second.version, 2);
    let new = cluster(&second, name);
    let carried = new
        .endpoints
        .iter()
        .find(|e| e.display() == "10.50.0.1:80")
        .unwrap();
    assert!(Arc::ptr_eq(&carried.state, &old.endpoints[index].state));
    assert_eq!(carried.state.active(), 1);
    assert_eq!(carried.state.total(), 1);
    // The balancer of the new snapshot sees the same counters.
    let balancer_index = new
        .endpoints
        .iter()
        .position(|e| e.display() == "10.50.0.1:80")
        .unwrap();
    assert_eq!(new.balancer.state(balancer_index).unwrap().active(), 1);
    // Another endpoint of the cluster, and the same address in another cluster, start fresh.
    let other = new
        .endpoints
        .iter()
        .find(|e| e.display() == "10.50.0.2:8080")
        .unwrap();
    assert_eq!(other.state.active(), 0);
    let admin = cluster(&second, "outbound|81||app.internal.com");
    assert!(admin.endpoints.iter().all(|e| e.state.active() == 0));

    // The endpoint moves to another address: nothing to carry over.
    let moved = load(&SELECTED.replace("address: 10.50.0.1", "address: 10.50.0.9"));
    let third = build(&moved, &options, Some(&second), 3);
    let new = cluster(&third, name);
    assert_eq!(endpoints(new), ["10.50.0.2:8080 w3", "10.50.0.9:80 w1"]);
    assert!(new.endpoints.iter().all(|e| e.state.active() == 0));
}

#[test]
fn conflicting_hosts_first_wins_with_a_warning() {
    let entry = |name: &str, namespace: &str, endpoint: &str| {
        format!(
            "
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  hosts: [dup.internal]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: {endpoint}}}]
"
        )
    };
    // Ordered by namespace and name within the proxy's namespace, whatever the file order.
    let yaml = [
        entry("b", "default", "10.0.0.2"),
        entry("a", "default", "10.0.0.1"),
    ]
    .concat();
    let s = snapshot(&yaml);
    let c = cluster(&s, "outbound|80||dup.internal");
    assert_eq!(&*c.source, "ServiceEntry default/a");
    assert_eq!(endpoints(c), ["10.0.0.1:80 w1"]);
    assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
    assert!(
        s.warnings[0].contains("outbound|80||dup.internal")
            && s.warnings[0].contains("ServiceEntry default/a")
            && s.warnings[0].contains("ServiceEntry default/b"),
        "{:?}",
        s.warnings
    );

    // The proxy's own namespace wins over a namespace that sorts first, and a host's
    // ServiceEntries in other namespaces are not candidates: no conflict, no warning.
    let yaml = [
        entry("a", "aaa", "10.0.0.1"),
        entry("z", "default", "10.0.0.2"),
    ]
    .concat();
    let s = snapshot(&yaml);
    assert_eq!(
        &*cluster(&s, "outbound|80||dup.internal").source,
        "ServiceEntry default/z"
    );
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
}

/// A ServiceEntry for `host` in `namespace` with `ports` (`number` list, HTTP).
fn entry_in(name: &str, namespace: &str, host: &str, ports: &[u16], endpoint: &str) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|p| format!("{{number: {p}, name: http-{p}, protocol: HTTP}}"))
        .collect();
    format!(
        "
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  hosts: ['{host}']
  ports: [{}]
  resolution: STATIC
  endpoints: [{{address: {endpoint}}}]
",
        ports.join(", ")
    )
}

#[test]
fn a_host_is_served_by_one_namespace_and_never_merges_ports_across_namespaces() {
    let yaml = [
        entry_in("a", "aaa", "dup.internal", &[80, 8080], "10.0.0.1"),
        entry_in("b", "bbb", "dup.internal", &[80, 9090], "10.0.0.2"),
    ]
    .concat();
    // Neither is in the proxy's namespace and both are as old: the first in namespace
    // order, with its ports only.
    let s = snapshot(&yaml);
    assert_eq!(
        names(&s),
        ["outbound|8080||dup.internal", "outbound|80||dup.internal"]
    );
    assert_eq!(
        endpoints(cluster(&s, "outbound|80||dup.internal")),
        ["10.0.0.1:80 w1"]
    );
    assert_eq!(routed(&s.route_http("dup.internal", 9090)), "blackhole");
    // In namespace bbb its own entry, with its own ports.
    let s = in_namespace(&yaml, "bbb");
    assert_eq!(
        names(&s),
        ["outbound|80||dup.internal", "outbound|9090||dup.internal"]
    );
    assert_eq!(
        endpoints(cluster(&s, "outbound|80||dup.internal")),
        ["10.0.0.2:80 w1"]
    );
    assert_eq!(routed(&s.route_http("dup.internal", 8080)), "blackhole");
    // Otherwise the oldest service wins, as Istio orders services by creation time.
    let older = entry_in("b", "bbb", "dup.internal", &[80, 9090], "10.0.0.2").replace(
        "namespace: bbb}",
        "namespace: bbb, creationTimestamp: '2020-01-01T00:00:00Z'}",
    );
    let newer = entry_in("a", "aaa", "dup.internal", &[80, 8080], "10.0.0.1").replace(
        "namespace: aaa}",
        "namespace: aaa, creationTimestamp: '2024-01-01T00:00:00Z'}",
    );
    let s = snapshot(&[newer, older].concat());
    assert_eq!(
        endpoints(cluster(&s, "outbound|80||dup.internal")),
        ["10.0.0.2:80 w1"]
    );
    // Entries of one namespace merge their ports.
    let yaml = [
        entry_in("a", "aaa", "dup.internal", &[80], "10.0.0.1"),
        entry_in("b", "aaa", "dup.internal", &[81], "10.0.0.2"),
    ]
    .concat();
    assert_eq!(
        names(&snapshot(&yaml)),
        ["outbound|80||dup.internal", "outbound|81||dup.internal"]
    );
}

#[test]
fn a_kubernetes_service_wins_its_host_over_service_entries() {
    let fqdn = "shop-api.shop.svc.cluster.local";
    // Within its namespace, whatever the order: the Service, all of its ports.
    let yaml = format!(
        "{}\n---{KUBE_SERVICE}{}",
        entry_in("override", "shop", fqdn, &[80, 9999], "10.0.0.7"),
        pod("api-1", "shop", "10.244.1.1", "{app: api}", "")
    );
    for namespace in ["shop", "default"] {
        let s = in_namespace(&yaml, namespace);
        let c = cluster(&s, &format!("outbound|80||{fqdn}"));
        assert_eq!(&*c.source, "Service shop/Shop-API", "{namespace}");
        assert_eq!(endpoints(c), ["10.244.1.1:8080 w1"]);
        assert!(s.cluster(&format!("outbound|9999||{fqdn}")).is_none());
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    }
    // From another namespace than the proxy's, too.
    let yaml = format!(
        "{}\n---{KUBE_SERVICE}",
        entry_in("squat", "aaa", fqdn, &[80], "10.0.0.7")
    );
    let s = in_namespace(&yaml, "default");
    assert_eq!(
        &*cluster(&s, &format!("outbound|80||{fqdn}")).source,
        "Service shop/Shop-API"
    );
    // But an entry in the proxy's own namespace comes first.
    let s = in_namespace(&yaml, "aaa");
    assert_eq!(
        &*cluster(&s, &format!("outbound|80||{fqdn}")).source,
        "ServiceEntry aaa/squat"
    );
    assert!(s.cluster(&format!("outbound|81||{fqdn}")).is_none());
}

#[test]
fn kubernetes_service_export_to_annotation_limits_visibility() {
    let yaml = "
apiVersion: v1
kind: Service
metadata:
  name: private
  namespace: shop
  annotations: {networking.istio.io/exportTo: '.'}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80}]
";
    let name = "outbound|80||private.shop.svc.cluster.local";
    assert_eq!(
        routed(&in_namespace(yaml, "shop").route_http("private", 80)),
        name
    );
    let s = in_namespace(yaml, "default");
    assert_eq!(routed(&s.route_http("private.shop", 80)), "blackhole");
    assert_eq!(routed(&s.route_tcp(ip("10.96.0.20"), 80)), "blackhole");
}

#[test]
fn a_name_claimed_by_two_services_warns() {
    // Not the same cluster name, but the same routable name on the same port.
    let yaml = format!(
        "{KUBE_SERVICE}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: short, namespace: default}}
spec:
  hosts: [shop-api.shop]
  addresses: [10.96.0.10]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: NONE
"
    );
    let s = snapshot(&yaml);
    assert_eq!(
        routed(&s.route_http("shop-api.shop", 80)),
        "outbound|80||shop-api.shop"
    );
    assert_eq!(
        routed(&s.route_http("10.96.0.10", 80)),
        "outbound|80||shop-api.shop"
    );
    assert!(
        s.warnings
            .iter()
            .any(|w| w.contains("shop-api.shop") && w.contains("Service shop/Shop-API")),
        "{:?}",
        s.warnings
    );
    assert!(
        s.warnings.iter().any(|w| w.contains("10.96.0.10")),
        "{:?}",
        s.warnings
    );
}

proptest! {
    #[test]
    fn route_http_never_panics(authority in "\\PC{0,64}", port in any::<u16>()) {
        let s = snapshot(&format!("{APP}\n---\n{WILDCARDS}"));
        let d = s.route_http(&authority, port);
        // Whatever matched, it is a registered cluster on that port or the policy's answer.
        match d {
            Decision::Cluster(c) => prop_assert_eq!(c.port, port),
            Decision::BlackHole => {}
            other => prop_assert!(false, "unexpected {other:?}"),
        }
    }

    #[test]
    fn route_http_never_panics_on_authority_like_strings(
        authority in "\\[?[a-zA-Z0-9.:*_\\-\\]\\[]{0,40}(:[0-9]{0,6})?",
        port in any::<u16>(),
    ) {
        let s = snapshot(&format!("{APP}\n---\n{WILDCARDS}"));
        let _ = s.route_http(&authority, port);
    }

    #[test]
    fn wildcard_routing_is_the_longest_registered_suffix(
        labels in prop::collection::vec(
            prop::sample::select(&["a", "b", "x", "w", "y", "z", "B", "example"][..]),
            0..4,
        ),
        // Names near and under the registered ones, so that most cases match something.
        tail in prop::sample::select(&[
            "com", "example.com", "b.example.com", "x.b.example.com", "org", "w.example.org",
            "x.w.example.org", "y.x.w.example.org", "z.y.x.w.example.org", "X.W.Example.Org",
        ][..]),
        trailing_dot in any::<bool>(),
        with_port in any::<bool>(),
    ) {
        let s = snapshot(&format!("{WILDCARDS}\n---\n{WILDCARDS_ORG}"));
        let host = labels.iter().chain([&tail]).copied().collect::<Vec<_>>().join(".");
        let authority = format!(
            "{host}{}{}",
            if trailing_dot { "." } else { "" },
            if with_port { ":80" } else { "" },
        );
        // Every name the two documents register on port 80, checked one by one.
        let registered = [
            "*.example.com",
            "*.b.example.com",
            "x.b.example.com",
            "*.z.y.x.w.example.org",
            "*.x.w.example.org",
            "y.x.w.example.org",
        ];
        let host = host.to_ascii_lowercase();
        let suffixes = registered.iter().filter_map(|r| r.strip_prefix('*'));
        let want = if registered.contains(&host.as_str()) {
            format!("outbound|80||{host}")
        } else {
            suffixes
                .filter(|suffix| host.len() > suffix.len() && host.ends_with(suffix))
                .max_by_key(|suffix| suffix.len())
                .map_or("blackhole".to_string(), |suffix| format!("outbound|80||*{suffix}"))
        };
        prop_assert_eq!(routed(&s.route_http(&authority, 80)), want, "{}", authority);
    }

    #[test]
    fn route_http_is_route_host_on_the_split_authority(
        authority in "\\[?[a-fA-F0-9.:_\\-\\]xp]{0,20}(:[0-9]{0,6})?\\.?|\
                      (::[fF]{4}:)?10\\.0\\.0\\.[0-9](:[0-9]{0,3})?|\
                      [aA]\\.[bB]\\.example\\.com\\.?(:[0-9]{0,3})?",
        port in prop::sample::select(&[80u16, 8080][..]),
    ) {
        let s = snapshot(&format!(
            "{APP}\n---\n{WILDCARDS}{}{}",
            pod("v4", "default", "10.0.0.5", "{}", ""),
            pod("v6", "default", "fe80::5", "{}", ""),
        ));
        // The authority's port plays no part.
        let want = match crate::split_host_port(&authority) {
            Ok((host, _)) => s.route_host(host, port),
            Err(_) => s.unmatched(),
        };
        prop_assert_eq!(routed(&s.route_http(&authority, port)), routed(&want));
    }

    #[test]
    fn normalize_host_is_idempotent(host in "\\PC{0,40}|[a-zA-Z0-9.:*_\\-]{0,40}") {
        if let Ok(once) = normalize_host(&host) {
            prop_assert_eq!(normalize_host(&once), Ok(once.clone()));
        }
    }
}

#[test]
fn normalize_host_rejects_empty_labels() {
    use crate::HostError;
    for host in [".a.com", "a..com", "a.com..", "..", ".a"] {
        assert_eq!(normalize_host(host), Err(HostError::EmptyLabel), "{host}");
    }
    assert_eq!(normalize_host("A.com."), Ok("a.com".to_string()));
    assert_eq!(normalize_host("1.2.3.4."), Ok("1.2.3.4".to_string()));
}

#[test]
fn name_first_then_address_then_policy() {
    let s = snapshot(&format!(
        "{APP}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: db, namespace: default}}
spec:
  hosts: [db.internal.com]
  addresses: [10.9.0.0/16]
  ports: [{{number: 80, name: tcp, protocol: TCP}}]
  resolution: STATIC
  endpoints: [{{address: 10.9.0.1}}]
"
    ));
    let route = |name, addr: Option<&str>| routed(&s.route_name_or_address(name, addr.map(ip), 80));
    // A registered name wins over the address it was sent to.
    assert_eq!(
        route(Some("app.internal.com"), Some("10.9.1.1")),
        "outbound|80||app.internal.com"
    );
    // An unregistered name falls back to the address; an IP literal name routes by range.
    assert_eq!(
        route(Some("evil.com"), Some("10.9.1.1")),
        "outbound|80||db.internal.com"
    );
    assert_eq!(
        route(Some("10.9.1.1"), Some("10.9.1.1")),
        "outbound|80||db.internal.com"
    );
    assert_eq!(
        route(None, Some("10.9.1.1")),
        "outbound|80||db.internal.com"
    );
    // Neither: the policy's answer.
    assert_eq!(route(Some("evil.com"), Some("192.0.2.1")), "blackhole");
    assert_eq!(route(None, None), "blackhole");
}

/// A WorkloadEntry in `shop` labelled `app: api`, with `meta` extra metadata and `status`.
fn workload_entry(name: &str, address: &str, meta: &str, status: &str) -> String {
    format!(
        "
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: {name}, namespace: shop{meta}}}
spec:
  address: {address}
  labels: {{app: api}}
  ports: {{web: 7000}}
{status}"
    )
}

const CHECKED: &str = ", annotations: {proxy.istio.io/health-checks-enabled: 'true'}";

#[test]
fn a_kubernetes_service_selects_workload_entries() {
    let yaml = [
        KUBE_SERVICE.to_string(),
        pod("api-1", "shop", "10.244.1.1", "{app: api}", ""),
        workload_entry("vm-1", "10.50.0.1", "", ""),
        workload_entry("other-ns", "10.50.0.9", "", "").replace("namespace: shop", "namespace: x"),
    ]
    .concat();
    let s = in_namespace(&yaml, "shop");
    let c = |port: u16| {
        cluster(
            &s,
            &format!("outbound|{port}||shop-api.shop.svc.cluster.local"),
        )
    };
    // A numeric targetPort, unless the entry maps the service port's name.
    assert_eq!(
        endpoints(c(80)),
        ["10.244.1.1:8080 w1", "10.50.0.1:8080 w1"]
    );
    // A named targetPort: the entry's port of that name.
    assert_eq!(
        endpoints(c(81)),
        ["10.244.1.1:9000 w1", "10.50.0.1:7000 w1"]
    );
    // No targetPort: the service port.
    assert_eq!(
        endpoints(c(5432)),
        ["10.244.1.1:5432 w1", "10.50.0.1:5432 w1"]
    );
    // A named targetPort the entry lacks: not an endpoint.
    assert!(c(82).endpoints.is_empty());
    assert!(
        c(80)
            .endpoints
            .iter()
            .any(|e| &*e.source == "WorkloadEntry shop/vm-1"),
        "source named"
    );
}

#[test]
fn unhealthy_workload_entries_are_not_endpoints() {
    let healthy = "status:\n  conditions: [{type: Healthy, status: 'True'}]\n";
    let unhealthy = "status:\n  conditions: [{type: Healthy, status: 'False'}]\n";
    let yaml = [
        KUBE_SERVICE.to_string(),
        workload_entry("unchecked-unhealthy", "10.50.0.1", "", unhealthy),
        workload_entry("healthy", "10.50.0.2", CHECKED, healthy),
        workload_entry("unhealthy", "10.50.0.3", CHECKED, unhealthy),
        // Health checks on and no condition yet: unhealthy until a probe succeeds.
        workload_entry("unprobed", "10.50.0.4", CHECKED, ""),
        "
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vms, namespace: shop}
spec:
  hosts: [vms.internal]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  workloadSelector: {labels: {app: api}}
"
        .to_string(),
    ]
    .concat();
    let s = in_namespace(&yaml, "shop");
    assert_eq!(
        endpoints(cluster(&s, "outbound|80||vms.internal")),
        ["10.50.0.1:80 w1", "10.50.0.2:80 w1"]
    );
    assert_eq!(
        endpoints(cluster(&s, "outbound|80||shop-api.shop.svc.cluster.local")),
        ["10.50.0.1:8080 w1", "10.50.0.2:8080 w1"]
    );
}

/// A namespace-wide Sidecar in `default` with the given egress listeners (YAML flow list).
fn egress_sidecar(egress: &str) -> String {
    format!(
        "
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default, namespace: default}}
spec:
  egress: {egress}
"
    )
}

#[test]
fn sidecar_egress_hosts_scope_what_is_reachable() {
    let services = [
        entry_in("local", "default", "local.internal", &[80], "10.0.0.1"),
        entry_in("a", "team-a", "a.internal", &[80], "10.0.0.2"),
        entry_in("b", "team-b", "b.example.com", &[80], "10.0.0.3"),
        entry_in("wild", "team-b", "*.wild.example.com", &[80], "10.0.0.4"),
    ]
    .concat();
    let reachable = |egress: &str| {
        let s = snapshot(&format!("{services}{}", egress_sidecar(egress)));
        let mut hosts: Vec<&str> = s.services().map(|c| &*c.host).collect();
        hosts.sort();
        hosts.into_iter().map(str::to_string).collect::<Vec<_>>()
    };
    assert_eq!(reachable("[{hosts: ['./*']}]"), ["local.internal"]);
    assert_eq!(reachable("[{hosts: ['~/*']}]"), Vec::<String>::new());
    assert_eq!(
        reachable("[{hosts: ['./*', 'team-a/*']}]"),
        ["a.internal", "local.internal"]
    );
    assert_eq!(
        reachable("[{hosts: ['*/*.example.com']}]"),
        ["*.wild.example.com", "b.example.com"]
    );
    // A wildcard service host is only within a wildcard at least as wide.
    assert_eq!(
        reachable("[{hosts: ['team-b/x.wild.example.com', 'team-b/b.example.com']}]"),
        ["b.example.com"]
    );
    // An exclusion beats an import.
    assert_eq!(
        reachable("[{hosts: ['*/*', '~team-b/*.example.com']}]"),
        ["a.internal", "local.internal"]
    );
    assert_eq!(
        reachable("[{hosts: ['*/*', '~/a.internal']}]"),
        ["*.wild.example.com", "b.example.com", "local.internal"]
    );
    let s = snapshot(&format!(
        "{services}{}",
        egress_sidecar("[{hosts: ['./*']}]")
    ));
    assert_eq!(routed(&s.route_http("a.internal", 80)), "blackhole");
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
}

#[test]
fn sidecar_egress_listeners_with_a_port_scope_that_port() {
    let services = [
        entry_in("a", "team-a", "a.internal", &[80, 8080], "10.0.0.2"),
        entry_in("b", "team-b", "b.internal", &[80, 8080], "10.0.0.3"),
    ]
    .concat();
    let egress = "
  - port: {number: 8080, protocol: HTTP, name: http-8080}
    hosts: ['team-a/*']
  - hosts: ['team-b/*']";
    let s = snapshot(&format!("{services}{}", egress_sidecar(egress)));
    assert_eq!(
        routed(&s.route_http("a.internal", 8080)),
        "outbound|8080||a.internal"
    );
    assert_eq!(routed(&s.route_http("b.internal", 8080)), "blackhole");
    assert_eq!(routed(&s.route_http("a.internal", 80)), "blackhole");
    assert_eq!(
        routed(&s.route_http("b.internal", 80)),
        "outbound|80||b.internal"
    );
    // Only a port listener: nothing on other ports.
    let egress = "[{port: {number: 8080, protocol: HTTP, name: h}, hosts: ['*/*']}]";
    let s = snapshot(&format!("{services}{}", egress_sidecar(egress)));
    assert_eq!(
        names(&s),
        ["outbound|8080||a.internal", "outbound|8080||b.internal"]
    );
}

#[test]
fn sidecar_egress_picks_the_imported_namespace_of_a_host() {
    let services = [
        entry_in("mine", "default", "dup.internal", &[80], "10.0.0.1"),
        entry_in("theirs", "team-a", "dup.internal", &[80], "10.0.0.2"),
    ]
    .concat();
    let s = snapshot(&format!(
        "{services}{}",
        egress_sidecar("[{hosts: ['team-a/*']}]")
    ));
    assert_eq!(
        endpoints(cluster(&s, "outbound|80||dup.internal")),
        ["10.0.0.2:80 w1"]
    );
}

#[test]
fn headless_services_forward_to_their_pods_also_by_per_pod_names() {
    let yaml = [
        "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{name: http, port: 80}]
"
        .to_string(),
        pod("web-0", "shop", "10.244.1.1", "{app: web}", ""),
        pod("web-1", "shop", "10.244.1.2", "{app: web}", ""),
    ]
    .concat();
    let name = "outbound|80||web.shop.svc.cluster.local";
    let s = in_namespace(&yaml, "shop");
    for host in [
        "web.shop.svc.cluster.local",
        "web-0.web.shop.svc.cluster.local",
        "web-1.web.shop.svc",
        "web-0.web.shop",
        "web-0.web",
        "web",
        "10.244.1.2",
    ] {
        assert_eq!(routed(&s.route_http(host, 80)), name, "{host}");
    }
    // An HTTP port's addresses route by Host only; opaque bytes to a pod reach that pod.
    assert_eq!(
        routed(&s.route_tcp(ip("10.244.1.1"), 80)),
        "PassthroughCluster"
    );
    let c = cluster(&s, name);
    assert_eq!(c.resolution, portcullis_model::Resolution::None);
    // Forwarded only to its own pods.
    assert!(Snapshot::owns_destination(c, ip("10.244.1.2")));
    assert!(!Snapshot::owns_destination(c, ip("10.244.9.9")));
    assert_eq!(routed(&s.route_http("web-0.other.shop", 80)), "blackhole");
}

#[test]
fn external_name_services_are_aliases_of_the_service_they_name() {
    let alias = |name: &str, target: &str| {
        format!(
            "
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: shop}}
spec:
  type: ExternalName
  externalName: {target}
"
        )
    };
    let yaml = [
        KUBE_SERVICE.to_string(),
        alias("db", "Shop-API.shop.svc.cluster.local."),
        alias("db2", "db.shop.svc.cluster.local"),
        alias("outside", "api.example.com"),
        alias("loop-a", "loop-b.shop.svc.cluster.local"),
        alias("loop-b", "loop-a.shop.svc.cluster.local"),
        entry_in("api", "default", "api.example.com", &[443], "10.0.0.9"),
    ]
    .concat();
    let s = in_namespace(&yaml, "shop");
    // Every port of the named service, under every name of the alias (also an alias's alias).
    for host in ["db.shop.svc.cluster.local", "db.shop", "db", "db2"] {
        for port in [80, 81, 5432] {
            assert_eq!(
                routed(&s.route_http(host, port)),
                format!("outbound|{port}||shop-api.shop.svc.cluster.local"),
                "{host}:{port}"
            );
        }
    }
    assert_eq!(
        routed(&s.route_http("outside", 443)),
        "outbound|443||api.example.com"
    );
    // No cluster of their own; a loop or an unregistered name routes nowhere.
    assert!(names(&s).iter().all(|n| !n.contains("||db.")));
    assert_eq!(routed(&s.route_http("outside", 80)), "blackhole");
    assert_eq!(routed(&s.route_http("loop-a", 80)), "blackhole");
    let unregistered = [KUBE_SERVICE.to_string(), alias("ext", "example.org")].concat();
    assert_eq!(
        routed(&in_namespace(&unregistered, "shop").route_http("ext", 80)),
        "blackhole"
    );
}

#[test]
fn the_mesh_default_export_to_applies_to_services_without_their_own() {
    let mesh = "
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |-
    defaultServiceExportTo: ['.']
";
    let public = entry_in("public", "team-a", "public.internal", &[80], "10.0.0.1")
        .replace("  resolution:", "  exportTo: ['*']\n  resolution:");
    let yaml = [
        mesh.to_string(),
        entry_in("private", "team-a", "private.internal", &[80], "10.0.0.2"),
        public,
        "
---
apiVersion: v1
kind: Service
metadata: {name: svc, namespace: team-a}
spec:
  clusterIP: 10.96.0.30
  ports: [{name: http, port: 80}]
"
        .to_string(),
    ]
    .concat();
    let s = in_namespace(&yaml, "default");
    assert_eq!(names(&s), ["outbound|80||public.internal"]);
    let s = in_namespace(&yaml, "team-a");
    assert_eq!(
        names(&s),
        [
            "outbound|80||private.internal",
            "outbound|80||public.internal",
            "outbound|80||svc.team-a.svc.cluster.local"
        ]
    );
}

#[test]
fn sidecar_unix_socket_and_http_proxy_listeners() {
    let services = entry_in("a", "team-a", "a.internal", &[80], "10.0.0.2");
    // A Unix socket listener (port 0) takes no traffic, so it imports nothing here.
    let egress = "
  - port: {number: 0, protocol: HTTP, name: uds}
    hosts: ['team-a/*']
  - hosts: ['./*']";
    let s = snapshot(&format!("{services}{}", egress_sidecar(egress)));
    assert!(names(&s).is_empty(), "{:?}", names(&s));
    // An HTTP_PROXY listener matches services on every port.
    let egress = "[{port: {number: 15080, protocol: HTTP_PROXY, name: proxy}, hosts: ['*/*']}]";
    let s = snapshot(&format!("{services}{}", egress_sidecar(egress)));
    assert_eq!(names(&s), ["outbound|80||a.internal"]);
}

/// One ServiceEntry: `name` for `hosts` on one port, `extra` appended to its spec.
fn entry(name: &str, hosts: &str, port: &str, extra: &str) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: {hosts}
  ports: [{port}]
  resolution: STATIC
  endpoints: [{{address: 10.60.0.1}}]
{extra}"
    )
}

#[test]
fn tls_gets_an_sni_route_only_on_tls_ports() {
    let s = snapshot(
        &[
            entry(
                "plain",
                "[plain.internal]",
                "{number: 443, name: http, protocol: HTTP}",
                "",
            ),
            entry(
                "tls",
                "[tls.internal, '*.wild.internal']",
                "{number: 443, name: tls, protocol: TLS}",
                "",
            ),
            entry(
                "auto",
                "[auto.internal]",
                "{number: 8443, name: other}",
                "  addresses: [10.8.0.1]\n",
            ),
            entry(
                "vip",
                "[vip.internal]",
                "{number: 9443, name: https, protocol: HTTPS}",
                "  addresses: [10.9.0.1]\n",
            ),
            entry(
                "range",
                "[range.internal]",
                "{number: 9443, name: https, protocol: HTTPS}",
                "  addresses: [10.7.0.0/16]\n",
            ),
        ]
        .concat(),
    );
    let tls = |sni: &str, dst: &str, port| routed(&s.route_tls(Some(sni), ip(dst), port));
    let elsewhere = "192.0.2.1";
    // The HTTP port's name, as SNI on that port: no route.
    assert_eq!(tls("plain.internal", elsewhere, 443), "blackhole");
    assert_eq!(
        tls("tls.internal", elsewhere, 443),
        "outbound|443||tls.internal"
    );
    assert_eq!(
        tls("a.wild.internal", elsewhere, 443),
        "outbound|443||*.wild.internal"
    );
    // An undeclared port is routed by address only, as opaque TCP.
    assert_eq!(tls("auto.internal", elsewhere, 8443), "blackhole");
    assert_eq!(
        tls("other", "10.8.0.1", 8443),
        "outbound|8443||auto.internal"
    );
    // A TLS service with an exact address has its own listener: the address decides, and
    // its name matches nowhere else; a range keeps its SNI route.
    assert_eq!(
        tls("range.internal", "10.9.0.1", 9443),
        "outbound|9443||vip.internal"
    );
    assert_eq!(tls("vip.internal", elsewhere, 9443), "blackhole");
    assert_eq!(
        tls("range.internal", elsewhere, 9443),
        "outbound|9443||range.internal"
    );
    assert_eq!(tls("x", "10.7.1.1", 9443), "outbound|9443||range.internal");
    assert_eq!(routed(&s.route_tls(None, ip(elsewhere), 443)), "blackhole");
    // The HTTP name stays routable by Host and as a CONNECT target.
    assert_eq!(
        routed(&s.route_http("plain.internal", 443)),
        "outbound|443||plain.internal"
    );
    assert_eq!(
        routed(&s.route_name_or_address(Some("plain.internal"), None, 443)),
        "outbound|443||plain.internal"
    );
}

#[test]
fn http_beside_a_port_wide_tcp_service_is_sniffed() {
    let web = entry(
        "web",
        "[web.internal]",
        "{number: 80, name: http, protocol: HTTP}",
        "",
    );
    let db = entry(
        "db",
        "[db.internal]",
        "{number: 80, name: tcp, protocol: TCP}",
        "",
    );
    let fixed = entry(
        "fixed",
        "[fixed.internal]",
        "{number: 80, name: tcp, protocol: TCP}",
        "  addresses: [10.5.0.1, 10.6.0.0/16]\n",
    );
    let s = snapshot(&[web.as_str(), &db, &fixed].concat());
    // Not sniffed only where a TCP service owns the address or its range.
    assert!(!s.is_tcp_destination(ip("192.0.2.1"), 80));
    assert!(s.is_tcp_destination(ip("10.5.0.1"), 80));
    assert!(s.is_tcp_destination(ip("10.6.1.1"), 80));
    // HTTP goes by Host; what is not HTTP to the port-wide service.
    assert_eq!(
        routed(&s.route_http("web.internal", 80)),
        "outbound|80||web.internal"
    );
    assert_eq!(routed(&s.route_http("unknown.example", 80)), "blackhole");
    assert_eq!(
        routed(&s.route_tcp(ip("192.0.2.1"), 80)),
        "outbound|80||db.internal"
    );
    // An undeclared service without addresses sniffs as well; alone, TCP is never sniffed.
    let auto = entry("auto", "[auto.internal]", "{number: 80, name: auto}", "");
    let s = snapshot(&[db.as_str(), &auto].concat());
    assert!(!s.is_tcp_destination(ip("192.0.2.1"), 80));
    let s = snapshot(&db);
    assert!(s.is_tcp_destination(ip("192.0.2.1"), 80));
    // An undeclared service with an exact address has its own listener: no sniffing here.
    let auto_vip = entry(
        "auto",
        "[auto.internal]",
        "{number: 80, name: auto}",
        "  addresses: [10.5.5.5]\n",
    );
    let s = snapshot(&[db.as_str(), &auto_vip].concat());
    assert!(s.is_tcp_destination(ip("192.0.2.1"), 80));
    assert!(!s.is_tcp_destination(ip("10.5.5.5"), 80));
}

#[test]
fn the_oldest_service_wins_an_address_then_the_name() {
    let tcp = |name: &str, host: &str, created: &str, addresses: &str| {
        entry(
            name,
            &format!("[{host}]"),
            "{number: 5000, name: tcp, protocol: TCP}",
            addresses,
        )
        .replace(
            "namespace: default}",
            &format!("namespace: default, creationTimestamp: '{created}'}}"),
        )
    };
    let none = "";
    let vip = "  addresses: [10.1.1.1]\n";
    // The entry named first is the newer: the older one keeps the port.
    let s = snapshot(
        &[
            tcp("aaa", "a.internal", "2024-01-01T00:00:00Z", none),
            tcp("zzz", "z.internal", "2010-01-01T00:00:00Z", none),
            tcp("bbb", "b.internal", "2024-01-01T00:00:00Z", vip),
            tcp("yyy", "y.internal", "2010-01-01T00:00:00+02:00", vip),
        ]
        .concat(),
    );
    assert_eq!(
        routed(&s.route_tcp(ip("192.0.2.1"), 5000)),
        "outbound|5000||z.internal"
    );
    assert_eq!(
        routed(&s.route_tcp(ip("10.1.1.1"), 5000)),
        "outbound|5000||y.internal"
    );
    assert!(
        s.warnings.iter().any(|w| w.contains("every address")
            && w.contains("a.internal")
            && w.contains("z.internal")),
        "{:?}",
        s.warnings
    );
    // Created at the same second: the service name (the host) decides, not the entry's.
    let s = snapshot(
        &[
            tcp("aaa", "z.internal", "2020-01-01T00:00:00Z", none),
            tcp("zzz", "a.internal", "2020-01-01T00:00:00Z", none),
        ]
        .concat(),
    );
    assert_eq!(
        routed(&s.route_tcp(ip("192.0.2.1"), 5000)),
        "outbound|5000||a.internal"
    );
}

#[test]
fn resolution_none_forwards_to_the_target_port() {
    let s = snapshot(
        "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: none, namespace: default}
spec:
  hosts: [none.internal]
  addresses: [10.1.1.1]
  ports:
  - {number: 8080, name: http, protocol: HTTP, targetPort: 80}
  - {number: 9000, name: tcp, protocol: TCP}
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: static, namespace: default}
spec:
  hosts: [static.internal]
  ports: [{number: 8080, name: http, protocol: HTTP, targetPort: 80}]
  resolution: STATIC
  endpoints: [{address: 10.60.0.1}]
",
    );
    assert_eq!(
        cluster(&s, "outbound|8080||none.internal").passthrough_port,
        Some(80)
    );
    assert_eq!(
        cluster(&s, "outbound|9000||none.internal").passthrough_port,
        None
    );
    // Other resolutions have endpoints on the target port instead.
    let c = cluster(&s, "outbound|8080||static.internal");
    assert_eq!(c.passthrough_port, None);
    assert_eq!(endpoints(c), ["10.60.0.1:80 w1"]);
}

#[test]
fn an_undeclared_service_takes_http_to_its_own_address_whatever_the_host() {
    let s = snapshot(
        &[
            entry(
                "auto",
                "[auto.internal]",
                "{number: 7000, name: other}",
                "  addresses: [10.5.5.5]\n",
            ),
            entry(
                "web",
                "[web.internal]",
                "{number: 7000, name: http, protocol: HTTP}",
                "  addresses: [10.6.6.6]\n",
            ),
        ]
        .concat(),
    );
    let auto = "outbound|7000||auto.internal";
    let web = "outbound|7000||web.internal";
    for host in [
        "auto.internal",
        "web.internal",
        "nobody.example",
        "10.6.6.6",
    ] {
        assert_eq!(
            routed(&s.route_http_to(host, ip("10.5.5.5"), 7000)),
            auto,
            "{host}"
        );
    }
    // An HTTP service's address does not do that: it lives on the port's wildcard listener.
    assert_eq!(
        routed(&s.route_http_to("nobody.example", ip("10.6.6.6"), 7000)),
        "blackhole"
    );
    assert_eq!(
        routed(&s.route_http_to("web.internal", ip("10.5.5.6"), 7000)),
        web
    );
    assert_eq!(
        routed(&s.route_http_to("auto.internal", ip("192.0.2.1"), 7000)),
        auto
    );
}

mod consistent_hash;
mod virtual_service;
mod workload;

#[test]
fn outlier_detection_compiles_as_istiod_writes_it() {
    let rule = &app_rule(
        "  trafficPolicy:
    outlierDetection:
      consecutive5xxErrors: 3
      consecutiveGatewayErrors: 0
      interval: 5s
      baseEjectionTime: 1m
      maxEjectionPercent: 50
    portLevelSettings:
    - port: {number: 8080}
      outlierDetection: {consecutiveErrors: 2, minHealthPercent: 30}
",
    );
    let s = snapshot(&[APP, rule].concat());
    let compiled = |name: &str| {
        let c = s
            .services()
            .find(|c| &*c.name == name)
            .expect("the cluster");
        let from = c.built_from.as_ref().expect("built from resources");
        (
            from.cluster.outlier_detection.as_deref().cloned(),
            from.cluster.healthy_panic_threshold,
        )
    };
    let (od, panic) = compiled("outbound|80||app.internal.com");
    let od = od.expect("outlier detection");
    assert_eq!((od.consecutive_5xx, od.enforcing_consecutive_5xx), (3, 100));
    assert_eq!(
        (
            od.consecutive_gateway_failure,
            od.enforcing_consecutive_gateway_failure
        ),
        (0, 0)
    );
    assert_eq!(od.interval, std::time::Duration::from_secs(5));
    assert_eq!(od.base_ejection_time, std::time::Duration::from_secs(60));
    assert_eq!(od.max_ejection_percent, 50);
    // istiod turns Envoy's 50% panic threshold off unless minHealthPercent says otherwise.
    assert_eq!(panic, Some(0.0));
    // What the data path applies: the enforced detectors only.
    let applied = cluster(&s, "outbound|80||app.internal.com")
        .outlier
        .as_deref()
        .copied()
        .expect("applied");
    assert_eq!(applied.detection.consecutive_5xx, Some(3));
    assert_eq!(applied.detection.consecutive_gateway, None);
    assert_eq!(
        applied.detection.base_ejection,
        std::time::Duration::from_secs(60)
    );
    assert_eq!(applied.panic_threshold, 0.0);
    // The deprecated consecutiveErrors counts gateway errors only.
    let (od, panic) = compiled("outbound|8080||app.internal.com");
    let od = od.expect("outlier detection");
    assert_eq!(
        (
            od.consecutive_gateway_failure,
            od.enforcing_consecutive_gateway_failure
        ),
        (2, 100)
    );
    assert_eq!(od.enforcing_consecutive_5xx, 0);
    assert_eq!(panic, Some(30.0));
}

#[test]
fn tcp_idle_timeout_and_max_duration_go_to_the_services_tcp_proxy_and_its_pooled_connections() {
    let rule = |spec: &str| {
        format!(
            "
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: db, namespace: default}}
spec:
  host: db.internal
  trafficPolicy:
{spec}"
        )
    };
    let idle = |s: &Snapshot| {
        let conn = crate::Connection {
            destination: Some(ip("10.1.2.3")),
            port: 5432,
            ..Default::default()
        };
        s.filter_chain(&conn).expect("db's chain").idle_timeout
    };
    let secs = std::time::Duration::from_secs;
    // Without a rule: Envoy's hour, as istiod leaves it.
    assert_eq!(idle(&snapshot(TCP)), Some(secs(3600)));
    let s = snapshot(
        &[
            TCP,
            &rule("    connectionPool: {tcp: {idleTimeout: 30s}}\n"),
        ]
        .concat(),
    );
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    assert_eq!(idle(&s), Some(secs(30)));
    // It is also the upstream connections' idle timeout when http.idleTimeout is unset.
    let db = cluster(&s, "outbound|5432||db.internal");
    assert_eq!(db.connection_limits().idle_timeout, Some(secs(30)));
    // 0s turns it off.
    let s = snapshot(&[TCP, &rule("    connectionPool: {tcp: {idleTimeout: 0s}}\n")].concat());
    assert_eq!(idle(&s), None);
    // Only the rule's top-level pool counts, as istiod reads it.
    let port_level = "    portLevelSettings:
    - port: {number: 5432}
      connectionPool: {tcp: {idleTimeout: 5s}}
";
    assert_eq!(
        idle(&snapshot(&[TCP, &rule(port_level)].concat())),
        Some(secs(3600))
    );
    // http.idleTimeout wins for the pooled connections.
    let both = "    connectionPool: {tcp: {idleTimeout: 30s}, http: {idleTimeout: 7s}}\n";
    let s = snapshot(&[TCP, &rule(both)].concat());
    assert_eq!(
        cluster(&s, "outbound|5432||db.internal")
            .connection_limits()
            .idle_timeout,
        Some(secs(7))
    );
    // maxConnectionDuration closes the service's TCP connections that old, and its pooled
    // upstream connections; the idle timeout stays Envoy's hour.
    let s = snapshot(
        &[
            TCP,
            &rule("    connectionPool: {tcp: {maxConnectionDuration: 90s}}\n"),
        ]
        .concat(),
    );
    let conn = crate::Connection {
        destination: Some(ip("10.1.2.3")),
        port: 5432,
        ..Default::default()
    };
    let chain = s.filter_chain(&conn).expect("db's chain");
    assert_eq!(
        (chain.idle_timeout, chain.max_duration),
        (Some(secs(3600)), Some(secs(90)))
    );
    assert_eq!(
        cluster(&s, "outbound|5432||db.internal")
            .connection_limits()
            .max_connection_duration,
        Some(secs(90))
    );
    assert_eq!(
        snapshot(TCP).filter_chain(&conn).unwrap().max_duration,
        None
    );
}

#[test]
fn h2_upgrade_policy_makes_an_http_service_speak_http2_upstream_as_istiod_decides() {
    let protocol = |yaml: &str, name: &str| cluster(&snapshot(yaml), name).protocol;
    let app = "outbound|80||app.internal.com";
    let pool = |p: &str| {
        app_rule(&format!(
            "  trafficPolicy:\n    connectionPool: {{http: {p}}}\n"
        ))
    };
    assert_eq!(protocol(APP, app), Protocol::Http);
    let upgrade = pool("{h2UpgradePolicy: UPGRADE}");
    assert_eq!(protocol(&[APP, &upgrade].concat(), app), Protocol::Http2);
    // useClientProtocol wins over an upgrade.
    let client = pool("{h2UpgradePolicy: UPGRADE, useClientProtocol: true}");
    assert_eq!(protocol(&[APP, &client].concat(), app), Protocol::Auto);
    // The mesh's policy applies to HTTP services that do not decide for themselves.
    let mesh = "
---
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    h2UpgradePolicy: UPGRADE
";
    assert_eq!(protocol(&[APP, mesh].concat(), app), Protocol::Http2);
    let keep = pool("{h2UpgradePolicy: DO_NOT_UPGRADE}");
    assert_eq!(protocol(&[APP, mesh, &keep].concat(), app), Protocol::Http);
    let default = pool("{h2UpgradePolicy: DEFAULT}");
    assert_eq!(
        protocol(&[APP, mesh, &default].concat(), app),
        Protocol::Http2
    );
    // A TCP service is not upgraded by the mesh.
    assert_eq!(
        protocol(&[TCP, mesh].concat(), "outbound|5432||db.internal"),
        Protocol::Tcp
    );
}

#[test]
fn passthrough_sends_to_the_original_destination_among_the_services_own() {
    let rule = &app_rule(
        "  trafficPolicy:
    loadBalancer: {simple: PASSTHROUGH}
",
    );
    let s = snapshot(&[APP, rule].concat());
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    // istiod's ORIGINAL_DST cluster without endpoints; portcullis keeps the destination to
    // the service's own addresses (here its endpoint's), as for resolution NONE.
    let c = cluster(&s, "outbound|80||app.internal.com");
    assert_eq!(c.resolution, crate::Resolution::None);
    assert!(c.endpoints.is_empty());
    assert_eq!(
        c.owned_destinations.as_deref(),
        Some(&["10.50.0.1/32".parse().unwrap()][..])
    );
    // Other hosts keep their endpoints.
    let api = cluster(&s, "outbound|80||api.internal.com");
    assert_eq!(api.resolution, crate::Resolution::Static);
    assert_eq!(endpoints(api), ["10.50.0.1:80 w1"]);
}

/// A ServiceEntry with endpoints in three localities, and a rule over it.
const LOCALITIES: &str = "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: geo, namespace: default}
spec:
  hosts: [geo.internal.com]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints:
  - {address: 10.1.0.1, locality: us/a/1}
  - {address: 10.1.0.2, locality: us/b/1}
  - {address: 10.1.0.3, labels: {istio-locality: eu.c.1}}
---
";

/// The geo services with a DestinationRule of `traffic_policy` (indented YAML).
fn geo_rule(traffic_policy: &str) -> String {
    format!(
        "{LOCALITIES}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: geo, namespace: default}}
spec:
  host: geo.internal.com
  trafficPolicy:
{traffic_policy}"
    )
}

fn at_locality(yaml: &str, locality: &str) -> Snapshot {
    let options = BuildOptions {
        locality: crate::locality::parse(locality),
        ..BuildOptions::default()
    };
    build(&load(yaml), &options, None, 1)
}

/// Each endpoint of the geo cluster with its priority and locality weight, and whether the
/// cluster balances by locality weight.
fn geo(s: &Snapshot) -> (Vec<(String, u32, Option<u32>)>, bool) {
    placed(s, "outbound|80||geo.internal.com")
}

/// Each endpoint of cluster `name` with its priority and locality weight, and whether the
/// cluster balances by locality weight.
fn placed(s: &Snapshot, name: &str) -> (Vec<(String, u32, Option<u32>)>, bool) {
    let c = s
        .services()
        .find(|c| &*c.name == name)
        .expect("the cluster");
    let from = c.built_from.as_ref().expect("built from resources");
    let la = from.cluster.load_assignment.as_ref().expect("endpoints");
    let mut out: Vec<(String, u32, Option<u32>)> = la
        .endpoints
        .iter()
        .flat_map(|g| {
            g.lb_endpoints.iter().map(move |e| {
                let address = match &e.address {
                    portcullis_envoy::EndpointAddress::Socket(a) => a.to_string(),
                    portcullis_envoy::EndpointAddress::Name { host, port } => {
                        format!("{host}:{port}")
                    }
                };
                (address, g.priority, g.load_balancing_weight)
            })
        })
        .collect();
    out.sort();
    (out, from.cluster.locality_weighted)
}

#[test]
fn locality_failover_applies_with_outlier_detection_as_istiod() {
    let rule = geo_rule("    outlierDetection: {consecutive5xxErrors: 1}\n");
    let s = at_locality(&rule, "us/a/1");
    let (eps, weighted) = geo(&s);
    assert_eq!(
        eps,
        [
            ("10.1.0.1:80".to_string(), 0, Some(1)),
            ("10.1.0.2:80".to_string(), 1, Some(1)),
            ("10.1.0.3:80".to_string(), 2, Some(1)),
        ]
    );
    // The mesh default (no explicit failover) leaves localities unweighted, as istiod.
    assert!(!weighted);
    // Without outlier detection Envoy would never fail over: no priorities.
    let s = at_locality(LOCALITIES, "us/a/1");
    assert!(geo(&s).0.iter().all(|e| e.1 == 0));
    // Traffic stays in the client's locality while it is healthy.
    let c = cluster(
        &at_locality(&rule, "us/a/1"),
        "outbound|80||geo.internal.com",
    )
    .clone();
    let now = std::time::Instant::now();
    for _ in 0..200 {
        let (_, e) = c.pick_hashed(None, (&[], None), now).expect("picks");
        assert_eq!(e.display(), "10.1.0.1:80");
    }
}

#[test]
fn the_mesh_configs_locality_setting_applies_where_a_rule_sets_none() {
    let mesh = |setting: &str| {
        format!(
            "apiVersion: v1
kind: ConfigMap
metadata: {{name: istio, namespace: istio-system}}
data:
  mesh: |
    localityLbSetting: {setting}
---
"
        )
    };
    let outlier = geo_rule("    outlierDetection: {consecutive5xxErrors: 1}\n");
    // The mesh's failover: us to eu before the other us zone.
    let failover = mesh("{failover: [{from: us, to: eu}]}");
    let (eps, weighted) = geo(&at_locality(&format!("{failover}{outlier}"), "us/a/1"));
    assert_eq!(
        eps,
        [
            ("10.1.0.1:80".to_string(), 0, Some(1)),
            ("10.1.0.2:80".to_string(), 1, Some(1)),
            ("10.1.0.3:80".to_string(), 2, Some(1)),
        ]
    );
    assert!(
        weighted,
        "an explicit failover weights localities, as istiod"
    );
    // Turned off mesh-wide: no priorities, even with outlier detection.
    let off = mesh("{enabled: false}");
    let (eps, _) = geo(&at_locality(&format!("{off}{outlier}"), "us/a/1"));
    assert!(eps.iter().all(|e| e.1 == 0), "{eps:?}");
    // A rule's own setting wins over the mesh's.
    let own = geo_rule(
        "    outlierDetection: {consecutive5xxErrors: 1}
    loadBalancer: {localityLbSetting: {enabled: true}}
",
    );
    let (eps, _) = geo(&at_locality(&format!("{off}{own}"), "us/a/1"));
    assert_eq!(eps.iter().map(|e| e.1).collect::<Vec<_>>(), [0, 1, 2]);
    // The mesh's distribute.
    let distribute = mesh("{distribute: [{from: us/a/*, to: {us/b/*: 100}}]}");
    let (eps, weighted) = geo(&at_locality(&[&distribute, LOCALITIES].concat(), "us/a/1"));
    assert!(weighted);
    // Localities the distribution gives nothing are left out, as istiod does.
    assert_eq!(eps, [("10.1.0.2:80".to_string(), 0, Some(100))]);
}

#[test]
fn locality_distribute_sets_weights_as_istiod() {
    let rule = geo_rule(
        "    loadBalancer:
      localityLbSetting:
        distribute:
        - from: us/a/*
          to: {us/*: 70, eu/c/*: 30}
",
    );
    let s = at_locality(&rule, "us/a/1");
    let (eps, weighted) = geo(&s);
    assert_eq!(
        eps,
        [
            ("10.1.0.1:80".to_string(), 0, Some(35)),
            ("10.1.0.2:80".to_string(), 0, Some(35)),
            ("10.1.0.3:80".to_string(), 0, Some(30)),
        ]
    );
    assert!(weighted);
    assert!(
        s.warnings.iter().all(|w| !w.contains("localityLbSetting")),
        "{:?}",
        s.warnings
    );
    let c = cluster(&s, "outbound|80||geo.internal.com");
    let now = std::time::Instant::now();
    let eu = (0..20_000)
        .filter(|_| {
            c.pick_hashed(None, (&[], None), now)
                .expect("picks")
                .1
                .display()
                == "10.1.0.3:80"
        })
        .count();
    let share = eu as f64 / 20_000.0;
    assert!((share - 0.3).abs() < 0.02, "{share}");
}

/// Nodes `node-a` and `node-b` in zones `a` and `b` of region `us` (the second with the
/// deprecated labels), and a Kubernetes Service over three pods: one on each node and one
/// on an unknown node.
fn nodes_and_pods(zone_a: &str, zone_b: &str) -> String {
    let pod = |name: &str, ip: &str, node: &str| {
        format!(
            "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {{app: web}}}}
spec: {{nodeName: {node}, containers: []}}
status: {{podIP: {ip}}}
---
"
        )
    };
    format!(
        "apiVersion: v1
kind: Node
metadata:
  name: node-a
  labels: {{topology.kubernetes.io/region: us, topology.kubernetes.io/zone: {zone_a}, topology.istio.io/subzone: r1}}
---
apiVersion: v1
kind: Node
metadata:
  name: node-b
  labels: {{failure-domain.beta.kubernetes.io/region: us, failure-domain.beta.kubernetes.io/zone: {zone_b}}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: 10.96.0.9
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web, namespace: default}}
spec:
  host: web.default.svc.cluster.local
  trafficPolicy:
    outlierDetection: {{consecutive5xxErrors: 1}}
  subsets:
  - {{name: zone-a, labels: {{topology.kubernetes.io/zone: a}}}}
---
{}{}{}",
        pod("web-1", "10.2.0.1", "node-a"),
        pod("web-2", "10.2.0.2", "node-b"),
        pod("web-3", "10.2.0.3", "node-gone"),
    )
}

#[test]
fn a_pods_locality_comes_from_its_nodes_topology_labels_as_istiod() {
    const WEB: &str = "outbound|80||web.default.svc.cluster.local";
    let prio = |s: &Snapshot, name: &str| -> Vec<(String, u32)> {
        placed(s, name)
            .0
            .into_iter()
            .map(|(a, p, _)| (a, p))
            .collect()
    };
    let s = at_locality(&nodes_and_pods("a", "b"), "us/a/r1");
    // Same subzone, then same region, then the pod whose node is unknown (no locality:
    // another region).
    assert_eq!(
        prio(&s, WEB),
        [
            ("10.2.0.1:8080".to_string(), 0),
            ("10.2.0.2:8080".to_string(), 1),
            ("10.2.0.3:8080".to_string(), 2),
        ]
    );
    // The node's topology labels are among the endpoint's labels, as subsets see them.
    let (subset, _) = placed(&s, "outbound|80|zone-a|web.default.svc.cluster.local");
    assert_eq!(subset.len(), 1);
    assert_eq!(subset[0].0, "10.2.0.1:8080");
    // A node relabelled: the pods on it move with it.
    let s = at_locality(&nodes_and_pods("b", "a"), "us/a/r1");
    assert_eq!(
        prio(&s, WEB),
        [
            ("10.2.0.1:8080".to_string(), 1),
            ("10.2.0.2:8080".to_string(), 0),
            ("10.2.0.3:8080".to_string(), 2),
        ]
    );
    // A pod's own locality label wins over its node's.
    let labelled = nodes_and_pods("a", "b").replace(
        "name: web-2, namespace: default, labels: {app: web}",
        "name: web-2, namespace: default, labels: {app: web, istio-locality: us.a.r1}",
    );
    let s = at_locality(&labelled, "us/a/r1");
    assert_eq!(prio(&s, WEB)[1], ("10.2.0.2:8080".to_string(), 0));
}

/// The compiled routes of many services hold no copies of what they share: each forwards
/// with its model route's settings, and all have one compiled Istio retry policy.
#[test]
fn compiled_routes_share_their_settings_with_the_model_and_each_other() {
    let http = |name: &str| {
        entry(
            name,
            &format!("[{name}.example.com]"),
            "{number: 80, name: http, protocol: HTTP}",
            "",
        )
    };
    let yaml = [http("a"), http("b")].concat();
    let compiled = crate::compile(&load(&yaml), &BuildOptions::default(), &|_| None);
    let s = Snapshot::index(&compiled.resources, &|_| None, None, 1);
    let routed = |host: &str| {
        let conn = crate::Connection {
            destination: Some(ip("10.9.9.9")),
            port: 80,
            application_protocols: &["http/1.1"],
            ..crate::Connection::default()
        };
        let req = crate::Request {
            authority: host,
            path: "/",
            method: "GET",
            scheme: "http",
            headers: &(),
        };
        s.route_request(&conn, &req).route.expect("a route")
    };
    let (a, b) = (routed("a.example.com"), routed("b.example.com"));
    assert_eq!(*a.retries, crate::RetryPolicy::ISTIO);
    assert!(Arc::ptr_eq(&a.retries, &b.retries));
    let model = &compiled.resources.routes["80"];
    let vh = model
        .virtual_hosts
        .iter()
        .find(|vh| vh.name == "a.example.com:80")
        .expect("a's virtual host");
    let portcullis_envoy::RouteAction::Forward(forward) = &vh.routes[0].action else {
        panic!("a's route forwards");
    };
    assert!(std::ptr::eq(a.forward().expect("forwards"), &**forward));
}

#[test]
fn explicit_proxy_routes_by_the_key_it_writes_once() {
    let vip = entry(
        "vip",
        "[vip.internal.com]",
        "{number: 80, name: http, protocol: HTTP}",
        "  addresses: [10.8.0.1, 'fd00::8']\n",
    );
    let s = snapshot(&format!("{APP}{vip}"));
    let explicit = |host: &str, port| {
        let conn = crate::Connection {
            port,
            ..crate::Connection::default()
        };
        let req = crate::route::Request {
            authority: host,
            path: "/",
            method: "GET",
            scheme: "http",
            headers: &(),
        };
        routed(&s.route_explicit(host, &conn, &req).decision)
    };
    assert_eq!(
        explicit("app.internal.com", 80),
        "outbound|80||app.internal.com"
    );
    assert_eq!(
        explicit("APP.Internal.com", 8080),
        "outbound|8080||app.internal.com"
    );
    assert_eq!(explicit("app.internal.com", 81), "blackhole");
    // Envoy matches a trailing dot as sent: no domain has it.
    assert_eq!(explicit("app.internal.com.", 80), "blackhole");
    // An IP literal is looked up in its canonical spelling, an IPv4-mapped IPv6 one as the
    // IPv4 address it carries.
    let by_vip = explicit("10.8.0.1", 80);
    assert_eq!(by_vip, "outbound|80||vip.internal.com");
    assert_eq!(explicit("::ffff:10.8.0.1", 80), by_vip);
    assert_eq!(explicit("::FFFF:a08:1", 80), by_vip);
    // An IPv6 one is bracketed before its port, as in the domains.
    assert_eq!(explicit("FD00:0::8", 80), by_vip);
    assert_eq!(explicit("::1", 80), "blackhole");
}

/// Istio's `http_proxy` table names HTTP and sniffed ports only, as istiod writes it; a
/// CONNECT still finds a TLS or TCP service by its name, from files and from the same
/// resources indexed as xDS delivers them.
#[test]
fn connect_finds_tls_and_tcp_names_outside_the_http_proxy_table() {
    let yaml = [
        APP.to_string(),
        entry(
            "tls",
            "[api.tls.com]",
            "{number: 443, name: tls, protocol: TLS}",
            "",
        ),
        entry(
            "wild",
            "['*.wild.com']",
            "{number: 443, name: https, protocol: HTTPS}",
            "",
        ),
        entry(
            "narrow",
            "['*.a.wild.com']",
            "{number: 443, name: tls, protocol: TLS}",
            "",
        ),
        entry(
            "db",
            "[db.internal.com]",
            "{number: 5432, name: tcp, protocol: TCP}",
            "  addresses: [10.9.0.5]\n",
        ),
        entry(
            "mq",
            "[mq.internal.com]",
            "{number: 5672, name: tcp, protocol: TCP}",
            "",
        ),
        entry(
            "sniffed",
            "[sniffed.internal.com]",
            "{number: 9000, name: other}",
            "",
        ),
    ]
    .concat();
    let compiled = crate::compile(&load(&yaml), &BuildOptions::default(), &|_| None);
    let table = &compiled.resources.routes[crate::HTTP_PROXY_ROUTES];
    let domains: Vec<&str> = table
        .virtual_hosts
        .iter()
        .flat_map(|vh| vh.domains.iter().map(String::as_str))
        .collect();
    for name in [
        "app.internal.com:80",
        "api.internal.com:8080",
        "sniffed.internal.com:9000",
    ] {
        assert!(domains.contains(&name), "{name} in {domains:?}");
    }
    for name in ["api.tls.com:443", "*.wild.com:443", "db.internal.com:5432"] {
        assert!(!domains.contains(&name), "{name} in {domains:?}");
    }
    let from_files = snapshot(&yaml);
    // The files' claims count a service's addresses among its names.
    assert_eq!(
        routed(&from_files.route_host("10.9.0.5", 5432)),
        "outbound|5432||db.internal.com"
    );
    let from_xds = Snapshot::index(&compiled.resources, &|_| None, None, 1);
    // istiod sends the table only to a proxy with an HTTP proxy port.
    let mut untabled = compiled.resources.clone();
    untabled.routes.remove(crate::HTTP_PROXY_ROUTES);
    let without_table = Snapshot::index(&untabled, &|_| None, None, 1);
    for s in [&from_files, &from_xds, &without_table] {
        let expected = [
            ("api.tls.com", 443, "outbound|443||api.tls.com"),
            ("API.tls.com.", 443, "outbound|443||api.tls.com"),
            ("a.wild.com", 443, "outbound|443||*.wild.com"),
            ("x.a.wild.com", 443, "outbound|443||*.a.wild.com"),
            ("db.internal.com", 5432, "outbound|5432||db.internal.com"),
            ("10.9.0.5", 5432, "outbound|5432||db.internal.com"),
            ("app.internal.com", 80, "outbound|80||app.internal.com"),
            (
                "sniffed.internal.com",
                9000,
                "outbound|9000||sniffed.internal.com",
            ),
            // A name on a port it is not registered on, and names of no service.
            ("db.internal.com", 443, "blackhole"),
            ("api.tls.com", 5432, "blackhole"),
            ("evil.com", 5432, "blackhole"),
            ("evil.com", 5672, "blackhole"),
            ("wild.com", 443, "blackhole"),
        ];
        // As a CONNECT routes: by name, else an IP literal by its address.
        for (name, port, cluster) in expected {
            let decision = s.route_name_or_address(Some(name), name.parse().ok(), port);
            assert_eq!(routed(&decision), cluster, "{name}:{port}");
        }
        // As a name alone, an address names nothing unless a service claims it: not where
        // opaque bytes to it would go (the port-wide TCP service), with or without a
        // table, although that service's chain takes every connection to the port.
        assert_eq!(
            routed(&s.route_host("mq.internal.com", 5672)),
            "outbound|5672||mq.internal.com"
        );
        assert_eq!(routed(&s.route_host("::1", 5672)), "blackhole");
        assert_eq!(
            routed(&s.route_name_or_address(Some("::1"), "::1".parse().ok(), 5672)),
            "outbound|5672||mq.internal.com"
        );
        if s.http_proxy.is_none() {
            continue;
        }
        // Plain HTTP sent for a TLS port's name gets the table's catch-all, as from
        // istiod's table.
        let conn = crate::Connection {
            port: 443,
            ..crate::Connection::default()
        };
        let req = crate::route::Request {
            authority: "api.tls.com",
            path: "/",
            method: "GET",
            scheme: "http",
            headers: &(),
        };
        assert_eq!(
            routed(&s.route_explicit("api.tls.com", &conn, &req).decision),
            "blackhole"
        );
    }
}
