//! The Redis-protocol front end with real nodes and a real Redis client library (the `redis`
//! crate): every supported command, pipelines, binary keys and values, TTL edge cases, the
//! error replies, authentication, protocol abuse, and a 3-node cluster where any node
//! serves any key and counters count once.

use std::io::{Read, Write};
use std::time::Duration;

use cache_testkit::{Cluster, NodeProcess};
use redis::aio::MultiplexedConnection;
use redis::{RedisResult, Value, cmd};

async fn connect(addr: std::net::SocketAddr) -> MultiplexedConnection {
    let client = redis::Client::open(format!("redis://{addr}/")).expect("a valid URL");
    tokio::time::timeout(
        Duration::from_secs(10),
        client.get_multiplexed_async_connection(),
    )
    .await
    .expect("connects in time")
    .expect("connects")
}

fn resp_node(extra: &[&str]) -> NodeProcess {
    let mut args = vec!["--resp-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    NodeProcess::start(&args)
}

/// Sends raw bytes and reads until the node closes the connection or 2 s pass.
fn raw(addr: std::net::SocketAddr, request: &[u8]) -> (Vec<u8>, bool) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    s.write_all(request).expect("send");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, false),
        }
    }
}

async fn q<T: redis::FromRedisValue>(
    c: &mut MultiplexedConnection,
    args: &[&[u8]],
) -> RedisResult<T> {
    let mut command = cmd(std::str::from_utf8(args[0]).expect("command names are text"));
    for a in &args[1..] {
        command.arg(*a);
    }
    command.query_async(c).await
}

fn err_text<T: std::fmt::Debug>(r: RedisResult<T>) -> String {
    let e = r.expect_err("an error reply");
    format!("{} {}", e.code().unwrap_or(""), e.detail().unwrap_or(""))
}

