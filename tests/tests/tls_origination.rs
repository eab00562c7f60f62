//! TLS origination (DestinationRule `tls`), differential against real Envoy 1.40: the app
//! speaks plain HTTP to `http://HOST/`, the sidecar speaks TLS to nginx on the external host
//! and verifies it with a test CA made here. A good certificate is served; a wrong CA, a
//! name the certificate does not carry (auto SAN validation and an explicit SAN list) and an
//! expired certificate are refused with Envoy's 503 and flags; MUTUAL
//! presents the configured client certificate to an nginx that requires one, and without one
//! nginx answers its own 400. Both proxies get the resources istiod builds over ADS, and a
//! third lab runs portcullis from the Istio YAML istiod compiles them from.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use portcullis_e2e::envoy::istio::{
    Mode, Resources, cluster_name, http_listener, service_vhost, static_cluster, to_cluster,
    vs_route, vs_vhost,
};
use portcullis_e2e::envoy::{Probe, Scenario, TLS_PAGE, run_differential};
use portcullis_e2e::scenario::EXTERNAL_IP;
use portcullis_e2e::{Lab, Role, poll, run};

/// The test CA, a CA nobody trusts, and the certificates nginx and the client present,
/// written to a folder every lab reads (the proxies' DestinationRule files and nginx).
struct Pki {
    dir: PathBuf,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new(name: &str, dir: &Path, file: &str) -> anyhow::Result<Ca> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        write(dir, file, &params.self_signed(&key)?.pem())?;
        Ok(Ca {
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    /// `FILE` and `KEY_FILE` for the SPIFFE identity `uri`, valid for two days.
    fn issue_spiffe(
        &self,
        dir: &Path,
        (file, key_file): (&str, &str),
        uri: &str,
    ) -> anyhow::Result<()> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into()?)];
        let now = SystemTime::now() - Duration::from_secs(3600);
        params.not_before = now.into();
        params.not_after = (now + Duration::from_secs(2 * 86_400)).into();
        let key = rcgen::KeyPair::generate()?;
        write(dir, file, &params.signed_by(&key, &self.issuer)?.pem())?;
        write(dir, key_file, &key.serialize_pem())
    }

    /// `NAME.pem` and `NAME-key.pem` for `names`, valid from `from` for two days.
    fn issue(
        &self,
        dir: &Path,
        name: &str,
        names: &[&str],
        from: SystemTime,
    ) -> anyhow::Result<()> {
        let mut params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.not_before = from.into();
        params.not_after = (from + Duration::from_secs(2 * 86_400)).into();
        let key = rcgen::KeyPair::generate()?;
        write(
            dir,
            &format!("{name}.pem"),
            &params.signed_by(&key, &self.issuer)?.pem(),
        )?;
        write(dir, &format!("{name}-key.pem"), &key.serialize_pem())
    }
}

fn write(dir: &Path, file: &str, content: &str) -> anyhow::Result<()> {
    let path = dir.join(file);
    std::fs::write(&path, content)?;
    // The proxies run as Istio's proxy user.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    Ok(())
}

