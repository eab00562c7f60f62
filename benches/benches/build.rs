//! Compiling a snapshot from 10,000 ServiceEntries (what every reload pays), and, for
//! scale, loading their YAML; and what an xDS update pays once 10,000 clusters are held:
//! copying the source's state to publish it, taking its active resources, indexing them.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion};
use portcullis_benches::{registry_yaml, resources};
use portcullis_envoy::state::SourceState;
use portcullis_registry::{BuildOptions, Snapshot, build, compile};

const SERVICES: usize = 10_000;

fn snapshot_build(c: &mut Criterion) {
    let resources = resources(SERVICES);
    let options = BuildOptions::default();
    let previous = build(&resources, &options, None, 1);
    let mut g = c.benchmark_group("build");
    g.sample_size(20);
    g.bench_with_input(
        BenchmarkId::new("snapshot", SERVICES),
        &resources,
        |b, r| b.iter(|| build(black_box(r), &options, None, 2)),
    );
    // A reload carries endpoint counters over from the snapshot it replaces.
    g.bench_with_input(
        BenchmarkId::new("snapshot_after_previous", SERVICES),
        &resources,
        |b, r| b.iter(|| build(black_box(r), &options, Some(&previous), 2)),
    );
    // Parsing is slower than compiling; ten samples keep the run short.
    g.sample_size(10);
    let yaml = registry_yaml(SERVICES);
    let file = Arc::new(PathBuf::from("generated.yaml"));
    g.bench_with_input(BenchmarkId::new("load_yaml", SERVICES), &yaml, |b, y| {
        b.iter(|| portcullis_model::load_str(black_box(y), &file));
    });
    g.finish();
}

fn publish(c: &mut Criterion) {
    let compiled = compile(&resources(SERVICES), &BuildOptions::default(), &|_| None);
    let state = SourceState::of(compiled.resources, "1", std::time::SystemTime::UNIX_EPOCH);
    let active = state.active();
    let previous = Snapshot::index(&active, &|_| None, None, 1);
    let mut g = c.benchmark_group("publish");
    g.sample_size(20);
    g.bench_function(BenchmarkId::new("state_clone", SERVICES), |b| {
        b.iter(|| black_box(&state).clone());
    });
    g.bench_function(BenchmarkId::new("active", SERVICES), |b| {
        b.iter(|| black_box(&state).active());
    });
    g.bench_function(BenchmarkId::new("index", SERVICES), |b| {
        b.iter(|| Snapshot::index(black_box(&active), &|_| None, Some(&previous), 2));
    });
    g.finish();
}

/// What one small xDS push costs the proxy while 10,000 EDS clusters are held (the bulk
/// push of `portcullis-bench push`): one cluster's endpoints change, then the state is
/// published, its active set found from the last one and the snapshot indexed against the
/// last snapshot, as `portcullis_sources` does for each update.
fn small_push(c: &mut Criterion) {
    use portcullis_control_plane::{resources, sidecar};
    use portcullis_xds_resources::{ResourceType, XdsState};
    let [endpoints, clusters] = sidecar::bulk(SERVICES);
    let mut state = XdsState::new(Duration::from_secs(15));
    let eds = ResourceType::Endpoint.type_url();
    state.apply_sotw(eds, "1", &endpoints.resources);
    state.apply_sotw(ResourceType::Cluster.type_url(), "1", &clusters.resources);
    let mut last_state = Arc::new(state.state().clone());
    let mut last_active = last_state.active();
    let mut last = Snapshot::index(&last_active, &|_| None, None, 1);
    // Two versions of the first cluster's endpoints, pushed in turn.
    let one = [1, 2].map(|host| {
        let addr = std::net::SocketAddr::from(([192, 0, 2, host], 80));
        let cla = resources::assignment(&sidecar::bulk_cluster(0), &[addr]);
        vec![envoy_types::util::pack_any(cla)]
    });
    let mut g = c.benchmark_group("publish");
    g.sample_size(20);
    let mut turn = 0;
    g.bench_function(BenchmarkId::new("xds_small_push", SERVICES), |b| {
        b.iter(|| {
            turn += 1;
            state.apply_sotw(eds, &turn.to_string(), &one[turn % 2]);
            let held = Arc::new(state.state().clone());
            let active = held.active_since(&last_state, &last_active);
            let next = Snapshot::index(&active, &|_| None, Some(&last), 2);
            (last_state, last_active) = (held, active);
            std::mem::replace(&mut last, next)
        });
    });
    g.finish();
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    snapshot_build(&mut c);
    publish(&mut c);
    small_push(&mut c);
    c.final_summary();
}
