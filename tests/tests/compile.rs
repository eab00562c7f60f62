//! `portcullis compile`: Istio files compiled the way istiod compiles them, printed as an
//! Envoy bootstrap. Real Envoy 1.40 must load it, and for the seed guide, Envoy running it
//! in a pod must answer that pod's clients as portcullis does on the same files.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, ensure};
use portcullis_e2e::envoy::envoy_bin;
use portcullis_e2e::scenario::{
    APP_HOST, EXTERNAL_IP, EXTERNAL_MARK, IN_CLUSTER_IP, IN_CLUSTER_MARK, POD, ROGUE_IP,
    mesh_config,
};
use portcullis_e2e::{Lab, cmd, preflight, run};

/// Requests to the two-endpoint service: both answer unless 1 in 2^23 bad luck.
const SPREAD: usize = 24;

/// Services of every shape the compiler writes: HTTP with endpoints, TCP by VIP and by
/// range, TLS by SNI, DNS and DNS_ROUND_ROBIN, undeclared protocols with and without an
/// address, resolution NONE with a target port, Kubernetes Services (headless, ExternalName)
/// and their pods.
const EVERY_SHAPE: &str = include_str!("../../crates/registry/testdata/every-shape.yaml");

/// `portcullis compile --config dir --format format`: the bootstrap on stdout.
fn compile(dir: &Path, format: &str) -> anyhow::Result<String> {
    let bin = preflight::portcullis_bin()?;
    cmd::check(
        Command::new(bin)
            .arg("compile")
            .arg("--config")
            .arg(dir)
            .args(["--format", format]),
        Duration::from_secs(30),
    )
}

#[test]
fn real_envoy_loads_the_compiled_bootstrap() {
    let envoy = envoy_bin().expect("this test needs real Envoy 1.40");
    let dir = std::env::temp_dir().join(format!("pce2e-compile-{}", std::process::id()));
    let check = || -> anyhow::Result<()> {
        for mode in ["REGISTRY_ONLY", "ALLOW_ANY"] {
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("services.yaml"), EVERY_SHAPE)?;
            std::fs::write(dir.join("mesh.yaml"), mesh_config(mode))?;
            for format in ["yaml", "json"] {
                let bootstrap = dir.join(format!("envoy.{format}"));
                std::fs::write(&bootstrap, compile(&dir, format)?)?;
                let out = cmd::output(
                    Command::new(&envoy)
                        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
                        .arg(&bootstrap),
                    Duration::from_secs(60),
                )?;
                let text = String::from_utf8_lossy(&out.stdout).to_string()
                    + &String::from_utf8_lossy(&out.stderr);
                ensure!(
                    out.status.success() && text.contains("OK"),
                    "{mode}, {format}: envoy --mode validate failed:\n{}",
                    cmd::tail(&text, 20)
                );
            }
            std::fs::remove_dir_all(&dir)?;
        }
        Ok(())
    };
    let result = check();
    let _ = std::fs::remove_dir_all(&dir);
    result.unwrap();
}

/// What a pod's client saw: status, `server` header, and whose page it was.
fn seen(lab: &mut Lab, url: &str) -> anyhow::Result<String> {
    let reply = lab.curl(&["--max-time", "5", url])?;
    let page = if reply.body.contains(EXTERNAL_MARK) {
        "external"
    } else if reply.body.contains(IN_CLUSTER_MARK) {
        "in-cluster"
    } else if reply.body.is_empty() {
        "empty"
    } else {
        "other"
    };
    Ok(format!(
        "{} server={} {page}",
        reply.status,
        reply.header("server").unwrap_or("-")
    ))
}

/// The seed guide's probes: the registered host over both its endpoints, the in-cluster pod
/// by IP, unregistered addresses.
fn probes(lab: &mut Lab) -> anyhow::Result<Vec<String>> {
    let app = format!("http://{APP_HOST}/");
    let mut spread = BTreeSet::new();
    for _ in 0..SPREAD {
        spread.insert(seen(lab, &app)?);
    }
    Ok(vec![
        format!("{app}: {spread:?}"),
        format!(
            "pod by IP: {}",
            seen(lab, &format!("http://{IN_CLUSTER_IP}/"))?
        ),
        format!(
            "unregistered: {}",
            seen(lab, &format!("http://{EXTERNAL_IP}/"))?
        ),
        format!("rogue: {}", seen(lab, &format!("http://{ROGUE_IP}/"))?),
    ])
}

/// Writes the seed guide's final state (REGISTRY_ONLY, the ServiceEntry over the
/// WorkloadEntry and the pod) and installs Istio's rules.
fn seed(lab: &mut Lab) -> anyhow::Result<()> {
    lab.write_registry_only()?;
    lab.write_app_service()?;
    lab.write_config("pod.yaml", POD)?;
    lab.apply_iptables().map(drop)
}

#[test]
fn real_envoy_on_the_compiled_seed_answers_as_portcullis() {
    run("compile-seed", |ours| {
        let envoy = envoy_bin().context("this test needs real Envoy 1.40")?;
        seed(ours)?;
        ours.start_portcullis(&[])?;
        let portcullis = probes(ours)?;
        let expected = [
            format!(
                "http://{APP_HOST}/: {{\"200 server=envoy external\", \"200 server=envoy in-cluster\"}}"
            ),
            "pod by IP: 200 server=envoy in-cluster".to_string(),
            "unregistered: 502 server=envoy empty".to_string(),
            "rogue: 502 server=envoy empty".to_string(),
        ];
        ensure!(
            portcullis == expected,
            "portcullis: {portcullis:#?}, expected {expected:#?}"
        );
        let mut theirs = Lab::new("compile-seed-envoy")?;
        let envoy_side = (|| {
            seed(&mut theirs)?;
            let bootstrap: serde_json::Value =
                serde_json::from_str(&compile(&theirs.config_dir, "json")?)?;
            theirs.start_envoy(&envoy, &bootstrap)?;
            probes(&mut theirs)
        })();
        let envoy_seen = match envoy_side {
            Ok(seen) => seen,
            Err(e) => {
                theirs.dump_logs();
                return Err(e);
            }
        };
        ensure!(
            envoy_seen == portcullis,
            "Envoy on the compiled bootstrap: {envoy_seen:#?}; portcullis: {portcullis:#?}"
        );
        Ok(())
    });
}
