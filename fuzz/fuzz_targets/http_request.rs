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

use http::{HeaderValue, Method, Uri};
use libfuzzer_sys::fuzz_target;
use portcullis_fuzz::{PORTS, expected_tcp_route, pod_named, registry, spelled_name_of};
use portcullis_registry::{Decision, split_host_port};

/// The proxy's limit on request header fields (`max_request_headers`).
const MAX_HEADERS: usize = 100;

/// What the routing step sees of a request.
struct Head {
    method: Method,
    uri: Uri,
    /// Every Host header's value, as the proxy reads it with `to_str`.
    hosts: Vec<Option<String>>,
}

/// Parses as hyper's HTTP/1 server does; `None` where hyper answers 400 or waits for more.
fn parse(data: &[u8]) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(_) = req.parse(data).ok()? else {
        return None;
    };
    let method = Method::from_bytes(req.method?.as_bytes()).ok()?;
    let uri = Uri::try_from(req.path?).ok()?;
    let mut hosts = Vec::new();
    for header in req.headers.iter() {
        if header.name.eq_ignore_ascii_case("host") {
            let value = HeaderValue::from_bytes(header.value).ok();
            hosts.push(value.and_then(|v| v.to_str().ok().map(str::to_owned)));
        }
    }
    Some(Head { method, uri, hosts })
}

/// The proxy's `authority()`: the absolute-form URI's authority, else the single Host;
/// `Err` for a request the proxy answers 400.
fn authority(head: &Head) -> Result<Option<String>, ()> {
    if head.hosts.len() > 1 {
        return Err(());
    }
    if let Some(a) = head.uri.authority() {
        return Ok(Some(a.as_str().to_owned()));
    }
    match head.hosts.first() {
        None => Ok(None),
        Some(Some(h)) => Ok(Some(h.clone())),
        Some(None) => Err(()),
    }
}

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
            Decision::Pod(ip) => {
                // `10.0.0.5.` is the pod's address as much as `10.0.0.5` is, to a resolver too.
                let named = pod_named(host.strip_suffix('.').unwrap_or(host));
                assert_eq!(Some(*ip), named, "{host:?} reached {ip}")
            }
            Decision::BlackHole => {}
            Decision::Passthrough => panic!("REGISTRY_ONLY passed {authority:?} through"),
        }
    }
});
