//! TLS (feature `tls`) against real tonic TLS servers, with certificates made at test time:
//! verification by the target's host name over connections to several IPs, the server name
//! override, untrusted and misnamed certificates, mutual TLS, ALPN `h2`, the connect timeout
//! around the handshake, and the frame watcher reading HTTP/2 above TLS (GOAWAY under load).

use crate::support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use support::common::{builder, client, drive_load, echo, static_target, wait_all_ready, WAIT};
use support::tls::{NoAlpnServer, TestCa, TestIdentity};
use support::{loopback, ServerOptions, TestServer};
use tonic::Code;
use tonic_pool::resolve::{BoxFuture, Resolution, Resolve, ResolveError};
use tonic_pool::tls::TlsConfig;
use tonic_pool::{ConnectivityState, Pool, Target};

/// The name the test servers' certificates are issued for.
const NAME: &str = "pool.test";

/// Resolves every target to the same addresses (servers on several loopback IPs with their
/// own ports), standing in for DNS answering `pool.test`.
#[derive(Clone, Debug)]
struct FixedResolver(Vec<SocketAddr>);

impl Resolve for FixedResolver {
    fn resolve(&self, _: &Target) -> BoxFuture<'static, Result<Resolution, ResolveError>> {
        Box::pin(std::future::ready(Ok(Resolution::new(
            self.0.clone(),
            None,
        ))))
    }
}

/// A TLS echo server named `name` on 127.0.0.`last`.
fn tls_server(last: u8, name: &str, tls: tonic::transport::ServerTlsConfig) -> TestServer {
    TestServer::start_with(
        loopback(last),
        ServerOptions {
            name: name.into(),
            tls: Some(tls),
            ..ServerOptions::default()
        },
    )
}

/// Trusts `ca` only (not the roots a roots feature may bring), so the tests mean the same
/// with any feature set.
pub(crate) fn trusting(ca: &TestCa) -> TlsConfig {
    TlsConfig::new()
        .feature_roots(false)
        .ca_certificate(ca.pem())
}

/// A pool for `dns:///pool.test:443` whose resolver answers `servers`' addresses.
fn by_name(host: &str, servers: &[&TestServer]) -> tonic_pool::PoolBuilder {
    let addrs = servers.iter().map(|s| s.addr()).collect();
    builder(&format!("dns:///{host}:443")).resolver(FixedResolver(addrs))
}

