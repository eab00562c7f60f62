//! CDS and EDS: `Cluster` and `ClusterLoadAssignment` into the model.

use std::sync::Arc;
use std::time::Duration;

use cds::cluster::common_lb_config::LocalityConfigSpecifier;
use envoy_types::pb::envoy::config::cluster::v3 as cds;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as eds;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as http_options;
use portcullis_envoy::{
    Cluster, ClusterLoadAssignment, ConnectionLimits, Discovery, EndpointAddress, HealthStatus,
    ISTIO_METADATA, LbEndpoint, LbPolicy, Locality, LocalityLbEndpoints, OriginalDst,
    OutlierDetection, RuntimeDouble, SlowStartConfig, TcpKeepalive, Thresholds,
    TransportSocketMatch, UpstreamProtocol, UpstreamTransport, WORKLOAD_KEY, WorkloadMetadata,
};
use prost::Name;

use crate::common::{
    At, Invalid, duration, each, filter_metadata, ip, socket_address, struct_text, unpack,
};
use crate::tls::Auto;

/// Envoy's default connect timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HTTP_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// Converts a cluster.
pub fn cluster(c: &cds::Cluster) -> Result<Cluster, Invalid> {
    use cds::cluster::{ClusterDiscoveryType as T, DiscoveryType as D, LbConfig};
    let kind = match &c.cluster_discovery_type {
        None => D::Static,
        Some(T::Type(t)) => {
            D::try_from(*t).map_err(|_| Invalid::new("type", format!("unknown type {t}")))?
        }
        Some(T::ClusterType(custom)) => {
            return Err(Invalid::new(
                "cluster_type",
                format!("custom cluster type {} is not supported", custom.name),
            ));
        }
    };
    let discovery = match kind {
        D::Static => Discovery::Static,
        D::StrictDns => Discovery::StrictDns,
        D::LogicalDns => Discovery::LogicalDns,
        D::Eds => Discovery::Eds {
            service_name: c
                .eds_cluster_config
                .as_ref()
                .map(|e| e.service_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| c.name.clone()),
        },
        D::OriginalDst => {
            let port_override = match &c.lb_config {
                Some(LbConfig::OriginalDstLbConfig(o)) => {
                    if o.use_http_header || o.metadata_key.is_some() {
                        return Err(Invalid::new(
                            "original_dst_lb_config",
                            "only upstream_port_override is supported",
                        ));
                    }
                    o.upstream_port_override
                        .map(|p| p.value)
                        .map(|p| {
                            crate::common::port("original_dst_lb_config.upstream_port_override", p)
                        })
                        .transpose()?
                }
                _ => None,
            };
            Discovery::OriginalDst(OriginalDst {
                port_override,
                allowed_destinations: None,
            })
        }
    };
    let lb_policy = lb_policy(c, &discovery)?;
    let connect_timeout = match &c.connect_timeout {
        Some(d) => duration("connect_timeout", d)?,
        None => CONNECT_TIMEOUT,
    };
    if connect_timeout.is_zero() {
        return Err(Invalid::new("connect_timeout", "must be greater than 0"));
    }
    let load_assignment = match (&discovery, &c.load_assignment) {
        (Discovery::Static | Discovery::StrictDns | Discovery::LogicalDns, Some(a)) => {
            let names = !matches!(discovery, Discovery::Static);
            Some(load_assignment(a, names).at("load_assignment")?)
        }
        _ => None,
    };
    if discovery == Discovery::LogicalDns {
        let endpoints = load_assignment.as_ref().map_or(0, |a| {
            a.endpoints
                .iter()
                .map(|g| g.lb_endpoints.len())
                .sum::<usize>()
        });
        if endpoints != 1 {
            return Err(Invalid::new(
                "load_assignment",
                "LOGICAL_DNS clusters must have a single locality_lb_endpoint and a single lb_endpoint",
            ));
        }
    }
    let auto = auto_tls(c)?;
    let transport = c
        .transport_socket
        .as_ref()
        .map(|t| transport_socket(t, auto))
        .transpose()
        .at("transport_socket")?
        .unwrap_or(UpstreamTransport::Plaintext);
    let transport_socket_matches = each(
        "transport_socket_matches",
        &c.transport_socket_matches,
        |m| {
            Ok(TransportSocketMatch {
                name: m.name.clone(),
                match_metadata: m
                    .r#match
                    .as_ref()
                    .map(|s| {
                        s.fields
                            .iter()
                            .map(|(k, v)| (k.clone(), struct_text(v)))
                            .collect()
                    })
                    .unwrap_or_default(),
                transport: m
                    .transport_socket
                    .as_ref()
                    .map(|t| transport_socket(t, auto))
                    .transpose()
                    .at("transport_socket")?
                    .unwrap_or(UpstreamTransport::Plaintext),
            })
        },
    )?;
    Ok(Cluster {
        name: c.name.clone(),
        lb_policy,
        connect_timeout,
        upstream_protocol: upstream_protocol(c)?,
        circuit_breakers: thresholds(c.circuit_breakers.as_ref()),
        connection_limits: connection_limits(c)?,
        outlier_detection: c
            .outlier_detection
            .as_ref()
            .map(outlier_detection)
            .transpose()
            .at("outlier_detection")?
            .map(Box::new),
        healthy_panic_threshold: c
            .common_lb_config
            .as_ref()
            .and_then(|l| l.healthy_panic_threshold.as_ref())
            .map(|p| p.value),
        locality_weighted: matches!(
            c.common_lb_config
                .as_ref()
                .and_then(|l| l.locality_config_specifier.as_ref()),
            Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(_))
        ),
        slow_start: slow_start(c, lb_policy)?.map(Box::new),
        load_assignment,
        transport,
        transport_socket_matches,
        #[allow(deprecated)]
        dns_refresh_rate: c
            .dns_refresh_rate
            .as_ref()
            .map(|d| duration("dns_refresh_rate", d))
            .transpose()?,
        source: filter_metadata(c.metadata.as_ref(), "istio")
            .remove("config")
            .map(Arc::from),
        ssrf_guard: None,
        discovery,
    })
}

