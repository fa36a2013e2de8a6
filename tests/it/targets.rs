//! Bad input: every malformed target is a typed error from build(), never a panic.

use tonic_pool::{Pool, TargetError};

/// A table of malformed targets and the error each must produce.
#[tokio::test]
async fn malformed_targets_are_typed_errors() {
    use TargetError::*;
    let cases: Vec<(&str, TargetError)> = vec![
        ("", Empty),
        ("gopher://h:1", UnknownScheme("gopher".into())),
        ("dns:///", MissingHost),
        ("dns:///:50051", MissingHost),
        ("svc:99999", InvalidPort("99999".into())),
        ("svc:0", InvalidPort("0".into())),
        ("svc:abc", InvalidPort("abc".into())),
        ("bad host:1", InvalidHost("bad host".into())),
        ("fe80::1:50051", InvalidIpv6("fe80::1:50051".into())),
        ("[::1", InvalidIpv6("[::1".into())),
        ("static:///", EmptyAddressList),
        ("static:///127.0.0.1:1,,127.0.0.2:1", EmptyAddressList),
        ("static:///127.0.0.1", MissingPort("127.0.0.1".into())),
        ("static:///svc.local:1", InvalidAddress("svc.local".into())),
        ("ipv4:300.0.0.1:1", InvalidAddress("300.0.0.1".into())),
        (
            "dns://resolver.local/svc:1",
            InvalidDnsServer("resolver.local".into()),
        ),
        ("http://svc:1/path", UnexpectedPart("/path".into())),
    ];
    for (target, expected) in cases {
        let err = Pool::builder(target).build().unwrap_err();
        assert!(err.is_invalid_target(), "{target:?}: {err}");
        assert_eq!(err.target_error(), Some(&expected), "{target:?}");
        // The message names the problem.
        assert!(
            err.to_string().contains(&expected.to_string()),
            "{target:?}: {err}"
        );
    }
}

/// Every accepted form builds a pool.
#[tokio::test]
async fn accepted_targets_build() {
    for target in [
        "static:///127.0.0.1:1,127.0.0.2:1",
        "static:///[::1]:1",
        "ipv4:127.0.0.1:1",
        "ipv6:[::1]:1",
        "127.0.0.1:1",
        "localhost:1",
        "dns:///localhost:1",
        "http://127.0.0.1:1",
    ] {
        let pool = Pool::builder(target)
            .connect_lazily(true)
            .build()
            .unwrap_or_else(|e| panic!("{target}: {e}"));
        assert_eq!(pool.target().as_str(), target);
        pool.close().await.unwrap();
    }
}
