//! Per-resource validation, following Istio's own rules where they exist.
//!
//! Istio rejects a resource with any validation error; so does portcullis. A few rules are
//! stricter than Istio where Istio's behaviour is a trap for a registry-only proxy (partial
//! wildcards, which Istio only warns about), and a few warnings are portcullis's own
//! (`NO_ADDRESS_TCP`, `ZERO_WEIGHT`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::{
    ClientTlsSettings, Destination, DestinationRuleSpec, Finding, HttpRoute, KubeServiceSpec,
    Object, Origin, Pod, Position, Resolution, Resource, ServiceEntrySpec, Severity, SidecarSpec,
    StringMatch, TargetPort, TlsMode, TrafficPolicy, VirtualServiceSpec, Warmup, WorkloadEntrySpec,
    WorkloadSelector,
};

/// Prefix of a Unix domain socket endpoint address.
pub const UNIX_PREFIX: &str = "unix://";

/// Checks one resource; errors reject it, warnings are informational.
///
/// `locate` tells where a field (`spec.ports[0].name`) is written, so that a finding points
/// at it; where it says `None`, the finding points at the document. `kind` and `resource`
/// of the findings are left empty for the loader to fill in.
pub fn resource(resource: &Resource, locate: &dyn Fn(&str) -> Option<Position>) -> Vec<Finding> {
    let mut out = Findings::new(resource.origin(), locate);
    match resource {
        Resource::ServiceEntry(o) => service_entry(o, &mut out),
        Resource::WorkloadEntry(o) => workload_entry(&o.spec.spec, &mut out),
        Resource::DestinationRule(o) => destination_rule(o, &mut out),
        Resource::VirtualService(o) => virtual_service(o, &mut out),
        Resource::Sidecar(o) => sidecar(&o.spec, &mut out),
        Resource::Pod(o) => pod(&o.spec, &mut out),
        Resource::Service(o) => kube_service(&o.spec, &mut out),
        Resource::MeshConfig(_)
        | Resource::Secret(_)
        | Resource::PeerAuthentication(_)
        | Resource::Node(_) => {}
    }
    out.list
}

/// Whether `label` is an RFC 1123 label as Kubernetes and Istio check it: lowercase
/// alphanumerics and `-`, not starting or ending with `-`, at most 63 characters.
pub fn is_dns_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// Whether `name` is a DNS name without wildcards: dot-separated labels, an optional
/// trailing dot, at most 255 characters, and a top-level label that is not all digits
/// (so that IPv4 literals are not mistaken for names).
pub fn is_fqdn(name: &str) -> bool {
    if name.is_empty() || name.len() > 255 {
        return false;
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    let mut labels = name.split('.').peekable();
    while let Some(label) = labels.next() {
        if !is_dns_label(label) {
            return false;
        }
        if labels.peek().is_none() && label.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
    }
    true
}

/// Whether `host` is a DNS name, optionally with a `*.` wildcard prefix, or the lone `*`.
///
/// Partial wildcards (`*x.example.com`, `a.*.example.com`) are not accepted.
pub fn is_wildcard_host(host: &str) -> bool {
    host == "*" || is_fqdn(host.strip_prefix("*.").unwrap_or(host))
}

/// Istio's port protocols (matched case-insensitively); an empty protocol means "detect".
const PROTOCOLS: [&str; 12] = [
    "HTTP",
    "HTTPS",
    "HTTP2",
    "HTTP_PROXY",
    "GRPC",
    "GRPC-WEB",
    "TLS",
    "TCP",
    "UDP",
    "MONGO",
    "MYSQL",
    "REDIS",
];

/// Protocols whose traffic carries the destination host (Host/authority or SNI), so that
/// several hosts can share a port.
fn carries_host(protocol: Option<&str>) -> bool {
    protocol.is_some_and(|p| {
        [
            "HTTP",
            "HTTPS",
            "HTTP2",
            "HTTP_PROXY",
            "GRPC",
            "GRPC-WEB",
            "TLS",
        ]
        .iter()
        .any(|known| known.eq_ignore_ascii_case(p))
    })
}

fn is_udp(protocol: Option<&str>) -> bool {
    protocol.is_some_and(|p| p.eq_ignore_ascii_case("UDP"))
}

struct Findings<'a> {
    file: Arc<std::path::PathBuf>,
    line: u64,
    locate: &'a dyn Fn(&str) -> Option<Position>,
    /// The field the next finding is about, set by [`Findings::at`] for that one finding.
    field: Option<String>,
    list: Vec<Finding>,
}

impl<'a> Findings<'a> {
    fn new(origin: &Origin, locate: &'a dyn Fn(&str) -> Option<Position>) -> Self {
        Findings {
            file: Arc::clone(&origin.file),
            line: origin.line,
            locate,
            field: None,
            list: Vec::new(),
        }
    }

    /// Makes the next finding point at `field`, a path such as `spec.ports[0].name`.
    fn at(&mut self, field: impl Into<String>) -> &mut Self {
        self.field = Some(field.into());
        self
    }

    fn push(&mut self, severity: Severity, code: &'static str, message: String) {
        let at = self.field.take().and_then(|field| (self.locate)(&field));
        self.list.push(Finding {
            severity,
            code,
            kind: String::new(),
            resource: String::new(),
            file: Arc::clone(&self.file),
            line: at.map_or(self.line, |at| at.line),
            column: at.map(|at| at.column),
            message,
        });
    }

    fn error(&mut self, code: &'static str, message: String) {
        self.push(Severity::Error, code, message);
    }

    fn warn(&mut self, code: &'static str, message: String) {
        self.push(Severity::Warning, code, message);
    }
}

fn port_in_range(port: u32) -> bool {
    (1..=65535).contains(&port)
}

fn is_ip(s: &str) -> bool {
    s.parse::<IpAddr>().is_ok()
}

/// A `unix://` address must name an absolute path, or an abstract socket (`@name`).
fn is_unix_address(address: &str) -> bool {
    address.strip_prefix(UNIX_PREFIX).is_some_and(|path| {
        path.starts_with('@') && path.len() > 1 || path.starts_with('/') && !path.ends_with('/')
    })
}

fn host_hint(host: &str) -> &'static str {
    if is_ip(host) {
        " (IP addresses belong in `addresses`)"
    } else if host.bytes().any(|b| b.is_ascii_uppercase()) {
        " (names must be lowercase)"
    } else if host.contains('*') {
        " (only a leading `*.` wildcard is allowed)"
    } else {
        ""
    }
}

fn service_entry(o: &Object<ServiceEntrySpec>, out: &mut Findings) {
    let spec = &o.spec;
    if spec.hosts.is_empty() {
        out.at("spec.hosts")
            .error("NO_HOSTS", "hosts must not be empty".to_string());
    }
    for (i, host) in spec.hosts.iter().enumerate() {
        out.at(format!("spec.hosts[{i}]"));
        if host == "*" {
            out.error(
                "INVALID_HOST",
                "host `*` is not allowed in a ServiceEntry; use a `*.domain` wildcard".to_string(),
            );
        } else if !is_wildcard_host(host) {
            out.error(
                "INVALID_HOST",
                format!("host {host:?} is not a valid DNS name{}", host_hint(host)),
            );
        }
    }

    let mut has_cidr = false;
    for (i, address) in spec.addresses.iter().enumerate() {
        out.at(format!("spec.addresses[{i}]"));
        if is_ip(address) {
            continue;
        }
        if address.parse::<IpNet>().is_ok() {
            has_cidr = true;
        } else {
            out.error(
                "INVALID_ADDRESS",
                format!("address {address:?} is not an IP address or CIDR"),
            );
        }
    }
    if has_cidr && !matches!(spec.resolution, Resolution::None | Resolution::Static) {
        out.at("spec.resolution").error(
            "INVALID_ADDRESS",
            "CIDR addresses are allowed only with resolution NONE or STATIC".to_string(),
        );
    }

    let port_names = service_entry_ports(spec, out);

    if spec.workload_selector.is_some() && !spec.endpoints.is_empty() {
        out.at("spec.workloadSelector").error(
            "SELECTOR_AND_ENDPOINTS",
            "only one of workloadSelector or endpoints can be set".to_string(),
        );
    }
    if let Some(selector) = &spec.workload_selector {
        selector_labels(selector, out);
    }

    service_entry_resolution(spec, out);
    for (index, endpoint) in spec.endpoints.iter().enumerate() {
        let field = format!("endpoints[{index}]");
        endpoint_common(&field, &format!("spec.{field}"), endpoint, &port_names, out);
    }

    if spec.resolution != Resolution::None
        && spec.hosts.len() > 1
        && spec
            .ports
            .iter()
            .any(|p| !carries_host(p.protocol.as_deref()))
    {
        out.at("spec.hosts").error(
            "MULTIPLE_HOSTS_TCP",
            "multiple hosts with a port that is not HTTP or TLS: the hosts cannot be told apart"
                .to_string(),
        );
    }

    if spec.addresses.is_empty() {
        for (i, port) in spec.ports.iter().enumerate() {
            let protocol = port.protocol.as_deref();
            if !carries_host(protocol) && !is_udp(protocol) {
                out.at(format!("spec.ports[{i}]")).warn(
                    "NO_ADDRESS_TCP",
                    format!(
                        "port {} ({}) has no addresses: TCP traffic to port {} on any IP is \
                         treated as this service; set addresses or use an HTTP/TLS protocol",
                        port.number,
                        protocol.unwrap_or("protocol unset"),
                        port.number
                    ),
                );
            }
        }
    }

    export_to(&spec.export_to, &o.meta.namespace, true, out);
}

