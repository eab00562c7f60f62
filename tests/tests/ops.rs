//! The operator's side, end to end: the admin port's metric formats read by a real Prometheus
//! parser, the printed iptables rules applied twice, and the repository's example config.

use std::path::Path;

use anyhow::{Context, ensure};
use portcullis_e2e::scenario::{APP_HOST, EXTERNAL_MARK, ROGUE_IP};
use portcullis_e2e::{Lab, RELOAD_DEADLINE, Role, poll, run};

/// Parses a scrape with `prometheus_client`'s text parser and fails on anything it does not
/// take as the 0.0.4 format means it: every sample must land in a family typed by its own
/// `# TYPE` line (the parser turns a sample whose name does not match into an untyped family
/// of its own instead of failing), nothing may be OpenMetrics-only, and the families the
/// dashboards use must have their types. Prints `ok <families>`.
const PARSE_STRICTLY: &str = r##"
import sys
from prometheus_client.parser import text_string_to_metric_families

text = open(sys.argv[1]).read()
assert text.endswith("\n"), "the exposition must end with a newline"
for line in text.splitlines():
    assert line.strip(), "empty line"
    if line.startswith("#"):
        kind = line.split(" ")[1]
        assert kind in ("HELP", "TYPE"), "not a 0.0.4 comment: " + line
families = list(text_string_to_metric_families(text))
samples = sum(len(f.samples) for f in families)
lines = [l for l in text.splitlines() if not l.startswith("#")]
assert samples == len(lines), "%d sample lines, %d parsed" % (len(lines), samples)
types = {}
for f in families:
    assert f.type in ("counter", "gauge", "histogram"), "%s is %s" % (f.name, f.type)
    # The parser names a counter family without `_total`: Envoy's `x_total` and its
    # per-code `x` (envoy_cluster_upstream_rq) are then two counter families of one name.
    assert f.name not in types or f.type == types[f.name] == "counter", "family %s appears twice" % f.name
    types[f.name] = f.type
    for s in f.samples:
        if f.type == "histogram":
            assert s.name in (f.name + "_bucket", f.name + "_sum", f.name + "_count"), s.name
        elif f.type == "counter":
            assert s.name == f.name + "_total", s.name
        else:
            assert s.name == f.name, s.name
want = {
    "istio_requests": "counter",
    "istio_request_duration_milliseconds": "histogram",
    "envoy_cluster_upstream_rq": "counter",
    "envoy_listener_downstream_cx_overflow": "counter",
}
for name, kind in want.items():
    assert types.get(name) == kind, "%s: %s, want %s" % (name, types.get(name), kind)
requests = next(f for f in families if f.name == "istio_requests")
codes = {(s.labels["destination_service"], s.labels["response_code"]) for s in requests.samples}
assert ("app.internal.com", "200") in codes, codes
assert ("BlackHoleCluster", "502") in codes, codes
print("ok", len(families))
"##;

/// The Envoy types a `/stats` value may have: a number, or a histogram's summary.
fn envoy_stat_value(value: &str) -> bool {
    if value == "No recorded values" || value.parse::<f64>().is_ok() {
        return true;
    }
    let quantiles: Vec<&str> = value.split(' ').collect();
    quantiles.len() == 10
        && quantiles.iter().all(|q| {
            q.strip_prefix('P')
                .and_then(|q| q.split_once("(nan,"))
                .and_then(|(p, v)| Some((p.parse::<f64>().ok()?, v.strip_suffix(')')?)))
                .is_some_and(|(_, v)| v.parse::<f64>().is_ok())
        })
}