/// The typed policy of `load_balancing_policy`: Envoy takes the first one it knows.
fn typed_lb_policy(p: &cds::LoadBalancingPolicy) -> Result<LbPolicy, Invalid> {
    const TYPED: [(&str, LbPolicy); 4] = [
        ("round_robin.v3.RoundRobin", LbPolicy::RoundRobin),
        ("least_request.v3.LeastRequest", LbPolicy::LeastRequest),
        ("random.v3.Random", LbPolicy::Random),
        (
            "cluster_provided.v3.ClusterProvided",
            LbPolicy::ClusterProvided,
        ),
    ];
    let type_urls = p
        .policies
        .iter()
        .filter_map(|p| p.typed_extension_config.as_ref()?.typed_config.as_ref())
        .map(|any| any.type_url.as_str());
    for type_url in type_urls.clone() {
        let known = TYPED.iter().find(|(suffix, _)| {
            type_url.strip_suffix(suffix)
                == Some("type.googleapis.com/envoy.extensions.load_balancing_policies.")
        });
        if let Some((_, policy)) = known {
            return Ok(*policy);
        }
    }
    Err(Invalid::new(
        "load_balancing_policy",
        format!(
            "none of the policies is supported: {}",
            type_urls.collect::<Vec<_>>().join(", ")
        ),
    ))
}

fn lb_policy(c: &cds::Cluster, discovery: &Discovery) -> Result<LbPolicy, Invalid> {
    use cds::cluster::LbPolicy as P;
    let policy = if let Some(typed) = &c.load_balancing_policy {
        typed_lb_policy(typed)?
    } else {
        match P::try_from(c.lb_policy) {
            Ok(P::RoundRobin) => LbPolicy::RoundRobin,
            Ok(P::LeastRequest) => LbPolicy::LeastRequest,
            Ok(P::Random) => LbPolicy::Random,
            Ok(P::ClusterProvided) => LbPolicy::ClusterProvided,
            Ok(P::RingHash) => ring_hash(c)?,
            Ok(P::Maglev) => maglev(c)?,
            Ok(other) => {
                return Err(Invalid::new(
                    "lb_policy",
                    format!("{} is not supported", other.as_str_name()),
                ));
            }
            Err(_) => {
                return Err(Invalid::new(
                    "lb_policy",
                    format!("unknown policy {}", c.lb_policy),
                ));
            }
        }
    };
    lb_config_fits(c, policy)?;
    // Envoy 1.40 pairs ORIGINAL_DST with CLUSTER_PROVIDED, both ways.
    let original_dst = matches!(discovery, Discovery::OriginalDst(_));
    if original_dst != (policy == LbPolicy::ClusterProvided) {
        return Err(Invalid::new(
            "lb_policy",
            "CLUSTER_PROVIDED is the only policy of an ORIGINAL_DST cluster and is valid for no other type",
        ));
    }
    Ok(policy)
}

