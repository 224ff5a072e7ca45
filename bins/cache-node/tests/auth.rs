//! Client tokens and protected mode with a real node: missing, unknown and too-weak tokens
//! get the documented errors on the SDK, the CLI and the admin port; a node exposed beyond
//! loopback without protection refuses to start.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use cache_client::{Client, Error};
use cache_testkit::{NodeProcess, cli_binary, http_post, metric, node_binary};

fn hash_token(name: &str, role: &str, token: &str) -> String {
    let mut child = Command::new(node_binary())
        .args(["hash-token", name, role])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run hash-token");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{token}\n").as_bytes())
        .expect("write token");
    let out = child.wait_with_output().expect("hash-token");
    assert!(out.status.success());
    String::from_utf8(out.stdout).expect("utf-8")
}

async fn client(node: &NodeProcess, token: Option<&str>) -> Client {
    let mut b = Client::builder().timeout(Duration::from_secs(5)).retries(0);
    if let Some(t) = token {
        b = b.token(t).expect("a valid token");
    }
    b.connect(node.addr()).await.expect("connect")
}

#[tokio::test]
async fn tokens_and_roles_are_enforced_on_every_front() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("tokens");
    let line = hash_token("ops", "admin", "a-secret-9");
    assert!(line.starts_with("ops admin ") && line.trim().len() == "ops admin ".len() + 64);
    let text = format!(
        "# who may do what\n{}{}{}",
        hash_token("dashboard", "read", "r-secret-1"),
        hash_token("service", "write", "w-secret-2"),
        line
    );
    std::fs::write(&file, text).expect("write tokens");
    let node = NodeProcess::start(&["--auth-file", file.to_str().expect("utf-8")]);

    let anonymous = client(&node, None).await;
    let e = anonymous.get("k").await.expect_err("no token");
    assert!(matches!(e, Error::Unauthenticated(_)), "{e}");
    assert!(e.to_string().contains("requires a token"), "{e}");
    let wrong = client(&node, Some("guess")).await;
    let e = wrong.get("k").await.expect_err("unknown token");
    assert!(
        matches!(&e, Error::Unauthenticated(m) if m.contains("unknown token")),
        "{e}"
    );

    let reader = client(&node, Some("r-secret-1")).await;
    assert_eq!(reader.get("k").await.expect("read"), None);
    let e = reader
        .set("k", "v")
        .await
        .expect_err("a read token writing");
    assert!(
        matches!(&e, Error::PermissionDenied(m) if m.contains("\"dashboard\" has role read")),
        "{e}"
    );

    let writer = client(&node, Some("w-secret-2")).await;
    writer.set("k", "v").await.expect("write");
    assert_eq!(
        reader.get("k").await.expect("read").as_deref(),
        Some(&b"v"[..])
    );
    let e = writer
        .snapshot()
        .await
        .expect_err("snapshots are admin-only");
    assert!(matches!(e, Error::PermissionDenied(_)), "{e}");
    let admin = client(&node, Some("a-secret-9")).await;
    let e = admin.snapshot().await.expect_err("no --data-dir");
    assert!(
        e.to_string().contains("--data-dir"),
        "past authentication: {e}"
    );

    // The ring-aware client sends its token on ClusterInfo and WatchCluster too.
    let cluster = Client::builder()
        .token("w-secret-2")
        .expect("valid")
        .connect_cluster([node.addr()])
        .await
        .expect("cluster client with a token");
    cluster
        .set("c", "1")
        .await
        .expect("write through the cluster client");

    // The CLI, with the token from the environment.
    let out = Command::new(cli_binary())
        .args(["--addr", &node.addr(), "get", "k"])
        .env("CACHE_TOKEN", "r-secret-1")
        .output()
        .expect("cli");
    assert_eq!(out.stdout, b"v", "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(cli_binary())
        .args(["--addr", &node.addr(), "set", "k", "x"])
        .env("CACHE_TOKEN", "r-secret-1")
        .output()
        .expect("cli");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("permission denied"));

    // The admin port's snapshot needs an admin token too.
    let (code, body) = http_post(node.admin, "/snapshot").expect("post");
    assert_eq!(code, 401, "{body}");

    let (_, metrics) = node.http_get("/metrics").expect("metrics");
    for (reason, at_least) in [("missing", 2.0), ("unknown", 1.0), ("forbidden", 3.0)] {
        let n = metric(
            &metrics,
            &format!("cache_auth_failures_total{{reason=\"{reason}\"}}"),
        )
        .unwrap_or(0.0);
        assert!(n >= at_least, "{reason}: {n}");
    }
    let log = node.log();
    for secret in ["r-secret-1", "w-secret-2", "a-secret-9", "guess"] {
        assert!(!log.contains(secret), "a token in the log:\n{log}");
    }
}

