//! Why the registry refuses a destination, in words an operator can act on.
//!
//! Only refused traffic is explained, from the snapshot's services by host: the hosts that
//! cover the refused name, never a walk of every service (a refusal is data path work, and
//! a client can make many).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use portcullis_model::Resolution;

use crate::host::normalized;
use crate::snapshot::{Cluster, Snapshot, canonical};

/// What was refused: the name the client asked for and where its bytes were going.
#[derive(Debug, Clone, Copy)]
pub struct Refused<'a> {
    /// The Host, `:authority`, SNI or CONNECT target, without its port.
    pub host: Option<&'a str>,
    /// The original destination, when intercepted.
    pub destination: Option<SocketAddr>,
    /// The port the client connected to (the original destination's, or the named one).
    pub port: u16,
}

/// The reason a destination is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// No service has the name at all.
    NoServiceEntry {
        /// The requested name.
        host: String,
        /// The requested port.
        port: u16,
    },
    /// The name is registered, on other ports only.
    PortNotDeclared {
        /// The requested name.
        host: String,
        /// The requested port.
        port: u16,
        /// The ports the name has.
        ports: Vec<u16>,
    },
    /// A resolution-NONE service of the name does not own the destination address.
    AddressNotOwned {
        /// The requested name.
        host: String,
        /// The destination the client connected to.
        address: IpAddr,
    },
    /// The name has the port, but not for this kind of traffic (TLS to an HTTP port, a
    /// listener that sends the name elsewhere).
    NotForProtocol {
        /// The requested name.
        host: String,
        /// The requested port.
        port: u16,
    },
    /// No name, and no TCP service at the destination.
    NoTcpService {
        /// The destination address.
        address: IpAddr,
        /// The destination port.
        port: u16,
    },
    /// No name and no destination address: nothing to match.
    NoHost,
}

impl Reason {
    /// A short stable code for metrics labels.
    pub fn code(&self) -> &'static str {
        match self {
            Reason::NoServiceEntry { .. } => "no_service_entry",
            Reason::PortNotDeclared { .. } => "port_not_declared",
            Reason::AddressNotOwned { .. } => "address_not_owned",
            Reason::NotForProtocol { .. } => "not_for_protocol",
            Reason::NoTcpService { .. } => "no_tcp_service",
            Reason::NoHost => "no_host",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NoServiceEntry { host, port } => {
                write!(f, "no ServiceEntry for host \"{host}\" on port {port}")
            }
            Reason::PortNotDeclared { host, port, ports } => {
                let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
                write!(
                    f,
                    "host \"{host}\" is registered on port {} but not on port {port}",
                    ports.join(", ")
                )
            }
            Reason::AddressNotOwned { host, address } => write!(
                f,
                "host \"{host}\" registered but {address} is not one of its addresses (resolution NONE)"
            ),
            Reason::NotForProtocol { host, port } => write!(
                f,
                "host \"{host}\" is registered on port {port}, but not for this protocol"
            ),
            Reason::NoTcpService { address, port } => {
                write!(f, "port {port} has no TCP service at {address}")
            }
            Reason::NoHost => f.write_str("no Host, SNI or destination address to match"),
        }
    }
}

