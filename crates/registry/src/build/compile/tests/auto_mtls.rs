//! istiod's auto mutual TLS from files: endpoint TLS modes, the two transport socket
//! matches and when a cluster gets them, and the peer identities checked.

use portcullis_envoy::{Cluster, IstioMutual, StringPattern, TransportSocketMatch};

use super::*;
use crate::Snapshot;

/// A Service `api` in `shop` on port 80 (and a headless `db` on 3306) over a pod with a
/// sidecar running as `api-sa`, a pod without one (account `default`), and a VM entry with
/// a service account and no label.
const MESH: &str = "
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: api}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata:
  name: api-mesh
  namespace: shop
  labels: {app: api, version: v1, security.istio.io/tlsMode: istio}
spec:
  serviceAccountName: api-sa
  containers: [{name: app}]
status: {podIP: 10.244.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: api-plain, namespace: shop, labels: {app: api, version: v2}}
status: {podIP: 10.244.0.2}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm, namespace: shop}
spec: {address: 10.244.0.3, labels: {app: api, version: v1}, serviceAccount: vm-sa}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: None
  selector: {app: db}
  ports: [{name: tcp, port: 3306}]
---
apiVersion: v1
kind: Pod
metadata:
  name: db-0
  namespace: shop
  labels: {app: db, security.istio.io/tlsMode: istio}
spec: {serviceAccountName: db}
status: {podIP: 10.244.1.1}
";

const API: &str = "outbound|80||api.shop.svc.cluster.local";
const DB: &str = "outbound|3306||db.shop.svc.cluster.local";

/// The services of `MESH` with Istio's mesh config holding `data` (lines indented by four).
fn mesh(data: &str) -> String {
    format!(
        "{MESH}---
apiVersion: v1
kind: ConfigMap
metadata: {{name: istio, namespace: istio-system}}
data:
  mesh: |
    {data}
"
    )
}

fn cluster<'a>(c: &'a Compiled, name: &str) -> &'a Cluster {
    c.resources
        .clusters
        .get(name)
        .unwrap_or_else(|| panic!("no cluster {name}"))
        .as_ref()
}

/// Each endpoint's address with its `tlsMode` metadata (`-` when it has none).
fn tls_modes(c: &Compiled, name: &str) -> Vec<String> {
    let assignment = cluster(c, name)
        .load_assignment
        .as_ref()
        .expect("endpoints");
    let mut modes: Vec<String> = assignment
        .endpoints
        .iter()
        .flat_map(|g| &g.lb_endpoints)
        .map(|e| {
            let address = match &e.address {
                EndpointAddress::Socket(a) => a.to_string(),
                EndpointAddress::Name { host, port } => format!("{host}:{port}"),
            };
            let mode = e.transport_socket_match.get("tlsMode");
            format!("{address} {}", mode.map_or("-", String::as_str))
        })
        .collect();
    modes.sort();
    modes
}

/// The auto mTLS matches of a cluster: the Istio mutual TLS settings of `tlsMode-istio`,
/// after checking that plaintext `tlsMode-disabled` follows it.
fn auto_mutual(matches: &[TransportSocketMatch]) -> &IstioMutual {
    let [istio, disabled] = matches else {
        panic!("not istiod's two matches: {matches:?}");
    };
    assert_eq!(
        (istio.name.as_str(), disabled.name.as_str()),
        ("tlsMode-istio", "tlsMode-disabled")
    );
    assert_eq!(
        istio.match_metadata,
        BTreeMap::from([("tlsMode".to_string(), "istio".to_string())])
    );
    assert!(disabled.match_metadata.is_empty());
    assert_eq!(disabled.transport, UpstreamTransport::Plaintext);
    match &istio.transport {
        UpstreamTransport::IstioMutualTls(m) => m,
        other => panic!("not Istio mutual TLS: {other:?}"),
    }
}

fn sans(m: &IstioMutual) -> Vec<&str> {
    m.match_subject_alt_names
        .iter()
        .map(|s| match &s.pattern {
            StringPattern::Exact(v) => v.as_str(),
            other => panic!("not exact: {other:?}"),
        })
        .collect()
}

