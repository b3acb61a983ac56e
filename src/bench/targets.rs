//! The performance targets (docs/PERFORMANCE.md) judged against one run's results, read
//! from the same JSON that `--json` writes, so that the measurements run in child processes
//! count alike. `bench all` prints the verdicts last and writes them as `targets`.

use serde::Serialize;
use serde_json::{Map, Value};

use super::us;

/// One target, the run's figure for it, and whether the figure meets it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Verdict {
    pub target: String,
    pub figure: String,
    pub met: bool,
}

const MIN_THROUGHPUT_RATIO: f64 = 0.85;
const MAX_P99_RATIO: f64 = 1.3;
const MAX_COLD_OWN_P99_US: f64 = 1000.0;
const MAX_BYTES_PER_TOKEN: f64 = 4096.0;
const MAX_RSS_100K: f64 = 400.0 * 1024.0 * 1024.0;
const MAX_READY_US: f64 = 200_000.0;

/// The verdicts for every measurement in `results`; a measurement not run gives none.
pub fn judge(results: &Map<String, Value>) -> Vec<Verdict> {
    let mut out = Vec::new();
    let mut verdict = |target: String, figure: String, met: bool| {
        out.push(Verdict {
            target,
            figure,
            met,
        })
    };
    for run in results
        .get("load")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let transport = run["transport"].as_str().unwrap_or("?");
        if let Some(ratio) = run["throughput_ratio"].as_f64() {
            let median = run["median_round_ratio"].as_f64().unwrap_or(f64::NAN);
            verdict(
                format!("cache-hit throughput ≥ {MIN_THROUGHPUT_RATIO} × baseline, {transport}"),
                format!("{ratio:.3} (per-round median {median:.3})"),
                ratio >= MIN_THROUGHPUT_RATIO,
            );
        }
        if let Some(ratio) = run["p99_ratio"].as_f64() {
            verdict(
                format!("cache-hit p99 ≤ {MAX_P99_RATIO} × baseline, {transport}"),
                format!("{ratio:.3}"),
                ratio <= MAX_P99_RATIO,
            );
        }
    }
    if let Some(cold) = results.get("cold")
        && let Some(p99) = cold["broker_overhead"]["p99_us"].as_f64()
    {
        let beyond = cold["overhead_beyond_round_trip"]["p99_us"]
            .as_f64()
            .unwrap_or(f64::NAN);
        verdict(
            "broker's own cold-path overhead p99 < 1 ms".into(),
            format!("{} (beyond a bare gRPC round trip {})", us(p99), us(beyond)),
            p99 < MAX_COLD_OWN_P99_US,
        );
    }
    if let Some(economy) = results.get("economy") {
        for (what, key) in [("signs", "signs_ratio"), ("exchanges", "exchanges_ratio")] {
            if let Some(ratio) = economy[key].as_f64() {
                verdict(
                    format!("{what} per key per refresh window = 1.0"),
                    format!("{ratio:.3}"),
                    (ratio - 1.0).abs() < 1e-9,
                );
            }
        }
    }
    if let Some(points) = results.get("memory").and_then(|m| m["points"].as_array()) {
        if let Some(largest) = points.iter().max_by_key(|p| p["tokens"].as_u64()) {
            let per_token = largest["bytes_per_token"].as_f64().unwrap_or(f64::NAN);
            verdict(
                "< 4 KiB per cached token".into(),
                format!(
                    "{per_token:.0} B at {} tokens",
                    largest["tokens"].as_u64().unwrap_or(0)
                ),
                per_token < MAX_BYTES_PER_TOKEN,
            );
        }
        if let Some(p) = points
            .iter()
            .find(|p| p["tokens"].as_u64() == Some(100_000))
        {
            let rss = p["rss_bytes"].as_f64().unwrap_or(f64::NAN);
            verdict(
                "100k cached tokens < 400 MiB RSS".into(),
                format!("{:.1} MiB", rss / (1024.0 * 1024.0)),
                rss < MAX_RSS_100K,
            );
        }
    }
    if let Some(ready) = results.get("startup").map(|s| &s["ready"])
        && let Some(p50) = ready["p50_us"].as_f64()
    {
        verdict(
            "ready < 200 ms (no pre-warm)".into(),
            format!(
                "{} median (max {})",
                us(p50),
                us(ready["max_us"].as_f64().unwrap_or(f64::NAN))
            ),
            p50 < MAX_READY_US,
        );
    }
    out
}

