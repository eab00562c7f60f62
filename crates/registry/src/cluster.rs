//! Clusters and their endpoints, from Envoy's model: discovery type, priorities, health,
//! weights and transports, with endpoint counters carried over across snapshots.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use portcullis_balance::outlier::Detection;
use portcullis_balance::{
    Balancer, EndpointState, Group, Layout, Member, Policy, SlowStart, is_prime,
};
use portcullis_envoy as envoy;
use portcullis_model::Resolution;

use crate::Map;
use crate::build::DnsAnswers;
use crate::limits::CircuitBreakers;
use crate::snapshot::{
    BuiltFrom, Cluster, Decision, Endpoint, EndpointTransport, Outliers, Protocol,
};
use crate::ssrf;
use crate::tls::IstioPeer;

/// Where a filter chain or route sends traffic: one cluster, or several by weight.
#[derive(Debug, Clone)]
pub enum Target {
    /// Always this.
    One(Decision),
    /// One of these at random in proportion to the weights: each with the running total of
    /// the weights up to and including it.
    Weighted(Vec<(u64, Decision)>),
}

impl Target {
    /// The decision for one connection or request.
    pub fn decide(&self) -> Decision {
        self.choose().1
    }

    /// The decision for one request, with the index of the weighted choice it is (0 for
    /// one cluster).
    pub fn choose(&self) -> (usize, Decision) {
        match self {
            Target::One(d) => (0, d.clone()),
            Target::Weighted(choices) => {
                let total = choices.last().map_or(0, |(t, _)| *t);
                let draw = fastrand::u64(0..total.max(1));
                let at = choices
                    .iter()
                    .position(|(upto, _)| draw < *upto)
                    .unwrap_or(0);
                choices.get(at).map_or_else(
                    || (0, Decision::NoCluster("".into())),
                    |(_, d)| (at, d.clone()),
                )
            }
        }
    }
}

/// Resolves cluster names to what the data path does with them.
pub(crate) struct Clusters<'a> {
    pub(crate) by_name: &'a crate::snapshot::ClusterMap,
}

impl Clusters<'_> {
    /// The decision for a cluster name: Istio's BlackHoleCluster and PassthroughCluster are
    /// the refusal and the original destination; a name without a cluster is Envoy's `NC`.
    /// A PassthroughCluster with allowed destinations (the registered pods, under
    /// REGISTRY_ONLY) is a cluster, confined to them as resolution NONE's are.
    pub(crate) fn decision(&self, name: &str) -> Decision {
        match self.by_name.get(name) {
            None => Decision::NoCluster(name.into()),
            Some(_) if name == envoy::BLACKHOLE_CLUSTER => Decision::BlackHole,
            Some(c) if name == envoy::PASSTHROUGH_CLUSTER && c.owned_destinations.is_none() => {
                Decision::Passthrough
            }
            Some(c) => Decision::Cluster(Arc::clone(c)),
        }
    }

    /// Resolves a cluster specifier.
    pub(crate) fn target(&self, spec: &envoy::ClusterSpecifier) -> Target {
        match spec {
            envoy::ClusterSpecifier::Cluster(name) => Target::One(self.decision(name)),
            envoy::ClusterSpecifier::Weighted(list) => {
                let mut total = 0u64;
                let choices = list
                    .iter()
                    .filter(|w| w.weight > 0)
                    .map(|w| {
                        total += u64::from(w.weight);
                        (total, self.decision(&w.name))
                    })
                    .collect();
                Target::Weighted(choices)
            }
        }
    }
}

/// The short name and namespace Istio's metrics give the service `host` declared by
/// `source` (`ServiceEntry namespace/name`): a Kubernetes host `name.namespace.svc...`
/// names both; otherwise the host and the declaring resource's namespace.
fn service_identity(host: &Arc<str>, source: &str) -> (Arc<str>, Option<Arc<str>>) {
    let mut parts = host.splitn(4, '.');
    if let (Some(name), Some(ns), Some("svc")) = (parts.next(), parts.next(), parts.next()) {
        return (name.into(), Some(ns.into()));
    }
    let namespace = source
        .split_once(' ')
        .and_then(|(_, name)| name.split_once('/'))
        .map(|(ns, _)| ns.into());
    (Arc::clone(host), namespace)
}