const API_ACCOUNTS: [&str; 3] = [
    "spiffe://cluster.local/ns/shop/sa/api-sa",
    "spiffe://cluster.local/ns/shop/sa/default",
    "spiffe://cluster.local/ns/shop/sa/vm-sa",
];

#[test]
fn endpoints_with_sidecars_get_istio_mutual_tls_and_the_others_plaintext() {
    let c = compiled_in(MESH, "shop", &|_| None);
    // A labelled pod, and a WorkloadEntry with a service account, have sidecars.
    assert_eq!(
        tls_modes(&c, API),
        [
            "10.244.0.1:8080 istio",
            "10.244.0.2:8080 -",
            "10.244.0.3:8080 istio"
        ]
    );
    let api = cluster(&c, API);
    assert_eq!(api.transport, UpstreamTransport::Plaintext);
    let m = auto_mutual(&api.transport_socket_matches);
    assert_eq!(
        m.sni.as_deref(),
        Some("outbound_.80_._.api.shop.svc.cluster.local")
    );
    assert_eq!(m.alpn_protocols, ["istio-peer-exchange", "istio"]);
    // Every workload's identity, sidecar or not, as istiod's ServiceAccounts.
    assert_eq!(sans(m), API_ACCOUNTS);
    // The data path picks per endpoint.
    let s = Snapshot::index(&c.resources, &|_| None, None, 1);
    let built = s.cluster(API).unwrap();
    let mutual: Vec<bool> = built
        .endpoints
        .iter()
        .map(|e| matches!(e.transport, crate::EndpointTransport::IstioMutual(_)))
        .collect();
    let addresses: Vec<String> = built
        .endpoints
        .iter()
        .map(|e| e.address.to_string())
        .collect();
    let by_address: BTreeMap<_, _> = addresses.iter().zip(mutual).collect();
    assert_eq!(
        by_address
            .into_iter()
            .map(|(a, m)| (a.as_str(), m))
            .collect::<Vec<_>>(),
        [
            ("10.244.0.1", true),
            ("10.244.0.2", false),
            ("10.244.0.3", true)
        ]
    );
}

#[test]
fn headless_services_get_mutual_tls_only_when_every_endpoint_has_a_sidecar() {
    let c = compiled_in(MESH, "shop", &|_| None);
    let db = cluster(&c, DB);
    assert!(db.transport_socket_matches.is_empty());
    let UpstreamTransport::IstioMutualTls(m) = &db.transport else {
        panic!("not Istio mutual TLS: {:?}", db.transport);
    };
    assert_eq!(
        m.sni.as_deref(),
        Some("outbound_.3306_._.db.shop.svc.cluster.local")
    );
    assert_eq!(sans(m), ["spiffe://cluster.local/ns/shop/sa/db"]);
    let with_plain = format!(
        "{MESH}---
apiVersion: v1
kind: Pod
metadata: {{name: db-1, namespace: shop, labels: {{app: db}}}}
status: {{podIP: 10.244.1.2}}
"
    );
    let c = compiled_in(&with_plain, "shop", &|_| None);
    let db = cluster(&c, DB);
    assert_eq!(db.transport, UpstreamTransport::Plaintext);
    assert!(db.transport_socket_matches.is_empty());
}

