//! The operator's side, end to end: the admin port's metric formats read by a real Prometheus
//! parser.

use anyhow::{Context, ensure};
use portcullis_e2e::scenario::{APP_HOST, EXTERNAL_MARK, ROGUE_IP};
use portcullis_e2e::{Role, run};

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
    assert f.name not in types, "family %s appears twice" % f.name
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
        ensure!(
            has(
                "istiocustom.istio_requests_total.reporter.source.destination_service.BlackHoleCluster.response_code.502."
            ) && has(
                "istiocustom.istio_request_duration_milliseconds.reporter.source.destination_service.app.internal.com.response_code.200."
            ) && has("cluster.outbound|80||app.internal.com.upstream_rq_total: ")
                && has("server.registry_version: "),
            "/stats lacks the request counters, histogram or cluster stats:\n{stats}"
        );
        Ok(())
    });
}
