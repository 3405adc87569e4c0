//! What Keel records through the `metrics` facade, read back with a debugging recorder
//! (installed once for this test binary: a recorder is process-wide).

use std::sync::Arc;

use keel::bus::{Command, CommandBus, MetricsLayer};
use keel::doc::Counter;
use keel::projection::{Generations, Projection, ProjectionManager};
use keel::{BoxError, RecordedEvent, Repository};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

#[derive(Clone)]
struct Bump(String);
impl Command for Bump {
    type Output = u64;
}

#[derive(Default)]
struct Count(Generations<u64>);

#[async_trait::async_trait]
impl Projection for Count {
    fn name(&self) -> &str {
        "count"
    }
    async fn apply(&self, generation: u64, _: &RecordedEvent) -> Result<(), BoxError> {
        self.0.update(generation, |n| *n += 1);
        Ok(())
    }
    async fn reset(&self, generation: u64) -> Result<(), BoxError> {
        self.0.reset(generation);
        Ok(())
    }
    async fn activate(&self, generation: u64) -> Result<(), BoxError> {
        self.0.activate(generation);
        Ok(())
    }
}

#[tokio::test]
async fn components_record_their_documented_metrics() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");

    let store = Arc::new(keel_memory::MemoryStore::new());
    let repo = Repository::<Counter>::new(store.clone());
    let bus = CommandBus::builder()
        .layer(MetricsLayer::new())
        .command(move |Bump(id), meta| {
            let repo = repo.clone();
            async move { Ok(repo.execute_with(&id, 1, &meta).await?.version) }
        })
        .unwrap()
        .build();
    for _ in 0..3 {
        bus.send(Bump("a".into())).await.unwrap();
    }
    let manager =
        ProjectionManager::builder(store.clone(), store.clone(), store.clone(), store.clone())
            .projection(Arc::new(Count::default()))
            .build();
    manager.catch_up("count").await.unwrap();

    // Payload codecs: one compressed and encrypted append, a shredding, an unreadable read.
    let codec = keel::codec::Codec::builder()
        .compress_above(16)
        .encrypt_streams(store.clone())
        .build();
    let encoded = codec.events(store.clone());
    let stream = keel::StreamId::new("secret-1");
    let body =
        serde_json::to_vec(&serde_json::json!({ "Noted": { "text": "x".repeat(200) } })).unwrap();
    keel::EventStore::append(
        &*encoded,
        &stream,
        keel::ExpectedVersion::NoStream,
        vec![keel::NewEvent::new("Noted", 1, body)],
    )
    .await
    .unwrap();
    codec.shred("secret-1").await.unwrap();
    let read: Vec<RecordedEvent> =
        futures::TryStreamExt::try_collect(keel::EventStore::read_stream(&*encoded, &stream, 1))
            .await
            .unwrap();
    assert!(read[0].is_shredded());

    let snapshot = snapshotter.snapshot().into_vec();
    let counter = |name: &str| -> u64 {
        snapshot
            .iter()
            .filter(|(key, ..)| key.key().name() == name)
            .map(|(.., value)| match value {
                DebugValue::Counter(n) => *n,
                _ => 0,
            })
            .sum()
    };
    let histogram_len = |name: &str| -> usize {
        snapshot
            .iter()
            .filter(|(key, ..)| key.key().name() == name)
            .map(|(.., value)| match value {
                DebugValue::Histogram(v) => v.len(),
                _ => 0,
            })
            .sum()
    };
    assert_eq!(counter(keel::metrics::DISPATCHED), 3);
    assert_eq!(counter(keel::metrics::DISPATCH_FAILURES), 0);
    assert_eq!(histogram_len(keel::metrics::DISPATCH_SECONDS), 3);
    assert_eq!(counter(keel::metrics::APPENDS), 3);
    // The first command loads the aggregate; the cache serves the next two.
    assert_eq!(counter(keel::metrics::LOADS), 1);
    assert_eq!(counter(keel::metrics::EVENTS_REPLAYED), 0);
    assert_eq!(counter(keel::metrics::CACHE_MISSES), 1);
    assert_eq!(counter(keel::metrics::CACHE_HITS), 2);
    assert_eq!(histogram_len(keel::metrics::EVENTS_PER_APPEND), 3);
    assert_eq!(counter("keel_projection_events_total"), 3);
    assert_eq!(counter(keel::metrics::PAYLOADS_COMPRESSED), 1);
    assert_eq!(counter(keel::metrics::PAYLOADS_ENCRYPTED), 1);
    assert_eq!(counter(keel::metrics::SUBJECTS_SHREDDED), 1);
    assert_eq!(counter(keel::metrics::PAYLOADS_UNREADABLE), 1);
    assert!(snapshot.iter().any(|(key, ..)| {
        key.key().name() == keel::metrics::PAYLOADS_UNREADABLE
            && key.key().labels().any(|l| l.value() == "shredded")
    }));
    let labelled = snapshot.iter().any(|(key, ..)| {
        key.key().name() == keel::metrics::DISPATCHED
            && key.key().labels().any(|l| l.value() == "Bump")
    });
    assert!(labelled, "dispatch metrics carry the message type");
}
