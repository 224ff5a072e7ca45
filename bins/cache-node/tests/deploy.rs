//! The deployment files (Kubernetes manifests, compose file, Dockerfile, systemd unit) speak
//! the node's real language: every `CACHE_*` variable and flag they set exists, the ports
//! they declare are the ones the node listens on, the probes answer 200 on a real node, and
//! the memory they reserve covers `--max-memory`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use cache_testkit::NodeProcess;
use yaml_rust2::{Yaml, YamlLoader};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The node's `--help`: its flags and their `CACHE_*` variables.
fn node_help() -> (BTreeSet<String>, BTreeSet<String>) {
    let out = Command::new(env!("CARGO_BIN_EXE_cache-node"))
        .arg("--help")
        .output()
        .expect("cache-node --help");
    let help = String::from_utf8_lossy(&out.stdout).to_string();
    let envs = help
        .split("[env: ")
        .skip(1)
        .filter_map(|s| s.split('=').next())
        .map(str::to_string)
        .collect();
    let flags = help
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| w.trim_end_matches(',').to_string())
        .collect();
    (envs, flags)
}

/// Every `CACHE_*` name used as a key or as an env entry's `name` anywhere in `doc`.
fn cache_vars(doc: &Yaml, out: &mut BTreeSet<String>) {
    match doc {
        Yaml::Hash(h) => {
            for (k, v) in h {
                if let Some(k) = k.as_str().filter(|k| k.starts_with("CACHE_")) {
                    out.insert(k.to_string());
                }
                if k.as_str() == Some("name")
                    && let Some(v) = v.as_str().filter(|v| v.starts_with("CACHE_"))
                {
                    out.insert(v.to_string());
                }
                cache_vars(v, out);
            }
        }
        Yaml::Array(a) => a.iter().for_each(|v| cache_vars(v, out)),
        _ => {}
    }
}

/// Bytes of a Kubernetes quantity (`1536Mi`, `2Gi`) or a node size (`1GiB`).
fn bytes(q: &str) -> u64 {
    let q = q.trim_end_matches('B');
    let (n, unit) = q.split_at(q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len()));
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("quantity {q}"));
    n * match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        other => panic!("unit {other}"),
    }
}

fn env_value<'a>(env: &'a Yaml, name: &str) -> Option<&'a str> {
    env.as_vec()?
        .iter()
        .find(|e| e["name"].as_str() == Some(name))?["value"]
        .as_str()
}

fn port_of(listen: &str) -> i64 {
    listen
        .rsplit(':')
        .next()
        .expect("port")
        .parse()
        .expect("a number")
}

