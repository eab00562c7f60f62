//! ServiceEntries that allow exactly what was refused: one per name (resolution DNS), one
//! per bare address (resolution NONE over that one address), each port with the protocol
//! it was seen with.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::net::IpAddr;
use std::time::SystemTime;

use portcullis_registry::non_public;

use crate::{Protocol, rfc3339};

/// One aggregated refusal, as learning reads it.
#[derive(Debug, Clone)]
pub struct Seen<'a> {
    /// The name asked for, if any.
    pub host: Option<&'a str>,
    /// The address, when no name was.
    pub address: Option<IpAddr>,
    /// The port.
    pub port: u16,
    /// How it was spoken.
    pub protocol: Protocol,
    /// The original destinations the name was seen going to.
    pub destinations: Vec<IpAddr>,
    /// Refusals (and would-be refusals).
    pub count: u64,
    /// First refusal.
    pub first_seen: SystemTime,
    /// Last refusal.
    pub last_seen: SystemTime,
}

/// What one port of a learned entry aggregates.
#[derive(Debug)]
struct Port {
    protocols: BTreeSet<&'static str>,
    count: u64,
    first_seen: SystemTime,
    last_seen: SystemTime,
}

/// The ServiceEntry protocol for traffic seen as `protocol` on `port`, for a name
/// (`named`) or a bare address. An address has no name to route TLS by, so TLS to it is
/// opaque TCP: that allows the address and port that were seen, and no more. HTTP to an
/// address named it in the Host, which routes it.
fn port_protocol(protocol: Protocol, port: u16, named: bool) -> &'static str {
    match (protocol, named) {
        (Protocol::Http, _) => "HTTP",
        (Protocol::Tls, true) => "TLS",
        (Protocol::Connect, true) if port == 443 => "TLS",
        _ => "TCP",
    }
}

