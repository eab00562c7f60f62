//! Fixtures shared by the criterion benchmarks: generated registries of any size, the
//! lookup keys that hit each kind of index, and a real TLS ClientHello.
//!
//! The registries are written as Istio YAML and loaded with the same loader the proxy
//! uses, so the benchmarks measure the snapshot a user's config actually compiles to.

pub mod model;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;

use portcullis_model::Resource;
use portcullis_registry::{BuildOptions, Snapshot, build};

/// The registry sizes every routing benchmark runs at.
pub const SIZES: [usize; 3] = [10, 1_000, 100_000];

/// Port of the HTTP routes (by Host).
pub const HTTP_PORT: u16 = 80;
/// Port of the TLS routes (by SNI).
pub const TLS_PORT: u16 = 443;
/// Port of the opaque TCP routes (by address).
pub const TCP_PORT: u16 = 5432;

/// What entry `i` of a generated registry is; the kinds repeat every four entries so that
/// every size, even 10, has each kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `svc-I.ns-J.example.com` on HTTP 80 and TLS 443.
    Exact,
    /// `*.wild-I.example.org` on HTTP 80 and TLS 443.
    Wildcard,
    /// `db-I.example.net` with one virtual IP on TCP 5432.
    Address,
    /// `range-I.example.net` with a /28 on TCP 5432.
    Cidr,
}

fn kind(i: usize) -> Kind {
    match i % 4 {
        0 => Kind::Exact,
        1 => Kind::Wildcard,
        2 => Kind::Address,
        _ => Kind::Cidr,
    }
}

fn ipv4(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(n)
}

/// The virtual IP of an [`Kind::Address`] entry: unique per entry, inside 10.0.0.0/8.
fn vip(i: usize) -> Ipv4Addr {
    ipv4(0x0A00_0000 + u32::try_from(i).expect("registry fits in u32"))
}

/// The /28 of a [`Kind::Cidr`] entry: unique per entry, inside 172.16.0.0/12.
fn cidr_base(i: usize) -> Ipv4Addr {
    ipv4(0xAC10_0000 + 16 * u32::try_from(i / 4).expect("registry fits in u32"))
}

/// An endpoint address; never dialled, the benchmarks only route.
fn endpoint(i: usize) -> Ipv4Addr {
    ipv4(0xC0A8_0000 + u32::try_from(i % 65_000).expect("small"))
}

/// Istio YAML for `n` ServiceEntries: exact and wildcard hosts on HTTP and TLS ports,
/// virtual IPs and CIDR ranges on a TCP port.
pub fn registry_yaml(n: usize) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(n * 400);
    for i in 0..n {
        let (host, addresses, ports, resolution) = match kind(i) {
            Kind::Exact => (
                format!("svc-{i}.ns-{}.example.com", i % 97),
                String::new(),
                "[{number: 80, name: http, protocol: HTTP}, {number: 443, name: https, protocol: TLS}]",
                "STATIC",
            ),
            Kind::Wildcard => (
                format!("\"*.wild-{i}.example.org\""),
                String::new(),
                "[{number: 80, name: http, protocol: HTTP}, {number: 443, name: https, protocol: TLS}]",
                "STATIC",
            ),
            Kind::Address => (
                format!("db-{i}.example.net"),
                format!("  addresses: [{}]\n", vip(i)),
                "[{number: 5432, name: tcp, protocol: TCP}]",
                "STATIC",
            ),
            Kind::Cidr => (
                format!("range-{i}.example.net"),
                format!("  addresses: [{}/28]\n", cidr_base(i)),
                "[{number: 5432, name: tcp, protocol: TCP}]",
                "STATIC",
            ),
        };
        let _ = write!(
            out,
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
             metadata: {{name: se-{i}, namespace: ns-{ns}}}\nspec:\n  hosts: [{host}]\n\
             {addresses}  ports: {ports}\n  location: MESH_EXTERNAL\n  resolution: {resolution}\n\
             \x20 endpoints: [{{address: {ep}}}]\n",
            ns = i % 97,
            ep = endpoint(i),
        );
    }
    out
}

/// Loads generated YAML with the proxy's own loader; panics on any error finding, since a
/// benchmark of a registry that silently lost entries would measure nothing.
pub fn load(yaml: &str) -> Vec<Resource> {
    let file = Arc::new(PathBuf::from("generated.yaml"));
    let loaded = portcullis_model::load_str(yaml, &file);
    assert!(
        !loaded.has_errors(),
        "generated registry does not validate: {:?}",
        loaded.findings.first()
    );
    loaded.resources
}

/// The resources of a registry of `n` ServiceEntries.
pub fn resources(n: usize) -> Vec<Resource> {
    load(&registry_yaml(n))
}

