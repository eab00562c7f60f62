//! `/config_dump` in Envoy's `ConfigDump` shape, from a config source's resources whatever
//! the source (xDS or files).

use std::time::SystemTime;

use portcullis_envoy::state::{ResourceState, SourceState, UpdateFailure, Versioned};
use portcullis_envoy::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, Named, ROUTE_TYPE, json};
use serde_json::{Map, Value, json};

const ADMIN: &str = "type.googleapis.com/envoy.admin.v3.";

fn timestamp(t: SystemTime) -> Value {
    json!(humantime::format_rfc3339_millis(t).to_string())
}

/// A resource rendered with its `@type` first, as Envoy dumps an `Any`.
fn typed(type_url: &str, value: Value) -> Value {
    let mut o = Map::new();
    o.insert("@type".into(), json!(type_url));
    if let Value::Object(fields) = value {
        o.extend(fields);
    }
    Value::Object(o)
}

/// Envoy's `UpdateFailureState`. The failed configuration could not be converted, so it
/// is shown by its type and name only.
fn error_state(name: &str, e: &UpdateFailure) -> Value {
    let mut o = Map::new();
    o.insert(
        "failed_configuration".into(),
        json!({"@type": e.type_url, "name": name}),
    );
    o.insert(
        "last_update_attempt".into(),
        timestamp(e.last_update_attempt),
    );
    o.insert("details".into(), json!(e.details));
    if !e.version.is_empty() {
        o.insert("version_info".into(), json!(e.version));
    }
    Value::Object(o)
}

/// One `{version_info, KEY: resource, last_updated}` entry.
fn state<T>(
    key: &str,
    type_url: &str,
    v: &Versioned<T>,
    render: fn(&T) -> Value,
) -> Map<String, Value> {
    let mut o = Map::new();
    o.insert("version_info".into(), json!(v.version));
    o.insert(key.into(), typed(type_url, render(&v.resource)));
    o.insert("last_updated".into(), timestamp(v.last_updated));
    o
}

/// The version of the latest accepted resource of a type: the type's `version_info`.
fn latest_version<T: Clone>(m: &Named<ResourceState<T>>) -> Value {
    m.values()
        .filter_map(|s| s.active.as_ref())
        .max_by_key(|v| v.last_updated)
        .map_or(Value::Null, |v| json!(v.version))
}

/// Envoy's `DynamicCluster`/`DynamicRouteConfig`/`DynamicEndpointConfig` list: the active
/// version of each resource (or only its error when none was ever accepted), and the
/// warming versions in a second list.
fn dynamic<T: Clone>(
    m: &Named<ResourceState<T>>,
    key: &str,
    type_url: &str,
    render: fn(&T) -> Value,
) -> (Vec<Value>, Vec<Value>) {
    let mut active = Vec::new();
    let mut warming = Vec::new();
    for (name, s) in m {
        let mut entry = s
            .active
            .as_ref()
            .map(|v| state(key, type_url, v, render))
            .unwrap_or_default();
        if let Some(e) = &s.error {
            entry.insert("error_state".into(), error_state(name, e));
        }
        if !entry.is_empty() {
            active.push(Value::Object(entry));
        }
        if let Some(w) = &s.warming {
            warming.push(Value::Object(state(key, type_url, w, render)));
        }
    }
    (active, warming)
}

