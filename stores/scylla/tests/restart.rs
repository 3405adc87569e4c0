//! The node goes down and comes back while a writer appends: clear errors while it is down,
//! then nothing committed is lost, nothing is half-written, nothing is stored twice, and the
//! feed catches up.
//!
//! The node is restarted with `scripts/scylla-node restart`, or with the command in
//! `KEEL_NODE_CTL` (called with `restart`) when the tests run against an external node.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use keel::{Error, EventStore, ExpectedVersion, NewEvent, RecordedEvent, StreamId};

fn restart_node() {
    let ctl = match std::env::var("KEEL_NODE_CTL") {
        Ok(ctl) => ctl,
        Err(_) if std::env::var("KEEL_SCYLLA_NODES").is_ok() => panic!(
            "KEEL_SCYLLA_NODES names an external node: set KEEL_NODE_CTL to a command that restarts it \
             (called as `$KEEL_NODE_CTL restart`)"
        ),
        Err(_) => format!("{}/../../scripts/scylla-node", env!("CARGO_MANIFEST_DIR")),
    };
    let status = std::process::Command::new(&ctl)
        .arg("restart")
        .status()
        .expect("run the node control command");
    assert!(status.success(), "`{ctl} restart` failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_restart_mid_run_loses_and_doubles_nothing() {
    let keyspace = common::fresh_keyspace("keel_restart");
    let store = Arc::new(
        common::open(common::builder(&keyspace).append_timeout(Duration::from_secs(2))).await,
    );
    let stream = StreamId::new("ledger-1");
    let from = store.feed_heads().await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let successes = Arc::new(AtomicUsize::new(0));

    let writer = {
        let (store, stream, stop, successes) = (
            store.clone(),
            stream.clone(),
            stop.clone(),
            successes.clone(),
        );
        tokio::spawn(async move {
            let mut committed = Vec::new();
            let mut unsure = Vec::new();
            let mut errors = Vec::new();
            let mut version = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let event = NewEvent::new("Posted", 1, &b"{\"Posted\":{}}"[..]);
                let id = event.event_id;
                match store
                    .append(&stream, ExpectedVersion::from_version(version), vec![event])
                    .await
                {
                    Ok(r) => {
                        version = r.last_version;
                        committed.push(id);
                        successes.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => {
                        if !e.is_conflict() {
                            unsure.push(id);
                            errors.push(e);
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        if let Ok(v) = store.stream_version(&stream).await {
                            version = v.unwrap_or(0);
                        }
                    }
                }
            }
            (committed, unsure, errors)
        })
    };

    let wait_for = |n: usize| {
        let successes = successes.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            while successes.load(Ordering::SeqCst) < n {
                assert!(
                    Instant::now() < deadline,
                    "the writer stalled at {} appends",
                    successes.load(Ordering::SeqCst)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_for(20).await;
    tokio::task::spawn_blocking(restart_node).await.unwrap();
    let after = successes.load(Ordering::SeqCst);
    wait_for(after + 20).await;
    stop.store(true, Ordering::SeqCst);
    let (committed, unsure, errors) = writer.await.unwrap();

    assert!(!errors.is_empty(), "the writer saw the node go down");
    for e in &errors {
        assert!(
            matches!(
                e,
                Error::Store { .. }
                    | Error::UnknownOutcome { .. }
                    | Error::Unavailable { .. }
                    | Error::Timeout { .. }
            ),
            "errors while down are store errors, not {e:?}"
        );
        assert!(
            e.to_string().contains("ledger-1") || e.to_string().contains("scylla"),
            "the error says where: {e}"
        );
    }
    let stored: Vec<RecordedEvent> = store.read_stream(&stream, 1).try_collect().await.unwrap();
    for (i, e) in stored.iter().enumerate() {
        assert_eq!(e.version, i as u64 + 1, "no gap, no half-written append");
    }
    let ids: Vec<_> = stored.iter().map(|e| e.event_id).collect();
    let unique: HashSet<_> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "no event stored twice");
    let committed: HashSet<_> = committed.into_iter().collect();
    assert!(
        committed.is_subset(&unique),
        "every acknowledged append survived the restart"
    );
    let known: HashSet<_> = committed
        .union(&unsure.into_iter().collect())
        .copied()
        .collect();
    assert!(
        unique.is_subset(&known),
        "nothing appeared that the writer did not send"
    );

    // The feed catches up with the whole stream, each event once.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let fed: Vec<RecordedEvent> = store
            .read_feed(&from)
            .try_filter(|e| futures::future::ready(e.stream == stream))
            .try_collect()
            .await
            .unwrap();
        if fed.len() == stored.len() {
            let fed_ids: HashSet<_> = fed.iter().map(|e| e.event_id).collect();
            assert_eq!(fed_ids, unique);
            break;
        }
        assert!(
            fed.len() < stored.len(),
            "the feed holds more events than the stream"
        );
        assert!(
            Instant::now() < deadline,
            "the feed stayed at {} of {} events",
            fed.len(),
            stored.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
