//! The differential run: two identical labs, portcullis fed Istio YAML in one pod and real
//! Envoy fed the resources istiod would build from it in the other, the same probes from each
//! pod, and a table of every disagreement.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::bail;

use super::istio::Resources;
use super::{ISTIOD_IP, ISTIOD_PORT, TLS_MARK, envoy_bin};
use crate::lab::{Lab, Role};
use crate::scenario::{EXTERNAL_MARK, IN_CLUSTER_MARK, mesh_config};
use crate::{Reply, can_run, poll};

/// How long a proxy may take to write the access log line of a finished probe.
const LOG_DEADLINE: Duration = Duration::from_secs(2);
/// How long a raw TCP probe waits for the proxy to answer or close.
const TCP_PROBE_SECONDS: u64 = 3;
/// The longest value shown in a table cell when both sides agree on it.
const CELL: usize = 100;

/// One scenario, written once: the resources istiod would send a sidecar, which the test
/// control plane serves to both proxies, and the probes both must answer alike.
pub struct Scenario {
    /// Short name, used for the labs and the report.
    pub name: &'static str,
    /// The listeners, routes and clusters both proxies get over ADS.
    pub envoy: Resources,
    /// Istio YAML (file name, YAML) that istiod would compile into [`Scenario::envoy`]: when
    /// not empty, a third lab runs portcullis from these files (`--config`, with the mesh
    /// ConfigMap that [`Resources::mode`] implies) against the same probes, which covers
    /// portcullis's own compilation of Istio YAML. Kept for the scenarios where that path has
    /// something to show, as every lab costs run time.
    pub files: Vec<(String, String)>,
    /// Extra `portcullis run` flags.
    pub portcullis_flags: Vec<&'static str>,
    /// What the clients do.
    pub probes: Vec<Probe>,
}

/// What one client does, the same way in both pods.
#[derive(Debug, Clone)]
pub enum Action {
    /// One `curl` with these arguments (several requests when they hold `--next`: the last
    /// response is described, the bodies are all kept).
    Curl(Vec<String>),
    /// The same `curl` several times: which endpoints answered, as a set.
    Spread {
        /// curl's arguments.
        args: Vec<String>,
        /// How many requests.
        times: usize,
    },
    /// A raw TCP connection (`pce2e-net connect`) that sends `payload` and reads until the
    /// end.
    Tcp {
        /// `ip:port` dialled.
        addr: String,
        /// What is sent (`hex:` for bytes).
        payload: String,
    },
    /// The values of these stats in the admin port's `/stats` (Envoy's `name: value` text),
    /// as the probes before left them.
    Stats(Vec<String>),
}

/// A named client action, and whether the two proxies are meant to agree on it.
#[derive(Debug, Clone)]
pub struct Probe {
    /// What the probe checks, in a few words.
    pub name: String,
    /// What the client does.
    pub action: Action,
    /// `Some(why)` for a deliberate difference (a row of the README's "Differences from
    /// Istio/Envoy"): the two must then differ, and the report shows how.
    pub differs: Option<&'static str>,
    /// `Some(why)`: a deliberate difference of portcullis fed from files only (over xDS it
    /// must agree, unless [`Probe::differs`] says otherwise).
    pub files_differs: Option<&'static str>,
    /// The proxy may close before the client's first bytes arrive or after: whether the
    /// client sees a clean close or a reset is then a race, so only "it ended" is compared.
    pub close_races: bool,
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

impl Probe {
    /// `curl args` from the pod.
    pub fn curl(name: &str, args: &[&str]) -> Probe {
        Probe::new(name, Action::Curl(strings(args)))
    }

    /// `curl args` `times` times, comparing the set of endpoints that answered.
    pub fn spread(name: &str, args: &[&str], times: usize) -> Probe {
        Probe::new(
            name,
            Action::Spread {
                args: strings(args),
                times,
            },
        )
    }

    /// A TCP connection to `addr` from the pod that sends `payload`.
    pub fn tcp(name: &str, addr: &str, payload: &str) -> Probe {
        Probe::new(
            name,
            Action::Tcp {
                addr: addr.to_owned(),
                payload: payload.to_owned(),
            },
        )
    }

    /// The admin port's `stats` (absent ones read as "absent").
    pub fn stats(name: &str, stats: Vec<String>) -> Probe {
        Probe::new(name, Action::Stats(stats))
    }

    fn new(name: &str, action: Action) -> Probe {
        Probe {
            name: name.to_owned(),
            action,
            differs: None,
            files_differs: None,
            close_races: false,
        }
    }