/// Checks the ports; returns the declared port names for endpoint port overrides.
fn service_entry_ports<'a>(spec: &'a ServiceEntrySpec, out: &mut Findings) -> BTreeSet<&'a str> {
    if spec.ports.is_empty() {
        out.at("spec.ports")
            .error("NO_PORTS", "ports must not be empty".to_string());
    }
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (i, port) in spec.ports.iter().enumerate() {
        let at = |field: &str| format!("spec.ports[{i}].{field}");
        if !port_in_range(port.number) {
            out.at(at("number")).error(
                "INVALID_PORT",
                format!("port number {} must be between 1 and 65535", port.number),
            );
        } else if !numbers.insert(port.number) {
            out.at(at("number")).error(
                "DUPLICATE_PORT",
                format!("port number {} is declared twice", port.number),
            );
        }
        if !is_dns_label(&port.name) {
            out.at(at("name")).error(
                "INVALID_PORT_NAME",
                format!(
                    "port {} name {:?} must be a lowercase DNS label",
                    port.number, port.name
                ),
            );
        }
        if !port.name.is_empty() && !names.insert(port.name.as_str()) {
            out.at(at("name")).error(
                "DUPLICATE_PORT_NAME",
                format!("port name {:?} is declared twice", port.name),
            );
        }
        if let Some(target) = port.target_port
            && !port_in_range(target)
        {
            out.at(at("targetPort")).error(
                "INVALID_PORT",
                format!(
                    "port {} targetPort {target} must be between 1 and 65535",
                    port.number
                ),
            );
        }
        match port.protocol.as_deref() {
            Some(p) if !PROTOCOLS.iter().any(|known| known.eq_ignore_ascii_case(p)) => {
                out.at(at("protocol")).error(
                    "INVALID_PROTOCOL",
                    format!("port {} protocol {p:?} is not supported", port.number),
                );
            }
            Some(p) if is_udp(Some(p)) => out.at(at("protocol")).warn(
                "UNSUPPORTED_PROTOCOL",
                format!(
                    "port {} is UDP, which portcullis does not proxy",
                    port.number
                ),
            ),
            _ => {}
        }
    }
    names
}

fn service_entry_resolution(spec: &ServiceEntrySpec, out: &mut Findings) {
    match spec.resolution {
        Resolution::None => {
            if !spec.endpoints.is_empty() {
                out.at("spec.endpoints").error(
                    "INVALID_ENDPOINT",
                    "endpoints cannot be set with resolution NONE".to_string(),
                );
            }
        }
        Resolution::Static => {
            if spec.endpoints.is_empty() && spec.workload_selector.is_none() {
                out.at("spec.resolution").warn(
                    "NO_ENDPOINTS",
                    "resolution STATIC with neither endpoints nor workloadSelector: \
                     the service has no endpoints"
                        .to_string(),
                );
            }
            let mut unix = false;
            for (index, endpoint) in spec.endpoints.iter().enumerate() {
                let address = endpoint.address.as_str();
                if address.starts_with(UNIX_PREFIX) {
                    unix = true;
                    if !is_unix_address(address) {
                        out.at(format!("spec.endpoints[{index}].address")).error(
                            "INVALID_ADDRESS",
                            format!("endpoints[{index}] address {address:?} is not an absolute socket path"),
                        );
                    }
                    if !endpoint.ports.is_empty() {
                        out.at(format!("spec.endpoints[{index}].ports")).error(
                            "INVALID_ENDPOINT",
                            format!("endpoints[{index}] is a unix socket and cannot set ports"),
                        );
                    }
                } else if !address.is_empty() && !is_ip(address) {
                    out.at(format!("spec.endpoints[{index}].address")).error(
                        "INVALID_ADDRESS",
                        format!(
                            "endpoints[{index}] address {address:?} must be an IP address \
                             with resolution STATIC"
                        ),
                    );
                }
            }
            if unix && spec.ports.len() != 1 {
                out.at("spec.ports").error(
                    "INVALID_ENDPOINT",
                    "unix socket endpoints need exactly one service port".to_string(),
                );
            }
        }
        Resolution::Dns | Resolution::DnsRoundRobin => {
            if spec.endpoints.is_empty() {
                for (i, host) in spec.hosts.iter().enumerate() {
                    if !host.contains('*') {
                        continue;
                    }
                    out.at(format!("spec.hosts[{i}]")).error(
                        "DNS_WILDCARD",
                        format!(
                            "host {host:?} is a wildcard and cannot be resolved with DNS; \
                             add endpoints or use resolution NONE"
                        ),
                    );
                }
            }
            for (index, endpoint) in spec.endpoints.iter().enumerate() {
                let address = endpoint.address.as_str();
                if !address.is_empty() && !is_ip(address) && !is_fqdn(address) {
                    out.at(format!("spec.endpoints[{index}].address")).error(
                        "INVALID_ADDRESS",
                        format!(
                            "endpoints[{index}] address {address:?} is not an IP address or \
                             DNS name"
                        ),
                    );
                }
            }
            if spec.resolution == Resolution::DnsRoundRobin && spec.endpoints.len() > 1 {
                out.at("spec.endpoints").error(
                    "TOO_MANY_ENDPOINTS",
                    "resolution DNS_ROUND_ROBIN allows at most one endpoint".to_string(),
                );
            }
        }
    }
}

/// Checks shared by inline endpoints and WorkloadEntries: address present, port overrides
/// in range (and, for inline endpoints, naming a declared port), weight.
/// `field` names the endpoint in messages, `path` is where it is written.
fn endpoint_common(
    field: &str,
    path: &str,
    endpoint: &WorkloadEntrySpec,
    port_names: &BTreeSet<&str>,
    out: &mut Findings,
) {
    if endpoint.address.is_empty() {
        out.at(path)
            .error("INVALID_ADDRESS", format!("{field} address is required"));
    }
    endpoint_ports(field, path, &endpoint.ports, out);
    for name in endpoint.ports.keys() {
        if !name.is_empty() && !port_names.contains(name.as_str()) {
            out.at(format!("{path}.ports")).warn(
                "UNKNOWN_PORT_NAME",
                format!("{field} port {name:?} is not a port of the service entry, ignored"),
            );
        }
    }
    endpoint_weight(field, path, endpoint.weight, out);
}

fn endpoint_ports(field: &str, path: &str, ports: &BTreeMap<String, u32>, out: &mut Findings) {
    for (name, port) in ports {
        if name.is_empty() {
            out.at(format!("{path}.ports")).error(
                "INVALID_PORT_NAME",
                format!("{field} ports has an empty name"),
            );
        }
        if !port_in_range(*port) {
            out.at(format!("{path}.ports.{name}")).error(
                "INVALID_PORT",
                format!("{field} port {name:?} = {port} must be between 1 and 65535"),
            );
        }
    }
}

fn endpoint_weight(field: &str, path: &str, weight: Option<u32>, out: &mut Findings) {
    // Istio's weight is a proto3 uint32, so 0 cannot be told from "unset" and means 1;
    // someone writing 0 most likely wanted to drain the endpoint, which it does not do.
    if weight == Some(0) {
        out.at(format!("{path}.weight")).warn(
            "ZERO_WEIGHT",
            format!("{field} weight 0 is treated as 1, it does not drain the endpoint"),
        );
    }
}

fn selector_labels(selector: &WorkloadSelector, out: &mut Findings) {
    for (key, value) in &selector.labels {
        if key.is_empty() || key.contains('*') || value.contains('*') {
            out.at("spec.workloadSelector.labels").error(
                "INVALID_SELECTOR",
                format!("workloadSelector label {key:?}: {value:?}: wildcards are not supported"),
            );
        }
    }
}

fn export_to(entries: &[String], namespace: &str, allow_none: bool, out: &mut Findings) {
    let mut seen = BTreeSet::new();
    for (i, entry) in entries.iter().enumerate() {
        let at = format!("spec.exportTo[{i}]");
        let valid = match entry.as_str() {
            "." | "*" => true,
            "~" => allow_none,
            ns => is_dns_label(ns),
        };
        if !valid {
            out.at(at.clone()).error(
                "INVALID_EXPORT_TO",
                format!("exportTo {entry:?} must be `.`, `*`, `~` or a namespace name"),
            );
        }
        // `.` is the resource's own namespace, so `.` next to that name is a duplicate.
        let key = if entry == "." { namespace } else { entry };
        if !seen.insert(key) {
            out.at(at).error(
                "INVALID_EXPORT_TO",
                format!("exportTo {entry:?} is listed twice"),
            );
        }
    }
}

fn workload_entry(spec: &WorkloadEntrySpec, out: &mut Findings) {
    let address = spec.address.as_str();
    out.at("spec.address");
    if address.is_empty() {
        if spec.network.is_empty() {
            out.error("INVALID_ADDRESS", "address is required".to_string());
        } else {
            out.warn(
                "NO_ADDRESS",
                "no address: reachable only through its network's gateway, which portcullis \
                 does not use"
                    .to_string(),
            );
        }
    } else if address.starts_with(UNIX_PREFIX) {
        if !is_unix_address(address) {
            out.error(
                "INVALID_ADDRESS",
                format!("address {address:?} is not an absolute socket path"),
            );
        }
    } else if !is_ip(address) && !is_fqdn(address) {
        out.error(
            "INVALID_ADDRESS",
            format!("address {address:?} is not an IP address, DNS name or unix:// path"),
        );
    }
    endpoint_ports("workload entry", "spec", &spec.ports, out);
    endpoint_weight("workload entry", "spec", spec.weight, out);
}

fn destination_rule(o: &Object<DestinationRuleSpec>, out: &mut Findings) {
    let spec = &o.spec;
    out.at("spec.host");
    if spec.host.is_empty() {
        out.error("NO_HOSTS", "host is required".to_string());
    } else if !is_wildcard_host(&spec.host) {
        out.error(
            "INVALID_HOST",
            format!(
                "host {:?} is not a valid DNS name{}",
                spec.host,
                host_hint(&spec.host)
            ),
        );
    }
    if let Some(policy) = &spec.traffic_policy {
        traffic_policy(policy, "spec.trafficPolicy", out);
    }
    let mut names = BTreeSet::new();
    for (i, subset) in spec.subsets.iter().enumerate() {
        if let Some(policy) = &subset.traffic_policy {
            traffic_policy(policy, &format!("spec.subsets[{i}].trafficPolicy"), out);
        }
        out.at(format!("spec.subsets[{i}].name"));
        if !is_dns_label(&subset.name) {
            out.error(
                "INVALID_SUBSET",
                format!(
                    "subset name {:?} must be a lowercase DNS label",
                    subset.name
                ),
            );
        } else if !names.insert(subset.name.as_str()) {
            out.error(
                "DUPLICATE_SUBSET",
                format!("subset {:?} is defined twice", subset.name),
            );
        }
    }
    export_to(&spec.export_to, &o.meta.namespace, false, out);
}