/// Waits until every connection failed, and returns what a call then reports.
async fn call_error(pool: &Pool) -> String {
    let failed = pool
        .watch()
        .wait_for(ConnectivityState::TransientFailure, WAIT)
        .await;
    assert!(failed, "pool never failed: {:#?}", pool.snapshot());
    let status = client(pool).unary(echo("x")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    eprintln!("a call reports: {}", status.message());
    status.message().to_owned()
}

/// Makes `n` calls and returns the names of the servers that answered.
async fn servers_answering(pool: &Pool, n: usize) -> HashSet<String> {
    let mut client = client(pool);
    let mut seen = HashSet::new();
    for i in 0..n {
        let reply = client.unary(echo(&format!("call {i}"))).await.unwrap();
        seen.insert(reply.into_inner().server);
    }
    seen
}

/// A name resolved to two IPs (certificate for the name only, no IP SAN): two TLS connections
/// to each address verify against the name, and calls reach both servers. Ready needs the
/// server's SETTINGS, which only the frame watcher reading plaintext above TLS can see.
#[tokio::test]
async fn verifies_the_host_name_over_several_addresses() {
    let ca = TestCa::new("test CA");
    let cert = ca.issue(&[NAME]);
    let a = tls_server(2, "a", cert.server_tls());
    let b = tls_server(3, "b", cert.server_tls());
    let pool = by_name(NAME, &[&a, &b])
        .connections_per_endpoint(2)
        .tls(trusting(&ca))
        .build()
        .unwrap();
    wait_all_ready(&pool, 4).await;
    assert_eq!(
        servers_answering(&pool, 20).await,
        ["a", "b"].map(String::from).into()
    );
    assert_eq!(a.accepted_connections() + b.accepted_connections(), 4);
    pool.close().await.unwrap();
}

/// `static:///` IPs behind one certificate: with `server_name` the certificate is checked
/// against that name and calls reach every IP; without it the IP is the name checked, and a
/// certificate without that IP SAN is refused, naming the IP.
#[tokio::test]
async fn static_ips_verify_the_server_name_override() {
    let ca = TestCa::new("test CA");
    let cert = ca.issue(&[NAME]);
    let a = tls_server(2, "a", cert.server_tls());
    let b = tls_server(3, "b", cert.server_tls());
    let target = static_target(&[&a, &b]);

    let pool = builder(&target)
        .tls(trusting(&ca).server_name(NAME))
        .build()
        .unwrap();
    wait_all_ready(&pool, 2).await;
    assert_eq!(
        servers_answering(&pool, 10).await,
        ["a", "b"].map(String::from).into()
    );
    pool.close().await.unwrap();

    let pool = builder(&target).tls(trusting(&ca)).build().unwrap();
    let error = call_error(&pool).await;
    assert!(error.contains("not valid for name"), "{error}");
    assert!(error.contains("127.0.0."), "names the IP checked: {error}");
    pool.close().await.unwrap();
}

/// A target that is an IP literal, without override, is verified against the certificate's
/// IP SAN, as rustls does for an IP server name.
#[tokio::test]
async fn an_ip_target_verifies_the_ip_san() {
    let ca = TestCa::new("test CA");
    let a = tls_server(2, "a", ca.issue(&["127.0.0.2"]).server_tls());
    let pool = builder(&static_target(&[&a]))
        .tls(trusting(&ca))
        .build()
        .unwrap();
    wait_all_ready(&pool, 1).await;
    assert_eq!(servers_answering(&pool, 1).await, ["a".to_owned()].into());
    pool.close().await.unwrap();
}

/// A host name the certificate does not cover fails the connect with a certificate error
/// naming the name, and calls fail with it.
#[tokio::test]
async fn a_wrong_host_name_fails() {
    let ca = TestCa::new("test CA");
    let a = tls_server(2, "a", ca.issue(&[NAME]).server_tls());
    let pool = by_name("other.test", &[&a])
        .tls(trusting(&ca))
        .build()
        .unwrap();
    let error = call_error(&pool).await;
    assert!(error.contains("certificate"), "{error}");
    assert!(
        error.contains("not valid for name \"other.test\""),
        "{error}"
    );
    assert_eq!(a.requests(), 0);
    pool.close().await.unwrap();
}

/// A certificate from a CA the pool does not trust fails the connect (unknown issuer).
#[tokio::test]
async fn an_untrusted_ca_fails() {
    let server_ca = TestCa::new("server CA");
    let other_ca = TestCa::new("other CA");
    let a = tls_server(2, "a", server_ca.issue(&[NAME]).server_tls());
    let pool = by_name(NAME, &[&a])
        .tls(trusting(&other_ca))
        .build()
        .unwrap();
    let error = call_error(&pool).await;
    assert!(
        error.contains("invalid peer certificate: UnknownIssuer"),
        "{error}"
    );
    pool.close().await.unwrap();
}

/// Mutual TLS: a server that requires a client certificate serves a pool that presents one
/// signed by the CA it trusts, and refuses a pool without one (the server's alert is the
/// connect error).
#[tokio::test]
async fn mutual_tls_needs_the_client_certificate() {
    let ca = TestCa::new("server CA");
    let client_ca = TestCa::new("client CA");
    let a = tls_server(
        2,
        "a",
        ca.issue(&[NAME])
            .server_tls_requiring_client_cert(&client_ca),
    );
    let TestIdentity { cert_pem, key_pem } = client_ca.issue(&["client.test"]);

    let pool = by_name(NAME, &[&a])
        .tls(trusting(&ca).identity(&cert_pem, &key_pem))
        .build()
        .unwrap();
    wait_all_ready(&pool, 1).await;
    assert_eq!(servers_answering(&pool, 3).await, ["a".to_owned()].into());
    pool.close().await.unwrap();

    let pool = by_name(NAME, &[&a]).tls(trusting(&ca)).build().unwrap();
    let error = call_error(&pool).await;
    assert!(error.contains("CertificateRequired"), "{error}");
    pool.close().await.unwrap();
}

/// A TLS server that does not select ALPN `h2` fails the connect with an error naming ALPN,
/// after a handshake that did complete with the override name in SNI.
#[tokio::test]
async fn a_server_without_alpn_h2_fails_clearly() {
    let ca = TestCa::new("test CA");
    let server = NoAlpnServer::start(loopback(2), &ca.issue(&[NAME]));
    let pool = builder(&format!("static:///{}", server.addr()))
        .tls(trusting(&ca).server_name(NAME))
        .build()
        .unwrap();
    let error = call_error(&pool).await;
    assert!(error.contains("ALPN"), "{error}");
    assert!(error.contains("did not agree to HTTP/2"), "{error}");
    assert!(server.wait_for_handshakes(1, WAIT).await);
    assert_eq!(server.server_names()[0].as_deref(), Some(NAME), "SNI");
    pool.close().await.unwrap();
}

/// The TLS handshake counts against the connect timeout: a peer that accepts TCP but never
/// answers the ClientHello fails the attempt after the timeout (then backoff), instead of
/// hanging the connection.
#[tokio::test]
async fn the_handshake_is_bounded_by_the_connect_timeout() {
    // The kernel completes TCP handshakes into the backlog; nobody ever reads.
    let silent = std::net::TcpListener::bind(loopback(2)).unwrap();
    let addr = silent.local_addr().unwrap();
    let ca = TestCa::new("test CA");
    let pool = builder(&format!("static:///{addr}"))
        .tls(trusting(&ca).server_name(NAME))
        .connect_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let error = call_error(&pool).await;
    assert!(error.contains("connect timeout after 200ms"), "{error}");
    pool.close().await.unwrap();
}

/// GOAWAY over TLS: servers with a 1 s max connection age recycle TLS connections under
/// steady load and not one call fails — the pool only drains ahead of the server's close if
/// the frame watcher sees GOAWAY, that is, reads the plaintext above TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connection_age_over_tls_loses_no_call() {
    let ca = TestCa::new("test CA");
    let cert = ca.issue(&[NAME]);
    let aged = |name: &str| ServerOptions {
        name: name.into(),
        max_connection_age: Some(Duration::from_secs(1)),
        tls: Some(cert.server_tls()),
        ..ServerOptions::default()
    };
    let a = TestServer::start_with(loopback(2), aged("a"));
    let b = TestServer::start_with(loopback(3), aged("b"));
    let pool = by_name(NAME, &[&a, &b])
        .connections_per_endpoint(2)
        .tls(trusting(&ca))
        .build()
        .unwrap();
    wait_all_ready(&pool, 4).await;
    // Until each server has replaced its first two connections twice.
    let recycled = async {
        assert!(a.wait_for_accepted(6, WAIT).await);
        assert!(b.wait_for_accepted(6, WAIT).await);
    };
    let report = drive_load(&pool, 8, 1, WAIT, recycled).await;
    let accepted = a.accepted_connections() + b.accepted_connections();
    println!(
        "max-age over TLS: {} calls ok, {} failed, {accepted} connections",
        report.ok,
        report.failed.len()
    );
    assert!(
        report.failed.is_empty(),
        "failed calls: {:?}",
        report.failed
    );
    assert!(report.ok > 100, "load ran: {}", report.ok);
    assert!(accepted >= 12, "connections were recycled: {accepted}");
    pool.close().await.unwrap();
}