#[test]
fn a_destination_rule_with_tls_replaces_auto_mtls_and_subsets_get_their_own_sni() {
    let rule = |tls: &str| {
        format!(
            "{MESH}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: api, namespace: shop}}
spec:
  host: api.shop.svc.cluster.local
  trafficPolicy: {{loadBalancer: {{simple: ROUND_ROBIN}}{tls}}}
  subsets:
  - name: v1
    labels: {{version: v1}}
  - name: v2
    labels: {{version: v2}}
    trafficPolicy: {{tls: {{mode: DISABLE}}}}
"
        )
    };
    // A rule without tls keeps auto mTLS, subsets included, with the subset's SNI and the
    // service's identities.
    let c = compiled_in(&rule(""), "shop", &|_| None);
    let m = auto_mutual(&cluster(&c, API).transport_socket_matches);
    assert_eq!(sans(m), API_ACCOUNTS);
    let v1 = auto_mutual(
        &cluster(&c, "outbound|80|v1|api.shop.svc.cluster.local").transport_socket_matches,
    );
    assert_eq!(
        v1.sni.as_deref(),
        Some("outbound_.80_.v1_.api.shop.svc.cluster.local")
    );
    assert_eq!(sans(v1), API_ACCOUNTS);
    // A subset whose tls says DISABLE is plaintext to every endpoint.
    let v2 = cluster(&c, "outbound|80|v2|api.shop.svc.cluster.local");
    assert!(v2.transport_socket_matches.is_empty());
    assert_eq!(v2.transport, UpstreamTransport::Plaintext);
    // ISTIO_MUTUAL set by the rule: every endpoint, with the same identities.
    let c = compiled_in(&rule(", tls: {mode: ISTIO_MUTUAL}"), "shop", &|_| None);
    let api = cluster(&c, API);
    assert!(api.transport_socket_matches.is_empty());
    let UpstreamTransport::IstioMutualTls(m) = &api.transport else {
        panic!("not Istio mutual TLS: {:?}", api.transport);
    };
    assert_eq!(sans(m), API_ACCOUNTS);
    assert_eq!(
        m.sni.as_deref(),
        Some("outbound_.80_._.api.shop.svc.cluster.local")
    );
    // SIMPLE: the user's TLS, no auto mTLS, no service accounts for a Kubernetes Service.
    let c = compiled_in(&rule(", tls: {mode: SIMPLE}"), "shop", &|_| None);
    let api = cluster(&c, API);
    assert!(api.transport_socket_matches.is_empty());
    let UpstreamTransport::Tls(tls) = &api.transport else {
        panic!("not TLS: {:?}", api.transport);
    };
    assert!(
        tls.validation
            .as_ref()
            .unwrap()
            .match_subject_alt_names
            .is_empty()
    );
}

#[test]
fn service_entries_inside_the_mesh_only_with_their_subject_alt_names() {
    let entry = |location: &str| {
        se(
            "vms",
            &[
                "hosts: [vms.internal]",
                location,
                "resolution: STATIC",
                "ports: [{number: 8080, name: http, protocol: HTTP}]",
                "subjectAltNames: [spiffe://cluster.local/ns/default/sa/declared]",
                "endpoints:",
                "- {address: 10.1.0.1, labels: {security.istio.io/tlsMode: istio}}",
                "- {address: 10.1.0.2, serviceAccount: vm}",
                "- {address: 10.1.0.3, serviceAccount: legacy, labels: {security.istio.io/tlsMode: disabled}}",
            ],
        )
    };
    let c = compiled(&entry("location: MESH_INTERNAL"));
    let name = "outbound|8080||vms.internal";
    assert_eq!(
        tls_modes(&c, name),
        [
            "10.1.0.1:8080 istio",
            "10.1.0.2:8080 istio",
            "10.1.0.3:8080 -"
        ]
    );
    let m = auto_mutual(&cluster(&c, name).transport_socket_matches);
    assert_eq!(
        sans(m),
        [
            "spiffe://cluster.local/ns/default/sa/declared",
            "spiffe://cluster.local/ns/default/sa/legacy",
            "spiffe://cluster.local/ns/default/sa/vm",
        ]
    );
    // MESH_EXTERNAL (also Istio's default location): the metadata stays, no TLS.
    for location in ["location: MESH_EXTERNAL", ""] {
        let c = compiled(&entry(location));
        let vms = cluster(&c, name);
        assert!(vms.transport_socket_matches.is_empty(), "{location}");
        assert_eq!(vms.transport, UpstreamTransport::Plaintext);
        assert_eq!(tls_modes(&c, name)[0], "10.1.0.1:8080 istio");
    }
}

#[test]
fn the_mesh_config_turns_auto_mtls_off_and_names_the_trust_domain() {
    let c = compiled_in(&mesh("enableAutoMtls: false"), "shop", &|_| None);
    assert!(cluster(&c, API).transport_socket_matches.is_empty());
    assert_eq!(cluster(&c, DB).transport, UpstreamTransport::Plaintext);
    // The endpoints still say what they are, as istiod's do.
    assert_eq!(tls_modes(&c, API)[0], "10.244.0.1:8080 istio");
    let c = compiled_in(&mesh("trustDomain: example.org"), "shop", &|_| None);
    let m = auto_mutual(&cluster(&c, API).transport_socket_matches);
    assert_eq!(sans(m)[0], "spiffe://example.org/ns/shop/sa/api-sa");
    let c = compiled_in(&mesh("trustDomain: mesh@example.org"), "shop", &|_| None);
    let m = auto_mutual(&cluster(&c, API).transport_socket_matches);
    assert_eq!(sans(m)[0], "spiffe://mesh.example.org/ns/shop/sa/api-sa");
}

