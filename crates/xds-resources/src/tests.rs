//! Conversion and state tests on the shapes istiod sends a sidecar for its outbound side
//! (`pilot/pkg/networking/core`, and ../shared/reference/istio-sidecar-envoy.yaml).

use std::collections::BTreeMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cds;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as eds;
use envoy_types::pb::envoy::config::listener::v3 as lds;
use envoy_types::pb::envoy::config::route::v3 as rds;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as http_options;
use envoy_types::pb::envoy::service::discovery::v3::Resource;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf::{self as pb, Any, BoolValue, UInt32Value};
use envoy_types::util::pack_any;
use portcullis_envoy::*;

use crate::{XdsState, cluster, listener, load_assignment, route_configuration};

fn address(ip: &str, port: u32) -> Option<core::Address> {
    Some(core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: ip.into(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    })
}

fn secs(s: i64) -> Option<pb::Duration> {
    Some(pb::Duration {
        seconds: s,
        nanos: 0,
    })
}

fn filter(name: &str, any: Any) -> lds::Filter {
    lds::Filter {
        name: name.into(),
        config_type: Some(lds::filter::ConfigType::TypedConfig(any)),
    }
}

/// Istio's stats filter as istiod sends it: Wasm-typed (or `stats.PluginConfig`).
fn istio_stats() -> lds::Filter {
    filter(
        "istio.stats",
        Any {
            type_url: "type.googleapis.com/stats.PluginConfig".into(),
            value: Vec::new(),
        },
    )
}

fn tcp_proxy_to(cluster: &str) -> lds::Filter {
    filter(
        "envoy.filters.network.tcp_proxy",
        pack_any(tcp::TcpProxy {
            stat_prefix: cluster.into(),
            cluster_specifier: Some(tcp::tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        }),
    )
}

fn http_filter(name: &str) -> hcm::HttpFilter {
    hcm::HttpFilter {
        name: name.into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(Any {
            type_url: format!("type.googleapis.com/{name}"),
            value: Vec::new(),
        })),
        ..Default::default()
    }
}

fn ads(initial_fetch_timeout: Option<pb::Duration>) -> core::ConfigSource {
    core::ConfigSource {
        config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
            Default::default(),
        )),
        initial_fetch_timeout,
        resource_api_version: core::ApiVersion::V3 as i32,
        ..Default::default()
    }
}

fn hcm_rds(route: &str) -> lds::Filter {
    let filters = [
        "istio.metadata_exchange",
        "envoy.filters.http.grpc_stats",
        "istio.alpn",
        "envoy.filters.http.fault",
        "envoy.filters.http.cors",
        "istio.stats",
        "envoy.filters.http.router",
    ];
    filter(
        "envoy.filters.network.http_connection_manager",
        pack_any(hcm::HttpConnectionManager {
            stat_prefix: format!("outbound_0.0.0.0_{route}"),
            route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
                hcm::Rds {
                    route_config_name: route.into(),
                    config_source: Some(ads(None)),
                },
            )),
            http_filters: filters.iter().map(|f| http_filter(f)).collect(),
            ..Default::default()
        }),
    )
}

fn chain(
    name: &str,
    m: Option<lds::FilterChainMatch>,
    filters: Vec<lds::Filter>,
) -> lds::FilterChain {
    lds::FilterChain {
        name: name.into(),
        filter_chain_match: m,
        filters,
        ..Default::default()
    }
}

fn listener_filter(name: &str) -> lds::ListenerFilter {
    lds::ListenerFilter {
        name: name.into(),
        ..Default::default()
    }
}

/// istiod's `virtualOutbound` under REGISTRY_ONLY.
fn virtual_outbound() -> lds::Listener {
    lds::Listener {
        name: "virtualOutbound".into(),
        address: address("0.0.0.0", 15001),
        use_original_dst: Some(BoolValue { value: true }),
        listener_filters: vec![listener_filter("envoy.filters.listener.original_dst")],
        filter_chains: vec![
            chain(
                "virtualOutbound-blackhole",
                Some(lds::FilterChainMatch {
                    destination_port: Some(UInt32Value { value: 15001 }),
                    ..Default::default()
                }),
                vec![istio_stats(), tcp_proxy_to("BlackHoleCluster")],
            ),
            chain(
                "virtualOutbound-catchall-tcp",
                None,
                vec![istio_stats(), tcp_proxy_to("BlackHoleCluster")],
            ),
        ],
        ..Default::default()
    }
}

/// istiod's per-port HTTP listener `0.0.0.0_80`, routes over RDS `80`.
fn http_80() -> lds::Listener {
    lds::Listener {
        name: "0.0.0.0_80".into(),
        address: address("0.0.0.0", 80),
        bind_to_port: Some(BoolValue { value: false }),
        filter_chains: vec![chain("", None, vec![hcm_rds("80")])],
        default_filter_chain: Some(chain(
            "PassthroughFilterChain",
            None,
            vec![istio_stats(), tcp_proxy_to("BlackHoleCluster")],
        )),
        ..Default::default()
    }
}

/// istiod's per-VIP TCP listener.
fn tcp_vip() -> lds::Listener {
    lds::Listener {
        name: "10.0.0.5_5432".into(),
        address: address("10.0.0.5", 5432),
        bind_to_port: Some(BoolValue { value: false }),
        filter_chains: vec![chain(
            "",
            None,
            vec![istio_stats(), tcp_proxy_to("outbound|5432||db.internal")],
        )],
        ..Default::default()
    }
}

/// istiod's `0.0.0.0_443` for TLS ServiceEntries: one chain per SNI.
fn sni_443() -> lds::Listener {
    let sni = |names: &[&str], cluster: &str| {
        chain(
            &format!("0.0.0.0_443_{}", names[0]),
            Some(lds::FilterChainMatch {
                server_names: names.iter().map(|s| s.to_string()).collect(),
                transport_protocol: "tls".into(),
                ..Default::default()
            }),
            vec![istio_stats(), tcp_proxy_to(cluster)],
        )
    };
    lds::Listener {
        name: "0.0.0.0_443".into(),
        address: address("0.0.0.0", 443),
        bind_to_port: Some(BoolValue { value: false }),
        listener_filters: vec![listener_filter("envoy.filters.listener.tls_inspector")],
        filter_chains: vec![
            sni(&["api.example.com"], "outbound|443||api.example.com"),
            sni(&["*.example.org"], "outbound|443||*.example.org"),
        ],
        ..Default::default()
    }
}

fn route_to(cluster: &str) -> rds::Route {
    rds::Route {
        name: "default".into(),
        r#match: Some(rds::RouteMatch {
            path_specifier: Some(rds::route_match::PathSpecifier::Prefix("/".into())),
            ..Default::default()
        }),
        action: Some(rds::route::Action::Route(rds::RouteAction {
            cluster_specifier: Some(rds::route_action::ClusterSpecifier::Cluster(cluster.into())),
            timeout: secs(0),
            retry_policy: Some(rds::RetryPolicy {
                retry_on:
                    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
                        .into(),
                num_retries: Some(UInt32Value { value: 2 }),
                retry_host_predicate: vec![rds::retry_policy::RetryHostPredicate {
                    name: "envoy.retry_host_predicates.previous_hosts".into(),
                    ..Default::default()
                }],
                host_selection_retry_max_attempts: 5,
                retriable_status_codes: vec![503],
                retriable_headers: Vec::new(),
                ..Default::default()
            }),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// istiod's RDS `80`: one virtual host per service, and `block_all` (REGISTRY_ONLY).
fn route_80() -> rds::RouteConfiguration {
    rds::RouteConfiguration {
        name: "80".into(),
        virtual_hosts: vec![
            rds::VirtualHost {
                name: "app.internal.com:80".into(),
                domains: vec!["app.internal.com".into(), "app.internal.com:80".into()],
                routes: vec![route_to("outbound|80||app.internal.com")],
                include_request_attempt_count: true,
                ..Default::default()
            },
            rds::VirtualHost {
                name: "block_all".into(),
                domains: vec!["*".into()],
                routes: vec![rds::Route {
                    name: "block_all".into(),
                    r#match: Some(rds::RouteMatch {
                        path_specifier: Some(rds::route_match::PathSpecifier::Prefix("/".into())),
                        ..Default::default()
                    }),
                    action: Some(rds::route::Action::DirectResponse(
                        rds::DirectResponseAction {
                            status: 502,
                            ..Default::default()
                        },
                    )),
                    ..Default::default()
                }],
                ..Default::default()
            },
        ],
        validate_clusters: Some(BoolValue { value: false }),
        ignore_port_in_host_matching: true,
        ..Default::default()
    }
}

fn sds(name: &str) -> tls::SdsSecretConfig {
    tls::SdsSecretConfig {
        name: name.into(),
        ..Default::default()
    }
}

/// Istio's `tlsMode-istio` transport socket: mutual TLS with SDS `default` and `ROOTCA`.
fn istio_mtls() -> core::TransportSocket {
    let ctx = tls::UpstreamTlsContext {
        common_tls_context: Some(tls::CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds("default")],
            validation_context_type: Some(
                tls::common_tls_context::ValidationContextType::CombinedValidationContext(
                    tls::common_tls_context::CombinedCertificateValidationContext {
                        validation_context_sds_secret_config: Some(sds("ROOTCA")),
                        ..Default::default()
                    },
                ),
            ),
            alpn_protocols: vec!["istio-peer-exchange".into(), "istio".into()],
            ..Default::default()
        }),
        sni: "outbound_.80_._.app.internal.com".into(),
        ..Default::default()
    };
    core::TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(pack_any(
            ctx,
        ))),
    }
}

fn string_struct(pairs: &[(&str, &str)]) -> pb::Struct {
    pb::Struct {
        fields: pairs
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    pb::Value {
                        kind: Some(pb::value::Kind::StringValue(v.to_string())),
                    },
                )
            })
            .collect(),
    }
}

