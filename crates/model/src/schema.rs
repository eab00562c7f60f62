//! The field names of the real Istio and Kubernetes schemas, for the kinds portcullis reads.
//!
//! Taken from Istio's API protos (`networking/v1alpha3/*.proto`, `type/v1beta1`) and
//! Kubernetes' `core/v1` and `meta/v1` types (kubernetes/api as of July 2026). Every field of a kind's top level and of the
//! parts portcullis deserialises is listed, so that an unknown key there is a misspelling,
//! never a field portcullis merely ignores. Parts portcullis does not read (a container's
//! probes, a header matcher's map) are [`Field::Any`]: their contents are not checked.

use crate::shape::{Node, Pos, Value};

/// What a field may hold.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Field {
    /// Anything; not looked into.
    Any,
    /// A mapping with these fields.
    Object(&'static [(&'static str, Field)]),
    /// A list of mappings with these fields.
    List(&'static [(&'static str, Field)]),
}

use Field::{Any, List, Object};

/// Kubernetes `ObjectMeta`.
const META: Field = Object(&[
    ("name", Any),
    ("generateName", Any),
    ("namespace", Any),
    ("selfLink", Any),
    ("uid", Any),
    ("resourceVersion", Any),
    ("generation", Any),
    ("creationTimestamp", Any),
    ("deletionTimestamp", Any),
    ("deletionGracePeriodSeconds", Any),
    ("labels", Any),
    ("annotations", Any),
    ("ownerReferences", Any),
    ("finalizers", Any),
    ("managedFields", Any),
]);

/// `istio.networking.v1alpha3.WorkloadSelector` (`labels`).
const SELECTOR: Field = Object(&[("labels", Any)]);

/// `istio.type.v1beta1.WorkloadSelector` (`matchLabels`), used by DestinationRule.
const MATCH_SELECTOR: Field = Object(&[("matchLabels", Any)]);

const WORKLOAD_ENTRY: &[(&str, Field)] = &[
    ("address", Any),
    ("ports", Any),
    ("labels", Any),
    ("network", Any),
    ("locality", Any),
    ("weight", Any),
    ("serviceAccount", Any),
];

const SERVICE_ENTRY: &[(&str, Field)] = &[
    ("hosts", Any),
    ("addresses", Any),
    (
        "ports",
        List(&[
            ("number", Any),
            ("protocol", Any),
            ("name", Any),
            ("targetPort", Any),
        ]),
    ),
    ("location", Any),
    ("resolution", Any),
    ("endpoints", List(WORKLOAD_ENTRY)),
    ("workloadSelector", SELECTOR),
    ("exportTo", Any),
    ("subjectAltNames", Any),
];

/// `istio.networking.v1alpha3.LoadBalancerSettings.ConsistentHashLB`.
const CONSISTENT_HASH: Field = Object(&[
    ("httpHeaderName", Any),
    (
        "httpCookie",
        Object(&[
            ("name", Any),
            ("path", Any),
            ("ttl", Any),
            ("attributes", Any),
        ]),
    ),
    ("useSourceIp", Any),
    ("httpQueryParameterName", Any),
    ("ringHash", Object(&[("minimumRingSize", Any)])),
    ("maglev", Object(&[("tableSize", Any)])),
    ("minimumRingSize", Any),
]);

const LOAD_BALANCER: Field = Object(&[
    ("simple", Any),
    ("consistentHash", CONSISTENT_HASH),
    ("localityLbSetting", Any),
    ("zoneAwareLbSetting", Any),
    ("warmupDurationSecs", Any),
    (
        "warmup",
        Object(&[
            ("duration", Any),
            ("minimumPercent", Any),
            ("aggression", Any),
        ]),
    ),
]);

/// `istio.networking.v1alpha3.ClientTLSSettings`.
const CLIENT_TLS: Field = Object(&[
    ("mode", Any),
    ("clientCertificate", Any),
    ("privateKey", Any),
    ("caCertificates", Any),
    ("credentialName", Any),
    ("subjectAltNames", Any),
    ("sni", Any),
    ("insecureSkipVerify", Any),
    ("caCrl", Any),
]);

