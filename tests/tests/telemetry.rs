//! Metrics and logs people already graph (issue 12 item 5): Istio's standard metrics with
//! their labels and Envoy's cluster counters in `/stats/prometheus`, read back with the
//! reference Prometheus parser (python `prometheus_client`), and the access log in Istio's
//! text and JSON formats, after real curl and TCP traffic that is registered, blocked,
//! passed through and opaque.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use portcullis_e2e::scenario::{
    self, APP_HOST, EXTERNAL_IP, EXTERNAL_MARK, IN_CLUSTER_IP, ROGUE_IP, SELECT_EXTERNAL,
    service_entry,
};
use portcullis_e2e::{Lab, RELOAD_DEADLINE, Role, poll, run};
use serde_json::Value;

/// The parser script: families as JSON on stdout.
const PARSER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/py/prometheus_families.py");

/// The opaque TCP service: port 9000 of an address-less ServiceEntry, served by the
/// in-cluster nginx on its port 80.
const TCP_HOST: &str = "db.internal.com";
const TCP_PORT: u16 = 9000;

/// Envoy's (and so Istio's) default histogram bounds.
const BUCKETS: [&str; 20] = [
    "0.5",
    "1.0",
    "5.0",
    "10.0",
    "25.0",
    "50.0",
    "100.0",
    "250.0",
    "500.0",
    "1000.0",
    "2500.0",
    "5000.0",
    "10000.0",
    "30000.0",
    "60000.0",
    "300000.0",
    "600000.0",
    "1800000.0",
    "3600000.0",
    "+Inf",
];

fn tcp_entry() -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: db
  namespace: default
spec:
  hosts: [{TCP_HOST}]
  location: MESH_EXTERNAL
  ports:
  - {{number: {TCP_PORT}, name: tcp, protocol: TCP, targetPort: 80}}
  resolution: STATIC
  endpoints:
  - address: {IN_CLUSTER_IP}
"
    )
}

/// One parsed sample.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// One parsed family: its type and samples.
#[derive(Debug)]
struct Family {
    kind: String,
    samples: Vec<Sample>,
}

/// `/stats/prometheus` as the reference parser reads it, by family name as it names them,
/// and the text itself. The parser reads it as OpenMetrics does: a counter family is named
/// without `_total` and its samples with it (so Envoy's `envoy_cluster_upstream_rq_total`
/// and its per-code `envoy_cluster_upstream_rq` land in one family, told apart by labels).
fn scrape(lab: &mut Lab) -> anyhow::Result<(BTreeMap<String, Family>, String)> {
    let (status, text) = lab.admin_get("/stats/prometheus")?;
    ensure!(status == 200, "/stats/prometheus answered {status}");
    let mut child = Command::new("python3")
        .arg(PARSER)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("python3")?;
    child
        .stdin
        .take()
        .context("the parser's stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "the Prometheus parser refused the exposition: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    let mut families = BTreeMap::new();
    for f in parsed {
        let samples: Vec<Sample> = f["samples"]
            .as_array()
            .context("samples")?
            .iter()
            .map(|s| Sample {
                name: s["name"].as_str().unwrap_or_default().to_owned(),
                labels: s["labels"]
                    .as_object()
                    .map(|o| {
                        o.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                            .collect()
                    })
                    .unwrap_or_default(),
                value: s["value"].as_f64().unwrap_or(f64::NAN),
            })
            .collect();
        let kind = f["type"].as_str().unwrap_or_default().to_owned();
        let entry = families
            .entry(f["name"].as_str().unwrap_or_default().to_owned())
            .or_insert(Family {
                kind: kind.clone(),
                samples: Vec::new(),
            });
        ensure!(entry.kind == kind, "two types for one family name: {f}");
        entry.samples.extend(samples);
    }
    Ok((families, text))
}

/// The family `name` of type `kind`.
fn family<'a>(
    families: &'a BTreeMap<String, Family>,
    name: &str,
    kind: &str,
) -> anyhow::Result<&'a Family> {
    let f = families.get(name).with_context(|| {
        let known: Vec<&String> = families.keys().collect();
        format!("no family {name} among {known:?}")
    })?;
    ensure!(f.kind == kind, "{name} is a {}, not a {kind}", f.kind);
    Ok(f)
}