#[tokio::test]
async fn every_command_answers_as_redis_does() {
    let node = resp_node(&[]);
    let mut c = connect(node.resp.expect("resp address")).await;

    let pong: String = q(&mut c, &[b"PING"]).await.expect("ping");
    assert_eq!(pong, "PONG");
    let echo: Vec<u8> = q(&mut c, &[b"ECHO", b"a\r\nb"]).await.expect("echo");
    assert_eq!(echo, b"a\r\nb");

    // Strings, binary keys and values, the empty value.
    let key: &[u8] = b"\x00bin\xffkey";
    let value: &[u8] = b"\x00\x01\r\n\xfe";
    let ok: String = q(&mut c, &[b"SET", key, value]).await.expect("set");
    assert_eq!(ok, "OK");
    let got: Vec<u8> = q(&mut c, &[b"GET", key]).await.expect("get");
    assert_eq!(got, value);
    let _: String = q(&mut c, &[b"SET", b"empty", b""])
        .await
        .expect("set empty");
    let got: Option<Vec<u8>> = q(&mut c, &[b"GET", b"empty"]).await.expect("get");
    assert_eq!(got, Some(Vec::new()));
    let miss: Option<Vec<u8>> = q(&mut c, &[b"GET", b"nope"]).await.expect("get");
    assert_eq!(miss, None);

    // SET options.
    let nx: Option<String> = q(&mut c, &[b"SET", b"k", b"1", b"NX"]).await.expect("nx");
    assert_eq!(nx.as_deref(), Some("OK"));
    let nx: Option<String> = q(&mut c, &[b"SET", b"k", b"2", b"nx"]).await.expect("nx");
    assert_eq!(nx, None);
    let xx: Option<String> = q(&mut c, &[b"SET", b"absent", b"2", b"XX"])
        .await
        .expect("xx");
    assert_eq!(xx, None);
    let old: Option<String> = q(&mut c, &[b"SET", b"k", b"3", b"GET", b"EX", b"100"])
        .await
        .expect("get");
    assert_eq!(old.as_deref(), Some("1"));
    let ttl: i64 = q(&mut c, &[b"TTL", b"k"]).await.expect("ttl");
    assert!((99..=100).contains(&ttl), "{ttl}");
    let _: String = q(&mut c, &[b"SET", b"k", b"4", b"KEEPTTL"])
        .await
        .expect("keepttl");
    let pttl: i64 = q(&mut c, &[b"PTTL", b"k"]).await.expect("pttl");
    assert!(pttl > 90_000 && pttl <= 100_000, "{pttl}");
    let _: String = q(&mut c, &[b"SET", b"k", b"5"]).await.expect("set");
    let ttl: i64 = q(&mut c, &[b"TTL", b"k"]).await.expect("ttl");
    assert_eq!(ttl, -1, "a plain SET clears the TTL");
    let ttl: i64 = q(&mut c, &[b"TTL", b"absent"]).await.expect("ttl");
    assert_eq!(ttl, -2);
    let at = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
        + 50)
        .to_string();
    let _: String = q(&mut c, &[b"SET", b"k", b"6", b"EXAT", at.as_bytes()])
        .await
        .expect("exat");
    let ttl: i64 = q(&mut c, &[b"TTL", b"k"]).await.expect("ttl");
    assert!((48..=50).contains(&ttl), "{ttl}");
    let _: String = q(&mut c, &[b"SET", b"k", b"7", b"PX", b"1"])
        .await
        .expect("px");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let gone: Option<String> = q(&mut c, &[b"GET", b"k"]).await.expect("get");
    assert_eq!(gone, None, "expired after 1 ms");

    // SETEX, PSETEX, SETNX, GETDEL, GETEX, PERSIST, EXPIRE family.
    let _: String = q(&mut c, &[b"SETEX", b"e", b"100", b"v"])
        .await
        .expect("setex");
    let _: String = q(&mut c, &[b"PSETEX", b"p", b"100000", b"v"])
        .await
        .expect("psetex");
    let ttl: i64 = q(&mut c, &[b"TTL", b"p"]).await.expect("ttl");
    assert!((99..=100).contains(&ttl), "{ttl}");
    let n: i64 = q(&mut c, &[b"SETNX", b"e", b"w"]).await.expect("setnx");
    assert_eq!(n, 0);
    let n: i64 = q(&mut c, &[b"PERSIST", b"e"]).await.expect("persist");
    assert_eq!(n, 1);
    let n: i64 = q(&mut c, &[b"PERSIST", b"e"]).await.expect("persist");
    assert_eq!(n, 0, "no TTL left to remove");
    let v: Option<String> = q(&mut c, &[b"GETEX", b"e", b"PX", b"50000"])
        .await
        .expect("getex");
    assert_eq!(v.as_deref(), Some("v"));
    let pttl: i64 = q(&mut c, &[b"PTTL", b"e"]).await.expect("pttl");
    assert!(pttl > 40_000 && pttl <= 50_000, "{pttl}");
    let n: i64 = q(&mut c, &[b"EXPIRE", b"e", b"1000"])
        .await
        .expect("expire");
    assert_eq!(n, 1);
    let n: i64 = q(&mut c, &[b"EXPIRE", b"absent", b"1000"])
        .await
        .expect("expire");
    assert_eq!(n, 0);
    // EXPIRE's options, as Redis 7 (a key without a TTL counts as an infinite one).
    let _: String = q(&mut c, &[b"SET", b"ek", b"v"]).await.expect("set");
    for (args, want) in [
        (&[&b"100"[..], b"NX"][..], 1),
        (&[b"200", b"NX"], 0),
        (&[b"50", b"GT"], 0),
        (&[b"500", b"GT"], 1),
        (&[b"50", b"LT"], 1),
        (&[b"60", b"XX"], 1),
    ] {
        let mut cmd: Vec<&[u8]> = vec![b"EXPIRE", b"ek"];
        cmd.extend_from_slice(args);
        let n: i64 = q(&mut c, &cmd).await.expect("expire");
        assert_eq!(n, want, "EXPIRE ek {args:?}");
    }
    let ttl: i64 = q(&mut c, &[b"TTL", b"ek"]).await.expect("ttl");
    assert!((59..=60).contains(&ttl), "{ttl}");
    let _: i64 = q(&mut c, &[b"PERSIST", b"ek"]).await.expect("persist");
    for (args, want) in [
        (&[&b"100"[..], b"XX"][..], 0),
        (&[b"100", b"GT"], 0),
        (&[b"100", b"XX", b"LT"], 0),
        (&[b"100", b"LT"], 1),
    ] {
        let mut cmd: Vec<&[u8]> = vec![b"EXPIRE", b"ek"];
        cmd.extend_from_slice(args);
        let n: i64 = q(&mut c, &cmd).await.expect("expire");
        assert_eq!(n, want, "EXPIRE ek {args:?} on a key without a TTL");
    }
    let e = err_text(q::<Value>(&mut c, &[b"EXPIRE", b"ek", b"1", b"NX", b"XX"]).await);
    assert!(e.contains("not compatible"), "{e}");
    let n: i64 = q(&mut c, &[b"PEXPIREAT", b"e", b"1"])
        .await
        .expect("pexpireat");
    assert_eq!(n, 1, "an expiry in the past deletes");
    let n: i64 = q(&mut c, &[b"EXISTS", b"e"]).await.expect("exists");
    assert_eq!(n, 0);
    let v: Option<String> = q(&mut c, &[b"GETDEL", b"p"]).await.expect("getdel");
    assert_eq!(v.as_deref(), Some("v"));
    let v: Option<String> = q(&mut c, &[b"GETDEL", b"p"]).await.expect("getdel");
    assert_eq!(v, None);

    // Multi-key commands.
    let _: String = q(&mut c, &[b"MSET", b"a", b"1", b"b", b"2", b"c", b"3"])
        .await
        .expect("mset");
    let got: Vec<Option<String>> = q(&mut c, &[b"MGET", b"a", b"x", b"c"]).await.expect("mget");
    assert_eq!(got, vec![Some("1".into()), None, Some("3".into())]);
    let n: i64 = q(&mut c, &[b"EXISTS", b"a", b"b", b"x", b"a"])
        .await
        .expect("exists");
    assert_eq!(n, 3, "a key named twice counts twice");
    let n: i64 = q(&mut c, &[b"DEL", b"a", b"b", b"x"]).await.expect("del");
    assert_eq!(n, 2);
    let n: i64 = q(&mut c, &[b"UNLINK", b"c"]).await.expect("unlink");
    assert_eq!(n, 1);

    // Counters.
    let n: i64 = q(&mut c, &[b"INCR", b"n"]).await.expect("incr");
    assert_eq!(n, 1);
    let n: i64 = q(&mut c, &[b"INCRBY", b"n", b"41"]).await.expect("incrby");
    assert_eq!(n, 42);
    let n: i64 = q(&mut c, &[b"DECRBY", b"n", b"50"]).await.expect("decrby");
    assert_eq!(n, -8);
    let n: i64 = q(&mut c, &[b"DECR", b"n"]).await.expect("decr");
    assert_eq!(n, -9);
    let _: String = q(&mut c, &[b"SET", b"max", b"9223372036854775807"])
        .await
        .expect("set");
    let e = err_text(q::<i64>(&mut c, &[b"INCR", b"max"]).await);
    assert!(e.contains("overflow"), "{e}");
    let e = err_text(q::<i64>(&mut c, &[b"INCR", key]).await);
    assert!(e.contains("not an integer"), "{e}");
    let e = err_text(q::<i64>(&mut c, &[b"INCRBY", b"n", b"1.5"]).await);
    assert!(e.contains("not an integer"), "{e}");

    // Errors with Redis's text.
    let e = err_text(q::<Value>(&mut c, &[b"LPUSH", b"list", b"x"]).await);
    assert!(e.contains("unknown command 'LPUSH'"), "{e}");
    let e = err_text(q::<Value>(&mut c, &[b"GET"]).await);
    assert!(e.contains("wrong number of arguments for 'get'"), "{e}");
    let e = err_text(q::<Value>(&mut c, &[b"SET", b"k", b"v", b"EX", b"0"]).await);
    assert!(e.contains("invalid expire time in 'set'"), "{e}");
    let e = err_text(q::<Value>(&mut c, &[b"SET", b"k", b"v", b"NX", b"XX"]).await);
    assert!(e.contains("syntax error"), "{e}");
    let e = err_text(q::<Value>(&mut c, &[b"SETEX", b"k", b"-5", b"v"]).await);
    assert!(e.contains("invalid expire time in 'setex'"), "{e}");
    let e = err_text(q::<Value>(&mut c, &[b"SELECT", b"1"]).await);
    assert!(e.contains("DB index is out of range"), "{e}");
    let big = vec![b'x'; 70 << 10];
    let e = err_text(q::<Value>(&mut c, &[b"SET", &big, b"v"]).await);
    assert!(e.contains("key"), "a key over the limit is refused: {e}");

    // Connection and server commands tools use.
    let _: String = q(&mut c, &[b"SELECT", b"0"]).await.expect("select 0");
    let _: String = q(&mut c, &[b"CLIENT", b"SETNAME", b"tester"])
        .await
        .expect("setname");
    let name: String = q(&mut c, &[b"CLIENT", b"GETNAME"]).await.expect("getname");
    assert_eq!(name, "tester");
    let cfg: Vec<String> = q(&mut c, &[b"CONFIG", b"GET", b"save"])
        .await
        .expect("config");
    assert_eq!(cfg, vec!["save".to_string(), String::new()]);
    let policy: Vec<String> = q(&mut c, &[b"CONFIG", b"GET", b"maxmemory-policy"])
        .await
        .expect("config");
    assert_eq!(
        policy,
        vec!["maxmemory-policy", "allkeys-sieve"],
        "as INFO says"
    );
    let info: String = q(&mut c, &[b"INFO"]).await.expect("info");
    assert!(
        info.contains("redis_version:")
            && info.contains("db0:keys=")
            && info.contains("used_memory_rss:")
            && info.contains("maxmemory_policy:allkeys-sieve"),
        "{info}"
    );
    let size: i64 = q(&mut c, &[b"DBSIZE"]).await.expect("dbsize");
    assert!(size >= 3, "{size}");
    let count: i64 = q(&mut c, &[b"COMMAND", b"COUNT"])
        .await
        .expect("command count");
    assert!(count >= 30, "{count}");
    let hello: Value = q(&mut c, &[b"HELLO", b"2"]).await.expect("hello");
    assert!(
        matches!(hello, Value::Array(ref a) if a.len() == 14),
        "{hello:?}"
    );
    let e = err_text(q::<Value>(&mut c, &[b"HELLO", b"4"]).await);
    assert!(e.contains("NOPROTO"), "{e}");
    let t: String = q(&mut c, &[b"TYPE", b"n"]).await.expect("type");
    assert_eq!(t, "string");
    let t: String = q(&mut c, &[b"TYPE", b"nope"]).await.expect("type");
    assert_eq!(t, "none");
}

