//! Turning samples into the markdown tables of the report, criterion's results into a
//! table by registry size, and the report into the README section.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, bail};

use crate::measure::{Wrk, median};

/// Markers of the README section the harness owns.
pub const README_START: &str = "<!-- bench:start -->";
/// End marker.
pub const README_END: &str = "<!-- bench:end -->";

/// One wrk run against one target.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Case name, e.g. `keepalive-c50`.
    pub case: &'static str,
    /// Target name, e.g. `HAProxy`.
    pub target: &'static str,
    /// Repetition number.
    pub rep: usize,
    /// wrk's figures.
    pub wrk: Wrk,
    /// The proxy's CPU per request in µs; `None` for the direct connection.
    pub proxy_cpu_us: Option<f64>,
    /// The upstream nginx's CPU per request in µs.
    pub upstream_cpu_us: f64,
    /// The proxy's RSS in the middle of the run.
    pub rss_kib: Option<u64>,
    /// Access log bytes the proxy wrote per request, for targets with a log.
    pub log_bytes_per_req: Option<f64>,
}

/// A case as the report shows it.
pub struct CaseTitle {
    /// Its name, as samples carry it.
    pub name: &'static str,
    /// Its heading.
    pub title: &'static str,
    /// Its tail latencies are trustworthy (open loop): p99 ratios are shown.
    pub tails: bool,
    /// Targets come with and without their access log: the log's cost is shown.
    pub log_cost: bool,
}

fn fmt_opt(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "–".to_owned()
    }
}

/// The per-case tables: medians over repetitions, then ratios computed within each
/// repetition and their median.
pub fn http_tables(samples: &[Sample], cases: &[CaseTitle]) -> String {
    let mut out = String::new();
    let targets: Vec<&str> = {
        let mut t: Vec<&str> = Vec::new();
        for s in samples {
            if !t.contains(&s.target) {
                t.push(s.target);
            }
        }
        t
    };
    for c in cases {
        let case = &c.name;
        let _ = writeln!(out, "\n#### {}\n", c.title);
        let _ = writeln!(
            out,
            "| target | req/s | p50 µs | p90 µs | p99 µs{} | proxy CPU µs/req | proxy/upstream CPU | proxy RSS MiB | failed |",
            if c.tails { "" } else { " ⚠" }
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for target in &targets {
            let runs: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.case == *case && s.target == *target)
                .collect();
            if runs.is_empty() {
                continue;
            }
            let m =
                |f: &dyn Fn(&Sample) -> f64| median(&runs.iter().map(|s| f(s)).collect::<Vec<_>>());
            let proxy = m(&|s| s.proxy_cpu_us.unwrap_or(f64::NAN));
            let norm = m(&|s| s.proxy_cpu_us.unwrap_or(f64::NAN) / s.upstream_cpu_us);
            let rss = m(&|s| s.rss_kib.map_or(f64::NAN, |k| k as f64 / 1024.0));
            let failed: u64 = runs.iter().map(|s| s.wrk.failures()).sum();
            let _ = writeln!(
                out,
                "| {target} | {:.0} | {} | {} | {} | {} | {} | {} | {failed} |",
                m(&|s| s.wrk.rps),
                fmt_opt(m(&|s| s.wrk.p50), 0),
                fmt_opt(m(&|s| s.wrk.p90), 0),
                fmt_opt(m(&|s| s.wrk.p99), 0),
                fmt_opt(proxy, 1),
                fmt_opt(norm, 2),
                fmt_opt(rss, 1),
            );
        }
        let _ = writeln!(out, "\n{}", ratio_table(samples, case, c.tails));
        if let Some(table) = floor_table(samples, case) {
            let _ = writeln!(out, "{table}");
        }
        if c.log_cost {
            let _ = writeln!(out, "{}", log_cost_table(samples, case));
        }
    }
    out
}

/// The repetitions present in `samples`.
fn repetitions(samples: &[Sample]) -> Vec<usize> {
    let mut r: Vec<usize> = samples.iter().map(|s| s.rep).collect();
    r.sort_unstable();
    r.dedup();
    r
}

/// Median over repetitions of `f(a's sample, b's sample)` in `case`.
fn paired(samples: &[Sample], case: &str, a: &str, b: &str, f: Ratio) -> f64 {
    let find = |target: &str, rep: usize| {
        samples
            .iter()
            .find(|s| s.case == case && s.target == target && s.rep == rep)
    };
    let ratios: Vec<f64> = repetitions(samples)
        .into_iter()
        .filter_map(|r| Some(f(find(a, r)?, find(b, r)?)))
        .collect();
    median(&ratios)
}