    /// Marks a connection the proxy ends without reading it (Envoy's catch-all chains close
    /// at once), where clean close and reset depend only on timing.
    pub fn close_races(mut self) -> Probe {
        self.close_races = true;
        self
    }

    /// Marks a deliberate difference of portcullis fed from Istio YAML (the files lab),
    /// naming the README row that documents it.
    pub fn differs_from_files(mut self, why: &'static str) -> Probe {
        self.files_differs = Some(why);
        self
    }

    /// Marks a deliberate difference, naming the README row that documents it.
    pub fn differs(mut self, why: &'static str) -> Probe {
        self.differs = Some(why);
        self
    }
}

/// Which proxy a lab runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Portcullis,
    Envoy,
}

/// What a client saw, as (field, value) pairs in a fixed order.
type Observation = Vec<(&'static str, String)>;

/// Runs `scenario`: builds twin labs (three with [`Scenario::files`]), calls `setup` in each
/// (peers, names, dnsmasq: everything but the proxies), starts the control plane serving the
/// scenario's resources in each, portcullis over ADS in one pod and Envoy over ADS in the
/// other, runs every probe against both and fails with a table of both sides on any
/// undocumented difference, or on a documented one that did not show. Skips like
/// [`crate::run`] without root; fails loudly without Envoy 1.40.
pub fn run_differential(scenario: Scenario, setup: impl Fn(&mut Lab) -> anyhow::Result<()>) {
    let test = format!("diff-{}", scenario.name);
    if !can_run(&test) {
        return;
    }
    let envoy = match envoy_bin() {
        Ok(bin) => bin,
        Err(e) => panic!("{test}: the differential lab needs real Envoy: {e:#}"),
    };
    let new_lab = |side: &str| {
        Lab::new(&format!("{test}-{side}"))
            .unwrap_or_else(|e| panic!("{test}: building the lab failed: {e:#}"))
    };
    // Labs with the same namespaces and addresses: portcullis over ADS, portcullis from files
    // (when the scenario has them), Envoy over ADS.
    let mut ours = vec![(Feed::Xds, new_lab("p"))];
    if !scenario.files.is_empty() {
        ours.push((Feed::Files, new_lab("f")));
    }
    let mut theirs = new_lab("e");
    let xds = scenario.envoy.xds();
    let outcome = (|| {
        for (feed, lab) in &mut ours {
            setup(lab)?;
            lab.apply_iptables()?;
            match feed {
                Feed::Xds => {
                    let address = lab.start_control_plane(&xds)?;
                    lab.start_portcullis_xds(&address, &scenario.portcullis_flags)?;
                }
                Feed::Files => {
                    lab.write_config("mesh.yaml", &mesh_config(scenario.envoy.mode.mesh_name()))?;
                    for (file, yaml) in &scenario.files {
                        lab.write_config(file, yaml)?;
                    }
                    lab.start_portcullis(&scenario.portcullis_flags)?;
                }
            }
        }
        setup(&mut theirs)?;
        theirs.start_control_plane(&xds)?;
        theirs.apply_iptables()?;
        theirs.start_envoy(&envoy, &Resources::ads_bootstrap((ISTIOD_IP, ISTIOD_PORT)))?;
        compare(&scenario, &mut ours, &mut theirs)
    })();
    match outcome {
        Ok(report) => eprintln!("{report}"),
        Err(e) => {
            for (_, lab) in &mut ours {
                lab.dump_logs();
            }
            theirs.dump_logs();
            panic!("{test}: {e:#}");
        }
    }
}

/// How a portcullis lab gets its config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feed {
    /// Over ADS from the control plane, as Envoy.
    Xds,
    /// From the scenario's Istio YAML.
    Files,
}

impl Feed {
    fn label(self) -> &'static str {
        match self {
            Feed::Xds => "portcullis",
            Feed::Files => "portcullis (files)",
        }
    }
}

