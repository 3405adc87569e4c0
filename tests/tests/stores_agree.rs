//! The two stores are interchangeable: the same commands through the same repository leave
//! the same streams, states and per-stream feed order on both.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use keel::doc::Counter;
use keel::{Aggregate, EventStore, Metadata, RecordedEvent, Repository, SnapshotPolicy};

fn nodes() -> String {
    std::env::var("KEEL_SCYLLA_NODES").unwrap_or_else(|_| "127.0.0.1:9042".into())
}

/// An event without what legitimately differs between stores (ids, timestamps, positions):
/// version, type, schema version, payload, correlation id.
type Shape = (u64, String, u32, Vec<u8>, Option<uuid::Uuid>);

fn shape(events: &[RecordedEvent]) -> Vec<Shape> {
    events
        .iter()
        .map(|e| {
            (
                e.version,
                e.event_type.to_string(),
                e.schema_version,
                e.payload.to_vec(),
                e.metadata.correlation_id,
            )
        })
        .collect()
}

async fn drive<S>(store: Arc<S>, ids: &[String], correlation: uuid::Uuid) -> Vec<(u64, u64)>
where
    S: EventStore + keel::SnapshotStore,
{
    let repo = Repository::<Counter>::builder(store.clone())
        .snapshots(store.clone(), SnapshotPolicy::Every(7))
        .build();
    let meta = Metadata::correlated(correlation);
    for round in 1..=10u64 {
        for id in ids {
            repo.execute_with(id, round, &meta).await.unwrap();
        }
    }
    // A refused command changes nothing on either store.
    assert!(repo.execute(&ids[0], 0).await.is_err());
    let mut states = Vec::new();
    for id in ids {
        let loaded = repo.load(id).await.unwrap();
        states.push((loaded.state.value, loaded.version));
    }
    states
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_and_scylla_store_the_same_history() {
    let memory = Arc::new(keel_memory::MemoryStore::new());
    let keyspace = format!(
        "keel_agree_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let scylla = Arc::new(
        keel_scylla::KeelScylla::builder()
            .known_nodes(nodes().split(','))
            .keyspace(&keyspace)
            .bucket_size(8) // many bucket boundaries in a short stream
            .build()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "no CQL node at {}: {e}; run ./scripts/scylla-node start",
                    nodes()
                )
            }),
    );
    let ids: Vec<String> = (0..3).map(|i| format!("c{i}")).collect();
    let correlation = uuid::Uuid::new_v4();
    let on_memory = drive(memory.clone(), &ids, correlation).await;
    let on_scylla = drive(scylla.clone(), &ids, correlation).await;
    assert_eq!(on_memory, on_scylla);
    assert_eq!(on_memory[0], (55, 10));

    for id in &ids {
        let stream = Counter::stream_id(id);
        let m: Vec<_> = memory.read_stream(&stream, 1).try_collect().await.unwrap();
        let s: Vec<_> = scylla.read_stream(&stream, 1).try_collect().await.unwrap();
        assert_eq!(shape(&m), shape(&s), "stream {stream}");
    }

    // Both feeds hold the 30 events once, each stream in version order.
    let deadline = Instant::now() + Duration::from_secs(20);
    let fed = loop {
        let fed: Vec<RecordedEvent> = scylla
            .read_feed(&keel::Cursor::new())
            .try_collect()
            .await
            .unwrap();
        if fed.len() >= 30 || Instant::now() > deadline {
            break fed;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mem_feed: Vec<RecordedEvent> = memory
        .read_feed(&keel::Cursor::new())
        .try_collect()
        .await
        .unwrap();
    assert_eq!((fed.len(), mem_feed.len()), (30, 30));
    for id in &ids {
        let stream = Counter::stream_id(id);
        let order = |feed: &[RecordedEvent]| {
            feed.iter()
                .filter(|e| e.stream == stream)
                .map(|e| e.version)
                .collect::<Vec<_>>()
        };
        assert_eq!(order(&fed), (1..=10).collect::<Vec<_>>());
        assert_eq!(order(&fed), order(&mem_feed));
        // Both stores put a stream in the same slice: the hash is keel's, and both have 64.
        let slice_in =
            |feed: &[RecordedEvent]| feed.iter().find(|e| e.stream == stream).map(|e| e.slice);
        assert_eq!(slice_in(&fed), slice_in(&mem_feed));
    }
    scylla.shutdown().await;
    scylla
        .session()
        .query_unpaged(format!("DROP KEYSPACE {keyspace}"), ())
        .await
        .unwrap();
}
