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
                    load_assignment,
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
