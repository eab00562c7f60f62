//! Services, workloads, namespaces and the Sidecar as istiod compiles them, end to end:
//! which service a host means, which workloads serve it, and what the Sidecar lets through.

use anyhow::ensure;
use portcullis_e2e::scenario::{
    self, APP_HOST, APP_VIP, EXTERNAL_IP, EXTERNAL_MARK, IN_CLUSTER_IP, IN_CLUSTER_MARK, ROGUE_IP,
};
use portcullis_e2e::{Lab, RELOAD_DEADLINE, Reply, Role, poll, run};

/// REGISTRY_ONLY with `files` written, rules installed, portcullis running.
fn start(lab: &mut Lab, files: &[(&str, String)]) -> anyhow::Result<()> {
    lab.write_registry_only()?;
    for (name, yaml) in files {
        lab.write_config(name, yaml)?;
    }
    lab.apply_iptables()?;
    lab.start_portcullis(&[])
}

/// `curl http://host/` dialled at `ip`, so that only the Host header names the service.
fn get(lab: &mut Lab, host: &str, ip: &str) -> anyhow::Result<Reply> {
    lab.curl(&[
        "--resolve",
        &format!("{host}:80:{ip}"),
        &format!("http://{host}/"),
    ])
}

/// A ServiceEntry `name` in `namespace` for `host` on `port` (HTTP), one static endpoint.
fn entry(name: &str, namespace: &str, host: &str, port: u16, endpoint: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  hosts: [{host}]
  ports: [{{number: {port}, name: http-{port}, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: {endpoint}}}]
"
    )
}

/// A Kubernetes Service `name` in `namespace` selecting `app: external` on port 80;
/// `cluster_ip` may be `None` (headless).
fn kube_service(name: &str, namespace: &str, cluster_ip: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  clusterIP: {cluster_ip}
  selector: {{app: external}}
  ports: [{{name: http, port: 80}}]
"
    )
}

/// The scenario's WorkloadEntry (10.50.0.1, `app: external`) with health checks on and its
/// `Healthy` condition set to `healthy`.
fn checked_workload_entry(healthy: &str) -> String {
    scenario::WORKLOAD_ENTRY.replace(
        "  namespace: default\n",
        "  namespace: default\n  annotations: {proxy.istio.io/health-checks-enabled: 'true'}\n",
    ) + &format!("status:\n  conditions: [{{type: Healthy, status: '{healthy}'}}]\n")
}

/// A WorkloadEntry whose `Healthy` condition is False is no endpoint; once True it is again.
#[test]
fn unhealthy_workload_entries_take_no_traffic() {
    run("we-health", |lab| {
        start(
            lab,
            &[
                ("serviceentry.yaml", scenario::SERVICE_ENTRY.to_string()),
                ("pod.yaml", scenario::POD.to_string()),
                ("workloadentry.yaml", checked_workload_entry("False")),
            ],
        )?;
        let before = lab.nginx_requests(Role::External);
        for i in 0..8 {
            get(lab, APP_HOST, APP_VIP)?.expect_page(
                &format!("request {i}, the entry unhealthy"),
                IN_CLUSTER_MARK,
            )?;
        }
        ensure!(
            lab.nginx_requests(Role::External) == before,
            "the unhealthy WorkloadEntry {EXTERNAL_IP} was sent requests"
        );
        lab.write_config("workloadentry.yaml", &checked_workload_entry("True"))?;
        poll("the healthy entry serves again", RELOAD_DEADLINE, || {
            Ok(get(lab, APP_HOST, APP_VIP)?
                .body
                .contains(EXTERNAL_MARK)
                .then_some(()))
        })
    });
}

/// A Kubernetes Service selects WorkloadEntries as well as Pods.
#[test]
fn kubernetes_services_select_workload_entries() {
    run("svc-we", |lab| {
        start(
            lab,
            &[
                (
                    "service.yaml",
                    kube_service("shop", "default", "10.50.200.2"),
                ),
                ("workloadentry.yaml", scenario::WORKLOAD_ENTRY.to_string()),
            ],
        )?;
        for host in ["shop.default.svc.cluster.local", "shop"] {
            get(lab, host, "10.50.200.2")?.expect_page(
                &format!("{host}, served by the WorkloadEntry"),
                EXTERNAL_MARK,
            )?;
        }
        Ok(())
    });
}