#[tokio::test]
async fn multi_exec_runs_the_queue_in_order_and_aborts_on_a_bad_command() {
    let node = resp_node(&[]);
    let mut c = connect(node.resp.expect("resp address")).await;
    // redis-rs's atomic pipeline is MULTI ... EXEC.
    let (v, n, ttl): (String, i64, i64) = redis::pipe()
        .atomic()
        .cmd("SET")
        .arg("t")
        .arg(5)
        .ignore()
        .cmd("INCR")
        .arg("t")
        .ignore()
        .cmd("GET")
        .arg("t")
        .cmd("INCRBY")
        .arg("t")
        .arg(10)
        .cmd("TTL")
        .arg("t")
        .query_async(&mut c)
        .await
        .expect("transaction");
    assert_eq!((v.as_str(), n, ttl), ("6", 16, -1));
    let addr = node.resp.expect("resp address");
    // A command refused while queueing aborts EXEC; nothing queued ran.
    let (out, _) = raw(
        addr,
        b"MULTI\r\nSET a 1\r\nNOPE\r\nEXEC\r\nGET a\r\nEXEC\r\nDISCARD\r\nWATCH a\r\nQUIT\r\n",
    );
    let text = String::from_utf8_lossy(&out);
    let lines: Vec<&str> = text.split("\r\n").collect();
    assert_eq!(lines[0], "+OK");
    assert_eq!(lines[1], "+QUEUED");
    assert!(
        lines[2].starts_with("-ERR unknown command 'NOPE'"),
        "{text}"
    );
    assert!(lines[3].starts_with("-EXECABORT"), "{text}");
    assert_eq!(lines[4], "$-1", "the queued SET did not run: {text}");
    assert_eq!(lines[5], "-ERR EXEC without MULTI");
    assert_eq!(lines[6], "-ERR DISCARD without MULTI");
    assert!(
        lines[7].starts_with("-ERR WATCH is not supported"),
        "{text}"
    );
}