impl Pki {
    fn new() -> anyhow::Result<Pki> {
        let dir = std::env::temp_dir().join(format!("pce2e-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        let pki = Pki { dir };
        let ca = Ca::new("portcullis e2e CA", &pki.dir, "ca.pem")?;
        Ca::new("untrusted e2e CA", &pki.dir, "other-ca.pem")?;
        let now = SystemTime::now() - Duration::from_secs(3600);
        ca.issue(
            &pki.dir,
            "api",
            &["api.example.com", "sans.example.com"],
            now,
        )?;
        let expired = SystemTime::now() - Duration::from_secs(5 * 86_400);
        ca.issue(&pki.dir, "expired", &["expired.example.com"], expired)?;
        ca.issue(
            &pki.dir,
            "mutual",
            &["mutual.example.com", "anonymous.example.com"],
            now,
        )?;
        ca.issue(
            &pki.dir,
            "client",
            &["client.default.svc.cluster.local"],
            now,
        )?;
        Ok(pki)
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    /// nginx servers on the external host: the good certificate on 443, the expired one on
    /// 9443, and on 11443 one that requires a client certificate of the CA.
    fn nginx_servers(&self) -> String {
        let server = |port: u16, name: &str, extra: &str| {
            format!(
                "    server {{
        listen {EXTERNAL_IP}:{port} ssl;
        server_name _;
        ssl_certificate {};
        ssl_certificate_key {};
{extra}        root {{html}};
    }}
",
                self.path(&format!("{name}.pem")),
                self.path(&format!("{name}-key.pem")),
            )
        };
        let verify = format!(
            "        ssl_verify_client on;\n        ssl_client_certificate {};\n",
            self.path("ca.pem")
        );
        [
            server(443, "api", ""),
            server(9443, "expired", ""),
            server(11443, "mutual", &verify),
        ]
        .concat()
    }
}

/// One origination case: the host the app asks for, the nginx port behind it, and the
/// DestinationRule `tls` it gets.
struct Case {
    host: &'static str,
    port: u16,
    ca: String,
    sni: Option<&'static str>,
    sans: &'static [&'static str],
    /// The ServiceEntry's `subjectAltNames`.
    service_sans: &'static [&'static str],
    /// MUTUAL's client certificate and key files.
    client: Option<(String, String)>,
}

impl Case {
    fn new(host: &'static str, port: u16, ca: String) -> Case {
        Case {
            host,
            port,
            ca,
            sni: None,
            sans: &[],
            service_sans: &[],
            client: None,
        }
    }

    /// The ServiceEntry and DestinationRule istiod compiles the cluster from.
    fn yaml(&self) -> String {
        let name = self.host.split('.').next().unwrap_or(self.host);
        let mut tls = format!("caCertificates: {}", self.ca);
        if let Some(sni) = self.sni {
            tls.push_str(&format!(", sni: {sni}"));
        }
        if !self.sans.is_empty() {
            tls.push_str(&format!(", subjectAltNames: [{}]", self.sans.join(", ")));
        }
        let mode = match &self.client {
            Some((cert, key)) => {
                tls.push_str(&format!(", clientCertificate: {cert}, privateKey: {key}"));
                "MUTUAL"
            }
            None => "SIMPLE",
        };
        format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [{host}]
  ports:
  - {{number: 80, name: http, protocol: HTTP, targetPort: {port}}}
  resolution: STATIC
  subjectAltNames: [{service_sans}]
  endpoints:
  - address: {EXTERNAL_IP}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}, namespace: default}}
spec:
  host: {host}
  trafficPolicy:
    tls: {{mode: {mode}, {tls}}}
",
            host = self.host,
            port = self.port,
            service_sans = self.service_sans.join(", "),
        )
    }

    /// What istiod writes for the rule (`cluster_tls.go`), with the files istio-agent would
    /// serve over SDS given to Envoy as file data sources (plain Envoy has no istio-agent):
    /// TLS 1.2 to 1.3, the rule's SNI or else `auto_sni` with `auto_san_validation` (unless
    /// SANs are given), the rule's SANs.
    fn cluster(&self) -> Value {
        let mut cluster = static_cluster(80, self.host, &[(EXTERNAL_IP, self.port)]);
        // istiod decides auto SAN validation on the rule's SANs, then falls back to the
        // ServiceEntry's for the matchers.
        let matchers = if self.sans.is_empty() {
            self.service_sans
        } else {
            self.sans
        };
        let sans: Vec<Value> = matchers.iter().map(|s| json!({ "exact": s })).collect();
        let mut common = json!({
            "tls_params": {
                "tls_minimum_protocol_version": "TLSv1_2",
                "tls_maximum_protocol_version": "TLSv1_3"
            },
            "validation_context": {
                "trusted_ca": { "filename": self.ca },
                "match_subject_alt_names": sans
            }
        });
        if let Some((cert, key)) = &self.client {
            common["tls_certificates"] = json!([{
                "certificate_chain": { "filename": cert },
                "private_key": { "filename": key }
            }]);
        }
        let mut context = json!({
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": common
        });
        match self.sni {
            Some(sni) => context["sni"] = json!(sni),
            None => {
                cluster["typed_extension_protocol_options"] = json!({
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": { "http_protocol_options": {} },
                        "upstream_http_protocol_options": {
                            "auto_sni": true,
                            "auto_san_validation": self.sans.is_empty()
                        }
                    }
                })
            }
        }
        cluster["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": context
        });
        cluster
    }
}