impl Snapshot {
    /// Why `refused` found no service: the closest registered thing and what it lacks.
    pub fn explain(&self, refused: Refused<'_>) -> Reason {
        let name = refused
            .host
            .and_then(|h| normalized(h).ok())
            .filter(|n| n.ip.is_none());
        let Some(name) = name else {
            return match refused.destination {
                Some(dst) => Reason::NoTcpService {
                    address: canonical(dst.ip()),
                    port: refused.port,
                },
                None => match refused.host.and_then(|h| normalized(h).ok()?.ip) {
                    Some(ip) => Reason::NoTcpService {
                        address: ip,
                        port: refused.port,
                    },
                    None => Reason::NoHost,
                },
            };
        };
        let host = name.text.into_owned();
        let named: Vec<&Cluster> = self.services_covering(&host).map(|c| &**c).collect();
        if named.is_empty() {
            return Reason::NoServiceEntry {
                host,
                port: refused.port,
            };
        }
        let on_port: Vec<&&Cluster> = named.iter().filter(|c| c.port == refused.port).collect();
        if on_port.is_empty() {
            let mut ports: Vec<u16> = named.iter().map(|c| c.port).collect();
            ports.sort_unstable();
            ports.dedup();
            return Reason::PortNotDeclared {
                host,
                port: refused.port,
                ports,
            };
        }
        let unowned = refused.destination.filter(|dst| {
            on_port.iter().any(|c| {
                c.resolution == Resolution::None && !Snapshot::owns_destination(c, dst.ip())
            })
        });
        match unowned {
            Some(dst) => Reason::AddressNotOwned {
                host,
                address: canonical(dst.ip()),
            },
            None => Reason::NotForProtocol {
                host,
                port: refused.port,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::tests::snapshot as snapshot_of;

    const REGISTRY: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: default}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}, {number: 80, name: http, protocol: HTTP}]
  resolution: DNS
  location: MESH_EXTERNAL
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: default}
spec:
  hosts: [db.example.com]
  addresses: [10.9.0.0/24]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  resolution: NONE
  location: MESH_EXTERNAL
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wild, namespace: default}
spec:
  hosts: ["*.wild.example.com"]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
  location: MESH_EXTERNAL
