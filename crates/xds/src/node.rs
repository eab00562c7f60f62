//! The node istio-agent presents to istiod, built from the env Istio's injector sets.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::google::protobuf::{ListValue, NullValue, Struct, Value, value::Kind};

/// Env prefix of plain node metadata (key without the prefix, value as a string).
const META_PREFIX: &str = "ISTIO_META_";
/// Env prefix of JSON node metadata (the object's keys merged into the metadata).
const META_JSON_PREFIX: &str = "ISTIO_METAJSON_";
/// The Istio release whose sidecar xDS shapes portcullis follows; istiod gates features on
/// `ISTIO_VERSION`, and `ISTIO_META_ISTIO_VERSION` overrides it.
const ISTIO_VERSION: &str = "1.28.0";
/// The label Kubernetes' Deployment controller adds; istio-agent leaves it out of LABELS.
const POD_TEMPLATE_HASH: &str = "pod-template-hash";
/// Labels `APP` of the node's cluster is read from, in istio-agent's order.
const APP_LABELS: [&str; 3] = [
    "app",
    "app.kubernetes.io/name",
    "service.istio.io/canonical-name",
];

/// Values given on the command line; each wins over its env var.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeOverrides {
    /// `POD_NAME`.
    pub pod_name: Option<String>,
    /// `POD_NAMESPACE`.
    pub pod_namespace: Option<String>,
    /// `INSTANCE_IP`.
    pub instance_ip: Option<String>,
    /// `SERVICE_ACCOUNT`.
    pub service_account: Option<String>,
    /// `ISTIO_META_CLUSTER_ID`.
    pub cluster_id: Option<String>,
    /// `ISTIO_META_MESH_ID`.
    pub mesh_id: Option<String>,
    /// The pod's labels (e.g. [`parse_downward_api`] of `/etc/istio/pod/labels`); without
    /// them, `ISTIO_METAJSON_LABELS`.
    pub labels: Option<BTreeMap<String, String>>,
    /// `ISTIO_LOCALITY`, `region/zone/subzone`.
    pub locality: Option<String>,
}

/// The node of every stream: id, cluster and metadata as istio-agent builds them.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeIdentity {
    /// `sidecar~INSTANCE_IP~POD_NAME.POD_NAMESPACE~POD_NAMESPACE.svc.cluster.local`.
    pub id: String,
    /// `APP.NAMESPACE`.
    pub cluster: String,
    /// The metadata istiod reads (NAMESPACE, LABELS, CLUSTER_ID, ...), as JSON.
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// `region/zone/subzone`, as istio-agent sends it in the node's `locality`.
    pub locality: String,
}

