//! A test mesh CA and a control-plane certificate signed by it, written to a temporary folder
//! (shared by the control plane's and the xDS client's tests).

use portcullis_control_plane::Tls;

/// The server's certificate and key, and `root-cert.pem` (the CA) in `dir`.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub server: Tls,
}

/// A fresh CA and a server certificate for 127.0.0.1 and istiod's service name.
pub fn pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test mesh CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec![
        "127.0.0.1".to_owned(),
        "istiod.istio-system.svc".to_owned(),
    ])
    .unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Tls {
        cert_pem: cert.pem().into_bytes(),
        key_pem: key.serialize_pem().into_bytes(),
    };
    std::fs::write(dir.path().join("root-cert.pem"), ca.pem()).unwrap();
    Pki { dir, server }
}