/// Runs every probe on every side; the report on success, the failing table as the error.
fn compare(
    scenario: &Scenario,
    ours: &mut [(Feed, Lab)],
    theirs: &mut Lab,
) -> anyhow::Result<String> {
    let mut report = format!(
        "differential scenario {}: {} probes, portcullis vs Envoy 1.40, both over ADS{}\n",
        scenario.name,
        scenario.probes.len(),
        if ours.len() > 1 {
            "; portcullis from Istio YAML too"
        } else {
            ""
        }
    );
    let mut failures = 0;
    for probe in &scenario.probes {
        let mut envoy = observe(theirs, Side::Envoy, &probe.action)?;
        if probe.close_races {
            merge_close_and_reset(&mut envoy);
        }
        for (feed, lab) in ours.iter_mut() {
            let mut mine = observe(lab, Side::Portcullis, &probe.action)?;
            if probe.close_races {
                merge_close_and_reset(&mut mine);
            }
            failures += usize::from(judge(&mut report, probe, *feed, &mine, &envoy));
        }
    }
    for (_, lab) in ours.iter_mut() {
        lab.expect_running()?;
    }
    let (status, _) = theirs.admin_get("/ready")?;
    if status != 200 {
        bail!("envoy stopped being ready ({status})\n{report}");
    }
    if failures > 0 {
        bail!("{failures} probe(s) disagree with Envoy 1.40:\n{report}");
    }
    Ok(report)
}

/// Writes `probe`'s verdict for one portcullis side into `report`; whether it failed.
fn judge(
    report: &mut String,
    probe: &Probe,
    feed: Feed,
    mine: &Observation,
    envoy: &Observation,
) -> bool {
    let differing: Vec<usize> = (0..mine.len())
        .filter(|&i| mine[i].1 != envoy[i].1)
        .collect();
    let expected = match feed {
        Feed::Xds => probe.differs,
        Feed::Files => probe.files_differs.or(probe.differs),
    };
    let (verdict, failed) = match (expected, differing.is_empty()) {
        (None, true) => ("same", false),
        (None, false) => ("MISMATCH", true),
        (Some(_), false) => ("differs, as documented", false),
        (Some(_), true) => ("SAME, but documented as differing", true),
    };
    let side = match feed {
        Feed::Xds => String::new(),
        Feed::Files => format!(" [{}]", feed.label()),
    };
    let _ = writeln!(report, "- {}{side}: {verdict}", probe.name);
    if let Some(why) = expected {
        let _ = writeln!(report, "  documented difference: {why}");
    }
    if failed || expected.is_some() {
        let _ = writeln!(report, "  action: {:?}", probe.action);
        let _ = writeln!(report, "  | field | {} | envoy |", feed.label());
        let _ = writeln!(report, "  |---|---|---|");
        for (i, (field, value)) in mine.iter().enumerate() {
            // A differing value is shown whole: the difference may be past any cut.
            let (mark, limit) = if differing.contains(&i) {
                (" (*)", usize::MAX)
            } else {
                ("", CELL)
            };
            let _ = writeln!(
                report,
                "  | {field}{mark} | {} | {} |",
                cell(value, limit),
                cell(&envoy[i].1, limit)
            );
        }
    }
    failed
}

/// Reduces a clean close and a reset to one value, for probes whose end is a race.
fn merge_close_and_reset(seen: &mut Observation) {
    for (field, value) in seen.iter_mut() {
        let ended = value.contains("reset") || value.contains("closed") || value == "eof";
        if matches!(*field, "outcome" | "end") && ended {
            *value = "closed or reset".to_owned();
        }
    }
}

/// `value` fit for one table cell, cut after `limit` characters.
fn cell(value: &str, limit: usize) -> String {
    let flat = value.replace('\n', "\\n").replace('|', "\\|");
    if flat.chars().count() > limit {
        let cut: String = flat.chars().take(limit).collect();
        format!("{cut}...")
    } else {
        flat
    }
}