impl NodeIdentity {
    /// Builds the node from env vars (e.g. `std::env::vars()`) and command-line overrides.
    pub fn from_env(
        vars: impl IntoIterator<Item = (String, String)>,
        overrides: &NodeOverrides,
    ) -> Self {
        let env: HashMap<String, String> = vars.into_iter().collect();
        let get = |key: &str| env.get(key).filter(|v| !v.is_empty()).cloned();
        let mut meta = serde_json::Map::new();

        // istio-agent's order: ProxyConfig's proxyMetadata, then ISTIO_META_*, then the
        // objects of ISTIO_METAJSON_*, then the typed fields below, which win.
        let proxy_config = get("PROXY_CONFIG")
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .filter(serde_json::Value::is_object);
        if let Some(proxy_metadata) = proxy_config
            .as_ref()
            .and_then(|pc| pc.get("proxyMetadata"))
            .and_then(serde_json::Value::as_object)
        {
            for (key, value) in proxy_metadata {
                if let Some(key) = key.strip_prefix(META_PREFIX) {
                    meta.insert(key.to_owned(), value.clone());
                }
            }
        }
        let mut sorted: Vec<_> = env.iter().collect();
        sorted.sort();
        for (key, value) in &sorted {
            if let Some(key) = key.strip_prefix(META_PREFIX) {
                meta.insert(key.to_owned(), serde_json::Value::String((*value).clone()));
            }
        }
        for (key, value) in &sorted {
            if key.starts_with(META_JSON_PREFIX) {
                match serde_json::from_str::<serde_json::Value>(value) {
                    Ok(serde_json::Value::Object(object)) => meta.extend(object),
                    _ => tracing::warn!(env = %key, "node metadata env var is not a JSON object"),
                }
            }
        }

        let namespace = overrides
            .pod_namespace
            .clone()
            .or_else(|| get("POD_NAMESPACE"))
            .unwrap_or_default();
        let pod_name = overrides
            .pod_name
            .clone()
            .or_else(|| get("POD_NAME"))
            .unwrap_or_default();
        let instance_ip = overrides
            .instance_ip
            .clone()
            .or_else(|| get("INSTANCE_IP"))
            .and_then(|ip| ip.parse::<IpAddr>().ok())
            .map(|ip| ip.to_string())
            .unwrap_or_default();
        let labels: BTreeMap<String, String> = match &overrides.labels {
            Some(labels) => labels
                .iter()
                .filter(|(k, _)| *k != POD_TEMPLATE_HASH)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            None => get("ISTIO_METAJSON_LABELS")
                .and_then(|text| serde_json::from_str(&text).ok())
                .unwrap_or_default(),
        };
        let text = |s: &str| serde_json::Value::String(s.to_owned());
        let mut set = |key: &str, value: Option<String>| {
            if let Some(value) = value.filter(|v| !v.is_empty()) {
                meta.insert(key.to_owned(), serde_json::Value::String(value));
            }
        };
        set("NAMESPACE", Some(namespace.clone()));
        set("NAME", Some(pod_name.clone()));
        set(
            "SERVICE_ACCOUNT",
            overrides
                .service_account
                .clone()
                .or_else(|| get("SERVICE_ACCOUNT")),
        );
        set("INSTANCE_IPS", Some(instance_ip.clone()));
        set(
            "CLUSTER_ID",
            overrides
                .cluster_id
                .clone()
                .or_else(|| get("ISTIO_META_CLUSTER_ID")),
        );
        set(
            "MESH_ID",
            overrides
                .mesh_id
                .clone()
                .or_else(|| get("ISTIO_META_MESH_ID")),
        );
        if !meta.contains_key("ISTIO_VERSION") {
            meta.insert("ISTIO_VERSION".into(), text(ISTIO_VERSION));
        }
        if !meta.contains_key("INTERCEPTION_MODE") {
            meta.insert("INTERCEPTION_MODE".into(), text("REDIRECT"));
        }
        if !labels.is_empty() {
            let labels = labels.iter().map(|(k, v)| (k.clone(), text(v))).collect();
            meta.insert("LABELS".into(), serde_json::Value::Object(labels));
        }
        if let Some(proxy_config) = proxy_config {
            meta.insert("PROXY_CONFIG".into(), proxy_config);
        }

        let workload = meta.get("WORKLOAD_NAME").and_then(|v| v.as_str());
        let app = APP_LABELS
            .iter()
            .find_map(|key| labels.get(*key).filter(|v| !v.is_empty()))
            .map(String::as_str);
        let cluster = match (app.or(workload), namespace.is_empty()) {
            (Some(name), _) => format!("{name}.{namespace}"),
            (None, false) => format!("istio-proxy.{namespace}"),
            (None, true) => "istio-proxy".to_owned(),
        };
        let id =
            format!("sidecar~{instance_ip}~{pod_name}.{namespace}~{namespace}.svc.cluster.local");
        Self {
            id,
            cluster,
            metadata: meta,
            locality: overrides
                .locality
                .clone()
                .or_else(|| get("ISTIO_LOCALITY"))
                .unwrap_or_default(),
        }
    }

    /// The Envoy `Node` message sent on the first request of each stream.
    pub fn to_node(&self) -> Node {
        Node {
            id: self.id.clone(),
            cluster: self.cluster.clone(),
            metadata: Some(json_object_to_struct(&self.metadata)),
            user_agent_name: "portcullis".to_owned(),
            locality: (!self.locality.is_empty()).then(|| {
                let mut parts = self.locality.splitn(3, '/').map(str::to_owned);
                let mut next = || parts.next().unwrap_or_default();
                Locality {
                    region: next(),
                    zone: next(),
                    sub_zone: next(),
                }
            }),
            ..Node::default()
        }
    }
}