#[test]
fn tls_origination_verifies_the_upstream_as_envoy_does() {
    let pki = Pki::new().expect("test PKI");
    let ca = pki.path("ca.pem");
    let cases = [
        Case::new("api.example.com", 443, ca.clone()),
        // The ServiceEntry's SANs do not name the certificate, but auto SAN validation (no
        // SNI in the rule) checks the host instead of them.
        Case {
            service_sans: &["billing.example.com"],
            ..Case::new("override.example.com", 443, ca.clone())
        },
        // The certificate does not name the host the SNI (auto SNI) asks for.
        Case::new("wrongsan.example.com", 443, ca.clone()),
        Case {
            sni: Some("api.example.com"),
            sans: &["billing.example.com"],
            ..Case::new("sans.example.com", 443, ca.clone())
        },
        Case::new("wrongca.example.com", 443, pki.path("other-ca.pem")),
        Case::new("expired.example.com", 9443, ca.clone()),
        Case {
            client: Some((pki.path("client.pem"), pki.path("client-key.pem"))),
            ..Case::new("mutual.example.com", 11443, ca.clone())
        },
        Case::new("anonymous.example.com", 11443, ca.clone()),
    ];
    let mut envoy = Resources::new(Mode::RegistryOnly).listener(http_listener(
        80,
        cases
            .iter()
            .map(|c| service_vhost(c.host, 80, &[]))
            .collect(),
        Mode::RegistryOnly,
    ));
    for case in &cases {
        envoy = envoy.cluster(case.cluster());
    }
    let probe = |name: &str, host: &str| Probe::curl(name, &[&format!("http://{host}/")]);
    let scenario = Scenario {
        name: "tls-origination",
        files: cases
            .iter()
            .map(|c| (format!("{}.yaml", c.host), c.yaml()))
            .collect(),
        envoy,
        portcullis_flags: vec![],
        probes: vec![
            probe("verified TLS to the upstream", "api.example.com"),
            probe(
                "auto SAN validation in place of the ServiceEntry's SANs",
                "override.example.com",
            ),
            probe(
                "certificate without the SNI's name (auto SAN validation)",
                "wrongsan.example.com",
            ),
            probe(
                "certificate without the rule's subjectAltNames",
                "sans.example.com",
            ),
            probe("certificate of a CA not trusted", "wrongca.example.com"),
            probe("expired certificate", "expired.example.com"),
            probe(
                "client certificate presented (MUTUAL)",
                "mutual.example.com",
            ),
            probe(
                "no client certificate where nginx requires one",
                "anonymous.example.com",
            ),
        ],
    };
    let names: Vec<&str> = cases.iter().map(|c| c.host).collect();
    let servers = pki.nginx_servers();
    run_differential(scenario, |lab| {
        lab.map_pod_names(&names)?;
        lab.start_nginx_servers(Role::External, "tls", &servers, TLS_PAGE, 8444)?;
        Ok(())
    });
}