/// `/stats/prometheus` on both ports parses strictly as Prometheus text 0.0.4 with the
/// content type it declares, and `/stats` is Envoy's `name: value` text throughout.
#[test]
fn metrics_in_prometheus_and_envoy_text() {
    run("ops-metrics", |lab| {
        lab.write_registry_only()?;
        lab.write_app_service()?;
        lab.apply_iptables()?;
        lab.start_portcullis(&[])?;
        lab.curl(&[&format!("http://{APP_HOST}/")])?
            .expect_page("registered", EXTERNAL_MARK)?;
        let blocked = lab.curl(&[&format!("http://{ROGUE_IP}/")])?;
        ensure!(blocked.status == 502, "unregistered: {blocked}");

        let imports = lab.output_in(
            Role::Pod,
            "python3",
            &["-c", "import prometheus_client.parser"],
            std::time::Duration::from_secs(20),
        )?;
        ensure!(
            imports.status.success(),
            "python3 cannot import prometheus_client (scripts/test.sh installs it)"
        );
        for url in [
            "http://127.0.0.1:15090/stats/prometheus",
            "http://127.0.0.1:15000/stats/prometheus",
        ] {
            let reply = lab.curl(&[url])?;
            ensure!(reply.status == 200, "{url}: {reply}");
            ensure!(
                reply.header("content-type") == Some("text/plain; version=0.0.4; charset=utf-8"),
                "{url}: content type {:?}",
                reply.header("content-type")
            );
            ensure!(
                reply
                    .body
                    .contains("\n# TYPE istio_requests_total counter\n"),
                "{url}: no `# TYPE istio_requests_total counter`:\n{}",
                reply.body
            );
            let scrape = lab.dir.join("scrape.txt");
            std::fs::write(&scrape, &reply.body)?;
            let path = scrape.display().to_string();
            let out = lab.output_in(
                Role::Pod,
                "python3",
                &["-c", PARSE_STRICTLY, &path],
                std::time::Duration::from_secs(20),
            )?;
            ensure!(
                out.status.success(),
                "{url} is not strict Prometheus text: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                reply.body
            );
        }

        let (status, stats) = lab.admin_get("/stats")?;
        ensure!(status == 200, "/stats answered {status}");
        for line in stats.lines() {
            let (name, value) = line
                .split_once(": ")
                .with_context(|| format!("/stats line without `: `: {line:?}"))?;
            ensure!(
                !name.is_empty() && !name.contains(char::is_whitespace) && envoy_stat_value(value),
                "/stats line is not Envoy's `name: value`: {line:?}"
            );
        }
        let has = |prefix: &str| stats.lines().any(|l| l.starts_with(prefix));
        // Istio's stat names: the metric, then each tag's name and value in the tags' order.
        let istio = |metric: &str, tags: &[&str]| {
            stats.lines().any(|l| {
                l.starts_with(&format!("istiocustom.{metric}.reporter.source."))
                    && tags.iter().all(|t| l.contains(t))
            })
        };
        ensure!(
            istio(
                "istio_requests_total",
                &[
                    ".destination_service.BlackHoleCluster.",
                    ".response_code.502."
                ]
            ) && istio(
                "istio_request_duration_milliseconds",
                &[
                    ".destination_service.app.internal.com.",
                    ".response_code.200."
                ]
            ) && has("cluster.outbound|80||app.internal.com.upstream_rq_total: ")
                && has("cluster.outbound|80||app.internal.com.upstream_rq_200: ")
                && has("cluster.outbound|80||app.internal.com.upstream_rq_2xx: ")
                && has("server.registry_version: "),
            "/stats lacks the request counters, histogram or cluster stats:\n{stats}"
        );
        Ok(())
    });
}

/// The printed rules, split per family and fed to `<family>-restore --noflush` the way a user
/// would, twice: one OUTPUT jump and one copy of the ISTIO chains, never two.
#[test]
fn printed_iptables_rules_apply_twice() {
    run("ops-iptables", |lab| {
        let bin = lab.dir.join("portcullis").display().to_string();
        let mut before = None;
        let mut printed = String::new();
        for round in 1..=2 {
            printed = lab.run(Role::Pod, &bin, &["iptables"])?;
            restore_printed(lab, &printed, round)?;
            let rules = count_rules(lab)?;
            ensure!(
                rules.iter().all(|(_, jumps, _)| *jumps == 1),
                "after applying the printed rules {round} time(s): {rules:?}\n{printed}"
            );
            if let Some(before) = &before {
                ensure!(
                    *before == rules,
                    "re-applying changed the rules: {before:?} -> {rules:?}"
                );
            }
            before = Some(rules);
        }
        // A set printed with the jump in place stays safe to apply again as it is.
        restore_printed(lab, &printed, 3)?;
        ensure!(
            before == Some(count_rules(lab)?),
            "the saved set applied again changed the rules: {printed}"
        );
        // A table that already holds the jump twice (as an older printed set left it) is
        // repaired by the next set, not kept at two.
        for tool in ["iptables", "ip6tables"] {
            if before.iter().flatten().any(|(t, _, _)| *t == tool) {
                let jump = [
                    "-w",
                    "-t",
                    "nat",
                    "-A",
                    "OUTPUT",
                    "-p",
                    "tcp",
                    "-j",
                    "ISTIO_OUTPUT",
                ];
                lab.run(Role::Pod, tool, &jump)?;
            }
        }
        let printed = lab.run(Role::Pod, &bin, &["iptables"])?;
        restore_printed(lab, &printed, 4)?;
        ensure!(
            before == Some(count_rules(lab)?),
            "a doubled jump must come back to one: {printed}"
        );
        Ok(())
    });
}

