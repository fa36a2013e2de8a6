//! Subsetting (`PoolBuilder::subset_size`) against real tonic servers on 127.0.0.x: calls
//! reach only the subset's servers, the snapshot shows only its endpoints, a changed address
//! set moves the subset as rendezvous hashing promises while calls keep succeeding, and
//! deterministic subsetting gives a round of clients disjoint subsets. (The balance and churn
//! of the algorithms over a large fleet are simulated in `src/subset.rs`.)

use crate::support;

use std::collections::BTreeSet;
use std::net::SocketAddr;

use support::common::{builder, client, drive_load, echo, wait_all_ready, WAIT};
use support::{loopback, TestServer};
use tonic_pool::resolve::Push;
use tonic_pool::{Pool, PoolSnapshot};

/// The addresses of the endpoints in the address set (draining ones left out).
fn active(snapshot: &PoolSnapshot) -> BTreeSet<SocketAddr> {
    snapshot
        .endpoints
        .iter()
        .filter(|e| !e.draining)
        .filter_map(|e| e.addr.socket_addr())
        .collect()
}

/// Waits until the pool's active endpoints are `expected` (and Ready), and none other is
/// left, draining or not.
async fn wait_subset(pool: &Pool, expected: &BTreeSet<SocketAddr>) {
    let reached = pool
        .wait_until(WAIT, |s| {
            s.endpoints.len() == expected.len()
                && active(s) == *expected
                && s.ready_connections() == expected.len()
        })
        .await;
    assert!(
        reached,
        "never settled on {expected:?}: {:#?}",
        pool.snapshot()
    );
}

/// Starts servers on 127.0.0.`lasts`; their replies name them by address.
fn servers(lasts: std::ops::RangeInclusive<u8>) -> Vec<TestServer> {
    lasts
        .map(|last| TestServer::start(loopback(last)))
        .collect()
}

fn addrs(servers: &[TestServer]) -> Vec<SocketAddr> {
    servers.iter().map(TestServer::addr).collect()
}

/// A pool with `subset_size(2)` over six servers connects to two of them only: the snapshot
/// shows those two endpoints, calls are answered by exactly those two servers, and the other
/// four never see a connection.
#[tokio::test]
async fn calls_reach_only_the_subset() {
    let servers = servers(1..=6);
    let push = Push::new();
    push.replace(addrs(&servers));
    let pool = builder("subset.test:50051")
        .discovery(push)
        .subset_size(2)
        .subset_seed(1)
        .build()
        .expect("valid pool");
    wait_all_ready(&pool, 2).await;
    let subset = active(&pool.snapshot());
    assert_eq!(subset.len(), 2);
    assert_eq!(pool.snapshot().endpoints.len(), 2);

    let mut client = client(&pool);
    let mut answered = BTreeSet::new();
    for i in 0..12 {
        let reply = client
            .unary(echo(&format!("call {i}")))
            .await
            .expect("call");
        let server: SocketAddr = reply.into_inner().server.parse().expect("an address");
        answered.insert(server);
    }
    assert_eq!(answered, subset, "round robin over the subset reaches both");
    for server in &servers {
        if !subset.contains(&server.addr()) {
            assert_eq!(server.accepted_connections(), 0, "{}", server.addr());
            assert_eq!(server.requests(), 0, "{}", server.addr());
        }
    }
    pool.close().await.expect("clean close");
}