/// Envoy's bound on both ring sizes.
const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;
/// Envoy's bound on the Maglev table size.
const MAX_MAGLEV_TABLE_SIZE: u64 = 5_000_011;

/// RING_HASH with `ring_hash_lb_config`: xxHash only (Envoy's default), sizes within
/// Envoy's bounds.
fn ring_hash(c: &cds::Cluster) -> Result<LbPolicy, Invalid> {
    use cds::cluster::LbConfig;
    use cds::cluster::ring_hash_lb_config::HashFunction;
    let config = match &c.lb_config {
        Some(LbConfig::RingHashLbConfig(r)) => Some(r),
        _ => None,
    };
    if config.is_some_and(|r| r.hash_function != HashFunction::XxHash as i32) {
        return Err(Invalid::new(
            "ring_hash_lb_config.hash_function",
            "only XX_HASH is supported",
        ));
    }
    let minimum = config
        .and_then(|r| r.minimum_ring_size)
        .map_or(LbPolicy::DEFAULT_MINIMUM_RING_SIZE, |v| v.value);
    let maximum = config
        .and_then(|r| r.maximum_ring_size)
        .map_or(LbPolicy::DEFAULT_MAXIMUM_RING_SIZE, |v| v.value);
    if minimum > MAX_RING_SIZE || maximum > MAX_RING_SIZE {
        return Err(Invalid::new(
            "ring_hash_lb_config",
            format!("ring sizes are at most {MAX_RING_SIZE}"),
        ));
    }
    if minimum > maximum {
        return Err(Invalid::new(
            "ring_hash_lb_config.minimum_ring_size",
            format!("{minimum} is above maximum_ring_size {maximum}"),
        ));
    }
    Ok(LbPolicy::RingHash {
        minimum_ring_size: minimum,
        maximum_ring_size: maximum,
    })
}

/// MAGLEV with `maglev_lb_config`: a prime table size, as Envoy requires.
fn maglev(c: &cds::Cluster) -> Result<LbPolicy, Invalid> {
    use cds::cluster::LbConfig;
    let table_size = match &c.lb_config {
        Some(LbConfig::MaglevLbConfig(m)) => m
            .table_size
            .map_or(LbPolicy::DEFAULT_MAGLEV_TABLE_SIZE, |v| v.value),
        _ => LbPolicy::DEFAULT_MAGLEV_TABLE_SIZE,
    };
    if table_size > MAX_MAGLEV_TABLE_SIZE || !portcullis_balance::is_prime(table_size) {
        return Err(Invalid::new(
            "maglev_lb_config.table_size",
            format!("{table_size} is not a prime of at most {MAX_MAGLEV_TABLE_SIZE}"),
        ));
    }
    Ok(LbPolicy::Maglev { table_size })
}

/// Refuses load-balancing settings the data path would not honour: a least-request
/// `choice_count` other than 2, consistent hashing by hostname or with bounded load.
fn lb_config_fits(c: &cds::Cluster, policy: LbPolicy) -> Result<(), Invalid> {
    use cds::cluster::LbConfig;
    if let (Some(LbConfig::LeastRequestLbConfig(l)), LbPolicy::LeastRequest) =
        (&c.lb_config, policy)
        && l.choice_count.is_some_and(|n| n.value != 2)
    {
        return Err(Invalid::new(
            "least_request_lb_config.choice_count",
            "only 2 choices are supported",
        ));
    }
    if let Some(h) = c
        .common_lb_config
        .as_ref()
        .and_then(|l| l.consistent_hashing_lb_config.as_ref())
    {
        if h.use_hostname_for_hashing {
            return Err(Invalid::new(
                "common_lb_config.consistent_hashing_lb_config.use_hostname_for_hashing",
                "not supported",
            ));
        }
        if h.hash_balance_factor.is_some() {
            return Err(Invalid::new(
                "common_lb_config.consistent_hashing_lb_config.hash_balance_factor",
                "not supported",
            ));
        }
    }
    if let Some(LocalityConfigSpecifier::ZoneAwareLbConfig(_)) = c
        .common_lb_config
        .as_ref()
        .and_then(|l| l.locality_config_specifier.as_ref())
    {
        return Err(Invalid::new(
            "common_lb_config.zone_aware_lb_config",
            "not supported",
        ));
    }
    Ok(())
}

