//! The `keel` command against a real node, steering a projection manager running here.

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel::projection::{Projection, ProjectionManager, ProjectionState, ProjectionStore};
use keel::{BoxError, EventStore, ExpectedVersion, Metadata, NewEvent, RecordedEvent, StreamId};
use keel_scylla::KeelScylla;

fn nodes() -> String {
    std::env::var("KEEL_SCYLLA_NODES").unwrap_or_else(|_| "127.0.0.1:9042".into())
}

/// A fresh keyspace name with `prefix`.
fn fresh_keyspace(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// Opens a store on the test node, failing loudly with what to do when there is none.
async fn open(builder: keel_scylla::KeelScyllaBuilder) -> KeelScylla {
    builder
        .known_nodes(nodes().split(','))
        .build()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "no CQL node at {}: {e}; run ./scripts/scylla-node start",
                nodes()
            )
        })
}

/// Stops the store's tasks and drops the test's keyspace.
async fn drop_keyspace(store: &KeelScylla, keyspace: &str) {
    store.shutdown().await;
    store
        .session()
        .query_unpaged(format!("DROP KEYSPACE {keyspace}"), ())
        .await
        .unwrap();
}

/// Runs `keel` with the arguments; returns (success, stdout, stderr).
async fn keel(keyspace: &str, args: &[&str]) -> (bool, String, String) {
    keel_with_env(keyspace, args, &[]).await
}

