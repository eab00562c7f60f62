//! Adopting REGISTRY_ONLY without an outage: audit mode forwards what enforce mode would
//! refuse and records why, `portcullis learn` turns the records into ServiceEntries, and
//! with those applied enforce mode refuses nothing the app did, and still everything else.

use std::time::Duration;

use anyhow::{Context, ensure};
use portcullis_e2e::scenario::{self, EXTERNAL_IP, EXTERNAL_MARK};
use portcullis_e2e::{Lab, RELOAD_DEADLINE, Role, poll, run};
use serde_json::Value;

/// The names the app calls, all served by the external host (dnsmasq answers them).
const API: &str = "api.shop.test";
const PAY: &str = "pay.shop.test";
const UNSEEN: &str = "unseen.shop.test";
/// A page served over TLS by the external host.
const TLS_PAGE: &str = "TLS page of the external host\n";

/// `/denials` as JSON.
fn denials(lab: &mut Lab) -> anyhow::Result<Value> {
    let (status, body) = lab.admin_get("/denials")?;
    ensure!(status == 200, "/denials answered {status}: {body}");
    serde_json::from_str(&body).with_context(|| format!("/denials is not JSON: {body}"))
}

/// The record of `/denials` for `host` (or bare `address`) on `port`.
fn record<'a>(json: &'a Value, name: &str, port: u16) -> Option<&'a Value> {
    json["denials"]
        .as_array()?
        .iter()
        .find(|r| (r["host"] == name || r["address"] == name) && r["port"] == u64::from(port))
}

/// `POST` to the admin port from inside the pod.
fn admin_post(lab: &mut Lab, path: &str) -> anyhow::Result<String> {
    let reply = lab.curl(&["-X", "POST", &format!("http://127.0.0.1:15000{path}")])?;
    ensure!(reply.status == 200, "POST {path}: {reply}");
    Ok(reply.body)
}

/// What the app does: an HTTP API by name, a TLS API by name, a database by address.
/// Returns whether each got through.
fn app_traffic(lab: &mut Lab, cacert: &str) -> anyhow::Result<[bool; 3]> {
    let http = lab.curl(&[&format!("http://{API}/")])?;
    let tls = lab.curl(&["--cacert", cacert, &format!("https://{PAY}/")])?;
    let db = lab.connect(Role::Pod, &format!("{EXTERNAL_IP}:5432"), "ping\n", 5)?;
    Ok([
        http.status == 200 && http.body.contains(EXTERNAL_MARK),
        tls.status == 200 && tls.body == TLS_PAGE,
        db.received > 0,
    ])
}

