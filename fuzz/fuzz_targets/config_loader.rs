//! The config path a file change takes: bytes (as UTF-8, lossy) -> resources with findings ->
//! snapshot. Never panics; a reload of the same resources gives the same clusters; and every
//! plain hostname a clean file registers is routable on its port.
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, LazyLock};

use libfuzzer_sys::fuzz_target;
use portcullis_model::load_str;
use portcullis_registry::{
    BLACKHOLE_CLUSTER, BuildOptions, Decision, PASSTHROUGH_CLUSTER, build, normalize_host,
};

static FILE: LazyLock<Arc<PathBuf>> = LazyLock::new(|| Arc::new(PathBuf::from("fuzz.yaml")));

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let loaded = load_str(&text, &FILE);
    for finding in &loaded.findings {
        // Every finding names where it is, as `portcullis check` prints it.
        assert!(finding.line >= 1, "{finding}");
    }
    let options = BuildOptions::default();
    let first = build(&loaded.resources, &options, None, 1);
    let again = build(&loaded.resources, &options, Some(&first), 2);
    let names = |s: &portcullis_registry::Snapshot| -> Vec<Arc<str>> {
        s.clusters.keys().cloned().collect()
    };
    assert_eq!(
        names(&first),
        names(&again),
        "a reload changed the clusters"
    );
    if loaded.has_errors() {
        // Such a file is not applied; building it only had to survive.
        return;
    }
    for cluster in first.clusters.values() {
        // Istio's catch-all clusters stand beside the services' in every snapshot.
        if !cluster.name.starts_with("outbound|") {
            assert!(
                [BLACKHOLE_CLUSTER, PASSTHROUGH_CLUSTER].contains(&&*cluster.name),
                "cluster {}",
                cluster.name
            );
            continue;
        }
        assert!(
            cluster
                .name
                .starts_with(&format!("outbound|{}|", cluster.port))
                && cluster.name.ends_with(&format!("|{}", cluster.host)),
            "cluster name {} for {}:{}",
            cluster.name,
            cluster.host,
            cluster.port
        );
        if normalize_host(&cluster.host).as_deref() != Ok(&*cluster.host) {
            continue;
        }
        match first.route_host(&cluster.host, cluster.port) {
            Decision::Cluster(c) => assert_eq!(c.port, cluster.port),
            other => panic!("{} unroutable: {other:?}", cluster.name),
        }
    }
});