/// What each proxy's access log costs: CPU per request and req/s with it on ÷ off, the
/// bytes it wrote per request, and portcullis's logged CPU per request ÷ each peer's.
fn log_cost_table(samples: &[Sample], case: &str) -> String {
    let cpu: Ratio = |a, b| a.proxy_cpu_us.unwrap_or(f64::NAN) / b.proxy_cpu_us.unwrap_or(f64::NAN);
    let rps: Ratio = |a, b| a.wrk.rps / b.wrk.rps;
    let mut out = String::from(
        "| access log on ÷ off (median of per-repetition ratios) | proxy CPU/req | req/s | log bytes/req | logged CPU/req: portcullis ÷ this |\n|---|---:|---:|---:|---:|\n",
    );
    for proxy in ["portcullis explicit", "HAProxy", "Envoy"] {
        let logged = format!("{proxy} +log");
        if !samples.iter().any(|s| s.case == case && s.target == logged) {
            continue;
        }
        let bytes = median(
            &samples
                .iter()
                .filter(|s| s.case == case && s.target == logged)
                .filter_map(|s| s.log_bytes_per_req)
                .collect::<Vec<_>>(),
        );
        let _ = writeln!(
            out,
            "| {proxy} | {} | {} | {} | {} |",
            fmt_opt(paired(samples, case, &logged, proxy, cpu), 2),
            fmt_opt(paired(samples, case, &logged, proxy, rps), 2),
            fmt_opt(bytes, 0),
            fmt_opt(
                paired(samples, case, "portcullis explicit +log", &logged, cpu),
                2
            ),
        );
    }
    out
}

/// The relays that do no HTTP at all against HAProxy in the same place and direct, and
/// portcullis in that place against them: how far a target above HAProxy is from what
/// relaying alone allows. `None` when the case has no relay target.
fn floor_table(samples: &[Sample], case: &str) -> Option<String> {
    const FLOORS: [(&str, &str, &str); 3] = [
        ("null relay", "HAProxy", "portcullis explicit"),
        ("HAProxy TCP", "HAProxy", "portcullis explicit"),
        (
            "null relay sidecar",
            "HAProxy sidecar",
            "portcullis sidecar",
        ),
    ];
    let present: Vec<_> = FLOORS
        .into_iter()
        .filter(|(f, _, _)| samples.iter().any(|s| s.case == case && s.target == *f))
        .collect();
    if present.is_empty() {
        return None;
    }
    let rps: Ratio = |a, b| a.wrk.rps / b.wrk.rps;
    let cpu: Ratio = |a, b| a.proxy_cpu_us.unwrap_or(f64::NAN) / b.proxy_cpu_us.unwrap_or(f64::NAN);
    let mut out = String::from(
        "| relay without HTTP (median of per-repetition ratios) | req/s ÷ HAProxy in its place | req/s ÷ direct | proxy CPU/req ÷ that HAProxy's | portcullis in its place: req/s ÷ this | portcullis CPU/req ÷ this |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for (floor, haproxy, portcullis) in present {
        let _ = writeln!(
            out,
            "| {floor} | {} | {} | {} | {} | {} |",
            fmt_opt(paired(samples, case, floor, haproxy, rps), 2),
            fmt_opt(paired(samples, case, floor, "direct", rps), 2),
            fmt_opt(paired(samples, case, floor, haproxy, cpu), 2),
            fmt_opt(paired(samples, case, portcullis, floor, rps), 2),
            fmt_opt(paired(samples, case, portcullis, floor, cpu), 2),
        );
    }
    Some(out)
}

/// A figure of portcullis's sample relative to another target's in the same repetition.
type Ratio = fn(&Sample, &Sample) -> f64;

/// Medians in ns by parameter (its numeric value for sorting, its text), by function, by
/// group, as criterion names them.
type Medians = BTreeMap<String, BTreeMap<String, BTreeMap<u64, (String, f64)>>>;

/// portcullis against HAProxy, Envoy and direct, per repetition, then the median; with
/// `tails`, the p99 ratios too.
fn ratio_table(samples: &[Sample], case: &str, tails: bool) -> String {
    let mut out = String::from(
        "| ratio (median of per-repetition ratios) | portcullis sidecar | portcullis explicit |\n|---|---:|---:|\n",
    );
    let cpu: Ratio = |p, o| p.proxy_cpu_us.unwrap_or(f64::NAN) / o.proxy_cpu_us.unwrap_or(f64::NAN);
    let mut rows: Vec<(&str, &str, Ratio)> = vec![
        (
            "req/s ÷ HAProxy (≥ 1 is the target)",
            "HAProxy",
            |p, o| p.wrk.rps / o.wrk.rps,
        ),
        (
            "req/s ÷ HAProxy sidecar (same interception)",
            "HAProxy sidecar",
            |p, o| p.wrk.rps / o.wrk.rps,
        ),
        ("proxy CPU/req ÷ HAProxy sidecar's", "HAProxy sidecar", cpu),
        ("req/s ÷ Envoy", "Envoy", |p, o| p.wrk.rps / o.wrk.rps),
        ("req/s ÷ direct", "direct", |p, o| p.wrk.rps / o.wrk.rps),
        ("proxy CPU/req ÷ HAProxy's", "HAProxy", cpu),
        ("p50 ÷ HAProxy's", "HAProxy", |p, o| p.wrk.p50 / o.wrk.p50),
    ];
    if tails {
        rows.extend([
            (
                "p99 ÷ HAProxy's",
                "HAProxy",
                (|p, o| p.wrk.p99 / o.wrk.p99) as Ratio,
            ),
            ("p50 ÷ HAProxy sidecar's", "HAProxy sidecar", |p, o| {
                p.wrk.p50 / o.wrk.p50
            }),
            ("p99 ÷ HAProxy sidecar's", "HAProxy sidecar", |p, o| {
                p.wrk.p99 / o.wrk.p99
            }),
        ]);
    }
    for (label, other, f) in rows {
        // The explicit proxy is not intercepted: against HAProxy's sidecar it has no ratio.
        let explicit = if other == "HAProxy sidecar" {
            "–".to_owned()
        } else {
            fmt_opt(paired(samples, case, "portcullis explicit", other, f), 2)
        };
        let _ = writeln!(
            out,
            "| {label} | {} | {explicit} |",
            fmt_opt(paired(samples, case, "portcullis sidecar", other, f), 2),
        );
    }
    out
}

