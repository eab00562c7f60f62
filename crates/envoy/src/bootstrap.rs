//! A set of resources as an Envoy bootstrap with static resources: what `portcullis
//! compile` prints and real Envoy loads with `envoy -c FILE`. A static bootstrap has no
//! xDS to fetch from, so route tables named over RDS are written inline into their
//! connection managers and EDS clusters become STATIC ones with their endpoints. Istio
//! mutual TLS takes its certificates over SDS from istio-agent's socket, as the bootstrap
//! istio-agent writes for Envoy does (`sds-grpc`).

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

/// istio-agent's SDS cluster, which serves the workload certificate (`default`) and the
/// mesh root (`ROOTCA`).
const SDS_CLUSTER: &str = "sds-grpc";

/// Where istio-agent serves SDS, relative to Envoy's working directory as in Istio's
/// bootstrap.
const SDS_SOCKET: &str = "./var/run/secrets/workload-spiffe-uds/socket";

/// How long Envoy waits for certificates before it starts without them. Istio's sidecar
/// waits for its agent without limit; a compiled bootstrap may run where no agent is, and
/// then starts after this, with connections needing the certificates failing, as
/// portcullis's do without `--istio-certs`.
const SDS_INITIAL_FETCH_TIMEOUT: &str = "1s";

/// The bootstrap: `resources` as static resources, and the admin server on `admin`.
pub fn bootstrap(resources: &Resources, admin: SocketAddr) -> Result<Value, BootstrapError> {
    let mut listeners = Vec::with_capacity(resources.listeners.len());
    for l in resources.listeners.values() {
        let mut value = listener(l);
        inline_routes(&mut value, resources, &l.name)?;
        listeners.push(value);
    }
    let mut clusters: Vec<Value> = resources
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
    let mut sds = false;
    for c in &mut clusters {
        sds |= sds_from_agent(c);
    }
    let mut out = json!({
        "admin": {"address": {"socket_address": {
            "address": admin.ip().to_string(),
            "port_value": admin.port(),
        }}},
    });
    if sds {
        clusters.push(json!({
            "name": SDS_CLUSTER,
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                },
            },
            "load_assignment": {
                "cluster_name": SDS_CLUSTER,
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": SDS_SOCKET}}}}]}],
            },
        }));
        // SDS needs a node; istio-agent names it after the pod, which a compiled folder
        // does not know.
        out["node"] = json!({"id": "sidecar~0.0.0.0~compiled.default~default.svc.cluster.local", "cluster": "compiled.default"});
    }
    out["static_resources"] = json!({"listeners": listeners, "clusters": clusters});
    Ok(out)
}

/// Points every SDS config source in `value` at istio-agent's socket; whether there was one.
fn sds_from_agent(value: &mut Value) -> bool {
    match value {
        Value::Object(o) => {
            let mut found = false;
            for (key, v) in o.iter_mut() {
                if key == "sds_config" {
                    *v = json!({
                        "api_config_source": {
                            "api_type": "GRPC",
                            "transport_api_version": "V3",
                            "set_node_on_first_message_only": true,
                            "grpc_services": [{"envoy_grpc": {"cluster_name": SDS_CLUSTER}}],
                        },
                        "initial_fetch_timeout": SDS_INITIAL_FETCH_TIMEOUT,
                        "resource_api_version": "V3",
                    });
                    found = true;
                } else {
                    found |= sds_from_agent(v);
                }
            }
            found
        }
        Value::Array(list) => {
            let mut found = false;
            for v in list {
                found |= sds_from_agent(v);
            }
            found
        }
        _ => false,
    }
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
                filter: NetworkFilter::Http(Box::new(HttpConnectionManager {
                    stat_prefix: "outbound_0.0.0.0_80".into(),
                    route_config: RouteSource::Rds(routes.into()),
                    stream_idle_timeout: None,
                    request_timeout: None,
                    accept_http_10: false,
                    skipped_filters: Vec::new(),
                })),
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
                ssrf_guard: None,
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
    fn istio_mutual_tls_takes_its_certificates_from_istio_agents_sds_socket() {
        let mut r = Resources::default();
        let mut c = Cluster::new("outbound|80||a", Discovery::Static);
        c.transport_socket_matches = vec![
            crate::TransportSocketMatch {
                name: "tlsMode-istio".into(),
                match_metadata: [("tlsMode".to_string(), "istio".to_string())].into(),
                transport: UpstreamTransport::IstioMutualTls(Arc::default()),
            },
            crate::TransportSocketMatch {
                name: "tlsMode-disabled".into(),
                match_metadata: Default::default(),
                transport: UpstreamTransport::Plaintext,
            },
        ];
        r.clusters.insert(c.name.clone(), Arc::new(c));
        let v = bootstrap(&r, "127.0.0.1:15000".parse().unwrap()).unwrap();
        let clusters = &v["static_resources"]["clusters"];
        let matches = &clusters[0]["transport_socket_matches"];
        let tls = &matches[0]["transport_socket"]["typed_config"]["common_tls_context"];
        let source = &tls["tls_certificate_sds_secret_configs"][0]["sds_config"];
        assert_eq!(
            source["api_config_source"]["grpc_services"][0]["envoy_grpc"]["cluster_name"],
            json!(SDS_CLUSTER)
        );
        assert_eq!(
            tls["combined_validation_context"]["validation_context_sds_secret_config"]["sds_config"],
            *source
        );
        assert_eq!(
            matches[1]["transport_socket"]["name"],
            json!("envoy.transport_sockets.raw_buffer")
        );
        assert_eq!(clusters[1]["name"], json!(SDS_CLUSTER));
        assert!(v["node"]["id"].is_string());
        // Without Istio mutual TLS, neither the agent's cluster nor a node.
        r.clusters
            .insert("b".into(), Arc::new(Cluster::new("b", Discovery::Static)));
        r.clusters.remove("outbound|80||a");
        let v = bootstrap(&r, "127.0.0.1:15000".parse().unwrap()).unwrap();
        assert!(v.get("node").is_none());
        assert_eq!(
            v["static_resources"]["clusters"].as_array().map(Vec::len),
            Some(1)
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