#[test]
fn hello_3_switches_to_resp3() {
    let node = resp_node(&[]);
    let addr = node.resp.expect("resp address");
    let (out, _) = raw(
        addr,
        b"HELLO 3\r\nGET nope\r\nMGET nope\r\nCONFIG GET databases\r\nHELLO 2\r\nGET nope\r\nQUIT\r\n",
    );
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("%7\r\n$6\r\nserver\r\n"), "{text}");
    assert!(text.contains("$5\r\nproto\r\n:3\r\n"), "{text}");
    let (_, after_hello) = text
        .split_once("$7\r\nmodules\r\n*0\r\n")
        .expect("hello ends");
    assert!(
        after_hello.starts_with("_\r\n*1\r\n_\r\n%1\r\n$9\r\ndatabases\r\n$1\r\n1\r\n*14\r\n"),
        "RESP3 nulls and maps, then RESP2 again: {after_hello}"
    );
    assert!(after_hello.ends_with("$-1\r\n+OK\r\n"), "{after_hello}");
}

#[tokio::test]
async fn pipelines_get_every_answer_in_order() {
    pipelines_in_order(&[]).await;
}

/// The same on a node that serves everything from one thread (the current-thread runtime
/// it picks when it has one CPU).
#[tokio::test]
async fn pipelines_get_every_answer_in_order_on_one_thread() {
    pipelines_in_order(&["--worker-threads", "1"]).await;
}