/// The protocol a learned port declares, from what was seen on it (`None`: undeclared,
/// sniffed). A port takes one protocol: HTTP beside other traffic, or to a bare address, is
/// left to Istio's sniffing, which routes HTTP by Host (an address's own, for a bare one)
/// and carries the rest as TCP, where opaque TCP would not take HTTP through the explicit
/// proxy (Istio's `http_proxy` table names HTTP and sniffed ports only); other mixes are
/// opaque TCP, which carries them all.
fn declared(protocols: &BTreeSet<&'static str>, named: bool) -> Option<&'static str> {
    let http = protocols.contains("HTTP");
    match protocols.first() {
        Some(&only) if protocols.len() == 1 && (named || !http) => Some(only),
        _ if http => None,
        _ => Some("TCP"),
    }
}

/// A DNS-1123 label from `text`: lower case, other characters as `-`, at most 63.
fn label(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    while out.contains("--") {
        out = out.replace("--", "-");
    }
    let mut out = out.trim_matches('-').to_string();
    out.truncate(63);
    let out = out.trim_end_matches('-').to_string();
    if out.is_empty() {
        "learned".to_string()
    } else {
        out
    }
}

/// The YAML of the ServiceEntries in `namespace` that allow everything in `seen`.
pub fn learned_yaml(seen: &[Seen<'_>], namespace: &str) -> String {
    let mut by_name: BTreeMap<String, BTreeMap<u16, Port>> = BTreeMap::new();
    // A name seen going to non-public addresses: the SSRF guard would refuse those answers
    // of its DNS, so the entry sends to the addresses seen (resolution STATIC), still by name.
    let mut private: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
    let mut by_address: BTreeMap<IpAddr, BTreeMap<u16, Port>> = BTreeMap::new();
    for s in seen {
        let (ports, named) = match (s.host, s.address) {
            (Some(h), _) => {
                let inside = s.destinations.iter().filter(|a| non_public(**a).is_some());
                private.entry(h.to_string()).or_default().extend(inside);
                (by_name.entry(h.to_string()).or_default(), true)
            }
            (None, Some(a)) => (by_address.entry(a).or_default(), false),
            // Nothing to name and nowhere it went: no entry could allow it.
            (None, None) => continue,
        };
        let port = ports.entry(s.port).or_insert_with(|| Port {
            protocols: BTreeSet::new(),
            count: 0,
            first_seen: s.first_seen,
            last_seen: s.last_seen,
        });
        port.protocols
            .insert(port_protocol(s.protocol, s.port, named));
        port.count += s.count;
        port.first_seen = port.first_seen.min(s.first_seen);
        port.last_seen = port.last_seen.max(s.last_seen);
    }
    let mut out = String::new();
    let total = by_name.len() + by_address.len();
    // The last refusal, not the time of asking: the same records give the same text.
    let last = seen.iter().map(|s| s.last_seen).max();
    let _ = writeln!(
        out,
        "# ServiceEntries learned by portcullis from refused traffic: {total} destination(s), last seen {}.",
        last.map_or_else(|| "never".to_string(), rfc3339)
    );
    out.push_str(
        "# Applied, they allow exactly what was seen (these names and addresses, on these ports).\n",
    );
    for (parent, children) in wildcard_proposals(by_name.keys()) {
        let _ = writeln!(
            out,
            "# Proposed, not applied: \"*.{parent}\" would cover {} and every other subdomain \
             ({} subdomains seen); a wildcard needs resolution NONE or DYNAMIC_DNS.",
            children.join(", "),
            children.len()
        );
    }
    let mut names = BTreeSet::new();
    let mut unique = |base: String| {
        let mut name = base.clone();
        let mut n = 2;
        while !names.insert(name.clone()) {
            name = format!("{}-{n}", &base[..base.len().min(60)]);
            n += 1;
        }
        name
    };
    for (host, ports) in &by_name {
        let name = unique(label(host));
        let addresses = private.get(host).filter(|a| !a.is_empty());
        entry(
            &mut out,
            &name,
            namespace,
            host,
            Address::Name(addresses),
            ports,
        );
    }
    for (address, ports) in &by_address {
        let base = label(&format!("ip-{address}"));
        let name = unique(base.clone());
        let host = format!("{base}.external");
        entry(
            &mut out,
            &name,
            namespace,
            &host,
            Address::Bare(*address),
            ports,
        );
    }
    out
}

/// Parents with at least two distinct subdomains among `hosts`, with those subdomains. A
/// parent must keep two labels (`example.com`), never a public suffix alone.
fn wildcard_proposals<'a>(
    hosts: impl Iterator<Item = &'a String>,
) -> BTreeMap<&'a str, Vec<&'a str>> {
    let mut parents: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for host in hosts {
        if let Some((_, parent)) = host.split_once('.')
            && parent.contains('.')
        {
            parents.entry(parent).or_default().push(host);
        }
    }
    parents.retain(|_, children| children.len() >= 2);
    parents
}

/// What an entry is for: a name (with the non-public addresses it was seen going to), or
/// a bare address.
enum Address<'a> {
    Name(Option<&'a BTreeSet<IpAddr>>),
    Bare(IpAddr),
}

fn entry(
    out: &mut String,
    name: &str,
    namespace: &str,
    host: &str,
    address: Address<'_>,
    ports: &BTreeMap<u16, Port>,
) {
    let count: u64 = ports.values().map(|p| p.count).sum();
    let first = ports.values().map(|p| p.first_seen).min();
    let last = ports.values().map(|p| p.last_seen).max();
    out.push_str("---\n");
    let _ = writeln!(
        out,
        "# {}: {count} refused, first seen {}, last seen {}",
        match address {
            Address::Bare(a) => a.to_string(),
            Address::Name(_) => host.to_string(),
        },
        first.map_or_else(String::new, rfc3339),
        last.map_or_else(String::new, rfc3339),
    );
    out.push_str("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n");
    let _ = writeln!(out, "  name: {name}\n  namespace: {namespace}");
    out.push_str("  labels:\n    portcullis.io/learned: \"true\"\nspec:\n  hosts:\n");
    let _ = writeln!(out, "  - {host}");
    match address {
        Address::Bare(a) => {
            let _ = writeln!(out, "  addresses:\n  - {a}");
        }
        Address::Name(Some(inside)) => {
            out.push_str(
                "  # Seen going to non-public addresses, which the SSRF guard refuses as DNS\n  \
                 # answers: these endpoints are the addresses seen (with --ssrf-guard off,\n  \
                 # resolution DNS and no endpoints is Istio's way).\n  endpoints:\n",
            );
            for a in inside {
                let _ = writeln!(out, "  - address: {a}");
            }
        }
        Address::Name(None) => {}
    }
    out.push_str("  location: MESH_EXTERNAL\n  ports:\n");
    let named = matches!(address, Address::Name(_));
    for (number, port) in ports {
        let _ = writeln!(
            out,
            "  # port {number}: {} refused as {}, first seen {}, last seen {}",
            port.count,
            port.protocols.iter().copied().collect::<Vec<_>>().join("/"),
            rfc3339(port.first_seen),
            rfc3339(port.last_seen),
        );
        match declared(&port.protocols, named) {
            Some(protocol) => {
                let _ = writeln!(
                    out,
                    "  - number: {number}\n    name: {}-{number}\n    protocol: {protocol}",
                    protocol.to_ascii_lowercase()
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "  - number: {number}\n    name: port-{number}\n    # protocol undeclared: sniffed"
                );
            }
        }
    }
    let resolution = match address {
        Address::Bare(_) => "NONE",
        Address::Name(Some(_)) => "STATIC",
        Address::Name(None) => "DNS",
    };
    let _ = writeln!(out, "  resolution: {resolution}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(
        host: Option<&'static str>,
        address: Option<&str>,
        port: u16,
        p: Protocol,
    ) -> Seen<'static> {
        Seen {
            host,
            address: address.map(|a| a.parse().unwrap()),
            port,
            protocol: p,
            destinations: Vec::new(),
            count: 3,
            first_seen: SystemTime::UNIX_EPOCH,
            last_seen: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(60),
        }
    }

    #[test]
    fn one_entry_per_name_with_every_port_seen() {
        let yaml = learned_yaml(
            &[
                seen(Some("api.foo.com"), None, 443, Protocol::Tls),
                seen(Some("api.foo.com"), None, 80, Protocol::Http),
            ],
            "shop",
        );
        let body = yaml.split("---\n").nth(1).unwrap();
        let lines: Vec<&str> = body
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect();
        assert_eq!(
            lines,
            [
                "apiVersion: networking.istio.io/v1",
                "kind: ServiceEntry",
                "metadata:",
                "  name: api-foo-com",
                "  namespace: shop",
                "  labels:",
                "    portcullis.io/learned: \"true\"",
                "spec:",
                "  hosts:",
                "  - api.foo.com",
                "  location: MESH_EXTERNAL",
                "  ports:",
                "  - number: 80",
                "    name: http-80",
                "    protocol: HTTP",
                "  - number: 443",
                "    name: tls-443",
                "    protocol: TLS",
                "  resolution: DNS",
            ]
        );
        assert!(
            body.starts_with("# api.foo.com: 6 refused, first seen 1970-01-01T00:00:00Z, last seen 1970-01-01T00:01:00Z"),
            "{body}"
        );
        assert!(body.contains("# port 443: 3 refused as TLS"), "{body}");
    }

    #[test]
    fn a_bare_address_is_allowed_alone_as_opaque_tcp_or_sniffed() {
        let yaml = learned_yaml(
            &[
                seen(None, Some("10.1.2.3"), 5432, Protocol::Tcp),
                seen(None, Some("10.1.2.3"), 8443, Protocol::Tls),
                seen(None, Some("10.1.2.3"), 8080, Protocol::Http),
            ],
            "default",
        );
        assert!(yaml.contains("  name: ip-10-1-2-3\n"), "{yaml}");
        assert!(
            yaml.contains("  hosts:\n  - ip-10-1-2-3.external\n  addresses:\n  - 10.1.2.3\n"),
            "{yaml}"
        );
        for port in [5432, 8443] {
            assert!(
                yaml.contains(&format!("    name: tcp-{port}\n    protocol: TCP\n")),
                "{yaml}"
            );
        }
        assert!(
            yaml.contains("    name: port-8080\n    # protocol undeclared: sniffed\n"),
            "{yaml}"
        );
        assert!(yaml.contains("# port 8080: 3 refused as HTTP"), "{yaml}");
        assert!(yaml.contains("  resolution: NONE\n"), "{yaml}");
    }

    #[test]
    fn a_port_takes_one_protocol_http_beside_others_sniffed() {
        let set = |p: &[&'static str]| p.iter().copied().collect::<BTreeSet<_>>();
        assert_eq!(declared(&set(&["HTTP"]), true), Some("HTTP"));
        assert_eq!(declared(&set(&["HTTP"]), false), None);
        assert_eq!(declared(&set(&["HTTP", "TCP"]), true), None);
        assert_eq!(declared(&set(&["HTTP", "TLS"]), true), None);
        assert_eq!(declared(&set(&["TLS", "TCP"]), true), Some("TCP"));
        assert_eq!(declared(&set(&["TLS"]), true), Some("TLS"));
        assert_eq!(declared(&set(&["TCP"]), false), Some("TCP"));
    }

    #[test]
    fn wildcards_are_proposed_in_comments_only_for_several_subdomains() {
        let yaml = learned_yaml(
            &[
                seen(Some("a.foo.com"), None, 443, Protocol::Tls),
                seen(Some("b.foo.com"), None, 443, Protocol::Tls),
                seen(Some("solo.bar.com"), None, 443, Protocol::Tls),
                seen(Some("foo.com"), None, 443, Protocol::Tls),
            ],
            "default",
        );
        let proposals: Vec<&str> = yaml
            .lines()
            .filter(|l| l.starts_with("# Proposed"))
            .collect();
        assert_eq!(proposals.len(), 1, "{yaml}");
        assert!(
            proposals[0].contains("\"*.foo.com\" would cover a.foo.com, b.foo.com"),
            "{yaml}"
        );
        assert!(!yaml.lines().any(|l| l.starts_with("  - \"*")), "{yaml}");
        assert_eq!(yaml.matches("kind: ServiceEntry").count(), 4);
    }

    #[test]
    fn names_are_dns_labels_and_unique() {
        assert_eq!(label("API.Foo_bar.com"), "api-foo-bar-com");
        assert_eq!(label("ip-fd00::1"), "ip-fd00-1");
        assert_eq!(label(&"x".repeat(80)).len(), 63);
        let yaml = learned_yaml(
            &[
                seen(Some("a-b.com"), None, 443, Protocol::Tls),
                seen(Some("a.b.com"), None, 443, Protocol::Tls),
            ],
            "default",
        );
        assert!(yaml.contains("  name: a-b-com\n"), "{yaml}");
        assert!(yaml.contains("  name: a-b-com-2\n"), "{yaml}");
    }

    #[test]
    fn a_name_seen_going_to_private_addresses_lists_them() {
        let mut api = seen(Some("db.corp.example"), None, 443, Protocol::Tls);
        api.destinations = vec![
            "10.1.2.3".parse().unwrap(),
            "93.184.215.14".parse().unwrap(),
        ];
        let yaml = learned_yaml(&[api], "default");
        assert!(
            yaml.contains("  endpoints:\n  - address: 10.1.2.3\n  location: MESH_EXTERNAL\n"),
            "only the non-public address is an endpoint:\n{yaml}"
        );
        assert!(yaml.contains("  resolution: STATIC\n"), "{yaml}");
    }

    #[test]
    fn a_connect_tunnel_to_443_is_tls_and_to_other_ports_tcp() {
        assert_eq!(port_protocol(Protocol::Connect, 443, true), "TLS");
        assert_eq!(port_protocol(Protocol::Connect, 5432, true), "TCP");
        assert_eq!(port_protocol(Protocol::Http, 80, false), "HTTP");
        assert_eq!(port_protocol(Protocol::Tls, 443, false), "TCP");
    }
}