/// The samples named `sample` whose labels include every one of `want`.
fn matching<'a>(f: &'a Family, sample: &str, want: &[(&str, &str)]) -> Vec<&'a Sample> {
    f.samples
        .iter()
        .filter(|s| {
            s.name == sample
                && want
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

/// The one sample named `sample` with labels `want`, and its value.
fn value(f: &Family, sample: &str, want: &[(&str, &str)]) -> anyhow::Result<f64> {
    match matching(f, sample, want).as_slice() {
        [one] => Ok(one.value),
        [] => bail!("no {sample} with {want:?}; have {:#?}", f.samples),
        many => bail!("{} samples {sample} with {want:?}: {many:#?}", many.len()),
    }
}

/// The labels Istio's stats filter gives every client-side report of this lab's pod.
const SOURCE: [(&str, &str); 8] = [
    ("reporter", "source"),
    ("source_workload", "unknown"),
    ("source_workload_namespace", "default"),
    ("source_app", "client"),
    ("source_version", "v1"),
    ("source_canonical_service", "client"),
    ("source_canonical_revision", "v1"),
    ("source_cluster", "unknown"),
];

/// Sends registered, blocked, passthrough and opaque TCP traffic.
fn traffic(lab: &mut Lab) -> anyhow::Result<()> {
    lab.curl(&["-A", "telemetry-test", &format!("http://{APP_HOST}/")])?
        .expect_page("registered", EXTERNAL_MARK)?;
    lab.curl(&[&format!("http://{ROGUE_IP}/"), "-H", "Host: nobody.example"])?
        .expect_blocked("unregistered, REGISTRY_ONLY")?;
    let seen = lab.connect(
        Role::Pod,
        &format!("{ROGUE_IP}:{TCP_PORT}"),
        "hello\r\n\r\n",
        5,
    )?;
    ensure!(seen.received > 0, "the TCP service answers: {seen:?}");
    lab.write_config("mesh.yaml", &scenario::mesh_config("ALLOW_ANY"))?;
    poll("ALLOW_ANY applied", RELOAD_DEADLINE, || {
        let reply = lab.curl(&[
            &format!("http://{EXTERNAL_IP}/"),
            "-H",
            "Host: elsewhere.example",
        ])?;
        Ok((reply.status == 200).then_some(()))
    })
}

fn start(lab: &mut Lab, extra: &[&str]) -> anyhow::Result<()> {
    let mut flags = vec!["--workload-labels", "app=client,version=v1"];
    flags.extend_from_slice(extra);
    lab.start_with_services(
        &[APP_HOST, TCP_HOST],
        &[
            (
                "app.yaml",
                service_entry("app", &[APP_HOST], 80, "HTTP", "STATIC", SELECT_EXTERNAL),
            ),
            ("db.yaml", tcp_entry()),
        ],
        &flags,
    )
}

#[test]
fn istio_and_envoy_metrics_parse_with_their_names_types_and_labels() {
    run("telemetry-metrics", |lab| {
        start(lab, &[])?;
        traffic(lab)?;
        let app_cluster = format!("outbound|80||{APP_HOST}");
        let tcp_cluster = format!("outbound|{TCP_PORT}||{TCP_HOST}");
        // The TCP connection's metrics are written when it closes.
        let (families, text) = poll("the TCP connection counted", Duration::from_secs(5), || {
            let (families, text) = scrape(lab)?;
            let closed = family(&families, "istio_tcp_connections_closed", "counter")?;
            let done = !matching(
                closed,
                "istio_tcp_connections_closed_total",
                &[("destination_service", TCP_HOST)],
            )
            .is_empty();
            Ok(done.then_some((families, text)))
        })?;

        // The python parser names a counter family without `_total`; its samples keep it.
        let requests = family(&families, "istio_requests", "counter")?;
        let mut ok: Vec<(&str, &str)> = SOURCE.to_vec();
        ok.extend([
            ("source_principal", "unknown"),
            ("destination_service", APP_HOST),
            ("destination_service_name", APP_HOST),
            ("destination_service_namespace", "default"),
            // The endpoint's WorkloadEntry, as istiod's endpoint metadata names it; app and
            // version are not in that metadata.
            ("destination_workload", "external-host"),
            ("destination_workload_namespace", "default"),
            ("destination_principal", "unknown"),
            ("destination_app", "unknown"),
            ("destination_version", "unknown"),
            ("destination_canonical_service", "external"),
            ("destination_canonical_revision", "latest"),
            ("destination_cluster", "Kubernetes"),
            ("request_protocol", "http"),
            ("response_code", "200"),
            ("grpc_response_status", ""),
            ("response_flags", "-"),
            ("connection_security_policy", "unknown"),
        ]);
        ensure!(value(requests, "istio_requests_total", &ok)? >= 1.0);
        let blocked = [
            ("destination_service", "BlackHoleCluster"),
            ("destination_service_name", "BlackHoleCluster"),
            ("response_code", "502"),
        ];
        ensure!(value(requests, "istio_requests_total", &blocked)? >= 1.0);
        let passed = [
            ("destination_service", "PassthroughCluster"),
            ("response_code", "200"),
        ];
        ensure!(value(requests, "istio_requests_total", &passed)? >= 1.0);
        let labelled = matching(requests, "istio_requests_total", &[]);
        for s in &labelled {
            ensure!(
                s.labels.len() == 25,
                "Istio's 25 labels on every request series: {s:?}"
            );
        }

        for name in [
            "istio_request_duration_milliseconds",
            "istio_request_bytes",
            "istio_response_bytes",
        ] {
            let f = family(&families, name, "histogram")?;
            let bounds: Vec<&str> = matching(f, &format!("{name}_bucket"), &ok)
                .iter()
                .map(|s| s.labels["le"].as_str())
                .collect();
            ensure!(bounds == BUCKETS, "{name}'s buckets: {bounds:?}");
            ensure!(value(f, &format!("{name}_count"), &ok)? >= 1.0, "{name}");
        }
        // Istio's sizes count the heads as Envoy's header maps size them, with the bodies.
        let page = value(
            family(&families, "istio_response_bytes", "histogram")?,
            "istio_response_bytes_sum",
            &ok,
        )?;
        ensure!(
            page >= (EXTERNAL_MARK.len() + ":status200".len()) as f64,
            "the page and its head in istio_response_bytes: {page}"
        );
        let request = value(
            family(&families, "istio_request_bytes", "histogram")?,
            "istio_request_bytes_sum",
            &ok,
        )?;
        let head = ":methodGET:path/:authority:schemehttp".len() + APP_HOST.len();
        ensure!(
            request >= head as f64,
            "a GET's head in istio_request_bytes: {request}"
        );

        let tcp = [
            ("destination_service", TCP_HOST),
            ("destination_service_namespace", "default"),
            ("request_protocol", "tcp"),
            ("response_flags", "-"),
            ("connection_security_policy", "unknown"),
            ("reporter", "source"),
            ("source_app", "client"),
        ];
        for (fam, sample) in [
            (
                "istio_tcp_connections_opened",
                "istio_tcp_connections_opened_total",
            ),
            (
                "istio_tcp_connections_closed",
                "istio_tcp_connections_closed_total",
            ),
            ("istio_tcp_sent_bytes", "istio_tcp_sent_bytes_total"),
            ("istio_tcp_received_bytes", "istio_tcp_received_bytes_total"),
        ] {
            let n = value(family(&families, fam, "counter")?, sample, &tcp)?;
            ensure!(n >= 1.0, "{sample} for the TCP service: {n}");
            let series = matching(family(&families, fam, "counter")?, sample, &tcp);
            ensure!(
                series
                    .iter()
                    .all(|s| !s.labels.contains_key("response_code")),
                "TCP metrics carry no response code: {series:?}"
            );
        }

        // Envoy's cluster counters, under Envoy's exact names, for every cluster, at zero
        // before they count.
        let counters = [
            "envoy_cluster_upstream_rq_total",
            "envoy_cluster_upstream_cx_total",
            "envoy_cluster_upstream_cx_connect_fail",
            "envoy_cluster_upstream_cx_connect_timeout",
            "envoy_cluster_upstream_cx_overflow",
            "envoy_cluster_upstream_rq_pending_overflow",
            "envoy_cluster_upstream_rq_retry_overflow",
            "envoy_cluster_upstream_rq",
            "envoy_cluster_upstream_rq_xx",
        ];
        for name in counters {
            ensure!(
                text.contains(&format!("\n# TYPE {name} counter\n")),
                "{name} typed a counter under Envoy's name"
            );
        }
        for cluster in [
            app_cluster.as_str(),
            tcp_cluster.as_str(),
            "BlackHoleCluster",
            "PassthroughCluster",
        ] {
            let at = [("cluster_name", cluster)];
            for name in &counters[..7] {
                let f = family(&families, name.trim_end_matches("_total"), "counter")?;
                let series: Vec<&Sample> = matching(
                    f,
                    &format!("{}_total", name.trim_end_matches("_total")),
                    &at,
                )
                .into_iter()
                .filter(|s| s.labels.len() == 1)
                .collect();
                ensure!(series.len() == 1, "{name} of {cluster}: {series:?}");
                let errors = series[0].value;
                ensure!(
                    name.ends_with("_rq_total") || name.ends_with("_cx_total") || errors == 0.0,
                    "{name} of {cluster}: {errors}"
                );
            }
            value(
                family(&families, "envoy_cluster_membership_total", "gauge")?,
                "envoy_cluster_membership_total",
                &at,
            )?;
        }
        let rq = family(&families, "envoy_cluster_upstream_rq", "counter")?;
        let total = matching(
            rq,
            "envoy_cluster_upstream_rq_total",
            &[("cluster_name", &app_cluster)],
        );
        ensure!(
            total.iter().any(|s| s.labels.len() == 1 && s.value >= 1.0),
            "upstream_rq_total of {app_cluster}: {total:?}"
        );
        let opened = value(
            family(&families, "envoy_cluster_upstream_cx", "counter")?,
            "envoy_cluster_upstream_cx_total",
            &[("cluster_name", &app_cluster)],
        )?;
        ensure!(
            opened >= 1.0,
            "upstream_cx_total of {app_cluster}: {opened}"
        );
        // The HTTP connection waits in the pool; the TCP one closed with its client.
        let active = |cluster: &str| {
            value(
                family(&families, "envoy_cluster_upstream_cx_active", "gauge")?,
                "envoy_cluster_upstream_cx_active",
                &[("cluster_name", cluster)],
            )
        };
        ensure!(
            active(&app_cluster)? == 1.0,
            "the pooled connection is active"
        );
        ensure!(
            active(&tcp_cluster)? == 0.0,
            "the closed TCP connection is not"
        );
        let code = [
            ("cluster_name", app_cluster.as_str()),
            ("response_code", "200"),
        ];
        ensure!(value(rq, "envoy_cluster_upstream_rq_total", &code)? >= 1.0);
        let xx = family(&families, "envoy_cluster_upstream_rq_xx", "counter")?;
        for cluster in [app_cluster.as_str(), "PassthroughCluster"] {
            let class = [("cluster_name", cluster), ("response_code_class", "2xx")];
            ensure!(value(xx, "envoy_cluster_upstream_rq_xx_total", &class)? >= 1.0);
        }
        ensure!(
            text.contains(&format!(
                "envoy_cluster_upstream_rq{{response_code=\"200\",cluster_name=\"{app_cluster}\"}} "
            )),
            "Envoy's per-code series, tags in Envoy's order"
        );

        // The same requests in Istio's default text format on stdout.
        lab.expect_logged(
            "the registered request in Istio's text format",
            &[
                "\"GET / HTTP/1.1\" 200 - via_upstream - \"-\" 0 ",
                // The id between the user agent and the authority is the one generated.
                "\"-\" \"telemetry-test\" \"",
                "\" \"app.internal.com\" \"10.50.0.1:80\" outbound|80||app.internal.com - ",
            ],
        )?;
        lab.expect_logged(
            "the blocked request",
            &[
                "\"GET / HTTP/1.1\" 502 - direct_response",
                "\"nobody.example\" \"-\" - - 10.50.3.3:80",
                " block_all",
            ],
        )?;
        lab.expect_logged(
            "the TCP connection",
            &[
                "\"- - -\" 0 - - - \"-\" 9 ",
                &format!("{tcp_cluster} - 10.50.3.3:{TCP_PORT}"),
            ],
        )?;
        lab.expect_running()
    });
}

#[test]
fn json_access_log_has_istios_keys_and_values() {
    run("telemetry-json-log", |lab| {
        start(
            lab,
            &["--access-log", "/dev/stderr", "--access-log-format", "json"],
        )?;
        traffic(lab)?;
        let lines = poll("four JSON access log lines", Duration::from_secs(5), || {
            let lines: Vec<Value> = lab
                .portcullis_output()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|v| v.get("start_time").is_some())
                .collect();
            let passed = lines
                .iter()
                .any(|l| l["upstream_cluster"] == "PassthroughCluster");
            Ok((lines.len() >= 4 && passed).then_some(lines))
        })?;
        let ok = lines
            .iter()
            .find(|l| l["authority"] == APP_HOST)
            .context("the registered request")?;
        ensure!(ok["response_code"] == 200 && ok["method"] == "GET" && ok["path"] == "/");
        ensure!(ok["upstream_cluster"] == format!("outbound|80||{APP_HOST}").as_str());
        ensure!(ok["upstream_host"] == format!("{EXTERNAL_IP}:80").as_str());
        ensure!(ok["user_agent"] == "telemetry-test" && ok["x_forwarded_for"].is_null());
        // curl sends no request id: the one the proxy generated, a UUID version 4.
        ensure!(
            ok["request_id"]
                .as_str()
                .is_some_and(|id| id.len() == 36 && id.as_bytes()[14] == b'4'),
            "a generated request id: {ok}"
        );
        ensure!(ok["bytes_sent"].as_u64() >= Some(EXTERNAL_MARK.len() as u64));
        ensure!(ok["route_name"] == "default" && ok["response_flags"] == "-");
        let keys = ok.as_object().map_or(0, serde_json::Map::len);
        ensure!(keys == 24, "Istio's 24 JSON keys: {ok}");
        let blocked = lines
            .iter()
            .find(|l| l["route_name"] == "block_all")
            .context("the blocked request")?;
        ensure!(blocked["response_code"] == 502 && blocked["upstream_cluster"].is_null());
        let tcp = lines
            .iter()
            .find(|l| l["upstream_cluster"] == format!("outbound|{TCP_PORT}||{TCP_HOST}").as_str())
            .context("the TCP connection")?;
        ensure!(
            tcp["response_code"] == 0 && tcp["method"].is_null() && tcp["request_id"].is_null()
        );
        ensure!(tcp["bytes_received"] == 9 && tcp["bytes_sent"].as_u64() > Some(0));
        ensure!(
            lines
                .iter()
                .any(|l| l["upstream_cluster"] == "PassthroughCluster"),
            "the passthrough request: {lines:#?}"
        );
        lab.expect_running()
    });
}
