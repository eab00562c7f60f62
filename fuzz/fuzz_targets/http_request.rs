//! The HTTP/1.x request path up to the routing decision, as the proxy takes it: the request
//! head parsed as hyper parses it (httparse, then `http::Uri` for the target), the authority
//! taken from the absolute-form URI or the single Host header, split and routed on the
//! listener's port, for a transparent (original destination) and an explicit proxy listener.
//!
//! Never panics; and a request routed to a registered cluster names that cluster's service:
//! its authority host is one of the service's names or addresses exactly, or falls under its
//! wildcard, on the port the routing used. A CONNECT to an IP literal may also reach a
//! service by address, as opaque TCP would.
#![no_main]

use std::net::IpAddr;

use http::Method;
use libfuzzer_sys::fuzz_target;
use portcullis_fuzz::hyper_model::{authority, parse};
use portcullis_fuzz::{PORTS, expected_tcp_route, pod_named, registry, spelled_name_of};
use portcullis_registry::{Decision, PASSTHROUGH_CLUSTER, Snapshot, split_host_port};

fuzz_target!(|data: &[u8]| {
    let Some(head) = parse(data) else {
        return;
    };
    let Ok(authority) = authority(&head) else {
        return;
    };
    if head
        .uri
        .scheme()
        .is_some_and(|s| *s != http::uri::Scheme::HTTP)
    {
        return;
    }
    let (host, host_port) = match authority.as_deref().map(split_host_port) {
        Some(Ok((h, p))) => (Some(h), p),
        Some(Err(_)) => return,
        None => (None, None),
    };
    let connect = head.method == Method::CONNECT;
    // The transparent listener routes on the original destination's port, whatever the
    // authority says; the explicit proxy on the authority's port (CONNECT must name one).
    let explicit = match (host_port, connect) {
        (Some(p), _) => Some(p),
        (None, true) => None,
        (None, false) => Some(80),
    };
    let ports = PORTS
        .iter()
        .copied()
        .map(Some)
        .chain(std::iter::once(explicit))
        .flatten();
    let Some(host) = host else {
        return;
    };
    let snapshot = registry();
    for port in ports {
        let decision = if connect {
            snapshot.route_name_or_address(Some(host), host.parse().ok(), port)
        } else {
            snapshot.route_http(authority.as_deref().unwrap_or_default(), port)
        };
        match &decision {
            // A ready pod is reached through PassthroughCluster, which forwards only to pods.
            Decision::Cluster(c) if &*c.name == PASSTHROUGH_CLUSTER => {
                // `10.0.0.5.` is the pod's address as much as `10.0.0.5` is, to a resolver too.
                let named = pod_named(host.strip_suffix('.').unwrap_or(host));
                assert!(
                    named.is_some_and(|ip| Snapshot::owns_destination(c, ip)),
                    "{host:?} passed through to a pod it does not name"
                );
            }
            Decision::Cluster(c) => {
                assert_eq!(c.port, port, "{} for a request on port {port}", c.name);
                let by_address = connect
                    && host
                        .parse::<IpAddr>()
                        .is_ok_and(|ip| expected_tcp_route(ip, port) == Some(&*c.host));
                assert!(
                    by_address || spelled_name_of(host, &c.host, port),
                    "authority {authority:?} routed to {} on port {port}",
                    c.name
                );
            }
            Decision::BlackHole => {}
            Decision::Passthrough => panic!("REGISTRY_ONLY passed {authority:?} through"),
            other => panic!("{authority:?} neither routed nor refused: {other:?}"),
        }
    }
});
