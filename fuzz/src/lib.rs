//! What the routing targets share: one fixed registry, built once, and an oracle written
//! independently of the registry's indexes that says where each name or address must route.
//!
//! The oracle is a plain list walked linearly, so a bug in the snapshot's hash and suffix
//! tables cannot hide behind the same bug in the check.

pub mod hyper_model;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, LazyLock};

use portcullis_model::{Severity, load_str};
use portcullis_registry::{BuildOptions, Decision, PASSTHROUGH_CLUSTER, Snapshot, build};

/// The registry every routing target queries: exact, wildcard, DNS and CIDR services, a
/// Kubernetes Service with its short names and cluster IP, an IPv6 VIP, a whole TCP port and
/// a ready pod.
pub const REGISTRY_YAML: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: app, namespace: default}
spec:
  hosts: [app.internal.com]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {number: 80, name: http, protocol: HTTP}
  - {number: 8080, name: http-alt, protocol: HTTP}
  endpoints: [{address: 10.50.0.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wild, namespace: default}
spec:
  hosts: ["*.wild.example.com"]
  location: MESH_EXTERNAL
  resolution: NONE
  ports:
  - {number: 80, name: http, protocol: HTTP}
  - {number: 443, name: tls, protocol: TLS}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: default}
spec:
  hosts: [api.example.org]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 443, name: https, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: default}
spec:
  hosts: [db.example.net]
  addresses: [10.1.2.3, 10.9.0.0/16]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{number: 3306, name: tcp-mysql, protocol: TCP}]
  endpoints: [{address: 10.1.2.3}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: mq, namespace: default}
spec:
  hosts: [mq.example.com]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{number: 5672, name: tcp-amqp, protocol: TCP}]
  endpoints: [{address: 10.60.0.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: v6, namespace: default}
spec:
  hosts: [v6.example.com]
  addresses: ["2001:db8::1"]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: "2001:db8::10"}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 8080, targetPort: 80}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: default, labels: {app: web}}
status:
  phase: Running
  podIP: 10.0.0.5
  conditions: [{type: Ready, status: "True"}]
"#;

/// Ports the targets route on: every registered one and some that have nothing.
pub const PORTS: [u16; 8] = [80, 443, 3306, 5672, 8080, 1, 9999, 65535];

/// The one pod of the registry.
pub const POD_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5));

/// `(port, name, cluster host)`: each name (exact, or `*.` wildcard) that routes HTTP/TLS on
/// `port` to the cluster of that service host.
const HOST_ROUTES: [(u16, &str, &str); 15] = [
    (80, "app.internal.com", "app.internal.com"),
    (8080, "app.internal.com", "app.internal.com"),
    (80, "*.wild.example.com", "*.wild.example.com"),
    (443, "*.wild.example.com", "*.wild.example.com"),
    (443, "api.example.org", "api.example.org"),
    (3306, "db.example.net", "db.example.net"),
    (3306, "10.1.2.3", "db.example.net"),
    (5672, "mq.example.com", "mq.example.com"),
    (80, "v6.example.com", "v6.example.com"),
    (80, "2001:db8::1", "v6.example.com"),
    (8080, "web.default.svc.cluster.local", WEB),
    (8080, "web.default.svc", WEB),
    (8080, "web.default", WEB),
    (8080, "web", WEB),
    (8080, "10.96.0.10", WEB),
];

const WEB: &str = "web.default.svc.cluster.local";

/// The registry built from [`REGISTRY_YAML`]; panics if it does not load cleanly, since
/// every routing property below depends on it.
pub fn registry() -> &'static Snapshot {
    static SNAPSHOT: LazyLock<Snapshot> = LazyLock::new(|| {
        let loaded = load_str(REGISTRY_YAML, &Arc::new(PathBuf::from("registry.yaml")));
        let errors: Vec<String> = loaded
            .findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .map(ToString::to_string)
            .collect();
        assert!(errors.is_empty(), "fixed registry has errors: {errors:?}");
        let snapshot = build(&loaded.resources, &BuildOptions::default(), None, 1);
        // The oracle must describe this registry, else every check against it is vacuous:
        // each name it lists routes to its service.
        for (port, name, cluster) in HOST_ROUTES {
            let host = name.replace('*', "any");
            match snapshot.route_host(&host, port) {
                Decision::Cluster(c) if &*c.host == cluster => {}
                other => panic!("oracle out of date: {host}:{port} gives {other:?}"),
            }
        }
        snapshot
    });
    &SNAPSHOT
}