const TRAFFIC_POLICY: Field = Object(&[
    ("loadBalancer", LOAD_BALANCER),
    ("connectionPool", Any),
    ("outlierDetection", Any),
    ("tls", CLIENT_TLS),
    (
        "portLevelSettings",
        List(&[
            ("port", Any),
            ("loadBalancer", LOAD_BALANCER),
            ("connectionPool", Any),
            ("outlierDetection", Any),
            ("tls", CLIENT_TLS),
        ]),
    ),
    ("tunnel", Any),
    ("proxyProtocol", Any),
    ("retryBudget", Any),
]);

const DESTINATION_RULE: &[(&str, Field)] = &[
    ("host", Any),
    ("trafficPolicy", TRAFFIC_POLICY),
    (
        "subsets",
        List(&[
            ("name", Any),
            ("labels", Any),
            ("trafficPolicy", TRAFFIC_POLICY),
        ]),
    ),
    ("exportTo", Any),
    ("workloadSelector", MATCH_SELECTOR),
];

/// `Destination`.
const DESTINATION: Field = Object(&[
    ("host", Any),
    ("subset", Any),
    ("port", Object(&[("number", Any)])),
]);

const HEADER_OPERATIONS: Field = Object(&[("set", Any), ("add", Any), ("remove", Any)]);

/// `Headers`.
const HEADERS: Field = Object(&[
    ("request", HEADER_OPERATIONS),
    ("response", HEADER_OPERATIONS),
]);

/// `StringMatch`.
const STRING_MATCH: Field = Object(&[("exact", Any), ("prefix", Any), ("regex", Any)]);

const PERCENT: Field = Object(&[("value", Any)]);

const HTTP_ROUTE: &[(&str, Field)] = &[
    ("name", Any),
    (
        "match",
        List(&[
            ("name", Any),
            ("uri", STRING_MATCH),
            ("scheme", STRING_MATCH),
            ("method", STRING_MATCH),
            ("authority", STRING_MATCH),
            ("headers", Any),
            ("port", Any),
            ("sourceLabels", Any),
            ("gateways", Any),
            ("queryParams", Any),
            ("ignoreUriCase", Any),
            ("withoutHeaders", Any),
            ("sourceNamespace", Any),
            ("statPrefix", Any),
        ]),
    ),
    (
        "route",
        List(&[
            ("destination", DESTINATION),
            ("weight", Any),
            ("headers", HEADERS),
        ]),
    ),
    (
        "redirect",
        Object(&[
            ("uri", Any),
            ("authority", Any),
            ("port", Any),
            ("derivePort", Any),
            ("scheme", Any),
            ("redirectCode", Any),
        ]),
    ),
    (
        "directResponse",
        Object(&[
            ("status", Any),
            ("body", Object(&[("string", Any), ("bytes", Any)])),
        ]),
    ),
    ("delegate", Any),
    (
        "rewrite",
        Object(&[
            ("uri", Any),
            ("authority", Any),
            (
                "uriRegexRewrite",
                Object(&[("match", Any), ("rewrite", Any)]),
            ),
        ]),
    ),
    ("timeout", Any),
    (
        "retries",
        Object(&[
            ("attempts", Any),
            ("perTryTimeout", Any),
            ("retryOn", Any),
            ("retryRemoteLocalities", Any),
            ("retryIgnorePreviousHosts", Any),
            ("backoff", Any),
        ]),
    ),
    (
        "fault",
        Object(&[
            (
                "delay",
                Object(&[
                    ("fixedDelay", Any),
                    ("exponentialDelay", Any),
                    ("percentage", PERCENT),
                    ("percent", Any),
                ]),
            ),
            (
                "abort",
                Object(&[
                    ("httpStatus", Any),
                    ("grpcStatus", Any),
                    ("http2Error", Any),
                    ("percentage", PERCENT),
                ]),
            ),
        ]),
    ),
    ("mirror", DESTINATION),
    (
        "mirrors",
        List(&[("destination", DESTINATION), ("percentage", PERCENT)]),
    ),
    ("mirrorPercent", Any),
    ("mirrorPercentage", PERCENT),
    ("corsPolicy", Any),
    ("headers", HEADERS),
];

