//! Host and authority normalisation and every routing lookup over a fixed registry: never
//! panics, `normalize_host` is idempotent, and each decision is exactly what an independent
//! list of the registry's names and addresses says: the service registered under that name on
//! that port and no other, a named pod, else the refusal of REGISTRY_ONLY.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use portcullis_fuzz::{
    POD_IP, PORTS, canonical, check_decision, expected_host_route, expected_tcp_route, pod_named,
    registry,
};
use portcullis_registry::{Decision, normalize_host, split_host_port};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the port the traffic arrived on; the rest is the host or authority
    // (as text), or the destination address (as bytes).
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let port = PORTS[usize::from(pick) % PORTS.len()];
    let text = String::from_utf8_lossy(rest);
    normalization(&text);
    host(&text, port);
    authority(&text, port);
    address(rest, port);
});

fn normalization(text: &str) {
    if let Ok(host) = normalize_host(text) {
        assert_eq!(normalize_host(&host).as_ref(), Ok(&host), "not idempotent");
        assert!(!host.bytes().any(|b| b.is_ascii_uppercase()), "{host:?}");
    }
    if let Ok((_, Some(port))) = split_host_port(text) {
        assert_ne!(port, 0, "port 0 accepted in {text:?}");
    }
}

/// `route_host`: a bare name or IP literal (Host without port, SNI, CONNECT target).
fn host(text: &str, port: u16) {
    let decision = registry().route_host(text, port);
    match normalize_host(text) {
        Ok(h) => check_decision(
            &decision,
            expected_host_route(&h, port),
            pod_named(&h),
            port,
        ),
        Err(_) => assert!(matches!(decision, Decision::BlackHole), "{decision:?}"),
    }
}

/// `route_http`: an authority's host routes on the port the request arrived on, whatever
/// port the authority names (Istio's `ignore_port_in_host_matching`).
fn authority(text: &str, port: u16) {
    let decision = registry().route_http(text, port);
    let host = split_host_port(text).ok().map(|(host, _)| host);
    match host.map(normalize_host) {
        Some(Ok(h)) => check_decision(
            &decision,
            expected_host_route(&h, port),
            pod_named(&h),
            port,
        ),
        _ => assert!(matches!(decision, Decision::BlackHole), "{decision:?}"),
    }
}

/// `route_tcp`: the bytes read as an IPv4 (4 to 15 bytes) or IPv6 (16 or more) address.
fn address(bytes: &[u8], port: u16) {
    let ip = if let Some(v6) = bytes.first_chunk::<16>() {
        IpAddr::V6(Ipv6Addr::from(*v6))
    } else if let Some(v4) = bytes.first_chunk::<4>() {
        IpAddr::V4(Ipv4Addr::from(*v4))
    } else {
        return;
    };
    let decision = registry().route_tcp(ip, port);
    let pod = Some(canonical(ip)).filter(|&ip| ip == POD_IP);
    check_decision(&decision, expected_tcp_route(ip, port), pod, port);
}
