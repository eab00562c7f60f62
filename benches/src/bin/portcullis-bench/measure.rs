//! What one load run yields: the load generator's figures (wrk, h2load or oha), and the
//! CPU time and memory of a process tree read from /proc.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A load generator's summary of one run (named after wrk, the first of them).
#[derive(Debug, Clone, Default)]
pub struct Wrk {
    /// Requests completed.
    pub requests: u64,
    /// Requests per second.
    pub rps: f64,
    /// Latency percentiles in microseconds; NaN where the generator gives none (h2load).
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile; unreliable here (BENCHMARKING.md), reported with a mark.
    pub p99: f64,
    /// Socket errors of every kind.
    pub socket_errors: u64,
    /// Responses other than 2xx or 3xx.
    pub non_2xx: u64,
}

impl Wrk {
    /// Failed requests of any kind.
    pub fn failures(&self) -> u64 {
        self.socket_errors + self.non_2xx
    }
}

/// Waits for a started load generator (killed after `limit`) and parses its report from
/// standard output with `parse`.
pub fn finish(
    mut child: std::process::Child,
    limit: Duration,
    parse: fn(&str) -> anyhow::Result<Wrk>,
) -> anyhow::Result<Wrk> {
    let deadline = Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the load generator did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "the load generator failed ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse(&text).with_context(|| format!("parsing the load generator's output:\n{text}"))
}

/// Parses h2load's report: requests that succeeded, their rate, the failures; h2load
/// prints no latency percentiles.
pub fn parse_h2load(text: &str) -> anyhow::Result<Wrk> {
    let mut w = Wrk {
        p50: f64::NAN,
        p90: f64::NAN,
        p99: f64::NAN,
        ..Wrk::default()
    };
    // `N word, N word, ...`: the number before `word`.
    let count = |rest: &str, word: &str| -> Option<u64> {
        rest.split(',').find_map(|part| {
            let mut fields = part.split_whitespace();
            let n = fields.next()?.parse().ok()?;
            (fields.next()? == word).then_some(n)
        })
    };
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            w.rps = rest
                .split(", ")
                .nth(1)
                .and_then(|r| r.strip_suffix(" req/s"))
                .context("no req/s after `finished in`")?
                .parse()?;
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            w.requests = count(rest, "succeeded").context("no succeeded count")?;
            w.socket_errors =
                count(rest, "errored").unwrap_or(0) + count(rest, "timeout").unwrap_or(0);
        } else if let Some(rest) = line.strip_prefix("status codes: ") {
            w.non_2xx = count(rest, "4xx").unwrap_or(0) + count(rest, "5xx").unwrap_or(0);
        }
    }
    if w.requests == 0 {
        bail!("no requests succeeded");
    }
    Ok(w)
}

/// Parses oha's `--output-format json` report (latencies in seconds).
pub fn parse_oha(text: &str) -> anyhow::Result<Wrk> {
    let v: serde_json::Value = serde_json::from_str(text)?;
    let us = |p: &str| -> anyhow::Result<f64> {
        Ok(v["latencyPercentiles"][p]
            .as_f64()
            .with_context(|| format!("no {p}"))?
            * 1e6)
    };
    let sum = |key: &str, keep: &dyn Fn(&str) -> bool| -> u64 {
        v[key].as_object().map_or(0, |m| {
            m.iter()
                .filter(|(k, _)| keep(k))
                .filter_map(|(_, n)| n.as_u64())
                .sum()
        })
    };
    let ok = |code: &str| code.starts_with('2') || code.starts_with('3');
    let w = Wrk {
        requests: sum("statusCodeDistribution", &ok),
        rps: v["summary"]["requestsPerSec"]
            .as_f64()
            .context("no requestsPerSec")?,
        p50: us("p50")?,
        p90: us("p90")?,
        p99: us("p99")?,
        socket_errors: sum("errorDistribution", &|_| true),
        non_2xx: sum("statusCodeDistribution", &|c| !ok(c)),
    };
    if w.requests == 0 {
        bail!("no requests completed");
    }
    Ok(w)
}

/// Parses wrk 4's `--latency` report.
pub fn parse_wrk(text: &str) -> anyhow::Result<Wrk> {
    let mut w = Wrk::default();
    let mut percentiles = HashMap::new();
    for line in text.lines().map(str::trim) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let [pct, value] = fields[..]
            && let Some(pct) = pct.strip_suffix('%')
            && let Some(us) = duration_us(value)
        {
            percentiles.insert(pct.to_owned(), us);
        } else if line.contains(" requests in ") {
            w.requests = fields.first().context("requests")?.parse()?;
        } else if let Some(rest) = line.strip_prefix("Requests/sec:") {
            w.rps = rest.trim().parse()?;
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            w.socket_errors = rest
                .split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                .sum();
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            w.non_2xx = rest.trim().parse()?;
        }
    }
    let get = |p: &str| {
        percentiles
            .get(p)
            .copied()
            .with_context(|| format!("no {p}% line"))
    };
    w.p50 = get("50")?;
    w.p90 = get("90")?;
    w.p99 = get("99")?;
    if w.requests == 0 {
        bail!("no requests completed");
    }
    Ok(w)
}

