//! keel-scylla against a node with `PasswordAuthenticator` and client encryption on
//! (`scripts/scylla-node secure start`: 127.0.0.4, user `cassandra`, a certificate signed by
//! a CA the script made). The right credentials over TLS work; a wrong password, no password,
//! an untrusted CA and plain text are clear errors within the connect bound, never hangs.
//!
//! `cargo test -p keel-cqrs-scylla --features secure-tests --test secure` (`./scripts/test` runs
//! it). The node is `KEEL_SECURE_NODE` (default `127.0.0.4:9042`), its CA files in
//! `KEEL_SECURE_TLS_DIR` (default `$KEEL_CACHE/secure/tls`, `KEEL_CACHE` being
//! `~/.cache/keel` unless set).

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use keel::{EventStore, ExpectedVersion, NewEvent, StreamId};
use keel_scylla::{Error, KeelScylla, KeelScyllaBuilder, TlsFiles};

fn node() -> String {
    std::env::var("KEEL_SECURE_NODE").unwrap_or_else(|_| "127.0.0.4:9042".into())
}

fn tls_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("KEEL_SECURE_TLS_DIR") {
        return dir.into();
    }
    let cache = std::env::var("KEEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/keel"));
    cache.join("secure/tls")
}

fn tls(ca: &str) -> TlsFiles {
    TlsFiles {
        ca_file: tls_dir().join(ca),
        client: None,
    }
}

fn builder(keyspace: &str) -> KeelScyllaBuilder {
    KeelScylla::builder()
        .known_node(node())
        .keyspace(keyspace)
        .connect_timeout(Duration::from_secs(3))
        .feeder_lease_ttl(Duration::from_secs(3))
}

/// Builds, and checks that a failure came within the bound (twice the connect timeout, and
/// some slack for the schema steps that never run).
async fn refused(builder: KeelScyllaBuilder, case: &str) -> Error {
    let started = Instant::now();
    let outcome = builder.build().await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "{case}: took {took:?}");
    match outcome {
        Ok(_) => panic!("{case}: connected"),
        Err(e) => {
            println!("{case}: refused after {took:?}: {e}");
            e
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_right_password_over_tls_works() {
    let keyspace = common::fresh_keyspace("keel_secure");
    let store = builder(&keyspace)
        .credentials("cassandra", "cassandra")
        .tls(tls("ca.pem"))
        .build()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot open the store on the secure node {}: {e}\n\
                 start it with `./scripts/scylla-node secure start` (./scripts/test does)",
                node()
            )
        });
    let stream = StreamId::new("secure-1");
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![NewEvent::new("Posted", 1, &b"{}"[..])],
        )
        .await
        .unwrap();
    let events: Vec<_> = store.read_stream(&stream, 1).try_collect().await.unwrap();
    assert_eq!(events.len(), 1);
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_password_is_a_clear_error() {
    let keyspace = common::fresh_keyspace("keel_secure");
    let wrong = refused(
        builder(&keyspace)
            .credentials("cassandra", "not-the-password")
            .tls(tls("ca.pem")),
        "wrong password",
    )
    .await;
    let text = wrong.to_string().to_lowercase();
    assert!(
        matches!(wrong, Error::Connect { .. })
            && (text.contains("auth") || text.contains("password")),
        "{wrong}"
    );
    let missing = refused(builder(&keyspace).tls(tls("ca.pem")), "no password").await;
    let text = missing.to_string().to_lowercase();
    assert!(
        matches!(missing, Error::Connect { .. }) && text.contains("auth"),
        "{missing}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_or_plain_text_is_a_clear_error() {
    let keyspace = common::fresh_keyspace("keel_secure");
    let untrusted = refused(
        builder(&keyspace)
            .credentials("cassandra", "cassandra")
            .tls(tls("other-ca.pem")),
        "untrusted CA",
    )
    .await;
    let text = untrusted.to_string().to_lowercase();
    assert!(
        matches!(
            untrusted,
            Error::Connect { .. } | Error::ConnectTimeout { .. }
        ) && (text.contains("certificate") || text.contains("tls") || text.contains("ssl")),
        "{untrusted}"
    );
    let plain = refused(
        builder(&keyspace).credentials("cassandra", "cassandra"),
        "plain text to a TLS port",
    )
    .await;
    assert!(
        matches!(plain, Error::Connect { .. } | Error::ConnectTimeout { .. }),
        "{plain}"
    );
    let missing_file = refused(
        builder(&keyspace)
            .credentials("cassandra", "cassandra")
            .tls(tls("no-such-ca.pem")),
        "missing CA file",
    )
    .await;
    assert!(
        matches!(&missing_file, Error::Tls { reason } if reason.contains("no-such-ca.pem")),
        "{missing_file}"
    );
}
