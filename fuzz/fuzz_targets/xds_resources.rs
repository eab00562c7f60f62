//! xDS resources from a control plane: arbitrary bytes decoded as a `Listener`,
//! `RouteConfiguration`, `Cluster` or `ClusterLoadAssignment` (or as the `Any` of a SotW or
//! Delta response), converted and applied. Never panics; conversion is deterministic and
//! survives a protobuf round trip; an accepted resource renders as Envoy JSON; applying the
//! same response twice changes nothing; a rejected Delta resource leaves the valid one it
//! was to replace serving.
#![no_main]

use envoy_types::pb::envoy::config::{
    cluster::v3 as cds, core::v3 as core, endpoint::v3 as eds, listener::v3 as lds,
    route::v3 as rds,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_proxy;
use envoy_types::pb::envoy::service::discovery::v3::Resource;
use envoy_types::pb::google::protobuf::Any;
use envoy_types::util::pack_any;
use libfuzzer_sys::fuzz_target;
use portcullis_envoy::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, json};
use portcullis_xds_resources::{Invalid, XdsState};
use prost::Message;

/// Decodes `bytes` as `P`, converts it, and checks that converting its re-encoding agrees.
fn convert<P: Message + Default, T: PartialEq + std::fmt::Debug>(
    bytes: &[u8],
    f: impl Fn(&P) -> Result<T, Invalid>,
) -> Option<T> {
    let proto = P::decode(bytes).ok()?;
    let first = f(&proto);
    let again = f(&P::decode(proto.encode_to_vec().as_slice()).expect("re-encoded proto decodes"));
    assert_eq!(
        first, again,
        "conversion is deterministic across a round trip"
    );
    first.ok()
}

const TYPES: [&str; 4] = [LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    match selector % 6 {
        0 => {
            if let Some(l) = convert::<lds::Listener, _>(bytes, portcullis_xds_resources::listener)
            {
                let _ = json::listener(&l);
            }
        }
        1 => {
            if let Some(r) = convert::<rds::RouteConfiguration, _>(
                bytes,
                portcullis_xds_resources::route_configuration,
            ) {
                let _ = json::route_configuration(&r);
            }
        }
        2 => {
            if let Some(c) = convert::<cds::Cluster, _>(bytes, portcullis_xds_resources::cluster) {
                let _ = json::cluster(&c);
            }
        }
        3 => {
            if let Some(a) = convert::<eds::ClusterLoadAssignment, _>(bytes, |a| {
                portcullis_xds_resources::load_assignment(a, true)
            }) {
                let _ = json::load_assignment(&a);
            }
        }
        4 => {
            // A SotW response of one type: the bytes as one resource of it, applied twice.
            let type_url = TYPES[usize::from(selector / 6) % TYPES.len()];
            let any = Any {
                type_url: type_url.to_string(),
                value: bytes.to_vec(),
            };
            let mut state = XdsState::default();
            let first = state.apply_sotw(type_url, "1", std::slice::from_ref(&any));
            let active = state.active();
            let again = state.apply_sotw(type_url, "1", std::slice::from_ref(&any));
            assert_eq!(first, again);
            assert_eq!(active, state.active());
        }
        _ => {
            // A Delta response: the bytes as a `Resource`, whatever type its `Any` claims,
            // replacing a valid resource of the same name that serves.
            let Ok(resource) = Resource::decode(bytes) else {
                return;
            };
            for type_url in TYPES {
                let mut state = XdsState::default();
                if !resource.name.is_empty() {
                    let serving = serving(type_url, &resource.name);
                    let applied = state.apply_delta(type_url, &[serving], &[]);
                    assert_eq!(applied.rejected, [], "the serving {type_url} converts");
                }
                let before = state.active();
                let applied = state.apply_delta(type_url, std::slice::from_ref(&resource), &[]);
                assert!(applied.rejected.len() <= 1);
                if !applied.rejected.is_empty() {
                    assert_eq!(
                        state.active(),
                        before,
                        "a rejected resource leaves what serves as it was"
                    );
                }
                // Removal by the name the resource was added under leaves nothing behind.
                if !resource.name.is_empty() {
                    state.apply_delta(type_url, &[], std::slice::from_ref(&resource.name));
                    assert_eq!(state.active(), portcullis_envoy::Resources::default());
                }
            }
        }
    }
});

/// A valid resource of the type, named `name`, that needs nothing else to be active.
fn serving(type_url: &str, name: &str) -> Resource {
    let any = match type_url {
        LISTENER_TYPE => pack_any(lds::Listener {
            name: name.to_string(),
            address: Some(core::Address {
                address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                    address: "127.0.0.1".to_string(),
                    port_specifier: Some(core::socket_address::PortSpecifier::PortValue(15001)),
                    ..Default::default()
                })),
            }),
            filter_chains: vec![lds::FilterChain {
                filters: vec![lds::Filter {
                    name: "envoy.filters.network.tcp_proxy".to_string(),
                    config_type: Some(lds::filter::ConfigType::TypedConfig(pack_any(
                        tcp_proxy::TcpProxy {
                            stat_prefix: "BlackHoleCluster".to_string(),
                            cluster_specifier: Some(
                                tcp_proxy::tcp_proxy::ClusterSpecifier::Cluster(
                                    "BlackHoleCluster".to_string(),
                                ),
                            ),
                            ..Default::default()
                        },
                    ))),
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ROUTE_TYPE => pack_any(rds::RouteConfiguration {
            name: name.to_string(),
            ..Default::default()
        }),
        CLUSTER_TYPE => pack_any(cds::Cluster {
            name: name.to_string(),
            cluster_discovery_type: Some(cds::cluster::ClusterDiscoveryType::Type(
                cds::cluster::DiscoveryType::Static as i32,
            )),
            connect_timeout: Some(envoy_types::pb::google::protobuf::Duration {
                seconds: 1,
                nanos: 0,
            }),
            ..Default::default()
        }),
        _ => pack_any(eds::ClusterLoadAssignment {
            cluster_name: name.to_string(),
            ..Default::default()
        }),
    };
    Resource {
        name: name.to_string(),
        version: "serving".to_string(),
        resource: Some(any),
        ..Default::default()
    }
}