/// A route without retries (a VirtualService's `retries: {attempts: 0}`, over xDS only:
/// routing rules from files are not applied yet): one attempt, `UF` without `URX`, and a
/// body that names only the reset reason (the transport failure reason is the log's).
#[test]
fn a_refused_certificate_without_retries_names_the_reason_as_envoy_does() {
    let pki = Pki::new().expect("test PKI");
    let case = Case::new("wrongca.example.com", 443, pki.path("other-ca.pem"));
    let route = vs_route(
        "once",
        "/",
        json!({ "route": to_cluster(&cluster_name(80, case.host), Some(Value::Null)) }),
    );
    let scenario = Scenario {
        name: "tls-no-retry",
        files: Vec::new(),
        envoy: Resources::new(Mode::RegistryOnly)
            .listener(http_listener(
                80,
                vec![vs_vhost(case.host, 80, vec![route])],
                Mode::RegistryOnly,
            ))
            .cluster(case.cluster()),
        portcullis_flags: vec![],
        probes: vec![Probe::curl(
            "certificate of a CA not trusted, one attempt",
            &["http://wrongca.example.com/"],
        )],
    };
    let servers = pki.nginx_servers();
    run_differential(scenario, |lab| {
        lab.map_pod_names(&[case.host])?;
        lab.start_nginx_servers(Role::External, "tls", &servers, TLS_PAGE, 8444)?;
        Ok(())
    });
}

/// A mesh peer on the external host that, like Istio's inbound Envoy, accepts the `istio`
/// ALPN (nginx refuses unknown protocols) and requires a client certificate of `root`.
fn spawn_mesh_peer(
    lab: &mut portcullis_e2e::Lab,
    cert: &str,
    key: &str,
    root: &str,
) -> anyhow::Result<()> {
    lab.spawn_peer(
        Role::External,
        "mesh-peer",
        "openssl",
        &[
            "s_server",
            "-quiet",
            "-www",
            "-accept",
            &format!("{EXTERNAL_IP}:11443"),
            "-cert",
            cert,
            "-key",
            key,
            "-CAfile",
            root,
            "-Verify",
            "1",
            "-verify_return_error",
        ],
        "TERM",
    )
}

/// The peer's identity in the ISTIO_MUTUAL lab.
const PEER_ID: &str = "spiffe://cluster.local/ns/default/sa/api";

/// DestinationRule `ISTIO_MUTUAL` from files, the workload's certificates where istio-agent
/// writes them with `OUTPUT_CERTS` (`--istio-certs`): nginx, with a certificate for the
/// peer's SPIFFE identity and requiring a client certificate of the mesh CA, answers; a
/// service whose `subjectAltNames` name another identity is refused.
#[test]
fn istio_mutual_tls_from_files_with_istio_agents_certificates() {
    run("istio-mutual", |lab| {
        let pki = Pki::new()?;
        let mesh = Ca::new("mesh root", &pki.dir, "root-cert.pem")?;
        mesh.issue_spiffe(
            &pki.dir,
            ("cert-chain.pem", "key.pem"),
            "spiffe://cluster.local/ns/default/sa/client",
        )?;
        mesh.issue_spiffe(&pki.dir, ("peer.pem", "peer-key.pem"), PEER_ID)?;
        spawn_mesh_peer(
            lab,
            &pki.path("peer.pem"),
            &pki.path("peer-key.pem"),
            &pki.path("root-cert.pem"),
        )?;
        let service = |name: &str, san: &str| {
            format!(
                "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [{name}.example.com]
  ports:
  - {{number: 80, name: http, protocol: HTTP, targetPort: 11443}}
  resolution: STATIC
  subjectAltNames: [{san}]
  endpoints:
  - address: {EXTERNAL_IP}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}, namespace: default}}
spec:
  host: {name}.example.com
  trafficPolicy:
    tls: {{mode: ISTIO_MUTUAL}}
"
            )
        };
        lab.map_pod_names(&["mesh.example.com", "impostor.example.com"])?;
        lab.write_registry_only()?;
        lab.write_config("mesh.yaml", &service("mesh", PEER_ID))?;
        lab.write_config(
            "impostor.yaml",
            &service("impostor", "spiffe://cluster.local/ns/default/sa/billing"),
        )?;
        lab.apply_iptables()?;
        let certs = pki.dir.display().to_string();
        lab.start_portcullis(&["--istio-certs", &certs])?;
        // s_server's `-www` page describes the session it served.
        let reply = poll("the mesh peer", Duration::from_secs(10), || {
            let reply = lab.curl(&["http://mesh.example.com/"])?;
            Ok((reply.status != 503).then_some(reply))
        })?;
        reply.expect_page("ISTIO_MUTUAL to the peer istiod names", "s_server")?;
        let impostor = lab.curl(&["http://impostor.example.com/"])?;
        anyhow::ensure!(
            impostor.status == 503,
            "a peer with another identity must be refused: {impostor}"
        );
        Ok(())
    });
}