/// The slow start of the policy's own `lb_config` (Envoy reads no other policy's); a zero
/// or missing window is none.
fn slow_start(c: &cds::Cluster, policy: LbPolicy) -> Result<Option<SlowStartConfig>, Invalid> {
    use cds::cluster::LbConfig;
    let (field, config) = match (&c.lb_config, policy) {
        (Some(LbConfig::RoundRobinLbConfig(r)), LbPolicy::RoundRobin) => {
            ("round_robin_lb_config", r.slow_start_config.as_ref())
        }
        (Some(LbConfig::LeastRequestLbConfig(l)), LbPolicy::LeastRequest) => {
            ("least_request_lb_config", l.slow_start_config.as_ref())
        }
        _ => return Ok(None),
    };
    let Some(config) = config else {
        return Ok(None);
    };
    let window = config
        .slow_start_window
        .as_ref()
        .map(|d| duration("slow_start_window", d))
        .transpose()
        .at(format!("{field}.slow_start_config"))?
        .unwrap_or_default();
    let min_weight_percent = config.min_weight_percent.as_ref().map(|p| p.value);
    if min_weight_percent.is_some_and(|p| !(0.0..=100.0).contains(&p)) {
        return Err(Invalid::new(
            format!("{field}.slow_start_config.min_weight_percent"),
            "must be from 0 to 100",
        ));
    }
    Ok((!window.is_zero()).then(|| SlowStartConfig {
        window,
        aggression: config.aggression.as_ref().map(|a| RuntimeDouble {
            default_value: a.default_value,
            runtime_key: a.runtime_key.clone(),
        }),
        min_weight_percent,
    }))
}

fn upstream_protocol(c: &cds::Cluster) -> Result<UpstreamProtocol, Invalid> {
    use http_options::http_protocol_options::{
        UpstreamProtocolOptions as U, explicit_http_config::ProtocolConfig as P,
    };
    let Some(any) = c.typed_extension_protocol_options.get(HTTP_OPTIONS) else {
        #[allow(deprecated)]
        let h2 = c.http2_protocol_options.is_some();
        return Ok(if h2 {
            UpstreamProtocol::Http2
        } else {
            UpstreamProtocol::Http1
        });
    };
    let field = format!("typed_extension_protocol_options[{HTTP_OPTIONS}]");
    let options: http_options::HttpProtocolOptions = unpack(any).at(&field)?;
    match options.upstream_protocol_options {
        Some(U::ExplicitHttpConfig(e)) => match e.protocol_config {
            Some(P::HttpProtocolOptions(_)) | None => Ok(UpstreamProtocol::Http1),
            Some(P::Http2ProtocolOptions(_)) => Ok(UpstreamProtocol::Http2),
            Some(P::Http3ProtocolOptions(_)) => {
                Err(Invalid::new(field, "HTTP/3 upstreams are not supported"))
            }
        },
        Some(U::UseDownstreamProtocolConfig(_)) => Ok(UpstreamProtocol::UseDownstream),
        Some(U::AutoConfig(_)) => Err(Invalid::new(field, "auto_config (ALPN) is not supported")),
        None => Ok(UpstreamProtocol::Http1),
    }
}