/// A criterion time in ns, in a readable unit.
fn fmt_ns(ns: f64) -> String {
    if ns < 1_000.0 {
        format!("{ns:.1} ns")
    } else if ns < 1_000_000.0 {
        format!("{:.2} µs", ns / 1_000.0)
    } else {
        format!("{:.2} ms", ns / 1_000_000.0)
    }
}

/// criterion's medians from `dir` (`target/criterion`), one table per group with the
/// parameter (registry size, endpoint count) as columns.
pub fn criterion_table(dir: &Path) -> anyhow::Result<String> {
    let mut groups = Medians::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n == "new") {
                    if let Some((g, f, v, ns)) = read_estimate(&path)? {
                        let key = v.parse::<u64>().unwrap_or(0);
                        groups
                            .entry(g)
                            .or_default()
                            .entry(f)
                            .or_default()
                            .insert(key, (v, ns));
                    }
                } else {
                    stack.push(path);
                }
            }
        }
    }
    if groups.is_empty() {
        bail!("no criterion results under {}", dir.display());
    }
    let mut out = String::new();
    for (group, functions) in &groups {
        let mut params: Vec<(u64, String)> = functions
            .values()
            .flat_map(|p| p.iter().map(|(k, (v, _))| (*k, v.clone())))
            .collect();
        params.sort();
        params.dedup();
        let _ = writeln!(out, "\n`{group}`\n");
        let header: Vec<String> = params
            .iter()
            .map(|(_, v)| {
                if v.is_empty() {
                    "median".to_owned()
                } else {
                    v.clone()
                }
            })
            .collect();
        let _ = writeln!(out, "| | {} |", header.join(" | "));
        let _ = writeln!(out, "|---|{}", "---:|".repeat(params.len()));
        for (function, values) in functions {
            let cells: Vec<String> = params
                .iter()
                .map(|(k, _)| values.get(k).map_or("–".to_owned(), |(_, ns)| fmt_ns(*ns)))
                .collect();
            let _ = writeln!(out, "| {function} | {} |", cells.join(" | "));
        }
    }
    Ok(out)
}

/// (group, function, parameter, median ns) of one criterion result folder.
fn read_estimate(new: &Path) -> anyhow::Result<Option<(String, String, String, f64)>> {
    let (Ok(bench), Ok(estimates)) = (
        std::fs::read_to_string(new.join("benchmark.json")),
        std::fs::read_to_string(new.join("estimates.json")),
    ) else {
        return Ok(None);
    };
    let bench: serde_json::Value = serde_json::from_str(&bench)?;
    let estimates: serde_json::Value = serde_json::from_str(&estimates)?;
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    let ns = estimates["median"]["point_estimate"]
        .as_f64()
        .with_context(|| format!("no median in {}", new.display()))?;
    Ok(Some((
        text(&bench["group_id"]),
        text(&bench["function_id"]),
        text(&bench["value_str"]),
        ns,
    )))
}

/// Replaces the README section between the markers with `body`.
pub fn update_readme(readme: &Path, body: &str) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(readme).with_context(|| format!("reading {}", readme.display()))?;
    let (Some(start), Some(end)) = (text.find(README_START), text.find(README_END)) else {
        bail!(
            "{} has no {README_START} … {README_END} section",
            readme.display()
        );
    };
    if end < start {
        bail!("{README_END} comes before {README_START}");
    }
    let updated = format!(
        "{}{README_START}\n{}\n{}",
        &text[..start],
        body.trim(),
        &text[end..]
    );
    std::fs::write(readme, updated)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readme_section_is_replaced_and_the_rest_kept() {
        let dir = std::env::temp_dir().join(format!("pcbench-readme-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let readme = dir.join("README.md");
        std::fs::write(
            &readme,
            format!("# x\nbefore\n{README_START}\nold\n{README_END}\nafter\n"),
        )
        .unwrap();
        update_readme(&readme, "new table\n").unwrap();
        let text = std::fs::read_to_string(&readme).unwrap();
        assert_eq!(
            text,
            format!("# x\nbefore\n{README_START}\nnew table\n{README_END}\nafter\n")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn times_read_well() {
        assert_eq!(fmt_ns(12.34), "12.3 ns");
        assert_eq!(fmt_ns(12_340.0), "12.34 µs");
        assert_eq!(fmt_ns(12_340_000.0), "12.34 ms");
    }
}