/// Feeds each `# <tool> --noflush` section of `printed` to its tool in the pod.
fn restore_printed(lab: &mut Lab, printed: &str, round: u32) -> anyhow::Result<()> {
    let mut sections: Vec<(String, String)> = Vec::new();
    for line in printed.lines() {
        if let Some(tool) = line
            .strip_prefix("# ")
            .and_then(|l| l.strip_suffix(" --noflush"))
        {
            sections.push((tool.to_owned(), String::new()));
        } else if let Some((_, body)) = sections.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    ensure!(!sections.is_empty(), "no restore sections in:\n{printed}");
    for (tool, body) in sections {
        let file = lab.dir.join(format!("{tool}-{round}.rules"));
        std::fs::write(&file, body)?;
        lab.run(
            Role::Pod,
            "sh",
            &["-c", &format!("{tool} -w --noflush < {}", file.display())],
        )?;
    }
    Ok(())
}

/// Per family that has the chains: (tool, OUTPUT jumps, ISTIO_* rules).
fn count_rules(lab: &mut Lab) -> anyhow::Result<Vec<(&'static str, usize, usize)>> {
    let mut counts = Vec::new();
    for tool in ["iptables", "ip6tables"] {
        let Ok(rules) = lab.run(Role::Pod, tool, &["-w", "-t", "nat", "-S"]) else {
            continue;
        };
        let jumps = rules
            .lines()
            .filter(|l| *l == "-A OUTPUT -p tcp -j ISTIO_OUTPUT")
            .count();
        let istio = rules.lines().filter(|l| l.starts_with("-A ISTIO_")).count();
        if jumps > 0 || istio > 0 {
            counts.push((tool, jumps, istio));
        }
    }
    ensure!(!counts.is_empty(), "no ISTIO rules installed");
    Ok(counts)
}

/// The repository's `config/example`, served the way `scripts/run-example.sh` serves it:
/// app.internal.com reaches both endpoints through the explicit proxy, while a server on
/// 127.0.0.1 that nothing registers stays out of reach.
#[test]
fn example_config_keeps_loopback_closed() {
    run("ops-example", |lab| {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/example");
        for entry in std::fs::read_dir(&example)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .context("file name")?
                .to_owned();
            lab.write_config(&name, &std::fs::read_to_string(&path)?)?;
        }
        let pages = [
            (
                "external",
                "127.0.0.2",
                "8080",
                "Welcome to the external host",
            ),
            ("pod", "127.0.0.3", "8081", "This is an Nginx Pod"),
            (
                "local",
                "127.0.0.1",
                "9999",
                "a local server nobody registered",
            ),
        ];
        for (name, ip, port, page) in pages {
            let root = lab.dir.join(format!("www-{name}"));
            std::fs::create_dir_all(&root)?;
            std::fs::write(root.join("index.html"), format!("{page}\n"))?;
            let root = root.display().to_string();
            lab.spawn_peer(
                Role::Pod,
                name,
                "python3",
                &[
                    "-m",
                    "http.server",
                    port,
                    "--bind",
                    ip,
                    "--directory",
                    &root,
                ],
                "TERM",
            )?;
            let url = format!("http://{ip}:{port}/");
            poll(&format!("{name} page on {url}"), RELOAD_DEADLINE, || {
                let reply = lab.curl(&[&url])?;
                Ok(reply.body.contains(page).then_some(()))
            })?;
        }
        lab.start_portcullis(&["--http-proxy", "127.0.0.1:15080"])?;
        let proxy = ["-x", "http://127.0.0.1:15080"];

        let mut seen = [false, false];
        for _ in 0..20 {
            let reply = lab.curl(&[proxy[0], proxy[1], &format!("http://{APP_HOST}/")])?;
            ensure!(reply.status == 200, "app.internal.com: {reply}");
            for (i, (_, _, _, page)) in pages[..2].iter().enumerate() {
                seen[i] |= reply.body.contains(page);
            }
            if seen == [true, true] {
                break;
            }
        }
        ensure!(
            seen == [true, true],
            "app.internal.com must reach both endpoints: {seen:?}"
        );

        let reply = lab.curl(&[proxy[0], proxy[1], "http://127.0.0.1:9999/"])?;
        ensure!(
            reply.status == 502 && reply.header("server") == Some("envoy"),
            "127.0.0.1:9999 through the proxy must be refused: {reply}"
        );
        let reply = lab.curl(&["-p", proxy[0], proxy[1], "http://127.0.0.1:9999/"])?;
        ensure!(
            reply.connect_status == 502 && !reply.body.contains(pages[2].3),
            "CONNECT 127.0.0.1:9999 must be refused: {reply}"
        );
        Ok(())
    });
}
