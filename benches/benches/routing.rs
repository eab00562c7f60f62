//! Routing decisions by Host, by SNI and by address+port, and the explanation of a refusal,
//! at 10, 1,000 and 100,000 ServiceEntries. Each benchmark id ends in the registry size, so that the summary
//! (`portcullis-bench criterion-table`) shows whether a lookup's cost grows with it.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion};
use portcullis_benches::model::indexed;
use portcullis_benches::{HTTP_PORT, SIZES, TCP_PORT, TLS_PORT, keys, snapshot};
use portcullis_registry::{Refused, Snapshot};

fn routing(c: &mut Criterion) {
    for n in SIZES {
        lookups(c, "", &snapshot(n), n);
        // The same registry as Envoy's model (listeners, chains, route tables).
        lookups(c, "index/", &indexed(n), n);
    }
}

fn lookups(c: &mut Criterion, prefix: &str, s: &Snapshot, n: usize) {
    {
        let k = keys(n);

        let mut g = c.benchmark_group(format!("{prefix}route_http"));
        for (case, host) in [
            ("exact", &k.exact_host),
            ("wildcard", &k.wildcard_host),
            ("miss", &k.missing_host),
        ] {
            g.bench_with_input(BenchmarkId::new(case, n), host, |b, host| {
                b.iter(|| s.route_http(black_box(host), black_box(HTTP_PORT)));
            });
        }
        g.finish();

        let mut g = c.benchmark_group(format!("{prefix}route_sni"));
        for (case, host) in [
            ("exact", &k.exact_host),
            ("wildcard", &k.wildcard_host),
            ("miss", &k.missing_host),
        ] {
            g.bench_with_input(BenchmarkId::new(case, n), host, |b, host| {
                b.iter(|| {
                    s.route_tls(
                        black_box(Some(host)),
                        black_box(k.missing_ip),
                        black_box(TLS_PORT),
                    )
                });
            });
        }
        g.finish();

        let mut g = c.benchmark_group(format!("{prefix}route_tcp"));
        for (case, ip) in [
            ("exact", k.exact_ip),
            ("cidr", k.cidr_ip),
            ("miss", k.missing_ip),
        ] {
            g.bench_with_input(BenchmarkId::new(case, n), &ip, |b, ip| {
                b.iter(|| s.route_tcp(black_box(*ip), black_box(TCP_PORT)));
            });
        }
        g.finish();

        // A refusal's explanation (the denials record, learn mode): the name unknown, and
        // known on another port.
        let mut g = c.benchmark_group(format!("{prefix}explain"));
        for (case, host, port) in [
            ("unknown", &k.missing_host, HTTP_PORT),
            ("other_port", &k.exact_host, HTTP_PORT + 1),
        ] {
            g.bench_with_input(BenchmarkId::new(case, n), host, |b, host| {
                b.iter(|| {
                    s.explain(black_box(Refused {
                        host: Some(host),
                        destination: None,
                        port,
                    }))
                });
            });
        }
        g.finish();
    }
}

fn main() {
    // Lookups take nanoseconds: short windows give stable medians and keep the whole
    // `cargo bench` within a few minutes.
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    routing(&mut c);
    c.final_summary();
}