/// A compiled snapshot of `n` ServiceEntries.
pub fn snapshot(n: usize) -> Snapshot {
    build(&resources(n), &BuildOptions::default(), None, 1)
}

/// The entry of `kind` nearest the middle of a registry of `n`, so that lookups do not
/// favour whatever a hash table or list holds first.
fn middle(n: usize, want: Kind) -> usize {
    let start = n / 2 - (n / 2) % 4;
    (start..n)
        .chain(0..start)
        .find(|&i| kind(i) == want)
        .expect("every registry of 4 or more entries has every kind")
}

/// Lookup keys for a registry of `n` entries: one per kind of hit and miss.
#[derive(Debug, Clone)]
pub struct Keys {
    /// A registered exact hostname.
    pub exact_host: String,
    /// A name under a registered `*.` wildcard, three labels deeper.
    pub wildcard_host: String,
    /// A name nothing registers.
    pub missing_host: String,
    /// A registered virtual IP.
    pub exact_ip: IpAddr,
    /// An address inside a registered CIDR range.
    pub cidr_ip: IpAddr,
    /// An address nothing registers (TEST-NET-1).
    pub missing_ip: IpAddr,
}

/// The keys for a registry built by [`registry_yaml`]`(n)`.
pub fn keys(n: usize) -> Keys {
    let cidr = middle(n, Kind::Cidr);
    Keys {
        exact_host: format!(
            "svc-{i}.ns-{}.example.com",
            middle(n, Kind::Exact) % 97,
            i = middle(n, Kind::Exact)
        ),
        wildcard_host: format!("api.v1.eu.wild-{}.example.org", middle(n, Kind::Wildcard)),
        missing_host: "nothing-here.example.com".to_string(),
        exact_ip: IpAddr::V4(vip(middle(n, Kind::Address))),
        cidr_ip: IpAddr::V4(ipv4(u32::from(cidr_base(cidr)) + 9)),
        missing_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
    }
}

/// The bytes a rustls client sends first: a real TLS 1.3 ClientHello for `server`, with
/// ALPN `h2` and `http/1.1`.
pub fn rustls_client_hello(server: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from(server.to_owned()).expect("a DNS name");
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), name).expect("a client connection");
    let mut wire = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut wire).expect("writing to a Vec");
    }
    wire
}

#[cfg(test)]
mod tests {
    use portcullis_registry::Decision;

    use super::*;

    fn cluster(d: &Decision) -> &str {
        match d {
            Decision::Cluster(c) => &c.host,
            other => panic!("expected a cluster, got {other:?}"),
        }
    }

    /// Every key routes where the benchmark's name says it does, at every size; otherwise
    /// a "hit" benchmark could be timing a miss.
    #[test]
    fn keys_hit_and_miss_as_named() {
        // From the YAML, and from the hand-built model, where a missing host meets Istio's
        // `block_all` direct 502.
        for (n, s) in [10, 1_000]
            .into_iter()
            .flat_map(|n| [(n, snapshot(n)), (n, model::indexed(n))])
        {
            let k = keys(n);
            assert!(cluster(&s.route_http(&k.exact_host, HTTP_PORT)).starts_with("svc-"));
            assert!(cluster(&s.route_http(&k.wildcard_host, HTTP_PORT)).starts_with("*.wild-"));
            assert!(
                matches!(
                    s.route_http(&k.missing_host, HTTP_PORT),
                    Decision::BlackHole
                ) || matches!(s.route_http(&k.missing_host, HTTP_PORT), Decision::Direct(d) if d.status == 502)
            );
            let sni = |host| s.route_tls(Some(host), k.missing_ip, TLS_PORT);
            assert!(cluster(&sni(&k.exact_host)).starts_with("svc-"));
            assert!(cluster(&sni(&k.wildcard_host)).starts_with("*.wild-"));
            assert!(cluster(&s.route_tcp(k.exact_ip, TCP_PORT)).starts_with("db-"));
            assert!(cluster(&s.route_tcp(k.cidr_ip, TCP_PORT)).starts_with("range-"));
            assert!(matches!(
                s.route_tcp(k.missing_ip, TCP_PORT),
                Decision::BlackHole
            ));
            let ports: usize = (0..n)
                .map(|i| match kind(i) {
                    Kind::Exact | Kind::Wildcard => 2,
                    Kind::Address | Kind::Cidr => 1,
                })
                .sum();
            assert_eq!(s.services().count(), ports, "one cluster per host and port");
        }
    }

    #[test]
    fn the_client_hello_parses() {
        let hello = portcullis_proxy::tls::parse_client_hello(&rustls_client_hello("a.example"))
            .expect("valid")
            .expect("complete");
        assert_eq!(hello.sni.as_deref(), Some("a.example"));
    }
}