/// The consecutive-failure detectors of Envoy's outlier detection, Envoy's defaults for
/// what is unset. Success-rate and failure-percentage detection, which istiod turns off,
/// are refused when enforced.
fn outlier_detection(o: &cds::OutlierDetection) -> Result<OutlierDetection, Invalid> {
    let d = OutlierDetection::default();
    let or = |v: Option<u32>, default: u32| v.unwrap_or(default);
    let enforced =
        |field: &str, v: &Option<envoy_types::pb::google::protobuf::UInt32Value>, default: u32| {
            let v = v.as_ref().map_or(default, |v| v.value);
            if v > 0 {
                Err(Invalid::new(
                    field,
                    "only consecutive-failure detection is supported",
                ))
            } else {
                Ok(())
            }
        };
    enforced("enforcing_success_rate", &o.enforcing_success_rate, 100)?;
    enforced(
        "enforcing_failure_percentage",
        &o.enforcing_failure_percentage,
        0,
    )?;
    enforced(
        "enforcing_failure_percentage_local_origin",
        &o.enforcing_failure_percentage_local_origin,
        0,
    )?;
    if o.split_external_local_origin_errors {
        enforced(
            "enforcing_local_origin_success_rate",
            &o.enforcing_local_origin_success_rate,
            100,
        )?;
    }
    let time = |field: &str, v: &Option<envoy_types::pb::google::protobuf::Duration>, default| {
        v.as_ref().map_or(Ok(default), |v| duration(field, v))
    };
    Ok(OutlierDetection {
        consecutive_5xx: or(o.consecutive_5xx.map(|v| v.value), d.consecutive_5xx),
        enforcing_consecutive_5xx: or(
            o.enforcing_consecutive_5xx.map(|v| v.value),
            d.enforcing_consecutive_5xx,
        ),
        consecutive_gateway_failure: or(
            o.consecutive_gateway_failure.map(|v| v.value),
            d.consecutive_gateway_failure,
        ),
        enforcing_consecutive_gateway_failure: or(
            o.enforcing_consecutive_gateway_failure.map(|v| v.value),
            d.enforcing_consecutive_gateway_failure,
        ),
        split_external_local_origin_errors: o.split_external_local_origin_errors,
        consecutive_local_origin_failure: or(
            o.consecutive_local_origin_failure.map(|v| v.value),
            d.consecutive_local_origin_failure,
        ),
        enforcing_consecutive_local_origin_failure: or(
            o.enforcing_consecutive_local_origin_failure
                .map(|v| v.value),
            d.enforcing_consecutive_local_origin_failure,
        ),
        interval: time("interval", &o.interval, d.interval)?,
        base_ejection_time: time(
            "base_ejection_time",
            &o.base_ejection_time,
            d.base_ejection_time,
        )?,
        max_ejection_time: time(
            "max_ejection_time",
            &o.max_ejection_time,
            d.max_ejection_time,
        )?,
        max_ejection_percent: or(
            o.max_ejection_percent.map(|v| v.value),
            d.max_ejection_percent,
        ),
    })
}

/// The limits on each upstream connection: the HTTP protocol options'
/// `common_http_protocol_options` (idle timeout, requests and lifetime per connection) and
/// HTTP/2 `max_concurrent_streams`, and `upstream_connection_options.tcp_keepalive`.
fn connection_limits(c: &cds::Cluster) -> Result<ConnectionLimits, Invalid> {
    let mut limits = ConnectionLimits::default();
    #[allow(deprecated)]
    if let Some(h2) = &c.http2_protocol_options {
        limits.max_concurrent_streams = max_concurrent_streams(h2).at("http2_protocol_options")?;
    }
    if let Some(any) = c.typed_extension_protocol_options.get(HTTP_OPTIONS) {
        let field = format!("typed_extension_protocol_options[{HTTP_OPTIONS}]");
        let options: http_options::HttpProtocolOptions = unpack(any).at(&field)?;
        if let Some((at, h2)) = http2_options(&options) {
            limits.max_concurrent_streams =
                max_concurrent_streams(h2).at(format!("{field}.{at}"))?;
        }
        if let Some(common) = options.common_http_protocol_options {
            let at = format!("{field}.common_http_protocol_options");
            limits.idle_timeout = common
                .idle_timeout
                .as_ref()
                .map(|d| duration("idle_timeout", d))
                .transpose()
                .at(&at)?;
            limits.max_requests_per_connection = common
                .max_requests_per_connection
                .map(|n| n.value)
                .filter(|n| *n > 0);
            limits.max_connection_duration = common
                .max_connection_duration
                .as_ref()
                .map(|d| duration("max_connection_duration", d))
                .transpose()
                .at(&at)?
                .filter(|d| !d.is_zero());
        }
    }
    if let Some(k) = c
        .upstream_connection_options
        .as_ref()
        .and_then(|o| o.tcp_keepalive.as_ref())
    {
        let seconds = |v: Option<u32>| v.map(|s| Duration::from_secs(u64::from(s)));
        limits.tcp_keepalive = Some(TcpKeepalive {
            probes: k.keepalive_probes.map(|v| v.value),
            time: seconds(k.keepalive_time.map(|v| v.value)),
            interval: seconds(k.keepalive_interval.map(|v| v.value)),
        });
    }
    Ok(limits)
}

