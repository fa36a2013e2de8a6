//! TLS with rustls (feature `tls`): [`TlsConfig`], given to
//! [`PoolBuilder::tls`](crate::PoolBuilder::tls).
//!
//! The pool connects to resolved IP addresses, but a certificate names a host. So TLS here
//! is a connector *around* the one that opens the byte stream (the pool's TCP connector, or
//! the one given to [`PoolBuilder::connector`](crate::PoolBuilder::connector)): it takes the
//! stream to the address, then runs the TLS handshake against the **target's host name** —
//! the name in `dns:///pool.example.com:443`, not the address it resolved to — or against the
//! [`server_name`](TlsConfig::server_name) override, which a `static:///` list of IPs behind
//! one certificate needs. The same name goes in SNI. Only when the target's host is itself an
//! IP literal and there is no override is the certificate checked against that IP (its IP
//! SANs), as rustls does for an IP server name.
//!
//! ```text
//! Slot ── connect timeout ──▶ TlsConnector ──▶ inner connector (TCP)   ─▶ byte stream
//!                                   └─ handshake: name, SNI, ALPN h2 ─▶ TLS stream
//!                                                                       └▶ frame watcher ▶ h2
//! ```
//!
//! - The handshake is part of the connect attempt, which the pool bounds as a whole with its
//!   connect timeout: a peer that accepts TCP and never answers the ClientHello costs one
//!   timeout, then backoff, like any failed connect.
//! - ALPN offers only `h2`, and a peer that does not select it fails the connect with an
//!   error that says so: gRPC needs HTTP/2, and a server that did not agree to it would only
//!   fail later, less clearly.
//! - The frame watcher (`conn/frames.rs`) wraps what this connector returns, so it reads the
//!   plaintext HTTP/2 frames above TLS (GOAWAY, SETTINGS) exactly as over TCP.
//! - In TLS 1.3 a server refuses a client certificate (or its absence) only after the
//!   client's handshake is done; the stream returned here turns the broken pipe that follows
//!   into an error naming the server's alert (`CertificateRequired`, …).
//! - Trust: the roots the `tls-webpki-roots` (Mozilla's, compiled in) and `tls-native-roots`
//!   (the operating system's, read at `build()`) features bring — both when both are on —
//!   plus the CAs given with [`TlsConfig::ca_certificate`]. A configuration that trusts
//!   nothing is refused by `build()`, since it could never connect.
//! - The crypto provider is rustls's `ring` one, chosen explicitly (no process-wide default
//!   needed; aws-lc-rs would need cmake to build).

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::connector::{BoxedIo, Connect, Destination};
use crate::error::Error;
use crate::BoxFuture;

/// The ALPN protocol id of HTTP/2 over TLS.
const ALPN_H2: &[u8] = b"h2";

/// TLS settings of a pool: trusted roots, client identity (mTLS) and the name certificates
/// are checked against. Give it to [`PoolBuilder::tls`](crate::PoolBuilder::tls).
///
/// The setters never fail: a malformed PEM or server name is kept as a problem that
/// [`PoolBuilder::build`](crate::PoolBuilder::build) reports as an invalid-configuration
/// error naming it.
///
/// ```no_run
/// # async fn run(ca_pem: &[u8]) -> Result<(), tonic_pool::Error> {
/// use tonic_pool::{tls::TlsConfig, Pool};
///
/// // Two IPs behind one certificate for `api.internal`, signed by a private CA.
/// let pool = Pool::builder("static:///10.0.0.5:443,10.0.0.6:443")
///     .tls(TlsConfig::new().ca_certificate(ca_pem).server_name("api.internal"))
///     .build()?;
/// # Ok(()) }
/// ```
pub struct TlsConfig {
    feature_roots: bool,
    ca_roots: Vec<CertificateDer<'static>>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    server_name: Option<ServerName<'static>>,
    /// The first setter input that could not be taken; reported by `build()`.
    invalid: Option<String>,
}

impl TlsConfig {
    /// Trusts the roots of the enabled roots features (`tls-webpki-roots`,
    /// `tls-native-roots`; none without them), no client identity, and checks certificates
    /// against the target's host name.
    pub fn new() -> Self {
        Self {
            feature_roots: true,
            ca_roots: Vec::new(),
            identity: None,
            server_name: None,
            invalid: None,
        }
    }

