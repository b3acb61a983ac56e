//! Runs the benchmarks once, small (a few hundred requests), to prove they work and report
//! sane figures. Never a timed assertion: the figures themselves are docs/PERFORMANCE.md's.
#![cfg(feature = "emulator")]

use std::time::Duration;

use tokenbroker::bench::{Transport, cold, economy, load, memory};

fn install_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_benchmark_runs_against_broker_and_baseline_in_plaintext_mtls_and_with_bearer_tokens()
{
    install_crypto();
    let opts = load::LoadOptions {
        connections: 2,
        streams: 8,
        duration: Duration::from_secs(60),
        requests: Some(150),
        rounds: 2,
        warmup: Duration::ZERO,
        transports: vec![Transport::Plaintext, Transport::Mtls, Transport::Bearer],
    };
    let reports = load::run(&opts).await.unwrap();
    assert_eq!(reports.len(), 3);
    // Every broker answer in the bearer run was authenticated (no dev identity there): an
    // error would have been counted.
    assert_eq!(reports[2].transport, Transport::Bearer);
    for r in &reports {
        for s in [&r.baseline, &r.broker] {
            assert_eq!(s.requests, 300, "{}", r.text());
            assert_eq!(s.errors, 0, "{}", r.text());
            assert_eq!(s.not_from_cache, 0, "{}", r.text());
            assert!(s.requests_per_sec > 0.0);
            assert!(s.latency.p50_us > 0.0 && s.latency.p50_us <= s.latency.p999_us);
        }
        assert!(
            r.response_bytes > 1000,
            "a real token: {}",
            r.response_bytes
        );
        assert!(r.throughput_ratio.is_finite() && r.p99_ratio.is_finite());
        assert!(r.text().contains("ratio broker/baseline"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_path_economy_and_memory_benchmarks_run() {
    install_crypto();
    let c = cold::run(&cold::ColdOptions {
        samples: 3,
        sign_latency_ms: 2,
        exchange_latency_ms: 3,
        // `tokenbroker emulator` (demo configuration) in a process of its own.
        emulator_exe: Some(env!("CARGO_BIN_EXE_tokenbroker").into()),
    })
    .await
    .unwrap();
    assert_eq!((c.errors, c.not_exchanged), (0, 0), "{}", c.text());
    assert_eq!(c.miss.count, 3);
    assert!(
        c.miss.p50_us >= 5_000.0,
        "the injected 5 ms are in the miss: {}",
        c.text()
    );
    assert_eq!(c.emulator, "separate process");
    // Every miss made one sign then one exchange, so each is split into its three parts.
    for part in [&c.before_sign, &c.between_calls, &c.after_exchange] {
        assert_eq!(part.count, 3, "{}", c.text());
    }
    // A miss works in this process (the client, the broker, HTTPS to the emulator): CPU time
    // was counted, for each miss and each bare round trip.
    assert_eq!((c.miss_cpu.count, c.bare_round_trip_cpu.count), (3, 3));
    assert!(c.miss_cpu.p50_us > 0.0, "{}", c.text());

    let e = economy::run(&economy::EconomyOptions {
        tenants: 2,
        scopes: 2,
        windows: 1,
        concurrency: 8,
    })
    .await
    .unwrap();
    assert_eq!(e.windows.len(), 2, "{}", e.text());
    assert_eq!(e.errors, 0, "{}", e.text());
    assert!(
        e.windows
            .iter()
            .all(|w| w.exchanges >= 4 && w.requests_served > 0)
    );

    let m = memory::run(&memory::MemoryOptions {
        sizes: vec![500, 1000],
        token_bytes: 1536,
    })
    .await
    .unwrap();
    assert_eq!(m.points.len(), 2);
    assert!(m.points.iter().all(|p| p.rss_bytes > 0), "{}", m.text());
}

/// `tokenbroker bench all` as a user runs it, small: memory and cold in child processes of
/// their own, given the options passed to `all`; everything lands in one JSON file.
#[test]
fn bench_all_runs_every_measurement_and_passes_its_options_to_its_children() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let args = [
        "bench",
        "all",
        "--rounds",
        "1",
        "--warmup",
        "0",
        "--requests",
        "50",
        "--connections",
        "1",
        "--streams",
        "4",
        "--cold-samples",
        "3",
        "--sign-latency-ms",
        "2",
        "--exchange-latency-ms",
        "3",
        "--tenants",
        "2",
        "--scopes",
        "1",
        "--windows",
        "1",
        "--memory-tokens",
        "200",
        "--token-bytes",
        "512",
        "--startup-runs",
        "1",
        "--json",
    ];
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokenbroker"))
        .args(args)
        .arg(&json)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    // The children's options arrived: the figures count what was asked for.
    assert_eq!(v["cold"]["samples"], 3, "{v:#}");
    assert_eq!(v["cold"]["injected_ms"], 5, "{v:#}");
    assert_eq!(v["cold"]["errors"], 0, "{v:#}");
    assert_eq!(v["memory"]["token_bytes"], 512, "{v:#}");
    assert_eq!(v["memory"]["points"][0]["tokens"], 200, "{v:#}");
    assert_eq!(v["startup"]["runs"], 1, "{v:#}");
    assert_eq!(v["load"].as_array().map(Vec::len), Some(2), "{v:#}");
    assert!(v["economy"].is_object(), "{v:#}");
    // Every target judged, from the children's results too, and printed last.
    // (Nine: with no 100k-token point, the memory ceiling is not judged.)
    let targets = v["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 9, "{v:#}");
    assert!(
        targets
            .iter()
            .all(|t| t["figure"].is_string() && t["met"].is_boolean()),
        "{v:#}"
    );
    assert!(stdout.contains("targets met in this run"), "{stdout}");
    // And the children's reports were printed with the parent's.
    for heading in ["cold path", "memory"] {
        assert!(stdout.contains(heading), "{heading}: {stdout}");
    }
}