/// Builds one cluster. `protocol` is how listeners use it; DNS names its endpoints need
/// are added to `dns_names` and their current answers taken from `dns`; live counts (the
/// endpoints' and the circuit breakers') are taken over from `previous`, the cluster of
/// the same name in the snapshot this one replaces.
pub(crate) fn build(
    c: &Arc<envoy::Cluster>,
    resources: &envoy::Resources,
    protocol: Protocol,
    dns: DnsAnswers<'_>,
    previous: Option<&Cluster>,
    dns_names: &mut BTreeSet<String>,
    warnings: &mut Vec<String>,
) -> Cluster {
    let counters: Map<SocketAddr, &Arc<EndpointState>> = previous
        .into_iter()
        .flat_map(|p| &p.endpoints)
        .map(|e| (SocketAddr::new(e.address, e.port), &e.state))
        .collect();
    let warned = warnings.len();
    let (host, port) = istio_host_port(&c.name);
    let resolution = match &c.discovery {
        envoy::Discovery::Static | envoy::Discovery::Eds { .. } => Resolution::Static,
        envoy::Discovery::StrictDns => Resolution::Dns,
        envoy::Discovery::LogicalDns => Resolution::DnsRoundRobin,
        envoy::Discovery::OriginalDst(_) => Resolution::None,
    };
    let (passthrough_port, owned_destinations) = match &c.discovery {
        envoy::Discovery::OriginalDst(o) => (o.port_override, o.allowed_destinations.clone()),
        _ => (None, None),
    };
    let eds = match &c.discovery {
        envoy::Discovery::Eds { service_name } => resources.endpoints.get(service_name),
        _ => None,
    };
    let assignment = match &c.discovery {
        envoy::Discovery::Eds { .. } => eds.map(|a| &**a),
        envoy::Discovery::OriginalDst(_) => None,
        _ => c.load_assignment.as_ref(),
    };
    let transports = Transports::compile(c, warnings);
    // An endpoint new to the cluster joins now, on tokio's clock as the data path reads it;
    // one the cluster had keeps its state, and with it its place in the slow start ramp.
    let now = tokio::time::Instant::now().into_std();
    let mut endpoints = Vec::new();
    let mut groups = Vec::new();
    let mut dns_rejected = Vec::new();
    for (locality, usable, skipped) in assignment.map(usable_endpoints).unwrap_or_default() {
        let first = endpoints.len();
        for e in usable {
            let source = e.source.clone().unwrap_or_else(|| c.name.as_str().into());
            let transport = transports.of(c, e);
            let (addrs, hostname, port): (Arc<[IpAddr]>, _, _) = match &e.address {
                envoy::EndpointAddress::Socket(a) => (Arc::new([a.ip()]), None, a.port()),
                envoy::EndpointAddress::Name { host, port } => {
                    if resolution == Resolution::Static {
                        warnings.push(format!(
                            "cluster {}: endpoint {host}:{port} is a name in a cluster that does not resolve names; ignored",
                            c.name
                        ));
                        continue;
                    }
                    let host: Arc<str> = host.to_ascii_lowercase().into();
                    let mut answer = dns(&host).unwrap_or_default();
                    if let Some(allowed) = &c.ssrf_guard {
                        let (used, rejected) = ssrf::filter(&host, &answer, allowed);
                        if !rejected.is_empty() {
                            answer = used.into();
                            dns_rejected.extend(rejected);
                        }
                    }
                    if resolution == Resolution::DnsRoundRobin {
                        // LOGICAL_DNS: one address at a time, the first answer.
                        answer = answer.iter().take(1).copied().collect();
                    }
                    dns_names.insert(host.to_string());
                    (answer, Some(host), *port)
                }
            };
            for address in addrs.iter().copied() {
                let state = counters
                    .get(&SocketAddr::new(address, port))
                    .map_or_else(|| Arc::new(EndpointState::added_at(now)), |s| Arc::clone(s));
                endpoints.push(Endpoint {
                    address,
                    hostname: hostname.clone(),
                    port,
                    weight: e.load_balancing_weight.max(1),
                    source: Arc::clone(&source),
                    workload: e.workload.clone(),
                    state,
                    transport: transport.clone(),
                });
            }
        }
        groups.push(Group {
            priority: locality.priority,
            weight: locality.load_balancing_weight.unwrap_or(0),
            hosts: u32::try_from(endpoints.len() - first + skipped).unwrap_or(u32::MAX),
            members: (first..endpoints.len()).collect(),
        });
    }
    // Grown by push; the snapshot keeps it until the next build.
    endpoints.shrink_to_fit();
    let policy = match c.lb_policy {
        envoy::LbPolicy::RoundRobin => Policy::RoundRobin,
        envoy::LbPolicy::Random => Policy::Random,
        envoy::LbPolicy::LeastRequest | envoy::LbPolicy::ClusterProvided => Policy::LeastRequest,
        envoy::LbPolicy::RingHash {
            minimum_ring_size,
            maximum_ring_size,
        } => Policy::RingHash {
            minimum_ring_size,
            maximum_ring_size,
        },
        envoy::LbPolicy::Maglev { table_size } => {
            if !is_prime(table_size) {
                warnings.push(format!(
                    "cluster {}: maglev table_size {table_size} is not prime; Envoy's default {} is used",
                    c.name,
                    envoy::LbPolicy::DEFAULT_MAGLEV_TABLE_SIZE
                ));
            }
            Policy::Maglev { table_size }
        }
    };
    // The ring or table is built here, once per snapshot, off the data path; endpoints
    // are placed by `IP:PORT` as Envoy places hosts by their address.
    let balancer = Balancer::layered(
        policy,
        endpoints
            .iter()
            .map(|e| Member {
                weight: e.weight,
                state: Arc::clone(&e.state),
                key: if policy.is_consistent_hash() {
                    SocketAddr::new(e.address, e.port).to_string()
                } else {
                    String::new()
                },
            })
            .collect(),
        Layout {
            groups,
            locality_weighted: c.locality_weighted,
        },
        c.slow_start.as_deref().map(slow_start),
    );
    warnings.extend(
        dns_rejected
            .iter()
            .map(|r| format!("cluster {}: {r}; not used as an endpoint", c.name)),
    );
    let source = c.source.clone().unwrap_or_else(|| c.name.as_str().into());
    let (service_name, service_namespace) = service_identity(&host, &source);
    let istio_mutual = matches!(transports.cluster, EndpointTransport::IstioMutual(_))
        || endpoints
            .iter()
            .any(|e| matches!(e.transport, EndpointTransport::IstioMutual(_)));
    Cluster {
        service_name,
        service_namespace,
        istio_mutual,
        passthrough_transport: transports.cluster.clone(),
        dns_rejected,
        name: c.name.as_str().into(),
        host,
        port,
        protocol,
        resolution,
        passthrough_port,
        source,
        owned_destinations,
        endpoints,
        balancer,
        connect_timeout: c.connect_timeout,
        limits: (c.connection_limits != envoy::ConnectionLimits::default())
            .then(|| Box::new(c.connection_limits)),
        outlier: c.outlier_detection.as_deref().map(|o| {
            Box::new(Outliers {
                detection: detection(o),
                // Envoy's default panic threshold is 50%; istiod writes 0 (off) unless
                // `minHealthPercent` says otherwise.
                panic_threshold: c.healthy_panic_threshold.unwrap_or(50.0),
            })
        }),
        breakers: CircuitBreakers {
            thresholds: c.circuit_breakers,
            load: previous
                .map(|p| Arc::clone(&p.breakers.load))
                .unwrap_or_default(),
        },
        // Only what depends on the resources alone is reused: not a cluster that resolves
        // names (its answers change) or that was warned about (the warning is said again).
        built_from: (resolution != Resolution::Dns
            && resolution != Resolution::DnsRoundRobin
            && warnings.len() == warned)
            .then(|| BuiltFrom {
                cluster: Arc::clone(c),
                assignment: eds.map(Arc::clone),
            }),
    }
}