/// Istio's checks of a `trafficPolicy`'s connection pools (no negative limit, and a
/// connect timeout of at least a millisecond) and load balancers' `warmup`.
fn traffic_policy(policy: &TrafficPolicy, at: &str, out: &mut Findings) {
    let mut pools = vec![(at.to_string(), policy.connection_pool.as_deref())];
    let balancers = std::iter::once((at.to_string(), policy.load_balancer.as_deref())).chain(
        policy.port_level_settings.iter().enumerate().map(|(i, p)| {
            (
                format!("{at}.portLevelSettings[{i}]"),
                p.load_balancer.as_deref(),
            )
        }),
    );
    for (here, lb) in balancers {
        if let Some(warmup) = lb.and_then(|lb| lb.warmup.as_ref()) {
            self::warmup(warmup, &format!("{here}.loadBalancer.warmup"), out);
        }
    }
    if let Some(tls) = &policy.tls {
        client_tls(tls, &format!("{at}.tls"), out);
    }
    for (i, port) in policy.port_level_settings.iter().enumerate() {
        let here = format!("{at}.portLevelSettings[{i}]");
        if let Some(tls) = &port.tls {
            client_tls(tls, &format!("{here}.tls"), out);
        }
        if port
            .port
            .as_ref()
            .is_none_or(|p| p.number == 0 || p.number > 65535)
        {
            out.at(format!("{here}.port")).error(
                "INVALID_PORT",
                "port level settings need a port number between 1 and 65535".to_string(),
            );
        }
        pools.push((here, port.connection_pool.as_deref()));
    }
    for (here, pool) in pools {
        let Some(pool) = pool else { continue };
        let tcp = pool.tcp.as_ref();
        let http = pool.http.as_ref();
        for (field, value) in [
            ("tcp.maxConnections", tcp.and_then(|t| t.max_connections)),
            (
                "http.http1MaxPendingRequests",
                http.and_then(|h| h.http1_max_pending_requests),
            ),
            (
                "http.http2MaxRequests",
                http.and_then(|h| h.http2_max_requests),
            ),
            ("http.maxRetries", http.and_then(|h| h.max_retries)),
            (
                "http.maxConcurrentStreams",
                http.and_then(|h| h.max_concurrent_streams),
            ),
        ] {
            if let Some(v) = value.filter(|v| !(0..=i64::from(i32::MAX)).contains(v)) {
                out.at(format!("{here}.connectionPool.{field}")).error(
                    "INVALID_LIMIT",
                    format!("{field} {v} must be between 0 and {}", i32::MAX),
                );
            }
        }
        // Zero turns the TCP idle timeout off; anything else is a duration of 1ms or more.
        millis(
            tcp.and_then(|t| t.idle_timeout),
            true,
            format!("{here}.connectionPool.tcp.idleTimeout"),
            out,
        );
        if let Some(t) = tcp.and_then(|t| t.connect_timeout)
            && t < std::time::Duration::from_millis(1)
        {
            out.at(format!("{here}.connectionPool.tcp.connectTimeout"))
                .error(
                    "INVALID_DURATION",
                    "connectTimeout must be at least 1ms".to_string(),
                );
        }
    }
}

/// istiod's checks of a load balancer's `warmup`: a duration of whole milliseconds, at
/// least one; a minimum percentage of at most 100; an aggression above 0.
fn warmup(warmup: &Warmup, at: &str, out: &mut Findings) {
    match warmup.duration {
        None => {
            out.at(format!("{at}.duration"))
                .error("INVALID_WARMUP", "warmup duration is required".to_string());
        }
        Some(d) if d < std::time::Duration::from_millis(1) || d.subsec_nanos() % 1_000_000 != 0 => {
            out.at(format!("{at}.duration")).error(
                "INVALID_DURATION",
                format!("duration {d:?} must be whole milliseconds, at least 1ms"),
            );
        }
        Some(_) => {}
    }
    if let Some(p) = warmup.minimum_percent.filter(|p| p.is_nan() || *p > 100.0) {
        out.at(format!("{at}.minimumPercent")).error(
            "INVALID_WARMUP",
            format!("minimumPercent {p} must be at most 100"),
        );
    }
    if let Some(a) = warmup.aggression.filter(|a| a.is_nan() || *a <= 0.0) {
        out.at(format!("{at}.aggression")).error(
            "INVALID_WARMUP",
            format!("aggression {a} must be greater than 0"),
        );
    }
}

/// istiod's `ValidateTLS` of a `ClientTLSSettings`.
fn client_tls(tls: &ClientTlsSettings, at: &str, out: &mut Findings) {
    let set = |v: &Option<String>| v.as_deref().is_some_and(|v| !v.is_empty());
    let credential = set(&tls.credential_name);
    if tls.mode == TlsMode::IstioMutual {
        if credential
            || set(&tls.client_certificate)
            || set(&tls.private_key)
            || set(&tls.ca_certificates)
        {
            out.at(format!("{at}.mode")).error(
                "INVALID_TLS",
                "cannot specify client certificates or CA certificate or credentialName If tls mode is ISTIO_MUTUAL".to_string(),
            );
        }
        return;
    }
    if tls.insecure_skip_verify == Some(true) {
        let sans = !tls.subject_alt_names.is_empty();
        if tls.mode == TlsMode::Simple && (set(&tls.ca_certificates) || credential || sans) {
            out.at(format!("{at}.insecureSkipVerify")).error(
                "INVALID_TLS",
                "cannot specify CaCertificates or CredentialName or SubjectAltNames when InsecureSkipVerify is set true".to_string(),
            );
        }
        if tls.mode == TlsMode::Mutual && (set(&tls.ca_certificates) || sans) {
            out.at(format!("{at}.insecureSkipVerify")).error(
                "INVALID_TLS",
                "cannot specify CaCertificates or SubjectAltNames when InsecureSkipVerify is set true".to_string(),
            );
        }
    }
    if matches!(tls.mode, TlsMode::Simple | TlsMode::Mutual) && credential {
        if set(&tls.client_certificate)
            || set(&tls.ca_certificates)
            || set(&tls.private_key)
            || set(&tls.ca_crl)
        {
            out.at(format!("{at}.credentialName")).error(
                "INVALID_TLS",
                "cannot specify client certificates or CA certificate or CA CRL If credentialName is set".to_string(),
            );
        }
        return;
    }
    if tls.mode == TlsMode::Mutual {
        if !set(&tls.client_certificate) {
            out.at(format!("{at}.mode")).error(
                "INVALID_TLS",
                "client certificate required for mutual tls".to_string(),
            );
        }
        if !set(&tls.private_key) {
            out.at(format!("{at}.mode")).error(
                "INVALID_TLS",
                "private key required for mutual tls".to_string(),
            );
        }
    }
}

