//! The registry's build as the publisher's compiler, DNS answers included.

use std::sync::Arc;

use portcullis_dns::{DnsCache, HickoryLookup, Lookup};
use portcullis_model::Resource;
use portcullis_registry::{BuildOptions, Snapshot, build_with_dns};

use crate::{Compile, CompileError, Set};

/// Compiles Istio resources with the registry, resolving DNS endpoints from `dns`'s current
/// answers and keeping every name the snapshot needs resolved.
pub struct RegistryCompiler<L: Lookup = HickoryLookup> {
    options: BuildOptions,
    dns: Arc<DnsCache<L>>,
}

impl<L: Lookup> RegistryCompiler<L> {
    /// A compiler for the workload `options` describe.
    pub fn new(options: BuildOptions, dns: Arc<DnsCache<L>>) -> Self {
        RegistryCompiler { options, dns }
    }
}

impl<L: Lookup> Compile for RegistryCompiler<L> {
    fn compile(
        &mut self,
        sets: &[&Set],
        previous: &Snapshot,
        version: u64,
    ) -> Result<Snapshot, CompileError> {
        let joined: Vec<Resource>;
        let resources = match sets {
            // The usual case compiles the source's slice as it is, without a copy.
            [Set::Files(files)] => files.resources(),
            _ => {
                joined = sets
                    .iter()
                    .flat_map(|set| match set {
                        Set::Files(files) => files.resources(),
                    })
                    .cloned()
                    .collect();
                &joined
            }
        };
        let answers = self.dns.answers();
        let lookup = |name: &str| answers.get(name).map(|a| Arc::clone(&a.addrs));
        let snapshot = build_with_dns(resources, &self.options, Some(previous), version, &lookup);
        // New names start resolving now; their answers trigger another build.
        self.dns.set_names(snapshot.dns_names.iter().cloned());
        for warning in &snapshot.warnings {
            tracing::warn!(%warning, "registry");
        }
        Ok(snapshot)
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
            .unwrap();
        let names: Vec<&str> = snapshot.services().map(|c| &*c.name).collect();
        assert_eq!(
            names,
            ["outbound|80||a.example.com", "outbound|80||b.example.com"]
        );
    }
}