/// Parses the downward API's `key="value"` lines (`/etc/istio/pod/labels`) into a map.
pub fn parse_downward_api(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some((key, quoted)) = line.split_once('=') else {
            continue;
        };
        let value: String = serde_json::from_str(quoted)
            .map_err(|e| format!("cannot unquote the value of {key}: {e}"))?;
        out.insert(key.to_owned(), value);
    }
    Ok(out)
}

fn json_object_to_struct(object: &serde_json::Map<String, serde_json::Value>) -> Struct {
    Struct {
        fields: object
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    }
}

fn json_to_value(value: &serde_json::Value) -> Value {
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(NullValue::NullValue as i32),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(object) => Kind::StructValue(json_object_to_struct(object)),
    };
    Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Istio's injection template sets on a Deployment's pod.
    fn injected_env() -> Vec<(String, String)> {
        [
            ("POD_NAME", "reviews-v1-7d8f9c-abcde"),
            ("POD_NAMESPACE", "bookinfo"),
            ("INSTANCE_IP", "10.244.1.17"),
            ("SERVICE_ACCOUNT", "bookinfo-reviews"),
            ("HOST_IP", "172.18.0.2"),
            ("CA_ADDR", "istiod.istio-system.svc:15012"),
            (
                "ISTIO_META_POD_PORTS",
                "[\n{\"name\":\"http\",\"containerPort\":9080,\"protocol\":\"TCP\"}\n]",
            ),
            ("ISTIO_META_APP_CONTAINERS", "reviews"),
            ("ISTIO_META_CLUSTER_ID", "Kubernetes"),
            ("ISTIO_META_NODE_NAME", "kind-worker"),
            ("ISTIO_META_INTERCEPTION_MODE", "REDIRECT"),
            ("ISTIO_META_WORKLOAD_NAME", "reviews-v1"),
            (
                "ISTIO_META_OWNER",
                "kubernetes://apis/apps/v1/namespaces/bookinfo/deployments/reviews-v1",
            ),
            ("ISTIO_META_MESH_ID", "cluster.local"),
            ("TRUST_DOMAIN", "cluster.local"),
            (
                "PROXY_CONFIG",
                "{\"discoveryAddress\":\"istiod.istio-system.svc:15012\",\"proxyMetadata\":{\"ISTIO_META_DNS_CAPTURE\":\"true\"}}\n",
            ),
            ("PATH", "/usr/bin"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    fn labels() -> BTreeMap<String, String> {
        parse_downward_api(
            "app=\"reviews\"\npod-template-hash=\"7d8f9c\"\nsecurity.istio.io/tlsMode=\"istio\"\nversion=\"v1\"",
        )
        .unwrap()
    }

    #[test]
    fn id_and_cluster_are_istio_agents() {
        let overrides = NodeOverrides {
            labels: Some(labels()),
            ..NodeOverrides::default()
        };
        let node = NodeIdentity::from_env(injected_env(), &overrides);
        assert_eq!(
            node.id,
            "sidecar~10.244.1.17~reviews-v1-7d8f9c-abcde.bookinfo~bookinfo.svc.cluster.local"
        );
        assert_eq!(node.cluster, "reviews.bookinfo");
    }

    #[test]
    fn metadata_is_istio_agents() {
        let overrides = NodeOverrides {
            labels: Some(labels()),
            ..NodeOverrides::default()
        };
        let node = NodeIdentity::from_env(injected_env(), &overrides);
        let expected = serde_json::json!({
            "NAMESPACE": "bookinfo",
            "NAME": "reviews-v1-7d8f9c-abcde",
            "SERVICE_ACCOUNT": "bookinfo-reviews",
            "INSTANCE_IPS": "10.244.1.17",
            "CLUSTER_ID": "Kubernetes",
            "MESH_ID": "cluster.local",
            "ISTIO_VERSION": ISTIO_VERSION,
            "INTERCEPTION_MODE": "REDIRECT",
            "WORKLOAD_NAME": "reviews-v1",
            "NODE_NAME": "kind-worker",
            "APP_CONTAINERS": "reviews",
            "OWNER": "kubernetes://apis/apps/v1/namespaces/bookinfo/deployments/reviews-v1",
            "POD_PORTS": "[\n{\"name\":\"http\",\"containerPort\":9080,\"protocol\":\"TCP\"}\n]",
            "DNS_CAPTURE": "true",
            "LABELS": {"app": "reviews", "security.istio.io/tlsMode": "istio", "version": "v1"},
            "PROXY_CONFIG": {
                "discoveryAddress": "istiod.istio-system.svc:15012",
                "proxyMetadata": {"ISTIO_META_DNS_CAPTURE": "true"},
            },
        });
        assert_eq!(serde_json::Value::Object(node.metadata.clone()), expected);

        let proto = node.to_node();
        let fields = proto.metadata.unwrap().fields;
        let Some(Kind::StructValue(labels)) = fields["LABELS"].kind.clone() else {
            panic!("LABELS is not a Struct");
        };
        assert_eq!(
            labels.fields["app"].kind,
            Some(Kind::StringValue("reviews".into()))
        );
    }

    #[test]
    fn overrides_win_over_the_env() {
        let overrides = NodeOverrides {
            pod_name: Some("p".into()),
            pod_namespace: Some("ns".into()),
            instance_ip: Some("fd00::5".into()),
            service_account: Some("sa".into()),
            cluster_id: Some("east".into()),
            mesh_id: Some("mesh1".into()),
            labels: None,
            locality: None,
        };
        let node = NodeIdentity::from_env(injected_env(), &overrides);
        assert_eq!(node.id, "sidecar~fd00::5~p.ns~ns.svc.cluster.local");
        assert_eq!(
            node.cluster, "reviews-v1.ns",
            "workload name without an app label"
        );
        assert_eq!(node.metadata["CLUSTER_ID"], "east");
        assert_eq!(node.metadata["MESH_ID"], "mesh1");
        assert_eq!(node.metadata["SERVICE_ACCOUNT"], "sa");
        assert!(!node.metadata.contains_key("LABELS"));
    }

    #[test]
    fn labels_from_metajson_and_the_bare_minimum() {
        let env = [
            ("POD_NAMESPACE", "default"),
            (
                "ISTIO_METAJSON_LABELS",
                "{\"app.kubernetes.io/name\":\"web\"}",
            ),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let node = NodeIdentity::from_env(env, &NodeOverrides::default());
        assert_eq!(node.cluster, "web.default");
        assert_eq!(node.id, "sidecar~~.default~default.svc.cluster.local");
        assert_eq!(
            node.metadata["LABELS"],
            serde_json::json!({"app.kubernetes.io/name": "web"})
        );

        let bare = NodeIdentity::from_env(Vec::new(), &NodeOverrides::default());
        assert_eq!(bare.cluster, "istio-proxy");
        assert_eq!(bare.metadata["INTERCEPTION_MODE"], "REDIRECT");
    }

    #[test]
    fn downward_api_rejects_an_unquoted_value() {
        assert!(parse_downward_api("app=reviews").is_err());
        assert_eq!(parse_downward_api("no equals sign\n").unwrap().len(), 0);
    }

    #[test]
    fn locality_is_sent_as_istio_agent_sends_it() {
        let env = [("ISTIO_LOCALITY", "us-east1/us-east1-b/rack1")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let node = NodeIdentity::from_env(env.clone(), &NodeOverrides::default()).to_node();
        let l = node.locality.expect("locality");
        assert_eq!(
            (l.region.as_str(), l.zone.as_str(), l.sub_zone.as_str()),
            ("us-east1", "us-east1-b", "rack1")
        );
        let overrides = NodeOverrides {
            locality: Some("eu".into()),
            ..NodeOverrides::default()
        };
        let l = NodeIdentity::from_env(env, &overrides).to_node().locality;
        assert_eq!(
            l.map(|l| (l.region, l.zone)),
            Some(("eu".into(), String::new()))
        );
        let none = NodeIdentity::from_env([], &NodeOverrides::default()).to_node();
        assert!(none.locality.is_none());
    }
}
