//! `cache-bench` end to end against a real node: a short run produces a sane JSON summary,
//! and bad options are refused with a clear message.

use std::process::Command;

use cache_testkit::NodeProcess;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cache-bench"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run cache-bench")
}

#[test]
fn short_run_against_a_node_reports_requests_and_latency() {
    let node = NodeProcess::start(&[]);
    let target = format!("grpc://{}", node.addr());
    for batch in ["1", "4"] {
        let out = bench(&[
            "--target",
            &target,
            "--keys",
            "1000",
            "--distribution",
            "zipf:0.99",
            "--batch",
            batch,
            "--prefill",
            "--requests",
            "500",
            "--warmup",
            "0s",
            "--concurrency",
            "4",
            "--connections",
            "2",
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
        assert!(
            summary["requests"].as_u64().expect("requests") >= 500,
            "{summary}"
        );
        assert_eq!(summary["errors"], 0, "{summary}");
        assert!(
            summary["get"]["p99_ms"].as_f64().expect("p99") > 0.0,
            "{summary}"
        );
        // Everything was prefilled, so every get hits.
        assert_eq!(summary["get_hit_ratio"], 1.0, "{summary}");
        // The load generator reports how busy it was (Linux: from /proc/self/stat): it did
        // work, and no more than all of its CPUs allow (a tick of rounding aside).
        if cfg!(target_os = "linux") {
            let util = summary["client_cpu_utilization"]
                .as_f64()
                .expect("client_cpu_utilization");
            assert!(util > 0.0 && util < 1.5, "{summary}");
        }
    }
}

#[test]
fn bad_options_are_clear_errors() {
    let out = bench(&["--target", "http://x:1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("grpc://, grpc+cluster:// or redis://"));
    let out = bench(&[
        "--target",
        "grpc://127.0.0.1:1",
        "--distribution",
        "zipf:-1",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("positive"));
}