/// [`keel`] with environment variables set.
async fn keel_with_env(
    keyspace: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel"));
    cmd.args(["--nodes", &nodes(), "--keyspace", keyspace])
        .args(args)
        .envs(env.iter().copied());
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run keel"))
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `keel`; returns (exit code, stdout, stderr).
async fn keel_code(keyspace: &str, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel"));
    cmd.args(["--nodes", &nodes(), "--keyspace", keyspace])
        .args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run keel"))
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Counts the events it sees, per generation.
#[derive(Default)]
struct Tally(AtomicU64);

#[async_trait::async_trait]
impl Projection for Tally {
    fn name(&self) -> &str {
        "tally"
    }
    async fn apply(&self, _generation: u64, _event: &RecordedEvent) -> Result<(), BoxError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn reset(&self, _generation: u64) -> Result<(), BoxError> {
        Ok(())
    }
    async fn activate(&self, _generation: u64) -> Result<(), BoxError> {
        Ok(())
    }
}

async fn wait_for_state(
    store: &KeelScylla,
    state: ProjectionState,
) -> keel::projection::ProjectionStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = store.load_status("tally").await.unwrap() {
            if s.state == state && s.lag_events == 0 {
                return s;
            }
        }
        assert!(Instant::now() < deadline, "tally never reached {state:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_operator_command_lists_shows_and_steers() {
    let keyspace = fresh_keyspace("keel_cli");
    let store = open(
        KeelScylla::builder()
            .keyspace(&keyspace)
            .feeder_interval(Duration::from_millis(20)),
    )
    .await;
    let stream = StreamId::new("order-1");
    let correlation = uuid::Uuid::new_v4();
    let events = vec![
        NewEvent::new("Placed", 1, &br#"{"Placed":{"total":30}}"#[..])
            .with_metadata(Metadata::correlated(correlation).with("user", "ada")),
        NewEvent::new("Paid", 1, &br#"{"Paid":{}}"#[..]),
    ];
    store
        .append(&stream, ExpectedVersion::NoStream, events)
        .await
        .unwrap();

    let all = Arc::new(store.clone());
    let manager = ProjectionManager::builder(all.clone(), all.clone(), all.clone(), all)
        .projection(Arc::new(Tally::default()))
        .poll_interval(Duration::from_millis(20))
        .build();
    manager.start();
    wait_for_state(&store, ProjectionState::Running).await;

    let health = store.health().await;
    assert!(health.is_healthy(), "{health:?}");
    assert!(manager.health().await.is_healthy());
    let (ok, out, err) = keel(&keyspace, &["projections", "list", "--json"]).await;
    assert!(ok, "{err}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list[0]["name"], "tally");
    assert_eq!(list[0]["state"], "running");
    assert_eq!(list[0]["lag_events"], 0);
    let (ok, out, _) = keel(&keyspace, &["projections", "list"]).await;
    assert!(
        ok && out.contains("tally") && out.contains("running"),
        "{out}"
    );

    let (ok, out, err) = keel(&keyspace, &["stream", "show", "order-1"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("v1") && out.contains("Placed") && out.contains("v2") && out.contains("Paid"),
        "{out}"
    );
    assert!(
        out.contains(&format!("correlation={correlation}")) && out.contains("user=ada"),
        "{out}"
    );

    let (ok, _, err) = keel(&keyspace, &["projections", "pause", "tally"]).await;
    assert!(ok, "{err}");
    wait_for_state(&store, ProjectionState::Paused).await;
    let (ok, out, _) = keel(&keyspace, &["projections", "status", "tally"]).await;
    assert!(ok && out.contains("paused"), "{out}");
    let (ok, _, err) = keel(&keyspace, &["projections", "resume", "tally"]).await;
    assert!(ok, "{err}");
    wait_for_state(&store, ProjectionState::Running).await;

    let (ok, out, err) = keel(
        &keyspace,
        &[
            "projections",
            "rebuild",
            "tally",
            "--json",
            "--timeout",
            "60",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let rebuilt: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rebuilt["generation"], 2);
    assert_eq!(rebuilt["state"], "running");

    let (ok, _, err) = keel(&keyspace, &["projections", "pause", "no_such_projection"]).await;
    assert!(
        !ok && err.contains("no projection `no_such_projection`"),
        "{err}"
    );
    manager.stop().await;
    drop_keyspace(&store, &keyspace).await;
}

#[tokio::test]
async fn a_keyspace_without_keel_is_a_clear_error_and_nothing_is_created() {
    let keyspace = fresh_keyspace("keel_none");
    let (ok, _, err) = keel(&keyspace, &["projections", "list"]).await;
    assert!(!ok);
    assert!(err.contains("holds no Keel schema"), "{err}");
    let (ok, _, err) = keel("bad;name", &["projections", "list"]).await;
    assert!(!ok && err.contains("invalid keyspace"), "{err}");
}

/// The connection flags reach the store's settings, and bad ones are named.
#[tokio::test]
async fn connection_flags_are_applied_and_checked() {
    let keyspace = fresh_keyspace("keel_flags");
    let (ok, _, err) = keel(&keyspace, &["--username", "keel", "health"]).await;
    assert!(!ok && err.contains("username"), "{err}");
    let (ok, _, err) = keel(&keyspace, &["--tls-ca", "/nonexistent/ca.pem", "health"]).await;
    assert!(
        !ok && err.contains("TLS") && err.contains("/nonexistent/ca.pem"),
        "{err}"
    );
    let (ok, _, err) = keel_with_env(
        &keyspace,
        &["health"],
        &[("KEEL_SCYLLA_REQUEST_TIMEOUT_MS", "0")],
    )
    .await;
    assert!(!ok && err.contains("request_timeout"), "{err}");
}

mod sagas {
    use super::*;
    use keel::saga::{SagaOrchestrator, SagaStatus, SagaStep};
    use keel::CommandBus;
    use serde::{Deserialize, Serialize};
    use std::sync::atomic::AtomicBool;

    static UNDO_WORKS: AtomicBool = AtomicBool::new(false);

    /// Succeeds.
    #[derive(Clone, Debug, Serialize, Deserialize)]
    struct Book;
    /// Fails until UNDO_WORKS.
    #[derive(Clone, Debug, Serialize, Deserialize)]
    struct Unbook;
    /// Always fails.
    #[derive(Clone, Debug, Serialize, Deserialize)]
    struct Pay;
    impl keel::Command for Book {
        type Output = ();
    }
    impl keel::Command for Unbook {
        type Output = ();
    }
    impl keel::Command for Pay {
        type Output = ();
    }
    keel::saga_command!(Book, Unbook, Pay);

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sagas_are_listed_shown_and_retried() {
        let keyspace = fresh_keyspace("keel_clisaga");
        let store = Arc::new(open(KeelScylla::builder().keyspace(&keyspace).feeder(false)).await);
        let bus = CommandBus::builder()
            .command(|_: Book, _| async { Ok(()) })
            .unwrap()
            .command(|_: Unbook, _| async {
                if UNDO_WORKS.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err(keel::Error::store(
                        "test",
                        "unbook",
                        "the hotel does not answer",
                    ))
                }
            })
            .unwrap()
            .command(|_: Pay, _| async { Err(keel::Error::store("test", "pay", "card declined")) })
            .unwrap()
            .build();
        let orchestrator = SagaOrchestrator::builder(store.clone(), store.clone(), bus)
            .max_compensation_attempts(2)
            .retry_backoff(Duration::from_millis(5))
            .build();
        let steps = vec![
            SagaStep::new("book", Book).compensate_with(Unbook),
            SagaStep::new("pay", Pay),
        ];
        let state = orchestrator.start_saga("trip-1", steps).await.unwrap();
        assert_eq!(state.status, SagaStatus::CompensationFailed);

        let (ok, out, err) = keel(&keyspace, &["sagas", "list", "--json"]).await;
        assert!(ok, "{err}");
        let list: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            (list[0]["id"].as_str(), list[0]["status"].as_str()),
            (Some("trip-1"), Some("compensation_failed"))
        );
        let (ok, out, _) = keel(&keyspace, &["sagas", "show", "trip-1"]).await;
        assert!(
            ok && out.contains("compensation_failed") && out.contains("the hotel does not answer"),
            "{out}"
        );
        assert!(
            out.contains("book") && out.contains("pay") && out.contains("card declined"),
            "{out}"
        );

        let (ok, out, _) = keel(&keyspace, &["health"]).await;
        assert!(
            !ok && out.contains("FAIL") && out.contains("trip-1"),
            "a stuck saga is unhealthy: {out}"
        );
        let report = orchestrator.health(Duration::from_secs(60)).await;
        assert!(!report.is_healthy(), "{report:?}");

        UNDO_WORKS.store(true, Ordering::SeqCst);
        let (ok, out, err) = keel(&keyspace, &["sagas", "retry", "trip-1"]).await;
        assert!(ok, "{err}");
        assert!(out.contains("compensating again"), "{out}");
        orchestrator.recover().await.unwrap();
        assert_eq!(
            orchestrator.get_saga_state("trip-1").await.unwrap().status,
            SagaStatus::Compensated
        );
        let (ok, _, err) = keel(&keyspace, &["sagas", "retry", "trip-1"]).await;
        assert!(!ok && err.contains("not compensation_failed"), "{err}");
        store
            .session()
            .query_unpaged(format!("DROP KEYSPACE {keyspace}"), ())
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn subjects_are_shown_and_shredded_and_encrypted_payloads_never_printed() {
    use keel::codec::{Codec, MasterKey};
    let keyspace = fresh_keyspace("keel_cli");
    let store = Arc::new(
        open(
            KeelScylla::builder()
                .keyspace(&keyspace)
                .feeder(false)
                .master_key(MasterKey::generate()),
        )
        .await,
    );
    let codec = Codec::builder().encrypt_streams(store.clone()).build();
    let stream = StreamId::new("customer-ada");
    codec
        .events(store.clone())
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![NewEvent::new(
                "Registered",
                1,
                &br#"{"Registered":{"name":"Ada Lovelace"}}"#[..],
            )],
        )
        .await
        .unwrap();

    let (ok, out, err) = keel(&keyspace, &["stream", "show", "customer-ada"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("encrypted for subject `customer-ada`"),
        "{out}"
    );
    assert!(!out.contains("Lovelace"), "{out}");

    let (ok, out, _) = keel(&keyspace, &["subjects", "show", "customer-ada"]).await;
    assert!(ok && out.contains("key "), "{out}");

    let (ok, _, err) = keel(&keyspace, &["subjects", "shred", "customer-ada"]).await;
    assert!(!ok && err.contains("--yes"), "refused without --yes: {err}");

    let (ok, out, err) = keel(&keyspace, &["subjects", "shred", "customer-ada", "--yes"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("key deleted"), "{out}");
    let (ok, out, _) = keel(&keyspace, &["--json", "subjects", "show", "customer-ada"]).await;
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(ok && shown["has_key"] == false, "{out}");

    // This process's codec still has the key cached (for its key_cache_ttl, as documented);
    // a codec that reads the key store now finds no key.
    let read = |codec: Arc<Codec>| {
        let store = store.clone();
        let stream = stream.clone();
        async move {
            let events: Vec<RecordedEvent> =
                futures::TryStreamExt::try_collect(codec.events(store).read_stream(&stream, 1))
                    .await
                    .unwrap();
            events[0].is_shredded()
        }
    };
    assert!(!read(codec.clone()).await, "cached key, within its TTL");
    let fresh = Codec::builder().encrypt_streams(store.clone()).build();
    assert!(
        read(fresh).await,
        "the event reads as shredded after the command"
    );

    drop_keyspace(&store, &keyspace).await;
}

#[tokio::test]
async fn the_master_key_is_rotated_from_the_environment() {
    use keel::codec::{KeyStore, MasterKey};
    let hex = || uuid::Uuid::new_v4().simple().to_string().repeat(2);
    let (old, new) = (hex(), hex());
    let keyspace = fresh_keyspace("keel_cli");
    let with = |current: &str| {
        KeelScylla::builder()
            .keyspace(&keyspace)
            .feeder(false)
            .master_key(MasterKey::from_hex(current).unwrap())
    };
    let key = open(with(&old))
        .await
        .key_for("customer-ada")
        .await
        .unwrap();

    let (ok, _, err) = keel(&keyspace, &["subjects", "rewrap"]).await;
    assert!(!ok && err.contains("KEEL_MASTER_KEY"), "{err}");
    let (ok, _, err) = keel_with_env(
        &keyspace,
        &["subjects", "rewrap"],
        &[("KEEL_MASTER_KEY", &new)],
    )
    .await;
    assert!(!ok && err.contains("KEEL_PREVIOUS_MASTER_KEYS"), "{err}");

    let env = [
        ("KEEL_MASTER_KEY", new.as_str()),
        ("KEEL_PREVIOUS_MASTER_KEYS", old.as_str()),
    ];
    let (ok, out, err) = keel_with_env(&keyspace, &["subjects", "rewrap"], &env).await;
    assert!(ok, "{err}");
    assert!(out.contains("1 data keys looked at, 1 rewrapped"), "{out}");
    let (ok, out, _) = keel_with_env(&keyspace, &["--json", "subjects", "rewrap"], &env).await;
    let done: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        ok && done["rewrapped"] == 0 && done["scanned"] == 1,
        "{out}"
    );

    assert_eq!(
        open(with(&new))
            .await
            .find_key("customer-ada")
            .await
            .unwrap(),
        Some(key),
        "the same data key, now opened by the new master key alone"
    );

    // A key no given master key opens: reported, left alone, non-zero exit.
    open(with(&hex()))
        .await
        .key_for("customer-eve")
        .await
        .unwrap();
    let (ok, _, err) = keel_with_env(&keyspace, &["subjects", "rewrap"], &env).await;
    assert!(!ok && err.contains("customer-eve"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_and_feed_reconcile_find_events_no_feeder_published() {
    let keyspace = fresh_keyspace("keel_feed");
    // A writer without a feeder, whose markers are gone (as after an hour without a feeder).
    let writer = open(KeelScylla::builder().keyspace(&keyspace).feeder(false)).await;
    let stream = StreamId::new("ledger-7");
    let events = (0..3)
        .map(|_| NewEvent::new("Noted", 1, &b"{}"[..]))
        .collect();
    writer
        .append(&stream, ExpectedVersion::NoStream, events)
        .await
        .unwrap();
    // No process runs a feeder: the health check says what waits, and exits 2 (unhealthy).
    let (code, out, _) = keel_code(&keyspace, &["health"]).await;
    assert_eq!(code, 2, "no feeder while appends wait is unhealthy: {out}");
    assert!(
        out.contains("some slices have no feeder, and 3 event(s) of 1 stream(s)"),
        "{out}"
    );
    writer
        .session()
        .query_unpaged(format!("TRUNCATE {keyspace}.pending"), ())
        .await
        .unwrap();

    let (ok, out, err) = keel(&keyspace, &["feed", "status"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("none holds a slice lease"), "{out}");
    assert!(
        out.contains("last alive: not in the last 55 minutes"),
        "{out}"
    );
    let (ok, out, err) = keel(&keyspace, &["--json", "feed", "reconcile"]).await;
    assert!(ok, "{err}");
    let found: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(found["lagging"], serde_json::json!(["ledger-7"]));
    assert_eq!(found["unfed_events"], 3);

    // A feeder starts and publishes them from the command's marker; then nothing is missing.
    let feeder = open(KeelScylla::builder().keyspace(&keyspace)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while feeder.feed_head().await.unwrap() < 3 {
        assert!(Instant::now() < deadline, "the feeder published the events");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, out, err) = keel(&keyspace, &["feed", "reconcile"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("the feed has every committed event"), "{out}");
    let (ok, out, _) = keel(&keyspace, &["health"]).await;
    assert!(
        ok && out.contains("every slice fed, by 1 feeder(s)"),
        "{out}"
    );
    let (ok, out, err) = keel(&keyspace, &["--json", "feed", "status"]).await;
    assert!(ok, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["head"], 3, "{status}");
    let slices = status["slices"].as_array().expect("slices").len();
    assert_eq!(slices, 64, "{status}");
    assert_eq!(status["held_by"].as_object().unwrap().len(), 1, "{status}");
    assert_eq!(status["unheld"], serde_json::json!([]), "{status}");
    assert_eq!(status["unfinished_plan"], 0, "{status}");
    assert!(
        status["last_alive_seconds_ago"].as_u64().unwrap() < 60,
        "{status}"
    );
    drop_keyspace(&feeder, &keyspace).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exit_codes_tell_failures_apart_and_json_errors_are_json() {
    // Bad arguments: 64, under --json as a JSON error.
    let (code, _, err) = keel_code("keel", &["projections", "bogus"]).await;
    assert_eq!(code, 64, "{err}");
    let (code, out, _) = keel_code("keel", &["--json", "projections", "bogus"]).await;
    assert_eq!(code, 64);
    let error: serde_json::Value = serde_json::from_str(&out).expect("a JSON error");
    assert_eq!(error["error"]["kind"], "bad_arguments", "{out}");
    assert_eq!(error["error"]["exit_code"], 64);
    let (code, _, err) = keel_code("Not-A-Keyspace", &["health"]).await;
    assert_eq!(
        code, 64,
        "a keyspace name CQL refuses is a bad argument: {err}"
    );

    // Nothing listens: 3.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel"));
    cmd.args(["--nodes", "127.0.0.1:1", "--json", "health"]);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let error: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON error");
    assert_eq!(error["error"]["kind"], "cannot_connect");

    // Any other failure: 1, named.
    let keyspace = fresh_keyspace("keel_exit");
    let store = open(KeelScylla::builder().keyspace(&keyspace).feeder(false)).await;
    let (code, out, _) = keel_code(&keyspace, &["--json", "projections", "status", "nope"]).await;
    assert_eq!(code, 1, "{out}");
    let error: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no projection `nope`"),
        "{out}"
    );
    let (code, _, err) = keel_code(&keyspace, &["--help"]).await;
    assert_eq!(code, 0, "{err}");
    drop_keyspace(&store, &keyspace).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_feed_is_browsed_and_leases_are_listed_released_and_retaken() {
    let keyspace = fresh_keyspace("keel_ops");
    let store = open(
        KeelScylla::builder()
            .keyspace(&keyspace)
            .feeder_interval(Duration::from_millis(20)),
    )
    .await;
    let stream = StreamId::new("order-9");
    let events = (0..3)
        .map(|n| NewEvent::new(["Placed", "Paid", "Shipped"][n], 1, &b"{}"[..]))
        .collect();
    store
        .append(&stream, ExpectedVersion::NoStream, events)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.feed_head().await.unwrap() < 3 {
        assert!(Instant::now() < deadline, "the feeder published the events");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The feed by position, with its slice.
    let (code, out, err) = keel_code(&keyspace, &["--json", "feed", "show"]).await;
    assert_eq!(code, 0, "{err}");
    let shown: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let seen: Vec<(String, u64, u64)> = shown
        .iter()
        .map(|e| {
            (
                e["event_type"].as_str().unwrap().to_owned(),
                e["version"].as_u64().unwrap(),
                e["position"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("Placed".to_owned(), 1, 1),
            ("Paid".to_owned(), 2, 2),
            ("Shipped".to_owned(), 3, 3)
        ]
    );
    let slice = shown[0]["slice"].as_u64().unwrap().to_string();
    let (_, out, _) = keel_code(
        &keyspace,
        &[
            "feed", "show", "--slice", &slice, "--from", "2", "--limit", "1",
        ],
    )
    .await;
    assert!(out.contains("order-9") && out.contains("Paid"), "{out}");
    assert!(!out.contains("Placed") && !out.contains("Shipped"), "{out}");
    assert!(out.contains("1 event(s)"), "{out}");
    let rfc3339 = |w: &str| w.len() == 24 && w.ends_with('Z') && w.as_bytes()[10] == b'T';
    assert!(
        out.split_whitespace().any(rfc3339),
        "recorded times in RFC 3339: {out}"
    );
    let (code, _, err) = keel_code(&keyspace, &["feed", "show", "--slice", "64"]).await;
    assert_eq!(code, 64, "{err}");

    // A projection manager holds the projection's lease.
    let all = Arc::new(store.clone());
    let manager = ProjectionManager::builder(all.clone(), all.clone(), all.clone(), all)
        .projection(Arc::new(Tally::default()))
        .poll_interval(Duration::from_millis(20))
        .id("manager-a")
        .build();
    manager.start();
    wait_for_state(&store, ProjectionState::Running).await;
    let lease_of = |out: &str| -> serde_json::Value {
        let all: Vec<serde_json::Value> = serde_json::from_str(out).unwrap();
        all.into_iter()
            .find(|l| l["holder"] == "manager-a")
            .expect("the manager's lease is listed")
    };
    let (code, out, err) = keel_code(&keyspace, &["--json", "leases", "list"]).await;
    assert_eq!(code, 0, "{err}");
    let before = lease_of(&out);
    assert!(before["ttl_secs"].as_u64().unwrap() > 0, "{before}");
    let name = before["name"].as_str().unwrap().to_owned();
    let (_, text, _) = keel_code(&keyspace, &["leases", "list"]).await;
    assert!(text.contains(&name) && text.contains("manager-a"), "{text}");

    let (code, _, err) = keel_code(&keyspace, &["leases", "release", &name]).await;
    assert_eq!(code, 64, "releasing needs --yes: {err}");
    let (code, out, err) = keel_code(&keyspace, &["leases", "release", &name, "--yes"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("taken from `manager-a`"), "{out}");
    // The manager loses it and takes it again, at a higher epoch.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, out, _) = keel_code(&keyspace, &["--json", "leases", "list"]).await;
        let all: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        let now = all.iter().find(|l| l["name"] == name.as_str()).unwrap();
        if now["holder"] == "manager-a" && now["epoch"].as_u64() > before["epoch"].as_u64() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the lease was not taken again: {now}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Requests: --no-wait only leaves them; otherwise the command waits for the manager.
    let (code, out, err) =
        keel_code(&keyspace, &["projections", "pause", "tally", "--no-wait"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("Pause requested") && !out.contains("applied"),
        "{out}"
    );
    wait_for_state(&store, ProjectionState::Paused).await;
    let (code, out, err) = keel_code(&keyspace, &["projections", "resume", "tally"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Resume applied by manager manager-a"), "{out}");

    // --watch prints a frame a second until Ctrl-C.
    let watcher = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args([
            "--nodes",
            &nodes(),
            "--keyspace",
            &keyspace,
            "projections",
            "list",
            "--watch",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2_600)).await;
    let pid = watcher.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let out = tokio::task::spawn_blocking(move || watcher.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.matches("\x1b[2J").count() >= 2,
        "at least two frames: {text}"
    );
    assert!(text.contains("tally"), "{text}");

    manager.stop().await;
    drop_keyspace(&store, &keyspace).await;
}

/// Refuses events of type `Bad` while `poisoned`, counts the rest.
struct Picky {
    poisoned: std::sync::atomic::AtomicBool,
    applied: AtomicU64,
}

#[async_trait::async_trait]
impl Projection for Picky {
    fn name(&self) -> &str {
        "picky"
    }
    async fn apply(&self, _generation: u64, event: &RecordedEvent) -> Result<(), BoxError> {
        if &*event.event_type == "Bad" && self.poisoned.load(Ordering::SeqCst) {
            return Err("Bad is refused".into());
        }
        self.applied.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn reset(&self, _generation: u64) -> Result<(), BoxError> {
        Ok(())
    }
    async fn activate(&self, _generation: u64) -> Result<(), BoxError> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_are_listed_shown_replayed_and_skipped() {
    let keyspace = fresh_keyspace("keel_dl");
    let store = open(
        KeelScylla::builder()
            .keyspace(&keyspace)
            .feeder_interval(Duration::from_millis(20)),
    )
    .await;
    let events = vec![
        NewEvent::new("Good", 1, &br#"{"n":1}"#[..]),
        NewEvent::new("Bad", 1, &br#"{"why":"poison"}"#[..]),
        NewEvent::new("Good", 1, &br#"{"n":3}"#[..]),
    ];
    store
        .append(&StreamId::new("job-1"), ExpectedVersion::NoStream, events)
        .await
        .unwrap();
    let picky = Arc::new(Picky {
        poisoned: true.into(),
        applied: AtomicU64::new(0),
    });
    let all = Arc::new(store.clone());
    let manager = ProjectionManager::builder(all.clone(), all.clone(), all.clone(), all)
        .projection(picky.clone())
        .on_error(keel::projection::ErrorPolicy::DeadLetter)
        .poll_interval(Duration::from_millis(20))
        .build();
    manager.start();
    let deadline = Instant::now() + Duration::from_secs(30);
    while picky.applied.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "the good events were applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (code, out, err) = keel_code(&keyspace, &["--json", "dead-letters", "list", "picky"]).await;
    assert_eq!(code, 0, "{err}");
    let letters: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(letters.len(), 1, "{out}");
    assert_eq!(letters[0]["event"]["version"], 2);
    let at = format!(
        "{}:{}",
        letters[0]["event"]["slice"], letters[0]["event"]["position"]
    );
    let (code, out, _) = keel_code(&keyspace, &["dead-letters", "show", "picky", &at]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("job-1 v2 Bad") && out.contains(r#"{"why":"poison"}"#),
        "{out}"
    );
    let (code, _, _) = keel_code(&keyspace, &["dead-letters", "show", "picky", "nowhere"]).await;
    assert_eq!(code, 64);

    // Still refused: the replay is applied by the manager, and the letter stays.
    let (code, out, err) = keel_code(&keyspace, &["dead-letters", "replay", "picky", &at]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("applied by manager"), "{out}");
    let (_, out, _) = keel_code(&keyspace, &["dead-letters", "list", "picky"]).await;
    assert!(out.contains("1 dead letter(s)"), "{out}");

    // Fixed: replaying all applies it and removes the letter.
    picky.poisoned.store(false, Ordering::SeqCst);
    let (code, out, err) =
        keel_code(&keyspace, &["dead-letters", "replay", "picky", "--all"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ReplayDeadLetters applied"), "{out}");
    assert_eq!(picky.applied.load(Ordering::SeqCst), 3);
    let (_, out, _) = keel_code(&keyspace, &["dead-letters", "list", "picky"]).await;
    assert!(out.contains("0 dead letter(s)"), "{out}");

    // Skipping: needs --yes, then the letter is gone without being applied.
    let letter = keel::projection::DeadLetter {
        projection: "picky".into(),
        event: keel::projection::FailedEvent {
            stream: "job-2".into(),
            version: 1,
            event_type: "Bad".into(),
            position: 40,
            slice: 7,
        },
        error: "refused".into(),
        at: 0,
    };
    store.add_dead_letter(&letter).await.unwrap();
    let (code, _, _) = keel_code(&keyspace, &["dead-letters", "skip", "picky", "7:40"]).await;
    assert_eq!(code, 64, "skipping needs --yes");
    let (code, out, err) = keel_code(
        &keyspace,
        &["dead-letters", "skip", "picky", "7:40", "--yes"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("skipped"), "{out}");
    assert!(store.dead_letters("picky").await.unwrap().is_empty());
    assert_eq!(picky.applied.load(Ordering::SeqCst), 3);

    manager.stop().await;
    drop_keyspace(&store, &keyspace).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_are_deleted_truncated_and_archived() {
    use keel::{Snapshot, SnapshotStore};
    let keyspace = fresh_keyspace("keel_ends");
    // This process feeds: removals wait until the feed has carried the stream.
    let store = open(KeelScylla::builder().keyspace(&keyspace)).await;
    let streams: Vec<StreamId> = ["soft", "hard", "archive", "trunc"]
        .iter()
        .map(|name| StreamId::new(format!("end-{name}")))
        .collect();
    for stream in &streams {
        let events = (0..3)
            .map(|i| NewEvent::new("Noted", 1, format!("{{\"n\":{i}}}").into_bytes()))
            .collect();
        store
            .append(stream, ExpectedVersion::NoStream, events)
            .await
            .unwrap();
    }
    store
        .save_snapshot(Snapshot {
            stream: streams[3].clone(),
            version: 2,
            schema_version: 1,
            payload: bytes::Bytes::from_static(b"{}"),
            taken_at: 0,
            recent_commands: None,
        })
        .await
        .unwrap();

    // Without --yes: bad arguments, and nothing happens.
    let (code, _, err) = keel_code(&keyspace, &["stream", "delete", "end-soft"]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--yes"), "{err}");
    let (ok, out, err) = keel(&keyspace, &["stream", "info", "end-soft"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("open, version 3"), "{out}");

    let (ok, out, err) = keel(&keyspace, &["stream", "delete", "end-soft", "--yes"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("soft-deleted, version 4"), "{out}");
    let (ok, out, _) = keel(&keyspace, &["--json", "stream", "info", "end-soft"]).await;
    assert!(ok);
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["status"]["deleted"]["hard"], false, "{out}");
    let refused = store
        .append(
            &streams[0],
            ExpectedVersion::Exact(4),
            vec![NewEvent::new("Noted", 1, &b"{}"[..])],
        )
        .await;
    assert!(
        matches!(refused, Err(keel::Error::StreamClosed { .. })),
        "{refused:?}"
    );

    let (ok, out, err) = keel(
        &keyspace,
        &["--json", "stream", "delete", "end-hard", "--hard", "--yes"],
    )
    .await;
    assert!(ok, "{err}");
    let ended: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(ended["removed"], 3, "{out}");
    assert_eq!(ended["info"]["first_version"], 4, "{out}");
    // Its events are gone from the stream: showing them says why.
    let (code, _, err) = keel_code(&keyspace, &["stream", "show", "end-hard"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("hard-deleted"), "{err}");

    // Truncation needs a snapshot that covers what goes.
    let (code, out, _) = keel_code(
        &keyspace,
        &[
            "--json",
            "stream",
            "truncate",
            "end-archive",
            "--before",
            "3",
            "--yes",
        ],
    )
    .await;
    assert_eq!(code, 1, "{out}");
    let error: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no snapshot"),
        "{out}"
    );
    let (ok, out, err) = keel(
        &keyspace,
        &["stream", "truncate", "end-trunc", "--before", "3", "--yes"],
    )
    .await;
    assert!(ok, "{err}");
    assert!(
        out.contains("holds versions from 3; 2 event(s) removed"),
        "{out}"
    );
    let (ok, out, err) = keel(&keyspace, &["stream", "show", "end-trunc", "--from", "3"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("2 event(s)") && out.contains("$keel.stream-truncated"),
        "{out}"
    );

    let (ok, out, err) = keel(&keyspace, &["stream", "archive", "end-archive", "--yes"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("archived, version 4"), "{out}");
    assert!(out.contains("3 event(s) removed"), "{out}");
    let (ok, out, err) = keel(&keyspace, &["--json", "stream", "archived", "end-archive"]).await;
    assert!(ok, "{err}");
    let events: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(events.len(), 3, "{out}");
    assert_eq!(events[2]["payload"]["n"], 2, "{out}");
    drop_keyspace(&store, &keyspace).await;
}