#[test]
fn audit_then_learn_then_enforce_refuses_nothing_the_app_did() {
    run("adoption", |lab| {
        let hosts = format!("{EXTERNAL_IP} {API}\n{EXTERNAL_IP} {PAY}\n{EXTERNAL_IP} {UNSEEN}\n");
        lab.start_dnsmasq(&hosts, API, EXTERNAL_IP)?;
        let cert = lab.make_certificate(&[PAY])?;
        let servers = cert.nginx_tls_server(&format!("{EXTERNAL_IP}:443"));
        lab.start_nginx_servers(Role::External, "tls", &servers, TLS_PAGE, 8099)?;
        let db = lab.start_sink(Role::External, &format!("{EXTERNAL_IP}:5432"))?;
        let cacert = cert.cert.display().to_string();
        lab.write_registry_only()?;
        lab.apply_iptables()?;
        lab.start_portcullis(&["--mode", "audit"])?;

        // Audit: everything the app does works, and each would-be refusal is recorded.
        ensure!(
            app_traffic(lab, &cacert)? == [true; 3],
            "audit mode must forward what enforce would refuse"
        );
        ensure!(lab.sink_accepts(&db) == 1, "the database was reached once");
        let json = denials(lab)?;
        ensure!(json["mode"] == "audit", "{json:#}");
        let api = record(&json, API, 80).context("no record for the HTTP API")?;
        ensure!(
            api["reason"] == format!("no ServiceEntry for host \"{API}\" on port 80")
                && api["protocol"] == "HTTP"
                && api["would_deny"] == 1
                && api["denied"] == 0,
            "{api:#}"
        );
        let pay = record(&json, PAY, 443).context("no record for the TLS API")?;
        ensure!(pay["protocol"] == "TLS", "{pay:#}");
        let database = record(&json, EXTERNAL_IP, 5432).context("no record for the database")?;
        ensure!(
            database["reason"] == format!("port 5432 has no TCP service at {EXTERNAL_IP}")
                && database["protocol"] == "TCP"
                && database["destinations"][0] == format!("{EXTERNAL_IP}:5432"),
            "{database:#}"
        );
        lab.expect_logged(
            "a would-deny log line",
            &["would deny (audit mode, forwarded)", API, "no ServiceEntry"],
        )?;
        let (_, metrics) = lab.admin_get("/stats/prometheus")?;
        ensure!(
            metrics
                .lines()
                .any(|l| l.starts_with("portcullis_denials_total{")
                    && l.contains("action=\"would_deny\"")
                    && l.contains(&format!("host=\"{API}\""))
                    && l.contains("reason=\"no_service_entry\"")),
            "no would_deny sample for {API}:\n{metrics}"
        );

        // Learn: the CLI prints what /learned serves.
        let bin = lab.dir.join("portcullis").display().to_string();
        let learned = lab.run(Role::Pod, &bin, &["learn", "--admin", "127.0.0.1:15000"])?;
        let (_, served) = lab.admin_get("/learned")?;
        let body = |yaml: &str| -> Vec<String> {
            yaml.lines()
                .filter(|l| !l.starts_with("# ServiceEntries learned"))
                .map(str::to_owned)
                .collect()
        };
        ensure!(
            body(&learned) == body(&served),
            "learn:\n{learned}\n/learned:\n{served}"
        );
        ensure!(
            learned.matches("kind: ServiceEntry").count() == 3,
            "one entry per destination:\n{learned}"
        );

        // Apply and enforce.
        lab.write_config("learned.yaml", &learned)?;
        admin_post(lab, "/mode?value=enforce")?;
        poll("the learned entries are loaded", RELOAD_DEADLINE, || {
            let (_, clusters) = lab.admin_get("/clusters")?;
            Ok(clusters
                .contains(&format!("outbound|443||{PAY}"))
                .then_some(()))
        })?;
        admin_post(lab, "/denials/reset")?;
        ensure!(
            app_traffic(lab, &cacert)? == [true; 3],
            "enforce mode with the learned entries must allow what the app did"
        );
        let json = denials(lab)?;
        ensure!(json["mode"] == "enforce", "{json:#}");
        ensure!(
            json["denials"].as_array().is_some_and(Vec::is_empty),
            "no denials after learning:\n{json:#}"
        );

        // What the app never did is still refused, and recorded as denied.
        let unseen = lab.curl(&[&format!("http://{UNSEEN}/")])?;
        unseen.expect_blocked("a host never seen")?;
        let other_port = lab.connect(Role::Pod, &format!("{EXTERNAL_IP}:5433"), "ping\n", 5)?;
        ensure!(
            other_port.received == 0,
            "a port never seen: {}",
            other_port.line
        );
        let json = denials(lab)?;
        let refused = record(&json, UNSEEN, 80).context("the unseen host is recorded")?;
        ensure!(
            refused["denied"] == 1 && refused["would_deny"] == 0,
            "{refused:#}"
        );
        ensure!(record(&json, EXTERNAL_IP, 5433).is_some(), "{json:#}");
        Ok(())
    });
}

/// The mode switches at run time from the pod annotation file (the downward API) and from
/// the mesh config, and the admin's choice wins over both.
#[test]
fn the_mode_follows_the_annotation_the_mesh_config_and_the_admin() {
    run("mode-switch", |lab| {
        let annotations = lab.dir.join("annotations");
        std::fs::write(&annotations, "other=\"x\"\n")?;
        let annotations_arg = annotations.display().to_string();
        lab.write_registry_only()?;
        lab.apply_iptables()?;
        lab.start_portcullis(&["--pod-annotations", &annotations_arg])?;
        let url = format!("http://{EXTERNAL_IP}/");
        let mode = |lab: &mut Lab| -> anyhow::Result<Value> {
            let (_, body) = lab.admin_get("/mode")?;
            Ok(serde_json::from_str(&body)?)
        };
        lab.curl(&[&url])?.expect_blocked("enforce by default")?;
        ensure!(mode(lab)?["source"] == "flag");

        // The mesh config asks for audit.
        lab.write_config(
            "mesh.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\n\
             data:\n  mesh: |-\n    outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n    \
             defaultConfig:\n      proxyMetadata: {PORTCULLIS_MODE: audit}\n",
        )?;
        poll("audit from the mesh config", RELOAD_DEADLINE, || {
            Ok((mode(lab)?["source"] == "mesh_config").then_some(()))
        })?;
        lab.curl(&[&url])?
            .expect_page("forwarded in audit mode", EXTERNAL_MARK)?;

        // The annotation says enforce, and wins over the mesh config.
        std::fs::write(&annotations, "portcullis.io/mode=\"enforce\"\n")?;
        poll("enforce from the annotation", RELOAD_DEADLINE, || {
            Ok((mode(lab)?["source"] == "annotation").then_some(()))
        })?;
        lab.curl(&[&url])?
            .expect_blocked("enforced by the annotation")?;

        // The admin wins over both, until reset.
        admin_post(lab, "/mode?value=audit")?;
        lab.curl(&[&url])?
            .expect_page("forwarded after POST /mode?value=audit", EXTERNAL_MARK)?;
        admin_post(lab, "/mode?value=reset")?;
        lab.curl(&[&url])?.expect_blocked("the annotation again")?;
        let json = denials(lab)?;
        let seen = record(&json, EXTERNAL_IP, 80).context("the refusals are recorded")?;
        ensure!(
            seen["denied"] == 3 && seen["would_deny"] == 2,
            "three refused, two forwarded: {seen:#}"
        );
        Ok(())
    });
}