    /// Also trusts the CA certificates in `pem` (one or more `CERTIFICATE` blocks), e.g. a
    /// private CA. May be called more than once.
    pub fn ca_certificate(mut self, pem: impl AsRef<[u8]>) -> Self {
        match parse_certificates(pem.as_ref()) {
            Ok(certs) => self.ca_roots.extend(certs),
            Err(problem) => self.note(format!("ca_certificate: {problem}")),
        }
        self
    }

    /// Whether to trust the roots the `tls-webpki-roots` and `tls-native-roots` features
    /// bring. Turn it off to trust only the CAs given with
    /// [`ca_certificate`](Self::ca_certificate), whatever features another crate in the
    /// build has turned on.
    ///
    /// Defaults to `true`.
    pub fn feature_roots(mut self, enabled: bool) -> Self {
        self.feature_roots = enabled;
        self
    }

    /// The client certificate chain (leaf first) and its private key, both PEM, that the
    /// pool presents to servers that ask for one (mutual TLS). The key may be PKCS#8, PKCS#1
    /// or SEC1.
    pub fn identity(mut self, cert_chain_pem: impl AsRef<[u8]>, key_pem: impl AsRef<[u8]>) -> Self {
        let chain = match parse_certificates(cert_chain_pem.as_ref()) {
            Ok(chain) => chain,
            Err(problem) => {
                self.note(format!("identity certificate chain: {problem}"));
                return self;
            }
        };
        match PrivateKeyDer::from_pem_slice(key_pem.as_ref()) {
            Ok(key) => self.identity = Some((chain, key)),
            Err(e) => self.note(format!(
                "identity private key: no private key in the PEM ({e})"
            )),
        }
        self
    }

    /// Checks every server's certificate against `name` (and sends it in SNI) instead of the
    /// target's host. Needed when the target lists IPs (`static:///`) of servers that share a
    /// certificate for a name. A name that is an IP literal checks the certificate's IP SANs.
    ///
    /// Unless [`PoolBuilder::origin`](crate::PoolBuilder::origin) says otherwise, requests
    /// then carry `name:port` as their `:authority`, as grpc-go takes the authority from its
    /// credentials' server name.
    ///
    /// Defaults to the target's host.
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        match ServerName::try_from(name.clone()) {
            Ok(server_name) => self.server_name = Some(server_name),
            Err(_) => self.note(format!(
                "server_name {name:?} is neither a DNS name nor an IP address"
            )),
        }
        self
    }

    /// The server name override, if one was set.
    pub(crate) fn server_name_override(&self) -> Option<&ServerName<'static>> {
        self.server_name.as_ref()
    }

    fn note(&mut self, problem: String) {
        self.invalid.get_or_insert(problem);
    }

    /// The rustls client configuration: the roots, the identity, ALPN `h2`. Errors name the
    /// problem: an input a setter could not take, an unusable key, or no root at all.
    fn client_config(self) -> Result<ClientConfig, Error> {
        if let Some(problem) = self.invalid {
            return Err(Error::invalid_config(format!("tls: {problem}")));
        }
        let mut roots = RootCertStore::empty();
        let notes = if self.feature_roots {
            add_feature_roots(&mut roots)
        } else {
            Vec::new()
        };
        for ca in self.ca_roots {
            roots.add(ca).map_err(|e| {
                Error::invalid_config(format!("tls: ca_certificate is not a usable CA: {e}"))
                    .with_source(e)
            })?;
        }
        if roots.is_empty() {
            let mut message = String::from(
                "tls: no trusted root certificates: give TlsConfig::ca_certificate, or enable \
                 the tonic-pool feature `tls-webpki-roots` or `tls-native-roots`",
            );
            for note in notes {
                message.push_str("; ");
                message.push_str(&note);
            }
            return Err(Error::invalid_config(message));
        }
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| {
                    Error::invalid_config(format!("tls: rustls configuration: {e}")).with_source(e)
                })?
                .with_root_certificates(roots);
        let mut config = match self.identity {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(|e| {
                Error::invalid_config(format!("tls: identity is not usable: {e}")).with_source(e)
            })?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(config)
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl Clone for TlsConfig {
    fn clone(&self) -> Self {
        Self {
            feature_roots: self.feature_roots,
            ca_roots: self.ca_roots.clone(),
            identity: self
                .identity
                .as_ref()
                .map(|(chain, key)| (chain.clone(), key.clone_key())),
            server_name: self.server_name.clone(),
            invalid: self.invalid.clone(),
        }
    }
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("TlsConfig")
            .field("feature_roots", &self.feature_roots)
            .field("ca_roots", &self.ca_roots.len())
            .field("identity", &self.identity.is_some())
            .field("server_name", &self.server_name)
            .field("invalid", &self.invalid)
            .finish()
    }
}