/// Envoy's `retry_on` conditions Istio accepts in `retries.retryOn`, beside status codes.
const RETRY_ON: [&str; 16] = [
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// Istio's checks of a VirtualService (`ValidateVirtualService`).
fn virtual_service(o: &Object<VirtualServiceSpec>, out: &mut Findings) {
    let spec = &o.spec;
    if spec.hosts.is_empty() {
        out.at("spec").warn(
            "NO_HOSTS",
            "no hosts: a delegate VirtualService, which portcullis ignores".to_string(),
        );
    }
    let mesh = spec.applies_to_sidecars();
    for (i, host) in spec.hosts.iter().enumerate() {
        let short = is_dns_label(host);
        if !is_wildcard_host(host) && !is_ip(host) && !short {
            out.at(format!("spec.hosts[{i}]")).error(
                "INVALID_HOST",
                format!("host {host:?} is not a valid DNS name or IP address"),
            );
        } else if host == "*" && mesh {
            out.at(format!("spec.hosts[{i}]")).error(
                "INVALID_HOST",
                "the wildcard host `*` is not allowed for virtual services bound to the mesh"
                    .to_string(),
            );
        }
    }
    if spec.http.is_empty() && spec.tls.is_empty() && spec.tcp.is_empty() && !spec.hosts.is_empty()
    {
        out.at("spec").error(
            "NO_ROUTES",
            "http, tcp or tls must be provided in a virtual service".to_string(),
        );
    }
    for (i, route) in spec.http.iter().enumerate() {
        http_route(route, &format!("spec.http[{i}]"), out);
    }
    for (i, route) in spec.tls.iter().enumerate() {
        let at = format!("spec.tls[{i}]");
        if route.matches.is_empty() {
            out.at(&at).error(
                "INVALID_MATCH",
                "a TLS route must have at least one match".to_string(),
            );
        }
        for (j, m) in route.matches.iter().enumerate() {
            let here = format!("{at}.match[{j}]");
            if m.sni_hosts.is_empty() {
                out.at(&here).error(
                    "INVALID_MATCH",
                    "a TLS match must have at least one sniHosts entry".to_string(),
                );
            }
            for (k, sni) in m.sni_hosts.iter().enumerate() {
                if !spec.hosts.iter().any(|h| sni_within(sni, h)) {
                    out.at(format!("{here}.sniHosts[{k}]")).error(
                        "INVALID_MATCH",
                        format!(
                            "SNI host {sni:?} is not within any of the virtual service's hosts"
                        ),
                    );
                }
            }
            l4_match(&m.destination_subnets, m.port, &here, out);
        }
        route_destinations(
            route.route.iter().map(|d| (&d.destination, d.weight)),
            &format!("{at}.route"),
            out,
        );
    }
    for (i, route) in spec.tcp.iter().enumerate() {
        let at = format!("spec.tcp[{i}]");
        for (j, m) in route.matches.iter().enumerate() {
            l4_match(
                &m.destination_subnets,
                m.port,
                &format!("{at}.match[{j}]"),
                out,
            );
        }
        route_destinations(
            route.route.iter().map(|d| (&d.destination, d.weight)),
            &format!("{at}.route"),
            out,
        );
    }
    export_to(&spec.export_to, &o.meta.namespace, false, out);
}

/// Whether an SNI name is one of a VirtualService's hosts or under one of its wildcards.
fn sni_within(sni: &str, host: &str) -> bool {
    let sni = sni.to_ascii_lowercase();
    let host = host.to_ascii_lowercase();
    match (sni.strip_prefix('*'), host.strip_prefix('*')) {
        (_, Some(suffix)) => sni.ends_with(suffix),
        (None, None) => sni == host,
        (Some(_), None) => false,
    }
}

fn l4_match(subnets: &[String], port: Option<u32>, at: &str, out: &mut Findings) {
    for (k, subnet) in subnets.iter().enumerate() {
        if subnet.parse::<IpNet>().is_err() && !is_ip(subnet) {
            out.at(format!("{at}.destinationSubnets[{k}]")).error(
                "INVALID_ADDRESS",
                format!("destination subnet {subnet:?} is not an IP address or CIDR range"),
            );
        }
    }
    if let Some(port) = port.filter(|p| !port_in_range(*p)) {
        out.at(format!("{at}.port"))
            .error("INVALID_PORT", format!("port {port} is not in 1-65535"));
    }
}

/// The destinations of a route: valid hosts, subsets and ports, weights not negative, and
/// some weight when there are several.
fn route_destinations<'d>(
    destinations: impl Iterator<Item = (&'d Destination, i64)>,
    at: &str,
    out: &mut Findings,
) {
    let mut count = 0;
    let mut total = 0i64;
    for (i, (d, weight)) in destinations.enumerate() {
        count += 1;
        destination(d, &format!("{at}[{i}].destination"), out);
        if weight < 0 {
            out.at(format!("{at}[{i}].weight")).error(
                "INVALID_WEIGHT",
                format!("weight {weight} must not be negative"),
            );
        }
        total = total.saturating_add(weight.max(0));
    }
    if count > 1 && total == 0 {
        out.at(at).error(
            "INVALID_WEIGHT",
            "the destinations' weights add up to 0".to_string(),
        );
    }
}

fn destination(d: &Destination, at: &str, out: &mut Findings) {
    if d.host.is_empty() {
        out.at(format!("{at}.host"))
            .error("NO_HOSTS", "destination host is required".to_string());
    } else if d.host == "*" || (!is_wildcard_host(&d.host) && !is_dns_label(&d.host)) {
        out.at(format!("{at}.host")).error(
            "INVALID_HOST",
            format!("destination host {:?} is not a valid service host", d.host),
        );
    }
    if !d.subset.is_empty() && !is_dns_label(&d.subset) {
        out.at(format!("{at}.subset")).error(
            "INVALID_SUBSET",
            format!("subset name {:?} must be a lowercase DNS label", d.subset),
        );
    }
    if let Some(port) = d.port.as_ref().filter(|p| !port_in_range(p.number)) {
        out.at(format!("{at}.port")).error(
            "INVALID_PORT",
            format!("port {} is not in 1-65535", port.number),
        );
    }
}

fn percent(value: Option<f64>, at: String, out: &mut Findings) {
    if let Some(v) = value.filter(|v| !(0.0..=100.0).contains(v)) {
        out.at(at).error(
            "INVALID_PERCENT",
            format!("percentage {v} must be between 0 and 100"),
        );
    }
}

/// A duration Istio requires to be at least a millisecond (zero allowed when `zero_ok`).
fn millis(value: Option<std::time::Duration>, zero_ok: bool, at: String, out: &mut Findings) {
    if let Some(d) = value
        && d < std::time::Duration::from_millis(1)
        && !(zero_ok && d.is_zero())
    {
        out.at(at).error(
            "INVALID_DURATION",
            format!("duration {d:?} must be at least 1ms"),
        );
    }
}

fn string_match(m: &StringMatch, at: String, out: &mut Findings) {
    if m.kinds_set() > 1 {
        out.at(at).error(
            "INVALID_MATCH",
            "only one of exact, prefix and regex may be set".to_string(),
        );
    }
}

fn http_route(route: &HttpRoute, at: &str, out: &mut Findings) {
    let actions = [
        !route.route.is_empty(),
        route.redirect.is_some(),
        route.direct_response.is_some(),
        route.delegate.is_some(),
    ];
    match actions.iter().filter(|set| **set).count() {
        0 => {
            out.at(at).error(
                "NO_ROUTE",
                "an HTTP route needs one of route, redirect, directResponse or delegate"
                    .to_string(),
            );
        }
        1 => {}
        _ => {
            out.at(at).error(
                "CONFLICTING_ACTIONS",
                "an HTTP route may have only one of route, redirect, directResponse and delegate"
                    .to_string(),
            );
        }
    }
    for (i, m) in route.matches.iter().enumerate() {
        let here = format!("{at}.match[{i}]");
        for (field, value) in [
            ("uri", &m.uri),
            ("scheme", &m.scheme),
            ("method", &m.method),
            ("authority", &m.authority),
        ] {
            if let Some(value) = value {
                string_match(value, format!("{here}.{field}"), out);
            }
        }
        for (field, map) in [
            ("headers", &m.headers),
            ("withoutHeaders", &m.without_headers),
            ("queryParams", &m.query_params),
        ] {
            for (name, value) in map {
                if name.is_empty() {
                    out.at(format!("{here}.{field}"))
                        .error("INVALID_MATCH", format!("{field}: a name is required"));
                }
                string_match(value, format!("{here}.{field}"), out);
            }
        }
        if let Some(port) = m.port.filter(|p| !port_in_range(*p)) {
            out.at(format!("{here}.port"))
                .error("INVALID_PORT", format!("port {port} is not in 1-65535"));
        }
    }
    route_destinations(
        route.route.iter().map(|d| (&d.destination, d.weight)),
        &format!("{at}.route"),
        out,
    );
    if let Some(r) = &route.redirect {
        if route.rewrite.is_some() {
            out.at(format!("{at}.rewrite")).error(
                "CONFLICTING_ACTIONS",
                "an HTTP route cannot have both rewrite and redirect".to_string(),
            );
        }
        if r.uri.is_none()
            && r.authority.is_none()
            && r.scheme.is_none()
            && r.port.is_none()
            && r.derive_port.is_none()
        {
            out.at(format!("{at}.redirect")).error(
                "INVALID_REDIRECT",
                "a redirect must set uri, authority, scheme or port".to_string(),
            );
        }
        if let Some(code) = r.redirect_code.filter(|c| !(300..=399).contains(c)) {
            out.at(format!("{at}.redirect.redirectCode")).error(
                "INVALID_REDIRECT",
                format!("redirect code {code} must be between 300 and 399"),
            );
        }
        if let Some(port) = r.port.filter(|p| !port_in_range(*p)) {
            out.at(format!("{at}.redirect.port"))
                .error("INVALID_PORT", format!("port {port} is not in 1-65535"));
        }
    }
    if let Some(d) = &route.direct_response
        && !(200..=599).contains(&d.status)
    {
        out.at(format!("{at}.directResponse.status")).error(
            "INVALID_STATUS",
            format!("status {} must be between 200 and 599", d.status),
        );
    }
    if let Some(rw) = &route.rewrite
        && rw.uri.is_some()
        && rw.uri_regex_rewrite.is_some()
    {
        out.at(format!("{at}.rewrite")).error(
            "INVALID_REWRITE",
            "rewrite cannot set both uri and uriRegexRewrite".to_string(),
        );
    }
    millis(route.timeout, true, format!("{at}.timeout"), out);
    if let Some(r) = &route.retries {
        if r.attempts < 0 {
            out.at(format!("{at}.retries.attempts")).error(
                "INVALID_RETRIES",
                format!("attempts {} must not be negative", r.attempts),
            );
        }
        millis(
            r.per_try_timeout,
            false,
            format!("{at}.retries.perTryTimeout"),
            out,
        );
        millis(r.backoff, false, format!("{at}.retries.backoff"), out);
        for condition in r.retry_on.split(',').map(str::trim) {
            let code = condition.parse::<u16>().is_ok();
            if !condition.is_empty() && !code && !RETRY_ON.contains(&condition) {
                out.at(format!("{at}.retries.retryOn")).error(
                    "INVALID_RETRIES",
                    format!("{condition:?} is not a valid retryOn condition"),
                );
            }
        }
    }
    if let Some(f) = &route.fault {
        if f.delay.is_none() && f.abort.is_none() {
            out.at(format!("{at}.fault")).error(
                "INVALID_FAULT",
                "a fault needs a delay or an abort".to_string(),
            );
        }
        if let Some(d) = &f.delay {
            if d.fixed_delay.is_none() && d.exponential_delay.is_none() {
                out.at(format!("{at}.fault.delay"))
                    .error("INVALID_FAULT", "a delay needs fixedDelay".to_string());
            }
            millis(
                d.fixed_delay,
                false,
                format!("{at}.fault.delay.fixedDelay"),
                out,
            );
            percent(
                d.percentage.map(|p| p.value),
                format!("{at}.fault.delay.percentage"),
                out,
            );
            percent(
                d.percent.map(|p| p as f64),
                format!("{at}.fault.delay.percent"),
                out,
            );
        }
        if let Some(a) = &f.abort {
            let kinds = [
                a.http_status.is_some(),
                a.grpc_status.is_some(),
                a.http2_error.is_some(),
            ];
            if kinds.into_iter().filter(|set| *set).count() > 1 {
                out.at(format!("{at}.fault.abort")).error(
                    "INVALID_FAULT",
                    "only one of httpStatus, grpcStatus and http2Error can be set".to_string(),
                );
            }
            if let Some(name) = &a.grpc_status
                && a.grpc_code().is_none()
            {
                out.at(format!("{at}.fault.abort.grpcStatus")).error(
                    "INVALID_FAULT",
                    format!("gRPC status {name:?} is not supported (a name such as NOT_FOUND)"),
                );
            }
            match a.http_status {
                Some(status) if !(200..=599).contains(&status) => {
                    out.at(format!("{at}.fault.abort.httpStatus")).error(
                        "INVALID_FAULT",
                        format!("abort status {status} must be between 200 and 599"),
                    );
                }
                None if a.grpc_status.is_none() && a.http2_error.is_none() => {
                    out.at(format!("{at}.fault.abort"))
                        .error("INVALID_FAULT", "an abort needs httpStatus".to_string());
                }
                _ => {}
            }
            percent(
                a.percentage.map(|p| p.value),
                format!("{at}.fault.abort.percentage"),
                out,
            );
        }
    }
    if route.mirror.is_some() && !route.mirrors.is_empty() {
        out.at(format!("{at}.mirrors")).error(
            "CONFLICTING_ACTIONS",
            "mirror and mirrors cannot both be set".to_string(),
        );
    }
    if let Some(m) = &route.mirror {
        destination(m, &format!("{at}.mirror"), out);
    }
    percent(
        route.mirror_percentage.map(|p| p.value),
        format!("{at}.mirrorPercentage"),
        out,
    );
    percent(
        route.mirror_percent.map(|p| p as f64),
        format!("{at}.mirrorPercent"),
        out,
    );
    for (i, m) in route.mirrors.iter().enumerate() {
        destination(
            &m.destination,
            &format!("{at}.mirrors[{i}].destination"),
            out,
        );
        percent(
            m.percentage.map(|p| p.value),
            format!("{at}.mirrors[{i}].percentage"),
            out,
        );
    }
}

fn sidecar(spec: &SidecarSpec, out: &mut Findings) {
    if spec.egress.is_empty() && spec.outbound_traffic_policy.is_none() {
        out.warn(
            "NOTHING_TO_DO",
            "neither egress nor outboundTrafficPolicy is set: portcullis has nothing to apply"
                .to_string(),
        );
    }
    if let Some(selector) = &spec.workload_selector {
        selector_labels(selector, out);
    }
    let mut ports = std::collections::HashSet::new();
    for (index, egress) in spec.egress.iter().enumerate() {
        // As Istio: one listener without a port, the last; ports unique and in range (0 is a
        // Unix socket listener's).
        match &egress.port {
            None if index + 1 != spec.egress.len() => out.error(
                "EGRESS_CATCH_ALL",
                format!("egress[{index}]: the listener without a port must be the last"),
            ),
            None => {}
            Some(port) if port.number == 0 => {}
            Some(port) if !port_in_range(port.number) => out.error(
                "INVALID_PORT",
                format!("egress[{index}]: port {} is not in 1-65535", port.number),
            ),
            Some(port) if !ports.insert(port.number) => out.error(
                "DUPLICATE_PORT",
                format!("egress[{index}]: port {} has another listener", port.number),
            ),
            Some(_) => {}
        }
        if egress.hosts.is_empty() {
            out.at(format!("spec.egress[{index}]")).error(
                "NO_HOSTS",
                format!("egress[{index}] must have at least one host"),
            );
        }
        for (i, host) in egress.hosts.iter().enumerate() {
            if let Some(problem) = sidecar_host_problem(host) {
                out.at(format!("spec.egress[{index}].hosts[{i}]")).error(
                    "INVALID_EGRESS_HOST",
                    format!("egress[{index}] host {host:?}: {problem}"),
                );
            }
        }
    }
}

/// Istio requires every Sidecar egress host in `namespace/dnsName` form.
fn sidecar_host_problem(host: &str) -> Option<&'static str> {
    let Some((namespace, name)) = host.split_once('/') else {
        return Some("must be of the form namespace/dnsName");
    };
    if namespace.is_empty() || name.is_empty() {
        return Some("namespace and dnsName cannot be empty");
    }
    // A `~` prefix excludes the namespace's matching hosts (`~/` those of every namespace).
    let namespace = namespace.strip_prefix('~').unwrap_or(namespace);
    if !matches!(namespace, "" | "*" | ".") && !is_dns_label(namespace) {
        return Some("namespace must be `*`, `.` or a namespace name, optionally `~`-prefixed");
    }
    if name != "*" && !name.contains('.') {
        return Some("short names are not allowed, use a fully qualified name");
    }
    if !is_wildcard_host(name) {
        return Some("not a valid DNS name (only a leading `*.` wildcard is allowed)");
    }
    None
}