async fn pipelines_in_order(extra: &[&str]) {
    let node = resp_node(extra);
    let mut c = connect(node.resp.expect("resp address")).await;
    let mut pipe = redis::pipe();
    for i in 0..2000 {
        pipe.cmd("SET").arg(format!("key:{i}")).arg(i).ignore();
        pipe.cmd("INCR").arg("counter");
    }
    let counts: Vec<i64> = pipe.query_async(&mut c).await.expect("pipeline");
    assert_eq!(counts, (1..=2000).collect::<Vec<i64>>());
    let mut pipe = redis::pipe();
    for i in 0..2000 {
        pipe.cmd("GET").arg(format!("key:{i}"));
    }
    let values: Vec<i64> = pipe.query_async(&mut c).await.expect("pipeline");
    assert_eq!(values, (0..2000).collect::<Vec<i64>>());
    // An MGET of more keys than one batch holds (the node's --max-batch is 1024).
    let keys: Vec<String> = (0..3000).map(|i| format!("key:{}", i % 2000)).collect();
    let got: Vec<Option<i64>> = cmd("MGET")
        .arg(&keys)
        .query_async(&mut c)
        .await
        .expect("mget");
    assert_eq!(got.len(), 3000);
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, v)| *v == Some((i % 2000) as i64))
    );
}

