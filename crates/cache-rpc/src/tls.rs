//! TLS for the client-facing listeners (gRPC and RESP), with certificates that reload
//! without a restart.
//!
//! The node terminates TLS itself (rustls with the `ring` provider) in its accept path, so
//! the connection limits of [`crate::conn`] apply before any handshake, a handshake has the
//! listener's handshake deadline, and the certificate can be swapped atomically: every new
//! connection takes the configuration current when it is accepted ([`ServerTls::reload`],
//! called on SIGHUP by the binary); connections already open keep theirs. With a client CA
//! (`--tls-client-ca`) every client must present a certificate it signed (mutual TLS).

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;

use crate::conn::GuardedIo;

/// Where the node's certificate, key and (optionally) the client CA live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates whose signed client certificates are accepted; `None`: clients
    /// are not asked for a certificate.
    pub client_ca: Option<PathBuf>,
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM item.
    #[error("{path}: {detail}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The files do not form a valid configuration (key does not match, ...).
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_error(path: &Path, detail: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

/// The server side: two configurations from the same files — gRPC's, which offers ALPN
/// `h2`, and one without ALPN for RESP and the admin port (HTTP/1) — swappable.
#[derive(Debug)]
pub struct ServerTls {
    files: TlsFiles,
    grpc: ArcSwap<rustls::ServerConfig>,
    no_alpn: ArcSwap<rustls::ServerConfig>,
    /// Bumped by every successful reload (outgoing peer channels are rebuilt on a change).
    generation: std::sync::atomic::AtomicU64,
}

impl ServerTls {
    /// Reads the files and builds the configurations.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let (grpc, no_alpn) = build(&files)?;
        Ok(Self {
            files,
            grpc: ArcSwap::from_pointee(grpc),
            no_alpn: ArcSwap::from_pointee(no_alpn),
            generation: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Reads the files again and, if they form a valid configuration, uses it for every
    /// new connection. On error the old configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let (grpc, no_alpn) = build(&self.files)?;
        self.grpc.store(Arc::new(grpc));
        self.no_alpn.store(Arc::new(no_alpn));
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// How many times the files were reloaded.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The client side of mutual TLS between members (the peer listener): this node's
    /// certificate as its identity, the cluster CA (`client_ca`) as the only trusted root.
    /// Read from the files now, so a channel built after a reload uses the new ones.
    pub fn peer_client_config(&self) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| file_error(p, e));
        let ca = self
            .files
            .client_ca
            .as_deref()
            .ok_or_else(|| TlsError::Config("peer TLS needs the cluster CA".into()))?;
        Ok(tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?))
            .identity(tonic::transport::Identity::from_pem(
                read(&self.files.cert)?,
                read(&self.files.key)?,
            )))
    }

    /// The files it reads.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// An acceptor with the current gRPC configuration.
    pub fn grpc_acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.grpc.load_full())
    }

    /// An acceptor with the current configuration without ALPN (RESP, the admin port).
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.no_alpn.load_full())
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn build(files: &TlsFiles) -> Result<(rustls::ServerConfig, rustls::ServerConfig), TlsError> {
    let chain = certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| file_error(&files.key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certs(path)? {
                roots.add(cert).map_err(|e| file_error(path, e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| file_error(path, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let no_alpn = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(format!("certificate and key: {e}")))?;
    let mut grpc = no_alpn.clone();
    grpc.alpn_protocols = vec![b"h2".to_vec()];
    Ok((grpc, no_alpn))
}

/// A client connection, in the clear or under TLS (what the gRPC server is handed).
pub enum MaybeTls {
    /// Plaintext.
    Plain(GuardedIo),
    /// TLS, handshake done.
    Tls(Box<tokio_rustls::server::TlsStream<GuardedIo>>),
}

impl std::fmt::Debug for MaybeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MaybeTls::Plain(_) => "MaybeTls::Plain",
            MaybeTls::Tls(_) => "MaybeTls::Tls",
        })
    }
}

impl tonic::transport::server::Connected for MaybeTls {
    type ConnectInfo = <GuardedIo as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            MaybeTls::Plain(io) => io.connect_info(),
            MaybeTls::Tls(tls) => tls.get_ref().0.connect_info(),
        }
    }
}

impl AsyncRead for MaybeTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_read(cx, buf),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MaybeTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_write(cx, buf),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_flush(cx),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_shutdown(cx),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(io) => io.is_write_vectored(),
            MaybeTls::Tls(tls) => tls.is_write_vectored(),
        }
    }
}
