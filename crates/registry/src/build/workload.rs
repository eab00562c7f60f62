//! The workload behind an endpoint as istiod names it for telemetry (`IstioEndpoint`'s
//! `WorkloadName` and `Namespace`, canonical service and revision from its labels, the
//! cluster it runs in), which it sends as `filter_metadata.istio.workload`.

use std::collections::BTreeMap;
use std::sync::Arc;

use portcullis_envoy::WorkloadMetadata;
use portcullis_model::ObjectMeta;

/// Overrides the workload name of a pod or WorkloadEntry (Istio's `ServiceWorkloadName`).
const WORKLOAD_NAME_LABEL: &str = "service.istio.io/workload-name";
/// The WorkloadGroup that auto-registered a WorkloadEntry: its workload name.
const AUTO_REGISTRATION_GROUP: &str = "istio.io/autoRegistrationGroup";
/// Labels read for the canonical service, first present wins.
const CANONICAL_NAME_LABELS: [&str; 3] = [
    "service.istio.io/canonical-name",
    "app.kubernetes.io/name",
    "app",
];
/// Labels read for the canonical revision, first present wins.
const CANONICAL_REVISION_LABELS: [&str; 3] = [
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
];
/// The revision without a label, which istiod leaves out of the string.
const DEFAULT_REVISION: &str = "latest";

/// The metadata of workload `name` of `namespace` with `labels`, in `cluster`.
pub(super) fn metadata(
    name: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    cluster: &str,
) -> Arc<WorkloadMetadata> {
    let first = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k)).map(String::as_str);
    let revision = first(&CANONICAL_REVISION_LABELS).unwrap_or(DEFAULT_REVISION);
    Arc::new(WorkloadMetadata {
        name: name.into(),
        namespace: namespace.into(),
        canonical_service: first(&CANONICAL_NAME_LABELS).unwrap_or(name).into(),
        canonical_revision: if revision == DEFAULT_REVISION {
            "".into()
        } else {
            revision.into()
        },
        cluster: cluster.into(),
    })
}

/// A pod's, as istiod's `GetWorkloadMetaFromPod` names it.
pub(super) fn of_pod(meta: &ObjectMeta, cluster: &str) -> Arc<WorkloadMetadata> {
    metadata(
        &pod_workload_name(meta),
        &meta.namespace,
        &meta.labels,
        cluster,
    )
}

/// A WorkloadEntry's (named `name`, or a ServiceEntry's inline endpoint so named, with no
/// metadata of its own), with the `labels` its endpoint carries.
pub(super) fn of_workload_entry(
    name: &str,
    meta: Option<&ObjectMeta>,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    cluster: &str,
) -> Arc<WorkloadMetadata> {
    let named = meta.and_then(|m| {
        m.annotations
            .get(AUTO_REGISTRATION_GROUP)
            .or_else(|| m.labels.get(WORKLOAD_NAME_LABEL))
    });
    metadata(
        named.map_or(name, String::as_str),
        namespace,
        labels,
        cluster,
    )
}

/// The pod's controller when a controller made it (Deployment for a ReplicaSet with the
/// pod's template hash, Argo Rollout likewise, OpenShift DeploymentConfig, CronJob for a
/// Job named with a schedule time), else the pod's name; the workload-name label wins.
fn pod_workload_name(meta: &ObjectMeta) -> String {
    if let Some(name) = meta.labels.get(WORKLOAD_NAME_LABEL) {
        return name.clone();
    }
    let label = |k: &str| meta.labels.get(k).map_or("", String::as_str);
    let controller = (!meta.generate_name.is_empty())
        .then(|| meta.owner_references.iter().find(|r| r.controller))
        .flatten();
    let name = match controller {
        None => meta.name.as_str(),
        Some(owner) => {
            let owner_name = owner.name.as_str();
            let hashed = |hash: &str| {
                (!hash.is_empty() && owner_name.ends_with(hash))
                    .then(|| trim_suffix(owner_name, &format!("-{hash}")))
            };
            match owner.kind.as_str() {
                "ReplicaSet" => hashed(label("pod-template-hash"))
                    .or_else(|| hashed(label("rollouts-pod-template-hash")))
                    .unwrap_or(owner_name),
                "ReplicationController" if !label("deploymentconfig").is_empty() => {
                    label("deploymentconfig")
                }
                "Job" => cron_job(owner_name).unwrap_or(owner_name),
                _ => owner_name,
            }
        }
    };
    if name.is_empty() { &meta.name } else { name }.to_owned()
}

fn trim_suffix<'a>(s: &'a str, suffix: &str) -> &'a str {
    s.strip_suffix(suffix).unwrap_or(s)
}

