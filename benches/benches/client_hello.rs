//! Parsing a real rustls ClientHello, whole and cut into small records.

use std::hint::black_box;
use std::time::Duration;

use criterion::Criterion;
use portcullis_benches::rustls_client_hello;
use portcullis_proxy::tls::parse_client_hello;

/// Re-cuts the handshake of a one-record hello into records of `size` bytes, as some
/// clients and middleboxes send it.
fn refragment(wire: &[u8], size: usize) -> Vec<u8> {
    wire[5..]
        .chunks(size)
        .flat_map(|chunk| {
            let len = u16::try_from(chunk.len()).expect("small record");
            let mut record = vec![22, 3, 1];
            record.extend(len.to_be_bytes());
            record.extend(chunk);
            record
        })
        .collect()
}

fn client_hello(c: &mut Criterion) {
    let wire = rustls_client_hello("api.internal.example.com");
    let split = refragment(&wire, 64);
    let mut g = c.benchmark_group("parse_client_hello");
    g.bench_function("rustls", |b| {
        b.iter(|| parse_client_hello(black_box(&wire)))
    });
    g.bench_function("rustls_64_byte_records", |b| {
        b.iter(|| parse_client_hello(black_box(&split)));
    });
    g.finish();
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    client_hello(&mut c);
    c.final_summary();
}