#[test]
fn trust_domain_aliases_add_each_identity_in_each_alias_domain() {
    let yaml =
        mesh("trustDomain: new.example\n    trustDomainAliases: [old.example, cluster.local]");
    let c = compiled_in(&yaml, "shop", &|_| None);
    let api = sans(auto_mutual(&cluster(&c, API).transport_socket_matches));
    let mut want: Vec<String> = ["api-sa", "default", "vm-sa"]
        .iter()
        .flat_map(|sa| {
            ["cluster.local", "new.example", "old.example"]
                .map(|td| format!("spiffe://{td}/ns/shop/sa/{sa}"))
        })
        .collect();
    want.sort();
    assert_eq!(api, want);
    // A DestinationRule's ISTIO_MUTUAL without SANs verifies the same; a headless
    // service's single identity likewise.
    let UpstreamTransport::IstioMutualTls(db) = &cluster(&c, DB).transport else {
        panic!("not Istio mutual TLS");
    };
    assert_eq!(
        sans(db),
        [
            "spiffe://cluster.local/ns/shop/sa/db",
            "spiffe://new.example/ns/shop/sa/db",
            "spiffe://old.example/ns/shop/sa/db",
        ]
    );
    // What is not a SPIFFE service-account identity stays as it is, alone.
    let accounts = BTreeSet::from([
        "spiffe://td/ns/a/sa/b".to_string(),
        "spiffe://td/other/path".to_string(),
        "api.example.com".to_string(),
    ]);
    assert_eq!(
        crate::build::with_trust_domain_aliases(accounts, &["alias".to_string()]),
        [
            "api.example.com",
            "spiffe://alias/ns/a/sa/b",
            "spiffe://td/ns/a/sa/b",
            "spiffe://td/other/path",
        ]
    );
}

#[test]
fn a_kubernetes_services_account_annotations_add_its_identities() {
    let yaml = MESH.replacen(
        "metadata: {name: api, namespace: shop}",
        "metadata:
  name: api
  namespace: shop
  annotations:
    alpha.istio.io/kubernetes-serviceaccounts: web,batch
    alpha.istio.io/canonical-serviceaccounts: spiffe://elsewhere/ns/x/sa/y,ops@example.com",
        1,
    );
    let c = compiled_in(&yaml, "shop", &|_| None);
    let m = auto_mutual(&cluster(&c, API).transport_socket_matches);
    let mut want = vec![
        "ops@example.com",
        "spiffe://cluster.local/ns/shop/sa/batch",
        "spiffe://cluster.local/ns/shop/sa/web",
        "spiffe://elsewhere/ns/x/sa/y",
    ];
    want.extend(API_ACCOUNTS);
    want.sort_unstable();
    assert_eq!(sans(m), want);
}

#[test]
fn http2_clusters_offer_h2_after_istios_alpn() {
    let yaml = MESH.replace("name: http, port: 80", "name: grpc, port: 80");
    let c = compiled_in(&yaml, "shop", &|_| None);
    let m = auto_mutual(&cluster(&c, API).transport_socket_matches);
    assert_eq!(m.alpn_protocols, ["istio-peer-exchange", "istio", "h2"]);
}

