//! A DestinationRule's `localityLbSetting` as istiod applies it to a cluster's endpoints
//! (`applyLocalityLoadBalancer`): `distribute` sets locality weights, else, only with
//! outlier detection (without it Envoy would never leave priority 0), `failoverPriority`
//! labels and region/zone/subzone proximity (with `failover` regions) set priorities.

use std::collections::BTreeMap;

use portcullis_envoy::{LbEndpoint, Locality, LocalityLbEndpoints};
use portcullis_model::LocalityLbSetting;

/// Istio's label naming a workload's locality, `region.zone.subzone` (or with `/`).
const LOCALITY_LABEL: &str = "topology.istio.io/locality";
/// Istio's older label for the same, read when the first is absent.
const LEGACY_LOCALITY_LABEL: &str = "istio-locality";
/// Kubernetes' region label.
pub(crate) const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// Kubernetes' zone label.
pub(crate) const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Kubernetes' deprecated region label, read on a node without the first.
const BETA_REGION_LABEL: &str = "failure-domain.beta.kubernetes.io/region";
/// Kubernetes' deprecated zone label, read on a node without the first.
const BETA_ZONE_LABEL: &str = "failure-domain.beta.kubernetes.io/zone";
/// Istio's sub-zone label.
pub(crate) const SUBZONE_LABEL: &str = "topology.istio.io/subzone";
/// The node a pod runs on, among the labels istiod gives its endpoints.
const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// Parses `region/zone/subzone` (missing parts empty).
pub fn parse(locality: &str) -> Locality {
    let mut parts = locality.splitn(3, '/');
    let mut next = || parts.next().unwrap_or_default().to_string();
    Locality {
        region: next(),
        zone: next(),
        sub_zone: next(),
    }
}

/// The locality a workload's labels name (istiod's `GetLocalityLabel` and
/// `SanitizeLocalityLabel`: `.` separates the parts unless `/` does).
fn of_label(labels: &BTreeMap<String, String>) -> Option<String> {
    let value = labels
        .get(LOCALITY_LABEL)
        .or_else(|| labels.get(LEGACY_LOCALITY_LABEL))?;
    Some(if value.contains('/') {
        value.clone()
    } else {
        value.replace('.', "/")
    })
}

/// A pod's locality as istiod's kube controller finds it (`getPodLocality`): its label,
/// else the topology labels of its node (`node`, when the node is known), the GA labels
/// before the deprecated ones; empty when neither says anything.
pub(crate) fn of_pod(
    labels: &BTreeMap<String, String>,
    node: Option<&BTreeMap<String, String>>,
) -> String {
    if let Some(l) = of_label(labels).filter(|l| !l.is_empty()) {
        return l;
    }
    let Some(node) = node else {
        return String::new();
    };
    let get = |key: &str, fallback: Option<&str>| {
        let value = node.get(key).filter(|v| !v.is_empty());
        value
            .or_else(|| fallback.and_then(|f| node.get(f)))
            .cloned()
            .unwrap_or_default()
    };
    let region = get(REGION_LABEL, Some(BETA_REGION_LABEL));
    let zone = get(ZONE_LABEL, Some(BETA_ZONE_LABEL));
    let subzone = get(SUBZONE_LABEL, None);
    if region.is_empty() && zone.is_empty() && subzone.is_empty() {
        return String::new();
    }
    format!("{region}/{zone}/{subzone}")
}

/// A WorkloadEntry's (or a ServiceEntry endpoint's) locality: its `locality`, else its
/// label's, as istiod's `convertWorkloadEntryToWorkloadInstance`.
pub(crate) fn of_workload_entry(locality: &str, labels: &BTreeMap<String, String>) -> String {
    if locality.is_empty() {
        of_label(labels).unwrap_or_default()
    } else {
        locality.to_owned()
    }
}

/// Adds the topology labels of `locality` and the pod's `node` to an endpoint's labels, as
/// istiod's `AugmentLabels` does (subsets and `failoverPriority` see them).
pub(crate) fn augment(labels: &mut BTreeMap<String, String>, locality: &str, node: &str) {
    let l = parse(locality);
    for (key, value) in [
        (REGION_LABEL, l.region),
        (ZONE_LABEL, l.zone),
        (SUBZONE_LABEL, l.sub_zone),
        (HOSTNAME_LABEL, node.to_owned()),
    ] {
        if !value.is_empty() {
            labels.insert(key.to_string(), value);
        }
    }
}