/// The CronJob of a Job it created, named `CRONJOB-<8 to 10 digits>`.
fn cron_job(job: &str) -> Option<&str> {
    let (cron, stamp) = job.rsplit_once('-')?;
    (!cron.is_empty()
        && (8..=10).contains(&stamp.len())
        && stamp.bytes().all(|b| b.is_ascii_digit()))
    .then_some(cron)
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_model::OwnerReference;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn pod(
        name: &str,
        generated: bool,
        owner: Option<(&str, &str)>,
        l: &[(&str, &str)],
    ) -> ObjectMeta {
        ObjectMeta {
            name: name.into(),
            namespace: "shop".into(),
            labels: labels(l),
            generate_name: if generated {
                "x-".into()
            } else {
                String::new()
            },
            owner_references: owner
                .map(|(kind, name)| OwnerReference {
                    kind: kind.into(),
                    name: name.into(),
                    controller: true,
                })
                .into_iter()
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_pods_workload_is_named_after_its_controller_as_istiod_names_it() {
        let hash = [("pod-template-hash", "7d4b9")];
        for (meta, want) in [
            (
                pod(
                    "web-7d4b9-abcde",
                    true,
                    Some(("ReplicaSet", "web-7d4b9")),
                    &hash,
                ),
                "web",
            ),
            // The hash must end the ReplicaSet's name.
            (
                pod("web-1-abcde", true, Some(("ReplicaSet", "web-1")), &hash),
                "web-1",
            ),
            (
                pod(
                    "roll-5f6-x",
                    true,
                    Some(("ReplicaSet", "roll-5f6")),
                    &[("rollouts-pod-template-hash", "5f6")],
                ),
                "roll",
            ),
            (
                pod(
                    "dc-1-x",
                    true,
                    Some(("ReplicationController", "dc-1")),
                    &[("deploymentconfig", "dc")],
                ),
                "dc",
            ),
            (
                pod("rc-x", true, Some(("ReplicationController", "rc")), &[]),
                "rc",
            ),
            (
                pod(
                    "report-28391040-x",
                    true,
                    Some(("Job", "report-28391040")),
                    &[],
                ),
                "report",
            ),
            (
                pod("once-12-x", true, Some(("Job", "once-12")), &[]),
                "once-12",
            ),
            (pod("db-0", true, Some(("StatefulSet", "db")), &[]), "db"),
            // Owners count only for generated names, and only a controlling one.
            (
                pod("web-abc", false, Some(("ReplicaSet", "web-7d4b9")), &hash),
                "web-abc",
            ),
            (pod("solo", true, None, &[]), "solo"),
            (
                pod(
                    "web-7d4b9-abcde",
                    true,
                    Some(("ReplicaSet", "web-7d4b9")),
                    &[("service.istio.io/workload-name", "storefront")],
                ),
                "storefront",
            ),
        ] {
            assert_eq!(pod_workload_name(&meta), want, "{}", meta.name);
        }
        let mut not_controller = pod(
            "web-7d4b9-abcde",
            true,
            Some(("ReplicaSet", "web-7d4b9")),
            &hash,
        );
        not_controller.owner_references[0].controller = false;
        assert_eq!(pod_workload_name(&not_controller), "web-7d4b9-abcde");
    }

    #[test]
    fn canonical_service_and_revision_fall_back_as_istiod_and_latest_is_left_out() {
        let string =
            |l: &[(&str, &str)]| metadata("web", "shop", &labels(l), "Kubernetes").to_string();
        assert_eq!(string(&[]), "web;shop;web;;Kubernetes");
        assert_eq!(
            string(&[("app", "shop-web"), ("version", "v2")]),
            "web;shop;shop-web;v2;Kubernetes"
        );
        assert_eq!(
            string(&[
                ("app", "a"),
                ("app.kubernetes.io/name", "b"),
                ("service.istio.io/canonical-name", "c"),
                ("version", "1"),
                ("app.kubernetes.io/version", "2"),
            ]),
            "web;shop;c;2;Kubernetes"
        );
        assert_eq!(string(&[("version", "latest")]), "web;shop;web;;Kubernetes");
        // A label present but empty is taken as it is, as istiod takes it.
        assert_eq!(string(&[("app", "")]), "web;shop;;;Kubernetes");
    }

    #[test]
    fn a_workload_entry_is_named_by_its_group_then_its_label_then_its_name() {
        let mut meta = ObjectMeta {
            name: "vm-1".into(),
            ..Default::default()
        };
        let name = |m: &ObjectMeta| {
            of_workload_entry("vm-1", Some(m), "vms", &BTreeMap::new(), "c")
                .name
                .clone()
        };
        assert_eq!(&*name(&meta), "vm-1");
        meta.labels = labels(&[("service.istio.io/workload-name", "billing")]);
        assert_eq!(&*name(&meta), "billing");
        meta.annotations = labels(&[("istio.io/autoRegistrationGroup", "billing-group")]);
        assert_eq!(&*name(&meta), "billing-group");
        let inline = of_workload_entry("api-0", None, "egress", &labels(&[("app", "api")]), "c");
        assert_eq!(inline.to_string(), "api-0;egress;api;;c");
    }
}
