//! TLS on the client listeners with a real node and certificates made for the test (a
//! test CA signing the node's certificate for `localhost` and `127.0.0.1`): the SDK and the
//! CLI connect with the CA; a plaintext client and a client trusting another CA do not;
//! RESP works over TLS; with `--tls-client-ca` a client without a certificate is refused;
//! SIGHUP swaps the certificate for new connections; protected mode accepts TLS.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use cache_client::{Client, Tls};
use cache_testkit::{NodeProcess, node_binary};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A CA and what it signs.
struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let pem = params.self_signed(&key).expect("self-signed").pem();
    Ca { params, key, pem }
}

/// A certificate for `names` signed by `ca`: (cert PEM, key PEM).
fn leaf(ca: &Ca, names: &[&str]) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let params = CertificateParams::new(names.iter().map(|n| (*n).to_string()).collect::<Vec<_>>())
        .expect("params");
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    let cert = params.signed_by(&key, &issuer).expect("signed");
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

/// A node certificate for `names` signed by `ca`, written to `dir` as `stem.crt` and
/// `stem.key`.
fn cert_files(dir: &Path, ca: &Ca, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
    let (cert, key) = leaf(ca, names);
    (
        write(dir, &format!("{stem}.crt"), &cert),
        write(dir, &format!("{stem}.key"), &key),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

async fn tls_client(node: &NodeProcess, ca_pem: &str) -> Result<Client, cache_client::Error> {
    let c = Client::builder()
        .timeout(Duration::from_secs(3))
        .retries(0)
        .tls(Tls::new().ca_pem(ca_pem.as_bytes()))
        .connect(node.addr())
        .await?;
    c.set("probe", "1").await?;
    Ok(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_connect_with_the_cluster_ca_and_the_certificate_reloads_on_sighup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = ca("first CA");
    let (cert_path, key_path) = cert_files(dir.path(), &first, "node", &["localhost", "127.0.0.1"]);
    let node = NodeProcess::start(&[
        "--resp-listen",
        "127.0.0.1:0",
        "--tls-cert",
        s(&cert_path),
        "--tls-key",
        s(&key_path),
    ]);

    // The SDK with the CA: served (over the pipelined stream, then unary).
    let c = tls_client(&node, &first.pem).await.expect("TLS client");
    assert_eq!(
        c.get("probe").await.expect("get").as_deref(),
        Some(&b"1"[..])
    );
    // A plaintext client and a client trusting another CA are not.
    let plain = Client::builder()
        .timeout(Duration::from_secs(2))
        .retries(0)
        .connect(node.addr())
        .await;
    assert!(
        match plain {
            Err(_) => true,
            Ok(p) => p.get("probe").await.is_err(),
        },
        "a plaintext client was served"
    );
    let other = ca("other CA");
    assert!(tls_client(&node, &other.pem).await.is_err());

    // The CLI with --tls-ca.
    let ca_path = write(dir.path(), "ca.crt", &first.pem);
    let out = Command::new(cache_testkit::cli_binary())
        .args([
            "--addr",
            &node.addr(),
            "--tls-ca",
            s(&ca_path),
            "get",
            "probe",
        ])
        .output()
        .expect("cache-cli");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"1");

    // RESP over TLS.
    let connector = connector(&first.pem);
    let tcp = tokio::net::TcpStream::connect(node.resp.expect("resp address"))
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = connector
        .connect(name, tcp)
        .await
        .expect("RESP TLS handshake");
    tls.write_all(b"GET probe\r\nQUIT\r\n").await.expect("send");
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.ok();
    assert_eq!(out, b"$1\r\n1\r\n+OK\r\n");

    // SIGHUP with a certificate from another CA: new connections get it.
    let (cert2, key2) = leaf(&other, &["localhost", "127.0.0.1"]);
    std::fs::write(&cert_path, cert2).expect("write");
    std::fs::write(&key_path, key2).expect("write");
    node.signal("HUP");
    let until = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if tls_client(&node, &other.pem).await.is_ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "the new certificate was not served; log:\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        tls_client(&node, &first.pem).await.is_err(),
        "the old CA no longer works"
    );
    assert!(
        node.log().contains("TLS certificate reloaded"),
        "{}",
        node.log()
    );
}

/// A rustls client trusting only `ca_pem`.
fn connector(ca_pem: &str) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile_certs(ca_pem) {
        roots.add(cert).expect("root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

fn rustls_pemfile_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("PEM")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_ca_makes_client_certificates_mandatory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server_ca = ca("server CA");
    let client_ca = ca("client CA");
    let (cert, key) = leaf(&server_ca, &["localhost", "127.0.0.1"]);
    let node = NodeProcess::start(&[
        "--tls-cert",
        s(&write(dir.path(), "node.crt", &cert)),
        "--tls-key",
        s(&write(dir.path(), "node.key", &key)),
        "--tls-client-ca",
        s(&write(dir.path(), "clients.crt", &client_ca.pem)),
    ]);
    assert!(
        tls_client(&node, &server_ca.pem).await.is_err(),
        "no client certificate"
    );
    let (ccert, ckey) = leaf(&client_ca, &["checkout-service"]);
    let c = Client::builder()
        .timeout(Duration::from_secs(3))
        .retries(0)
        .tls(
            Tls::new()
                .ca_pem(server_ca.pem.as_bytes())
                .identity_pem(ccert.as_bytes(), ckey.as_bytes()),
        )
        .connect(node.addr())
        .await
        .expect("connect");
    c.set("k", "v")
        .await
        .expect("a client with a certificate is served");
}

#[test]
fn protected_mode_accepts_tls_and_bad_files_are_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = ca("CA");
    let (cert_path, key_path) = cert_files(dir.path(), &c, "node", &["localhost"]);
    // Beyond loopback with TLS (and the peer listener on loopback): starts.
    let node = NodeProcess::spawn(&[
        "--admin-listen",
        "127.0.0.1:0",
        "--listen",
        "0.0.0.0:0",
        "--advertise",
        "127.0.0.1",
        "--peer-listen",
        "127.0.0.1:0",
        "--tls-cert",
        s(&cert_path),
        "--tls-key",
        s(&key_path),
    ])
    .expect("a node beyond loopback with TLS starts");
    drop(node);
    // A key that is not PEM: refused at start, naming the file.
    let bad = write(dir.path(), "bad.key", "not a key");
    let out = Command::new(node_binary())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--tls-cert",
            s(&cert_path),
            "--tls-key",
            s(&bad),
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.key"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_replicate_over_mutual_tls_and_strangers_are_refused() {
    use cache_proto::peer::v1::{
        Mutation, Put, ReplicateRequest, mutation, peer_client::PeerClient,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster_ca = ca("cluster CA");
    let ca_path = write(dir.path(), "cluster-ca.crt", &cluster_ca.pem);
    let mut files = Vec::new();
    for i in 0..3 {
        let (cert, key) = leaf(&cluster_ca, &["127.0.0.1", "localhost"]);
        files.push((
            write(dir.path(), &format!("node-{i}.crt"), &cert),
            write(dir.path(), &format!("node-{i}.key"), &key),
        ));
    }
    let cluster = cache_testkit::Cluster::start_each(3, |i| {
        vec![
            "--replication-factor".into(),
            "3".into(),
            "--write-consistency".into(),
            "all".into(),
            "--peer-tls-cert".into(),
            s(&files[i].0).into(),
            "--peer-tls-key".into(),
            s(&files[i].1).into(),
            "--peer-tls-ca".into(),
            s(&ca_path).into(),
        ]
    });
    // ALL writes through each node: every member applied every write over mutual TLS.
    for (i, node) in cluster.nodes.iter().enumerate() {
        let c = Client::connect(node.addr()).await.expect("connect");
        for k in 0..20 {
            c.set(format!("k{i}-{k}"), "v").await.expect("an ALL write");
        }
    }
    let c = Client::connect(cluster.nodes[2].addr())
        .await
        .expect("connect");
    assert_eq!(
        c.get("k0-19").await.expect("get").as_deref(),
        Some(&b"v"[..])
    );

    // A stranger in plaintext, or with a certificate from another CA, cannot replicate.
    let forged = ReplicateRequest {
        from: "node-1".into(),
        ring_fingerprint: 0,
        mutations: vec![Mutation {
            key: "k0-0".into(),
            // The newest version a member could issue now (within the drift limit): applied
            // if the call got through.
            version: (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("after 1970")
                .as_millis() as u64)
                << 16
                | 0xffff,
            op: Some(mutation::Op::Put(Put {
                value: "forged".into(),
                expires_at_ms: None,
            })),
        }],
    };
    let peer = cluster.nodes[0].peer_addr();
    if let Ok(mut plain) = PeerClient::connect(format!("http://{peer}")).await {
        assert!(
            plain.replicate(forged.clone()).await.is_err(),
            "plaintext peer call served"
        );
    }
    let stranger_ca = ca("stranger CA");
    let (scert, skey) = leaf(&stranger_ca, &["127.0.0.1"]);
    let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{peer}"))
        .expect("url")
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&cluster_ca.pem))
                .identity(tonic::transport::Identity::from_pem(scert, skey)),
        )
        .expect("tls config");
    if let Ok(channel) = endpoint.connect().await {
        let mut stranger = PeerClient::new(channel);
        assert!(
            stranger.replicate(forged).await.is_err(),
            "a stranger's certificate was accepted"
        );
    }
    assert_eq!(
        c.get("k0-0").await.expect("get").as_deref(),
        Some(&b"v"[..])
    );
}