/// An `https://` target speaks TLS without `.tls(..)`: when the roots features bring roots it
/// builds and refuses the test CA's certificate (so it did a TLS handshake); with no root at
/// all (no roots feature, or an empty system store) `build()` says there is nothing to trust.
#[tokio::test]
async fn an_https_target_uses_tls_by_default() {
    let ca = TestCa::new("test CA");
    let a = tls_server(2, "a", ca.issue(&[NAME]).server_tls());
    let built = builder(&format!("https://{NAME}:443"))
        .resolver(FixedResolver(vec![a.addr()]))
        .build();
    let any_roots_feature = cfg!(any(
        feature = "tls-webpki-roots",
        feature = "tls-native-roots"
    ));
    let webpki_roots = cfg!(feature = "tls-webpki-roots");
    match built {
        Ok(pool) => {
            assert!(any_roots_feature, "built without roots");
            let error = call_error(&pool).await;
            assert!(error.contains("UnknownIssuer"), "{error}");
            pool.close().await.unwrap();
        }
        Err(err) => {
            // webpki-roots always brings roots; the system's store may be empty.
            assert!(!webpki_roots, "{err}");
            assert!(
                err.to_string().contains("no trusted root certificates"),
                "{err}"
            );
        }
    }
}

/// Unusable TLS settings are clear build errors, never panics or a pool that cannot connect.
#[tokio::test]
async fn unusable_tls_settings_fail_the_build() {
    let build = |tls: TlsConfig| {
        Pool::builder("dns:///pool.test:443")
            .tls(tls)
            .build()
            .unwrap_err()
    };
    let err = build(TlsConfig::new().feature_roots(false));
    assert!(err.is_invalid_config(), "{err:?}");
    assert!(
        err.to_string().contains("no trusted root certificates"),
        "{err}"
    );
    let err = build(TlsConfig::new().ca_certificate("-----BEGIN CERTIFICATE-----\nnot base64"));
    assert!(
        err.to_string().contains("ca_certificate: malformed PEM"),
        "{err}"
    );
    let ca = TestCa::new("test CA");
    let err = build(trusting(&ca).identity(ca.pem(), "no key here"));
    assert!(err.to_string().contains("identity private key"), "{err}");
    let err = build(trusting(&ca).server_name("bad name!"));
    assert!(
        err.to_string().contains("server_name \"bad name!\""),
        "{err}"
    );
}
