//! TLS for tests: certificate authorities made at test time ([`TestCa`], with rcgen), the
//! server setting a TLS [`TestServer`](super::TestServer) takes
//! ([`ServerOptions::tls`](super::ServerOptions::tls), from [`TestIdentity::server_tls`]),
//! and [`NoAlpnServer`], a TLS peer that completes handshakes without agreeing to HTTP/2.
//!
//! Everything uses rustls's `ring` provider explicitly, like the pool does.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::AsyncReadExt;
use tokio::sync::{oneshot, watch};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// Connections a [`NoAlpnServer`] accepts at most; tests make a handful.
const NO_ALPN_MAX_CONNECTIONS: usize = 1000;

/// A certificate authority made for one test: it signs server and client certificates.
pub struct TestCa {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

impl TestCa {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-signed CA");
        TestCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate, PEM: what a client or server trusts.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A certificate signed by this CA for `names` (DNS names, or IP literals for IP SANs),
    /// with its key; for a server or a client alike.
    pub fn issue(&self, names: &[&str]) -> TestIdentity {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("leaf params");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("signed leaf");
        TestIdentity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// A certificate (PEM) and its private key (PKCS#8 PEM).
#[derive(Clone, Debug)]
pub struct TestIdentity {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

impl TestIdentity {
    /// tonic's server TLS settings with this identity (tonic's server offers ALPN `h2`).
    pub fn server_tls(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
    }

    /// The same, asking every client for a certificate signed by `client_ca` (mutual TLS).
    pub fn server_tls_requiring_client_cert(&self, client_ca: &TestCa) -> ServerTlsConfig {
        self.server_tls()
            .client_ca_root(Certificate::from_pem(client_ca.pem()))
    }

    fn rustls_server_config(&self) -> rustls::ServerConfig {
        let chain = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("certificate PEM");
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("key PEM");
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server certificate")
    }
}

/// A TLS server that completes every handshake without selecting an ALPN protocol (as an
/// HTTP/1-only TLS server does), then holds the connection open in silence. It records the
/// SNI name of each handshake. It runs on its own thread and runtime, stopped on drop.
#[derive(Debug)]
pub struct NoAlpnServer {
    addr: SocketAddr,
    server_names: watch::Sender<Vec<Option<String>>>,
    kill: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl NoAlpnServer {
    /// Starts on `addr` (port 0: any free port) with `identity`; panics if it cannot bind.
    pub fn start(addr: SocketAddr, identity: &TestIdentity) -> NoAlpnServer {
        let config = Arc::new(identity.rustls_server_config());
        let server_names = watch::Sender::new(Vec::new());
        let names = server_names.clone();
        let (kill, killed) = oneshot::channel::<()>();
        let (thread, addr) = super::thread::start(
            format!("no-alpn-server-{addr}"),
            move |started| async move {
                let listener = match tokio::net::TcpListener::bind(addr).await {
                    Ok(listener) => listener,
                    Err(err) => {
                        let _ = started.send(Err(err));
                        return;
                    }
                };
                let bound = listener.local_addr();
                let failed = bound.is_err();
                let _ = started.send(bound);
                if failed {
                    return;
                }
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                let serve = async move {
                    for _ in 0..NO_ALPN_MAX_CONNECTIONS {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let acceptor = acceptor.clone();
                        let names = names.clone();
                        tokio::spawn(async move {
                            let Ok(mut tls) = acceptor.accept(stream).await else {
                                return;
                            };
                            let sni = tls.get_ref().1.server_name().map(str::to_owned);
                            names.send_modify(|names| names.push(sni));
                            // Read (and drop) until the client goes away.
                            let mut buf = [0u8; 1024];
                            while matches!(tls.read(&mut buf).await, Ok(n) if n > 0) {}
                        });
                    }
                };
                tokio::select! {
                    _ = killed => {}
                    _ = serve => {}
                }
            },
            || {},
        )
        .unwrap_or_else(|err: io::Error| panic!("NoAlpnServer: cannot start: {err}"));
        NoAlpnServer {
            addr,
            server_names,
            kill: Some(kill),
            thread: Some(thread),
        }
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The SNI name of every completed handshake so far (`None`: the client sent none).
    pub fn server_names(&self) -> Vec<Option<String>> {
        self.server_names.borrow().clone()
    }

    /// Waits until at least `n` handshakes completed, at most `timeout` (tokio's clock);
    /// false on timeout.
    pub async fn wait_for_handshakes(&self, n: usize, timeout: Duration) -> bool {
        let mut rx = self.server_names.subscribe();
        let reached = matches!(
            tokio::time::timeout(timeout, rx.wait_for(|names| names.len() >= n)).await,
            Ok(Ok(_))
        );
        reached
    }
}

impl Drop for NoAlpnServer {
    fn drop(&mut self) {
        drop(self.kill.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
