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
        .iter()
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
    for c in &snapshot.clusters {
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
    for c in &snapshot.clusters {
        let active: u64 = c.endpoints.iter().map(|e| e.state.active()).sum();
        let total: u64 = c.endpoints.iter().map(|e| e.state.total()).sum();
        let name = &c.name;
        stats.insert(
            format!("cluster.{name}.membership_total"),
            c.endpoints.len().to_string(),
        );
        stats.insert(
            format!("cluster.{name}.upstream_rq_active"),
            active.to_string(),
        );
        stats.insert(
            format!("cluster.{name}.upstream_rq_total"),
            total.to_string(),
        );
    }
    stats.insert(
        "server.registry_version".to_owned(),
        snapshot.version.to_string(),
    );
    let mut histograms = BTreeMap::new();
    exposition::envoy_stats(registry, &mut stats, &mut histograms);
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
}