/// When the pushed set changes, the subset moves as rendezvous hashing promises, whatever the
/// servers' (OS-chosen) ports make their weights, and calls keep succeeding throughout:
/// removing a subset member `a` replaces it by the next in line `c` and keeps the other, `b`,
/// on its one connection; adding `a` back restores `{a, b}` exactly (it outranks `c`);
/// adding a new server `g` while removing `b` gives `{a, c}` or `{a, g}` (`a` outranks both;
/// no other old server enters), and `g` is connected to only if it entered.
#[tokio::test]
async fn a_changed_set_moves_the_subset_minimally() {
    let servers = servers(1..=6);
    let newcomer = TestServer::start(loopback(7));
    let push = Push::new();
    push.replace(addrs(&servers));
    let pool = builder("subset.test:50051")
        .discovery(push.clone())
        .subset_size(2)
        .subset_seed(2)
        .build()
        .expect("valid pool");
    wait_all_ready(&pool, 2).await;
    let first: Vec<SocketAddr> = active(&pool.snapshot()).into_iter().collect();
    let (a, b) = (first[0], first[1]);
    let server = |addr: SocketAddr| {
        servers
            .iter()
            .chain([&newcomer])
            .find(|s| s.addr() == addr)
            .expect("a test server")
    };

    let (changed, changes_done) = tokio::sync::oneshot::channel::<()>();
    let changes = async {
        // `a` goes: the next in line comes, `b` stays.
        push.remove(a);
        assert!(
            pool.wait_until(WAIT, |s| {
                let now = active(s);
                now.len() == 2 && now.contains(&b) && !now.contains(&a)
            })
            .await,
            "{:#?}",
            pool.snapshot()
        );
        let c = *active(&pool.snapshot())
            .iter()
            .find(|&&addr| addr != b)
            .expect("a replacement");
        wait_subset(&pool, &BTreeSet::from([b, c])).await;

        // `a` comes back: it outranks `c`, which drains.
        push.insert(a);
        wait_subset(&pool, &BTreeSet::from([a, b])).await;

        // A new server and `b` gone, in two pushes applied in order.
        push.insert(newcomer.addr());
        push.remove(b);
        let entered = pool
            .wait_until(WAIT, |s| {
                let now = active(s);
                now == BTreeSet::from([a, c]) || now == BTreeSet::from([a, newcomer.addr()])
            })
            .await;
        assert!(entered, "{:#?}", pool.snapshot());
        let last = active(&pool.snapshot());
        wait_subset(&pool, &last).await;
        let _ = changed.send(());
    };
    let load = drive_load(&pool, 4, 1, WAIT * 3, async {
        let _ = changes_done.await;
    });
    let ((), load) = tokio::join!(changes, load);
    assert!(load.failed.is_empty(), "failed calls: {:?}", load.failed);
    assert!(load.ok > 0);

    // `b` kept its one connection through the first two changes; `g` was connected to only
    // if it entered the subset.
    assert_eq!(server(b).accepted_connections(), 1);
    let entered = active(&pool.snapshot()).contains(&newcomer.addr());
    assert_eq!(newcomer.accepted_connections() > 0, entered);
    let mut client = client(&pool);
    client
        .unary(echo("after"))
        .await
        .expect("a call after the changes");
    pool.close().await.expect("clean close");
}

/// Deterministic subsetting over real servers: three clients with indexes 0, 1 and 2 form one
/// round (6 servers / 2), so together they connect to every server exactly once.
#[tokio::test]
async fn a_round_of_clients_covers_every_server_once() {
    let servers = servers(1..=6);
    let push = Push::new();
    push.replace(addrs(&servers));
    let mut pools = Vec::new();
    for index in 0..3 {
        let pool = builder("subset.test:50051")
            .discovery(push.clone())
            .subset_size(2)
            .subset_client_index(index)
            .build()
            .expect("valid pool");
        wait_all_ready(&pool, 2).await;
        pools.push(pool);
    }
    for server in &servers {
        assert!(
            server.wait_for_accepted(1, WAIT).await,
            "{} got no connection",
            server.addr()
        );
    }
    for server in &servers {
        assert_eq!(server.accepted_connections(), 1, "{}", server.addr());
    }
    for pool in pools {
        pool.close().await.expect("clean close");
    }
}

/// Subsetting settings that cannot be used are clear errors from `build()`: a size of 0, a
/// seed together with a client index, and either of them without a size.
#[tokio::test]
async fn bad_subset_settings_are_errors() {
    let target = "static:///127.0.0.1:1";
    let cases = [
        (
            Pool::builder(target).subset_size(0),
            "subset_size must be at least 1",
        ),
        (
            Pool::builder(target)
                .subset_size(2)
                .subset_seed(1)
                .subset_client_index(0),
            "are both set",
        ),
        (Pool::builder(target).subset_seed(1), "without subset_size"),
        (
            Pool::builder(target).subset_client_index(3),
            "without subset_size",
        ),
    ];
    for (settings, expected) in cases {
        let err = settings.build().expect_err("invalid subsetting");
        assert!(err.is_invalid_config(), "{err}");
        assert!(err.to_string().contains(expected), "{err}");
    }
    let pool = Pool::builder(target)
        .subset_size(5)
        .connect_lazily(true)
        .build()
        .expect("a size above the address count is fine");
    pool.close().await.expect("clean close");
}