#[test]
fn a_namespace_or_mesh_peer_authentication_disabling_mtls_turns_auto_mtls_off() {
    let pa = |namespace: &str, extra: &str, mode: &str| {
        format!(
            "---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: pa, namespace: {namespace}}}
spec:
{extra}  mtls: {{mode: {mode}}}
"
        )
    };
    let auto = |policies: &[String]| {
        let c = compiled_in(&format!("{MESH}{}", policies.concat()), "shop", &|_| None);
        !cluster(&c, API).transport_socket_matches.is_empty()
    };
    assert!(auto(&[]));
    assert!(!auto(&[pa("shop", "", "DISABLE")]));
    assert!(auto(&[pa("shop", "", "STRICT")]));
    // Another namespace's policy is not the service's.
    assert!(auto(&[pa("other", "", "DISABLE")]));
    // The mesh's (root namespace), inherited by UNSET, overridden by the namespace's own.
    assert!(!auto(&[pa("istio-system", "", "DISABLE")]));
    assert!(!auto(&[
        pa("istio-system", "", "DISABLE"),
        pa("shop", "", "UNSET")
    ]));
    assert!(auto(&[
        pa("istio-system", "", "DISABLE"),
        pa("shop", "", "PERMISSIVE")
    ]));
    // Of two namespace-wide policies the oldest counts, then the first by name, wherever
    // they are in the files.
    let aged = |name: &str, created: &str, mode: &str| {
        pa("shop", "", mode).replacen(
            "{name: pa, namespace: shop}",
            &format!("{{name: {name}, namespace: shop, creationTimestamp: '{created}'}}"),
            1,
        )
    };
    assert!(!auto(&[
        aged("new", "2024-05-01T00:00:00Z", "STRICT"),
        aged("old", "2021-05-01T00:00:00Z", "DISABLE"),
    ]));
    assert!(auto(&[
        aged("new", "2024-05-01T00:00:00Z", "DISABLE"),
        aged("old", "2021-05-01T00:00:00Z", "STRICT"),
    ]));
    assert!(!auto(&[
        aged("b", "2021-05-01T00:00:00Z", "STRICT"),
        aged("a", "2021-05-01T00:00:00Z", "DISABLE"),
    ]));
    // A workload's own policy is not read for a service, as istiod's best-effort inference.
    assert!(auto(&[pa(
        "shop",
        "  selector: {matchLabels: {app: api}}\n",
        "DISABLE"
    )]));
}

#[test]
fn a_resolution_none_service_entry_is_mutual_tls_when_every_selected_workload_has_a_sidecar() {
    let entry = |workloads: &str| {
        format!(
            "{}---
{workloads}",
            se(
                "legacy",
                &[
                    "hosts: [legacy.internal]",
                    "location: MESH_INTERNAL",
                    "resolution: NONE",
                    "ports: [{number: 9000, name: tcp, protocol: TCP}]",
                    "workloadSelector: {labels: {app: legacy}}",
                ],
            )
        )
    };
    let vm = |name: &str, ip: &str, extra: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: {name}, namespace: default}}
spec: {{address: {ip}, labels: {{app: legacy}}{extra}}}
---
"
        )
    };
    let name = "outbound|9000||legacy.internal";
    // Both selected workloads have sidecars: Istio mutual TLS to any original destination,
    // verified against their identities (istiod's passthrough inference).
    let c = compiled(&entry(
        &[
            vm("a", "10.3.0.1", ", serviceAccount: legacy-a"),
            vm("b", "10.3.0.2", ", serviceAccount: legacy-b"),
        ]
        .concat(),
    ));
    let legacy = cluster(&c, name);
    assert!(matches!(legacy.discovery, Discovery::OriginalDst(_)));
    assert!(legacy.transport_socket_matches.is_empty());
    let UpstreamTransport::IstioMutualTls(m) = &legacy.transport else {
        panic!("not Istio mutual TLS: {:?}", legacy.transport);
    };
    assert_eq!(m.sni.as_deref(), Some("outbound_.9000_._.legacy.internal"));
    assert_eq!(
        sans(m),
        [
            "spiffe://cluster.local/ns/default/sa/legacy-a",
            "spiffe://cluster.local/ns/default/sa/legacy-b",
        ]
    );
    // One without a sidecar, or none selected: plaintext, as istiod infers it.
    for workloads in [
        [
            vm("a", "10.3.0.1", ", serviceAccount: legacy-a"),
            vm("b", "10.3.0.2", ""),
        ]
        .concat(),
        String::new(),
    ] {
        let c = compiled(&entry(&workloads));
        assert_eq!(cluster(&c, name).transport, UpstreamTransport::Plaintext);
    }
}