/// The certificates of `pem`; at least one.
fn parse_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("malformed PEM ({e})"))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block in the PEM".to_owned());
    }
    Ok(certs)
}

/// Adds the roots of the enabled roots features; returns why one brought none.
fn add_feature_roots(roots: &mut RootCertStore) -> Vec<String> {
    #[allow(unused_mut)] // Only tls-native-roots has something to say.
    let mut notes = Vec::new();
    #[cfg(feature = "tls-webpki-roots")]
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    #[cfg(feature = "tls-native-roots")]
    {
        let native = rustls_native_certs::load_native_certs();
        let (added, _ignored) = roots.add_parsable_certificates(native.certs);
        if !native.errors.is_empty() {
            tracing::debug!(errors = ?native.errors, "some native root certificates could not be loaded");
        }
        if added == 0 {
            let errors: Vec<String> = native.errors.iter().map(|e| e.to_string()).collect();
            notes.push(format!(
                "tls-native-roots found no usable certificate in the system's store ({})",
                if errors.is_empty() {
                    "it is empty".to_owned()
                } else {
                    errors.join("; ")
                }
            ));
        }
    }
    #[cfg(not(any(feature = "tls-webpki-roots", feature = "tls-native-roots")))]
    let _ = roots;
    notes
}

/// The connector `PoolBuilder::tls` puts around the pool's connector: the inner connector's
/// byte stream, then the TLS handshake for the target's host name (or the override), with
/// ALPN `h2` required.
pub(crate) struct TlsConnector {
    inner: Arc<dyn Connect>,
    tls: tokio_rustls::TlsConnector,
    server_name: Option<ServerName<'static>>,
}

impl TlsConnector {
    /// Wraps `inner`; errors if `config` cannot make a client configuration.
    pub(crate) fn new(config: TlsConfig, inner: Arc<dyn Connect>) -> Result<Self, Error> {
        let server_name = config.server_name.clone();
        let client = config.client_config()?;
        Ok(Self {
            inner,
            tls: tokio_rustls::TlsConnector::from(Arc::new(client)),
            server_name,
        })
    }
}

/// The name a connection to `dst` verifies and sends in SNI: the override, else the target's
/// host (without a DNS name's trailing dot, which SNI does not carry).
fn server_name_for(
    dst: &Destination,
    name: Option<&ServerName<'static>>,
) -> io::Result<ServerName<'static>> {
    if let Some(name) = name {
        return Ok(name.clone());
    }
    let host = dst.host.strip_suffix('.').unwrap_or(&dst.host);
    ServerName::try_from(host.to_owned()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("TLS: the target host {host:?} is not a valid server name"),
        )
    })
}

impl Connect for TlsConnector {
    fn connect(&self, dst: &Destination) -> BoxFuture<'static, io::Result<BoxedIo>> {
        let name = server_name_for(dst, self.server_name.as_ref());
        let stream = self.inner.connect(dst);
        let tls = self.tls.clone();
        Box::pin(async move {
            let name = name?;
            let stream = stream.await?;
            let shown = name.to_str().into_owned();
            let stream = tls.connect(name, stream).await.map_err(|e| {
                io::Error::new(e.kind(), format!("TLS handshake for {shown:?}: {e}"))
            })?;
            let alpn = stream.get_ref().1.alpn_protocol();
            if alpn != Some(ALPN_H2) {
                let got = match alpn {
                    Some(p) => format!("selected {:?}", String::from_utf8_lossy(p)),
                    None => "selected no protocol".to_owned(),
                };
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "TLS: the server for {shown:?} did not agree to HTTP/2 in ALPN \
                         (offered \"h2\", {got}); gRPC needs h2"
                    ),
                ));
            }
            Ok(Box::new(AlertAware { stream, lost: None }) as BoxedIo)
        })
    }

    fn supports_tls(&self) -> bool {
        true
    }
}