/// `ISTIO_MUTUAL` with the workload's certificate requested from Istio's CA (`--ca-address`,
/// the control plane's test CA in the pod, the service-account token as a bearer), with a
/// lifetime of a few seconds: portcullis is ready only once it has one, reaches the mesh
/// peer with it, and renews it at half its lifetime.
#[test]
fn istio_mutual_tls_with_a_certificate_from_istios_ca_renewed_before_expiry() {
    run("istio-ca", |lab| {
        let pki = Pki::new()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let ca = std::sync::Arc::new(
            portcullis_control_plane::ca::TestCa::new("cluster.local", Duration::from_secs(3600))?
                .with_token("client-token", "default", "client"),
        );
        let (peer_cert, peer_key) = ca.issue(PEER_ID, Duration::from_secs(3600))?;
        write(&pki.dir, "ca-peer.pem", &peer_cert)?;
        write(&pki.dir, "ca-peer-key.pem", &peer_key)?;
        write(&pki.dir, "ca-root.pem", ca.root_pem())?;
        write(&pki.dir, "istio-token", "client-token\n")?;
        let pod = lab.ns(Role::Pod);
        let cp = rt.block_on(portcullis_control_plane::ControlPlane::start_in_netns(
            &pod,
            "127.0.0.1:0".parse()?,
            None,
        ))?;
        cp.serve_ca(std::sync::Arc::clone(&ca));
        spawn_mesh_peer(
            lab,
            &pki.path("ca-peer.pem"),
            &pki.path("ca-peer-key.pem"),
            &pki.path("ca-root.pem"),
        )?;
        lab.map_pod_names(&["mesh.example.com"])?;
        lab.write_registry_only()?;
        lab.write_config(
            "mesh.yaml",
            &format!(
                "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: mesh, namespace: default}}
spec:
  hosts: [mesh.example.com]
  ports:
  - {{number: 80, name: http, protocol: HTTP, targetPort: 11443}}
  resolution: STATIC
  subjectAltNames: [{PEER_ID}]
  endpoints:
  - address: {EXTERNAL_IP}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: mesh, namespace: default}}
spec:
  host: mesh.example.com
  trafficPolicy:
    tls: {{mode: ISTIO_MUTUAL}}
"
            ),
        )?;
        lab.apply_iptables()?;
        let address = format!("http://{}", cp.local_addr());
        let token = pki.path("istio-token");
        lab.start_portcullis(&[
            "--ca-address",
            &address,
            "--xds-token-file",
            &token,
            "--pod-namespace",
            "default",
            "--service-account",
            "client",
            "--secret-ttl",
            "6s",
        ])?;
        anyhow::ensure!(
            !ca.issued().is_empty(),
            "ready before the CA issued a certificate"
        );
        let reply = lab.curl(&["http://mesh.example.com/"])?;
        reply.expect_page("ISTIO_MUTUAL with the CA's certificate", "s_server")?;
        // A 6 s certificate is renewed about every 3 s.
        poll("three renewals", Duration::from_secs(20), || {
            Ok((ca.issued().len() >= 4).then_some(()))
        })?;
        anyhow::ensure!(
            ca.issued()
                .iter()
                .all(|id| id == "spiffe://cluster.local/ns/default/sa/client"),
            "issued {:?}",
            ca.issued()
        );
        // The first certificate has expired by now: the renewed one is in use.
        let reply = lab.curl(&["http://mesh.example.com/"])?;
        reply.expect_page("ISTIO_MUTUAL with a renewed certificate", "s_server")?;
        drop(cp);
        Ok(())
    });
}