/// Runs `action` in `lab`'s pod and describes what the client saw and what the proxy logged.
fn observe(lab: &mut Lab, side: Side, action: &Action) -> anyhow::Result<Observation> {
    let before = access_lines(lab, side)?.len();
    // What the clients received, where an echoing upstream shows the request ids it got.
    let mut bodies = String::new();
    let (mut seen, requests) = match action {
        Action::Curl(args) => {
            let requests = 1 + args.iter().filter(|a| *a == "--next").count();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let reply = lab.curl(&args)?;
            bodies.push_str(&reply.body);
            (describe_reply(&reply), requests)
        }
        Action::Spread { args, times } => {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut outcomes = BTreeSet::new();
            let mut all_headers = BTreeSet::new();
            let mut endpoints = BTreeSet::new();
            for _ in 0..*times {
                let reply = lab.curl(&args)?;
                outcomes.insert(format!("{} {}", outcome(&reply), reply.status_line));
                // The endpoints' pages differ in length; which one answered is compared apart.
                all_headers.insert(headers(&reply, &["content-length"]));
                endpoints.insert(endpoint(&reply.body));
                bodies.push_str(&reply.body);
            }
            (
                vec![
                    ("outcomes", join(&outcomes)),
                    ("headers", join(&all_headers)),
                    ("endpoints", join(&endpoints)),
                ],
                *times,
            )
        }
        Action::Stats(names) => {
            let (_, text) = lab.admin_get("/stats")?;
            let values: Vec<String> = names
                .iter()
                .map(|name| {
                    let value = text
                        .lines()
                        .find_map(|l| l.strip_prefix(&format!("{name}: ")));
                    format!("{name}: {}", value.unwrap_or("absent"))
                })
                .collect();
            (vec![("stats", values.join(", "))], 0)
        }
        Action::Tcp { addr, payload } => {
            let seen = lab.connect(Role::Pod, addr, payload, TCP_PROBE_SECONDS)?;
            let data = seen
                .line
                .split_once(" data=")
                .map_or("", |(_, d)| d)
                .to_owned();
            let data = raw_response(&data);
            (
                vec![
                    ("connected", seen.connected.to_string()),
                    ("end", seen.end.clone()),
                    ("received", data.clone()),
                    ("endpoint", endpoint(&data)),
                ],
                1,
            )
        }
    };
    let lines = poll("the probe's access log lines", LOG_DEADLINE, || {
        let lines = access_lines(lab, side)?;
        Ok((lines.len() >= before + requests).then_some(lines))
    })
    .or_else(|_| access_lines(lab, side))?;
    let new = lines.get(before..).unwrap_or_default();
    let fields: Vec<[String; 3]> = new.iter().map(|l| log_fields(l)).collect();
    for (i, name) in ["log flags", "log cluster", "log route"]
        .into_iter()
        .enumerate()
    {
        let values: BTreeSet<String> = fields.iter().map(|f| f[i].clone()).collect();
        seen.push((name, join(&values)));
    }
    let ids: BTreeSet<String> = new.iter().map(|l| logged_request_id(l, &bodies)).collect();
    seen.push(("log request id", join(&ids)));
    seen.push(("log lines", new.len().to_string()));
    Ok(seen)
}

fn join(values: &BTreeSet<String>) -> String {
    if values.is_empty() {
        "(none)".to_owned()
    } else {
        values.iter().cloned().collect::<Vec<_>>().join(", ")
    }
}

/// Status, proxy-visible headers, body and answering endpoint of one curl exchange.
fn describe_reply(reply: &Reply) -> Observation {
    vec![
        ("outcome", outcome(reply)),
        ("status", reply.status_line.clone()),
        ("headers", headers(reply, &[])),
        ("body", body_for_comparison(&reply.body)),
        ("endpoint", endpoint(&reply.body)),
    ]
}

/// `body`, or, when it is an echo of the headers an upstream received (every line
/// `name: value`), those lines sorted (their order is no proxy's promise) with the value of
/// `x-request-id` reduced to its presence (a proxy makes up a new one per request).
fn body_for_comparison(body: &str) -> String {
    let lines: Vec<&str> = body.lines().collect();
    if lines.is_empty() || !lines.iter().all(|l| l.contains(": ")) {
        return body.to_owned();
    }
    let mut lines: Vec<String> = lines
        .iter()
        .map(|line| {
            if line.to_ascii_lowercase().starts_with("x-request-id: ") {
                "x-request-id: *".to_owned()
            } else {
                (*line).to_owned()
            }
        })
        .collect();
    lines.sort();
    lines.join("\n")
}

/// How the exchange ended: a response, or how the connection failed (closed, reset, timed
/// out), with curl's exit code.
fn outcome(reply: &Reply) -> String {
    let stderr = reply.stderr.to_ascii_lowercase();
    let how = match reply.exit {
        0 => "response",
        7 => "refused",
        28 => "timeout",
        52 => "closed, empty reply",
        _ if stderr.contains("reset") => "reset",
        35 => "closed in the TLS handshake",
        56 => "closed",
        _ => "other failure",
    };
    format!("curl {}: {how}", reply.exit)
}