/// With config from a control plane, istiod's `block_all` route is the refusal: enforced
/// as its 502, recorded with its reason, and forwarded once audit mode is switched on.
#[test]
fn audit_mode_applies_to_istiods_block_all_route_over_xds() {
    use portcullis_control_plane::ControlPlane;
    use portcullis_control_plane::sidecar::Sidecar;
    run("audit-xds", |lab| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let external: std::net::SocketAddr = format!("{EXTERNAL_IP}:80").parse()?;
        let sidecar = Sidecar::new(vec![external], vec![external]);
        let pod = lab.ns(Role::Pod);
        let cp = rt.block_on(ControlPlane::start_in_netns(
            &pod,
            "127.0.0.1:0".parse()?,
            None,
        ))?;
        for push in sidecar.initial() {
            push.send(&cp)?;
        }
        lab.apply_iptables()?;
        lab.start_portcullis_xds(&format!("http://{}", cp.local_addr()), &[])?;
        let unregistered = [
            "-H",
            "Host: unregistered.test",
            &format!("http://{EXTERNAL_IP}/"),
        ];
        lab.curl(&unregistered)?
            .expect_blocked("block_all in enforce mode")?;
        let json = denials(lab)?;
        let seen = record(&json, "unregistered.test", 80).context("block_all is recorded")?;
        ensure!(
            seen["reason"] == "no ServiceEntry for host \"unregistered.test\" on port 80"
                && seen["denied"] == 1,
            "{seen:#}"
        );
        admin_post(lab, "/mode?value=audit")?;
        lab.curl(&unregistered)?
            .expect_page("forwarded in audit mode", EXTERNAL_MARK)?;
        let json = denials(lab)?;
        let seen = record(&json, "unregistered.test", 80).context("still recorded")?;
        ensure!(seen["would_deny"] == 1, "{seen:#}");
        Ok(())
    });
}

/// The admin page in a real browser (headless Chromium over the DevTools protocol): it
/// shows the mode, the registry and the denials, the table fills from live traffic without
/// a reload, and its download button saves what `/learned` serves.
#[test]
fn the_admin_page_shows_live_denials_and_downloads_the_learned_entries() {
    run("admin-page", |lab| {
        ensure!(
            portcullis_e2e::preflight::which("chromium").is_some(),
            "chromium is missing (apt-get install chromium)"
        );
        let hosts = format!("{EXTERNAL_IP} {API}\n{EXTERNAL_IP} {PAY}\n");
        lab.start_dnsmasq(&hosts, API, EXTERNAL_IP)?;
        lab.write_registry_only()?;
        lab.write_app_service()?;
        lab.apply_iptables()?;
        lab.start_portcullis(&["--mode", "audit"])?;
        lab.curl(&[&format!("http://{API}/")])?
            .expect_page("forwarded in audit mode", EXTERNAL_MARK)?;

        let downloads = lab.dir.join("downloads");
        std::fs::create_dir_all(&downloads)?;
        let downloads_arg = downloads.display().to_string();
        lab.spawn_python_peer(
            Role::Pod,
            "browser",
            &[
                "admin-page",
                "http://127.0.0.1:15000/",
                &downloads_arg,
                API,
                PAY,
            ],
        )?;
        let said = |lab: &mut Lab, prefix: &str| -> anyhow::Result<Option<String>> {
            let out = lab.peer_stdout("browser")?;
            Ok(out
                .lines()
                .find_map(|l| l.strip_prefix(prefix))
                .map(str::to_owned))
        };
        let loaded = poll(
            "the page shows the first denial",
            Duration::from_secs(60),
            || said(lab, "loaded "),
        )?;
        let page: Value = serde_json::from_str(&loaded)?;
        ensure!(page["mode"] == "audit", "{page:#}");
        ensure!(
            page["services"]
                .as_array()
                .is_some_and(|s| s.iter().any(|h| h == scenario::APP_HOST)),
            "the registry lists {}: {page:#}",
            scenario::APP_HOST
        );
        let row = page["denials"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r[0] == API))
            .context("a row for the first host")?;
        ensure!(
            row[1] == "80"
                && row[2] == "HTTP"
                && row[8] == format!("no ServiceEntry for host \"{API}\" on port 80"),
            "{row:#}"
        );

        // New traffic shows up in the open page.
        lab.curl(&["-k", &format!("https://{PAY}/")])?;
        poll(
            "the page shows live traffic",
            Duration::from_secs(30),
            || said(lab, "live"),
        )?;
        let saved = poll("the download", Duration::from_secs(30), || {
            said(lab, "downloaded ")
        })?;
        let downloaded = std::fs::read_to_string(saved.trim())?;
        let (_, learned) = lab.admin_get("/learned")?;
        ensure!(
            downloaded == learned,
            "the download differs from /learned:\n{downloaded}\n---\n{learned}"
        );
        ensure!(downloaded.contains(&format!("  - {API}\n")), "{downloaded}");
        Ok(())
    });
}