/// What routing a host must give: `Some(cluster host)` for a registered name, `None` for
/// the policy's or a pod's answer.
pub fn expected_host_route(host: &str, port: u16) -> Option<&'static str> {
    let mut best: Option<(usize, &'static str)> = None;
    for (p, name, cluster) in HOST_ROUTES {
        if p != port {
            continue;
        }
        if name == host {
            return Some(cluster);
        }
        // Istio's wildcard: `*.a.com` covers every name ending in `.a.com`, the longest
        // suffix winning.
        if let Some(suffix) = name.strip_prefix('*')
            && host.len() > suffix.len()
            && host.ends_with(suffix)
            && best.is_none_or(|(len, _)| suffix.len() > len)
        {
            best = Some((suffix.len(), cluster));
        }
    }
    best.map(|(_, cluster)| cluster)
}

/// What routing opaque TCP to `ip:port` must give, as for [`expected_host_route`]. The
/// addresses of HTTP services (v6.example.com, the `web` Service) route by Host only, as
/// Istio's HTTP listeners do, so opaque bytes to them are refused.
pub fn expected_tcp_route(ip: IpAddr, port: u16) -> Option<&'static str> {
    let ip = canonical(ip);
    match (port, ip) {
        (3306, IpAddr::V4(v4)) if v4 == Ipv4Addr::new(10, 1, 2, 3) => Some("db.example.net"),
        (3306, IpAddr::V4(v4)) if v4.octets()[..2] == [10, 9] => Some("db.example.net"),
        (5672, _) => Some("mq.example.com"),
        _ => None,
    }
}

/// Checks a decision against the oracle's answer for a normalised host or address on `port`:
/// the registered cluster of that port and no other, else the pod named by an address, else
/// the policy's refusal.
pub fn check_decision(decision: &Decision, expected: Option<&str>, pod: Option<IpAddr>, port: u16) {
    match (decision, expected) {
        (Decision::Cluster(c), Some(host)) => {
            assert_eq!(&*c.host, host, "routed to the wrong service");
            assert_eq!(c.port, port, "routed to a cluster of another port");
        }
        // A ready pod is reached through PassthroughCluster, which forwards only to pods.
        (Decision::Cluster(c), None) if &*c.name == PASSTHROUGH_CLUSTER => assert!(
            pod.is_some_and(|ip| Snapshot::owns_destination(c, ip)),
            "passed through to a pod not named"
        ),
        (Decision::Cluster(c), None) => panic!("routed to {} but nothing is registered", c.name),
        (Decision::BlackHole, None) => assert_ne!(pod, Some(POD_IP), "the ready pod was refused"),
        (other, Some(host)) => panic!("{host} is registered on {port} but routed to {other:?}"),
        (Decision::Passthrough, None) => panic!("REGISTRY_ONLY registry passed traffic through"),
        (other, None) => panic!("neither routed nor refused: {other:?}"),
    }
}

/// The pod an address names, if it is the registry's pod (IPv4-mapped spellings included).
pub fn pod_named(host: &str) -> Option<IpAddr> {
    host.parse::<IpAddr>()
        .ok()
        .map(canonical)
        .filter(|&ip| ip == POD_IP)
}

/// Whether a request's authority host, as the client spelled it, names `cluster`'s service:
/// one of its registered names or addresses exactly (case, one trailing dot and the spelling
/// of an IP literal, IPv4-mapped IPv6 included, aside), or a name under its wildcard. Written without the registry's
/// normalisation, so that normalisation cannot widen what a client reaches unnoticed.
pub fn spelled_name_of(raw_host: &str, cluster_host: &str, port: u16) -> bool {
    let host = raw_host.strip_suffix('.').unwrap_or(raw_host);
    let ip = host.parse::<IpAddr>().ok();
    HOST_ROUTES
        .iter()
        .filter(|&&(p, _, c)| p == port && c == cluster_host)
        .any(|&(_, name, _)| match (ip, name.parse::<IpAddr>().ok()) {
            (Some(a), Some(b)) => canonical(a) == canonical(b),
            (None, None) => match name.strip_prefix('*') {
                Some(suffix) => {
                    host.len() > suffix.len()
                        && host.is_char_boundary(host.len() - suffix.len())
                        && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                }
                None => host.eq_ignore_ascii_case(name),
            },
            _ => false,
        })
}

/// IPv4-mapped IPv6 addresses are the IPv4 address they carry, as the registry treats them.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}
