//! Workload certificates from the test control plane's CA, over TLS with a bearer token.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use portcullis_control_plane::ControlPlane;
use portcullis_control_plane::ca::TestCa;
use portcullis_xds::ca::{CaConfig, CaError, request};

#[path = "../../control-plane/tests/support/pki.rs"]
mod pki;

struct Setup {
    _cp: ControlPlane,
    ca: Arc<TestCa>,
    pki: pki::Pki,
    config: CaConfig,
}

async fn setup(token: &str) -> Setup {
    let pki = pki::pki();
    let cp = ControlPlane::start("127.0.0.1:0".parse().unwrap(), Some(pki.server.clone()))
        .await
        .unwrap();
    let ca = Arc::new(
        TestCa::new("cluster.local", Duration::from_secs(3600))
            .unwrap()
            .with_token("token-of-cart", "shop", "cart"),
    );
    cp.serve_ca(Arc::clone(&ca));
    let token_file = pki.dir.path().join("istio-token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let mut config = CaConfig::new(
        format!("https://{}", cp.local_addr()),
        "cluster.local",
        "shop",
        "cart",
    );
    config.root_cert = pki.dir.path().join("root-cert.pem");
    config.token_file = token_file;
    config.validity = Duration::from_secs(600);
    Setup {
        _cp: cp,
        ca,
        pki,
        config,
    }
}

#[tokio::test]
async fn the_ca_issues_the_tokens_identity_for_the_lifetime_asked() {
    let s = setup("token-of-cart").await;
    let issued = request(&s.config).await.unwrap();
    assert_eq!(s.ca.issued(), ["spiffe://cluster.local/ns/shop/sa/cart"]);
    assert_eq!(issued.root, s.ca.root_pem().as_bytes());
    assert!(String::from_utf8_lossy(&issued.key).contains("PRIVATE KEY"));
    let lifetime = issued.not_after.duration_since(issued.not_before).unwrap();
    assert_eq!(lifetime, Duration::from_secs(600));
    assert!(issued.not_before <= SystemTime::now());
    let (_, pem) = x509_parser::pem::parse_x509_pem(&issued.cert_chain).unwrap();
    let cert = pem.parse_x509().unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        format!("{:?}", san.value.general_names),
        r#"[URI("spiffe://cluster.local/ns/shop/sa/cart")]"#
    );
    drop(s.pki);
}

#[tokio::test]
async fn another_service_account_than_the_tokens_is_refused() {
    let mut s = setup("token-of-cart").await;
    s.config.service_account = "admin".into();
    let refused = request(&s.config).await.unwrap_err();
    assert!(
        matches!(&refused, CaError::Status(status) if status.code() == tonic::Code::Unauthenticated),
        "{refused:?}"
    );
    assert!(s.ca.issued().is_empty());
}

#[tokio::test]
async fn an_unknown_token_is_refused() {
    let s = setup("forged").await;
    let refused = request(&s.config).await.unwrap_err();
    assert!(
        matches!(&refused, CaError::Status(status) if status.code() == tonic::Code::Unauthenticated),
        "{refused:?}"
    );
}
