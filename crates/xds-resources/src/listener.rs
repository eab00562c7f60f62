//! LDS: `Listener` into the model.

use std::collections::HashSet;
use std::time::Duration;

use envoy_types::pb::envoy::config::listener::v3 as lds;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp;
use envoy_types::pb::google::protobuf::Any;
use portcullis_envoy::{
    ClusterSpecifier, FilterChain, FilterChainMatch, HttpConnectionManager, Listener,
    NetworkFilter, RouteSource, TcpProxy, WeightedCluster,
};
use prost::Name;

use crate::common::{
    At, Invalid, cidr, duration, each, ip_socket_address, port, timeout_or, unpack,
};
use crate::route;

const LISTENER_FILTERS: [&str; 3] = [
    "envoy.filters.listener.original_dst",
    "envoy.filters.listener.tls_inspector",
    "envoy.filters.listener.http_inspector",
];

/// Envoy's default idle timeout of a TCP proxy session.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Envoy's default idle timeout of an HTTP stream.
const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Converts a listener.
pub fn listener(l: &lds::Listener) -> Result<Listener, Invalid> {
    let address = ip_socket_address(l.address.as_ref()).at("address")?;
    if l.api_listener.is_some() {
        return Err(Invalid::new(
            "api_listener",
            "API listeners are not supported",
        ));
    }
    if l.filter_chain_matcher.is_some() {
        return Err(Invalid::new(
            "filter_chain_matcher",
            "the unified matcher API is not supported; use filter_chain_match",
        ));
    }
    let listener_filters = each("listener_filters", &l.listener_filters, |f| {
        if LISTENER_FILTERS.contains(&f.name.as_str()) {
            Ok(f.name.clone())
        } else {
            Err(Invalid::new(
                "name",
                format!("unsupported listener filter {}", f.name),
            ))
        }
    })?;
    let filter_chains = each("filter_chains", &l.filter_chains, filter_chain)?;
    let default_filter_chain = l
        .default_filter_chain
        .as_ref()
        .map(filter_chain)
        .transpose()
        .at("default_filter_chain")?;
    if filter_chains.is_empty() && default_filter_chain.is_none() {
        return Err(Invalid::new("filter_chains", "no filter chains specified"));
    }
    // Envoy 1.40 rejects a listener where one connection could match two chains equally.
    for (i, c) in filter_chains.iter().enumerate() {
        let m = &c.filter_chain_match;
        if let Some(j) = filter_chains[..i]
            .iter()
            .position(|earlier| overlaps(&earlier.filter_chain_match, m))
        {
            return Err(Invalid::new(
                format!("filter_chains[{i}].filter_chain_match"),
                format!(
                    "multiple filter chains with overlapping matching rules are defined (filter_chains[{j}])"
                ),
            ));
        }
    }
    Ok(Listener {
        name: l.name.clone(),
        address,
        bind_to_port: l.bind_to_port.as_ref().is_none_or(|b| b.value),
        use_original_dst: l.use_original_dst.as_ref().is_some_and(|b| b.value),
        listener_filters,
        filter_chains,
        default_filter_chain,
    })
}

fn filter_chain(c: &lds::FilterChain) -> Result<FilterChain, Invalid> {
    if let Some(ts) = &c.transport_socket {
        return Err(Invalid::new(
            "transport_socket",
            format!(
                "terminating downstream TLS ({}) is not supported on the outbound side",
                ts.name
            ),
        ));
    }
    let filter_chain_match = c
        .filter_chain_match
        .as_ref()
        .map(chain_match)
        .transpose()
        .at("filter_chain_match")?
        .unwrap_or_default();
    let mut skipped_filters = Vec::new();
    let mut terminal = None;
    for (i, f) in c.filters.iter().enumerate() {
        let field = format!("filters[{i}]");
        if terminal.is_some() {
            return Err(Invalid::new(
                field,
                format!("filter {} follows the terminal filter", f.name),
            ));
        }
        let Some(lds::filter::ConfigType::TypedConfig(any)) = &f.config_type else {
            return Err(Invalid::new(
                format!("{field}.config_discovery"),
                format!("filter {} has no typed_config", f.name),
            ));
        };
        match network_filter(any).at(format_args!("{field}.typed_config"))? {
            Some(filter) => terminal = Some(filter),
            None if skippable_network_filter(&f.name, &any.type_url) => {
                skipped_filters.push(f.name.clone());
            }
            None => {
                return Err(Invalid::new(
                    field,
                    format!("unsupported network filter {} ({})", f.name, any.type_url),
                ));
            }
        }
    }
    let filter = terminal.ok_or_else(|| {
        Invalid::new(
            "filters",
            "no terminal filter (tcp_proxy or http_connection_manager)",
        )
    })?;
    Ok(FilterChain {
        name: c.name.clone(),
        filter_chain_match,
        filter,
        skipped_filters,
        transport_socket: None,
    })
}

