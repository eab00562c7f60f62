//! Bodies of the admin endpoints.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use portcullis_registry::{OutboundMode, Protocol, Resolution, Snapshot};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};

use portcullis_envoy::state::SourceState;

use crate::{ConfigStatus, config_dump, exposition};

fn mode_name(mode: OutboundMode) -> &'static str {
    match mode {
        OutboundMode::RegistryOnly => "REGISTRY_ONLY",
        OutboundMode::AllowAny => "ALLOW_ANY",
    }
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Http => "HTTP",
        Protocol::Http2 => "HTTP2",
        Protocol::Tls => "TLS",
        Protocol::Tcp => "TCP",
        Protocol::Auto => "AUTO",
    }
}

fn resolution_name(r: Resolution) -> &'static str {
    match r {
        Resolution::None => "NONE",
        Resolution::Static => "STATIC",
        Resolution::Dns => "DNS",
        Resolution::DnsRoundRobin => "DNS_ROUND_ROBIN",
    }
}

/// Envoy's `ConfigDump` of the source's resources, with the active registry snapshot and
/// the per-file config status under `portcullis`.
pub fn config_dump(resources: &SourceState, snapshot: &Snapshot, config: &ConfigStatus) -> String {
    let clusters: Vec<Value> = snapshot
        .clusters
        .values()
        .map(|c| {
            json!({
                "name": &*c.name,
                "host": &*c.host,
                "port": c.port,
                "protocol": protocol_name(c.protocol),
                "resolution": resolution_name(c.resolution),
                "source": &*c.source,
                "owned_destinations": c.owned_destinations.as_ref().map(|nets| nets.iter().map(ToString::to_string).collect::<Vec<_>>()),
                "passthrough_port": c.passthrough_port,
                "endpoints": c.endpoints.iter().map(|e| json!({
                    "address": e.display(),
                    "hostname": e.hostname.as_deref(),
                    "weight": e.weight,
                    "source": &*e.source,
                })).collect::<Vec<_>>(),
                "dns_rejected": c.dns_rejected.iter().map(|r| json!({
                    "host": &*r.host,
                    "address": r.address.to_string(),
                    "reason": r.reason,
                    "message": r.to_string(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let files: Vec<Value> = config
        .files
        .iter()
        .map(|f| json!({"path": f.path, "rejected": f.rejected, "findings": f.findings}))
        .collect();
    let dump = json!({
        "version": snapshot.version,
        "outbound_traffic_policy": mode_name(snapshot.outbound_mode()),
        "clusters": clusters,
        "warnings": snapshot.warnings,
        "dns_names": snapshot.dns_names,
        "config": {
            "path": config.path,
            "path_error": config.path_error,
            "files": files,
        },
    });
    serde_json::to_string_pretty(&config_dump::config_dump(resources, dump)).unwrap_or_default()
}

/// Envoy's `/clusters` text format: `cluster::host::stat::value`.
pub fn clusters(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    for name in ["BlackHoleCluster", "PassthroughCluster"] {
        let _ = writeln!(out, "{name}::default_priority::max_connections::4294967295");
    }
    let now = std::time::Instant::now();
    for c in snapshot.clusters.values() {
        let t = &c.breakers.thresholds;
        for (threshold, value) in [
            ("max_connections", t.max_connections),
            ("max_pending_requests", t.max_pending_requests),
            ("max_requests", t.max_requests),
            ("max_retries", t.max_retries),
        ] {
            let _ = writeln!(out, "{}::default_priority::{threshold}::{value}", c.name);
        }
        for e in &c.endpoints {
            let host = e.display();
            let _ = writeln!(out, "{}::{host}::rq_active::{}", c.name, e.state.active());
            let _ = writeln!(out, "{}::{host}::rq_total::{}", c.name, e.state.total());
            let _ = writeln!(out, "{}::{host}::weight::{}", c.name, e.weight);
            // Envoy's flag for an endpoint outlier detection ejected.
            let health = if e.state.outlier.ejected(now) {
                "/failed_outlier_check"
            } else {
                "healthy"
            };
            let _ = writeln!(out, "{}::{host}::health_flags::{health}", c.name);
        }
        // Answers that are not hosts of the cluster, listed beside them with why.
        for r in &c.dns_rejected {
            let _ = writeln!(out, "{}::{}::ssrf_guard::{r}", c.name, r.address);
        }
    }
    out
}

/// `/registry`: the services of the snapshot, their endpoints and health, as JSON for the
/// admin page.
pub fn registry(snapshot: &Snapshot) -> String {
    let now = std::time::Instant::now();
    let services: Vec<Value> = snapshot
        .services()
        .map(|c| {
            let endpoints: Vec<Value> = c
                .endpoints
                .iter()
                .map(|e| {
                    json!({
                        "address": e.display(),
                        "weight": e.weight,
                        "active_requests": e.state.active(),
                        "health": if e.state.outlier.ejected(now) { "failed_outlier_check" } else { "healthy" },
                    })
                })
                .collect();
            json!({
                "cluster": &*c.name,
                "host": &*c.host,
                "port": c.port,
                "protocol": protocol_name(c.protocol),
                "resolution": resolution_name(c.resolution),
                "endpoints": endpoints,
            })
        })
        .collect();
    let body = json!({
        "version": snapshot.version,
        "outbound_policy": mode_name(snapshot.outbound_mode()),
        "services": services,
    });
    format!("{body:#}\n")
}

/// One of a cluster's gauges that is read from the snapshot when stats are asked for.
pub struct ClusterGauge {
    /// The cluster's name.
    pub cluster: std::sync::Arc<str>,
    /// Envoy's stat name under the cluster (`membership_total`).
    pub stat: &'static str,
    /// Its value now.
    pub value: u64,
}

/// The gauges Envoy keeps per cluster that portcullis reads from the snapshot's live
/// endpoint states: members, active requests, open connections and, where outlier
/// detection is on, the endpoints ejected now (an ejection ends lazily, so only a count
/// taken now is right).
pub fn cluster_gauges(snapshot: &Snapshot) -> Vec<ClusterGauge> {
    let now = std::time::Instant::now();
    let mut out = Vec::with_capacity(snapshot.clusters.len() * 2);
    for c in snapshot.clusters.values() {
        let gauge = |stat, value| ClusterGauge {
            cluster: std::sync::Arc::clone(&c.name),
            stat,
            value,
        };
        out.push(gauge("membership_total", c.endpoints.len() as u64));
        out.push(gauge(
            "upstream_rq_active",
            c.endpoints.iter().map(|e| e.state.active()).sum(),
        ));
        out.push(gauge(
            "upstream_cx_active",
            c.endpoints
                .iter()
                .map(|e| u64::from(e.state.connections()))
                .sum(),
        ));
        if !c.dns_rejected.is_empty() {
            out.push(gauge(
                "ssrf_guard.dns_answers_rejected",
                c.dns_rejected.len() as u64,
            ));
        }
        if c.outlier.is_some() {
            let ejected = c
                .endpoints
                .iter()
                .filter(|e| e.state.outlier.ejected(now))
                .count();
            out.push(gauge("outlier_detection.ejections_active", ejected as u64));
        }
    }
    // istiod's two catch-all clusters, which Envoy lists with every other, have no
    // endpoints here: the data path handles their traffic without a cluster.
    for name in [
        portcullis_registry::BLACKHOLE_CLUSTER,
        portcullis_registry::PASSTHROUGH_CLUSTER,
    ] {
        if !snapshot.clusters.contains_key(name) {
            for stat in [
                "membership_total",
                "upstream_rq_active",
                "upstream_cx_active",
            ] {
                out.push(ClusterGauge {
                    cluster: name.into(),
                    stat,
                    value: 0,
                });
            }
        }
    }
    out
}

/// Envoy's `/stats` text: every counter and gauge as `name: value` sorted by name, then the
/// histograms as Envoy prints them. `extra` are counters kept outside the registry.
pub fn stats(snapshot: &Snapshot, registry: &Registry, extra: &[(String, u64)]) -> String {
    let mut stats: BTreeMap<String, String> = extra
        .iter()
        .map(|(name, value)| (name.clone(), value.to_string()))
        .collect();
    let gauges = cluster_gauges(snapshot);
    for g in &gauges {
        stats.insert(
            format!("cluster.{}.{}", g.cluster, g.stat),
            g.value.to_string(),
        );
    }
    for c in snapshot.clusters.values() {
        let total: u64 = c.endpoints.iter().map(|e| e.state.total()).sum();
        stats.insert(
            format!("cluster.{}.upstream_rq_total", c.name),
            total.to_string(),
        );
    }
    stats.insert(
        "server.registry_version".to_owned(),
        snapshot.version.to_string(),
    );
    let mut histograms = BTreeMap::new();
    exposition::envoy_stats(registry, &gauges, &mut stats, &mut histograms);
    let mut out = String::new();
    for (name, value) in stats.iter().chain(&histograms) {
        let _ = writeln!(out, "{name}: {value}");
    }
    out
}

/// `/server_info`.
pub fn server_info(ready: bool, uptime: Duration) -> String {
    let info = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "state": if ready { "LIVE" } else { "PRE_INITIALIZING" },
        "uptime_current_epoch": format!("{}s", uptime.as_secs()),
        "node": {"user_agent_name": "portcullis"},
    });
    serde_json::to_string_pretty(&info).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use portcullis_envoy::{Cluster, Discovery, Resources, Thresholds};
    use portcullis_registry::Snapshot;

    use super::*;

    #[test]
    fn clusters_show_each_clusters_own_thresholds() {
        let mut limited = Cluster::new("outbound|80||api.example.com", Discovery::Static);
        limited.circuit_breakers = Thresholds {
            max_connections: 1,
            max_pending_requests: 2,
            max_requests: 3,
            max_retries: 4,
        };
        let mut resources = Resources::default();
        resources
            .clusters
            .insert(limited.name.clone(), Arc::new(limited));
        let text = clusters(&Snapshot::index(&resources, &|_| None, None, 1));
        for line in [
            "outbound|80||api.example.com::default_priority::max_connections::1",
            "outbound|80||api.example.com::default_priority::max_pending_requests::2",
            "outbound|80||api.example.com::default_priority::max_requests::3",
            "outbound|80||api.example.com::default_priority::max_retries::4",
            "PassthroughCluster::default_priority::max_connections::4294967295",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[test]
    fn rejected_dns_answers_show_with_their_reason() {
        use portcullis_envoy::{
            ClusterLoadAssignment, EndpointAddress, LbEndpoint, LocalityLbEndpoints,
        };
        let name = "outbound|80||metadata.example.com";
        let mut c = Cluster::new(name, Discovery::StrictDns);
        c.ssrf_guard = Some(Vec::new());
        c.load_assignment = Some(ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint::new(EndpointAddress::Name {
                    host: "metadata.example.com".into(),
                    port: 80,
                })],
                ..Default::default()
            }],
        });
        let mut resources = Resources::default();
        resources.clusters.insert(c.name.clone(), Arc::new(c));
        let answer: Arc<[std::net::IpAddr]> = Arc::new(["169.254.169.254".parse().unwrap()]);
        let snapshot = Snapshot::index(&resources, &|_| Some(Arc::clone(&answer)), None, 1);
        let line = format!(
            "{name}::169.254.169.254::ssrf_guard::DNS answer 169.254.169.254 for \"metadata.example.com\" is link-local (cloud metadata) (SSRF guard)"
        );
        let text = clusters(&snapshot);
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        let text = stats(&snapshot, &Registry::default(), &[]);
        let line = format!("cluster.{name}.ssrf_guard.dns_answers_rejected: 1");
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        let gauges = exposition::prometheus(&Registry::default(), &[], &cluster_gauges(&snapshot));
        assert!(gauges.contains(&format!(
            "envoy_cluster_ssrf_guard_dns_answers_rejected{{cluster_name=\"{name}\"}} 1"
        )));
    }

    #[test]
    fn stats_count_the_endpoints_ejected_now() {
        use portcullis_balance::outlier::{Detection, Outcome};
        use portcullis_envoy::{
            ClusterLoadAssignment, EndpointAddress, LbEndpoint, LocalityLbEndpoints,
        };
        let name = "outbound|80||api.example.com";
        let mut c = Cluster::new(name, Discovery::Static);
        c.outlier_detection = Some(Box::default());
        c.load_assignment = Some(ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: ["10.0.0.1:80", "10.0.0.2:80"]
                    .iter()
                    .map(|a| LbEndpoint::new(EndpointAddress::Socket(a.parse().unwrap())))
                    .collect(),
                ..Default::default()
            }],
        });
        let plain = Cluster::new("outbound|81||plain.example.com", Discovery::Static);
        let mut resources = Resources::default();
        for c in [c, plain] {
            resources.clusters.insert(c.name.clone(), Arc::new(c));
        }
        let snapshot = Snapshot::index(&resources, &|_| None, None, 1);
        let cluster = snapshot.clusters.get(name).unwrap();
        let detection = Detection {
            consecutive_5xx: Some(1),
            ..Detection::default()
        };
        let now = std::time::Instant::now();
        assert!(
            cluster.endpoints[0]
                .state
                .outlier
                .report(&detection, Outcome::Status(500), now, || true)
                .is_some()
        );
        let text = stats(&snapshot, &Registry::default(), &[]);
        for line in [
            "cluster.outbound|80||api.example.com.outlier_detection.ejections_active: 1",
            "cluster.outbound|80||api.example.com.membership_total: 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        // Only clusters with outlier detection have the gauge, as in Envoy.
        assert!(
            !text.contains("plain.example.com.outlier_detection"),
            "{text}"
        );
        let exposed =
            crate::exposition::prometheus(&Registry::default(), &[], &cluster_gauges(&snapshot));
        assert!(
            exposed.contains(
                "# TYPE envoy_cluster_outlier_detection_ejections_active gauge\n\
                 envoy_cluster_outlier_detection_ejections_active{cluster_name=\"outbound|80||api.example.com\"} 1\n"
            ),
            "{exposed}"
        );
    }
}