/// Whether `rule` (`region/zone/subzone`, `*` or missing parts match anything below the
/// region) covers `l`, as istiod's `LocalityMatch`.
fn matches(l: &Locality, rule: &str) -> bool {
    let r = parse(rule);
    let part = |rule: &str, have: &str| rule == "*" || rule.is_empty() || rule == have;
    (r.region == "*" || r.region == l.region)
        && part(&r.zone, &l.zone)
        && part(&r.sub_zone, &l.sub_zone)
}

/// Whether the cluster balances by locality weight (istiod sets
/// `locality_weighted_lb_config` for `distribute`, and for explicit failover settings when
/// failover applies).
pub(crate) fn weighted(setting: &LocalityLbSetting, failover: bool) -> bool {
    !setting.distribute.is_empty()
        || (failover && (!setting.failover.is_empty() || !setting.failover_priority.is_empty()))
}

/// One endpoint with the labels `failoverPriority` compares.
pub(crate) type Labelled<'a> = (LbEndpoint, &'a BTreeMap<String, String>);

/// Applies `setting` for a client at `client` with `client_labels` to `groups` (one per
/// endpoint locality, priority 0); `failover`: the cluster has outlier detection.
pub(crate) fn apply(
    groups: Vec<(Locality, Vec<Labelled<'_>>)>,
    setting: &LocalityLbSetting,
    failover: bool,
    client: &Locality,
    client_labels: &BTreeMap<String, String>,
) -> Vec<LocalityLbEndpoints> {
    let plain = |locality: Locality, endpoints: Vec<Labelled<'_>>, priority: u32| {
        let weight = endpoints
            .iter()
            .map(|(e, _)| e.load_balancing_weight.max(1))
            .sum();
        // Collected in place, the list would keep the labelled list's larger allocation
        // for as long as the model is kept.
        let mut lb_endpoints = Vec::with_capacity(endpoints.len());
        lb_endpoints.extend(endpoints.into_iter().map(|(e, _)| e));
        LocalityLbEndpoints {
            locality,
            priority,
            load_balancing_weight: Some(weight),
            lb_endpoints,
        }
    };
    if !setting.distribute.is_empty() {
        let mut out: Vec<LocalityLbEndpoints> = groups
            .into_iter()
            .map(|(l, eps)| plain(l, eps, 0))
            .collect();
        distribute(&mut out, setting, client);
        return out;
    }
    if !failover {
        return groups
            .into_iter()
            .map(|(l, eps)| plain(l, eps, 0))
            .collect();
    }
    let mut out = Vec::new();
    if setting.failover_priority.is_empty() || client_labels.is_empty() {
        out.extend(groups.into_iter().map(|(l, eps)| plain(l, eps, 0)));
    } else {
        for (locality, endpoints) in groups {
            let mut by_priority: BTreeMap<u32, Vec<Labelled<'_>>> = BTreeMap::new();
            for e in endpoints {
                let p = label_priority(e.1, client_labels, &setting.failover_priority);
                by_priority.entry(p).or_default().push(e);
            }
            out.extend(
                by_priority
                    .into_iter()
                    .map(|(p, eps)| plain(locality.clone(), eps, p)),
            );
        }
        compact(&mut out);
    }
    if setting.failover_priority.is_empty() || !setting.failover.is_empty() {
        for g in &mut out {
            g.priority = g.priority * 5 + proximity(client, &g.locality, setting);
        }
        compact(&mut out);
    }
    out
}

/// istiod's `applyFailoverPriorityPerLocality`: the first label (in order) whose value
/// differs from the client's (or from the `label=value` override) sets how far down the
/// endpoint goes; all match: priority 0.
fn label_priority(
    labels: &BTreeMap<String, String>,
    client: &BTreeMap<String, String>,
    order: &[String],
) -> u32 {
    let lowest = order.len();
    for (j, entry) in order.iter().enumerate() {
        let (name, wanted) = match entry.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (entry.as_str(), None),
        };
        let wanted = wanted.or_else(|| client.get(name).map(String::as_str));
        if wanted != labels.get(name).map(String::as_str) {
            return u32::try_from(lowest - j).unwrap_or(u32::MAX);
        }
    }
    0
}

/// istiod's `LbPriority` with `failover`: 0 same sub-zone, 1 same zone, 2 same region, 3
/// the failover region of the client's (or any other region when none is named), 4 a
/// region the client's does not fail over to.
fn proximity(client: &Locality, l: &Locality, setting: &LocalityLbSetting) -> u32 {
    if client.region == l.region {
        return match (client.zone == l.zone, client.sub_zone == l.sub_zone) {
            (true, true) => 0,
            (true, false) => 1,
            _ => 2,
        };
    }
    match setting.failover.iter().find(|f| f.from == client.region) {
        Some(f) if f.to != l.region => 4,
        _ => 3,
    }
}