"#;

    fn explain(host: Option<&str>, dst: Option<&str>, port: u16) -> String {
        let snapshot = snapshot_of(REGISTRY);
        snapshot
            .explain(Refused {
                host,
                destination: dst.map(|d| d.parse().unwrap()),
                port,
            })
            .to_string()
    }

    #[test]
    fn an_unknown_name_is_named_with_its_port() {
        assert_eq!(
            explain(Some("API.foo.com."), Some("1.2.3.4:443"), 443),
            "no ServiceEntry for host \"api.foo.com\" on port 443"
        );
    }

    #[test]
    fn a_known_name_on_another_port_lists_the_ports_it_has() {
        assert_eq!(
            explain(Some("api.example.com"), None, 8443),
            "host \"api.example.com\" is registered on port 80, 443 but not on port 8443"
        );
        assert_eq!(
            explain(Some("a.wild.example.com"), None, 80),
            "host \"a.wild.example.com\" is registered on port 443 but not on port 80"
        );
    }

    #[test]
    fn resolution_none_names_the_address_it_does_not_own() {
        assert_eq!(
            explain(Some("db.example.com"), Some("10.1.2.3:5432"), 5432),
            "host \"db.example.com\" registered but 10.1.2.3 is not one of its addresses (resolution NONE)"
        );
    }

    #[test]
    fn a_known_name_and_port_refused_for_its_protocol() {
        assert_eq!(
            explain(Some("api.example.com"), Some("1.2.3.4:443"), 443),
            "host \"api.example.com\" is registered on port 443, but not for this protocol"
        );
    }

    #[test]
    fn without_a_name_the_destination_is_named() {
        assert_eq!(
            explain(None, Some("[::ffff:10.1.2.3]:5432"), 5432),
            "port 5432 has no TCP service at 10.1.2.3"
        );
        assert_eq!(
            explain(Some("10.1.2.3"), None, 5432),
            "port 5432 has no TCP service at 10.1.2.3"
        );
        assert_eq!(
            explain(None, None, 80),
            "no Host, SNI or destination address to match"
        );
    }

    #[test]
    fn the_mesh_config_sets_the_enforcement_mode() {
        let mesh = |metadata: &str| {
            format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\n\
                 data:\n  mesh: |\n    defaultConfig:\n      proxyMetadata: {{{metadata}}}\n"
            )
        };
        assert_eq!(
            snapshot_of(&mesh("PORTCULLIS_MODE: Audit")).enforcement,
            Some(crate::Enforcement::Audit)
        );
        assert_eq!(
            snapshot_of(&mesh("PORTCULLIS_MODE: enforce")).enforcement,
            Some(crate::Enforcement::Enforce)
        );
        assert_eq!(snapshot_of(&mesh("OTHER: x")).enforcement, None);
        let bad = snapshot_of(&mesh("PORTCULLIS_MODE: shadow"));
        assert_eq!(bad.enforcement, None);
        assert!(
            bad.warnings
                .iter()
                .any(|w| w.contains("\"shadow\" is neither")),
            "{:?}",
            bad.warnings
        );
        assert_eq!(snapshot_of(REGISTRY).enforcement, None);
    }

    #[test]
    fn the_hosts_index_follows_each_snapshot_and_finds_what_a_walk_finds() {
        use crate::snapshot::{HostMap, hosts_after};
        use crate::tests::load;

        let extra = |ports: &str| {
            format!(
                "{REGISTRY}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: more, namespace: default}}
spec:
  hosts: [more.example.com, '*.example.com', '*.com']
  ports: [{ports}]
  resolution: NONE
  location: MESH_EXTERNAL
"
            )
        };
        let options = crate::BuildOptions::default();
        let steps = [
            REGISTRY.to_owned(),
            extra("{number: 80, name: http, protocol: HTTP}"),
            extra(
                "{number: 81, name: http, protocol: HTTP}, {number: 443, name: tls, protocol: TLS}",
            ),
            REGISTRY.replace("api.example.com", "api2.example.com"),
        ];
        let mut previous: Option<Snapshot> = None;
        for (version, yaml) in steps.iter().enumerate() {
            let s = crate::build(&load(yaml), &options, previous.as_ref(), version as u64);
            let all = s.clusters.values().map(|c| (None, Some(Arc::clone(c))));
            let fresh = hosts_after(&HostMap::new(), all);
            let shape = |m: &HostMap| -> Vec<(String, Vec<String>)> {
                m.iter()
                    .map(|(host, named)| {
                        let names = named.iter().map(|c| c.name.to_string()).collect();
                        (host.to_string(), names)
                    })
                    .collect()
            };
            assert_eq!(shape(&s.by_host), shape(&fresh), "step {version}");
            assert!(
                shape(&s.by_host)
                    .iter()
                    .all(|(_, names)| names.windows(2).all(|w| w[0] < w[1])),
                "step {version}: a host's clusters are sorted by name, each once"
            );
            assert!(
                s.by_host.values().flat_map(|named| named.iter()).all(|c| s
                    .clusters
                    .get(&c.name)
                    .is_some_and(|now| Arc::ptr_eq(c, now))),
                "step {version}: a cluster of an earlier snapshot is kept"
            );
            for name in [
                "api.example.com",
                "api2.example.com",
                "more.example.com",
                "x.wild.example.com",
                "wild.example.com",
                "db.example.com",
                "nothing.test",
                "a",
            ] {
                let mut found: Vec<&str> = s.services_covering(name).map(|c| &*c.name).collect();
                let mut walked: Vec<&str> = s
                    .services()
                    .filter(|c| match c.host.strip_prefix('*') {
                        Some(suffix) => name.len() > suffix.len() && name.ends_with(suffix),
                        None => *c.host == *name,
                    })
                    .map(|c| &*c.name)
                    .collect();
                found.sort_unstable();
                walked.sort_unstable();
                assert_eq!(found, walked, "step {version}, {name}");
            }
            previous = Some(s);
        }
    }

    #[test]
    fn codes_are_stable_labels() {
        let snapshot = snapshot_of(REGISTRY);
        let code = |host, dst: Option<&str>, port| {
            snapshot
                .explain(Refused {
                    host,
                    destination: dst.map(|d| d.parse().unwrap()),
                    port,
                })
                .code()
        };
        assert_eq!(code(Some("x.test"), None, 80), "no_service_entry");
        assert_eq!(code(Some("api.example.com"), None, 81), "port_not_declared");
        assert_eq!(
            code(Some("db.example.com"), Some("10.1.2.3:5432"), 5432),
            "address_not_owned"
        );
        assert_eq!(code(None, Some("10.1.2.3:5432"), 5432), "no_tcp_service");
        assert_eq!(code(None, None, 80), "no_host");
    }
}