/// istiod's `outbound|80||HOST` EDS cluster.
fn eds_cluster(name: &str) -> cds::Cluster {
    cds::Cluster {
        name: name.into(),
        cluster_discovery_type: Some(cds::cluster::ClusterDiscoveryType::Type(
            cds::cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cds::cluster::EdsClusterConfig {
            service_name: name.into(),
            // istiod's `maybeApplyEdsConfig`: over ADS, waiting for endpoints without end.
            eds_config: Some(ads(secs(0))),
        }),
        connect_timeout: secs(10),
        lb_policy: cds::cluster::LbPolicy::LeastRequest as i32,
        circuit_breakers: Some(cds::CircuitBreakers {
            thresholds: vec![cds::circuit_breakers::Thresholds {
                max_connections: Some(UInt32Value { value: 4_294_967_295 }),
                max_pending_requests: Some(UInt32Value { value: 4_294_967_295 }),
                max_requests: Some(UInt32Value { value: 4_294_967_295 }),
                max_retries: Some(UInt32Value { value: 4_294_967_295 }),
                ..Default::default()
            }],
            ..Default::default()
        }),
        metadata: Some(core::Metadata {
            filter_metadata: [(
                "istio".to_string(),
                string_struct(&[(
                    "config",
                    "/apis/networking.istio.io/v1/namespaces/default/service-entry/app",
                )]),
            )]
            .into(),
            ..Default::default()
        }),
        transport_socket_matches: vec![
            cds::cluster::TransportSocketMatch {
                name: "tlsMode-istio".into(),
                r#match: Some(string_struct(&[("tlsMode", "istio")])),
                transport_socket: Some(istio_mtls()),
            },
            cds::cluster::TransportSocketMatch {
                name: "tlsMode-disabled".into(),
                r#match: Some(pb::Struct::default()),
                transport_socket: Some(core::TransportSocket {
                    name: "envoy.transport_sockets.raw_buffer".into(),
                    config_type: Some(core::transport_socket::ConfigType::TypedConfig(Any {
                        type_url: "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer".into(),
                        value: Vec::new(),
                    })),
                }),
            },
        ],
        ..Default::default()
    }
}

fn passthrough() -> cds::Cluster {
    cds::Cluster {
        name: PASSTHROUGH_CLUSTER.into(),
        cluster_discovery_type: Some(cds::cluster::ClusterDiscoveryType::Type(
            cds::cluster::DiscoveryType::OriginalDst as i32,
        )),
        connect_timeout: secs(10),
        lb_policy: cds::cluster::LbPolicy::ClusterProvided as i32,
        ..Default::default()
    }
}

fn blackhole() -> cds::Cluster {
    cds::Cluster {
        name: BLACKHOLE_CLUSTER.into(),
        connect_timeout: secs(10),
        ..Default::default()
    }
}

fn lb_endpoint(ip: &str, port: u32, tls_mode: Option<&str>) -> eds::LbEndpoint {
    eds::LbEndpoint {
        host_identifier: Some(eds::lb_endpoint::HostIdentifier::Endpoint(eds::Endpoint {
            address: address(ip, port),
            ..Default::default()
        })),
        metadata: tls_mode.map(|m| core::Metadata {
            filter_metadata: [(
                "envoy.transport_socket_match".to_string(),
                string_struct(&[("tlsMode", m)]),
            )]
            .into(),
            ..Default::default()
        }),
        load_balancing_weight: Some(UInt32Value { value: 1 }),
        ..Default::default()
    }
}

fn cla(name: &str, ips: &[&str]) -> eds::ClusterLoadAssignment {
    eds::ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: vec![eds::LocalityLbEndpoints {
            locality: Some(core::Locality {
                region: "eu".into(),
                zone: "eu-1".into(),
                ..Default::default()
            }),
            lb_endpoints: ips
                .iter()
                .map(|ip| lb_endpoint(ip, 8080, Some("istio")))
                .collect(),
            load_balancing_weight: Some(UInt32Value {
                value: ips.len() as u32,
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn terminal(l: &Listener, chain: usize) -> &NetworkFilter {
    &l.filter_chains[chain].filter
}

#[test]
fn virtual_outbound_hands_on_by_original_destination_and_skips_istio_stats() {
    let l = listener(&virtual_outbound()).unwrap();
    assert_eq!(l.address, "0.0.0.0:15001".parse().unwrap());
    assert!(l.use_original_dst && l.bind_to_port);
    assert_eq!(l.listener_filters, ["envoy.filters.listener.original_dst"]);
    assert_eq!(
        l.filter_chains[0].filter_chain_match.destination_port,
        Some(15001)
    );
    assert_eq!(
        l.filter_chains[1].filter_chain_match,
        FilterChainMatch::default()
    );
    assert_eq!(l.filter_chains[1].skipped_filters, ["istio.stats"]);
    let NetworkFilter::TcpProxy(t) = terminal(&l, 1) else {
        panic!("tcp_proxy")
    };
    assert_eq!(
        t.cluster,
        ClusterSpecifier::Cluster(BLACKHOLE_CLUSTER.into())
    );
    // Envoy's default idle timeout of a TCP proxy: 1 hour.
    assert_eq!(t.idle_timeout, Some(Duration::from_secs(3600)));
}

#[test]
fn the_port_80_listener_takes_routes_over_rds_and_skips_istios_http_filters() {
    let l = listener(&http_80()).unwrap();
    assert!(!l.bind_to_port);
    let NetworkFilter::Http(h) = terminal(&l, 0) else {
        panic!("hcm")
    };
    assert_eq!(h.route_config, RouteSource::Rds("80".into()));
    assert_eq!(h.skipped_filters.len(), 6);
    assert!(
        h.skipped_filters
            .contains(&"istio.metadata_exchange".to_string())
    );
    // Envoy's defaults: streams idle 5 min, no request timeout, no HTTP/1.0.
    assert_eq!(h.stream_idle_timeout, Some(Duration::from_secs(300)));
    assert_eq!(h.request_timeout, None);
    assert!(!h.accept_http_10);
    assert!(l.default_filter_chain.is_some());
    assert_eq!(
        crate::listener::rds_names(&l)
            .into_iter()
            .collect::<Vec<_>>(),
        ["80"]
    );
}

#[test]
fn a_vip_listener_proxies_tcp_and_a_zero_idle_timeout_disables_it() {
    let mut proto = tcp_vip();
    let l = listener(&proto).unwrap();
    assert_eq!(l.address, "10.0.0.5:5432".parse().unwrap());
    let NetworkFilter::TcpProxy(t) = terminal(&l, 0) else {
        panic!("tcp_proxy")
    };
    assert_eq!(
        t.cluster,
        ClusterSpecifier::Cluster("outbound|5432||db.internal".into())
    );
    proto.filter_chains[0].filters[1] = filter(
        "envoy.filters.network.tcp_proxy",
        pack_any(tcp::TcpProxy {
            cluster_specifier: Some(tcp::tcp_proxy::ClusterSpecifier::Cluster("c".into())),
            idle_timeout: secs(0),
            ..Default::default()
        }),
    );
    let NetworkFilter::TcpProxy(t) = terminal(&listener(&proto).unwrap(), 0).clone() else {
        panic!("tcp_proxy")
    };
    assert_eq!(t.idle_timeout, None);
    assert_eq!(t.max_downstream_connection_duration, None);
}

#[test]
fn a_max_downstream_connection_duration_under_a_millisecond_is_refused() {
    let with = |d: Option<pb::Duration>| {
        let mut proto = tcp_vip();
        proto.filter_chains[0].filters[1] = filter(
            "envoy.filters.network.tcp_proxy",
            pack_any(tcp::TcpProxy {
                cluster_specifier: Some(tcp::tcp_proxy::ClusterSpecifier::Cluster("c".into())),
                max_downstream_connection_duration: d,
                ..Default::default()
            }),
        );
        listener(&proto)
    };
    let l = with(secs(90)).unwrap();
    let NetworkFilter::TcpProxy(t) = terminal(&l, 0) else {
        panic!("tcp_proxy")
    };
    assert_eq!(
        t.max_downstream_connection_duration,
        Some(Duration::from_secs(90))
    );
    let e = with(secs(0)).unwrap_err().to_string();
    assert!(e.contains("max_downstream_connection_duration"), "{e}");
}

#[test]
fn sni_chains_keep_server_names_and_transport_protocol() {
    let l = listener(&sni_443()).unwrap();
    assert_eq!(l.listener_filters, ["envoy.filters.listener.tls_inspector"]);
    let m = &l.filter_chains[1].filter_chain_match;
    assert_eq!(m.server_names, ["*.example.org"]);
    assert_eq!(m.transport_protocol.as_deref(), Some("tls"));
}

#[test]
fn route_80_keeps_istios_virtual_hosts_retries_and_block_all() {
    let rc = route_configuration(&route_80()).unwrap();
    assert!(rc.ignore_port_in_host_matching);
    let app = &rc.virtual_hosts[0];
    assert!(app.include_request_attempt_count);
    let RouteAction::Forward(f) = &app.routes[0].action else {
        panic!("forward")
    };
    assert_eq!(
        f.cluster,
        ClusterSpecifier::Cluster("outbound|80||app.internal.com".into())
    );
    // Istio's `timeout: 0s` disables Envoy's 15 s default.
    assert_eq!(f.timeout, Some(Duration::ZERO));
    let retry = f.retry_policy.as_ref().unwrap();
    assert_eq!(retry.num_retries, 2);
    assert_eq!(retry.retry_on.len(), 5);
    assert!(retry.avoid_previous_hosts);
    assert_eq!(retry.host_selection_retry_max_attempts, 5);
    assert_eq!(retry.retriable_status_codes, [503]);
    assert_eq!(
        rc.virtual_hosts[1].routes[0].action,
        RouteAction::DirectResponse {
            status: 502,
            body: None
        }
    );
}

#[test]
fn route_matches_actions_and_headers_convert_with_envoys_defaults() {
    let sm = |p| matcher::StringMatcher {
        match_pattern: Some(p),
        ignore_case: true,
    };
    let hv = |k: &str, v: &str| core::HeaderValueOption {
        header: Some(core::HeaderValue {
            key: k.into(),
            value: v.into(),
            ..Default::default()
        }),
        append_action: core::header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    };
    let mut r = route_to("c");
    r.r#match = Some(rds::RouteMatch {
        path_specifier: Some(rds::route_match::PathSpecifier::SafeRegex(
            matcher::RegexMatcher {
                regex: "/v[0-9]+/.*".into(),
                ..Default::default()
            },
        )),
        case_sensitive: Some(BoolValue { value: false }),
        headers: vec![rds::HeaderMatcher {
            name: "X-Version".into(),
            header_match_specifier: Some(rds::header_matcher::HeaderMatchSpecifier::StringMatch(
                sm(matcher::string_matcher::MatchPattern::Prefix("v2".into())),
            )),
            invert_match: true,
            ..Default::default()
        }],
        query_parameters: vec![rds::QueryParameterMatcher {
            name: "debug".into(),
            query_parameter_match_specifier: Some(
                rds::query_parameter_matcher::QueryParameterMatchSpecifier::PresentMatch(true),
            ),
        }],
        ..Default::default()
    });
    r.request_headers_to_add = vec![hv("X-Added", "1")];
    r.response_headers_to_remove = vec!["x-internal".into()];
    let Some(rds::route::Action::Route(a)) = &mut r.action else {
        unreachable!()
    };
    a.cluster_specifier = Some(rds::route_action::ClusterSpecifier::WeightedClusters(
        rds::WeightedCluster {
            clusters: vec![
                rds::weighted_cluster::ClusterWeight {
                    name: "v1".into(),
                    weight: Some(UInt32Value { value: 90 }),
                    request_headers_to_add: vec![hv("x-subset", "v1")],
                    ..Default::default()
                },
                rds::weighted_cluster::ClusterWeight {
                    name: "v2".into(),
                    weight: Some(UInt32Value { value: 10 }),
                    ..Default::default()
                },
            ],
            ..Default::default()
        },
    ));
    a.host_rewrite_specifier = Some(rds::route_action::HostRewriteSpecifier::HostRewriteLiteral(
        "backend.internal".into(),
    ));
    a.prefix_rewrite = "/api/".into();
    a.timeout = None;
    let mut redirect = route_to("unused");
    redirect.action = Some(rds::route::Action::Redirect(rds::RedirectAction {
        scheme_rewrite_specifier: Some(
            rds::redirect_action::SchemeRewriteSpecifier::HttpsRedirect(true),
        ),
        path_rewrite_specifier: Some(rds::redirect_action::PathRewriteSpecifier::PathRedirect(
            "/new".into(),
        )),
        response_code: rds::redirect_action::RedirectResponseCode::Found as i32,
        port_redirect: 8443,
        ..Default::default()
    }));
    redirect.r#match = Some(rds::RouteMatch {
        path_specifier: Some(rds::route_match::PathSpecifier::PathSeparatedPrefix(
            "/old".into(),
        )),
        ..Default::default()
    });
    let mut rc = route_80();
    rc.virtual_hosts[0].routes = vec![r, redirect];
    rc.virtual_hosts[0].response_headers_to_add = vec![hv("x-vh", "1")];
    let rc = route_configuration(&rc).unwrap();
    let route = &rc.virtual_hosts[0].routes[0];
    assert_eq!(
        route.route_match.path,
        PathMatch::Regex("/v[0-9]+/.*".into())
    );
    assert!(!route.route_match.case_sensitive);
    let h = &route.route_match.headers[0];
    assert_eq!(h.name, "x-version");
    assert!(h.invert_match);
    assert_eq!(
        h.matcher,
        HeaderMatch::String(StringMatcher {
            pattern: StringPattern::Prefix("v2".into()),
            ignore_case: true
        })
    );
    assert_eq!(route.route_match.query_parameters[0].matcher, None);
    assert_eq!(route.request_headers_to_add[0].name, "x-added");
    assert_eq!(
        route.request_headers_to_add[0].append,
        AppendAction::OverwriteIfExistsOrAdd
    );
    assert_eq!(route.response_headers_to_remove, ["x-internal"]);
    let RouteAction::Forward(f) = &route.action else {
        panic!("forward")
    };
    let ClusterSpecifier::Weighted(ws) = &f.cluster else {
        panic!("weighted")
    };
    assert_eq!((ws[0].weight, ws[1].weight), (90, 10));
    assert_eq!(ws[0].request_headers_to_add[0].value, "v1");
    assert_eq!(f.host_rewrite_literal.as_deref(), Some("backend.internal"));
    assert_eq!(f.prefix_rewrite.as_deref(), Some("/api/"));
    // Unset: Envoy's 15 s default applies in the data path.
    assert_eq!(f.timeout, None);
    let RouteAction::Redirect(r) = &rc.virtual_hosts[0].routes[1].action else {
        panic!("redirect")
    };
    assert_eq!(
        (r.scheme.as_deref(), r.path.as_deref(), r.status, r.port),
        (Some("https"), Some("/new"), 302, Some(8443))
    );
    assert_eq!(
        rc.virtual_hosts[0].routes[1].route_match.path,
        PathMatch::PathSeparatedPrefix("/old".into())
    );
    assert_eq!(rc.virtual_hosts[0].response_headers_to_add[0].name, "x-vh");
}

#[test]
fn an_istio_eds_cluster_keeps_its_policy_limits_source_and_mtls_match() {
    let mut proto = eds_cluster("outbound|80||app.internal.com");
    proto.typed_extension_protocol_options.insert(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
        pack_any(http_options::HttpProtocolOptions {
            upstream_protocol_options: Some(
                http_options::http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                    http_options::http_protocol_options::ExplicitHttpConfig {
                        protocol_config: Some(
                            http_options::http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(core::Http2ProtocolOptions {
                                max_concurrent_streams: Some(UInt32Value { value: 50 }),
                                ..Default::default()
                            }),
                        ),
                    },
                ),
            ),
            // What istiod writes for a DestinationRule's connectionPool.
            common_http_protocol_options: Some(core::HttpProtocolOptions {
                idle_timeout: secs(30),
                max_requests_per_connection: Some(UInt32Value { value: 10 }),
                max_connection_duration: secs(1800),
                ..Default::default()
            }),
            ..Default::default()
        }),
    );
    proto.upstream_connection_options = Some(cds::UpstreamConnectionOptions {
        tcp_keepalive: Some(core::TcpKeepalive {
            keepalive_probes: Some(UInt32Value { value: 3 }),
            keepalive_time: Some(UInt32Value { value: 600 }),
            keepalive_interval: None,
        }),
        ..Default::default()
    });
    let c = cluster(&proto).unwrap();
    assert_eq!(
        c.connection_limits,
        portcullis_envoy::ConnectionLimits {
            idle_timeout: Some(Duration::from_secs(30)),
            max_requests_per_connection: Some(10),
            max_connection_duration: Some(Duration::from_secs(1800)),
            max_concurrent_streams: Some(50),
            tcp_keepalive: Some(portcullis_envoy::TcpKeepalive {
                probes: Some(3),
                time: Some(Duration::from_secs(600)),
                interval: None,
            }),
        }
    );
    assert_eq!(
        c.discovery,
        Discovery::Eds {
            service_name: "outbound|80||app.internal.com".into()
        }
    );
    assert_eq!(c.lb_policy, LbPolicy::LeastRequest);
    assert_eq!(c.connect_timeout, Duration::from_secs(10));
    assert_eq!(c.upstream_protocol, UpstreamProtocol::Http2);
    assert_eq!(c.circuit_breakers.max_connections, u32::MAX);
    assert_eq!(c.circuit_breakers.max_retries, u32::MAX);
    assert_eq!(
        c.source.as_deref(),
        Some("/apis/networking.istio.io/v1/namespaces/default/service-entry/app")
    );
    assert_eq!(c.transport, UpstreamTransport::Plaintext);
    assert_eq!(
        c.transport_socket_matches[0].transport,
        UpstreamTransport::IstioMutualTls(std::sync::Arc::new(IstioMutual {
            sni: Some("outbound_.80_._.app.internal.com".into()),
            alpn_protocols: vec!["istio-peer-exchange".into(), "istio".into()],
            match_subject_alt_names: Vec::new(),
        }))
    );
    assert_eq!(
        c.transport_socket_matches[0].match_metadata,
        BTreeMap::from([("tlsMode".to_string(), "istio".to_string())])
    );
    assert_eq!(
        c.transport_socket_matches[1].transport,
        UpstreamTransport::Plaintext
    );
    assert!(c.transport_socket_matches[1].match_metadata.is_empty());

    // Envoy's bounds: a cluster allowing no stream at all is refused.
    #[allow(deprecated)]
    {
        proto.http2_protocol_options = Some(core::Http2ProtocolOptions {
            max_concurrent_streams: Some(UInt32Value { value: 0 }),
            ..Default::default()
        });
    }
    assert_eq!(
        cluster(&proto).unwrap_err().to_string(),
        "http2_protocol_options.max_concurrent_streams: 0 must be between 1 and 2147483647"
    );
}

#[test]
fn passthrough_and_blackhole_clusters_take_envoys_defaults() {
    let mut proto = passthrough();
    proto.lb_config = Some(cds::cluster::LbConfig::OriginalDstLbConfig(
        cds::cluster::OriginalDstLbConfig {
            upstream_port_override: Some(UInt32Value { value: 8080 }),
            ..Default::default()
        },
    ));
    let p = cluster(&proto).unwrap();
    assert_eq!(
        p.discovery,
        Discovery::OriginalDst(OriginalDst {
            port_override: Some(8080),
            allowed_destinations: None
        })
    );
    assert_eq!(p.lb_policy, LbPolicy::ClusterProvided);
    let b = cluster(&blackhole()).unwrap();
    // Unset type is STATIC; unset policy ROUND_ROBIN; default thresholds 1024/1024/1024/3.
    assert_eq!(b.discovery, Discovery::Static);
    assert_eq!(b.lb_policy, LbPolicy::RoundRobin);
    assert_eq!(b.circuit_breakers, Thresholds::default());
    assert_eq!(b.load_assignment, None);
}

#[test]
fn a_typed_load_balancing_policy_takes_the_first_one_portcullis_knows() {
    let policy = |type_url: &str| cds::load_balancing_policy::Policy {
        typed_extension_config: Some(core::TypedExtensionConfig {
            name: "p".into(),
            typed_config: Some(Any {
                type_url: type_url.into(),
                value: Vec::new(),
            }),
        }),
    };
    let mut c = eds_cluster(APP);
    c.lb_policy = cds::cluster::LbPolicy::LoadBalancingPolicyConfig as i32;
    c.load_balancing_policy = Some(cds::LoadBalancingPolicy {
        policies: vec![
            policy("type.googleapis.com/envoy.extensions.load_balancing_policies.maglev.v3.Maglev"),
            policy("type.googleapis.com/envoy.extensions.load_balancing_policies.random.v3.Random"),
        ],
    });
    assert_eq!(cluster(&c).unwrap().lb_policy, LbPolicy::Random);
    c.load_balancing_policy.as_mut().unwrap().policies.pop();
    assert_eq!(
        cluster(&c).unwrap_err().to_string(),
        "load_balancing_policy: none of the policies is supported: type.googleapis.com/envoy.extensions.load_balancing_policies.maglev.v3.Maglev"
    );
}

#[test]
fn a_dns_cluster_keeps_names_and_logical_dns_takes_exactly_one_endpoint() {
    // The message is Envoy 1.40's for two endpoints in a LOGICAL_DNS cluster.
    let mut proto = blackhole();
    proto.name = "outbound|443||api.example.com".into();
    proto.cluster_discovery_type = Some(cds::cluster::ClusterDiscoveryType::Type(
        cds::cluster::DiscoveryType::LogicalDns as i32,
    ));
    let mut a = cla("outbound|443||api.example.com", &[]);
    a.endpoints[0].lb_endpoints = vec![lb_endpoint("api.example.com", 443, None)];
    a.endpoints[0].load_balancing_weight = None;
    proto.load_assignment = Some(a.clone());
    let c = cluster(&proto).unwrap();
    let ep = &c.load_assignment.unwrap().endpoints[0].lb_endpoints[0];
    assert_eq!(
        ep.address,
        EndpointAddress::Name {
            host: "api.example.com".into(),
            port: 443
        }
    );
    a.endpoints[0]
        .lb_endpoints
        .push(lb_endpoint("api2.example.com", 443, None));
    proto.load_assignment = Some(a);
    assert_eq!(
        cluster(&proto).unwrap_err().to_string(),
        "load_assignment: LOGICAL_DNS clusters must have a single locality_lb_endpoint and a single lb_endpoint"
    );
}

#[test]
fn endpoints_keep_locality_priority_weight_health_tls_mode_and_hostname() {
    let mut proto = cla("outbound|80||app.internal.com", &["10.1.0.1", "10.1.0.2"]);
    proto.endpoints[0].priority = 1;
    proto.endpoints[0].lb_endpoints[1].health_status = core::HealthStatus::Draining as i32;
    proto.endpoints[0].lb_endpoints[1].load_balancing_weight = Some(UInt32Value { value: 3 });
    if let Some(eds::lb_endpoint::HostIdentifier::Endpoint(e)) =
        &mut proto.endpoints[0].lb_endpoints[0].host_identifier
    {
        e.hostname = "pod-1.app".into();
    }
    let a = load_assignment(&proto, false).unwrap();
    let g = &a.endpoints[0];
    assert_eq!(
        (
            g.locality.region.as_str(),
            g.priority,
            g.load_balancing_weight
        ),
        ("eu", 1, Some(2))
    );
    assert_eq!(
        g.lb_endpoints[0].address,
        EndpointAddress::Socket("10.1.0.1:8080".parse().unwrap())
    );
    assert_eq!(g.lb_endpoints[0].hostname.as_deref(), Some("pod-1.app"));
    assert_eq!(g.lb_endpoints[0].transport_socket_match["tlsMode"], "istio");
    assert_eq!(g.lb_endpoints[1].health, HealthStatus::Draining);
    assert!(!g.lb_endpoints[1].health.is_usable());
    assert_eq!(g.lb_endpoints[1].load_balancing_weight, 3);
}

/// An assignment of `endpoints` in one locality.
fn cla_of(name: &str, endpoints: Vec<eds::LbEndpoint>) -> eds::ClusterLoadAssignment {
    let mut a = cla(name, &[]);
    a.endpoints[0].load_balancing_weight = None;
    a.endpoints[0].lb_endpoints = endpoints;
    a
}

/// `lb` with istiod's telemetry string beside its TLS mode.
fn with_workload(mut lb: eds::LbEndpoint, value: pb::value::Kind) -> eds::LbEndpoint {
    let metadata = lb.metadata.get_or_insert_with(Default::default);
    metadata.filter_metadata.insert(
        "istio".into(),
        pb::Struct {
            fields: [("workload".to_string(), pb::Value { kind: Some(value) })].into(),
        },
    );
    lb
}

#[test]
fn an_endpoints_istio_workload_is_read_and_a_malformed_one_is_unknown_not_rejected() {
    use pb::value::Kind;
    let text = |s: &str| Kind::StringValue(s.into());
    let proto = cla_of(
        "outbound|80||reviews.bookinfo.svc.cluster.local",
        vec![
            with_workload(
                lb_endpoint("10.1.0.1", 9080, Some("istio")),
                text("reviews-v1;bookinfo;reviews;v1;Kubernetes"),
            ),
            // istiod leaves the revision empty when it would be `latest`.
            with_workload(
                lb_endpoint("10.1.0.2", 9080, None),
                text("reviews-v2;bookinfo;reviews;;east"),
            ),
            with_workload(
                lb_endpoint("10.1.0.3", 9080, None),
                text("reviews;bookinfo"),
            ),
            with_workload(lb_endpoint("10.1.0.4", 9080, None), Kind::NumberValue(1.0)),
            lb_endpoint("10.1.0.5", 9080, None),
        ],
    );
    let a = load_assignment(&proto, false).expect("malformed metadata is no rejection");
    let got: Vec<Option<String>> = a.endpoints[0]
        .lb_endpoints
        .iter()
        .map(|e| e.workload.as_ref().map(|w| w.to_string()))
        .collect();
    assert_eq!(
        got,
        [
            Some("reviews-v1;bookinfo;reviews;v1;Kubernetes".to_owned()),
            Some("reviews-v2;bookinfo;reviews;;east".to_owned()),
            None,
            None,
            None
        ]
    );
    let w = a.endpoints[0].lb_endpoints[0].workload.as_deref().unwrap();
    assert_eq!(
        (&*w.name, &*w.namespace, &*w.canonical_service),
        ("reviews-v1", "bookinfo", "reviews")
    );
    assert_eq!((&*w.canonical_revision, &*w.cluster), ("v1", "Kubernetes"));
    // A DNS cluster's inline endpoints carry it the same way.
    let dns = cla_of(
        "outbound|443||api.example.com",
        vec![with_workload(
            lb_endpoint("api.example.com", 443, None),
            text("external;egress;external;;Kubernetes"),
        )],
    );
    let a = load_assignment(&dns, true).unwrap();
    assert_eq!(
        a.endpoints[0].lb_endpoints[0]
            .workload
            .as_ref()
            .map(|w| w.to_string())
            .as_deref(),
        Some("external;egress;external;;Kubernetes")
    );
}

#[test]
fn an_endpoints_istio_workload_shows_in_the_json_as_envoy_prints_what_it_received() {
    let proto = cla_of(
        "outbound|80||reviews.bookinfo.svc.cluster.local",
        vec![with_workload(
            lb_endpoint("10.1.0.1", 9080, Some("istio")),
            pb::value::Kind::StringValue("reviews-v1;bookinfo;reviews;v1;Kubernetes".into()),
        )],
    );
    let json = portcullis_envoy::json::load_assignment(&load_assignment(&proto, false).unwrap());
    assert_eq!(
        json["endpoints"][0]["lb_endpoints"][0]["metadata"],
        serde_json::json!({"filter_metadata": {
            "envoy.transport_socket_match": {"tlsMode": "istio"},
            "istio": {"workload": "reviews-v1;bookinfo;reviews;v1;Kubernetes"},
        }})
    );
}

// NACKs: each case with the message the client sends.

fn listener_error(l: &lds::Listener) -> String {
    listener(l).unwrap_err().to_string()
}

#[test]
fn an_unsupported_terminal_network_filter_is_rejected() {
    let mut l = tcp_vip();
    l.filter_chains[0].filters[1] = filter(
        "envoy.filters.network.redis_proxy",
        Any {
            type_url:
                "type.googleapis.com/envoy.extensions.filters.network.redis_proxy.v3.RedisProxy"
                    .into(),
            value: Vec::new(),
        },
    );
    assert_eq!(
        listener_error(&l),
        "filter_chains[0].filters[1]: unsupported network filter envoy.filters.network.redis_proxy (type.googleapis.com/envoy.extensions.filters.network.redis_proxy.v3.RedisProxy)"
    );
}

#[test]
fn an_unsupported_http_filter_is_rejected_and_the_router_must_end_the_chain() {
    // Envoy 1.40 too rejects a chain whose last HTTP filter is not terminal.
    let mut l = http_80();
    let lds::filter::ConfigType::TypedConfig(any) =
        l.filter_chains[0].filters[0].config_type.clone().unwrap()
    else {
        unreachable!()
    };
    let mut h: hcm::HttpConnectionManager = crate::common::unpack(&any).unwrap();
    h.http_filters
        .insert(0, http_filter("envoy.filters.http.rbac"));
    l.filter_chains[0].filters[0] = filter("hcm", pack_any(h.clone()));
    assert_eq!(
        listener_error(&l),
        "filter_chains[0].filters[0].typed_config.http_filters[0]: unsupported HTTP filter envoy.filters.http.rbac"
    );
    h.http_filters.remove(0);
    h.http_filters.pop();
    l.filter_chains[0].filters[0] = filter("hcm", pack_any(h));
    assert_eq!(
        listener_error(&l),
        "filter_chains[0].filters[0].typed_config.http_filters: the last HTTP filter must be the router"
    );
}

#[test]
fn invalid_addresses_and_prefixes_are_rejected() {
    let mut l = tcp_vip();
    l.address = address("10.0.0.300", 5432);
    assert_eq!(
        listener_error(&l),
        "address.socket_address.address: malformed IP address: 10.0.0.300"
    );
    // Checked against Envoy 1.40: a malformed prefix and a length above 128 are errors, an
    // IPv4 length between 33 and 128 is taken as /32.
    let with_prefix = |address_prefix: &str, len: u32| {
        let mut l = virtual_outbound();
        l.filter_chains[0].filter_chain_match = Some(lds::FilterChainMatch {
            prefix_ranges: vec![core::CidrRange {
                address_prefix: address_prefix.into(),
                prefix_len: Some(UInt32Value { value: len }),
            }],
            ..Default::default()
        });
        l
    };
    assert_eq!(
        listener_error(&with_prefix("10.0.0", 8)),
        "filter_chains[0].filter_chain_match.prefix_ranges[0].address_prefix: malformed IP address: 10.0.0"
    );
    assert_eq!(
        listener_error(&with_prefix("::", 129)),
        "filter_chains[0].filter_chain_match.prefix_ranges[0].prefix_len: prefix length 129 is above 128"
    );
    let l = listener(&with_prefix("10.0.0.1", 33)).unwrap();
    assert_eq!(
        l.filter_chains[0].filter_chain_match.prefix_ranges,
        ["10.0.0.1/32".parse::<ipnet::IpNet>().unwrap()]
    );
}

#[test]
fn chains_that_match_the_same_connection_are_rejected() {
    // Checked against Envoy 1.40: identical matches, and lists sharing a value (server
    // names in another order or case, one prefix in common), are all "overlapping".
    let with_names = |first: &[&str], second: &[&str]| {
        let mut l = sni_443();
        for (chain, names) in l.filter_chains.iter_mut().zip([first, second]) {
            chain.filter_chain_match.as_mut().unwrap().server_names =
                names.iter().map(|n| n.to_string()).collect();
        }
        l
    };
    let overlap = "filter_chains[1].filter_chain_match: multiple filter chains with overlapping matching rules are defined (filter_chains[0])";
    assert_eq!(listener_error(&with_names(&["a.com"], &["a.com"])), overlap);
    assert_eq!(
        listener_error(&with_names(&["a.com", "b.com"], &["B.com"])),
        overlap
    );
    assert!(listener(&with_names(&["a.com"], &["b.com"])).is_ok());
    assert!(listener(&with_names(&[], &["b.com"])).is_ok());
}

#[test]
fn weighted_clusters_that_sum_to_zero_or_overflow_are_rejected() {
    // Envoy 1.40 (--mode validate): "Sum of weights in the weighted_cluster must be greater
    // than 0", "The sum of weights of all weighted clusters of route exceeds 4294967295".
    let weighted = |weights: &[u32]| {
        let mut rc = route_80();
        let Some(rds::route::Action::Route(a)) = &mut rc.virtual_hosts[0].routes[0].action else {
            unreachable!()
        };
        a.cluster_specifier = Some(rds::route_action::ClusterSpecifier::WeightedClusters(
            rds::WeightedCluster {
                clusters: weights
                    .iter()
                    .map(|w| rds::weighted_cluster::ClusterWeight {
                        name: format!("c{w}"),
                        weight: Some(UInt32Value { value: *w }),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            },
        ));
        route_configuration(&rc).unwrap_err().to_string()
    };
    assert_eq!(
        weighted(&[0, 0]),
        "virtual_hosts[0].routes[0].route.weighted_clusters.clusters: the sum of the weights must be greater than 0"
    );
    assert_eq!(
        weighted(&[u32::MAX, 1]),
        "virtual_hosts[0].routes[0].route.weighted_clusters.clusters: the sum of the weights overflows 32 bits"
    );
}

#[test]
fn a_regex_that_does_not_compile_is_rejected() {
    // Envoy 1.40 (RE2): "missing ): /(unclosed".
    let mut rc = route_80();
    rc.virtual_hosts[0].routes[0].r#match = Some(rds::RouteMatch {
        path_specifier: Some(rds::route_match::PathSpecifier::SafeRegex(
            matcher::RegexMatcher {
                regex: "/(unclosed".into(),
                ..Default::default()
            },
        )),
        ..Default::default()
    });
    let e = route_configuration(&rc).unwrap_err().to_string();
    assert!(
        e.starts_with("virtual_hosts[0].routes[0].match.safe_regex: invalid regex \"/(unclosed\""),
        "{e}"
    );
}

#[test]
fn a_route_without_an_action_is_rejected() {
    // Envoy 1.40: `action` is required.
    let mut rc = route_80();
    rc.virtual_hosts[1].routes[0].action = None;
    assert_eq!(
        route_configuration(&rc).unwrap_err().to_string(),
        "virtual_hosts[1].routes[0].action: the route has no action"
    );
}

#[test]
fn duplicate_domains_and_host_rewrites_by_header_manipulation_are_rejected() {
    // Envoy 1.40: "Only unique values for domains are permitted" (case-insensitively), and
    // ":-prefixed or host headers may not be modified".
    let mut rc = route_80();
    rc.virtual_hosts[1].domains.push("APP.internal.com".into());
    assert_eq!(
        route_configuration(&rc).unwrap_err().to_string(),
        "virtual_hosts[1].domains: only unique values for domains are permitted: app.internal.com is duplicated"
    );
    let mut rc = route_80();
    rc.virtual_hosts[0].request_headers_to_remove = vec![":authority".into()];
    assert_eq!(
        route_configuration(&rc).unwrap_err().to_string(),
        "virtual_hosts[0].request_headers_to_remove[0]: header \":authority\" may not be modified"
    );
}

fn exact_matcher(value: &str) -> matcher::StringMatcher {
    matcher::StringMatcher {
        match_pattern: Some(matcher::string_matcher::MatchPattern::Exact(value.into())),
        ignore_case: false,
    }
}

fn with_tls(mut c: cds::Cluster, ctx: tls::UpstreamTlsContext) -> cds::Cluster {
    c.transport_socket = Some(core::TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(pack_any(
            ctx,
        ))),
    });
    c
}

