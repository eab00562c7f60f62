//! A set of resources as an Envoy bootstrap with static resources: what `portcullis
//! compile` prints and real Envoy loads with `envoy -c FILE`. A static bootstrap has no
//! xDS to fetch from, so route tables named over RDS are written inline into their
//! connection managers and EDS clusters become STATIC ones with their endpoints.

use std::net::SocketAddr;

use serde_json::{Value, json};

use crate::json::{cluster, listener, load_assignment, route_configuration};
use crate::{ClusterLoadAssignment, Discovery, Resources};

/// Why a set of resources cannot be written as a bootstrap.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// A connection manager names a route table the set does not have.
    #[error("listener {listener} uses route table {routes}, which is not defined")]
    MissingRoutes {
        /// The listener.
        listener: String,
        /// The route table's name.
        routes: String,
    },
}

/// The bootstrap: `resources` as static resources, and the admin server on `admin`.
pub fn bootstrap(resources: &Resources, admin: SocketAddr) -> Result<Value, BootstrapError> {
    let mut listeners = Vec::with_capacity(resources.listeners.len());
    for l in resources.listeners.values() {
        let mut value = listener(l);
        inline_routes(&mut value, resources, &l.name)?;
        listeners.push(value);
    }
    let clusters: Vec<Value> = resources
        .clusters
        .values()
        .map(|c| {
            let mut value = cluster(c);
            if let Discovery::Eds { service_name } = &c.discovery
                && let Some(o) = value.as_object_mut()
            {
                let assignment = resources.endpoints.get(service_name).map_or_else(
                    || {
                        load_assignment(&ClusterLoadAssignment {
                            cluster_name: c.name.clone(),
                            endpoints: Vec::new(),
                        })
                    },
                    |a| load_assignment(a),
                );
                o.remove("eds_cluster_config");
                o.insert("type".into(), json!("STATIC"));
                o.insert("load_assignment".into(), assignment);
            }
            value
        })
        .collect();
    Ok(json!({
        "admin": {"address": {"socket_address": {
            "address": admin.ip().to_string(),
            "port_value": admin.port(),
        }}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }))
}

/// Replaces every `rds` of the connection managers in a rendered listener by the route
/// table it names.
fn inline_routes(
    listener: &mut Value,
    resources: &Resources,
    name: &str,
) -> Result<(), BootstrapError> {
    let mut chains: Vec<&mut Value> = Vec::new();
    let Some(o) = listener.as_object_mut() else {
        return Ok(());
    };
    for (key, value) in o.iter_mut() {
        match (key.as_str(), value) {
            ("filter_chains", Value::Array(list)) => chains.extend(list.iter_mut()),
            ("default_filter_chain", chain) => chains.push(chain),
            _ => {}
        }
    }
    for chain in chains {
        let filters = chain.get_mut("filters").and_then(Value::as_array_mut);
        for filter in filters.into_iter().flatten() {
            let Some(config) = filter
                .get_mut("typed_config")
                .and_then(Value::as_object_mut)
            else {
                continue;
            };
            let Some(rds) = config.remove("rds") else {
                continue;
            };
            let routes = rds["route_config_name"].as_str().unwrap_or_default();
            let table =
                resources
                    .routes
                    .get(routes)
                    .ok_or_else(|| BootstrapError::MissingRoutes {
                        listener: name.to_string(),
                        routes: routes.to_string(),
                    })?;
            config.insert("route_config".into(), route_configuration(table));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use std::time::Duration;

    use super::*;
    use crate::{
        Cluster, FilterChain, FilterChainMatch, HttpConnectionManager, LbPolicy, Listener,
        NetworkFilter, RouteConfiguration, RouteSource, Thresholds, UpstreamProtocol,
        UpstreamTransport,
    };

    fn http_listener(routes: &str) -> Listener {
        Listener {
            name: "0.0.0.0_80".into(),
            address: "0.0.0.0:80".parse().unwrap(),
            bind_to_port: false,
            use_original_dst: false,
            listener_filters: Vec::new(),
            filter_chains: vec![FilterChain {
                name: String::new(),
                filter_chain_match: FilterChainMatch::default(),
                filter: NetworkFilter::Http(HttpConnectionManager {
                    stat_prefix: "outbound_0.0.0.0_80".into(),
                    route_config: RouteSource::Rds(routes.into()),
                    stream_idle_timeout: None,
                    request_timeout: None,
                    accept_http_10: false,
                    skipped_filters: Vec::new(),
                }),
                skipped_filters: Vec::new(),
                transport_socket: None,
            }],
            default_filter_chain: None,
        }
    }

    #[test]
    fn route_tables_are_inlined_and_eds_clusters_made_static() {
        let mut r = Resources::default();
        r.listeners
            .insert("0.0.0.0_80".into(), Arc::new(http_listener("80")));
        r.routes.insert(
            "80".into(),
            Arc::new(RouteConfiguration {
                name: "80".into(),
                ..RouteConfiguration::default()
            }),
        );
        r.clusters.insert(
            "outbound|80||a".into(),
            Arc::new(Cluster {
                name: "outbound|80||a".into(),
                discovery: Discovery::Eds {
                    service_name: "outbound|80||a".into(),
                },
                lb_policy: LbPolicy::LeastRequest,
                connect_timeout: Duration::from_secs(10),
                upstream_protocol: UpstreamProtocol::Http1,
                circuit_breakers: Thresholds::default(),
                connection_limits: crate::ConnectionLimits::default(),
                outlier_detection: None,
                healthy_panic_threshold: None,
                locality_weighted: false,
                slow_start: None,
                load_assignment: None,
                transport: UpstreamTransport::Plaintext,
                transport_socket_matches: Vec::new(),
                dns_refresh_rate: None,
                source: None,
            }),
        );
        let v = bootstrap(&r, "127.0.0.1:15000".parse().unwrap()).unwrap();
        assert_eq!(
            v["admin"]["address"]["socket_address"],
            json!({"address": "127.0.0.1", "port_value": 15000})
        );
        let hcm = &v["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
        assert!(hcm.get("rds").is_none());
        assert_eq!(hcm["route_config"]["name"], json!("80"));
        let c = &v["static_resources"]["clusters"][0];
        assert_eq!(c["type"], json!("STATIC"));
        assert!(c.get("eds_cluster_config").is_none());
        assert_eq!(
            c["load_assignment"],
            json!({"cluster_name": "outbound|80||a"})
        );
    }

    #[test]
    fn a_route_table_that_is_not_there_is_an_error() {
        let mut r = Resources::default();
        r.listeners
            .insert("0.0.0.0_80".into(), Arc::new(http_listener("81")));
        let err = bootstrap(&r, "127.0.0.1:15000".parse().unwrap()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "listener 0.0.0.0_80 uses route table 81, which is not defined"
        );
    }
}