#[test]
fn protocol_abuse_gets_an_error_and_a_closed_connection() {
    let node = resp_node(&["--max-value-size", "1KiB"]);
    let addr = node.resp.expect("resp address");
    // Valid commands before the bad one are answered; then the error, then the close.
    let (out, closed) = raw(addr, b"*1\r\n$4\r\nPING\r\n*x\r\n*1\r\n$4\r\nPING\r\n");
    assert_eq!(
        out,
        b"+PONG\r\n-ERR Protocol error: invalid multibulk length\r\n"
    );
    assert!(closed);
    // A bulk longer than any key or value may be is refused from its header, before any
    // of it is read.
    let (out, closed) = raw(addr, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$999999999\r\n");
    assert_eq!(out, b"-ERR Protocol error: invalid bulk length\r\n");
    assert!(closed);
    let (out, closed) = raw(addr, &[b'a'; 70 << 10]);
    assert_eq!(out, b"-ERR Protocol error: too big inline request\r\n");
    assert!(closed);
    // Inline commands work (telnet), QUIT closes.
    let (out, closed) = raw(
        addr,
        b"SET greeting \"hello world\"\r\nGET greeting\r\nQUIT\r\n",
    );
    assert_eq!(out, b"+OK\r\n$11\r\nhello world\r\n+OK\r\n");
    assert!(closed);
    // The node is fine afterwards.
    let (out, _) = raw(addr, b"PING\r\nQUIT\r\n");
    assert_eq!(out, b"+PONG\r\n+OK\r\n");
}

#[tokio::test]
async fn tokens_guard_the_resp_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("tokens");
    let line = |name: &str, role: &str, token: &str| {
        format!("{name} {role} {}\n", cache_rpc::auth::hash_token(token))
    };
    std::fs::write(
        &file,
        line("reader", "read", "r-secret") + &line("writer", "write", "w-secret"),
    )
    .expect("write tokens");
    let node = resp_node(&["--auth-file", file.to_str().expect("utf-8")]);
    let mut c = connect(node.resp.expect("resp address")).await;
    let e = err_text(q::<Value>(&mut c, &[b"GET", b"k"]).await);
    assert!(e.starts_with("NOAUTH"), "{e}");
    let e = err_text(q::<Value>(&mut c, &[b"AUTH", b"wrong"]).await);
    assert!(e.starts_with("WRONGPASS"), "{e}");
    let _: String = q(&mut c, &[b"AUTH", b"r-secret"]).await.expect("auth");
    let miss: Option<String> = q(&mut c, &[b"GET", b"k"]).await.expect("a reader reads");
    assert_eq!(miss, None);
    let e = err_text(q::<Value>(&mut c, &[b"SET", b"k", b"v"]).await);
    assert!(e.starts_with("NOPERM"), "{e}");
    let e = err_text(q::<Value>(&mut c, &[b"AUTH", b"someone", b"w-secret"]).await);
    assert!(
        e.starts_with("WRONGPASS"),
        "a user name must match the token's: {e}"
    );
    let _: String = q(&mut c, &[b"AUTH", b"writer", b"w-secret"])
        .await
        .expect("auth");
    let _: String = q(&mut c, &[b"SET", b"k", b"v"])
        .await
        .expect("a writer writes");
    // A URL with the token as password authenticates on connect.
    let client = redis::Client::open(format!(
        "redis://default:w-secret@{}/",
        node.resp.expect("resp address")
    ))
    .expect("url");
    let mut c2 = client
        .get_multiplexed_async_connection()
        .await
        .expect("connects with AUTH");
    let v: String = q(&mut c2, &[b"GET", b"k"]).await.expect("get");
    assert_eq!(v, "v");
}