/// `RouteDestination` of TLS and TCP routes.
const ROUTE_DESTINATION: &[(&str, Field)] = &[("destination", DESTINATION), ("weight", Any)];

const VIRTUAL_SERVICE: &[(&str, Field)] = &[
    ("hosts", Any),
    ("gateways", Any),
    ("http", List(HTTP_ROUTE)),
    (
        "tls",
        List(&[
            (
                "match",
                List(&[
                    ("sniHosts", Any),
                    ("destinationSubnets", Any),
                    ("port", Any),
                    ("sourceLabels", Any),
                    ("gateways", Any),
                    ("sourceNamespace", Any),
                ]),
            ),
            ("route", List(ROUTE_DESTINATION)),
        ]),
    ),
    (
        "tcp",
        List(&[
            (
                "match",
                List(&[
                    ("destinationSubnets", Any),
                    ("port", Any),
                    ("sourceSubnet", Any),
                    ("sourceLabels", Any),
                    ("gateways", Any),
                    ("sourceNamespace", Any),
                ]),
            ),
            ("route", List(ROUTE_DESTINATION)),
        ]),
    ),
    ("exportTo", Any),
];

const SIDECAR: &[(&str, Field)] = &[
    ("workloadSelector", SELECTOR),
    ("ingress", Any),
    (
        "egress",
        List(&[
            ("port", Any),
            ("bind", Any),
            ("captureMode", Any),
            ("hosts", Any),
        ]),
    ),
    ("inboundConnectionPool", Any),
    (
        "outboundTrafficPolicy",
        Object(&[("mode", Any), ("egressProxy", Any)]),
    ),
];

const PEER_AUTHENTICATION: &[(&str, Field)] = &[
    ("selector", Object(&[("matchLabels", Any)])),
    ("mtls", Object(&[("mode", Any)])),
    ("portLevelMtls", Any),
];

const CONTAINER: &[(&str, Field)] = &[
    ("name", Any),
    ("image", Any),
    ("command", Any),
    ("args", Any),
    ("workingDir", Any),
    (
        "ports",
        List(&[
            ("name", Any),
            ("hostPort", Any),
            ("containerPort", Any),
            ("protocol", Any),
            ("hostIP", Any),
        ]),
    ),
    ("envFrom", Any),
    ("env", Any),
    ("resources", Any),
    ("resizePolicy", Any),
    ("restartPolicy", Any),
    ("restartPolicyRules", Any),
    ("volumeMounts", Any),
    ("volumeDevices", Any),
    ("livenessProbe", Any),
    ("readinessProbe", Any),
    ("startupProbe", Any),
    ("lifecycle", Any),
    ("terminationMessagePath", Any),
    ("terminationMessagePolicy", Any),
    ("imagePullPolicy", Any),
    ("securityContext", Any),
    ("stdin", Any),
    ("stdinOnce", Any),
    ("tty", Any),
];

const POD_SPEC: Field = Object(&[
    ("volumes", Any),
    ("initContainers", Any),
    ("containers", List(CONTAINER)),
    ("ephemeralContainers", Any),
    ("restartPolicy", Any),
    ("terminationGracePeriodSeconds", Any),
    ("activeDeadlineSeconds", Any),
    ("dnsPolicy", Any),
    ("nodeSelector", Any),
    ("serviceAccountName", Any),
    ("serviceAccount", Any),
    ("automountServiceAccountToken", Any),
    ("nodeName", Any),
    ("hostNetwork", Any),
    ("hostPID", Any),
    ("hostIPC", Any),
    ("shareProcessNamespace", Any),
    ("securityContext", Any),
    ("imagePullSecrets", Any),
    ("hostname", Any),
    ("hostnameOverride", Any),
    ("subdomain", Any),
    ("affinity", Any),
    ("schedulerName", Any),
    ("tolerations", Any),
    ("hostAliases", Any),
    ("priorityClassName", Any),
    ("priority", Any),
    ("dnsConfig", Any),
    ("readinessGates", Any),
    ("runtimeClassName", Any),
    ("enableServiceLinks", Any),
    ("preemptionPolicy", Any),
    ("overhead", Any),
    ("topologySpreadConstraints", Any),
    ("setHostnameAsFQDN", Any),
    ("os", Any),
    ("hostUsers", Any),
    ("schedulingGates", Any),
    ("resourceClaims", Any),
    ("resources", Any),
    ("workloadRef", Any),
    ("schedulingGroup", Any),
    ("evictionResponders", Any),
]);

