//! `cargo xtask prometheus`: the alert rules pass `promtool check rules` and
//! `promtool test rules`, and a real Prometheus (Debian's `prometheus` package) scrapes a
//! real node, loads the rules, and evaluates them without errors.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::net::{Guard, free_port, has, spawn_node};
use crate::root;

/// Runs the checks; fails with what went wrong.
pub(crate) fn check() -> Result<()> {
    for tool in ["promtool", "prometheus"] {
        if !has(tool) {
            bail!(
                "{tool} is not installed: `apt-get install -y prometheus` (Debian) provides both"
            );
        }
    }
    let rules = root().join("deploy/prometheus");
    run("promtool", &["check", "rules", "alerts.yml"], &rules)?;
    run("promtool", &["test", "rules", "alerts_test.yml"], &rules)?;

    crate::net::build_release_bins(&["cache-node"])?;
    let bin = root().join("target/release/cache-node");
    let (_node, _grpc, admin, _) = spawn_node(bin.to_str().context("utf-8 path")?, &[])?;

    let dir = std::env::temp_dir().join(format!("cache-prometheus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(rules.join("alerts.yml"), dir.join("alerts.yml"))?;
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - alerts.yml\nscrape_configs:\n  - job_name: cache\n    static_configs:\n      - targets: [\"{admin}\"]\n"
        ),
    )?;
    let port = free_port()?;
    let web = format!("127.0.0.1:{port}");
    let _prometheus = Guard(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start prometheus")?,
    );
    // Wait (by polling, with a deadline) until the node is scraped and the rules evaluated.
    let until = Instant::now() + Duration::from_secs(60);
    let (up, series) = loop {
        let up = query(&web, "up{job=\"cache\"}").ok();
        let series = query(
            &web,
            "count({job=\"cache\", __name__=~\"cache_.*|process_.*\"})",
        )
        .ok();
        if let (Some(u), Some(s)) = (&up, &series)
            && value(u) == Some(1.0)
            && value(s).is_some_and(|n| n > 0.0)
        {
            break (up, series);
        }
        if Instant::now() > until {
            bail!("prometheus did not scrape the node within 60 s (up: {up:?})");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let until = Instant::now() + Duration::from_secs(30);
    let groups = loop {
        let r = get(&web, "/api/v1/rules")?;
        let groups = r["data"]["groups"].as_array().cloned().unwrap_or_default();
        let evaluated = groups
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .all(|r| {
                r["lastEvaluation"]
                    .as_str()
                    .is_some_and(|t| !t.starts_with("0001"))
            });
        if !groups.is_empty() && evaluated {
            break groups;
        }
        if Instant::now() > until {
            bail!("prometheus did not evaluate the rules within 30 s: {r}");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let mut rules_ok = 0;
    for rule in groups
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
    {
        if rule["health"] != "ok" {
            bail!("rule {} is unhealthy: {}", rule["name"], rule["lastError"]);
        }
        if rule["state"] != "inactive" {
            bail!(
                "rule {} is {} on a healthy idle node",
                rule["name"],
                rule["state"]
            );
        }
        rules_ok += 1;
    }
    println!(
        "prometheus scraped {admin}: up = {}, {} cache_/process_ series; {rules_ok} alert rules evaluated, healthy and inactive",
        value(&up.unwrap_or_default()).unwrap_or(0.0),
        value(&series.unwrap_or_default()).unwrap_or(0.0)
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn run(tool: &str, args: &[&str], dir: &std::path::Path) -> Result<()> {
    eprintln!("$ {tool} {}", args.join(" "));
    let status = Command::new(tool).args(args).current_dir(dir).status()?;
    if !status.success() {
        bail!("{tool} {} failed", args.join(" "));
    }
    Ok(())
}

/// The first sample's value of an instant-query answer.
fn value(answer: &Value) -> Option<f64> {
    answer["data"]["result"][0]["value"][1]
        .as_str()?
        .parse()
        .ok()
}

fn query(web: &str, promql: &str) -> Result<Value> {
    let encoded: String = promql
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    get(web, &format!("/api/v1/query?query={encoded}"))
}

fn get(web: &str, path: &str) -> Result<Value> {
    let mut s = std::net::TcpStream::connect(web)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {web}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no HTTP body")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {head}");
    }
    // Prometheus answers with chunked encoding only for large bodies; these are small.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON: {body}"))
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}