/// Whether `previous` was built from exactly these resources for the same protocol, so
/// that the next snapshot can share it instead of building it again.
pub(crate) fn unchanged(
    previous: &Cluster,
    c: &Arc<envoy::Cluster>,
    resources: &envoy::Resources,
    protocol: Protocol,
) -> bool {
    let Some(from) = &previous.built_from else {
        return false;
    };
    let eds = match &c.discovery {
        envoy::Discovery::Eds { service_name } => resources.endpoints.get(service_name),
        _ => None,
    };
    previous.protocol == protocol
        && Arc::ptr_eq(&from.cluster, c)
        && match (&from.assignment, eds) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
}

/// Each locality of `a` with the endpoints that may take traffic and how many of its
/// endpoints may not: unhealthy ones, and degraded ones while their priority has a healthy
/// one (Envoy sends degraded endpoints traffic only when healthy ones run short).
fn usable_endpoints(
    a: &envoy::ClusterLoadAssignment,
) -> Vec<(&envoy::LocalityLbEndpoints, Vec<&envoy::LbEndpoint>, usize)> {
    let healthy =
        |e: &&envoy::LbEndpoint| e.health.is_usable() && e.health != envoy::HealthStatus::Degraded;
    a.endpoints
        .iter()
        .map(|l| {
            let priority_healthy = a
                .endpoints
                .iter()
                .filter(|o| o.priority == l.priority)
                .any(|o| o.lb_endpoints.iter().any(|e| healthy(&e)));
            let usable: Vec<&envoy::LbEndpoint> = l
                .lb_endpoints
                .iter()
                .filter(|e| {
                    if priority_healthy {
                        healthy(e)
                    } else {
                        e.health.is_usable()
                    }
                })
                .collect();
            let skipped = l.lb_endpoints.len() - usable.len();
            (l, usable, skipped)
        })
        .collect()
}

/// The transports of a cluster (its own and those of its `transport_socket_matches`),
/// each compiled once for all its endpoints.
struct Transports {
    cluster: EndpointTransport,
    matches: Vec<EndpointTransport>,
}