const POD_STATUS: Field = Object(&[
    ("observedGeneration", Any),
    ("phase", Any),
    (
        "conditions",
        List(&[
            ("type", Any),
            ("observedGeneration", Any),
            ("status", Any),
            ("lastProbeTime", Any),
            ("lastTransitionTime", Any),
            ("reason", Any),
            ("message", Any),
        ]),
    ),
    ("message", Any),
    ("reason", Any),
    ("nominatedNodeName", Any),
    ("hostIP", Any),
    ("hostIPs", Any),
    ("podIP", Any),
    ("podIPs", List(&[("ip", Any)])),
    ("startTime", Any),
    ("initContainerStatuses", Any),
    ("containerStatuses", Any),
    ("qosClass", Any),
    ("ephemeralContainerStatuses", Any),
    ("resize", Any),
    ("resourceClaimStatuses", Any),
    ("extendedResourceClaimStatus", Any),
    ("allocatedResources", Any),
    ("resources", Any),
    ("nodeAllocatableResourceClaimStatuses", Any),
    ("volumeHealth", Any),
]);

const SERVICE_SPEC: Field = Object(&[
    (
        "ports",
        List(&[
            ("name", Any),
            ("protocol", Any),
            ("appProtocol", Any),
            ("port", Any),
            ("targetPort", Any),
            ("nodePort", Any),
        ]),
    ),
    ("selector", Any),
    ("clusterIP", Any),
    ("clusterIPs", Any),
    ("type", Any),
    ("externalIPs", Any),
    ("sessionAffinity", Any),
    ("loadBalancerIP", Any),
    ("loadBalancerSourceRanges", Any),
    ("externalName", Any),
    ("externalTrafficPolicy", Any),
    ("healthCheckNodePort", Any),
    ("publishNotReadyAddresses", Any),
    ("sessionAffinityConfig", Any),
    ("topologyKeys", Any),
    ("ipFamily", Any),
    ("ipFamilies", Any),
    ("ipFamilyPolicy", Any),
    ("allocateLoadBalancerNodePorts", Any),
    ("loadBalancerClass", Any),
    ("internalTrafficPolicy", Any),
    ("trafficDistribution", Any),
]);

/// An Istio resource: its spec's fields, and the status istiod writes.
macro_rules! istio {
    ($spec:expr) => {
        Object(&[
            ("apiVersion", Any),
            ("kind", Any),
            ("metadata", META),
            ("spec", Object($spec)),
            ("status", Any),
        ])
    };
}

