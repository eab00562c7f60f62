//! Envoy JSON (the shape istiod sends and [`super::istio`] writes) to protobuf
//! `google.protobuf.Any`, through a descriptor pool of Envoy's own .proto files that
//! `build.rs` compiles: every nested `typed_config` with an `@type` is encoded as the message
//! it names, so the control plane serves exactly the bytes istiod would.

use std::sync::OnceLock;

use anyhow::{Context, bail};
use envoy_types::pb::google::protobuf::Any;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, SerializeOptions};
use serde_json::Value;

/// Where every type URL of Envoy's API starts.
const TYPE_PREFIX: &str = "type.googleapis.com/";

/// The FileDescriptorSet `build.rs` wrote.
static DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptors.bin"));

/// Envoy's messages: the four resource types and the extensions the lab's resources name.
fn pool() -> anyhow::Result<&'static DescriptorPool> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(DESCRIPTORS).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("Envoy's descriptors do not decode: {e}"))
}

/// Encodes `json`, the proto3 JSON of the message `type_url` names (`type.googleapis.com/`
/// and its full name), as an `Any`. Unknown fields are an error, as in Envoy's own JSON
/// loading, so a misspelt field cannot silently vanish from what the proxies get.
pub fn encode(type_url: &str, json: &Value) -> anyhow::Result<Any> {
    let name = type_url
        .strip_prefix(TYPE_PREFIX)
        .with_context(|| format!("{type_url} does not start with {TYPE_PREFIX}"))?;
    let Some(descriptor) = pool()?.get_message_by_name(name) else {
        bail!("no message {name} among the compiled Envoy protos (see tests/build.rs)");
    };
    let message = DynamicMessage::deserialize_with_options(
        descriptor,
        json,
        &DeserializeOptions::new().deny_unknown_fields(true),
    )
    .with_context(|| format!("{json} is not a valid {name}"))?;
    Ok(Any {
        type_url: type_url.to_owned(),
        value: prost::Message::encode_to_vec(&message),
    })
}