#[test]
fn the_kubernetes_manifests_match_the_node() {
    let (envs, _) = node_help();
    let docs = YamlLoader::load_from_str(&read("deploy/kubernetes/cache-cluster.yaml"))
        .expect("valid YAML");
    let kind = |k: &str| -> Vec<&Yaml> {
        docs.iter()
            .filter(|d| d["kind"].as_str() == Some(k))
            .collect()
    };
    let sts = kind("StatefulSet")[0];
    let pod = &sts["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let env = &container["env"];

    let mut used = BTreeSet::new();
    cache_vars(env, &mut used);
    assert!(used.len() > 5);
    for v in &used {
        assert!(envs.contains(v), "{v} is not a cache-node variable");
    }

    // Ports: each named container port is what the matching listener binds.
    let port = |name: &str| -> i64 {
        container["ports"]
            .as_vec()
            .expect("ports")
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no port {name}"))["containerPort"]
            .as_i64()
            .expect("number")
    };
    for (name, var) in [
        ("grpc", "CACHE_LISTEN"),
        ("peer", "CACHE_PEER_LISTEN"),
        ("admin", "CACHE_ADMIN_LISTEN"),
        ("gossip-udp", "CACHE_GOSSIP_LISTEN"),
        ("gossip-tcp", "CACHE_GOSSIP_LISTEN"),
    ] {
        let listen = env_value(env, var).unwrap_or_else(|| panic!("{var} is set"));
        assert_eq!(port(name), port_of(listen), "{name} vs {var}={listen}");
    }

    // Probes: on the admin port, at paths a real node answers 200.
    let node = NodeProcess::start(&[]);
    for (probe, want) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["port"].as_str(), Some("admin"), "{probe}");
        let path = get["path"].as_str().expect("path");
        assert_eq!(path, want, "{probe}");
        assert_eq!(node.http_get(path).expect(probe).0, 200, "{probe} {path}");
    }

    // Memory: the request and the limit cover the engine's budget and its overhead.
    let max_memory = bytes(env_value(env, "CACHE_MAX_MEMORY").expect("CACHE_MAX_MEMORY"));
    for which in ["requests", "limits"] {
        let mem = bytes(
            container["resources"][which]["memory"]
                .as_str()
                .expect(which),
        );
        assert!(
            mem >= max_memory + max_memory / 4 + (64 << 20),
            "{which} {mem} does not leave room above --max-memory {max_memory}"
        );
    }

    // The gossip seeds are the headless Service's pod names, and it publishes them early.
    let join = env_value(env, "CACHE_JOIN").expect("CACHE_JOIN");
    let replicas = sts["spec"]["replicas"].as_i64().expect("replicas");
    let headless = kind("Service")
        .into_iter()
        .find(|s| s["spec"]["clusterIP"].as_str() == Some("None"))
        .expect("a headless Service");
    let service = headless["metadata"]["name"].as_str().expect("name");
    assert_eq!(sts["spec"]["serviceName"].as_str(), Some(service));
    assert_eq!(
        headless["spec"]["publishNotReadyAddresses"].as_bool(),
        Some(true)
    );
    let set = sts["metadata"]["name"].as_str().expect("name");
    for i in 0..replicas {
        assert!(
            join.contains(&format!("{set}-{i}.{service}:7200")),
            "{join}"
        );
    }
    assert!(env["CACHE_NODE_ID"].is_badvalue());

    // Graceful stop: preStop, then SIGTERM's leave, within the grace period.
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_i64()
        .expect("preStop sleep");
    let grace = pod["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("grace");
    // The node's default shutdown notice + grace (1 s + 10 s).
    assert!(grace >= pre_stop + 11 + 5, "grace {grace}");

    // A disruption budget for the same pods.
    let pdb = kind("PodDisruptionBudget")[0];
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        sts["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(pdb["spec"]["maxUnavailable"].as_i64(), Some(1));
}

#[test]
fn the_compose_file_dockerfile_and_systemd_unit_match_the_node() {
    let (envs, flags) = node_help();
    let compose =
        YamlLoader::load_from_str(&read("deploy/docker/compose.yml")).expect("valid YAML");
    let mut used = BTreeSet::new();
    cache_vars(&compose[0], &mut used);
    assert!(used.contains("CACHE_JOIN") && used.contains("CACHE_ADVERTISE"));
    let dockerfile = read("deploy/docker/Dockerfile");
    let is_var = |w: &str| {
        w.starts_with("CACHE_")
            && w.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    };
    for word in dockerfile.split(|c: char| c.is_whitespace() || c == '=') {
        if is_var(word) {
            used.insert(word.to_string());
        }
    }
    let unit = read("deploy/systemd/cache-node.service");
    let env_file = read("deploy/systemd/cache-node.env");
    for line in env_file.lines().chain(unit.lines()) {
        let line = line.trim_start_matches('#').trim();
        if let Some((name, _)) = line.split_once('=')
            && is_var(name)
        {
            used.insert(name.to_string());
        }
    }
    for v in &used {
        assert!(envs.contains(v), "{v} is not a cache-node variable");
    }
    // The unit's command line uses real flags.
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    for word in exec.split_whitespace().filter(|w| w.starts_with("--")) {
        assert!(flags.contains(word), "{word} is not a cache-node flag");
    }
    // The image's health check is a real subcommand that passes on a live node.
    assert!(
        dockerfile.contains("CMD [\"/usr/local/bin/cache-node\", \"healthcheck\"]"),
        "the image's HEALTHCHECK runs cache-node healthcheck"
    );
    let node = NodeProcess::start(&[]);
    let admin = node
        .log()
        .split_whitespace()
        .find_map(|w| w.strip_prefix("admin="))
        .expect("admin address")
        .to_string();
    let ok = Command::new(env!("CARGO_BIN_EXE_cache-node"))
        .args(["healthcheck", "--admin", &admin])
        .status()
        .expect("healthcheck");
    assert!(ok.success());
    drop(node);
    let down = Command::new(env!("CARGO_BIN_EXE_cache-node"))
        .args(["healthcheck", "--admin", &admin])
        .output()
        .expect("healthcheck");
    assert!(!down.status.success(), "a stopped node is unhealthy");
}