/// The whole document of each kind portcullis reads, by kind as written.
pub(crate) fn document(kind: &str) -> Option<Field> {
    Some(match kind {
        "ServiceEntry" => istio!(SERVICE_ENTRY),
        "WorkloadEntry" => istio!(WORKLOAD_ENTRY),
        "DestinationRule" => istio!(DESTINATION_RULE),
        "VirtualService" => istio!(VIRTUAL_SERVICE),
        "Sidecar" => istio!(SIDECAR),
        "PeerAuthentication" => istio!(PEER_AUTHENTICATION),
        "Pod" => Object(&[
            ("apiVersion", Any),
            ("kind", Any),
            ("metadata", META),
            ("spec", POD_SPEC),
            ("status", POD_STATUS),
        ]),
        "Service" => Object(&[
            ("apiVersion", Any),
            ("kind", Any),
            ("metadata", META),
            ("spec", SERVICE_SPEC),
            ("status", Any),
        ]),
        "Node" => Object(&[
            ("apiVersion", Any),
            ("kind", Any),
            ("metadata", META),
            ("spec", Any),
            ("status", Any),
        ]),
        "ConfigMap" => Object(&[
            ("apiVersion", Any),
            ("kind", Any),
            ("metadata", META),
            ("data", Any),
            ("binaryData", Any),
            ("immutable", Any),
        ]),
        "Secret" => Object(&[
            ("apiVersion", Any),
            ("kind", Any),
            ("metadata", META),
            ("type", Any),
            ("data", Any),
            ("stringData", Any),
            ("immutable", Any),
        ]),
        "List" => Object(&[
            ("apiVersion", Any),
            ("kind", Any),
            ("metadata", Any),
            ("items", Any),
        ]),
        _ => return None,
    })
}

/// A key the schema does not have.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Unknown {
    /// Where the key is written.
    pub at: Pos,
    /// The mapping it is in, `spec.ports[0]`; empty at the top level.
    pub path: String,
    /// The key.
    pub key: String,
    /// The known field it is probably a misspelling of.
    pub suggestion: Option<&'static str>,
}

/// Every key under `node` that `field` does not define.
pub(crate) fn unknown_fields(node: &Node, field: Field) -> Vec<Unknown> {
    let mut out = Vec::new();
    walk(node, field, &mut String::new(), &mut out);
    out
}

fn walk(node: &Node, field: Field, path: &mut String, out: &mut Vec<Unknown>) {
    match (field, &node.value) {
        (Object(fields), Value::Map(entries)) => {
            for (key, at, value) in entries {
                // `<<` merges another mapping in; its keys are checked where they are written.
                if key == "<<" {
                    continue;
                }
                match fields.iter().find(|(name, _)| name == key) {
                    Some((_, inner)) => {
                        let len = path.len();
                        if !path.is_empty() {
                            path.push('.');
                        }
                        path.push_str(key);
                        walk(value, *inner, path, out);
                        path.truncate(len);
                    }
                    None => out.push(Unknown {
                        at: *at,
                        path: path.clone(),
                        key: key.clone(),
                        suggestion: closest(key, fields.iter().map(|(name, _)| *name)),
                    }),
                }
            }
        }
        (List(fields), Value::Seq(items)) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                walk(item, Object(fields), path, out);
                path.truncate(len);
            }
        }
        // Wrong types are serde's to report, with what it expected.
        _ => {}
    }
}