/// `12.34us`, `1.20ms`, `2.00s` in microseconds.
fn duration_us(value: &str) -> Option<f64> {
    let (number, scale) = if let Some(v) = value.strip_suffix("us") {
        (v, 1.0)
    } else if let Some(v) = value.strip_suffix("ms") {
        (v, 1_000.0)
    } else if let Some(v) = value.strip_suffix('s') {
        (v, 1_000_000.0)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * scale)
}

/// `pid` and all its descendants.
fn tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            // The command name may contain spaces and parentheses: fields start after
            // the last ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|s| s.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parents.push((p, ppid));
            }
        }
    }
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        all.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    all
}

/// CPU time in nanoseconds of a process tree, every thread, from schedstat (exact, unlike
/// the 10 ms ticks of /proc/PID/stat).
pub fn cpu_ns(pid: u32) -> u64 {
    tree(pid)
        .into_iter()
        .map(|p| {
            std::fs::read_dir(format!("/proc/{p}/task"))
                .map(|tasks| {
                    tasks
                        .flatten()
                        .filter_map(|t| {
                            std::fs::read_to_string(t.path().join("schedstat"))
                                .ok()?
                                .split_whitespace()
                                .next()?
                                .parse::<u64>()
                                .ok()
                        })
                        .sum::<u64>()
                })
                .unwrap_or(0)
        })
        .sum()
}

/// Resident memory of a process tree in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// The anonymous part (heap, stacks) of a process tree's resident memory in KiB: RSS less
/// the mapped binary and libraries, which a machine's other copies of the proxy share.
pub fn rss_anon_kib(pid: u32) -> u64 {
    status_kib(pid, "RssAnon:")
}

fn status_kib(pid: u32, field: &str) -> u64 {
    tree(pid)
        .into_iter()
        .filter_map(|p| {
            let status = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Median of `values`; NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        f64::midpoint(v[mid - 1], v[mid])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "Running 2s test @ http://127.0.0.1:10001/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.10ms  310.00us   9.95ms   90.12%
    Req/Sec    23.80k     1.20k   25.10k    80.00%
  Latency Distribution
     50%    2.05ms
     75%    2.20ms
     90%  812.00us
     99%    1.20s
  47360 requests in 2.00s, 12.10MB read
  Socket errors: connect 1, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 4
Requests/sec:  23680.11
Transfer/sec:      6.05MB
";

    #[test]
    fn parses_a_wrk_report() {
        let w = parse_wrk(REPORT).unwrap();
        assert_eq!(w.requests, 47_360);
        assert!((w.rps - 23_680.11).abs() < 1e-6);
        assert!((w.p50 - 2_050.0).abs() < 1e-6);
        assert!((w.p90 - 812.0).abs() < 1e-6);
        assert!((w.p99 - 1_200_000.0).abs() < 1e-6);
        assert_eq!(w.socket_errors, 6);
        assert_eq!(w.non_2xx, 4);
        assert_eq!(w.failures(), 10);
    }

    #[test]
    fn parses_an_h2load_report() {
        let text = "finished in 2.01s, 5000.00 req/s, 625.32KB/s
requests: 10567 total, 10990 started, 10567 done, 10000 succeeded, 567 failed, 560 errored, 7 timeout
status codes: 10000 2xx, 0 3xx, 3 4xx, 2 5xx
";
        let w = parse_h2load(text).unwrap();
        assert_eq!(w.requests, 10_000);
        assert!((w.rps - 5_000.0).abs() < 1e-9);
        assert_eq!(w.socket_errors, 567);
        assert_eq!(w.non_2xx, 5);
        assert!(w.p50.is_nan());
    }

    #[test]
    fn parses_an_oha_report() {
        let text = r#"{"summary": {"requestsPerSec": 1234.5},
            "latencyPercentiles": {"p50": 0.0001, "p90": 0.0002, "p99": 0.003},
            "statusCodeDistribution": {"200": 2468, "503": 1},
            "errorDistribution": {"connection reset": 2}}"#;
        let w = parse_oha(text).unwrap();
        assert_eq!(w.requests, 2468);
        assert!((w.rps - 1234.5).abs() < 1e-9);
        assert!((w.p50 - 100.0).abs() < 1e-6);
        assert!((w.p99 - 3_000.0).abs() < 1e-6);
        assert_eq!(w.failures(), 3);
    }

    #[test]
    fn medians() {
        assert!((median(&[3.0, 1.0, 2.0]) - 2.0).abs() < 1e-9);
        assert!((median(&[4.0, 1.0, 2.0, 3.0]) - 2.5).abs() < 1e-9);
        assert!(median(&[]).is_nan());
    }
}