fn pod(pod: &Pod, out: &mut Findings) {
    let ips = pod
        .status
        .pod_ip
        .iter()
        .map(|ip| (ip, "status.podIP".to_string()))
        .chain(
            (pod.status.pod_ips.iter().enumerate())
                .map(|(i, p)| (&p.ip, format!("status.podIPs[{i}].ip"))),
        );
    for (ip, at) in ips {
        if !is_ip(ip) {
            out.at(at).error(
                "INVALID_ADDRESS",
                format!("pod IP {ip:?} is not an IP address"),
            );
        }
    }
    for (c, container) in pod.spec.containers.iter().enumerate() {
        for (p, port) in container.ports.iter().enumerate() {
            if !port_in_range(port.container_port) {
                out.at(format!("spec.containers[{c}].ports[{p}].containerPort"))
                    .error(
                        "INVALID_PORT",
                        format!(
                            "container {:?} port {} must be between 1 and 65535",
                            container.name, port.container_port
                        ),
                    );
            }
        }
    }
}

fn kube_service(spec: &KubeServiceSpec, out: &mut Findings) {
    let ips = (spec
        .cluster_ip
        .iter()
        .map(|ip| (ip, "spec.clusterIP".to_string())))
    .chain(
        (spec.cluster_ips.iter().enumerate()).map(|(i, ip)| (ip, format!("spec.clusterIPs[{i}]"))),
    );
    for (ip, at) in ips {
        if !ip.is_empty() && ip != "None" && !is_ip(ip) {
            out.at(at).error(
                "INVALID_ADDRESS",
                format!("cluster IP {ip:?} is not an IP address or `None`"),
            );
        }
    }
    let mut seen = BTreeSet::new();
    let mut names = BTreeSet::new();
    for (i, port) in spec.ports.iter().enumerate() {
        let at = |field: &str| format!("spec.ports[{i}].{field}");
        if !port_in_range(port.port) {
            out.at(at("port")).error(
                "INVALID_PORT",
                format!("port {} must be between 1 and 65535", port.port),
            );
        }
        let protocol = port.protocol.as_deref().unwrap_or("TCP");
        if !seen.insert((port.port, protocol)) {
            out.at(at("port")).error(
                "DUPLICATE_PORT",
                format!("port {}/{protocol} is declared twice", port.port),
            );
        }
        if spec.ports.len() > 1 && port.name.is_empty() {
            out.at(format!("spec.ports[{i}]")).error(
                "INVALID_PORT_NAME",
                format!(
                    "port {} needs a name when a service has several ports",
                    port.port
                ),
            );
        }
        if !port.name.is_empty() && !names.insert(port.name.as_str()) {
            out.at(at("name")).error(
                "DUPLICATE_PORT_NAME",
                format!("port name {:?} is declared twice", port.name),
            );
        }
        if let Some(TargetPort::Number(target)) = &port.target_port
            && !port_in_range(*target)
        {
            out.at(at("targetPort")).error(
                "INVALID_PORT",
                format!(
                    "port {} targetPort {target} must be between 1 and 65535",
                    port.port
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use proptest::prelude::*;

    use super::*;
    use crate::load_str;

    type Codes = Vec<(Severity, &'static str)>;

    fn check(kind: &str, api: &str, spec: &str) -> Codes {
        let text = format!(
            "apiVersion: {api}\nkind: {kind}\nmetadata: {{name: t, namespace: ns}}\n{spec}\n"
        );
        let load = load_str(&text, &Arc::new(PathBuf::from("v.yaml")));
        let lines = text.lines().count() as u64;
        for f in &load.findings {
            assert!((1..=lines).contains(&f.line), "{f}");
            assert_eq!(f.file.as_path(), std::path::Path::new("v.yaml"));
        }
        let codes: Codes = load.findings.iter().map(|f| (f.severity, f.code)).collect();
        assert_eq!(
            load.resources.is_empty(),
            codes.iter().any(|(s, _)| *s == Severity::Error),
            "{codes:?}"
        );
        codes
    }

    #[test]
    fn findings_point_at_their_field() {
        let text = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: t}
spec:
  hosts:
  - ok.example.com
  - Bad.example.com
  ports:
  - {number: 80, name: http, protocol: HTTP}
  - {number: 5432, name: Db, protocol: TCP}
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.1, weight: 0}
  exportTo: ['-']
---
apiVersion: v1
kind: Service
metadata: {name: s}
spec:
  clusterIP: 10.96.0.300
  ports: [{port: 80}]
";
        let load = load_str(text, &Arc::new(PathBuf::from("v.yaml")));
        let at: Vec<(&str, u64, Option<u64>)> = load
            .findings
            .iter()
            .map(|f| (f.code, f.line, f.column))
            .collect();
        assert_eq!(
            at,
            [
                ("INVALID_HOST", 7, Some(5)),
                ("INVALID_PORT_NAME", 10, Some(20)),
                ("ZERO_WEIGHT", 13, Some(25)),
                ("MULTIPLE_HOSTS_TCP", 5, Some(3)),
                ("NO_ADDRESS_TCP", 10, Some(5)),
                ("INVALID_EXPORT_TO", 14, Some(14)),
                ("INVALID_ADDRESS", 20, Some(3)),
            ]
        );
        // A missing field is pointed at through what is written of its path.
        let load = load_str(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: t}\nspec:\n  ports: [{number: 80, name: http}]\n",
            &Arc::new(PathBuf::from("v.yaml")),
        );
        let f = &load.findings[0];
        assert_eq!((f.code, f.line, f.column), ("NO_HOSTS", 4, Some(1)), "{f}");
    }

    fn se(spec: &str) -> Codes {
        check(
            "ServiceEntry",
            "networking.istio.io/v1",
            &format!("spec:\n{spec}"),
        )
    }

    fn errors(codes: &Codes) -> Vec<&'static str> {
        codes
            .iter()
            .filter(|(s, _)| *s == Severity::Error)
            .map(|(_, c)| *c)
            .collect()
    }

    fn warnings(codes: &Codes) -> Vec<&'static str> {
        codes
            .iter()
            .filter(|(s, _)| *s == Severity::Warning)
            .map(|(_, c)| *c)
            .collect()
    }

    const PORT: &str = "  ports: [{number: 443, name: https, protocol: HTTPS}]\n";

    #[test]
    fn valid_service_entries_have_no_findings() {
        for spec in [
            format!("  hosts: [api.example.com, '*.example.org', trailing.dot.]\n{PORT}"),
            format!("  hosts: [db.example.com]\n  resolution: DNS\n{PORT}"),
            format!(
                "  hosts: ['*.example.com']\n  resolution: DNS\n  endpoints: [{{address: proxy.example.com}}]\n{PORT}"
            ),
            "  hosts: [pg.example.com]\n  addresses: [10.0.0.0/8, 'fd00::1']\n  ports: [{number: 5432, name: tcp-pg, protocol: TCP}]\n  resolution: STATIC\n  endpoints: [{address: 10.0.0.1, ports: {tcp-pg: 6432}, weight: 5}]\n".to_string(),
            "  hosts: [uds.example.com]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  resolution: STATIC\n  endpoints: [{address: 'unix:///var/run/app.sock'}, {address: 'unix://@abstract'}]\n".to_string(),
            format!("  hosts: [a.example.com]\n  exportTo: ['.', '*', '~', other-ns]\n{PORT}"),
        ] {
            assert_eq!(se(&spec), vec![], "{spec}");
        }
    }

    #[test]
    fn hosts_are_required_and_valid() {
        assert_eq!(errors(&se(PORT)), ["NO_HOSTS"]);
        for host in [
            "'*'",
            "'*x.example.com'",
            "'a.*.example.com'",
            "'example.*'",
            "Example.com",
            "1.2.3.4",
            "'-a.example.com'",
            "'a..example.com'",
            "''",
            "'a_b.example.com'",
        ] {
            let codes = se(&format!("  hosts: [{host}]\n{PORT}"));
            assert_eq!(errors(&codes), ["INVALID_HOST"], "{host}");
        }
    }

    #[test]
    fn addresses_are_ips_or_cidrs() {
        assert_eq!(
            errors(&se(&format!(
                "  hosts: [a.com]\n  addresses: [10.0.0.300]\n{PORT}"
            ))),
            ["INVALID_ADDRESS"]
        );
        assert_eq!(
            errors(&se(&format!(
                "  hosts: [a.com]\n  addresses: [10.0.0.0/33]\n{PORT}"
            ))),
            ["INVALID_ADDRESS"]
        );
        assert_eq!(
            errors(&se(&format!(
                "  hosts: [a.com]\n  addresses: [10.0.0.0/16]\n  resolution: DNS\n{PORT}"
            ))),
            ["INVALID_ADDRESS"],
            "CIDR needs NONE or STATIC"
        );
    }

    #[test]
    fn ports_rules() {
        let host = "  hosts: [a.com]\n  addresses: [1.1.1.1]\n";
        assert_eq!(errors(&se(host)), ["NO_PORTS"]);
        let case = |ports: &str| se(&format!("{host}  ports:\n{ports}"));
        assert_eq!(
            errors(&case("  - {number: 0, name: a}\n")),
            ["INVALID_PORT"]
        );
        assert_eq!(
            errors(&case("  - {number: 65536, name: a}\n")),
            ["INVALID_PORT"]
        );
        assert_eq!(
            errors(&case("  - {number: 80, name: a, targetPort: 70000}\n")),
            ["INVALID_PORT"]
        );
        assert_eq!(
            errors(&case("  - {number: 80, name: a, targetPort: 0}\n")),
            ["INVALID_PORT"]
        );
        assert_eq!(
            errors(&case(
                "  - {number: 80, name: a}\n  - {number: 80, name: b}\n"
            )),
            ["DUPLICATE_PORT"]
        );
        assert_eq!(
            errors(&case(
                "  - {number: 80, name: a}\n  - {number: 81, name: a}\n"
            )),
            ["DUPLICATE_PORT_NAME"]
        );
        assert_eq!(errors(&case("  - {number: 80}\n")), ["INVALID_PORT_NAME"]);
        assert_eq!(
            errors(&case("  - {number: 80, name: HTTP}\n")),
            ["INVALID_PORT_NAME"]
        );
        assert_eq!(
            errors(&case("  - {number: 80, name: a, protocol: SPDY}\n")),
            ["INVALID_PROTOCOL"]
        );
        for protocol in [
            "http",
            "HTTPS",
            "Http2",
            "grpc",
            "GRPC-WEB",
            "tls",
            "TCP",
            "mongo",
            "MySQL",
            "redis",
            "HTTP_PROXY",
        ] {
            let codes = case(&format!(
                "  - {{number: 80, name: a, protocol: {protocol}}}\n"
            ));
            assert_eq!(codes, vec![], "{protocol}");
        }
        assert_eq!(
            case("  - {number: 53, name: dns, protocol: UDP}\n"),
            vec![(Severity::Warning, "UNSUPPORTED_PROTOCOL")]
        );
    }

    #[test]
    fn selector_and_endpoints_are_exclusive() {
        let codes = se(&format!(
            "  hosts: [a.com]\n  resolution: STATIC\n  workloadSelector: {{labels: {{app: x}}}}\n  endpoints: [{{address: 1.2.3.4}}]\n{PORT}"
        ));
        assert_eq!(errors(&codes), ["SELECTOR_AND_ENDPOINTS"]);
        let codes = se(&format!(
            "  hosts: [a.com]\n  resolution: STATIC\n  workloadSelector: {{labels: {{app: '*'}}}}\n{PORT}"
        ));
        assert_eq!(errors(&codes), ["INVALID_SELECTOR"]);
    }

    #[test]
    fn static_resolution() {
        let static_se = |endpoints: &str| {
            se(&format!(
                "  hosts: [a.com]\n  resolution: STATIC\n{endpoints}{PORT}"
            ))
        };
        assert_eq!(
            static_se(""),
            vec![(Severity::Warning, "NO_ENDPOINTS")],
            "STATIC without endpoints"
        );
        assert_eq!(
            errors(&static_se("  endpoints: [{address: db.example.com}]\n")),
            ["INVALID_ADDRESS"]
        );
        assert_eq!(
            errors(&static_se(
                "  endpoints: [{address: 'unix://relative.sock'}]\n"
            )),
            ["INVALID_ADDRESS"]
        );
        assert_eq!(
            errors(&static_se(
                "  endpoints: [{address: 'unix:///a.sock', ports: {https: 1}}]\n"
            )),
            ["INVALID_ENDPOINT"]
        );
        assert_eq!(
            errors(&se(
                "  hosts: [a.com]\n  resolution: STATIC\n  endpoints: [{address: 'unix:///a.sock'}]\n  ports: [{number: 80, name: http, protocol: HTTP}, {number: 81, name: http2, protocol: HTTP}]\n"
            )),
            ["INVALID_ENDPOINT"],
            "unix endpoints need exactly one port"
        );
        assert_eq!(
            errors(&static_se("  endpoints: [{ports: {https: 1}}]\n")),
            ["INVALID_ADDRESS"]
        );
    }

    #[test]
    fn endpoint_ports_and_weights() {
        let ep = |endpoint: &str| {
            se(&format!(
                "  hosts: [a.com]\n  resolution: STATIC\n  endpoints: [{endpoint}]\n{PORT}"
            ))
        };
        assert_eq!(
            errors(&ep("{address: 1.1.1.1, ports: {https: 0}}")),
            ["INVALID_PORT"]
        );
        assert_eq!(
            errors(&ep("{address: 1.1.1.1, ports: {https: 65536}}")),
            ["INVALID_PORT"]
        );
        assert_eq!(
            ep("{address: 1.1.1.1, ports: {http: 8080}}"),
            vec![(Severity::Warning, "UNKNOWN_PORT_NAME")]
        );
        assert_eq!(
            ep("{address: 1.1.1.1, weight: 0}"),
            vec![(Severity::Warning, "ZERO_WEIGHT")]
        );
        assert_eq!(ep("{address: 1.1.1.1, weight: 4294967295}"), vec![]);
    }

    #[test]
    fn none_resolution_rejects_endpoints() {
        let codes = se(&format!(
            "  hosts: [a.com]\n  endpoints: [{{address: 1.1.1.1}}]\n{PORT}"
        ));
        assert_eq!(errors(&codes), ["INVALID_ENDPOINT"]);
    }

    #[test]
    fn dns_resolution() {
        let codes = se(&format!(
            "  hosts: ['*.example.com']\n  resolution: DNS\n{PORT}"
        ));
        assert_eq!(errors(&codes), ["DNS_WILDCARD"]);
        let codes = se(&format!(
            "  hosts: ['*.example.com']\n  resolution: DNS_ROUND_ROBIN\n{PORT}"
        ));
        assert_eq!(errors(&codes), ["DNS_WILDCARD"]);
        let codes = se(&format!(
            "  hosts: [a.com]\n  resolution: DNS\n  endpoints: [{{address: 'bad host'}}]\n{PORT}"
        ));
        assert_eq!(errors(&codes), ["INVALID_ADDRESS"]);
        let codes = se(&format!(
            "  hosts: [a.com]\n  resolution: DNS_ROUND_ROBIN\n  endpoints: [{{address: b.com}}, {{address: c.com}}]\n{PORT}"
        ));
        assert_eq!(errors(&codes), ["TOO_MANY_ENDPOINTS"]);
        let codes = se(&format!(
            "  hosts: [a.com]\n  resolution: DNS_ROUND_ROBIN\n  endpoints: [{{address: b.com}}]\n{PORT}"
        ));
        assert_eq!(codes, vec![]);
    }

    #[test]
    fn multiple_hosts_need_http_or_tls_ports() {
        let tcp = "  ports: [{number: 5432, name: pg, protocol: TCP}]\n  addresses: [1.2.3.4]\n";
        let codes = se(&format!(
            "  hosts: [a.com, b.com]\n  resolution: DNS\n{tcp}"
        ));
        assert_eq!(errors(&codes), ["MULTIPLE_HOSTS_TCP"]);
        let codes = se(&format!(
            "  hosts: [a.com, b.com]\n  resolution: NONE\n{tcp}"
        ));
        assert_eq!(codes, vec![]);
        let codes = se(&format!(
            "  hosts: [a.com, b.com]\n  resolution: DNS\n{PORT}"
        ));
        assert_eq!(codes, vec![]);
    }

    #[test]
    fn tcp_port_without_addresses_warns() {
        for protocol in ["protocol: TCP", "protocol: MONGO", ""] {
            let codes = se(&format!(
                "  hosts: [db.example.com]\n  resolution: DNS\n  ports: [{{number: 5432, name: pg, {protocol}}}]\n"
            ));
            assert_eq!(
                codes,
                vec![(Severity::Warning, "NO_ADDRESS_TCP")],
                "{protocol:?}"
            );
        }
        let codes = se(
            "  hosts: [db.example.com]\n  addresses: [10.0.0.1]\n  resolution: DNS\n  ports: [{number: 5432, name: pg, protocol: TCP}]\n",
        );
        assert_eq!(codes, vec![]);
    }

    #[test]
    fn export_to() {
        let codes = se(&format!("  hosts: [a.com]\n  exportTo: [Bad_NS]\n{PORT}"));
        assert_eq!(errors(&codes), ["INVALID_EXPORT_TO"]);
        let codes = se(&format!("  hosts: [a.com]\n  exportTo: ['.', ns]\n{PORT}"));
        assert_eq!(
            errors(&codes),
            ["INVALID_EXPORT_TO"],
            "`.` is the own namespace"
        );
        let codes = se(&format!("  hosts: [a.com]\n  exportTo: ['*', '*']\n{PORT}"));
        assert_eq!(errors(&codes), ["INVALID_EXPORT_TO"]);
    }

    fn we(spec: &str) -> Codes {
        check(
            "WorkloadEntry",
            "networking.istio.io/v1",
            &format!("spec: {spec}"),
        )
    }

    #[test]
    fn workload_entry_rules() {
        for address in [
            "10.0.0.1",
            "'fd00::1'",
            "vm.example.com",
            "'unix:///run/a.sock'",
        ] {
            assert_eq!(we(&format!("{{address: {address}}}")), vec![], "{address}");
        }
        assert_eq!(errors(&we("{}")), ["INVALID_ADDRESS"]);
        assert_eq!(warnings(&we("{network: remote}")), ["NO_ADDRESS"]);
        assert_eq!(errors(&we("{address: 'unix://x'}")), ["INVALID_ADDRESS"]);
        assert_eq!(
            errors(&we("{address: '*.example.com'}")),
            ["INVALID_ADDRESS"]
        );
        assert_eq!(
            errors(&we("{address: 10.0.0.1, ports: {http: 0}}")),
            ["INVALID_PORT"]
        );
        assert_eq!(
            errors(&we("{address: 10.0.0.1, ports: {'': 80}}")),
            ["INVALID_PORT_NAME"]
        );
        assert_eq!(
            warnings(&we("{address: 10.0.0.1, weight: 0}")),
            ["ZERO_WEIGHT"]
        );
    }

    fn dr(spec: &str) -> Codes {
        check(
            "DestinationRule",
            "networking.istio.io/v1",
            &format!("spec: {spec}"),
        )
    }

    #[test]
    fn warmup_is_checked_as_istio_checks_it() {
        let lb = |l: &str| {
            errors(&dr(&format!(
                "{{host: a.com, trafficPolicy: {{loadBalancer: {l}}}}}"
            )))
        };
        assert!(lb("{warmupDurationSecs: 10s}").is_empty());
        assert!(lb("{warmup: {duration: 300s, minimumPercent: 5, aggression: 1.5}}").is_empty());
        assert_eq!(lb("{warmup: {minimumPercent: 5}}"), ["INVALID_WARMUP"]);
        assert_eq!(
            lb("{warmup: {duration: 300s, minimumPercent: 150}}"),
            ["INVALID_WARMUP"]
        );
        assert_eq!(
            lb("{warmup: {duration: 300s, aggression: -0.1}}"),
            ["INVALID_WARMUP"]
        );
        assert_eq!(lb("{warmup: {duration: 1.5ms}}"), ["INVALID_DURATION"]);
        let at_port = errors(&dr(
            "{host: a.com, trafficPolicy: {portLevelSettings: [{port: {number: 80}, loadBalancer: {warmup: {duration: 1s, aggression: 0}}}]}}",
        ));
        assert_eq!(at_port, ["INVALID_WARMUP"]);
    }

    #[test]
    fn destination_rule_rules() {
        assert_eq!(dr("{host: reviews}"), vec![]);
        assert_eq!(dr("{host: '*'}"), vec![]);
        assert_eq!(
            dr("{host: '*.example.com', subsets: [{name: v1}, {name: v2}]}"),
            vec![]
        );
        assert_eq!(errors(&dr("{}")), ["NO_HOSTS"]);
        let tls = |t: &str| {
            errors(&dr(&format!(
                "{{host: a.com, trafficPolicy: {{tls: {t}}}}}"
            )))
        };
        assert!(tls("{mode: SIMPLE}").is_empty());
        assert!(tls("{mode: SIMPLE, caCertificates: /ca.pem, sni: a.com}").is_empty());
        assert!(tls("{mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem}").is_empty());
        assert!(tls("{mode: MUTUAL, credentialName: client}").is_empty());
        assert_eq!(tls("{mode: MUTUAL}"), ["INVALID_TLS", "INVALID_TLS"]);
        assert_eq!(
            tls("{mode: SIMPLE, credentialName: c, caCertificates: /ca.pem}"),
            ["INVALID_TLS"]
        );
        assert_eq!(
            tls("{mode: SIMPLE, insecureSkipVerify: true, subjectAltNames: [a.com]}"),
            ["INVALID_TLS"]
        );
        assert_eq!(
            tls("{mode: ISTIO_MUTUAL, caCertificates: /ca.pem}"),
            ["INVALID_TLS"]
        );
        assert_eq!(
            errors(&dr(
                "{host: a.com, trafficPolicy: {portLevelSettings: [{port: {number: 443}, tls: {mode: MUTUAL, privateKey: /k.pem}}]}}"
            )),
            ["INVALID_TLS"]
        );
        assert_eq!(errors(&dr("{host: 'a.*.com'}")), ["INVALID_HOST"]);
        assert_eq!(
            errors(&dr("{host: a.com, subsets: [{name: v1}, {name: v1}]}")),
            ["DUPLICATE_SUBSET"]
        );
        assert_eq!(
            errors(&dr("{host: a.com, subsets: [{name: ''}]}")),
            ["INVALID_SUBSET"]
        );
        let pool = |p: &str| {
            errors(&dr(&format!(
                "{{host: a.com, trafficPolicy: {{connectionPool: {p}}}}}"
            )))
        };
        assert!(pool("{tcp: {maxConnections: 1, connectTimeout: 30ms}}").is_empty());
        assert_eq!(pool("{tcp: {maxConnections: -1}}"), ["INVALID_LIMIT"]);
        assert_eq!(
            pool("{http: {http2MaxRequests: 3000000000}}"),
            ["INVALID_LIMIT"]
        );
        assert_eq!(pool("{tcp: {connectTimeout: 1us}}"), ["INVALID_DURATION"]);
        // An unparseable duration fails the resource as istiod rejects it.
        assert!(!pool("{tcp: {connectTimeout: soon}}").is_empty());
        assert_eq!(
            errors(&dr(
                "{host: a.com, trafficPolicy: {portLevelSettings: [{connectionPool: {}}]}}"
            )),
            ["INVALID_PORT"]
        );
        assert_eq!(
            errors(&dr(
                "{host: a.com, subsets: [{name: v1, trafficPolicy: {connectionPool: {http: {maxRetries: -2}}}}]}"
            )),
            ["INVALID_LIMIT"]
        );
        assert_eq!(
            errors(&dr("{host: a.com, exportTo: ['~']}")),
            ["INVALID_EXPORT_TO"]
        );
    }

    #[test]
    fn virtual_service_rules() {
        let vs = |spec: &str| {
            check(
                "VirtualService",
                "networking.istio.io/v1",
                &format!("spec: {spec}"),
            )
        };
        let route = "http: [{route: [{destination: {host: reviews}}]}]";
        assert_eq!(
            vs(&format!(
                "{{hosts: [reviews, '*.example.com', 10.0.0.1], {route}}}"
            )),
            vec![]
        );
        assert_eq!(vs("{}"), vec![(Severity::Warning, "NO_HOSTS")]);
        assert_eq!(
            errors(&vs(&format!("{{hosts: ['re*views'], {route}}}"))),
            ["INVALID_HOST"]
        );
        // `*` is refused for the mesh, as istiod refuses it; a gateway's rules may use it.
        assert_eq!(
            errors(&vs(&format!("{{hosts: ['*'], {route}}}"))),
            ["INVALID_HOST"]
        );
        assert_eq!(
            vs(&format!("{{hosts: ['*'], gateways: [ingress], {route}}}")),
            vec![]
        );
        assert_eq!(errors(&vs("{hosts: [a.com]}")), ["NO_ROUTES"]);
    }

    #[test]
    fn virtual_service_http_routes_follow_istios_validation() {
        let http = |route: &str| {
            let codes = check(
                "VirtualService",
                "networking.istio.io/v1",
                &format!("spec: {{hosts: [a.example.com], http: [{route}]}}"),
            );
            errors(&codes)
        };
        let to = "route: [{destination: {host: a.example.com}}]";
        let valid = [
            format!("{{{to}}}"),
            format!(
                "{{name: r, match: [{{uri: {{prefix: /api}}, headers: {{x-v: {{exact: '2'}}, x-any: {{}}}}, withoutHeaders: {{x-no: {{}}}}, queryParams: {{q: {{regex: 'a.*'}}}}, method: {{exact: GET}}, authority: {{prefix: a}}, scheme: {{exact: http}}, port: 80, ignoreUriCase: true}}], {to}}}"
            ),
            "{route: [{destination: {host: a.example.com, subset: v1, port: {number: 80}}, weight: 80}, {destination: {host: b, subset: v2}, weight: 20, headers: {request: {set: {x-b: '1'}}}}]}".to_string(),
            format!("{{{to}, timeout: 0s, retries: {{attempts: 3, perTryTimeout: 2s, retryOn: '5xx,retriable-status-codes,503'}}}}"),
            format!("{{{to}, retries: {{attempts: 0}}}}"),
            format!("{{{to}, rewrite: {{uri: /v2, authority: b.example.com}}}}"),
            format!("{{{to}, rewrite: {{uriRegexRewrite: {{match: '^/a/(.*)', rewrite: '/\\1'}}}}}}"),
            "{redirect: {uri: /new, authority: b.example.com, redirectCode: 302}}".to_string(),
            "{redirect: {scheme: https, derivePort: FROM_PROTOCOL_DEFAULT}}".to_string(),
            "{directResponse: {status: 418, body: {string: teapot}}}".to_string(),
            format!("{{{to}, fault: {{delay: {{fixedDelay: 5s, percentage: {{value: 10}}}}, abort: {{httpStatus: 503, percentage: {{value: 0.5}}}}}}}}"),
            format!("{{{to}, mirror: {{host: b.example.com}}, mirrorPercentage: {{value: 50}}}}"),
            format!("{{{to}, mirrors: [{{destination: {{host: b.example.com}}, percentage: {{value: 5}}}}]}}"),
            format!("{{{to}, headers: {{request: {{set: {{a: b}}, add: {{c: d}}, remove: [e]}}, response: {{remove: [server]}}}}}}"),
        ];
        for route in &valid {
            assert_eq!(http(route), Vec::<&str>::new(), "{route}");
        }
        for (route, want) in [
            ("{}".to_string(), "NO_ROUTE"),
            (
                format!("{{{to}, redirect: {{uri: /x}}}}"),
                "CONFLICTING_ACTIONS",
            ),
            (
                "{redirect: {redirectCode: 302}}".to_string(),
                "INVALID_REDIRECT",
            ),
            (
                "{redirect: {uri: /x, redirectCode: 200}}".to_string(),
                "INVALID_REDIRECT",
            ),
            (
                "{directResponse: {status: 99}}".to_string(),
                "INVALID_STATUS",
            ),
            (
                "{route: [{destination: {host: a.com}, weight: -1}]}".to_string(),
                "INVALID_WEIGHT",
            ),
            (
                "{route: [{destination: {host: a.com}}, {destination: {host: b.com}}]}".to_string(),
                "INVALID_WEIGHT",
            ),
            ("{route: [{destination: {}}]}".to_string(), "NO_HOSTS"),
            (
                "{route: [{destination: {host: a.com, subset: V_1}}]}".to_string(),
                "INVALID_SUBSET",
            ),
            (
                "{route: [{destination: {host: a.com, port: {number: 70000}}}]}".to_string(),
                "INVALID_PORT",
            ),
            (
                format!("{{{to}, retries: {{attempts: -1}}}}"),
                "INVALID_RETRIES",
            ),
            (
                format!("{{{to}, retries: {{attempts: 1, retryOn: 'sometimes'}}}}"),
                "INVALID_RETRIES",
            ),
            (format!("{{{to}, timeout: 1us}}"), "INVALID_DURATION"),
            (
                format!("{{{to}, match: [{{uri: {{exact: /a, prefix: /b}}}}]}}"),
                "INVALID_MATCH",
            ),
            (
                format!("{{{to}, fault: {{abort: {{httpStatus: 700}}}}}}"),
                "INVALID_FAULT",
            ),
            (
                format!("{{{to}, fault: {{abort: {{grpcStatus: UNAVAILABLE_NOW}}}}}}"),
                "INVALID_FAULT",
            ),
            (
                format!("{{{to}, fault: {{abort: {{httpStatus: 503, grpcStatus: UNAVAILABLE}}}}}}"),
                "INVALID_FAULT",
            ),
            (
                format!(
                    "{{{to}, fault: {{delay: {{fixedDelay: 1s, percentage: {{value: 101}}}}}}}}"
                ),
                "INVALID_PERCENT",
            ),
            (
                format!(
                    "{{{to}, mirror: {{host: b.com}}, mirrors: [{{destination: {{host: c.com}}}}]}}"
                ),
                "CONFLICTING_ACTIONS",
            ),
            (
                format!(
                    "{{{to}, rewrite: {{uri: /a, uriRegexRewrite: {{match: a, rewrite: b}}}}}}"
                ),
                "INVALID_REWRITE",
            ),
        ] {
            assert_eq!(http(&route), [want], "{route}");
        }
    }

    #[test]
    fn virtual_service_tls_and_tcp_routes_follow_istios_validation() {
        let vs = |spec: &str| {
            errors(&check(
                "VirtualService",
                "networking.istio.io/v1",
                &format!("spec: {{hosts: ['*.example.com'], {spec}}}"),
            ))
        };
        let to = "route: [{destination: {host: a.example.com}}]";
        assert_eq!(
            vs(&format!(
                "tls: [{{match: [{{sniHosts: [a.example.com], port: 443}}], {to}}}]"
            )),
            Vec::<&str>::new()
        );
        assert_eq!(
            vs(&format!(
                "tcp: [{{match: [{{destinationSubnets: [10.0.0.0/8, 10.1.1.1], port: 5432}}], {to}}}, {{{to}}}]"
            )),
            Vec::<&str>::new()
        );
        assert_eq!(vs(&format!("tls: [{{{to}}}]")), ["INVALID_MATCH"]);
        assert_eq!(
            vs(&format!(
                "tls: [{{match: [{{sniHosts: [b.other.com]}}], {to}}}]"
            )),
            ["INVALID_MATCH"]
        );
        assert_eq!(
            vs(&format!(
                "tcp: [{{match: [{{destinationSubnets: [10.0.0.0/33]}}], {to}}}]"
            )),
            ["INVALID_ADDRESS"]
        );
    }

    #[test]
    fn sidecar_rules() {
        let sc = |spec: &str| {
            check(
                "Sidecar",
                "networking.istio.io/v1",
                &format!("spec: {spec}"),
            )
        };
        assert_eq!(
            sc(
                "{egress: [{hosts: ['./*', '*/*', '~/*', '~prod/*', 'istio-system/*.example.com', 'prod/api.example.com']}]}"
            ),
            vec![]
        );
        assert_eq!(sc("{outboundTrafficPolicy: {mode: REGISTRY_ONLY}}"), vec![]);
        assert_eq!(sc("{}"), vec![(Severity::Warning, "NOTHING_TO_DO")]);
        assert_eq!(errors(&sc("{egress: [{hosts: []}]}")), ["NO_HOSTS"]);
        let listener = |port: &str| format!("{{{port}hosts: ['./*']}}");
        for (listeners, want) in [
            (
                vec!["port: {number: 80}, ", "port: {number: 81}, ", ""],
                vec![],
            ),
            (vec!["", "port: {number: 80}, "], vec!["EGRESS_CATCH_ALL"]),
            (vec!["", ""], vec!["EGRESS_CATCH_ALL"]),
            (
                vec!["port: {number: 80}, ", "port: {number: 80}, "],
                vec!["DUPLICATE_PORT"],
            ),
            (vec!["port: {number: 70000}, "], vec!["INVALID_PORT"]),
        ] {
            let egress: Vec<String> = listeners.iter().map(|p| listener(p)).collect();
            let codes = sc(&format!("{{egress: [{}]}}", egress.join(", ")));
            assert_eq!(errors(&codes), want, "{listeners:?}");
        }
        for host in [
            "api.example.com",
            "/a.com",
            "ns/",
            "Bad/a.com",
            "ns/reviews",
            "ns/*x.com",
            "~Bad/a.com",
        ] {
            let codes = sc(&format!("{{egress: [{{hosts: ['{host}']}}]}}"));
            assert_eq!(errors(&codes), ["INVALID_EGRESS_HOST"], "{host}");
        }
        assert_eq!(
            errors(&sc(
                "{workloadSelector: {labels: {'*': x}}, egress: [{hosts: ['./*']}]}"
            )),
            ["INVALID_SELECTOR"]
        );
    }

    #[test]
    fn pod_rules() {
        let pod = |body: &str| check("Pod", "v1", body);
        assert_eq!(
            pod("status: {podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}]}"),
            vec![]
        );
        assert_eq!(errors(&pod("status: {podIP: ten}")), ["INVALID_ADDRESS"]);
        assert_eq!(
            errors(&pod("status: {podIPs: [{ip: '1.2.3'}]}")),
            ["INVALID_ADDRESS"]
        );
        assert_eq!(
            errors(&pod(
                "spec: {containers: [{name: a, ports: [{containerPort: 70000}]}]}"
            )),
            ["INVALID_PORT"]
        );
    }

    #[test]
    fn service_rules() {
        let svc = |spec: &str| check("Service", "v1", &format!("spec: {spec}"));
        assert_eq!(svc("{clusterIP: None, ports: [{port: 80}]}"), vec![]);
        assert_eq!(
            svc(
                "{ports: [{name: a, port: 53, protocol: TCP}, {name: b, port: 53, protocol: UDP}]}"
            ),
            vec![]
        );
        assert_eq!(errors(&svc("{ports: [{port: 0}]}")), ["INVALID_PORT"]);
        assert_eq!(
            errors(&svc("{ports: [{port: 80, targetPort: 99999}]}")),
            ["INVALID_PORT"]
        );
        assert_eq!(errors(&svc("{clusterIP: nope}")), ["INVALID_ADDRESS"]);
        assert_eq!(
            errors(&svc("{ports: [{name: a, port: 80}, {name: b, port: 80}]}")),
            ["DUPLICATE_PORT"]
        );
        assert_eq!(
            errors(&svc("{ports: [{name: a, port: 80}, {name: a, port: 81}]}")),
            ["DUPLICATE_PORT_NAME"]
        );
        assert_eq!(
            errors(&svc("{ports: [{port: 80}, {name: b, port: 81}]}")),
            ["INVALID_PORT_NAME"]
        );
    }

    #[test]
    fn host_helpers() {
        assert!(is_fqdn("a.example.com"));
        assert!(is_fqdn("localhost"));
        assert!(is_fqdn("example.com."));
        assert!(!is_fqdn("example.com.."));
        assert!(!is_fqdn("10.0.0.1"));
        assert!(is_fqdn("1.2.3.example"));
        assert!(!is_fqdn(&format!("{}.com", "a".repeat(64))));
        assert!(is_fqdn(&["a"; 128].join(".")));
        assert!(!is_fqdn(&["a"; 129].join(".")));
        assert!(is_wildcard_host("*"));
        assert!(is_wildcard_host("*.a.com"));
        assert!(!is_wildcard_host("*."));
        assert!(!is_wildcard_host("**.a.com"));
        assert!(!is_wildcard_host("*.*.a.com"));
    }

    fn label() -> impl Strategy<Value = String> {
        "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?"
    }

    fn fqdn() -> impl Strategy<Value = String> {
        (prop::collection::vec(label(), 0..4), "[a-z][a-z0-9]{0,5}").prop_map(
            |(mut labels, tld)| {
                labels.push(tld);
                labels.join(".")
            },
        )
    }

    proptest! {
        #[test]
        fn generated_names_are_valid_hosts(name in fqdn()) {
            prop_assert!(is_fqdn(&name));
            prop_assert!(is_wildcard_host(&name));
            let wildcard = format!("*.{name}");
            prop_assert!(is_wildcard_host(&wildcard));
            prop_assert!(!is_fqdn(&wildcard));
        }

        #[test]
        fn a_star_anywhere_but_the_prefix_is_rejected(name in fqdn(), at in any::<prop::sample::Index>()) {
            let chars: Vec<char> = name.chars().collect();
            let at = at.index(chars.len() + 1);
            let mut host: String = chars[..at].iter().collect();
            host.push('*');
            host.extend(&chars[at..]);
            // Only `*.name` is a valid wildcard; `*name`, `a*b.c`, `name*` are partial.
            prop_assert!(!is_wildcard_host(&host), "{}", host);
        }

        #[test]
        fn uppercase_is_rejected(name in fqdn()) {
            let upper = name.to_ascii_uppercase();
            prop_assert!(!is_wildcard_host(&upper));
        }

        #[test]
        fn arbitrary_service_entry_hosts_never_panic(host in "\\PC{0,40}") {
            let text = format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: p}}\nspec:\n  hosts: [{host:?}]\n  ports: [{{number: 443, name: https, protocol: TLS}}]\n"
            );
            let load = load_str(&text, &Arc::new(PathBuf::from("p.yaml")));
            if is_wildcard_host(&host) && host != "*" {
                prop_assert_eq!(load.resources.len(), 1);
            } else {
                prop_assert!(load.has_errors());
            }
        }
    }
}