/// Istio's telemetry and peer-metadata filters: they observe, they do not decide where
/// bytes go, so skipping them keeps the chain's meaning.
fn skippable_network_filter(name: &str, type_url: &str) -> bool {
    name.starts_with("istio.")
        || name == "envoy.filters.network.wasm"
        || name == "envoy.filters.network.metadata_exchange"
        || name == "envoy.filters.network.peer_metadata"
        || type_url.ends_with("envoy.extensions.filters.network.wasm.v3.Wasm")
        || type_url.ends_with("/stats.PluginConfig")
        || type_url.contains("metadata_exchange")
        || type_url.contains("metadataexchange")
        || type_url.contains("peer_metadata")
}

/// Whether some connection matches both, criterion by criterion: Envoy keys each value of
/// a list (and "any" for an empty one) separately, so lists overlap when they share a value.
fn overlaps(a: &FilterChainMatch, b: &FilterChainMatch) -> bool {
    fn share<T: PartialEq>(a: &[T], b: &[T]) -> bool {
        (a.is_empty() && b.is_empty()) || a.iter().any(|x| b.contains(x))
    }
    a.destination_port == b.destination_port
        && a.transport_protocol == b.transport_protocol
        && share(&a.prefix_ranges, &b.prefix_ranges)
        && share(&a.source_prefix_ranges, &b.source_prefix_ranges)
        && share(&a.server_names, &b.server_names)
        && share(&a.application_protocols, &b.application_protocols)
}

fn chain_match(m: &lds::FilterChainMatch) -> Result<FilterChainMatch, Invalid> {
    let unsupported = [
        (!m.address_suffix.is_empty(), "address_suffix"),
        (m.suffix_len.is_some(), "suffix_len"),
        (
            !m.direct_source_prefix_ranges.is_empty(),
            "direct_source_prefix_ranges",
        ),
        (m.source_type != 0, "source_type"),
        (!m.source_ports.is_empty(), "source_ports"),
    ];
    if let Some((_, field)) = unsupported.iter().find(|(set, _)| *set) {
        return Err(Invalid::new(*field, "not supported"));
    }
    let destination_port = m
        .destination_port
        .map(|p| port("destination_port", p.value))
        .transpose()?;
    if destination_port == Some(0) {
        return Err(Invalid::new("destination_port", "must be at least 1"));
    }
    Ok(FilterChainMatch {
        destination_port,
        prefix_ranges: each("prefix_ranges", &m.prefix_ranges, cidr)?,
        source_prefix_ranges: each("source_prefix_ranges", &m.source_prefix_ranges, cidr)?,
        server_names: m
            .server_names
            .iter()
            .map(|s| s.to_ascii_lowercase())
            .collect(),
        transport_protocol: (!m.transport_protocol.is_empty())
            .then(|| m.transport_protocol.clone()),
        application_protocols: m.application_protocols.clone(),
    })
}

/// The terminal filter a typed config stands for, or `None` for a non-terminal one.
fn network_filter(any: &Any) -> Result<Option<NetworkFilter>, Invalid> {
    if any.type_url == tcp::TcpProxy::type_url() {
        Ok(Some(NetworkFilter::TcpProxy(tcp_proxy(&unpack(any)?)?)))
    } else if any.type_url == hcm::HttpConnectionManager::type_url() {
        Ok(Some(NetworkFilter::Http(Box::new(
            http_connection_manager(&unpack(any)?)?,
        ))))
    } else {
        Ok(None)
    }
}

fn tcp_proxy(t: &tcp::TcpProxy) -> Result<TcpProxy, Invalid> {
    use tcp::tcp_proxy::ClusterSpecifier as S;
    let cluster = match &t.cluster_specifier {
        Some(S::Cluster(name)) if !name.is_empty() => ClusterSpecifier::Cluster(name.clone()),
        Some(S::Cluster(_)) => return Err(Invalid::new("cluster", "must not be empty")),
        Some(S::WeightedClusters(w)) => {
            let clusters = each("weighted_clusters.clusters", &w.clusters, |c| {
                if c.name.is_empty() {
                    return Err(Invalid::new("name", "must not be empty"));
                }
                // Envoy's validation: each weight of a TCP proxy is at least 1.
                if c.weight == 0 {
                    return Err(Invalid::new("weight", "must be at least 1"));
                }
                Ok(WeightedCluster::new(c.name.clone(), c.weight))
            })?;
            ClusterSpecifier::Weighted(route::checked_weights(clusters).at("weighted_clusters")?)
        }
        None => return Err(Invalid::new("cluster_specifier", "a cluster is required")),
    };
    if t.tunneling_config.is_some() {
        return Err(Invalid::new("tunneling_config", "not supported"));
    }
    Ok(TcpProxy {
        stat_prefix: t.stat_prefix.clone(),
        cluster,
        idle_timeout: timeout_or(
            "idle_timeout",
            t.idle_timeout.as_ref(),
            Some(TCP_IDLE_TIMEOUT),
        )?,
        max_downstream_connection_duration: t
            .max_downstream_connection_duration
            .as_ref()
            .map(|d| at_least_a_millisecond("max_downstream_connection_duration", d))
            .transpose()?,
    })
}