impl fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConnector")
            .field("inner", &self.inner)
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// The TLS stream the connector returns. In TLS 1.3 the server checks a client certificate
/// (or its absence) only after the client has finished its handshake, and refuses it with an
/// alert and a close: the client learns of it as a failed write (broken pipe, reset) while the
/// alert that says why waits unread. On such a write error this reads what is left, so that
/// the error names the alert ("received fatal alert: CertificateRequired") rather than only
/// the pipe. A lost connection is readable at once (EOF or reset), so the wait for that read
/// is short; the write error is returned as it is when no alert comes.
struct AlertAware<S> {
    stream: tokio_rustls::client::TlsStream<S>,
    /// A write error kept while the read that may explain it is pending.
    lost: Option<io::Error>,
}

/// How many TLS reads an explanation looks through for the alert (data may come before it).
const ALERT_READS: usize = 8;

impl<S: AsyncRead + AsyncWrite + Unpin> AlertAware<S> {
    /// Passes `result` through, unless it is a write error of a lost connection: then the
    /// error, with the server's alert if one is waiting.
    fn explain<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        use io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
        let err = match (self.lost.take(), result) {
            (Some(lost), _) => lost,
            (None, Poll::Ready(Err(e)))
                if matches!(e.kind(), BrokenPipe | ConnectionReset | ConnectionAborted) =>
            {
                e
            }
            (None, other) => return other,
        };
        // The connection is lost: whatever this reads has nowhere to go anyway.
        let mut scratch = [0u8; 1024];
        for _ in 0..ALERT_READS {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.stream).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => continue,
                Poll::Ready(Err(alert)) if alert.kind() == io::ErrorKind::InvalidData => {
                    let explained = format!("{err}; the server's TLS alert: {alert}");
                    return Poll::Ready(Err(io::Error::new(err.kind(), explained)));
                }
                Poll::Ready(_) => break,
                Poll::Pending => {
                    self.lost = Some(err);
                    return Poll::Pending;
                }
            }
        }
        Poll::Ready(Err(err))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for AlertAware<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for AlertAware<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = match self.lost {
            Some(_) => Poll::Pending,
            None => Pin::new(&mut self.stream).poll_write(cx, buf),
        };
        self.explain(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = match self.lost {
            Some(_) => Poll::Pending,
            None => Pin::new(&mut self.stream).poll_write_vectored(cx, bufs),
        };
        self.explain(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = match self.lost {
            Some(_) => Poll::Pending,
            None => Pin::new(&mut self.stream).poll_flush(cx),
        };
        self.explain(cx, result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dst(host: &str) -> Destination {
        Destination::new(
            "127.0.0.2:443".parse::<std::net::SocketAddr>().unwrap(),
            host,
            true,
        )
    }

    /// The certificate is checked against the target's host, not the address connected to;
    /// the override wins; an IP host stays an IP name; a trailing dot is not sent.
    #[test]
    fn server_name_is_the_host_or_the_override() {
        let name = |host: &str, over: Option<&str>| {
            let over = over.map(|o| ServerName::try_from(o.to_owned()).unwrap());
            server_name_for(&dst(host), over.as_ref())
                .unwrap()
                .to_str()
                .into_owned()
        };
        assert_eq!(name("api.example.com", None), "api.example.com");
        assert_eq!(name("api.example.com.", None), "api.example.com");
        assert_eq!(name("127.0.0.2", Some("api.internal")), "api.internal");
        assert!(matches!(
            server_name_for(&dst("127.0.0.2"), None).unwrap(),
            ServerName::IpAddress(_)
        ));
    }

    /// Malformed input is an invalid-configuration error naming it, never a panic.
    #[test]
    fn bad_input_is_a_clear_error() {
        let err = |config: TlsConfig| config.client_config().unwrap_err().to_string();
        let e = err(TlsConfig::new().ca_certificate("not a pem"));
        assert!(
            e.contains("ca_certificate") && e.contains("no CERTIFICATE"),
            "{e}"
        );
        let e = err(TlsConfig::new().server_name("not a name!"));
        assert!(e.contains("server_name"), "{e}");
        let e = err(TlsConfig::new().identity("", ""));
        assert!(e.contains("identity certificate chain"), "{e}");
        let e = err(TlsConfig::new().feature_roots(false));
        assert!(e.contains("no trusted root certificates"), "{e}");
    }
}