/// The response headers, sorted; values that vary by run or by lab (dates, file times,
/// timings) and those named in `vary` are reduced to their presence, and a `set-cookie`'s
/// value (a hash cookie is made from the client's port) to `*`, its attributes kept.
fn headers(reply: &Reply, vary: &[&str]) -> String {
    const VARYING: [&str; 3] = ["x-envoy-upstream-service-time", "last-modified", "etag"];
    let mut all: Vec<String> = reply
        .headers
        .iter()
        .filter(|(name, _)| name != "date")
        .map(|(name, value)| {
            if VARYING.contains(&name.as_str()) || vary.contains(&name.as_str()) {
                format!("{name}: *")
            } else if name == "set-cookie" {
                let (cookie, attributes) = value.split_once(';').unwrap_or((value, ""));
                let cookie_name = cookie.split_once('=').map_or(cookie, |(n, _)| n);
                format!("{name}: {cookie_name}=*;{attributes}")
            } else {
                format!("{name}: {value}")
            }
        })
        .collect();
    all.sort();
    all.join("; ")
}

/// Which lab host's page `body` is.
fn endpoint(body: &str) -> String {
    let known = [
        (EXTERNAL_MARK, "external nginx"),
        (IN_CLUSTER_MARK, "in-cluster nginx"),
        (TLS_MARK, "external TLS nginx"),
        ("sink", "a sink"),
    ];
    known
        .iter()
        .find(|(mark, _)| body.contains(mark))
        .map_or("-", |(_, name)| name)
        .to_owned()
}

/// A raw exchange's bytes as `pce2e-net` prints them (each CR and LF a space): an HTTP
/// response is reduced to its status line, its headers sorted with the date's value
/// dropped, and its body, so that header order does not count.
fn raw_response(data: &str) -> String {
    if !data.starts_with("HTTP/") {
        return data.to_owned();
    }
    let (head, body) = data.split_once("    ").unwrap_or((data, ""));
    let mut lines = head.split("  ");
    let status = lines.next().unwrap_or_default();
    let mut headers: Vec<String> = lines
        .map(|line| match line.split_once(':') {
            Some((name, _)) if name.eq_ignore_ascii_case("date") => "date: *".to_owned(),
            Some((name, value)) => format!("{}:{value}", name.to_ascii_lowercase()),
            None => line.to_owned(),
        })
        .collect();
    headers.sort();
    format!("{status} [{}] {body}", headers.join("; "))
}

/// The access log lines a proxy has written so far: both write Istio's default format
/// (portcullis to its stdout, among its own log's lines).
fn access_lines(lab: &mut Lab, side: Side) -> anyhow::Result<Vec<String>> {
    let text = match side {
        Side::Portcullis => lab.portcullis_output(),
        Side::Envoy => lab.envoy_access_log()?,
    };
    Ok(text
        .lines()
        .filter(|l| l.starts_with('['))
        .map(str::to_owned)
        .collect())
}

/// Response flags, upstream cluster and route name of one access log line in Istio's
/// format: [time] "request" code flags details termination "failure" in out duration
/// upstream-time "xff" "agent" "id" "authority" "upstream" cluster upstream-local
/// downstream-local downstream-remote sni route.
fn log_fields(line: &str) -> [String; 3] {
    let tokens = tokens(line);
    let at = |i: usize| tokens.get(i).map_or("?", String::as_str).to_owned();
    [at(3), at(16), at(21)]
}

/// What an access log line's `%REQ(X-REQUEST-ID)%` is, in terms both proxies can share:
/// `-`, a UUID version 4 the proxy made up (and whether an echoing upstream shows it got
/// that one, in `bodies`), or anything else verbatim (a client's own id).
fn logged_request_id(line: &str, bodies: &str) -> String {
    let tokens = tokens(line);
    let id = tokens.get(13).map_or("?", |t| t.trim_matches('"'));
    let groups: Vec<usize> = id.split('-').map(str::len).collect();
    let uuid_v4 = groups == [8, 4, 4, 4, 12]
        && id.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit())
        && id.as_bytes()[14] == b'4';
    if !uuid_v4 {
        return id.to_owned();
    }
    let echoed = bodies.lines().any(|l| {
        l.split_once(": ")
            .is_some_and(|(name, value)| name.eq_ignore_ascii_case("x-request-id") && value == id)
    });
    if echoed {
        "a UUIDv4, the one the upstream got".to_owned()
    } else {
        "a UUIDv4".to_owned()
    }
}