/// The HTTP/2 options of a cluster's HTTP protocol options, explicit or for the
/// downstream's protocol, and where they are.
fn http2_options(
    options: &http_options::HttpProtocolOptions,
) -> Option<(&'static str, &core::Http2ProtocolOptions)> {
    use http_options::http_protocol_options::{
        UpstreamProtocolOptions as U, explicit_http_config::ProtocolConfig as P,
    };
    match options.upstream_protocol_options.as_ref()? {
        U::ExplicitHttpConfig(e) => match e.protocol_config.as_ref()? {
            P::Http2ProtocolOptions(h2) => {
                Some(("explicit_http_config.http2_protocol_options", h2))
            }
            P::HttpProtocolOptions(_) | P::Http3ProtocolOptions(_) => None,
        },
        U::UseDownstreamProtocolConfig(d) => d
            .http2_protocol_options
            .as_ref()
            .map(|h2| ("use_downstream_protocol_config.http2_protocol_options", h2)),
        U::AutoConfig(_) => None,
    }
}

/// HTTP/2 options' `max_concurrent_streams`, within Envoy's bounds (1 to 2^31-1).
fn max_concurrent_streams(h2: &core::Http2ProtocolOptions) -> Result<Option<u32>, Invalid> {
    match h2.max_concurrent_streams.map(|v| v.value) {
        Some(n) if n == 0 || n > 2_147_483_647 => Err(Invalid::new(
            "max_concurrent_streams",
            format!("{n} must be between 1 and 2147483647"),
        )),
        n => Ok(n),
    }
}

/// The cluster's `upstream_http_protocol_options`: SNI and SAN validation from the
/// request's host. Overriding the header the SNI comes from is not supported.
fn auto_tls(c: &cds::Cluster) -> Result<Auto, Invalid> {
    let Some(any) = c.typed_extension_protocol_options.get(HTTP_OPTIONS) else {
        return Ok(Auto::default());
    };
    let field = format!("typed_extension_protocol_options[{HTTP_OPTIONS}]");
    let options: http_options::HttpProtocolOptions = unpack(any).at(&field)?;
    let Some(o) = options.upstream_http_protocol_options else {
        return Ok(Auto::default());
    };
    if !o.override_auto_sni_header.is_empty() {
        return Err(Invalid::new(
            format!("{field}.upstream_http_protocol_options.override_auto_sni_header"),
            "is not supported",
        ));
    }
    Ok(Auto {
        sni: o.auto_sni,
        san_validation: o.auto_san_validation,
    })
}

/// The thresholds at default priority, Envoy's defaults for what is unset.
fn thresholds(cb: Option<&cds::CircuitBreakers>) -> Thresholds {
    let default = Thresholds::default();
    let Some(t) = cb.and_then(|cb| {
        cb.thresholds
            .iter()
            .find(|t| t.priority == core::RoutingPriority::Default as i32)
    }) else {
        return default;
    };
    Thresholds {
        max_connections: t
            .max_connections
            .map_or(default.max_connections, |v| v.value),
        max_pending_requests: t
            .max_pending_requests
            .map_or(default.max_pending_requests, |v| v.value),
        max_requests: t.max_requests.map_or(default.max_requests, |v| v.value),
        max_retries: t.max_retries.map_or(default.max_retries, |v| v.value),
    }
}

/// The transport an upstream socket needs: plaintext, or TLS as the context says (see
/// [`crate::tls`]); any other transport socket is rejected, as it would otherwise be
/// downgraded.
fn transport_socket(t: &core::TransportSocket, auto: Auto) -> Result<UpstreamTransport, Invalid> {
    let Some(core::transport_socket::ConfigType::TypedConfig(any)) = &t.config_type else {
        return match t.name.as_str() {
            "envoy.transport_sockets.raw_buffer" | "raw_buffer" => Ok(UpstreamTransport::Plaintext),
            other => Err(Invalid::new(
                "name",
                format!("transport socket {other} is not supported"),
            )),
        };
    };
    if any
        .type_url
        .ends_with("envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer")
    {
        return Ok(UpstreamTransport::Plaintext);
    }
    if any.type_url != tls::UpstreamTlsContext::type_url() {
        return Err(Invalid::new(
            "typed_config",
            format!("transport socket {} is not supported", any.type_url),
        ));
    }
    let ctx: tls::UpstreamTlsContext = unpack(any).at("typed_config")?;
    crate::tls::upstream_tls(ctx, auto).at("typed_config")
}