/// The candidate `word` is most likely a misspelling of: the same apart from case and
/// `_`/`-` (`workload_selector`), or within an edit distance of a third of its length.
pub(crate) fn closest<'a>(
    word: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    let folded = fold(word);
    let limit = (word.chars().count() / 3).clamp(1, 3);
    candidates
        .map(|c| {
            let distance = if fold(c) == folded {
                0
            } else {
                edit_distance(word, c)
            };
            (distance, c)
        })
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn fold(word: &str) -> String {
    word.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

/// Levenshtein distance, counting an adjacent swap as one edit.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut before: Vec<usize> = (0..=b.len()).collect();
    let mut previous = before.clone();
    let mut current = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        current[0] = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            current[j] = (previous[j] + 1)
                .min(current[j - 1] + 1)
                .min(previous[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                current[j] = current[j].min(before[j - 2] + 1);
            }
        }
        std::mem::swap(&mut before, &mut previous);
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::parse;

    fn unknown(kind: &str, text: &str) -> Vec<(u64, u64, String, String, Option<&'static str>)> {
        let node = parse(text).expect("parses").expect("a document");
        unknown_fields(&node, document(kind).expect("a kind"))
            .into_iter()
            .map(|u| (u.at.line, u.at.column, u.path, u.key, u.suggestion))
            .collect()
    }

    #[test]
    fn misspelt_fields_are_found_where_they_are_written() {
        let found = unknown(
            "ServiceEntry",
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: x, labelz: {}}
spec:
  hosts: [a.example.com]
  adresses: [10.0.0.1]
  locaton: MESH_EXTERNAL
  ports:
  - {number: 80, name: http, protocl: HTTP}
  workload_selector: {labels: {}}
  endpoints:
  - address: 10.0.0.2
    wieght: 2
  frobnicate: true
",
        );
        assert_eq!(
            found,
            [
                (3, 21, "metadata".into(), "labelz".into(), Some("labels")),
                (6, 3, "spec".into(), "adresses".into(), Some("addresses")),
                (7, 3, "spec".into(), "locaton".into(), Some("location")),
                (
                    9,
                    30,
                    "spec.ports[0]".into(),
                    "protocl".into(),
                    Some("protocol")
                ),
                (
                    10,
                    3,
                    "spec".into(),
                    "workload_selector".into(),
                    Some("workloadSelector")
                ),
                (
                    13,
                    5,
                    "spec.endpoints[0]".into(),
                    "wieght".into(),
                    Some("weight")
                ),
                (14, 3, "spec".into(), "frobnicate".into(), None),
            ]
        );
    }

    #[test]
    fn real_kubectl_output_has_no_unknown_fields() {
        let pod = "apiVersion: v1
kind: Pod
metadata:
  annotations: {kubectl.kubernetes.io/restartedAt: '2026-01-01T00:00:00Z'}
  creationTimestamp: '2026-01-01T00:00:00Z'
  generateName: web-7d4b9-
  labels: {app: web, pod-template-hash: 7d4b9}
  managedFields:
  - apiVersion: v1
    fieldsType: FieldsV1
    fieldsV1: {f:metadata: {}}
    manager: kube-controller-manager
    operation: Update
    time: '2026-01-01T00:00:00Z'
  name: web-7d4b9-abcde
  namespace: shop
  ownerReferences:
  - {apiVersion: apps/v1, blockOwnerDeletion: true, controller: true, kind: ReplicaSet, name: web-7d4b9, uid: 1}
  resourceVersion: '123'
  uid: 0b6c
spec:
  containers:
  - image: nginx:1.27
    imagePullPolicy: IfNotPresent
    name: app
    ports: [{containerPort: 8080, name: http, protocol: TCP}]
    readinessProbe: {httpGet: {path: /, port: 8080}}
    resources: {}
    terminationMessagePath: /dev/termination-log
    terminationMessagePolicy: File
    volumeMounts: [{mountPath: /var/run/secrets, name: kube-api-access, readOnly: true}]
  dnsPolicy: ClusterFirst
  enableServiceLinks: true
  nodeName: node-1
  preemptionPolicy: PreemptLowerPriority
  priority: 0
  restartPolicy: Always
  schedulerName: default-scheduler
  securityContext: {}
  serviceAccount: default
  serviceAccountName: default
  terminationGracePeriodSeconds: 30
  tolerations: [{effect: NoExecute, key: node.kubernetes.io/not-ready, operator: Exists}]
  volumes: [{name: kube-api-access, projected: {}}]
status:
  conditions:
  - {lastProbeTime: null, lastTransitionTime: '2026-01-01T00:00:00Z', status: 'True', type: Ready}
  containerStatuses: [{name: app, ready: true, restartCount: 0}]
  hostIP: 192.168.1.10
  hostIPs: [{ip: 192.168.1.10}]
  phase: Running
  podIP: 10.244.1.5
  podIPs: [{ip: 10.244.1.5}]
  qosClass: BestEffort
  startTime: '2026-01-01T00:00:00Z'
";
        assert_eq!(unknown("Pod", pod), []);
        let service = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, resourceVersion: '9', uid: x, creationTimestamp: null}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  internalTrafficPolicy: Cluster
  ipFamilies: [IPv4]
  ipFamilyPolicy: SingleStack
  ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080}]
  selector: {app: web}
  sessionAffinity: None
  type: ClusterIP
status: {loadBalancer: {}}
";
        assert_eq!(unknown("Service", service), []);
    }

    #[test]
    fn istio_fields_portcullis_does_not_use_are_known() {
        let dr = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: d}
