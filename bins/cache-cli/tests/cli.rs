//! The real `cache-cli` binary against a real `cache-node`: human and `--json` output,
//! values from arguments, stdin and files, and every documented exit code.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use cache_testkit::NodeProcess;

fn cli(node: Option<&NodeProcess>, args: &[&str]) -> Output {
    cli_with_stdin(node, args, None)
}

fn cli_with_stdin(node: Option<&NodeProcess>, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cache-cli"));
    if let Some(node) = node {
        cmd.args(["--addr", &node.addr()]);
    }
    cmd.args(args).env_remove("CACHE_ADDR");
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run cache-cli");
    {
        let mut input = child.stdin.take().expect("piped");
        if let Some(data) = stdin {
            input.write_all(data).expect("write stdin");
        }
    }
    child.wait_with_output().expect("cache-cli finishes")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn set_get_del_ttl_touch_with_exit_codes() {
    let node = NodeProcess::start(&[]);
    let n = Some(&node);

    let o = cli(n, &["set", "greeting", "hello"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "OK\n");
    let o = cli(n, &["get", "greeting"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        o.stdout, b"hello",
        "raw bytes, no newline when not a terminal"
    );

    let o = cli(n, &["get", "missing"]);
    assert_eq!(o.status.code(), Some(1), "a missing key exits 1");

    let o = cli(n, &["set", "greeting", "again", "--nx"]);
    assert_eq!(o.status.code(), Some(1), "condition not met exits 1");
    let o = cli(n, &["set", "nobody", "x", "--xx"]);
    assert_eq!(o.status.code(), Some(1));

    assert_eq!(cli(n, &["ttl", "greeting"]).stdout, b"never\n");
    let o = cli(n, &["touch", "greeting", "--ttl", "100s"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let ttl = stdout(&cli(n, &["ttl", "greeting"]));
    assert!(ttl.ends_with("s\n") && ttl.len() > 2, "{ttl:?}");
    assert_eq!(
        cli(n, &["touch", "greeting", "--persist"]).status.code(),
        Some(0)
    );
    assert_eq!(cli(n, &["ttl", "greeting"]).stdout, b"never\n");
    assert_eq!(cli(n, &["ttl", "missing"]).status.code(), Some(1));
    assert_eq!(
        cli(n, &["touch", "missing", "--ttl", "1s"]).status.code(),
        Some(1)
    );

    let o = cli(n, &["set", "short", "v", "--ttl", "10s"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&cli(n, &["ttl", "short"])).contains('s'));

    assert_eq!(cli(n, &["del", "greeting"]).status.code(), Some(0));
    assert_eq!(cli(n, &["del", "greeting"]).status.code(), Some(1));
}

#[test]
fn incr_counts_and_refuses_what_is_not_a_counter() {
    let node = NodeProcess::start(&[]);
    let n = Some(&node);
    assert_eq!(stdout(&cli(n, &["incr", "hits"])), "1\n");
    assert_eq!(
        stdout(&cli(n, &["incr", "hits", "41", "--ttl", "1h"])),
        "42\n"
    );
    assert_eq!(stdout(&cli(n, &["incr", "hits", "-50"])), "-8\n");
    assert_eq!(
        stdout(&cli(n, &["ttl", "hits"])),
        "never\n",
        "--ttl applies only to a key the call creates"
    );
    assert_eq!(stdout(&cli(n, &["incr", "window", "--ttl", "1h"])), "1\n");
    assert_ne!(stdout(&cli(n, &["ttl", "window"])), "never\n");
    cli(n, &["set", "name", "alice"]);
    let o = cli(n, &["incr", "name"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("not an integer"), "{}", stderr(&o));
}

#[test]
fn values_from_stdin_and_files_are_binary_safe() {
    let node = NodeProcess::start(&[]);
    let n = Some(&node);
    let bytes: Vec<u8> = (0..=255u8).collect();
    let o = cli_with_stdin(n, &["set", "bin", "-"], Some(&bytes));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(cli(n, &["get", "bin"]).stdout, bytes);

    let path = std::env::temp_dir().join(format!("cache-cli-test-{}.bin", std::process::id()));
    std::fs::write(&path, b"from a file").expect("write");
    let o = cli(
        n,
        &[
            "set",
            "f",
            "--file",
            path.to_str().expect("utf-8 temp path"),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(cli(n, &["get", "f"]).stdout, b"from a file");
    std::fs::remove_file(&path).ok();

    let o = cli(n, &["set", "f", "--file", "/nonexistent/value"]);
    assert_eq!(o.status.code(), Some(6));
    assert!(
        stderr(&o).contains("cannot read /nonexistent/value"),
        "{}",
        stderr(&o)
    );

    // Non-UTF-8 keys are passed through as bytes.
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let key = std::ffi::OsStr::from_bytes(b"k\xff\xfe");
        let status = Command::new(env!("CARGO_BIN_EXE_cache-cli"))
            .args(["--addr", &node.addr(), "set"])
            .arg(key)
            .arg("v")
            .status()
            .expect("run");
        assert!(status.success());
        let out = Command::new(env!("CARGO_BIN_EXE_cache-cli"))
            .args(["--addr", &node.addr(), "--json", "get"])
            .arg(key)
            .output()
            .expect("run");
        assert_eq!(stdout(&out).trim(), r#"{"found":true,"value":"v"}"#);
        // Malformed UTF-8 where text is expected is a usage error, not a crash.
        let out = Command::new(env!("CARGO_BIN_EXE_cache-cli"))
            .arg("--addr")
            .arg(std::ffi::OsStr::from_bytes(b"\xff:1"))
            .args(["get", "k"])
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"));
    }
}

#[test]
fn json_output_is_parseable() {
    let node = NodeProcess::start(&[]);
    let n = Some(&node);
    let parse = |o: &Output| -> serde_json::Value {
        serde_json::from_slice(&o.stdout).expect("valid JSON")
    };
    assert_eq!(parse(&cli(n, &["--json", "set", "k", "v"]))["stored"], true);
    assert_eq!(parse(&cli(n, &["--json", "get", "k"]))["value"], "v");
    let miss = cli(n, &["--json", "get", "nope"]);
    assert_eq!(miss.status.code(), Some(1));
    assert_eq!(parse(&miss)["found"], false);
    let stats = parse(&cli(n, &["--json", "stats"]));
    assert_eq!(stats["total"]["items"], 1);
    assert_eq!(stats["members"].as_array().expect("members").len(), 1);
    let stats = parse(&cli(n, &["--json", "stats", "--node"]));
    assert_eq!(stats["items"], 1);
    let info = parse(&cli(n, &["--json", "info"]));
    assert_eq!(info["members"][0]["rpc_addr"], node.addr());
    let bad = cli(n, &["--json", "set", "", "v"]);
    assert_eq!(bad.status.code(), Some(4));
    assert!(
        parse(&bad)["error"]
            .as_str()
            .expect("message")
            .contains("empty")
    );
}

#[test]
fn connection_and_usage_errors_say_what_to_try() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let o = cli(None, &["--addr", &addr, "get", "k"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(
        stderr(&o).contains(&format!("cannot connect to {addr}: is cache-node running?")),
        "{}",
        stderr(&o)
    );
    let o = cli(None, &["frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
    let o = cli(None, &["set", "k"]);
    assert_eq!(o.status.code(), Some(2), "a value is required");
    let o = cli(None, &["set", "k", "v", "--ttl", "soon"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("500ms"), "{}", stderr(&o));
}

#[test]
fn completions_are_generated() {
    for shell in ["bash", "zsh", "fish"] {
        let o = cli(None, &["completions", shell]);
        assert_eq!(o.status.code(), Some(0));
        assert!(stdout(&o).contains("cache-cli"), "{shell}");
    }
}

#[test]
fn seeds_route_like_the_sdk_and_show_members_and_ring() {
    let cluster = cache_testkit::Cluster::start(3, &["--replication-factor", "2"]);
    let seeds = cluster.seeds().join(",");
    for i in 0..20 {
        let o = cli(
            None,
            &[
                "--seeds",
                &seeds,
                "set",
                &format!("k{i}"),
                "v",
                "--consistency",
                "all",
            ],
        );
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        assert_eq!(
            cli(None, &["--seeds", &seeds, "get", &format!("k{i}")]).stdout,
            b"v"
        );
    }
    for node in &cluster.nodes {
        let (_, text) = node.http_get("/metrics").expect("metrics");
        assert_eq!(
            cache_testkit::metric(&text, "cache_forwarded_requests_total"),
            Some(0.0),
            "the CLI with --seeds routes directly"
        );
    }
    let o = cli(None, &["--seeds", &seeds, "members"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = stdout(&o);
    for i in 0..3 {
        assert!(text.contains(&format!("node-{i}")), "{text}");
    }
    let ring: serde_json::Value =
        serde_json::from_slice(&cli(None, &["--seeds", &seeds, "--json", "ring"]).stdout)
            .expect("JSON");
    assert_eq!(ring["replication_factor"], 2);
    assert_eq!(ring["members"].as_array().expect("members").len(), 3);
    let share: f64 = ring["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["share"].as_f64().expect("share"))
        .sum();
    assert!((share - 1.0).abs() < 1e-9);
    // `members` also works from a single --addr.
    let o = cli(Some(&cluster.nodes[1]), &["members"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn snapshot_asks_the_node_for_one_and_says_when_it_cannot() {
    let dir = std::env::temp_dir().join(format!("cache-cli-snapshot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().expect("utf-8").to_string();
    let node = NodeProcess::start(&["--data-dir", &d]);
    let n = Some(&node);
    assert_eq!(cli(n, &["set", "k", "v"]).status.code(), Some(0));
    let o = cli(n, &["snapshot"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("snapshot-0000000002.snap: 1 entries"),
        "{}",
        stdout(&o)
    );
    let o = cli(n, &["--json", "snapshot"]);
    assert!(stdout(&o).contains("\"entries\":1"), "{}", stdout(&o));
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);

    let plain = NodeProcess::start(&[]);
    let o = cli(Some(&plain), &["snapshot"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("--data-dir"), "{}", stderr(&o));
}

#[test]
fn output_suits_scripts_and_mistakes_are_usage_errors() {
    let node = NodeProcess::start(&[]);
    let n = Some(&node);
    // A miss: nothing on stdout, the note on stderr.
    let o = cli(n, &["get", "missing"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty(), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("(not found: missing)"),
        "{}",
        stderr(&o)
    );
    // TTLs print in whole seconds, as the docs show.
    assert_eq!(
        cli(n, &["set", "t", "v", "--ttl", "10m"]).status.code(),
        Some(0)
    );
    assert_eq!(stdout(&cli(n, &["ttl", "t"])), "10m\n");
    // Usage errors: exit 2 with the cause, no colour when stderr is not a terminal.
    for (args, cause) in [
        (&["set", "k", "v", "--ttl", "0s"][..], "more than zero"),
        (&["touch", "k", "--ttl", "0ms"][..], "more than zero"),
        (&["--addr", "127.0.0.1", "get", "k"][..], "no port"),
        (&["--addr", "127.0.0.1:http", "get", "k"][..], "not a port"),
        (
            &["--addr", "ftp://h:1", "get", "k"][..],
            "unsupported scheme",
        ),
        (
            &[
                "--addr",
                "127.0.0.1:1",
                "--seeds",
                "127.0.0.1:2",
                "get",
                "k",
            ][..],
            "cannot be used with",
        ),
        (&["frobnicate"][..], "unrecognized subcommand"),
    ] {
        let o = cli(None, args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(cause), "{args:?}: {}", stderr(&o));
        assert!(
            !stderr(&o).contains('\u{1b}'),
            "no ANSI colour: {}",
            stderr(&o)
        );
    }
    // The help is the tool's own, with examples.
    let help = stdout(&cli(None, &["--help"]));
    assert!(
        help.contains("Read and write keys in a cache-cluster"),
        "{help}"
    );
    assert!(help.contains("Examples:"), "{help}");
    assert!(!help.contains('\u{1b}'));
}

#[test]
fn a_closed_pipe_ends_the_output_quietly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cache-cli"))
        .args(["completions", "zsh"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cache-cli");
    // Like `| head -c 1`: read a byte, then close the pipe.
    let mut out = child.stdout.take().expect("piped");
    let mut first = [0u8; 1];
    std::io::Read::read_exact(&mut out, &mut first).expect("some output");
    drop(out);
    let o = child.wait_with_output().expect("exits");
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    assert!(o.status.code().is_some(), "exited, not killed by a signal");
}

#[test]
fn operator_commands_cover_the_whole_cluster() {
    let cluster = cache_testkit::Cluster::start(3, &["--replication-factor", "2"]);
    let seeds = cluster.seeds().join(",");
    let s = |args: &[&str]| {
        let mut all = vec!["--seeds", &seeds];
        all.extend_from_slice(args);
        cli(None, &all)
    };
    for i in 0..30 {
        assert_eq!(
            s(&["set", &format!("user:{i}"), "v"]).status.code(),
            Some(0)
        );
    }
    assert_eq!(s(&["set", "order:1", "v"]).status.code(), Some(0));
    // dbsize: 31 keys, each on two members.
    let o = s(&["dbsize"]);
    assert_eq!(stdout(&o), "31\n", "{}", stderr(&o));
    let one = cli(Some(&cluster.nodes[0]), &["dbsize", "--node"]);
    assert_eq!(one.status.code(), Some(0));
    let stats: serde_json::Value =
        serde_json::from_slice(&s(&["--json", "stats"]).stdout).expect("JSON");
    assert_eq!(stats["members"].as_array().expect("members").len(), 3);
    assert_eq!(stats["total"]["items"], 62);
    // scan: every matching key once, from every member.
    let o = s(&["scan", "--match", "user:*", "--count", "5"]);
    let mut keys: Vec<&str> = std::str::from_utf8(&o.stdout)
        .expect("utf-8")
        .lines()
        .collect();
    keys.sort_unstable();
    let mut want: Vec<String> = (0..30).map(|i| format!("user:{i}")).collect();
    want.sort_unstable();
    assert_eq!(keys, want);
    // scan --cursor: one step at a time on one node, the cursor first, until it is 0.
    let (mut cursor, mut stepped) = ("0".to_string(), 0usize);
    for _ in 0..10_000 {
        let o = cli(
            Some(&cluster.nodes[0]),
            &["scan", "--cursor", &cursor, "--count", "3"],
        );
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let text = stdout(&o);
        let mut lines = text.lines();
        cursor = lines.next().expect("a cursor").to_string();
        stepped += lines.count();
        if cursor == "0" {
            break;
        }
    }
    assert_eq!(cursor, "0", "the iteration ends");
    let held = stdout(&cli(Some(&cluster.nodes[0]), &["dbsize", "--node"]));
    assert_eq!(
        stepped.to_string(),
        held.trim(),
        "every key of the node, once"
    );
    // locate: the two replicas, both holding the same version.
    let o = s(&["--json", "locate", "user:3"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let loc: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let replicas = loc["replicas"].as_array().expect("replicas");
    assert_eq!(replicas.len(), 2);
    assert!(replicas.iter().all(|r| r["holds"] == "value"));
    assert_eq!(replicas[0]["version"], replicas[1]["version"]);
    assert_eq!(s(&["locate", "nobody"]).status.code(), Some(1));
    // flush: refused without confirmation when stdin is not a terminal.
    let o = s(&["flush"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--yes"), "{}", stderr(&o));
    assert_eq!(
        s(&["get", "user:1"]).status.code(),
        Some(0),
        "nothing was deleted"
    );
    let o = s(&["flush", "--yes"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o).lines().count(), 3, "{}", stdout(&o));
    assert_eq!(s(&["get", "user:1"]).status.code(), Some(1));
    assert_eq!(stdout(&s(&["dbsize"])), "0\n");
}

#[test]
fn max_response_size_bounds_what_is_read() {
    let node = NodeProcess::start(&[]);
    let n = Some(&node);
    let value = vec![b'x'; 200 << 10];
    let o = cli_with_stdin(n, &["set", "wide", "-"], Some(&value));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = cli(n, &["--max-response-size", "100KiB", "get", "wide"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("response limit"), "{}", stderr(&o));
    let o = cli(n, &["--max-response-size", "1MiB", "get", "wide"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(o.stdout, value);
    for bad in ["1KiB", "lots"] {
        let o = cli(n, &["--max-response-size", bad, "get", "wide"]);
        assert_eq!(o.status.code(), Some(2), "{bad}: {}", stderr(&o));
    }
}
