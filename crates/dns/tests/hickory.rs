//! `HickoryLookup` over a real UDP socket, against a tiny DNS responder on loopback.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use portcullis_dns::{DnsCache, DnsConfig, DnsError, HickoryLookup, Lookup};
use tokio::net::UdpSocket;
use tokio::time::timeout;

const A_TTL: u32 = 300;
const AAAA_TTL: u32 = 120;

/// Answers `svc.test.` with two A records (TTL 300) and one AAAA record (TTL 120),
/// and anything else with NXDOMAIN.
async fn responder() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        loop {
            let (len, peer) = socket.recv_from(&mut buf).await.unwrap();
            let Ok(request) = Message::from_vec(&buf[..len]) else {
                continue;
            };
            let reply = answer(&request).to_vec().unwrap();
            socket.send_to(&reply, peer).await.unwrap();
        }
    });
    addr
}

fn answer(request: &Message) -> Message {
    let mut reply = Message::response(request.metadata.id, request.metadata.op_code);
    reply.add_queries(request.queries.iter().cloned());
    let Some(query) = request.queries.first() else {
        reply.metadata.response_code = ResponseCode::FormErr;
        return reply;
    };
    if !query.name().to_ascii().eq_ignore_ascii_case("svc.test.") {
        reply.metadata.response_code = ResponseCode::NXDomain;
        return reply;
    }
    let name = query.name().clone();
    let records: Vec<Record> = match query.query_type() {
        RecordType::A => [Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(192, 0, 2, 1)]
            .into_iter()
            .map(|ip| Record::from_rdata(name.clone(), A_TTL, RData::A(A(ip))))
            .collect(),
        RecordType::AAAA => vec![Record::from_rdata(
            name,
            AAAA_TTL,
            RData::AAAA(AAAA(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))),
        )],
        _ => Vec::new(),
    };
    reply.add_answers(records);
    reply
}

#[tokio::test]
async fn a_and_aaaa_records_and_their_ttl_come_through() {
    let lookup = HickoryLookup::with_nameserver(responder().await).unwrap();

    let (mut addrs, ttl) = timeout(Duration::from_secs(5), lookup.lookup("svc.test."))
        .await
        .unwrap()
        .unwrap();
    addrs.sort();
    let expected: Vec<IpAddr> = vec![
        "192.0.2.1".parse().unwrap(),
        "192.0.2.2".parse().unwrap(),
        "2001:db8::1".parse().unwrap(),
    ];
    assert_eq!(addrs, expected);
    // The smaller of the two TTLs, less the time the lookup took.
    let aaaa_ttl = Duration::from_secs(AAAA_TTL.into());
    assert!(
        ttl <= aaaa_ttl && ttl > aaaa_ttl - Duration::from_secs(5),
        "{ttl:?}"
    );

    let error = timeout(Duration::from_secs(5), lookup.lookup("missing.test."))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(
        error,
        DnsError::NoAddresses {
            name: "missing.test.".to_owned()
        }
    );
}

#[tokio::test]
async fn a_cache_over_hickory_publishes_the_answer() {
    let lookup = HickoryLookup::with_nameserver(responder().await).unwrap();
    let cache = DnsCache::new(lookup, DnsConfig::default());
    let mut changes = cache.subscribe();

    cache.set_names(["SVC.test".to_owned()]);
    timeout(Duration::from_secs(5), changes.changed())
        .await
        .unwrap()
        .unwrap();

    let answers = cache.answers();
    let answer = &answers["svc.test"];
    assert_eq!(answer.addrs.len(), 3);
    assert_eq!(answer.ttl, DnsConfig::default().max_ttl);
    assert_eq!(answer.last_error, None);
}

#[test]
fn the_system_configuration_loads_outside_a_runtime() {
    HickoryLookup::from_system_conf().unwrap();
}