/// Kills the child when dropped, even if the test fails.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_can_serve_https() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("tempdir");
    let c = ca("CA");
    let (cert, key) = leaf(&c, &["localhost", "127.0.0.1"]);
    let mut child = Command::new(node_binary())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--tls-cert",
            s(&write(dir.path(), "node.crt", &cert)),
            "--tls-key",
            s(&write(dir.path(), "node.key", &key)),
            "--admin-tls",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let _guard = Kill(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("startup line");
    let admin: std::net::SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("admin="))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no admin= in {line:?}"));
    let connector = connector(&c.pem);
    // Poll until it answers (the node may still be starting).
    let until = std::time::Instant::now() + Duration::from_secs(10);
    let body = loop {
        let attempt = async {
            let tcp = tokio::net::TcpStream::connect(admin).await.ok()?;
            let name = rustls::pki_types::ServerName::try_from("localhost").ok()?;
            let mut tls = connector.connect(name, tcp).await.ok()?;
            tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
            let mut out = Vec::new();
            tls.read_to_end(&mut out).await.ok();
            Some(String::from_utf8_lossy(&out).into_owned())
        };
        if let Some(body) = attempt.await.filter(|b| b.starts_with("HTTP/1.1 200")) {
            break body;
        }
        assert!(
            std::time::Instant::now() < until,
            "no https answer on {admin}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    // Plain HTTP gets no answer.
    assert!(cache_testkit::http_get(admin, "/healthz").is_err());
}
