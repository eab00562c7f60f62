//! The registry's build as the publisher's compiler, DNS answers included.

use std::sync::Arc;
use std::time::SystemTime;

use portcullis_admin::ConfigResources;
use portcullis_dns::{DnsCache, HickoryLookup, Lookup};
use portcullis_envoy::state::SourceState;
use portcullis_envoy::{Named, Resources};
use portcullis_model::Resource;
use portcullis_registry::{BuildOptions, Snapshot, compile};

use crate::{Built, Compile, CompileError, Set};

/// Compiles Istio resources with the registry, resolving DNS endpoints from `dns`'s current
/// answers and keeping every name the snapshot needs resolved; resources from a control
/// plane join the compiled ones, winning a name both use.
pub struct RegistryCompiler<L: Lookup = HickoryLookup> {
    options: BuildOptions,
    dns: Arc<DnsCache<L>>,
    /// Each control plane source's state at the last build, with its active resources: the
    /// next build finds them from what changed since.
    active: Vec<(Arc<SourceState>, Resources)>,
}

impl<L: Lookup> RegistryCompiler<L> {
    /// A compiler for the workload `options` describe.
    pub fn new(options: BuildOptions, dns: Arc<DnsCache<L>>) -> Self {
        RegistryCompiler {
            options,
            dns,
            active: Vec::new(),
        }
    }
}

impl<L: Lookup> Compile for RegistryCompiler<L> {
    fn compile(
        &mut self,
        sets: &[&Set],
        previous: &Snapshot,
        version: u64,
    ) -> Result<Built, CompileError> {
        let answers = self.dns.answers();
        let lookup = |name: &str| answers.get(name).map(|a| Arc::clone(&a.addrs));
        let mut file_sets = sets.iter().filter_map(|set| match set {
            Set::Files(files) => Some(files.resources()),
            Set::Xds(_) => None,
        });
        let joined: Vec<Resource>;
        let istio: Option<&[Resource]> = match (file_sets.next(), file_sets.next()) {
            (None, _) => None,
            // The usual case compiles the source's slice as it is, without a copy.
            (Some(only), None) => Some(only),
            (Some(first), Some(second)) => {
                joined = [first, second]
                    .into_iter()
                    .chain(file_sets)
                    .flatten()
                    .cloned()
                    .collect();
                Some(&joined)
            }
        };
        let (mut resources, mut warnings, mut dns_names, enforcement) = match istio {
            Some(istio) => {
                let c = compile(istio, &self.options, &lookup);
                (c.resources, c.warnings, c.dns_names, c.enforcement)
            }
            None => (Resources::default(), Vec::new(), Default::default(), None),
        };
        let xds_sets: Vec<&Arc<SourceState>> = sets
            .iter()
            .filter_map(|set| match set {
                Set::Xds(state) => Some(state),
                Set::Files(_) => None,
            })
            .collect();
        let dump = match (istio, xds_sets.as_slice()) {
            // The one source's state is shown as it is, without even a copy of its
            // pointers.
            (None, [only]) => ConfigResources::Held(Arc::clone(only)),
            // Files alone: the snapshot's own resources, rendered when asked for.
            (Some(_), []) => ConfigResources::Snapshot {
                at: SystemTime::now(),
            },
            _ => {
                let mut dump = SourceState::default();
                for state in &xds_sets {
                    dump.fill_from(SourceState::clone(state));
                }
                if istio.is_some() {
                    dump.fill_from(SourceState::of(
                        resources.clone(),
                        &version.to_string(),
                        SystemTime::now(),
                    ));
                }
                ConfigResources::Held(Arc::new(dump))
            }
        };
        let active: Vec<(Arc<SourceState>, Resources)> = xds_sets
            .iter()
            .enumerate()
            .map(|(i, &state)| {
                let active = match self.active.get(i) {
                    Some((before, was)) => state.active_since(before, was),
                    None => state.active(),
                };
                (Arc::clone(state), active)
            })
            .collect();
        for (_, active) in &active {
            join(&mut resources.listeners, &active.listeners);
            join(&mut resources.routes, &active.routes);
            join(&mut resources.clusters, &active.clusters);
            join(&mut resources.endpoints, &active.endpoints);
        }
        self.active = active;
        let mut snapshot = Snapshot::index(&resources, &lookup, Some(previous), version);
        warnings.append(&mut snapshot.warnings);
        snapshot.warnings = warnings;
        dns_names.append(&mut snapshot.dns_names);
        snapshot.dns_names = dns_names;
        snapshot.enforcement = enforcement;
        // New names start resolving now; their answers trigger another build.
        self.dns.set_names(snapshot.dns_names.iter().cloned());
        for warning in &snapshot.warnings {
            tracing::warn!(%warning, "registry");
        }
        Ok(Built {
            snapshot,
            resources: dump,
        })
    }
}

/// Adds `from`'s resources to `into`, `from` winning a name both use; a copy of `from`
/// (which shares its maps) when `into` is empty, as it is without files.
fn join<T: Clone>(into: &mut Named<T>, from: &Named<T>) {
    if into.is_empty() {
        into.clone_from(from);
    } else {
        into.extend(from.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Duration;

    use portcullis_dns::{DnsConfig, DnsError};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::testing::{admin, service_entry};
    use crate::{Folder, Outcome, Publisher, Trigger, rebuild_on};

    const ANSWER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7));

    /// Answers every name with [`ANSWER`].
    struct OneAddress;

    impl Lookup for OneAddress {
        async fn lookup(&self, _: &str) -> Result<(Vec<IpAddr>, Duration), DnsError> {
            Ok((vec![ANSWER], Duration::from_secs(3600)))
        }
    }

    #[tokio::test]
    async fn a_dns_answer_rebuilds_the_snapshot_with_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("db.yaml"),
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: default}
spec:
  hosts: [db.example.com]
  location: MESH_INTERNAL
  resolution: DNS
  ports: [{number: 5432, name: tcp, protocol: TCP}]
