//! Endpoint pick for each load-balancing policy, over 3 and 1,000 endpoints.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion};
use portcullis_balance::{Balancer, EndpointState, Policy};

fn pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick");
    for (name, policy) in [
        ("least_request", Policy::LeastRequest),
        ("round_robin", Policy::RoundRobin),
        ("random", Policy::Random),
    ] {
        for n in [3u32, 1_000] {
            // Unequal weights and some requests in flight, so that weighted paths and the
            // least-request comparison do real work.
            let endpoints: Vec<(u32, Arc<EndpointState>)> = (0..n)
                .map(|i| (1 + i % 5, Arc::new(EndpointState::new())))
                .collect();
            let guards: Vec<_> = endpoints
                .iter()
                .step_by(2)
                .map(|(_, s)| s.start())
                .collect();
            let balancer = Balancer::new(policy, endpoints);
            g.bench_with_input(BenchmarkId::new(name, n), &balancer, |b, balancer| {
                b.iter(|| black_box(balancer).pick());
            });
            drop(guards);
        }
    }
    g.finish();
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    pick(&mut c);
    c.final_summary();
}
