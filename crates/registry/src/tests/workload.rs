//! The workload behind each endpoint from files, as istiod would describe it in
//! `filter_metadata.istio.workload`.

use super::{cluster, load};
use crate::{BuildOptions, Cluster, build, build_with_dns, compile};

/// `address:port workload` of each endpoint, sorted; `-` without one.
fn workloads(c: &Cluster) -> Vec<String> {
    let mut out: Vec<String> = c
        .endpoints
        .iter()
        .map(|e| {
            let w = e.workload.as_ref().map_or("-".into(), |w| w.to_string());
            format!("{} {w}", e.display())
        })
        .collect();
    out.sort();
    out
}

fn in_cluster(yaml: &str, cluster_id: &str) -> crate::Snapshot {
    let options = BuildOptions {
        namespace: "shop".into(),
        cluster_id: cluster_id.into(),
        ..BuildOptions::default()
    };
    build(&load(yaml), &options, None, 1)
}

const SHOP: &str = "
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {role: api}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata:
  name: api-7d4b9-abcde
  namespace: shop
  generateName: api-7d4b9-
  labels: {role: api, app: shop-api, version: v2, pod-template-hash: 7d4b9}
  ownerReferences:
  - {apiVersion: apps/v1, kind: ReplicaSet, name: api-7d4b9, controller: true, uid: x}
spec:
  containers: [{name: main}]
status: {podIP: 10.244.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: api-debug, namespace: shop, labels: {role: api}}
spec:
  containers: [{name: main}]
status: {podIP: 10.244.1.2}
---
apiVersion: v1
kind: Pod
metadata:
  name: nightly-28391040-q7x
  namespace: shop
  generateName: nightly-28391040-
  labels: {role: api, service.istio.io/canonical-name: batch, service.istio.io/canonical-revision: '3'}
  ownerReferences: [{kind: Job, name: nightly-28391040, controller: true}]
spec:
  containers: [{name: main}]
status: {podIP: 10.244.1.3}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: vm-1
  namespace: shop
  labels: {service.istio.io/workload-name: api-vms, app.kubernetes.io/version: '1.3'}
spec:
  address: 10.50.0.1
  labels: {role: api, app.kubernetes.io/name: api-vm, app.kubernetes.io/version: '1.2'}
";

#[test]
fn pods_and_workload_entries_of_a_kubernetes_service_carry_istiods_workload() {
    let s = in_cluster(SHOP, "east");
    assert_eq!(
        workloads(cluster(&s, "outbound|80||api.shop.svc.cluster.local")),
        [
            // Deployment `api` (ReplicaSet minus the template hash), app and version.
            "10.244.1.1:8080 api;shop;shop-api;v2;east",
            // A bare pod: its own name, canonical service too, revision `latest` left out.
            "10.244.1.2:8080 api-debug;shop;api-debug;;east",
            // A CronJob's Job: the CronJob, the canonical labels as they are.
            "10.244.1.3:8080 nightly;shop;batch;3;east",
            // The workload-name label names the entry; its metadata labels win over its
            // spec labels.
            "10.50.0.1:8080 api-vms;shop;api-vm;1.3;east",
        ]
    );
    // Without a cluster id, istiod's default.
    let s = build(&load(SHOP), &BuildOptions::default(), None, 1);
    let c = cluster(&s, "outbound|80||api.shop.svc.cluster.local");
    assert!(
        c.endpoints
            .iter()
            .all(|e| &*e.workload.as_ref().unwrap().cluster == "Kubernetes"),
        "{:?}",
        workloads(c)
    );
}

#[test]
fn service_entry_endpoints_carry_the_workload_istiod_gives_them() {
    let yaml = "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vms, namespace: shop}
spec:
  hosts: [vms.internal]
  location: MESH_INTERNAL
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  workloadSelector: {labels: {role: vm}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: vm-1
  namespace: shop
  annotations: {istio.io/autoRegistrationGroup: billing}
spec:
  address: 10.50.0.1
  labels: {role: vm, app: billing, version: v1}
---
apiVersion: v1
kind: Pod
metadata: {name: vm-pod, namespace: shop, labels: {role: vm}}
spec:
  containers: [{name: main}]
status: {podIP: 10.244.2.1}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: shop}
spec:
  hosts: [db.internal]
  location: MESH_INTERNAL
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  resolution: STATIC
  endpoints:
  - {address: 10.60.0.1}
  - {address: 10.60.0.2, labels: {app: pg, version: '16'}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payments, namespace: shop}
spec:
  hosts: [api.payments.example]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
";
    let answers = |host: &str| {
        (host == "api.payments.example")
            .then(|| std::sync::Arc::from(["93.184.216.34".parse().unwrap()]))
    };
    let options = BuildOptions {
        namespace: "shop".into(),
        ..BuildOptions::default()
    };
    let s = build_with_dns(&load(yaml), &options, None, 1, &answers);
    assert_eq!(
        workloads(cluster(&s, "outbound|80||vms.internal")),
        [
            "10.244.2.1:80 vm-pod;shop;vm-pod;;Kubernetes",
            // An auto-registered entry is its WorkloadGroup's.
            "10.50.0.1:80 billing;shop;billing;v1;Kubernetes",
        ]
    );
    // Inline endpoints are `SERVICEENTRY-INDEX`.
    assert_eq!(
        workloads(cluster(&s, "outbound|5432||db.internal")),
        [
            "10.60.0.1:5432 db-0;shop;db-0;;Kubernetes",
            "10.60.0.2:5432 db-1;shop;pg;16;Kubernetes",
        ]
    );
    // The host of a DNS ServiceEntry without endpoints is the ServiceEntry's workload,
    // on every address it resolves to (Envoy copies an endpoint's metadata to its hosts).
    assert_eq!(
        workloads(cluster(&s, "outbound|443||api.payments.example")),
        ["93.184.216.34:443 payments;shop;payments;;Kubernetes"]
    );
}

#[test]
fn the_compiled_endpoints_show_the_workload_as_envoy_dumps_it() {
    let options = BuildOptions {
        namespace: "shop".into(),
        ..BuildOptions::default()
    };
    let compiled = compile(&load(SHOP), &options, &|_| None);
    let name = "outbound|80||api.shop.svc.cluster.local";
    let c = &compiled.resources.clusters[name];
    let json = portcullis_envoy::json::cluster(c);
    let endpoints = json["load_assignment"]["endpoints"][0]["lb_endpoints"]
        .as_array()
        .expect("endpoints");
    let first = endpoints
        .iter()
        .find(|e| e["endpoint"]["address"]["socket_address"]["address"] == "10.244.1.1")
        .expect("the deployment's pod");
    assert_eq!(
        first["metadata"]["filter_metadata"]["istio"],
        serde_json::json!({"workload": "api;shop;shop-api;v2;Kubernetes"})
    );
}