#[test]
fn protected_mode_refuses_an_exposed_node_without_protection() {
    let run = |args: &[&str]| {
        Command::new(node_binary())
            .args(args)
            .output()
            .expect("run cache-node")
    };
    let out = run(&["--listen", "0.0.0.0:0", "--admin-listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("protected mode")
            && err.contains("--listen 0.0.0.0:0 (no --auth-file or --tls-cert)")
            && err.contains("--insecure-allow-plaintext"),
        "{err}"
    );
    let node = NodeProcess::spawn(&[
        "--listen",
        "0.0.0.0:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--insecure-allow-plaintext",
    ])
    .expect("starts when told the network is trusted");
    drop(node);
}

/// Alive members a node's metrics report.
fn alive(node: &NodeProcess) -> f64 {
    let (_, m) = node.http_get("/metrics").expect("metrics");
    metric(&m, "cache_members{state=\"alive\"}").unwrap_or(0.0)
}

/// Waits until every node reports all of them alive (10 s at most).
fn converge(nodes: &[NodeProcess], what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while nodes.iter().any(|n| alive(n) != nodes.len() as f64) {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} never converged"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Members sharing `--gossip-keys-file` form a cluster; a node with another secret, or
/// none, is refused (counted) and never becomes a member.
#[test]
fn gossip_with_a_keyring_keeps_strangers_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("gossip.keys");
    let other = dir.path().join("other.keys");
    std::fs::write(&keys, "# cluster secret\ncorrect-horse-battery-staple-42\n").expect("keys");
    std::fs::write(&other, "a-different-cluster-secret-99\n").expect("keys");
    let k = keys.to_str().expect("utf-8");
    let mut cluster = cache_testkit::Cluster::start_gossip(3, &["--gossip-keys-file", k]);
    converge(&cluster.nodes, "the keyed members");
    let o = other.to_str().expect("utf-8");
    cluster.add_stranger(&["--gossip-keys-file", o]);
    cluster.add_stranger(&[]);
    std::thread::sleep(Duration::from_secs(3));
    for n in &cluster.nodes[..3] {
        assert_eq!(alive(n), 3.0, "a stranger joined");
    }
    for n in &cluster.nodes[3..] {
        assert_eq!(alive(n), 1.0, "a stranger sees no member");
    }
    let (_, m) = cluster.nodes[0].http_get("/metrics").expect("metrics");
    assert!(
        metric(&m, "cache_gossip_messages_refused_total").unwrap_or(0.0) > 0.0,
        "refusals are counted"
    );
}

/// With `--gossip-encrypt` the members form a cluster, and a member with the same secret
/// that only authenticates cannot read them (nor they it).
#[test]
fn encrypted_gossip_forms_a_cluster_and_keeps_non_encrypting_members_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("gossip.keys");
    std::fs::write(&keys, "correct-horse-battery-staple-42\n").expect("keys");
    let k = keys.to_str().expect("utf-8");
    let mut cluster =
        cache_testkit::Cluster::start_gossip(3, &["--gossip-keys-file", k, "--gossip-encrypt"]);
    converge(&cluster.nodes, "the encrypting members");
    cluster.add_stranger(&["--gossip-keys-file", k]);
    std::thread::sleep(Duration::from_secs(3));
    for n in &cluster.nodes[..3] {
        assert_eq!(alive(n), 3.0, "a non-encrypting member joined");
    }
    assert_eq!(alive(&cluster.nodes[3]), 1.0);
    // --gossip-encrypt without secrets is a start-up error.
    let out = std::process::Command::new(node_binary())
        .args(["--membership", "gossip", "--gossip-encrypt"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--gossip-keys-file"));
}