/// The address of the second mesh peer, which presents an identity its pod does not have.
const IMPOSTOR_IP: &str = "10.50.0.2";

/// A Kubernetes Service with a pod that has a sidecar (label `security.istio.io/tlsMode:
/// istio`, service account `api`) and one without, in Istio YAML files, with no
/// DestinationRule TLS: istiod's auto mTLS. Portcullis speaks Istio mutual TLS to the first
/// (an openssl peer requiring a client certificate of the mesh root, whose page shows the
/// SPIFFE identity presented) and plaintext to the second (nginx), and refuses a peer whose
/// certificate names another service account than its pod runs as (`UF`) until the
/// Service's `alpha.istio.io/kubernetes-serviceaccounts` names it; under another trust
/// domain the pod's identity is refused until the mesh's `trustDomainAliases` name its own.
#[test]
fn auto_mutual_tls_from_files_to_the_pods_with_sidecars() {
    run("auto-mtls", |lab| {
        let pki = Pki::new()?;
        let mesh = Ca::new("mesh root", &pki.dir, "root-cert.pem")?;
        let client_id = "spiffe://cluster.local/ns/default/sa/client";
        mesh.issue_spiffe(&pki.dir, ("cert-chain.pem", "key.pem"), client_id)?;
        mesh.issue_spiffe(&pki.dir, ("peer.pem", "peer-key.pem"), PEER_ID)?;
        mesh.issue_spiffe(
            &pki.dir,
            ("impostor.pem", "impostor-key.pem"),
            "spiffe://cluster.local/ns/default/sa/billing",
        )?;
        spawn_mesh_peer(
            lab,
            &pki.path("peer.pem"),
            &pki.path("peer-key.pem"),
            &pki.path("root-cert.pem"),
        )?;
        lab.add_address(Role::External, IMPOSTOR_IP)?;
        lab.spawn_peer(
            Role::External,
            "impostor-peer",
            "openssl",
            &[
                "s_server",
                "-quiet",
                "-www",
                "-accept",
                &format!("{IMPOSTOR_IP}:11443"),
                "-cert",
                &pki.path("impostor.pem"),
                "-key",
                &pki.path("impostor-key.pem"),
            ],
            "TERM",
        )?;
        let pod = |name: &str, app: &str, sidecar: bool, port: u16, ip: &str| {
            let label = if sidecar {
                ", security.istio.io/tlsMode: istio"
            } else {
                ""
            };
            let account = if sidecar { "api" } else { "default" };
            format!(
                "---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {{app: {app}{label}}}}}
spec:
  serviceAccountName: {account}
  containers: [{{name: app, ports: [{{name: web, containerPort: {port}}}]}}]
status: {{podIP: {ip}}}
"
            )
        };
        let service = |name: &str| {
            format!(
                "---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  selector: {{app: {name}}}
  ports: [{{name: http, port: 80, targetPort: web}}]
"
            )
        };
        let in_cluster = portcullis_e2e::scenario::IN_CLUSTER_IP;
        let yaml = [
            service("api"),
            pod("api-mesh", "api", true, 11443, EXTERNAL_IP),
            pod("api-plain", "api", false, 80, in_cluster),
            service("impostor"),
            pod("impostor", "impostor", true, 11443, IMPOSTOR_IP),
            // A rule without `tls` keeps auto mTLS; round robin takes turns.
            "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: default}
spec:
  host: api.default.svc.cluster.local
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
"
            .to_owned(),
        ]
        .concat();
        lab.map_pod_names(&[
            "api.default.svc.cluster.local",
            "impostor.default.svc.cluster.local",
        ])?;
        lab.write_registry_only()?;
        lab.write_config("mesh.yaml", &yaml)?;
        lab.apply_iptables()?;
        lab.start_portcullis(&["--istio-certs", &pki.dir.display().to_string()])?;
        let mut pages = Vec::new();
        for _ in 0..4 {
            pages.push(lab.curl(&["http://api.default.svc.cluster.local/"])?);
        }
        let mutual = pages
            .iter()
            .find(|r| r.body.contains("s_server"))
            .ok_or_else(|| anyhow::anyhow!("no answer from the pod with a sidecar: {pages:?}"))?;
        mutual.expect_page("auto mTLS to the pod with a sidecar", "s_server")?;
        // s_server's page prints the client certificate it verified.
        mutual.expect_page(
            "the workload's identity presented",
            &format!("URI:{client_id}"),
        )?;
        let plain = pages
            .iter()
            .find(|r| !r.body.contains("s_server"))
            .ok_or_else(|| anyhow::anyhow!("no answer from the pod without one: {pages:?}"))?;
        plain.expect_page(
            "plaintext to the pod without a sidecar",
            portcullis_e2e::scenario::IN_CLUSTER_PAGE,
        )?;
        let impostor = lab.curl(&["http://impostor.default.svc.cluster.local/"])?;
        anyhow::ensure!(
            impostor.status == 503,
            "a peer with another identity than its pod's must be refused: {impostor}"
        );
        lab.expect_logged(
            "the impostor refused as a TLS failure",
            &["impostor.default.svc.cluster.local", "UF", "503"],
        )?;
        // The Service's annotation declaring the account its workloads run as: accepted.
        let declared = yaml.replacen(
            "metadata: {name: impostor, namespace: default}",
            "metadata:
  name: impostor
  namespace: default
  annotations: {alpha.istio.io/kubernetes-serviceaccounts: billing}",
            1,
        );
        lab.write_config("mesh.yaml", &declared)?;
        poll(
            "the peer accepted once its Service declares its account",
            Duration::from_secs(10),
            || {
                let reply = lab.curl(&["http://impostor.default.svc.cluster.local/"])?;
                Ok((reply.status == 200 && reply.body.contains("s_server")).then_some(()))
            },
        )?;
        // Another trust domain: the pod's identity in cluster.local no longer matches,
        // until cluster.local is one of the mesh's trust domain aliases.
        let trust = |aliases: &str| {
            format!(
                "apiVersion: v1
kind: ConfigMap
metadata: {{name: istio, namespace: istio-system}}
data:
  mesh: |
    trustDomain: new.example
    trustDomainAliases: [{aliases}]
"
            )
        };
        let mesh_pod_answers = |lab: &mut Lab, want: bool| -> anyhow::Result<Option<()>> {
            let mut answered = false;
            for _ in 0..4 {
                let reply = lab.curl(&["http://api.default.svc.cluster.local/"])?;
                answered |= reply.body.contains("s_server");
            }
            Ok((answered == want).then_some(()))
        };
        lab.write_config("trust.yaml", &trust(""))?;
        poll(
            "the pod with a sidecar refused in another trust domain",
            Duration::from_secs(10),
            || mesh_pod_answers(lab, false),
        )?;
        lab.write_config("trust.yaml", &trust("cluster.local"))?;
        poll(
            "the pod with a sidecar accepted through the trust domain alias",
            Duration::from_secs(10),
            || mesh_pod_answers(lab, true),
        )?;
        let log = lab.portcullis_output();
        anyhow::ensure!(
            !log.contains("not applied"),
            "auto mTLS is applied, nothing reported otherwise: {log}"
        );
        Ok(())
    });
}