/// Renumbers priorities 0..N without gaps, keeping their order.
fn compact(groups: &mut [LocalityLbEndpoints]) {
    let mut used: Vec<u32> = groups.iter().map(|g| g.priority).collect();
    used.sort_unstable();
    used.dedup();
    for g in groups {
        g.priority = u32::try_from(used.partition_point(|&p| p < g.priority)).unwrap_or(0);
    }
}

/// istiod's `applyLocalityWeights`: the first `distribute` entry whose `from` covers the
/// client sets each matched locality's weight to its share of the entry's weight (rounded
/// up); localities no entry matches get no endpoints.
fn distribute(groups: &mut [LocalityLbEndpoints], setting: &LocalityLbSetting, client: &Locality) {
    let Some(rule) = setting.distribute.iter().find(|d| matches(client, &d.from)) else {
        return;
    };
    let mut unmatched: Vec<bool> = vec![true; groups.len()];
    for (to, &weight) in &rule.to {
        let hit: Vec<usize> = (0..groups.len())
            .filter(|&i| unmatched[i] && matches(&groups[i].locality, to))
            .collect();
        let total: u64 = hit
            .iter()
            .map(|&i| u64::from(groups[i].load_balancing_weight.unwrap_or(1)))
            .sum();
        for &i in &hit {
            unmatched[i] = false;
            let own = u64::from(groups[i].load_balancing_weight.unwrap_or(1));
            let share = (own * u64::from(weight)).div_ceil(total.max(1));
            if share > 0 {
                groups[i].load_balancing_weight = Some(u32::try_from(share).unwrap_or(u32::MAX));
            }
        }
    }
    for (g, unmatched) in groups.iter_mut().zip(unmatched) {
        if unmatched {
            g.lb_endpoints.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use portcullis_envoy::EndpointAddress;
    use portcullis_model::{LocalityDistribute, LocalityFailover};

    use super::*;

    fn ep(address: &str) -> LbEndpoint {
        LbEndpoint::new(EndpointAddress::Socket(address.parse().unwrap()))
    }

    fn groups<'a>(
        localities: &[(&str, &str)],
        labels: &'a BTreeMap<String, String>,
    ) -> Vec<(Locality, Vec<Labelled<'a>>)> {
        localities
            .iter()
            .map(|(l, a)| (parse(l), vec![(ep(a), labels)]))
            .collect()
    }

    fn priorities(out: &[LocalityLbEndpoints]) -> Vec<(String, u32)> {
        out.iter()
            .map(|g| {
                (
                    format!(
                        "{}/{}/{}",
                        g.locality.region, g.locality.zone, g.locality.sub_zone
                    ),
                    g.priority,
                )
            })
            .collect()
    }

    const LOCALITIES: [(&str, &str); 5] = [
        ("us/a/1", "10.0.0.1:80"),
        ("us/a/2", "10.0.0.2:80"),
        ("us/b/1", "10.0.0.3:80"),
        ("eu/c/1", "10.0.0.4:80"),
        ("ap/d/1", "10.0.0.5:80"),
    ];

    #[test]
    fn failover_orders_by_proximity_only_with_outlier_detection() {
        let none = BTreeMap::new();
        let client = parse("us/a/1");
        let setting = LocalityLbSetting::default();
        let out = apply(groups(&LOCALITIES, &none), &setting, true, &client, &none);
        let p: Vec<u32> = priorities(&out).iter().map(|x| x.1).collect();
        assert_eq!(p, [0, 1, 2, 3, 3]);
        assert!(!weighted(&setting, true));
        let out = apply(groups(&LOCALITIES, &none), &setting, false, &client, &none);
        assert!(out.iter().all(|g| g.priority == 0));
    }

    #[test]
    fn failover_regions_push_other_regions_down() {
        let none = BTreeMap::new();
        let setting = LocalityLbSetting {
            failover: vec![LocalityFailover {
                from: "us".into(),
                to: "eu".into(),
            }],
            ..Default::default()
        };
        let out = apply(
            groups(&LOCALITIES, &none),
            &setting,
            true,
            &parse("us/a/1"),
            &none,
        );
        let p: Vec<u32> = priorities(&out).iter().map(|x| x.1).collect();
        assert_eq!(p, [0, 1, 2, 3, 4]);
        assert!(weighted(&setting, true));
        assert!(!weighted(&setting, false));
    }

    #[test]
    fn failover_priority_labels_split_localities() {
        let client: BTreeMap<String, String> = [("version".to_string(), "v1".to_string())].into();
        let v1 = client.clone();
        let v2: BTreeMap<String, String> = [("version".to_string(), "v2".to_string())].into();
        let setting = LocalityLbSetting {
            failover_priority: vec!["version".into()],
            ..Default::default()
        };
        let groups = vec![(
            parse("us/a/1"),
            vec![(ep("10.0.0.1:80"), &v2), (ep("10.0.0.2:80"), &v1)],
        )];
        let out = apply(groups, &setting, true, &parse("eu/x/1"), &client);
        assert_eq!(out.len(), 2);
        let of = |p: u32| {
            out.iter()
                .find(|g| g.priority == p)
                .map(|g| g.lb_endpoints[0].address.clone())
        };
        assert_eq!(of(0), Some(ep("10.0.0.2:80").address));
        assert_eq!(of(1), Some(ep("10.0.0.1:80").address));
        assert_eq!(label_priority(&v2, &client, &["version=v2".into()]), 0);
    }

    #[test]
    fn distribute_sets_weights_and_drops_unlisted_localities() {
        let none = BTreeMap::new();
        let setting = LocalityLbSetting {
            distribute: vec![
                LocalityDistribute {
                    from: "eu/*".into(),
                    to: [("eu/*".to_string(), 100)].into(),
                },
                LocalityDistribute {
                    from: "us/a/*".into(),
                    to: [("us/a/*".to_string(), 80), ("eu/*".to_string(), 20)].into(),
                },
            ],
            ..Default::default()
        };
        let out = apply(
            groups(&LOCALITIES, &none),
            &setting,
            false,
            &parse("us/a/1"),
            &none,
        );
        let weights: Vec<(Option<u32>, usize)> = out
            .iter()
            .map(|g| (g.load_balancing_weight, g.lb_endpoints.len()))
            .collect();
        // us/a/* is two localities of weight 1: 80 split 40 and 40.
        assert_eq!(
            weights,
            [
                (Some(40), 1),
                (Some(40), 1),
                (Some(1), 0),
                (Some(20), 1),
                (Some(1), 0)
            ]
        );
        assert!(out.iter().all(|g| g.priority == 0));
        assert!(weighted(&setting, false));
    }

    #[test]
    fn endpoint_locality_from_labels_then_the_node() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let node = labels(&[
            (REGION_LABEL, "us-east1"),
            (BETA_REGION_LABEL, "old"),
            (BETA_ZONE_LABEL, "us-east1-b"),
            (SUBZONE_LABEL, "rack1"),
        ]);
        // The GA label before the deprecated one, which still counts alone.
        assert_eq!(
            of_pod(&labels(&[]), Some(&node)),
            "us-east1/us-east1-b/rack1"
        );
        assert_eq!(of_pod(&labels(&[]), None), "");
        assert_eq!(of_pod(&labels(&[]), Some(&labels(&[("x", "y")]))), "");
        // A pod's own label wins over its node; a topology label of its own does not count.
        assert_eq!(
            of_pod(
                &labels(&[(LEGACY_LOCALITY_LABEL, "eu.west.r2")]),
                Some(&node)
            ),
            "eu/west/r2"
        );
        assert_eq!(
            of_pod(
                &labels(&[
                    (LOCALITY_LABEL, "ap/south.1/r3"),
                    (LEGACY_LOCALITY_LABEL, "eu.west.r2")
                ]),
                None
            ),
            "ap/south.1/r3"
        );
        assert_eq!(of_pod(&labels(&[(ZONE_LABEL, "z")]), None), "");
        assert_eq!(
            of_workload_entry("", &labels(&[(LEGACY_LOCALITY_LABEL, "eu.west")])),
            "eu/west"
        );
        assert_eq!(
            of_workload_entry("us/a", &labels(&[(LEGACY_LOCALITY_LABEL, "eu.west")])),
            "us/a"
        );
        let mut augmented = labels(&[(ZONE_LABEL, "mine")]);
        augment(&mut augmented, "us-east1/us-east1-b", "node-1");
        assert_eq!(
            augmented,
            labels(&[
                (REGION_LABEL, "us-east1"),
                (ZONE_LABEL, "us-east1-b"),
                (HOSTNAME_LABEL, "node-1")
            ])
        );
        assert!(matches(&parse("us/a/1"), "us"));
        assert!(matches(&parse("us/a/1"), "*"));
        assert!(!matches(&parse("us/a/1"), "us/b/*"));
    }
}