/// The proto3 JSON of `any`'s message, with the field names as the .proto files spell them
/// (Envoy's own style).
pub fn to_json(any: &Any) -> anyhow::Result<Value> {
    let name = any
        .type_url
        .strip_prefix(TYPE_PREFIX)
        .with_context(|| format!("{} does not start with {TYPE_PREFIX}", any.type_url))?;
    let descriptor = pool()?
        .get_message_by_name(name)
        .with_context(|| format!("no message {name} among the compiled Envoy protos"))?;
    let message = DynamicMessage::decode(descriptor, any.value.as_slice())
        .with_context(|| format!("the bytes are not a {name}"))?;
    Ok(message.serialize_with_options(
        serde_json::value::Serializer,
        &SerializeOptions::new()
            .use_proto_field_name(true)
            .skip_default_fields(false),
    )?)
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
    use prost::Message as _;
    use serde_json::json;

    use super::*;
    use crate::envoy::istio::{self, Mode};

    const LISTENER: &str = istio::LISTENER_TYPE;

    /// Encoding then decoding gives the same JSON back, typed configs included: nothing is
    /// lost on the way to the control plane.
    #[test]
    fn resources_round_trip_with_their_typed_configs() {
        let resources = istio::Resources::new(Mode::RegistryOnly)
            .listener(istio::http_listener(
                80,
                vec![istio::service_vhost("a.com", 80, &[])],
                Mode::RegistryOnly,
            ))
            .listener(istio::tls_listener(443, &["b.com"], Mode::RegistryOnly))
            .cluster(istio::static_cluster(80, "a.com", &[("10.0.0.1", 80)]));
        let xds = resources.xds();
        let mut count = 0;
        for (type_url, json) in xds.all() {
            let any = encode(type_url, json).unwrap();
            assert_eq!(any.type_url, type_url);
            let back = to_json(&any).unwrap();
            if let Err(path) = contains(&back, json, type_url) {
                panic!("{path} did not survive the round trip:\n{json:#}\n{back:#}");
            }
            count += 1;
        }
        // virtualOutbound, 0.0.0.0_80, 0.0.0.0_443; route 80; 3 clusters; one assignment.
        assert_eq!(count, 8);
    }

    /// The bytes are what Envoy's generated types read: the HTTP listener's connection
    /// manager decodes from its nested Any, and the cluster and assignment keep their fields.
    #[test]
    fn encoded_bytes_decode_as_envoys_types() {
        let xds = istio::Resources::new(Mode::AllowAny)
            .listener(istio::http_listener(
                80,
                vec![istio::service_vhost("a.com", 80, &[])],
                Mode::AllowAny,
            ))
            .cluster(istio::static_cluster(80, "a.com", &[("10.0.0.1", 8080)]))
            .xds();
        let http = xds
            .listeners
            .iter()
            .find(|l| l["name"] == "0.0.0.0_80")
            .unwrap();
        let listener = Listener::decode(encode(LISTENER, http).unwrap().value.as_slice()).unwrap();
        let filter = &listener.filter_chains[0].filters[0];
        let Some(envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(
            any,
        )) = &filter.config_type
        else {
            panic!("no typed_config in {filter:?}");
        };
        let hcm = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
        assert_eq!(hcm.stat_prefix, "outbound_0.0.0.0_80");
        assert_eq!(hcm.http_filters.len(), 4);

        let route = RouteConfiguration::decode(
            encode(istio::ROUTE_TYPE, &xds.routes[0])
                .unwrap()
                .value
                .as_slice(),
        )
        .unwrap();
        assert_eq!(route.name, "80");
        assert_eq!(route.virtual_hosts[0].domains, ["a.com"]);
        assert_eq!(route.virtual_hosts[1].name, "allow_any");

        let cluster = xds
            .clusters
            .iter()
            .find(|c| c["name"] == "outbound|80||a.com")
            .unwrap();
        let cluster = Cluster::decode(
            encode(istio::CLUSTER_TYPE, cluster)
                .unwrap()
                .value
                .as_slice(),
        )
        .unwrap();
        assert_eq!(
            cluster.eds_cluster_config.unwrap().service_name,
            "outbound|80||a.com"
        );
        let cla = ClusterLoadAssignment::decode(
            encode(istio::ENDPOINT_TYPE, &xds.endpoints[0])
                .unwrap()
                .value
                .as_slice(),
        )
        .unwrap();
        assert_eq!(cla.endpoints[0].lb_endpoints.len(), 1);
    }

    #[test]
    fn a_misspelt_field_or_unknown_type_is_an_error() {
        let misspelt = json!({ "name": "x", "adress": {} });
        assert!(encode(LISTENER, &misspelt).is_err());
        let unknown_any = json!({
            "name": "x",
            "listener_filters": [{ "name": "f", "typed_config": { "@type": "type.googleapis.com/no.such.Type" } }]
        });
        assert!(encode(LISTENER, &unknown_any).is_err());
        assert!(encode("type.googleapis.com/no.such.Type", &json!({})).is_err());
    }

    /// Whether every value of `input` is in `output` unchanged (`output`, printed with its
    /// defaults, may hold more); the path of the first one that is not.
    fn contains(output: &Value, input: &Value, path: &str) -> Result<(), String> {
        match (output, input) {
            (Value::Object(out), Value::Object(inp)) => {
                for (key, value) in inp {
                    let at = format!("{path}.{key}");
                    contains(out.get(key).ok_or(at.clone())?, value, &at)?;
                }
                Ok(())
            }
            (Value::Array(out), Value::Array(inp)) if out.len() == inp.len() => out
                .iter()
                .zip(inp)
                .enumerate()
                .try_for_each(|(i, (o, v))| contains(o, v, &format!("{path}[{i}]"))),
            (out, inp) if same_scalar(out, inp) => Ok(()),
            _ => Err(path.to_owned()),
        }
    }

    /// Equal scalars, reading a duration's "10.000s" as "10s" and a 64-bit integer printed as
    /// a string as its number.
    fn same_scalar(a: &Value, b: &Value) -> bool {
        let text = |v: &Value| match v {
            Value::String(s) => match s.strip_suffix('s').and_then(|n| n.parse::<f64>().ok()) {
                Some(seconds) => format!("{seconds}s"),
                None => s.clone(),
            },
            other => other.to_string(),
        };
        text(a) == text(b)
    }
}