fn tls_of(c: &cds::Cluster) -> UpstreamTls {
    match cluster(c).unwrap().transport {
        UpstreamTransport::Tls(t) => (*t).clone(),
        other => panic!("not TLS: {other:?}"),
    }
}

#[test]
fn tls_origination_as_istiod_sends_it_for_destination_rule_files() {
    use tls::common_tls_context::{
        CombinedCertificateValidationContext, ValidationContextType as V,
    };
    // A DestinationRule `tls: MUTUAL` with files and SANs: istio-agent's file SDS names,
    // and auto SNI from the cluster's protocol options.
    let ctx = tls::UpstreamTlsContext {
        common_tls_context: Some(tls::CommonTlsContext {
            tls_params: Some(tls::TlsParameters {
                tls_minimum_protocol_version: tls::tls_parameters::TlsProtocol::TlSv12 as i32,
                tls_maximum_protocol_version: tls::tls_parameters::TlsProtocol::TlSv13 as i32,
                ..Default::default()
            }),
            tls_certificate_sds_secret_configs: vec![sds("file-cert:/certs/c.pem~/certs/k.pem")],
            validation_context_type: Some(V::CombinedValidationContext(
                CombinedCertificateValidationContext {
                    default_validation_context: Some(tls::CertificateValidationContext {
                        #[allow(deprecated)]
                        match_subject_alt_names: vec![exact_matcher("api.example.com")],
                        ..Default::default()
                    }),
                    validation_context_sds_secret_config: Some(sds("file-root:/certs/ca.pem")),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut c = with_tls(eds_cluster("outbound|443||api.example.com"), ctx);
    c.typed_extension_protocol_options.insert(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
        pack_any(http_options::HttpProtocolOptions {
            upstream_http_protocol_options: Some(core::UpstreamHttpProtocolOptions {
                auto_sni: true,
                auto_san_validation: false,
                ..Default::default()
            }),
            ..Default::default()
        }),
    );
    let t = tls_of(&c);
    assert!(t.auto_sni && !t.auto_san_validation && t.sni.is_none());
    assert_eq!(
        (t.min_version, t.max_version),
        (TlsVersion::Tls12, TlsVersion::Tls13)
    );
    let cert = t.client_certificate.unwrap();
    assert_eq!(
        cert.certificate_chain,
        DataSource::File("/certs/c.pem".into())
    );
    assert_eq!(cert.private_key, DataSource::File("/certs/k.pem".into()));
    let v = t.validation.unwrap();
    assert_eq!(
        v.trusted_ca,
        TrustedCa::Pem(DataSource::File("/certs/ca.pem".into()))
    );
    assert_eq!(
        v.match_subject_alt_names[0].pattern,
        StringPattern::Exact("api.example.com".into())
    );

    // `tls: SIMPLE` without a CA: the system's roots; with insecureSkipVerify an empty
    // validation context, which verifies nothing.
    let simple = |validation| tls::UpstreamTlsContext {
        common_tls_context: Some(tls::CommonTlsContext {
            validation_context_type: Some(validation),
            ..Default::default()
        }),
        sni: "api.example.com".into(),
        ..Default::default()
    };
    let system = simple(V::ValidationContextSdsSecretConfig(sds("file-root:system")));
    let t = tls_of(&with_tls(eds_cluster("s"), system));
    assert_eq!(t.sni.as_deref(), Some("api.example.com"));
    assert_eq!(t.validation.unwrap().trusted_ca, TrustedCa::System);
    // Envoy's client default without tls_params: TLS 1.2 only.
    assert_eq!(
        (t.min_version, t.max_version),
        (TlsVersion::Tls12, TlsVersion::Tls12)
    );
    let insecure = simple(V::ValidationContext(Default::default()));
    assert!(
        tls_of(&with_tls(eds_cluster("i"), insecure))
            .validation
            .is_none()
    );
    // Inline data from any control plane.
    let inline = simple(V::ValidationContext(tls::CertificateValidationContext {
        trusted_ca: Some(core::DataSource {
            specifier: Some(core::data_source::Specifier::InlineString("PEM".into())),
            ..Default::default()
        }),
        ..Default::default()
    }));
    assert_eq!(
        tls_of(&with_tls(eds_cluster("n"), inline))
            .validation
            .unwrap()
            .trusted_ca,
        TrustedCa::Pem(DataSource::Inline(b"PEM".to_vec()))
    );
    // A revocation list, checked for the whole chain unless only for the leaf.
    let revoking = simple(V::ValidationContext(tls::CertificateValidationContext {
        trusted_ca: Some(core::DataSource {
            specifier: Some(core::data_source::Specifier::InlineString("PEM".into())),
            ..Default::default()
        }),
        crl: Some(core::DataSource {
            specifier: Some(core::data_source::Specifier::Filename(
                "/etc/crl.pem".into(),
            )),
            ..Default::default()
        }),
        only_verify_leaf_cert_crl: true,
        ..Default::default()
    }));
    let v = tls_of(&with_tls(eds_cluster("c"), revoking))
        .validation
        .unwrap();
    assert_eq!(v.crl, Some(DataSource::File("/etc/crl.pem".into())));
    assert!(v.only_verify_leaf_cert_crl);
}

#[test]
fn istio_mutual_tls_keeps_istiods_sni_alpn_and_peer_identities() {
    let mut ctx = tls::UpstreamTlsContext {
        common_tls_context: Some(tls::CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![sds("default")],
            validation_context_type: Some(
                tls::common_tls_context::ValidationContextType::CombinedValidationContext(
                    tls::common_tls_context::CombinedCertificateValidationContext {
                        default_validation_context: Some(tls::CertificateValidationContext {
                            #[allow(deprecated)]
                            match_subject_alt_names: vec![exact_matcher(
                                "spiffe://cluster.local/ns/default/sa/api",
                            )],
                            ..Default::default()
                        }),
                        validation_context_sds_secret_config: Some(sds("ROOTCA")),
                        ..Default::default()
                    },
                ),
            ),
            alpn_protocols: vec!["istio-peer-exchange".into(), "istio".into(), "h2".into()],
            ..Default::default()
        }),
        sni: "outbound_.8080_._.api.default.svc.cluster.local".into(),
        ..Default::default()
    };
    let UpstreamTransport::IstioMutualTls(m) = cluster(&with_tls(eds_cluster("m"), ctx.clone()))
        .unwrap()
        .transport
    else {
        panic!("not Istio mutual TLS");
    };
    assert_eq!(
        m.sni.as_deref(),
        Some("outbound_.8080_._.api.default.svc.cluster.local")
    );
    assert_eq!(m.alpn_protocols, ["istio-peer-exchange", "istio", "h2"]);
    assert_eq!(
        m.match_subject_alt_names[0].pattern,
        StringPattern::Exact("spiffe://cluster.local/ns/default/sa/api".into())
    );
    // Without istiod's SNI nothing is sent as SNI.
    ctx.sni.clear();
    let UpstreamTransport::IstioMutualTls(m) =
        cluster(&with_tls(eds_cluster("m"), ctx)).unwrap().transport
    else {
        panic!("not Istio mutual TLS");
    };
    assert!(m.sni.is_none());
}

#[test]
fn tls_that_cannot_be_honoured_is_refused_by_name() {
    use tls::common_tls_context::ValidationContextType as V;
    // credentialName: istiod's SDS (`kubernetes://`), which portcullis has no client for.
    let ctx = tls::UpstreamTlsContext {
        common_tls_context: Some(tls::CommonTlsContext {
            validation_context_type: Some(V::ValidationContextSdsSecretConfig(sds(
                "kubernetes://api-cacert",
            ))),
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(
        cluster(&with_tls(eds_cluster("k"), ctx))
            .unwrap_err()
            .to_string(),
        "transport_socket.typed_config.common_tls_context.validation_context_sds_secret_config: SDS secret kubernetes://api-cacert is not supported: only istio-agent's file-root:CA (portcullis reads the file)"
    );
    let ctx = tls::UpstreamTlsContext {
        common_tls_context: Some(tls::CommonTlsContext {
            validation_context_type: Some(V::ValidationContext(
                tls::CertificateValidationContext {
                    verify_certificate_hash: vec!["AB:CD".into()],
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(
        cluster(&with_tls(eds_cluster("h"), ctx))
            .unwrap_err()
            .to_string(),
        "transport_socket.typed_config.common_tls_context.validation_context.verify_certificate_hash: is not supported"
    );
}

#[test]
fn original_dst_pairs_only_with_cluster_provided() {
    // Envoy 1.40 rejects ORIGINAL_DST with ROUND_ROBIN, and CLUSTER_PROVIDED on a STATIC
    // cluster ("cluster provided LB specified but cluster 'o' did not provide one").
    let mut c = passthrough();
    c.lb_policy = cds::cluster::LbPolicy::RoundRobin as i32;
    assert!(
        cluster(&c)
            .unwrap_err()
            .to_string()
            .starts_with("lb_policy: CLUSTER_PROVIDED")
    );
    let mut c = blackhole();
    c.lb_policy = cds::cluster::LbPolicy::ClusterProvided as i32;
    assert!(cluster(&c).is_err());
}

// The state: partial acceptance, removal, warming.

fn any_of<T: prost::Message + prost::Name>(items: Vec<T>) -> Vec<Any> {
    items.into_iter().map(pack_any).collect()
}

fn delta(name: &str, version: &str, any: Any) -> Resource {
    Resource {
        name: name.into(),
        version: version.into(),
        resource: Some(any),
        ..Default::default()
    }
}

const APP: &str = "outbound|80||app.internal.com";

#[test]
fn an_unparseable_any_is_rejected_and_the_rest_applied() {
    let mut s = XdsState::default();
    let mut resources = any_of(vec![passthrough(), blackhole()]);
    resources.push(Any {
        type_url: CLUSTER_TYPE.into(),
        value: vec![0xff, 0xff, 0xff],
    });
    resources.push(pack_any(route_80()));
    let applied = s.apply_sotw(CLUSTER_TYPE, "1", &resources);
    assert_eq!(applied.rejected.len(), 2);
    assert_eq!(applied.rejected[0].name, "<resource 2>");
    assert!(
        applied.rejected[0]
            .reason
            .starts_with("cannot decode envoy.config.cluster.v3.Cluster"),
        "{}",
        applied.rejected[0].reason
    );
    assert_eq!(
        applied.rejected[1].reason,
        format!("type URL {ROUTE_TYPE} in a {CLUSTER_TYPE} response")
    );
    assert_eq!(s.active().clusters.len(), 2);
}

#[test]
fn an_invalid_update_keeps_the_previous_version_and_records_the_error() {
    // Envoy applies the valid clusters of a CDS response and NACKs the whole response.
    let mut s = XdsState::default();
    s.apply_sotw(CLUSTER_TYPE, "1", &any_of(vec![passthrough(), blackhole()]));
    let mut bad = passthrough();
    bad.lb_policy = cds::cluster::LbPolicy::Maglev as i32;
    bad.lb_config = Some(cds::cluster::LbConfig::MaglevLbConfig(
        cds::cluster::MaglevLbConfig {
            table_size: Some(pb::UInt64Value { value: 100 }),
        },
    ));
    let mut changed = blackhole();
    changed.connect_timeout = secs(3);
    let applied = s.apply_sotw(CLUSTER_TYPE, "2", &any_of(vec![bad, changed]));
    assert_eq!(applied.rejected.len(), 1);
    assert_eq!(applied.rejected[0].name, PASSTHROUGH_CLUSTER);
    assert_eq!(
        applied.error_detail().as_deref(),
        Some(
            "PassthroughCluster: maglev_lb_config.table_size: 100 is not a prime of at most 5000011"
        )
    );
    let active = s.active();
    assert_eq!(
        active.clusters[BLACKHOLE_CLUSTER].connect_timeout,
        Duration::from_secs(3)
    );
    assert_eq!(
        active.clusters[PASSTHROUGH_CLUSTER].lb_policy,
        LbPolicy::ClusterProvided
    );
    let entry = &s.state().clusters[PASSTHROUGH_CLUSTER];
    assert_eq!(entry.active.as_ref().unwrap().version, "1");
    let error = entry.error.as_ref().unwrap();
    assert_eq!(
        (error.version.as_str(), error.details.as_str()),
        (
            "2",
            "maglev_lb_config.table_size: 100 is not a prime of at most 5000011"
        )
    );
    // The next good update clears it.
    s.apply_sotw(CLUSTER_TYPE, "3", &any_of(vec![passthrough(), blackhole()]));
    assert!(s.state().clusters[PASSTHROUGH_CLUSTER].error.is_none());
}

#[test]
fn a_resource_sent_again_unchanged_is_the_same_shared_one() {
    let mut s = XdsState::default();
    s.apply_sotw(CLUSTER_TYPE, "1", &any_of(vec![passthrough(), blackhole()]));
    s.apply_sotw(ENDPOINT_TYPE, "1", &any_of(vec![cla(APP, &["10.1.0.1"])]));
    let before = s.active();
    let mut changed = blackhole();
    changed.connect_timeout = secs(3);
    s.apply_sotw(CLUSTER_TYPE, "2", &any_of(vec![passthrough(), changed]));
    s.apply_sotw(ENDPOINT_TYPE, "2", &any_of(vec![cla(APP, &["10.1.0.1"])]));
    let after = s.active();
    assert!(std::sync::Arc::ptr_eq(
        &before.clusters[PASSTHROUGH_CLUSTER],
        &after.clusters[PASSTHROUGH_CLUSTER]
    ));
    assert!(!std::sync::Arc::ptr_eq(
        &before.clusters[BLACKHOLE_CLUSTER],
        &after.clusters[BLACKHOLE_CLUSTER]
    ));
    assert!(std::sync::Arc::ptr_eq(
        &before.endpoints[APP],
        &after.endpoints[APP]
    ));
    // The version is the new one all the same.
    let entry = &s.state().clusters[PASSTHROUGH_CLUSTER];
    assert_eq!(entry.active.as_ref().unwrap().version, "2");
}

#[test]
fn a_sotw_response_removes_the_clusters_it_leaves_out_and_their_endpoints() {
    let mut s = XdsState::default();
    s.apply_sotw(ENDPOINT_TYPE, "1", &any_of(vec![cla(APP, &["10.1.0.1"])]));
    let applied = s.apply_sotw(
        CLUSTER_TYPE,
        "1",
        &any_of(vec![eds_cluster(APP), blackhole()]),
    );
    assert_eq!(applied.endpoints_needed.iter().collect::<Vec<_>>(), [APP]);
    // RDS and EDS responses carry only some resources: absence is no removal.
    s.apply_sotw(ENDPOINT_TYPE, "2", &[]);
    assert!(s.active().endpoints.contains_key(APP));
    let applied = s.apply_sotw(CLUSTER_TYPE, "2", &any_of(vec![blackhole()]));
    assert!(applied.endpoints_needed.is_empty());
    let active = s.active();
    assert_eq!(
        active.clusters.keys().collect::<Vec<_>>(),
        [BLACKHOLE_CLUSTER]
    );
    assert!(
        active.endpoints.is_empty(),
        "nothing needs {APP}'s endpoints any more"
    );
}

#[test]
fn istios_inbound_listener_is_neither_applied_nor_rejected() {
    // virtualInbound terminates Istio mTLS on 15006: inbound, outside portcullis's job.
    let inbound = lds::Listener {
        name: "virtualInbound".into(),
        address: address("0.0.0.0", 15006),
        traffic_direction: core::TrafficDirection::Inbound as i32,
        filter_chains: vec![lds::FilterChain {
            transport_socket: Some(istio_mtls()),
            ..chain(
                "inbound_0.0.0.0_8080",
                None,
                vec![tcp_proxy_to("inbound|8080||")],
            )
        }],
        ..Default::default()
    };
    let mut s = XdsState::default();
    let applied = s.apply_sotw(
        LISTENER_TYPE,
        "1",
        &any_of(vec![virtual_outbound(), inbound]),
    );
    assert!(applied.rejected.is_empty());
    assert_eq!(
        s.state().listeners.keys().collect::<Vec<_>>(),
        [VIRTUAL_OUTBOUND]
    );
}

#[test]
fn resources_wrapped_in_a_resource_are_unwrapped() {
    let mut s = XdsState::default();
    let wrapped = pack_any(delta("80", "7", pack_any(route_80())));
    assert!(
        s.apply_sotw(ROUTE_TYPE, "7", &[wrapped])
            .rejected
            .is_empty()
    );
    assert!(s.active().routes.contains_key("80"));
}

#[test]
fn a_delta_response_adds_and_removes_by_name() {
    let mut s = XdsState::default();
    let added = [
        delta("virtualOutbound", "v1", pack_any(virtual_outbound())),
        delta("10.0.0.5_5432", "v1", pack_any(tcp_vip())),
    ];
    assert!(
        s.apply_delta(LISTENER_TYPE, &added, &[])
            .rejected
            .is_empty()
    );
    assert_eq!(
        s.state().listeners["10.0.0.5_5432"]
            .active
            .as_ref()
            .unwrap()
            .version,
        "v1"
    );
    s.apply_delta(LISTENER_TYPE, &[], &["10.0.0.5_5432".to_string()]);
    assert_eq!(
        s.active().listeners.keys().collect::<Vec<_>>(),
        [VIRTUAL_OUTBOUND]
    );
}

#[test]
fn an_eds_cluster_warms_until_its_endpoints_arrive() {
    let mut s = XdsState::default();
    s.apply_sotw(
        CLUSTER_TYPE,
        "1",
        &any_of(vec![eds_cluster(APP), blackhole()]),
    );
    s.apply_sotw(LISTENER_TYPE, "1", &any_of(vec![virtual_outbound()]));
    assert!(!s.active().clusters.contains_key(APP));
    assert!(s.state().clusters[APP].warming.is_some());
    assert!(!s.initial_set_complete());
    s.apply_sotw(ENDPOINT_TYPE, "1", &any_of(vec![cla(APP, &["10.1.0.1"])]));
    assert!(s.active().clusters.contains_key(APP));
    assert!(s.initial_set_complete());
}

#[test]
fn endpoints_that_arrived_first_make_the_cluster_active_at_once() {
    let mut s = XdsState::default();
    s.apply_sotw(ENDPOINT_TYPE, "1", &any_of(vec![cla(APP, &["10.1.0.1"])]));
    s.apply_sotw(CLUSTER_TYPE, "1", &any_of(vec![eds_cluster(APP)]));
    assert!(s.active().clusters.contains_key(APP));
    assert!(s.state().clusters[APP].warming.is_none());
}

#[test]
fn a_listener_warms_until_its_routes_arrive_and_not_for_the_clusters_they_name() {
    let mut s = XdsState::default();
    s.apply_sotw(CLUSTER_TYPE, "1", &any_of(vec![blackhole()]));
    let applied = s.apply_sotw(
        LISTENER_TYPE,
        "1",
        &any_of(vec![virtual_outbound(), http_80()]),
    );
    assert_eq!(applied.routes_needed.iter().collect::<Vec<_>>(), ["80"]);
    assert!(!s.active().listeners.contains_key("0.0.0.0_80"));
    assert!(!s.initial_set_complete());
    // Route 80 names outbound|80||app.internal.com, which never arrives: Envoy answers
    // 503 NC for it at request time; the listener does not wait for it.
    s.apply_sotw(ROUTE_TYPE, "1", &any_of(vec![route_80()]));
    assert!(s.active().listeners.contains_key("0.0.0.0_80"));
    assert!(s.initial_set_complete());
}

#[test]
fn routes_that_arrived_first_make_the_listener_active_at_once() {
    let mut s = XdsState::default();
    s.apply_sotw(ROUTE_TYPE, "1", &any_of(vec![route_80()]));
    s.apply_sotw(LISTENER_TYPE, "1", &any_of(vec![http_80()]));
    assert!(s.active().listeners.contains_key("0.0.0.0_80"));
}

#[test]
fn an_updated_cluster_keeps_serving_its_previous_version_while_the_new_one_warms() {
    let mut s = XdsState::default();
    s.apply_sotw(ENDPOINT_TYPE, "1", &any_of(vec![cla(APP, &["10.1.0.1"])]));
    s.apply_sotw(CLUSTER_TYPE, "1", &any_of(vec![eds_cluster(APP)]));
    let mut updated = eds_cluster(APP);
    updated.eds_cluster_config.as_mut().unwrap().service_name = "app-v2".into();
    s.apply_sotw(CLUSTER_TYPE, "2", &any_of(vec![updated]));
    let entry = &s.state().clusters[APP];
    assert_eq!(entry.active.as_ref().unwrap().version, "1");
    assert_eq!(entry.warming.as_ref().unwrap().version, "2");
    assert_eq!(
        s.active().clusters[APP].discovery,
        Discovery::Eds {
            service_name: APP.into()
        }
    );
    s.apply_sotw(
        ENDPOINT_TYPE,
        "2",
        &any_of(vec![cla("app-v2", &["10.1.0.2"])]),
    );
    assert_eq!(
        s.active().clusters[APP].discovery,
        Discovery::Eds {
            service_name: "app-v2".into()
        }
    );
}

#[test]
fn clusters_promoted_by_their_endpoints_keep_their_endpoints_needed_through_later_pushes() {
    let mut s = XdsState::default();
    let names: Vec<String> = (0..40)
        .map(|i| format!("outbound|80||s{i}.example"))
        .collect();
    let clusters: Vec<Resource> = names
        .iter()
        .map(|n| delta(n, "1", pack_any(eds_cluster(n))))
        .collect();
    assert_eq!(
        s.apply_delta(CLUSTER_TYPE, &clusters, &[])
            .endpoints_needed
            .len(),
        40
    );
    let endpoints: Vec<Resource> = names
        .iter()
        .map(|n| delta(n, "1", pack_any(cla(n, &["10.1.0.1"]))))
        .collect();
    s.apply_delta(ENDPOINT_TYPE, &endpoints, &[]);
    assert_eq!(s.active().clusters.len(), 40, "every cluster promoted");

    // A later push adds one cluster and removes a promoted one: only those change the needs.
    let added = "outbound|80||new.example";
    let applied = s.apply_delta(
        CLUSTER_TYPE,
        &[delta(added, "2", pack_any(eds_cluster(added)))],
        std::slice::from_ref(&names[0]),
    );
    assert_eq!(applied.endpoints_needed.len(), 40);
    assert!(applied.endpoints_needed.contains(added));
    assert!(!applied.endpoints_needed.contains(&names[0]));
    assert!(!s.state().endpoints.contains_key(&names[0]));
    assert!(s.state().endpoints.contains_key(&names[1]));
}

#[tokio::test(start_paused = true)]
async fn warming_ends_at_the_initial_fetch_timeout_with_no_endpoints() {
    let mut s = XdsState::new(Duration::from_secs(15));
    let mut c = eds_cluster(APP);
    // Unset: Envoy's default applies.
    c.eds_cluster_config.as_mut().unwrap().eds_config = Some(ads(None));
    s.apply_sotw(CLUSTER_TYPE, "1", &any_of(vec![c]));
    s.apply_sotw(LISTENER_TYPE, "1", &any_of(vec![http_80()]));
    let deadline = s.next_warming_deadline().unwrap();
    tokio::time::sleep_until(deadline - Duration::from_millis(1)).await;
    assert!(!s.promote());
    tokio::time::sleep_until(deadline).await;
    assert!(s.promote());
    let active = s.active();
    assert!(active.clusters.contains_key(APP) && active.endpoints.is_empty());
    assert!(active.listeners.contains_key("0.0.0.0_80") && active.routes.is_empty());
    assert!(s.initial_set_complete());
    assert_eq!(s.next_warming_deadline(), None);
}

#[tokio::test(start_paused = true)]
async fn a_zero_initial_fetch_timeout_waits_for_endpoints_without_end() {
    // istiod sets `initial_fetch_timeout: 0s` on EDS: Envoy then waits for the endpoints
    // however long they take, and so does readiness.
    let mut s = XdsState::default();
    s.apply_sotw(CLUSTER_TYPE, "1", &any_of(vec![eds_cluster(APP)]));
    s.apply_sotw(LISTENER_TYPE, "1", &any_of(vec![virtual_outbound()]));
    assert_eq!(s.next_warming_deadline(), None);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(!s.promote());
    assert!(!s.initial_set_complete());
    // A service without endpoints: istiod sends an empty assignment.
    let empty = eds::ClusterLoadAssignment {
        cluster_name: APP.into(),
        ..Default::default()
    };
    s.apply_sotw(ENDPOINT_TYPE, "1", &any_of(vec![empty]));
    assert!(s.active().clusters.contains_key(APP));
    assert!(s.initial_set_complete());
}

#[test]
fn validate_clusters_rejects_routes_to_unknown_clusters_as_envoy_does() {
    // Envoy 1.40 (checked with --mode validate): "route: unknown cluster 'nowhere'" and
    // "route: unknown weighted cluster 'nowhere'"; on by default for a route configuration
    // inline in a listener, off by default for one from RDS (Istio sets it off anyway).
    let mut s = XdsState::default();
    s.apply_sotw(CLUSTER_TYPE, "1", &any_of(vec![blackhole()]));
    let mut rc = route_80();
    rc.validate_clusters = None;
    assert!(
        s.apply_sotw(ROUTE_TYPE, "1", &any_of(vec![rc.clone()]))
            .rejected
            .is_empty(),
        "RDS does not validate unless asked"
    );
    rc.validate_clusters = Some(BoolValue { value: true });
    let applied = s.apply_sotw(ROUTE_TYPE, "2", &any_of(vec![rc.clone()]));
    assert_eq!(
        applied.error_detail().as_deref(),
        Some("80: route: unknown cluster 'outbound|80||app.internal.com'")
    );
    assert_eq!(s.state().routes["80"].active.as_ref().unwrap().version, "1");

    // Inline in a listener: validated unless turned off; a weighted cluster is named so.
    let inline = |rc: rds::RouteConfiguration| {
        let mut l = http_80();
        let lds::filter::ConfigType::TypedConfig(any) =
            l.filter_chains[0].filters[0].config_type.clone().unwrap()
        else {
            unreachable!()
        };
        let mut h: hcm::HttpConnectionManager = crate::common::unpack(&any).unwrap();
        h.route_specifier = Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(
            rc,
        ));
        l.filter_chains[0].filters[0] = filter("hcm", pack_any(h));
        l
    };
    let mut weighted = route_80();
    weighted.validate_clusters = None;
    let Some(rds::route::Action::Route(a)) = &mut weighted.virtual_hosts[0].routes[0].action else {
        unreachable!()
    };
    a.cluster_specifier = Some(rds::route_action::ClusterSpecifier::WeightedClusters(
        rds::WeightedCluster {
            clusters: [BLACKHOLE_CLUSTER, "nowhere"]
                .iter()
                .map(|name| rds::weighted_cluster::ClusterWeight {
                    name: (*name).into(),
                    weight: Some(UInt32Value { value: 1 }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        },
    ));
    let applied = s.apply_sotw(LISTENER_TYPE, "1", &any_of(vec![inline(weighted.clone())]));
    assert_eq!(
        applied.error_detail().as_deref(),
        Some("0.0.0.0_80: route: unknown weighted cluster 'nowhere'")
    );
    assert!(s.active().listeners.is_empty());
    weighted.validate_clusters = Some(BoolValue { value: false });
    let applied = s.apply_sotw(LISTENER_TYPE, "2", &any_of(vec![inline(weighted)]));
    assert!(applied.rejected.is_empty(), "{applied:?}");
    assert!(s.active().listeners.contains_key("0.0.0.0_80"));

    // Once the cluster exists (warming counts), the route is taken.
    s.apply_sotw(
        CLUSTER_TYPE,
        "2",
        &any_of(vec![blackhole(), eds_cluster(APP)]),
    );
    assert!(s.state().clusters[APP].warming.is_some());
    assert!(
        s.apply_sotw(ROUTE_TYPE, "3", &any_of(vec![rc]))
            .rejected
            .is_empty()
    );
}

#[test]
fn istios_fault_and_mirror_policies_are_carried_into_the_model() {
    use envoy_types::pb::envoy::extensions::filters::common::fault::v3 as common_fault;
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as fault;
    use envoy_types::pb::envoy::r#type::v3::{FractionalPercent as Pct, fractional_percent};
    // What istiod writes for `fault: {delay: {fixedDelay: 2s, percentage: {value: 12.5}},
    // abort: {httpStatus: 503}}` and `mirror: {host: b}` with `mirrorPercentage: {value: 5}`.
    let mut rc = route_80();
    let route = &mut rc.virtual_hosts[0].routes[0];
    let delay = common_fault::FaultDelay {
        percentage: Some(Pct {
            numerator: 125_000,
            denominator: fractional_percent::DenominatorType::Million as i32,
        }),
        fault_delay_secifier: Some(common_fault::fault_delay::FaultDelaySecifier::FixedDelay(
            pb::Duration {
                seconds: 2,
                nanos: 0,
            },
        )),
    };
    let abort = fault::FaultAbort {
        error_type: Some(fault::fault_abort::ErrorType::HttpStatus(503)),
        ..Default::default()
    };
    route.typed_per_filter_config.insert(
        "envoy.filters.http.fault".into(),
        pack_any(fault::HttpFault {
            delay: Some(delay),
            abort: Some(abort),
            ..Default::default()
        }),
    );
    let Some(rds::route::Action::Route(action)) = &mut route.action else {
        panic!("a forwarding route");
    };
    action.request_mirror_policies = vec![rds::route_action::RequestMirrorPolicy {
        cluster: "outbound|80||b.default.svc.cluster.local".into(),
        runtime_fraction: Some(core::RuntimeFractionalPercent {
            default_value: Some(Pct {
                numerator: 50_000,
                denominator: fractional_percent::DenominatorType::Million as i32,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }];
    let converted = route_configuration(&rc).expect("converts");
    let route = &converted.virtual_hosts[0].routes[0];
    assert_eq!(
        route.fault.as_deref(),
        Some(&HttpFault {
            delay: Some(FaultDelay {
                fixed_delay: Duration::from_secs(2),
                percentage: FractionalPercent {
                    numerator: 125_000,
                    denominator: Denominator::Million,
                },
            }),
            // Unset, Envoy's percentage is none: istiod always writes one when Istio has it.
            abort: Some(FaultAbort {
                error: AbortError::HttpStatus(503),
                percentage: FractionalPercent {
                    numerator: 0,
                    denominator: Denominator::Hundred,
                },
            }),
        })
    );
    let RouteAction::Forward(f) = &route.action else {
        panic!("{route:?}");
    };
    assert_eq!(
        f.request_mirror_policies,
        [RequestMirrorPolicy {
            cluster: "outbound|80||b.default.svc.cluster.local".into(),
            runtime_fraction: Some(FractionalPercent {
                numerator: 50_000,
                denominator: Denominator::Million,
            }),
        }]
    );
    // A gRPC abort, as istiod writes Istio's `grpcStatus`.
    let with_abort = |error_type| {
        let mut rc = rc.clone();
        rc.virtual_hosts[0].routes[0]
            .typed_per_filter_config
            .insert(
                "envoy.filters.http.fault".into(),
                pack_any(fault::HttpFault {
                    abort: Some(fault::FaultAbort {
                        error_type: Some(error_type),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            );
        route_configuration(&rc)
    };
    let grpc = with_abort(fault::fault_abort::ErrorType::GrpcStatus(14)).expect("converts");
    assert_eq!(
        grpc.virtual_hosts[0].routes[0]
            .fault
            .as_ref()
            .and_then(|f| f.abort.as_ref())
            .map(|a| a.error),
        Some(AbortError::GrpcStatus(14))
    );
    // A header abort is a fault portcullis cannot represent: refused, by name.
    let header = fault::fault_abort::ErrorType::HeaderAbort(fault::fault_abort::HeaderAbort {});
    assert_eq!(
        with_abort(header).unwrap_err().to_string(),
        "virtual_hosts[0].routes[0].typed_per_filter_config[envoy.filters.http.fault].abort.error_type: only http_status and grpc_status are supported"
    );
}

/// istiod's cluster for a DestinationRule `consistentHash` with `ringHash` or `maglev`.
fn hashed_cluster(
    policy: cds::cluster::LbPolicy,
    config: Option<cds::cluster::LbConfig>,
) -> cds::Cluster {
    let mut c = eds_cluster("outbound|80||app.internal.com");
    c.lb_policy = policy as i32;
    c.lb_config = config;
    c
}

fn ring_config(minimum: u64) -> Option<cds::cluster::LbConfig> {
    Some(cds::cluster::LbConfig::RingHashLbConfig(
        cds::cluster::RingHashLbConfig {
            minimum_ring_size: Some(pb::UInt64Value { value: minimum }),
            ..Default::default()
        },
    ))
}

#[test]
fn ring_hash_and_maglev_clusters_keep_their_sizes() {
    use cds::cluster::{LbConfig, LbPolicy as P, MaglevLbConfig};
    let ring = cluster(&hashed_cluster(P::RingHash, ring_config(2048))).unwrap();
    assert_eq!(
        ring.lb_policy,
        LbPolicy::RingHash {
            minimum_ring_size: 2048,
            maximum_ring_size: LbPolicy::DEFAULT_MAXIMUM_RING_SIZE,
        }
    );
    // Without a config, Envoy's defaults.
    let bare = cluster(&hashed_cluster(P::RingHash, None)).unwrap();
    assert_eq!(bare.lb_policy, LbPolicy::ring_hash());
    let maglev = hashed_cluster(
        P::Maglev,
        Some(LbConfig::MaglevLbConfig(MaglevLbConfig {
            table_size: Some(pb::UInt64Value { value: 257 }),
        })),
    );
    assert_eq!(
        cluster(&maglev).unwrap().lb_policy,
        LbPolicy::Maglev { table_size: 257 }
    );
    let bare = cluster(&hashed_cluster(P::Maglev, None)).unwrap();
    assert_eq!(
        bare.lb_policy,
        LbPolicy::Maglev {
            table_size: LbPolicy::DEFAULT_MAGLEV_TABLE_SIZE
        }
    );
}

#[test]
fn consistent_hashing_that_cannot_be_honoured_is_refused_by_name() {
    use cds::cluster::ring_hash_lb_config::HashFunction;
    use cds::cluster::{LbConfig, LbPolicy as P, RingHashLbConfig};
    let error = |c: cds::Cluster| cluster(&c).unwrap_err().to_string();
    let murmur = hashed_cluster(
        P::RingHash,
        Some(LbConfig::RingHashLbConfig(RingHashLbConfig {
            hash_function: HashFunction::MurmurHash2 as i32,
            ..Default::default()
        })),
    );
    assert_eq!(
        error(murmur),
        "ring_hash_lb_config.hash_function: only XX_HASH is supported"
    );
    let upside_down = hashed_cluster(
        P::RingHash,
        Some(LbConfig::RingHashLbConfig(RingHashLbConfig {
            minimum_ring_size: Some(pb::UInt64Value { value: 4096 }),
            maximum_ring_size: Some(pb::UInt64Value { value: 1024 }),
            ..Default::default()
        })),
    );
    assert_eq!(
        error(upside_down),
        "ring_hash_lb_config.minimum_ring_size: 4096 is above maximum_ring_size 1024"
    );
    let mut by_hostname = hashed_cluster(P::RingHash, ring_config(1024));
    by_hostname.common_lb_config = Some(cds::cluster::CommonLbConfig {
        consistent_hashing_lb_config: Some(
            cds::cluster::common_lb_config::ConsistentHashingLbConfig {
                use_hostname_for_hashing: true,
                ..Default::default()
            },
        ),
        ..Default::default()
    });
    assert_eq!(
        error(by_hostname),
        "common_lb_config.consistent_hashing_lb_config.use_hostname_for_hashing: not supported"
    );
    let mut three_choices = eds_cluster("outbound|80||app.internal.com");
    three_choices.lb_config = Some(LbConfig::LeastRequestLbConfig(
        cds::cluster::LeastRequestLbConfig {
            choice_count: Some(UInt32Value { value: 3 }),
            ..Default::default()
        },
    ));
    assert_eq!(
        error(three_choices),
        "least_request_lb_config.choice_count: only 2 choices are supported"
    );
}

/// Route `80`'s first service route with `hash_policy`.
fn route_80_hashed(policies: Vec<rds::route_action::HashPolicy>) -> rds::RouteConfiguration {
    let mut rc = route_80();
    let Some(rds::route::Action::Route(action)) = &mut rc.virtual_hosts[0].routes[0].action else {
        panic!("route_80 forwards first");
    };
    action.hash_policy = policies;
    rc
}

#[test]
fn route_hash_policies_convert_as_istiod_writes_them() {
    use rds::route_action::HashPolicy as H;
    use rds::route_action::hash_policy::{
        ConnectionProperties, Cookie, Header, PolicySpecifier as S, QueryParameter,
    };
    let policy = |specifier, terminal| H {
        policy_specifier: Some(specifier),
        terminal,
    };
    let rc = route_80_hashed(vec![
        policy(
            S::Header(Header {
                header_name: "X-User".into(),
                ..Default::default()
            }),
            true,
        ),
        policy(
            S::Cookie(Cookie {
                name: "session".into(),
                ttl: secs(30),
                path: "/".into(),
                attributes: vec![rds::route_action::hash_policy::CookieAttribute {
                    name: "SameSite".into(),
                    value: "Strict".into(),
                }],
            }),
            false,
        ),
        policy(
            S::ConnectionProperties(ConnectionProperties { source_ip: true }),
            false,
        ),
        policy(
            S::QueryParameter(QueryParameter {
                name: "user".into(),
            }),
            false,
        ),
        // Never yields a hash: left out.
        policy(
            S::ConnectionProperties(ConnectionProperties { source_ip: false }),
            false,
        ),
    ]);
    let rc = route_configuration(&rc).unwrap();
    let RouteAction::Forward(f) = &rc.virtual_hosts[0].routes[0].action else {
        panic!("forwards");
    };
    let plain = |key| HashPolicy {
        key,
        terminal: false,
    };
    assert_eq!(
        f.hash_policy,
        [
            HashPolicy {
                key: HashKey::Header("x-user".into()),
                terminal: true,
            },
            plain(HashKey::Cookie {
                name: "session".into(),
                path: Some("/".into()),
                ttl: Some(Duration::from_secs(30)),
                attributes: vec![portcullis_envoy::CookieAttribute {
                    name: "SameSite".into(),
                    value: "Strict".into(),
                }],
            }),
            plain(HashKey::SourceIp),
            plain(HashKey::QueryParameter("user".into())),
        ]
    );
    let refused = |specifier| {
        route_configuration(&route_80_hashed(vec![policy(specifier, false)]))
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        refused(S::FilterState(
            rds::route_action::hash_policy::FilterState { key: "k".into() }
        )),
        "virtual_hosts[0].routes[0].route.hash_policy[0].filter_state: not supported"
    );
    let e = refused(S::Cookie(Cookie {
        name: "session".into(),
        attributes: vec![rds::route_action::hash_policy::CookieAttribute {
            name: "Same Site".into(),
            value: String::new(),
        }],
        ..Default::default()
    }));
    assert!(e.contains("cookie.attributes[0].name"), "{e}");
}

#[test]
fn outlier_detection_as_istiod_writes_it_and_success_rate_refused() {
    let mut proto = eds_cluster("outbound|80||app.internal.com");
    proto.outlier_detection = Some(cds::OutlierDetection {
        consecutive_5xx: Some(UInt32Value { value: 3 }),
        enforcing_consecutive_5xx: Some(UInt32Value { value: 100 }),
        enforcing_success_rate: Some(UInt32Value { value: 0 }),
        interval: secs(5),
        base_ejection_time: secs(60),
        max_ejection_percent: Some(UInt32Value { value: 50 }),
        ..Default::default()
    });
    proto.common_lb_config = Some(cds::cluster::CommonLbConfig {
        healthy_panic_threshold: Some(envoy_types::pb::envoy::r#type::v3::Percent { value: 0.0 }),
        ..Default::default()
    });
    let c = cluster(&proto).unwrap();
    let od = c.outlier_detection.expect("outlier detection");
    assert_eq!((od.consecutive_5xx, od.enforcing_consecutive_5xx), (3, 100));
    // Envoy's defaults for what istiod leaves unset.
    assert_eq!(
        (
            od.consecutive_gateway_failure,
            od.enforcing_consecutive_gateway_failure
        ),
        (5, 0)
    );
    assert_eq!(od.max_ejection_time, Duration::from_secs(300));
    assert_eq!(od.base_ejection_time, Duration::from_secs(60));
    assert_eq!(od.max_ejection_percent, 50);
    assert_eq!(c.healthy_panic_threshold, Some(0.0));
    // Success-rate detection (Envoy enforces it by default) is not honoured: refused.
    let mut enforced = proto.clone();
    enforced
        .outlier_detection
        .as_mut()
        .unwrap()
        .enforcing_success_rate = None;
    let e = cluster(&enforced).unwrap_err();
    assert!(e.to_string().contains("enforcing_success_rate"), "{e}");
}

#[test]
fn a_retry_back_off_keeps_its_intervals_and_envoys_checks() {
    let with = |base: Option<pb::Duration>, max: Option<pb::Duration>| {
        let mut rc = route_80();
        let Some(rds::route::Action::Route(action)) = &mut rc.virtual_hosts[0].routes[0].action
        else {
            panic!("a route action")
        };
        action.retry_policy.as_mut().unwrap().retry_back_off =
            Some(rds::retry_policy::RetryBackOff {
                base_interval: base,
                max_interval: max,
            });
        route_configuration(&rc).map(|rc| {
            let RouteAction::Forward(f) = &rc.virtual_hosts[0].routes[0].action else {
                panic!("forward")
            };
            f.retry_policy
                .as_ref()
                .unwrap()
                .retry_back_off
                .as_deref()
                .copied()
        })
    };
    let nanos = |n: i32| {
        Some(pb::Duration {
            seconds: 0,
            nanos: n,
        })
    };
    assert_eq!(
        with(secs(1), None).unwrap(),
        Some(RetryBackOff {
            base_interval: Duration::from_secs(1),
            max_interval: None
        })
    );
    // Below a millisecond counts as one, as Envoy rounds it.
    assert_eq!(
        with(nanos(1000), secs(2)).unwrap(),
        Some(RetryBackOff {
            base_interval: Duration::from_millis(1),
            max_interval: Some(Duration::from_secs(2))
        })
    );
    let refused = |base, max| with(base, max).unwrap_err().to_string();
    assert_eq!(
        refused(None, None),
        "virtual_hosts[0].routes[0].route.retry_policy.retry_back_off.base_interval: must be greater than zero"
    );
    assert_eq!(
        refused(secs(2), secs(1)),
        "virtual_hosts[0].routes[0].route.retry_policy.retry_back_off.max_interval: must not be below base_interval"
    );
}

#[test]
#[allow(deprecated)]
fn a_request_body_buffer_limit_comes_from_either_field_not_both() {
    use envoy_types::pb::google::protobuf::UInt64Value;
    let with = |per_request: Option<u32>, request_body: Option<u64>| {
        let mut rc = route_80();
        let r = &mut rc.virtual_hosts[0].routes[0];
        r.per_request_buffer_limit_bytes = per_request.map(|value| UInt32Value { value });
        r.request_body_buffer_limit = request_body.map(|value| UInt64Value { value });
        route_configuration(&rc).map(|rc| rc.virtual_hosts[0].routes[0].request_buffer_limit)
    };
    assert_eq!(with(None, None).unwrap(), None);
    let per_request = with(Some(4096), None).unwrap().unwrap();
    assert_eq!(per_request, RequestBufferLimit::PerRequest(4096));
    // The deprecated field stays within the connection's limit; the new one does not.
    assert_eq!(per_request.bytes(1024), 1024);
    let body = with(None, Some(1 << 24)).unwrap().unwrap();
    assert_eq!(body.bytes(1024), 1 << 24);
    let e = with(Some(1), Some(1)).unwrap_err().to_string();
    assert!(e.contains("only one of"), "{e}");
}

#[test]
fn a_previous_priorities_retry_priority_keeps_its_update_frequency() {
    use envoy_types::pb::envoy::extensions::retry::priority::previous_priorities::v3::PreviousPrioritiesConfig;
    let with = |update_frequency: i32| {
        let mut rc = route_80();
        let Some(rds::route::Action::Route(action)) = &mut rc.virtual_hosts[0].routes[0].action
        else {
            panic!("a route action")
        };
        action.retry_policy.as_mut().unwrap().retry_priority =
            Some(rds::retry_policy::RetryPriority {
                name: "envoy.retry_priorities.previous_priorities".into(),
                config_type: Some(rds::retry_policy::retry_priority::ConfigType::TypedConfig(
                    pack_any(PreviousPrioritiesConfig { update_frequency }),
                )),
            });
        route_configuration(&rc).map(|rc| {
            let RouteAction::Forward(f) = &rc.virtual_hosts[0].routes[0].action else {
                panic!("forward")
            };
            f.retry_policy.as_ref().unwrap().previous_priorities
        })
    };
    assert_eq!(with(2).unwrap(), Some(2));
    let e = with(0).unwrap_err().to_string();
    assert!(
        e.contains("retry_priority.typed_config.update_frequency"),
        "{e}"
    );
}

#[test]
fn locality_weighted_balancing_is_kept_and_zone_aware_refused() {
    use cds::cluster::common_lb_config::{
        LocalityConfigSpecifier as L, LocalityWeightedLbConfig, ZoneAwareLbConfig,
    };
    let mut proto = eds_cluster("outbound|80||app.internal.com");
    assert!(!cluster(&proto).unwrap().locality_weighted);
    proto.common_lb_config = Some(cds::cluster::CommonLbConfig {
        locality_config_specifier: Some(L::LocalityWeightedLbConfig(
            LocalityWeightedLbConfig::default(),
        )),
        ..Default::default()
    });
    assert!(cluster(&proto).unwrap().locality_weighted);
    proto.common_lb_config = Some(cds::cluster::CommonLbConfig {
        locality_config_specifier: Some(L::ZoneAwareLbConfig(ZoneAwareLbConfig::default())),
        ..Default::default()
    });
    let e = cluster(&proto).unwrap_err();
    assert!(e.to_string().contains("zone_aware_lb_config"), "{e}");
}

#[test]
fn an_overprovisioning_factor_other_than_envoys_is_refused() {
    let mut proto = cla("outbound|80||app.internal.com", &["10.1.0.1"]);
    proto.policy = Some(eds::cluster_load_assignment::Policy {
        overprovisioning_factor: Some(UInt32Value { value: 140 }),
        ..Default::default()
    });
    assert!(load_assignment(&proto, false).is_ok());
    proto.policy = Some(eds::cluster_load_assignment::Policy {
        overprovisioning_factor: Some(UInt32Value { value: 100 }),
        ..Default::default()
    });
    let e = load_assignment(&proto, false).unwrap_err();
    assert!(e.to_string().contains("overprovisioning_factor"), "{e}");
}

#[test]
fn slow_start_is_read_from_the_policys_own_config() {
    use cds::cluster::{LbConfig, LbPolicy as P, LeastRequestLbConfig, RoundRobinLbConfig};
    use envoy_types::pb::envoy::r#type::v3::Percent;
    // As istiod's `setWarmup` writes it.
    let warmup = cds::cluster::SlowStartConfig {
        slow_start_window: secs(30),
        aggression: Some(core::RuntimeDouble {
            default_value: 2.0,
            runtime_key: "(".into(),
        }),
        min_weight_percent: Some(Percent { value: 5.0 }),
    };
    let mut lr = eds_cluster("outbound|80||app.internal.com");
    lr.lb_config = Some(LbConfig::LeastRequestLbConfig(LeastRequestLbConfig {
        slow_start_config: Some(warmup.clone()),
        ..Default::default()
    }));
    assert_eq!(
        cluster(&lr).unwrap().slow_start.as_deref(),
        Some(&SlowStartConfig {
            window: Duration::from_secs(30),
            aggression: Some(RuntimeDouble {
                default_value: 2.0,
                runtime_key: "(".into(),
            }),
            min_weight_percent: Some(5.0),
        })
    );
    // `warmupDurationSecs`: the window alone.
    let mut rr = eds_cluster("outbound|80||app.internal.com");
    rr.lb_policy = P::RoundRobin as i32;
    rr.lb_config = Some(LbConfig::RoundRobinLbConfig(RoundRobinLbConfig {
        slow_start_config: Some(cds::cluster::SlowStartConfig {
            slow_start_window: secs(10),
            ..Default::default()
        }),
    }));
    let c = cluster(&rr).unwrap();
    assert_eq!(
        c.slow_start
            .map(|s| (s.window, s.aggression, s.min_weight_percent)),
        Some((Duration::from_secs(10), None, None))
    );
    // Another policy's config is not read, and a zero window is no slow start.
    rr.lb_policy = P::Random as i32;
    assert_eq!(cluster(&rr).unwrap().slow_start, None);
    let mut zero = lr.clone();
    zero.lb_config = Some(LbConfig::LeastRequestLbConfig(LeastRequestLbConfig {
        slow_start_config: Some(cds::cluster::SlowStartConfig::default()),
        ..Default::default()
    }));
    assert_eq!(cluster(&zero).unwrap().slow_start, None);
    let mut too_much = lr;
    too_much.lb_config = Some(LbConfig::LeastRequestLbConfig(LeastRequestLbConfig {
        slow_start_config: Some(cds::cluster::SlowStartConfig {
            min_weight_percent: Some(Percent { value: 150.0 }),
            ..warmup
        }),
        ..Default::default()
    }));
    assert_eq!(
        cluster(&too_much).unwrap_err().to_string(),
        "least_request_lb_config.slow_start_config.min_weight_percent: must be from 0 to 100"
    );
}
