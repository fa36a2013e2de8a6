//! TLS with tonic-pool: a pool over two real tonic TLS servers whose certificate names a host,
//! not their IPs, then mutual TLS, then the errors a wrong name and a missing client
//! certificate give.
//!
//! ```text
//! cargo run --example tls --features tls
//! ```
//!
//! It makes its own private CA and certificates (rcgen), starts the servers on 127.0.0.2/3/4,
//! prints what each step shows and exits 0 when every step behaved as described (in about a
//! second).

#[path = "../tests/support/mod.rs"]
#[allow(dead_code, unused_imports)] // each example uses a part of the tests' support
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::echo::echo_client::EchoClient;
use support::echo::EchoRequest;
use support::tls::TestCa;
use support::{loopback, ServerOptions, TestServer};
use tonic_pool::tls::TlsConfig;
use tonic_pool::{ConnectivityState, Pool};

/// The name on the servers' certificate.
const NAME: &str = "api.example.test";
const CONNECTIONS_PER_SERVER: usize = 2;
const CALLS: usize = 20;
const WAIT: Duration = Duration::from_secs(5);

type BoxError = Box<dyn std::error::Error>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let ca = TestCa::new("example private CA");
    let server_cert = ca.issue(&[NAME]);
    let tls_server = |last, name: &str, tls| {
        TestServer::start_with(
            loopback(last),
            ServerOptions {
                name: name.into(),
                tls: Some(tls),
                ..ServerOptions::default()
            },
        )
    };
    let a = tls_server(2, "server-a", server_cert.server_tls());
    let b = tls_server(3, "server-b", server_cert.server_tls());
    let target = format!("static:///{},{}", a.addr(), b.addr());
    println!("certificate for {NAME:?} (no IP in it), signed by a private CA");
    println!("servers: {} and {}\n", a.addr(), b.addr());

    // 1. Two IPs behind one certificate: verify the name, not the IPs.
    let pool = Pool::builder(&target)
        .connections_per_endpoint(CONNECTIONS_PER_SERVER)
        .tls(TlsConfig::new().ca_certificate(ca.pem()).server_name(NAME))
        .build()?;
    let all = 2 * CONNECTIONS_PER_SERVER;
    if !pool
        .wait_until(WAIT, |s| s.ready_connections() == all)
        .await
    {
        return Err(format!("TLS connections not Ready: {:#?}", pool.snapshot()).into());
    }
    let mut client = EchoClient::new(pool.clone());
    let mut answered: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..CALLS {
        let reply = client.unary(request(&format!("call {i}"))).await?;
        *answered.entry(reply.into_inner().server).or_default() += 1;
    }
    println!("1. {all} TLS connections to 2 IPs, each verified as {NAME:?} (SNI too), ALPN h2:");
    for (server, calls) in &answered {
        println!("   {server}: {calls} of {CALLS} calls");
    }
    if answered.len() != 2 {
        return Err("calls did not reach both servers".into());
    }
    pool.close().await?;

    // 2. A name the certificate does not cover.
    let pool = Pool::builder(&target)
        .tls(
            TlsConfig::new()
                .ca_certificate(ca.pem())
                .server_name("other.example.test"),
        )
        .build()?;
    let error = failure(&pool).await?;
    println!("\n2. the same servers checked as \"other.example.test\" are refused:\n   {error}");
    pool.close().await?;

    // 3. Mutual TLS: a server that asks for a client certificate from its own CA.
    let client_ca = TestCa::new("example client CA");
    let c = tls_server(
        4,
        "server-c",
        server_cert.server_tls_requiring_client_cert(&client_ca),
    );
    let identity = client_ca.issue(&["client.example.test"]);
    let target = format!("static:///{}", c.addr());
    let pool = Pool::builder(&target)
        .tls(
            TlsConfig::new()
                .ca_certificate(ca.pem())
                .server_name(NAME)
                .identity(&identity.cert_pem, &identity.key_pem),
        )
        .build()?;
    pool.wait_ready(WAIT).await?;
    let reply = EchoClient::new(pool.clone())
        .unary(request("with a client certificate"))
        .await?;
    println!(
        "\n3. mutual TLS: {} answered a pool that presents a client certificate",
        reply.into_inner().server
    );
    pool.close().await?;

    let pool = Pool::builder(&target)
        .tls(TlsConfig::new().ca_certificate(ca.pem()).server_name(NAME))
        .build()?;
    let error = failure(&pool).await?;
    println!("   and refuses one without:\n   {error}");
    pool.close().await?;

    println!("\nevery step behaved as described");
    Ok(())
}

fn request(message: &str) -> EchoRequest {
    EchoRequest {
        payload: Vec::new(),
        sleep_ms: 0,
        message: message.to_owned(),
    }
}

/// Waits for the pool's connections to fail and returns the error a call reports.
async fn failure(pool: &Pool) -> Result<String, BoxError> {
    if !pool
        .watch()
        .wait_for(ConnectivityState::TransientFailure, WAIT)
        .await
    {
        return Err(format!("expected a failure: {:#?}", pool.snapshot()).into());
    }
    match EchoClient::new(pool.clone()).unary(request("x")).await {
        Ok(_) => Err("a call succeeded where it should not".into()),
        Err(status) => Ok(status.message().to_owned()),
    }
}