spec:
  host: a.example.com
  workloadSelector: {matchLabels: {app: web}}
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 10}}
    outlierDetection: {consecutive5xxErrors: 3}
    tls: {mode: SIMPLE}
    loadBalancer: {simple: ROUND_ROBIN, warmupDurationSecs: 10s}
  subsets: [{name: v1, labels: {version: v1}}]
status: {conditions: []}
";
        assert_eq!(unknown("DestinationRule", dr), []);
        let sidecar = "apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: s}
spec:
  outboundTrafficPolicy: {mode: REGISTRY_ONLY, egressProxy: {host: egress}}
  egress: [{hosts: ['./*'], port: {number: 80}, captureMode: DEFAULT}]
  ingress: [{port: {number: 9080}, defaultEndpoint: '127.0.0.1:8080'}]
";
        assert_eq!(unknown("Sidecar", sidecar), []);
    }

    #[test]
    fn virtual_service_fields_are_checked_to_the_leaves() {
        let vs = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: v}
spec:
  hosts: [a.example.com]
  http:
  - name: r
    match: [{uri: {prefix: /}, headers: {x: {exact: y}}, statPrefix: s}]
    route: [{destination: {host: a, subset: v1, port: {number: 80}}, weight: 100, headers: {request: {set: {a: b}}}}]
    retries: {attempts: 2, perTryTimeout: 1s, retryOn: 5xx, retryRemoteLocalities: true}
    fault: {delay: {fixedDelay: 1s, percentage: {value: 1}}, abort: {httpStatus: 500, percentage: {value: 1}}}
    mirror: {host: b}
    mirrorPercentage: {value: 5}
    corsPolicy: {allowOrigins: [{exact: x}]}
  tls: [{match: [{sniHosts: [a.example.com]}], route: [{destination: {host: a}}]}]
  tcp: [{match: [{port: 5432}], route: [{destination: {host: a}, weight: 1}]}]
";
        assert_eq!(unknown("VirtualService", vs), []);
        let misspelt = "kind: VirtualService
spec:
  http:
  - retrys: {attempts: 1}
    route: [{destination: {hots: a}}]
    redirect: {code: 302}
  tls: [{match: [{sni: [a]}]}]
";
        let keys: Vec<(String, String)> = unknown("VirtualService", misspelt)
            .into_iter()
            .map(|(_, _, path, key, _)| (path, key))
            .collect();
        assert_eq!(
            keys,
            [
                ("spec.http[0]".into(), "retrys".into()),
                ("spec.http[0].route[0].destination".into(), "hots".into()),
                ("spec.http[0].redirect".into(), "code".into()),
                ("spec.tls[0].match[0]".into(), "sni".into()),
            ]
        );
    }

    #[test]
    fn merge_keys_and_nesting_are_not_fields() {
        let text = "apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: w}
spec:
  <<: {address: 10.0.0.1}
  labels: {a: b}
";
        assert_eq!(unknown("WorkloadEntry", text), []);
        let deep = format!(
            "kind: VirtualService\nspec:\n  http: {}1{}\n",
            "[".repeat(100),
            "]".repeat(100)
        );
        assert_eq!(unknown("VirtualService", &deep), []);
        let hostile = format!("a: {}", "[".repeat(100_000));
        assert!(parse(&hostile).is_err(), "the parser's nesting limit holds");
    }

    #[test]
    fn suggestions() {
        let kinds = ["ServiceEntry", "WorkloadEntry", "Sidecar"];
        assert_eq!(
            closest("ServiceEntyr", kinds.into_iter()),
            Some("ServiceEntry")
        );
        assert_eq!(
            closest("serviceentry", kinds.into_iter()),
            Some("ServiceEntry")
        );
        assert_eq!(closest("Sidcar", kinds.into_iter()), Some("Sidecar"));
        assert_eq!(closest("Gateway", kinds.into_iter()), None);
        assert_eq!(closest("ab", ["xy"].into_iter()), None);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("abc", "acb"), 1);
    }
}