/// Converts a cluster load assignment (EDS, or inline in a cluster). `names` allows DNS
/// names as addresses (DNS clusters); elsewhere an address must be an IP.
pub fn load_assignment(
    a: &eds::ClusterLoadAssignment,
    names: bool,
) -> Result<ClusterLoadAssignment, Invalid> {
    if let Some(factor) = a
        .policy
        .as_ref()
        .and_then(|p| p.overprovisioning_factor.as_ref())
        && factor.value != 140
    {
        return Err(Invalid::new(
            "policy.overprovisioning_factor",
            "only Envoy's default 140 is supported",
        ));
    }
    let endpoints = each("endpoints", &a.endpoints, |g| {
        let load_balancing_weight = g.load_balancing_weight.map(|w| w.value);
        if load_balancing_weight == Some(0) {
            return Err(Invalid::new("load_balancing_weight", "must be at least 1"));
        }
        let locality = g
            .locality
            .as_ref()
            .map(|l| Locality {
                region: l.region.clone(),
                zone: l.zone.clone(),
                sub_zone: l.sub_zone.clone(),
            })
            .unwrap_or_default();
        Ok(LocalityLbEndpoints {
            locality,
            priority: g.priority,
            load_balancing_weight,
            lb_endpoints: each("lb_endpoints", &g.lb_endpoints, |e| lb_endpoint(e, names))?,
        })
    })?;
    Ok(ClusterLoadAssignment {
        cluster_name: a.cluster_name.clone(),
        endpoints,
    })
}

fn lb_endpoint(e: &eds::LbEndpoint, names: bool) -> Result<LbEndpoint, Invalid> {
    let endpoint = match &e.host_identifier {
        Some(eds::lb_endpoint::HostIdentifier::Endpoint(ep)) => ep,
        Some(eds::lb_endpoint::HostIdentifier::EndpointName(_)) => {
            return Err(Invalid::new(
                "endpoint_name",
                "named endpoints are not supported",
            ));
        }
        None => return Err(Invalid::new("endpoint", "required")),
    };
    let (host, port) = socket_address(endpoint.address.as_ref()).at("endpoint.address")?;
    let address = match host.parse() {
        Ok(ip) => EndpointAddress::Socket(std::net::SocketAddr::new(ip, port)),
        Err(_) if names && !host.is_empty() => EndpointAddress::Name { host, port },
        Err(_) => return Err(ip("endpoint.address.socket_address.address", &host).unwrap_err()),
    };
    use core::HealthStatus as H;
    let health = match H::try_from(e.health_status) {
        Ok(H::Unknown) => HealthStatus::Unknown,
        Ok(H::Healthy) => HealthStatus::Healthy,
        Ok(H::Unhealthy) => HealthStatus::Unhealthy,
        Ok(H::Draining) => HealthStatus::Draining,
        Ok(H::Timeout) => HealthStatus::Timeout,
        Ok(H::Degraded) => HealthStatus::Degraded,
        Err(_) => return Err(Invalid::new("health_status", "unknown status")),
    };
    let load_balancing_weight = e.load_balancing_weight.map_or(1, |w| w.value);
    if load_balancing_weight == 0 {
        return Err(Invalid::new("load_balancing_weight", "must be at least 1"));
    }
    Ok(LbEndpoint {
        address,
        health,
        load_balancing_weight,
        transport_socket_match: filter_metadata(
            e.metadata.as_ref(),
            "envoy.transport_socket_match",
        ),
        hostname: (!endpoint.hostname.is_empty()).then(|| endpoint.hostname.clone()),
        workload: workload(e.metadata.as_ref()),
        source: None,
    })
}

/// The workload istiod describes under `filter_metadata.istio.workload`. A value Istio's
/// stats filter cannot read (not a string, fewer than five parts) leaves the workload
/// unknown and the endpoint accepted, as Envoy accepts it.
fn workload(m: Option<&core::Metadata>) -> Option<Arc<WorkloadMetadata>> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let value = m?
        .filter_metadata
        .get(ISTIO_METADATA)?
        .fields
        .get(WORKLOAD_KEY)?;
    match &value.kind {
        Some(Kind::StringValue(s)) => WorkloadMetadata::parse(s).map(Arc::new),
        _ => None,
    }
}