impl Transports {
    fn compile(c: &envoy::Cluster, warnings: &mut Vec<String>) -> Transports {
        let mut compile = |t: &envoy::UpstreamTransport| -> EndpointTransport {
            match t {
                envoy::UpstreamTransport::Plaintext => EndpointTransport::Plaintext,
                envoy::UpstreamTransport::Tls(tls) => match crate::tls::compile(tls) {
                    Ok(origin) => EndpointTransport::Tls(Arc::new(origin)),
                    Err(e) => {
                        warnings.push(format!(
                            "cluster {}: TLS origination cannot be set up ({e}); its endpoints get no connection",
                            c.name
                        ));
                        EndpointTransport::Refused(
                            format!("the endpoint's TLS settings cannot be used: {e}").into(),
                        )
                    }
                },
                envoy::UpstreamTransport::IstioMutualTls(m) => {
                    EndpointTransport::IstioMutual(Arc::new(IstioPeer::new(Arc::clone(m))))
                }
                envoy::UpstreamTransport::Unsupported(kind) => EndpointTransport::Refused(
                    format!(
                        "the endpoint needs the transport {kind}, which portcullis cannot build"
                    )
                    .into(),
                ),
            }
        };
        Transports {
            cluster: compile(&c.transport),
            matches: c
                .transport_socket_matches
                .iter()
                .map(|m| compile(&m.transport))
                .collect(),
        }
    }

    /// The transport of an endpoint: that of the first `transport_socket_matches` entry
    /// whose metadata it carries, else the cluster's.
    fn of(&self, c: &envoy::Cluster, e: &envoy::LbEndpoint) -> EndpointTransport {
        c.transport_socket_matches
            .iter()
            .position(|m| {
                m.match_metadata
                    .iter()
                    .all(|(k, v)| e.transport_socket_match.get(k) == Some(v))
            })
            .and_then(|i| self.matches.get(i))
            .unwrap_or(&self.cluster)
            .clone()
    }
}

/// The service host and port of an Istio cluster name `outbound|PORT|SUBSET|HOST`; any
/// other name is its own host, on no port.
fn istio_host_port(name: &str) -> (Arc<str>, u16) {
    let mut parts = name.split('|');
    if let (Some("outbound" | "inbound"), Some(port), Some(_), Some(host), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) && let Ok(port) = port.parse()
    {
        return (host.into(), port);
    }
    (name.into(), 0)
}

/// A cluster's slow start with Envoy's defaults filled in: a linear ramp from 10% of the
/// weight; the aggression's default value, as without a runtime override.
fn slow_start(s: &envoy::SlowStartConfig) -> SlowStart {
    let defaults = SlowStart::new(s.window);
    SlowStart {
        aggression: s
            .aggression
            .as_ref()
            .map_or(defaults.aggression, |a| a.default_value),
        min_weight: s
            .min_weight_percent
            .map_or(defaults.min_weight, |p| p / 100.0),
        ..defaults
    }
}

/// The detectors Envoy enforces, as the data path applies them: a detector whose
/// enforcement is above zero ejects (Envoy draws partial enforcement percentages per
/// ejection; istiod writes only 0 and 100).
fn detection(o: &envoy::OutlierDetection) -> Detection {
    let enforced = |n: u32, enforcing: u32| (enforcing > 0 && n > 0).then_some(n);
    Detection {
        consecutive_5xx: enforced(o.consecutive_5xx, o.enforcing_consecutive_5xx),
        consecutive_gateway: enforced(
            o.consecutive_gateway_failure,
            o.enforcing_consecutive_gateway_failure,
        ),
        consecutive_local_origin: enforced(
            o.consecutive_local_origin_failure,
            o.enforcing_consecutive_local_origin_failure,
        )
        .filter(|_| o.split_external_local_origin_errors),
        split_local_origin: o.split_external_local_origin_errors,
        interval: o.interval,
        base_ejection: o.base_ejection_time,
        max_ejection: o.max_ejection_time,
        max_ejection_percent: o.max_ejection_percent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istios_metrics_name_kubernetes_services_by_host_and_others_by_their_resource() {
        let (name, ns) = service_identity(
            &Arc::from("reviews.shop.svc.cluster.local"),
            "Service shop/reviews",
        );
        assert_eq!((&*name, ns.as_deref()), ("reviews", Some("shop")));
        let (name, ns) = service_identity(&Arc::from("api.example.com"), "ServiceEntry egress/api");
        assert_eq!((&*name, ns.as_deref()), ("api.example.com", Some("egress")));
        let (name, ns) = service_identity(&Arc::from("api.example.com"), "outbound|443||api");
        assert_eq!((&*name, ns), ("api.example.com", None));
    }
}