#[tokio::test]
async fn any_node_serves_any_key_and_counters_count_once() {
    let cluster = Cluster::start(
        3,
        &[
            "--resp-listen",
            "127.0.0.1:0",
            "--replication-factor",
            "3",
            "--write-consistency",
            "quorum",
        ],
    );
    let mut conns = Vec::new();
    for n in &cluster.nodes {
        conns.push(connect(n.resp.expect("resp address")).await);
    }
    // Written through one node, read through every other.
    for i in 0..50 {
        let _: String = q(
            &mut conns[i % 3],
            &[b"SET", format!("k{i}").as_bytes(), b"v"],
        )
        .await
        .expect("set");
    }
    for i in 0..50 {
        for c in conns.iter_mut() {
            let v: Option<String> = q(c, &[b"GET", format!("k{i}").as_bytes()])
                .await
                .expect("get");
            assert_eq!(v.as_deref(), Some("v"), "k{i}");
        }
    }
    // Increments through all three nodes at once: each counted exactly once.
    let tasks: Vec<_> = conns
        .iter()
        .cloned()
        .map(|mut c| {
            tokio::spawn(async move {
                for _ in 0..100 {
                    let _: i64 = q(&mut c, &[b"INCR", b"shared"]).await.expect("incr");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    for c in conns.iter_mut() {
        let total: i64 = q(c, &[b"GET", b"shared"]).await.expect("get");
        assert_eq!(total, 300);
    }
}

#[tokio::test]
async fn slowlog_scan_and_flushall_work_for_redis_tools() {
    // Threshold 0: every request is slow, so the log's contents are exact.
    let node = resp_node(&["--slowlog-threshold", "0s", "--slowlog-max-len", "5"]);
    let mut c = connect(node.resp.expect("resp address")).await;
    for i in 0..7 {
        let () = q(&mut c, &[b"SET", format!("user:{i}").as_bytes(), b"v"])
            .await
            .expect("set");
    }
    let () = q(&mut c, &[b"SET", b"order:1", b"v"]).await.expect("set");
    // Each command's latency as the connection saw it: read to reply written.
    let (_, metrics) = node.http_get("/metrics").expect("metrics");
    let want = "cache_transport_request_duration_seconds_count{transport=\"resp\",op=\"set\"} 8";
    assert!(metrics.lines().any(|l| l == want), "{metrics}");
    assert_eq!(
        q::<i64>(&mut c, &[b"SLOWLOG", b"LEN"]).await.expect("len"),
        5
    );
    let entries: Vec<Value> = q(&mut c, &[b"SLOWLOG", b"GET", b"2"]).await.expect("get");
    assert_eq!(entries.len(), 2);
    let Value::Array(newest) = &entries[0] else {
        panic!("an entry is an array: {entries:?}")
    };
    assert_eq!(
        newest.len(),
        6,
        "id, time, duration, args, addr, name: {newest:?}"
    );
    assert_eq!(newest[0], Value::Int(7), "ids count every slow request");
    assert_eq!(
        newest[3],
        Value::Array(vec![
            Value::BulkString(b"set".to_vec()),
            Value::BulkString(b"order:1".to_vec())
        ])
    );
    let all: Vec<Value> = q(&mut c, &[b"SLOWLOG", b"GET", b"-1"]).await.expect("all");
    assert_eq!(all.len(), 5);
    let () = q(&mut c, &[b"SLOWLOG", b"RESET"]).await.expect("reset");
    assert_eq!(
        q::<i64>(&mut c, &[b"SLOWLOG", b"LEN"]).await.expect("len"),
        0
    );
    assert!(err_text(q::<Value>(&mut c, &[b"SLOWLOG", b"NOPE"]).await).contains("SLOWLOG HELP"));

    // SCAN: the cursor walks to 0 and MATCH filters.
    let (mut cursor, mut keys) = ("0".to_string(), Vec::<Vec<u8>>::new());
    loop {
        let (next, batch): (String, Vec<Vec<u8>>) = q(
            &mut c,
            &[
                b"SCAN",
                cursor.as_bytes(),
                b"MATCH",
                b"user:*",
                b"COUNT",
                b"3",
            ],
        )
        .await
        .expect("scan");
        keys.extend(batch);
        if next == "0" {
            break;
        }
        cursor = next;
    }
    keys.sort();
    let want: Vec<Vec<u8>> = (0..7).map(|i| format!("user:{i}").into_bytes()).collect();
    assert_eq!(keys, want);
    assert!(err_text(q::<Value>(&mut c, &[b"SCAN", b"nope"]).await).contains("invalid cursor"));
    let (_, none): (String, Vec<Vec<u8>>) = q(
        &mut c,
        &[b"SCAN", b"0", b"TYPE", b"hash", b"COUNT", b"1000"],
    )
    .await
    .expect("scan by type");
    assert!(none.is_empty(), "every key is a string");

    // KEYS: this node's matching keys in one reply.
    let mut users: Vec<Vec<u8>> = q(&mut c, &[b"KEYS", b"user:*"]).await.expect("keys");
    users.sort();
    assert_eq!(users, want);
    let everything: Vec<Vec<u8>> = q(&mut c, &[b"KEYS", b"*"]).await.expect("keys *");
    assert_eq!(everything.len(), 8);
    let nothing: Vec<Vec<u8>> = q(&mut c, &[b"KEYS", b"nope:*"]).await.expect("no match");
    assert!(nothing.is_empty());
    assert!(err_text(q::<Value>(&mut c, &[b"KEYS"]).await).contains("wrong number of arguments"));

    // FLUSHALL empties the node.
    let () = q(&mut c, &[b"FLUSHALL"]).await.expect("flushall");
    assert_eq!(q::<i64>(&mut c, &[b"DBSIZE"]).await.expect("dbsize"), 0);
    assert_eq!(
        q::<Option<Vec<u8>>>(&mut c, &[b"GET", b"user:1"])
            .await
            .expect("get"),
        None
    );
    assert!(err_text(q::<Value>(&mut c, &[b"FLUSHALL", b"NOW"]).await).contains("syntax"));

    // The gRPC side sees the same log, and the CLI prints it.
    let out = std::process::Command::new(cache_testkit::cli_binary())
        .args(["--addr", &node.addr(), "--json", "slowlog", "--count", "3"])
        .output()
        .expect("cache-cli");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let entries = v["members"][0]["entries"].as_array().expect("entries");
    // Since the reset: the GET after the flush (SCAN and FLUSHALL run on this node alone
    // and are not requests of the core).
    assert_eq!(entries.len(), 1, "{v}");
    assert_eq!(v["members"][0]["threshold_us"], 0);
    assert_eq!(entries[0]["op"], "get");
    assert_eq!(entries[0]["result"], "miss");
    assert_eq!(entries[0]["key"], "user:1");
    assert_eq!(entries[0]["via"], "resp");

    // STRLEN: a value's length, 0 for a missing key.
    let () = q(&mut c, &[b"SET", b"order:1", b"four"])
        .await
        .expect("set");
    assert_eq!(
        q::<i64>(&mut c, &[b"STRLEN", b"order:1"])
            .await
            .expect("strlen"),
        4
    );
    assert_eq!(
        q::<i64>(&mut c, &[b"STRLEN", b"missing"])
            .await
            .expect("strlen"),
        0
    );
}

/// `FLUSHALL` on 50 000 keys leaves none: the flush's own deletes give pages back and move
/// entries across its scan's cursor (before the scan was complete, 35-70 keys stayed live).
#[tokio::test]
async fn flushall_of_fifty_thousand_keys_leaves_none() {
    let node = resp_node(&[]);
    let mut c = connect(node.resp.expect("resp address")).await;
    for chunk in 0..50 {
        let mut mset = cmd("MSET");
        for i in 0..1_000 {
            mset.arg(format!("key:{chunk}:{i}")).arg("0123456789abcdef");
        }
        let () = mset.query_async(&mut c).await.expect("mset");
    }
    assert_eq!(
        q::<i64>(&mut c, &[b"DBSIZE"]).await.expect("dbsize"),
        50_000
    );
    let () = q(&mut c, &[b"FLUSHALL"]).await.expect("flushall");
    let left: Vec<Vec<u8>> = q(&mut c, &[b"KEYS", b"*"]).await.expect("keys");
    assert!(left.is_empty(), "{} keys left after FLUSHALL", left.len());
    assert_eq!(q::<i64>(&mut c, &[b"DBSIZE"]).await.expect("dbsize"), 0);
}