/// `line` split on spaces, keeping a `"quoted string"` as one token (quotes included).
fn tokens(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                current.push(c);
            }
            ' ' if !quoted => {
                if !current.is_empty() {
                    out.push(std::mem::take(&mut current));
                }
            }
            _ => current.push(c),
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_flags_cluster_and_route_from_istios_envoy_format() {
        let line = "[2026-12-03T16:00:00.000Z] \"GET / HTTP/1.1\" 502 - direct_response - \"-\" 0 0 0 - \"-\" \"curl/8.5.0\" \"6c1f\" \"example.org\" \"-\" - - 10.50.3.3:80 10.50.1.1:40000 - block_all";
        assert_eq!(log_fields(line), ["-", "-", "block_all"].map(String::from));
        let tcp = "[2026-12-03T16:00:00.000Z] \"- - -\" 0 UH - - \"-\" 0 0 0 - \"-\" \"-\" \"-\" \"-\" \"-\" BlackHoleCluster - 10.50.0.1:9 10.50.1.1:4 - -";
        assert_eq!(
            log_fields(tcp),
            ["UH", "BlackHoleCluster", "-"].map(String::from)
        );
    }

    #[test]
    fn a_logged_request_id_is_told_generated_echoed_or_the_clients() {
        let line = |id: &str| {
            format!(
                "[2026-12-03T16:00:00.000Z] \"GET / HTTP/1.1\" 200 - via_upstream - \"-\" 0 5 1 0 \"-\" \"curl/8.5.0\" \"{id}\" \"a\" \"10.50.0.1:80\" outbound|80||a - 10.50.3.3:80 10.50.1.1:40000 - default"
            )
        };
        let id = "6c1f0a2e-33b4-4c5d-9e6f-0123456789ab";
        assert_eq!(logged_request_id(&line(id), ""), "a UUIDv4");
        assert_eq!(
            logged_request_id(&line(id), &format!("host: a\nx-request-id: {id}\n")),
            "a UUIDv4, the one the upstream got"
        );
        // Another id echoed, or a version 1 UUID: not the generated one.
        assert_eq!(
            logged_request_id(
                &line(id),
                "x-request-id: 0d2e0a2e-33b4-4c5d-9e6f-0123456789ab\n"
            ),
            "a UUIDv4"
        );
        let v1 = "6c1f0a2e-33b4-1c5d-9e6f-0123456789ab";
        assert_eq!(logged_request_id(&line(v1), ""), v1);
        assert_eq!(logged_request_id(&line("-"), ""), "-");
        assert_eq!(
            logged_request_id(&line("from-the-client"), ""),
            "from-the-client"
        );
    }

    #[test]
    fn header_values_that_vary_by_run_are_reduced_to_presence() {
        let dump = "HTTP/1.1 200 OK\r\nServer: envoy\r\nDate: Thu, 03 Dec 2026 16:00:00 GMT\r\nx-envoy-upstream-service-time: 3\r\ncontent-length: 5\r\n\r\n";
        let reply = Reply::parse(0, "200 000", dump, "hello", "");
        assert_eq!(
            headers(&reply, &[]),
            "content-length: 5; server: envoy; x-envoy-upstream-service-time: *"
        );
        assert_eq!(
            raw_response("HTTP/1.1 400 Bad Request  server: envoy  date: Thu, 03 Dec 2026 GMT    "),
            raw_response("HTTP/1.1 400 Bad Request  Date: Fri, 04 Dec 2026 GMT  server: envoy    "),
        );
        assert_eq!(raw_response("sink "), "sink ");
    }

    #[test]
    fn an_echo_of_headers_is_compared_sorted_without_request_ids() {
        assert_eq!(
            body_for_comparison("x-request-id: 6c1f-22\nhost: a\n"),
            body_for_comparison("host: a\nx-request-id: 0d2e-33\n"),
        );
        assert_eq!(body_for_comparison("Welcome\n"), "Welcome\n");
    }

    #[test]
    fn a_racy_end_compares_only_that_it_ended() {
        let mut reset = vec![("end", "reset".to_owned()), ("received", String::new())];
        let mut eof = vec![("end", "eof".to_owned()), ("received", String::new())];
        let mut answered = vec![("outcome", "curl 0: response".to_owned())];
        merge_close_and_reset(&mut reset);
        merge_close_and_reset(&mut eof);
        merge_close_and_reset(&mut answered);
        assert_eq!(reset, eof);
        assert_eq!(answered[0].1, "curl 0: response");
    }

    #[test]
    fn a_reset_is_told_from_a_close() {
        let reset = Reply::parse(
            56,
            "000 000",
            "",
            "",
            "curl: (56) Recv failure: Connection reset by peer",
        );
        let closed = Reply::parse(52, "000 000", "", "", "curl: (52) Empty reply from server");
        assert_eq!(outcome(&reset), "curl 56: reset");
        assert_eq!(outcome(&closed), "curl 52: closed, empty reply");
    }
}