/// The verdicts as a table, with how many targets were met.
pub fn text(verdicts: &[Verdict]) -> String {
    let width = verdicts
        .iter()
        .map(|v| v.target.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::from("\n== targets ==\n");
    for v in verdicts {
        let pad = width - v.target.chars().count();
        let status = if v.met { "met" } else { "MISSED" };
        out.push_str(&format!(
            "{}{}  {status:<6}  {}\n",
            v.target,
            " ".repeat(pad),
            v.figure
        ));
    }
    let met = verdicts.iter().filter(|v| v.met).count();
    out.push_str(&format!(
        "{met} of {} targets met in this run\n",
        verdicts.len()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn results(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn each_target_is_judged_from_its_measurement() {
        let r = results(json!({
            "load": [
                {"transport": "plaintext", "throughput_ratio": 0.86, "median_round_ratio": 0.84, "p99_ratio": 1.31},
                {"transport": "mtls", "throughput_ratio": 0.84, "median_round_ratio": 0.9, "p99_ratio": 1.1},
            ],
            "cold": {"broker_overhead": {"p99_us": 999.0}, "overhead_beyond_round_trip": {"p99_us": 500.0}},
            "economy": {"signs_ratio": 1.0, "exchanges_ratio": 1.0333},
            "memory": {"points": [
                {"tokens": 1000, "bytes_per_token": 5931.0, "rss_bytes": 1.0e7},
                {"tokens": 100000, "bytes_per_token": 3553.0, "rss_bytes": 371_400_000.0},
            ]},
            "startup": {"ready": {"p50_us": 13_600.0, "max_us": 25_800.0}},
        }));
        let verdicts = judge(&r);
        let met: Vec<(&str, bool)> = verdicts
            .iter()
            .map(|v| (v.target.as_str(), v.met))
            .collect();
        assert_eq!(
            met,
            [
                ("cache-hit throughput ≥ 0.85 × baseline, plaintext", true),
                ("cache-hit p99 ≤ 1.3 × baseline, plaintext", false),
                ("cache-hit throughput ≥ 0.85 × baseline, mtls", false),
                ("cache-hit p99 ≤ 1.3 × baseline, mtls", true),
                ("broker's own cold-path overhead p99 < 1 ms", true),
                ("signs per key per refresh window = 1.0", true),
                ("exchanges per key per refresh window = 1.0", false),
                // The largest count is judged, not the 1k point's allocator slack.
                ("< 4 KiB per cached token", true),
                ("100k cached tokens < 400 MiB RSS", true),
                ("ready < 200 ms (no pre-warm)", true),
            ]
        );
        assert_eq!(verdicts[0].figure, "0.860 (per-round median 0.840)");
        assert_eq!(verdicts[8].figure, "354.2 MiB");
        let t = text(&verdicts);
        assert!(t.contains("MISSED"), "{t}");
        assert!(t.ends_with("7 of 10 targets met in this run\n"), "{t}");
    }

    #[test]
    fn a_measurement_not_run_is_not_judged() {
        let r = results(json!({
            "machine": {"cpus": 2},
            "memory": {"points": [{"tokens": 1000, "bytes_per_token": 3000.0, "rss_bytes": 1.0e7}]},
        }));
        let verdicts = judge(&r);
        // No 100k point: only the per-token target.
        assert_eq!(verdicts.len(), 1, "{verdicts:?}");
        assert!(verdicts[0].met);
        assert!(judge(&Map::new()).is_empty());
    }
}