",
        )
        .unwrap();
        let admin = admin();
        let dns = DnsCache::new(OneAddress, DnsConfig::default());
        let changes = dns.subscribe();
        let compiler = RegistryCompiler::new(BuildOptions::default(), dns);
        let publisher = Publisher::new(compiler, Arc::clone(&admin));
        let folder = Folder::new(dir.path().to_path_buf(), &publisher);
        let stop = CancellationToken::new();
        let rebuilds = tokio::spawn(rebuild_on(Arc::clone(&publisher), changes, stop.clone()));

        // The first build asks for the name: it has no answer yet.
        let outcome = tokio::task::spawn_blocking(move || folder.reload(Trigger::Start))
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Published(1));
        let addresses = |admin: &portcullis_admin::AdminState| -> Vec<IpAddr> {
            admin
                .registry
                .load()
                .cluster("outbound|5432||db.example.com")
                .map(|c| c.endpoints.iter().map(|e| e.address).collect())
                .unwrap_or_default()
        };
        for _ in 0..1000 {
            if !addresses(&admin).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(addresses(&admin), [ANSWER]);
        assert!(publisher.version() >= 2);

        stop.cancel();
        rebuilds.await.unwrap();
    }

    #[tokio::test]
    async fn sets_of_several_sources_compile_together() {
        let dir = tempfile::tempdir().unwrap();
        let set = |name: &str, host: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, service_entry(name, host)).unwrap();
            let mut files = portcullis_model::ConfigSet::new();
            files.update(portcullis_model::scan(&path));
            Set::Files(files)
        };
        let (a, b) = (set("a", "a.example.com"), set("b", "b.example.com"));
        let dns = DnsCache::new(OneAddress, DnsConfig::default());
        let mut compiler = RegistryCompiler::new(BuildOptions::default(), dns);
        let snapshot = compiler
            .compile(&[&a, &b], &Snapshot::default(), 1)
            .unwrap()
            .snapshot;
        let names: Vec<&str> = snapshot.services().map(|c| &*c.name).collect();
        assert_eq!(
            names,
            ["outbound|80||a.example.com", "outbound|80||b.example.com"]
        );
    }

    #[tokio::test]
    async fn the_files_dump_is_the_snapshots_own_resources_at_its_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.yaml");
        std::fs::write(&path, service_entry("a", "a.example.com")).unwrap();
        let mut files = portcullis_model::ConfigSet::new();
        files.update(portcullis_model::scan(&path));
        let dns = DnsCache::new(OneAddress, DnsConfig::default());
        let mut compiler = RegistryCompiler::new(BuildOptions::default(), dns);
        let built = compiler
            .compile(&[&Set::Files(files)], &Snapshot::default(), 3)
            .unwrap();
        assert!(matches!(built.resources, ConfigResources::Snapshot { .. }));
        let dump = built.resources.state(&built.snapshot);
        let indexed = built.snapshot.resources().expect("indexed from resources");
        assert_eq!(dump.active(), *indexed);
        let cluster = &dump.clusters["outbound|80||a.example.com"];
        let active = cluster.active.as_ref().expect("active");
        assert_eq!(active.version, "3");
        assert!(Arc::ptr_eq(
            &active.resource,
            &indexed.clusters["outbound|80||a.example.com"]
        ));
        assert!(cluster.warming.is_none() && cluster.error.is_none());
    }

    #[tokio::test]
    async fn files_and_a_control_plane_compile_into_one_model_the_control_plane_winning_a_name() {
        use portcullis_envoy::state::SourceState;
        use portcullis_envoy::{Cluster, Discovery, Resources};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.yaml");
        std::fs::write(&path, service_entry("a", "a.example.com")).unwrap();
        let mut files = portcullis_model::ConfigSet::new();
        files.update(portcullis_model::scan(&path));
        let files = Set::Files(files);
        let strict = |name: &str| Cluster::new(name, Discovery::StrictDns);
        let mut pushed = Resources::default();
        for name in ["outbound|80||a.example.com", "outbound|443||b.example.com"] {
            pushed
                .clusters
                .insert(name.to_owned(), Arc::new(strict(name)));
        }
        let xds = Set::Xds(Arc::new(SourceState::of(
            pushed,
            "7",
            std::time::SystemTime::now(),
        )));
        let dns = DnsCache::new(OneAddress, DnsConfig::default());
        let mut compiler = RegistryCompiler::new(BuildOptions::default(), dns);
        let built = compiler
            .compile(&[&files, &xds], &Snapshot::default(), 1)
            .unwrap();
        let cluster = |name: &str| built.snapshot.cluster(name).map(|c| c.resolution);
        // The file's STATIC service gave way to the control plane's DNS cluster of that name.
        assert_eq!(
            cluster("outbound|80||a.example.com"),
            Some(portcullis_registry::Resolution::Dns)
        );
        assert!(cluster("outbound|443||b.example.com").is_some());
        // `/config_dump` shows the control plane's version of the shared name, and the
        // files' catch-all clusters beside it.
        let ConfigResources::Held(dump) = &built.resources else {
            panic!("files beside a control plane: the merged state is held");
        };
        let dump = &dump.clusters;
        let version = |name: &str| dump[name].active.as_ref().map(|a| a.version.clone());
        assert_eq!(version("outbound|80||a.example.com").as_deref(), Some("7"));
        assert_eq!(version("PassthroughCluster").as_deref(), Some("1"));
    }
}