/// A duration Envoy's validation requires to be at least 1 ms.
fn at_least_a_millisecond(
    field: &str,
    d: &envoy_types::pb::google::protobuf::Duration,
) -> Result<Duration, Invalid> {
    let d = duration(field, d)?;
    if d < Duration::from_millis(1) {
        return Err(Invalid::new(field, "must be at least 1ms"));
    }
    Ok(d)
}

fn http_connection_manager(
    h: &hcm::HttpConnectionManager,
) -> Result<HttpConnectionManager, Invalid> {
    use hcm::http_connection_manager::RouteSpecifier as R;
    let route_config = match &h.route_specifier {
        Some(R::Rds(rds)) if !rds.route_config_name.is_empty() => {
            RouteSource::Rds(rds.route_config_name.clone())
        }
        Some(R::Rds(_)) => {
            return Err(Invalid::new("rds.route_config_name", "must not be empty"));
        }
        Some(R::RouteConfig(rc)) => {
            RouteSource::Inline(route::route_configuration(rc).at("route_config")?)
        }
        Some(R::ScopedRoutes(_)) => {
            return Err(Invalid::new(
                "scoped_routes",
                "scoped routes are not supported",
            ));
        }
        None => {
            return Err(Invalid::new(
                "route_specifier",
                "rds or route_config is required",
            ));
        }
    };
    let mut skipped_filters = Vec::new();
    let mut router_last = false;
    for (i, f) in h.http_filters.iter().enumerate() {
        let is_router = f.name == "envoy.filters.http.router"
            || matches!(&f.config_type, Some(hcm::http_filter::ConfigType::TypedConfig(any))
                if any.type_url.ends_with("envoy.extensions.filters.http.router.v3.Router"));
        if is_router {
            router_last = i + 1 == h.http_filters.len();
            if !router_last {
                return Err(Invalid::new(
                    format!("http_filters[{i}]"),
                    "the router must be the last HTTP filter",
                ));
            }
        } else if f.disabled || f.is_optional || skippable_http_filter(&f.name) {
            skipped_filters.push(f.name.clone());
        } else {
            return Err(Invalid::new(
                format!("http_filters[{i}]"),
                format!("unsupported HTTP filter {}", f.name),
            ));
        }
    }
    if !router_last {
        return Err(Invalid::new(
            "http_filters",
            "the last HTTP filter must be the router",
        ));
    }
    let accept_http_10 = h
        .http_protocol_options
        .as_ref()
        .is_some_and(|o| o.accept_http_10);
    Ok(HttpConnectionManager {
        stat_prefix: h.stat_prefix.clone(),
        route_config,
        stream_idle_timeout: timeout_or(
            "stream_idle_timeout",
            h.stream_idle_timeout.as_ref(),
            Some(STREAM_IDLE_TIMEOUT),
        )?,
        request_timeout: timeout_or("request_timeout", h.request_timeout.as_ref(), None)?,
        accept_http_10,
        skipped_filters,
    })
}

/// Istio's HTTP filters that observe or add features outbound egress does not need
/// (telemetry, peer metadata, CORS, fault injection, gRPC stats): skipped with a note.
fn skippable_http_filter(name: &str) -> bool {
    const SKIPPED: [&str; 6] = [
        "envoy.filters.http.wasm",
        "envoy.filters.http.cors",
        "envoy.filters.http.fault",
        "envoy.filters.http.grpc_stats",
        "envoy.filters.http.peer_metadata",
        "envoy.filters.http.metadata_exchange",
    ];
    name.starts_with("istio.") || SKIPPED.contains(&name)
}

/// Names of the route configurations a listener needs over RDS.
pub fn rds_names(l: &Listener) -> HashSet<&str> {
    l.filter_chains
        .iter()
        .chain(l.default_filter_chain.as_ref())
        .filter_map(|c| match &c.filter {
            NetworkFilter::Http(h) => match &h.route_config {
                RouteSource::Rds(name) => Some(name.as_str()),
                RouteSource::Inline(_) => None,
            },
            NetworkFilter::TcpProxy(_) => None,
        })
        .collect()
}