/// Envoy's `ConfigDump`: clusters, listeners, routes and endpoints with versions,
/// last-updated times, warming and error states; `extra` goes under `portcullis`,
/// portcullis's own view (config files and their findings, the registry).
pub fn config_dump(source: &SourceState, extra: Value) -> Value {
    let (clusters, warming_clusters) =
        dynamic(&source.clusters, "cluster", CLUSTER_TYPE, json::cluster);
    let (routes, _) = dynamic(
        &source.routes,
        "route_config",
        ROUTE_TYPE,
        json::route_configuration,
    );
    let (endpoints, _) = dynamic(
        &source.endpoints,
        "endpoint_config",
        ENDPOINT_TYPE,
        json::load_assignment,
    );
    let listeners: Vec<Value> = source
        .listeners
        .iter()
        .map(|(name, s)| {
            let mut o = Map::new();
            o.insert("name".into(), json!(name));
            let listener_state = |v: &Versioned<_>| {
                Value::Object(state("listener", LISTENER_TYPE, v, json::listener))
            };
            if let Some(v) = &s.active {
                o.insert("active_state".into(), listener_state(v));
            }
            if let Some(v) = &s.warming {
                o.insert("warming_state".into(), listener_state(v));
            }
            if let Some(e) = &s.error {
                o.insert("error_state".into(), error_state(name, e));
            }
            Value::Object(o)
        })
        .collect();
    let configs = vec![
        json!({
            "@type": format!("{ADMIN}ClustersConfigDump"),
            "version_info": latest_version(&source.clusters),
            "dynamic_active_clusters": clusters,
            "dynamic_warming_clusters": warming_clusters,
        }),
        json!({
            "@type": format!("{ADMIN}ListenersConfigDump"),
            "version_info": latest_version(&source.listeners),
            "dynamic_listeners": listeners,
        }),
        json!({
            "@type": format!("{ADMIN}RoutesConfigDump"),
            "dynamic_route_configs": routes,
        }),
        json!({
            "@type": format!("{ADMIN}EndpointsConfigDump"),
            "dynamic_endpoint_configs": endpoints,
        }),
    ];
    json!({"configs": configs, "portcullis": extra})
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use portcullis_envoy::state::{ResourceState, UpdateFailure, Versioned};
    use portcullis_envoy::{
        Cluster, ClusterLoadAssignment, Discovery, LbPolicy, Thresholds, UpstreamProtocol,
        UpstreamTransport,
    };

    use super::*;

    fn versioned<T>(resource: T, version: &str) -> Versioned<T> {
        Versioned {
            resource: resource.into(),
            version: version.into(),
            last_updated: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        }
    }

    fn eds(name: &str) -> Cluster {
        Cluster {
            name: name.into(),
            discovery: Discovery::Eds {
                service_name: name.into(),
            },
            lb_policy: LbPolicy::LeastRequest,
            connect_timeout: Duration::from_secs(10),
            upstream_protocol: UpstreamProtocol::Http1,
            circuit_breakers: Thresholds::default(),
            connection_limits: Default::default(),
            outlier_detection: None,
            healthy_panic_threshold: None,
            locality_weighted: false,
            slow_start: None,
            load_assignment: None,
            transport: UpstreamTransport::Plaintext,
            transport_socket_matches: Vec::new(),
            dns_refresh_rate: None,
            source: None,
            ssrf_guard: None,
        }
    }

    #[test]
    fn the_dump_has_envoys_shape_with_warming_and_error_states() {
        let app = "outbound|80||app.internal.com";
        let mut source = SourceState::default();
        source.clusters.insert(
            app.into(),
            ResourceState {
                active: Some(versioned(eds(app), "1")),
                warming: Some(versioned(eds(app), "2")),
                error: None,
            },
        );
        source.endpoints.insert(
            app.into(),
            ResourceState {
                active: Some(versioned(
                    ClusterLoadAssignment {
                        cluster_name: app.into(),
                        endpoints: Vec::new(),
                    },
                    "1",
                )),
                ..Default::default()
            },
        );
        source.listeners.insert(
            "0.0.0.0_80".into(),
            ResourceState {
                active: None,
                warming: None,
                error: Some(UpdateFailure {
                    type_url: LISTENER_TYPE.into(),
                    details: "filter_chains[0].filters[0]: unsupported network filter x".into(),
                    version: "3".into(),
                    last_update_attempt: SystemTime::UNIX_EPOCH,
                }),
            },
        );
        let dump = config_dump(&source, json!({"config": {"files": []}}));
        let configs = dump["configs"].as_array().unwrap();
        let clusters = &configs[0];
        assert_eq!(
            clusters["@type"],
            "type.googleapis.com/envoy.admin.v3.ClustersConfigDump"
        );
        assert_eq!(clusters["version_info"], "1");
        let active = &clusters["dynamic_active_clusters"][0];
        assert_eq!(active["version_info"], "1");
        assert_eq!(active["last_updated"], "2023-11-14T22:13:20.000Z");
        assert_eq!(active["cluster"]["@type"], CLUSTER_TYPE);
        assert_eq!(active["cluster"]["type"], "EDS");
        assert_eq!(clusters["dynamic_warming_clusters"][0]["version_info"], "2");
        let listener = &configs[1]["dynamic_listeners"][0];
        assert_eq!(listener["name"], "0.0.0.0_80");
        assert!(listener.get("active_state").is_none());
        assert_eq!(
            listener["error_state"],
            json!({
                "failed_configuration": {"@type": LISTENER_TYPE, "name": "0.0.0.0_80"},
                "last_update_attempt": "1970-01-01T00:00:00.000Z",
                "details": "filter_chains[0].filters[0]: unsupported network filter x",
                "version_info": "3",
            })
        );
        assert_eq!(
            configs[3]["dynamic_endpoint_configs"][0]["endpoint_config"]["cluster_name"],
            app
        );
        assert_eq!(dump["portcullis"]["config"]["files"], json!([]));
    }
}
