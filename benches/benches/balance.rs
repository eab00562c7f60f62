//! Endpoint pick for each load-balancing policy, over 3 and 1,000 endpoints; the
//! consistent-hash policies pick by a request hash, as for a hashed header. Then the data
//! path's pick (through the priority layer) without slow start, with slow start once every
//! endpoint is warm, and while one endpoint warms up.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use portcullis_balance::{
    Balancer, DEFAULT_MAGLEV_TABLE_SIZE, DEFAULT_MAXIMUM_RING_SIZE, DEFAULT_MINIMUM_RING_SIZE,
    EndpointState, Group, Layout, Member, Policy, SlowStart, xxhash64,
};

fn pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick");
    for (name, policy) in [
        ("least_request", Policy::LeastRequest),
        ("round_robin", Policy::RoundRobin),
        ("random", Policy::Random),
        (
            "ring_hash",
            Policy::RingHash {
                minimum_ring_size: DEFAULT_MINIMUM_RING_SIZE,
                maximum_ring_size: DEFAULT_MAXIMUM_RING_SIZE,
            },
        ),
        (
            "maglev",
            Policy::Maglev {
                table_size: DEFAULT_MAGLEV_TABLE_SIZE,
            },
        ),
    ] {
        for n in [3u32, 1_000] {
            // Unequal weights and some requests in flight, so that weighted paths and the
            // least-request comparison do real work.
            let endpoints: Vec<Member> = (0..n)
                .map(|i| Member {
                    weight: 1 + i % 5,
                    state: Arc::new(EndpointState::new()),
                    key: format!("10.0.{}.{}:80", i / 250, i % 250),
                })
                .collect();
            let guards: Vec<_> = endpoints
                .iter()
                .step_by(2)
                .map(|m| m.state.start())
                .collect();
            let balancer = Balancer::new(policy, endpoints);
            let hash = Some(xxhash64(b"user-42", 0));
            g.bench_with_input(BenchmarkId::new(name, n), &balancer, |b, balancer| {
                b.iter(|| black_box(balancer).pick_hashed(black_box(hash), &[]));
            });
            drop(guards);
        }
    }
    g.finish();
}

fn slow_start(c: &mut Criterion) {
    let mut g = c.benchmark_group("slow_start");
    let window = Duration::from_secs(60);
    for (name, policy) in [
        ("least_request", Policy::LeastRequest),
        ("round_robin", Policy::RoundRobin),
    ] {
        for n in [3u32, 1_000] {
            let start = Instant::now();
            // The last endpoint joins a minute after the others.
            let endpoints: Vec<Member> = (0..n)
                .map(|i| Member {
                    weight: 1,
                    state: Arc::new(EndpointState::added_at(if i + 1 == n {
                        start + window
                    } else {
                        start
                    })),
                    key: String::new(),
                })
                .collect();
            let layout = Layout {
                groups: vec![Group {
                    priority: 0,
                    weight: 1,
                    hosts: n,
                    members: (0..n as usize).collect(),
                }],
                locality_weighted: false,
            };
            let cases = [
                ("off", None, start + window),
                ("warm", Some(SlowStart::new(window)), start + 3 * window),
                (
                    "warming",
                    Some(SlowStart::new(window)),
                    start + window * 3 / 2,
                ),
            ];
            for (case, config, now) in cases {
                let balancer = Balancer::layered(policy, endpoints.clone(), layout.clone(), config);
                let id = BenchmarkId::new(format!("{name}/{case}"), n);
                g.bench_with_input(id, &balancer, |b, balancer| {
                    b.iter(|| {
                        black_box(balancer).choose(None, (&[], None), None, 0.0, black_box(now))
                    });
                });
            }
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
    slow_start(&mut c);
    c.final_summary();
}