/// A host defined in several namespaces is the proxy's own namespace's service, with its
/// ports only; and a Kubernetes Service beats a ServiceEntry that claims its name.
#[test]
fn one_namespace_serves_a_host_and_kubernetes_services_win() {
    run("svc-namespaces", |lab| {
        let pod_in_shop = scenario::POD.replace("namespace: default", "namespace: shop");
        start(
            lab,
            &[
                (
                    "theirs.yaml",
                    entry("dup", "team-a", "dup.internal.com", 80, EXTERNAL_IP),
                ),
                (
                    "mine.yaml",
                    entry("dup", "default", "dup.internal.com", 8080, IN_CLUSTER_IP),
                ),
                ("service.yaml", kube_service("shop", "shop", "10.50.200.3")),
                ("pod.yaml", pod_in_shop),
                (
                    "squat.yaml",
                    entry(
                        "squat",
                        "shop",
                        "shop.shop.svc.cluster.local",
                        80,
                        EXTERNAL_IP,
                    ),
                ),
            ],
        )?;
        let before = lab.nginx_requests(Role::External);
        get(lab, "dup.internal.com", APP_VIP)?
            .expect_blocked("port 80 of dup.internal.com exists only in another namespace")?;
        for i in 0..4 {
            get(lab, "shop.shop.svc.cluster.local", "10.50.200.3")?.expect_page(
                &format!("request {i} to the Service's name"),
                IN_CLUSTER_MARK,
            )?;
        }
        ensure!(
            lab.nginx_requests(Role::External) == before,
            "a ServiceEntry won over the Kubernetes Service or another namespace's port"
        );
        Ok(())
    });
}

/// The Sidecar's egress hosts are applied: `./*` reaches this namespace's services only.
#[test]
fn sidecar_egress_hosts_scope_the_registry() {
    run("sidecar-egress", |lab| {
        let sidecar = "apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: default}
spec:
  egress:
  - hosts: ['./*']
";
        start(
            lab,
            &[
                ("workloadentry.yaml", scenario::WORKLOAD_ENTRY.to_string()),
                ("serviceentry.yaml", scenario::SERVICE_ENTRY.to_string()),
                (
                    "other.yaml",
                    entry("other", "team-a", "other.internal.com", 80, IN_CLUSTER_IP),
                ),
                ("sidecar.yaml", sidecar.to_string()),
            ],
        )?;
        let before = lab.nginx_requests(Role::InCluster);
        get(lab, APP_HOST, APP_VIP)?.expect_page("this namespace's service", EXTERNAL_MARK)?;
        get(lab, "other.internal.com", APP_VIP)?
            .expect_blocked("another namespace's service, not imported by the Sidecar")?;
        ensure!(
            lab.nginx_requests(Role::InCluster) == before,
            "the service the Sidecar does not import was reached"
        );
        lab.remove_config("sidecar.yaml")?;
        poll(
            "without the Sidecar, every namespace",
            RELOAD_DEADLINE,
            || {
                Ok(get(lab, "other.internal.com", APP_VIP)?
                    .body
                    .contains(IN_CLUSTER_MARK)
                    .then_some(()))
            },
        )
    });
}

/// A headless Service forwards to the pod the client resolved, also by its per-pod name,
/// and to nothing else.
#[test]
fn headless_services_reach_their_pods_by_per_pod_names() {
    run("svc-headless", |lab| {
        start(
            lab,
            &[
                ("service.yaml", kube_service("web", "default", "None")),
                ("pod.yaml", scenario::POD.to_string()),
            ],
        )?;
        for host in [
            "nginx.web.default.svc.cluster.local",
            "web.default.svc.cluster.local",
            "nginx.web",
        ] {
            get(lab, host, IN_CLUSTER_IP)?
                .expect_page(&format!("{host} dialled at the pod"), IN_CLUSTER_MARK)?;
        }
        get(lab, "nginx.web.default.svc.cluster.local", ROGUE_IP)?
            .expect_blocked("a per-pod name dialled at an address that is none of its pods")?;
        Ok(())
    });
}

/// An ExternalName Service is an alias of the service it names: its names reach that
/// service's endpoints on that service's ports.
#[test]
fn external_name_services_alias_the_named_service() {
    run("svc-externalname", |lab| {
        let alias = "apiVersion: v1
kind: Service
metadata: {name: alias, namespace: default}
spec:
  type: ExternalName
  externalName: shop.default.svc.cluster.local
";
        start(
            lab,
            &[
                (
                    "service.yaml",
                    kube_service("shop", "default", "10.50.200.2"),
                ),
                ("pod.yaml", scenario::POD.to_string()),
                ("alias.yaml", alias.to_string()),
            ],
        )?;
        // Kubernetes DNS answers the alias with a CNAME to the named service's address.
        for host in ["alias.default.svc.cluster.local", "alias"] {
            get(lab, host, "10.50.200.2")?
                .expect_page(&format!("{host}, an alias of shop"), IN_CLUSTER_MARK)?;
        }
        Ok(())
    });
}
