//! The TLS ClientHello peek: never panics, and its answers are final. The proxy calls it
//! again each time more bytes arrive, so a hello found in a prefix must be the hello of every
//! longer buffer, and a prefix rejected must stay rejected (else a client that happens to
//! fragment differently would be routed differently).
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_fuzz::{check_decision, expected_host_route, pod_named, registry};
use portcullis_proxy::tls::parse_client_hello;
use portcullis_registry::normalize_host;

/// Bytes a client may send after its hello (a change_cipher_spec record), which must not
/// change what was peeked.
const AFTER_HELLO: [u8; 6] = [0x14, 0x03, 0x03, 0x00, 0x01, 0x01];

fuzz_target!(|data: &[u8]| {
    let whole = parse_client_hello(data);
    // Cut where the input itself says, so the fuzzer can aim at record and field boundaries,
    // and in the middle.
    let chosen = data
        .first()
        .map_or(0, |&b| usize::from(b) * data.len() / 256);
    for cut in [chosen, data.len() / 2] {
        match (parse_client_hello(&data[..cut]), &whole) {
            (Ok(Some(early)), Ok(Some(late))) => assert_eq!(&early, late),
            (Ok(Some(early)), late) => panic!("hello {early:?} in a prefix, then {late:?}"),
            (Err(e), Ok(late)) => panic!("prefix rejected ({e}), longer buffer gave {late:?}"),
            _ => {}
        }
    }
    let Ok(Some(hello)) = whole else {
        return;
    };
    let mut longer = data.to_vec();
    longer.extend_from_slice(&AFTER_HELLO);
    assert_eq!(
        parse_client_hello(&longer).ok().flatten().as_ref(),
        Some(&hello)
    );
    if let Some(sni) = &hello.sni {
        // SNI and Host routing must agree on what a name is: the peeked name is already in
        // the registry's normal form.
        assert!(sni.len() <= 255, "SNI of {} bytes", sni.len());
        assert_eq!(normalize_host(sni).as_deref(), Ok(sni.as_str()));
        let decision = registry().route_host(sni, 443);
        check_decision(
            &decision,
            expected_host_route(sni, 443),
            pod_named(sni),
            443,
        );
    }
});
