//! The repository: loading, conflicts and retries, snapshots, upcasting.

use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use keel::doc::{Counter, CounterEvent, ZeroIncrement};
use keel::{
    Aggregate, Error, EventStore, ExpectedVersion, Metadata, NewEvent, Repository, SnapshotPolicy,
};
use keel_memory::MemoryStore;
use serde::{Deserialize, Serialize};

#[tokio::test]
async fn an_unknown_aggregate_loads_as_default_at_version_zero() {
    let repo = Repository::<Counter>::new(Arc::new(MemoryStore::new()));
    let loaded = repo.load("nobody").await.unwrap();
    assert_eq!((loaded.state, loaded.version), (Counter::default(), 0));
}

#[tokio::test]
async fn a_rejected_command_appends_nothing_and_keeps_the_domain_error() {
    let store = Arc::new(MemoryStore::new());
    let repo = Repository::<Counter>::new(store.clone());
    repo.execute("c", 1).await.unwrap();
    let err = repo.execute("c", 0).await.unwrap_err();
    assert_eq!(err.rejection::<ZeroIncrement>(), Some(&ZeroIncrement));
    assert_eq!(
        store
            .stream_version(&Counter::stream_id("c"))
            .await
            .unwrap(),
        Some(1)
    );
}

#[tokio::test]
async fn execute_retries_a_conflict_and_counts_it() {
    let store = Arc::new(MemoryStore::new());
    let repo = Repository::<Counter>::builder(store.clone())
        .retries(5, Duration::from_millis(1))
        .build();
    // Many concurrent commands on one aggregate: each conflict is retried, none is lost.
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let repo = repo.clone();
            tokio::spawn(async move { repo.execute("hot", 1).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        if t.await.unwrap().is_ok() {
            ok += 1;
        }
    }
    let loaded = repo.load("hot").await.unwrap();
    assert_eq!(
        loaded.state.value, ok,
        "every successful command counted once"
    );
    let m = repo.metrics();
    assert_eq!(m.appends, ok);
    assert_eq!(
        m.conflicts,
        m.retries + (16 - ok),
        "every conflict was retried or reported"
    );
}

#[tokio::test]
async fn a_conflict_beyond_the_retry_limit_is_returned() {
    let store = Arc::new(MemoryStore::new());
    let repo = Repository::<Counter>::builder(store.clone())
        .retries(0, Duration::ZERO)
        .build();
    repo.execute("c", 1).await.unwrap();
    // A save with a stale expectation is refused with the exact versions.
    let stale = repo
        .save(
            "c",
            ExpectedVersion::NoStream,
            &[CounterEvent::Incremented { by: 1 }],
            &Metadata::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            stale,
            Error::Conflict {
                actual: Some(1),
                ..
            }
        ),
        "{stale:?}"
    );
    assert_eq!(repo.metrics().conflicts, 1);
}

#[tokio::test]
async fn metadata_given_to_execute_lands_on_every_event() {
    let store = Arc::new(MemoryStore::new());
    let repo = Repository::<Counter>::new(store.clone());
    let correlation = uuid::Uuid::new_v4();
    repo.execute_with("m", 4, &Metadata::correlated(correlation))
        .await
        .unwrap();
    let events: Vec<_> = store
        .read_stream(&Counter::stream_id("m"), 1)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(events[0].metadata.correlation_id, Some(correlation));
}

#[tokio::test]
async fn snapshot_policy_is_off_by_default() {
    let store = Arc::new(MemoryStore::new());
    let repo = Repository::<Counter>::builder(store.clone())
        .snapshots(store.clone(), SnapshotPolicy::default())
        .build();
    for _ in 0..30 {
        repo.execute("s", 1).await.unwrap();
    }
    assert_eq!(repo.metrics().snapshots_taken, 0);
}

#[tokio::test]
async fn a_snapshot_of_another_schema_version_is_ignored() {
    #[derive(Default, Serialize, Deserialize, Debug, PartialEq)]
    struct CounterV2 {
        value: u64,
    }
    impl Aggregate for CounterV2 {
        const TYPE: &'static str = "counter";
        const SNAPSHOT_VERSION: u32 = 2;
        type Command = u64;
        type Event = CounterEvent;
        type Error = ZeroIncrement;
        fn handle(&self, by: u64) -> Result<Vec<CounterEvent>, ZeroIncrement> {
            Ok(vec![CounterEvent::Incremented { by }])
        }
        fn apply(&mut self, CounterEvent::Incremented { by }: &CounterEvent) {
            self.value += by;
        }
    }
    let store = Arc::new(MemoryStore::new());
    let v1 = Repository::<Counter>::builder(store.clone())
        .snapshots(store.clone(), SnapshotPolicy::Every(2))
        .build();
    for _ in 0..4 {
        v1.execute("x", 1).await.unwrap();
    }
    assert_eq!(v1.metrics().snapshots_taken, 2);
    let v2 = Repository::<CounterV2>::builder(store.clone())
        .snapshots(store.clone(), SnapshotPolicy::Every(2))
        .build();
    let loaded = v2.load("x").await.unwrap();
    assert_eq!(loaded.state.value, 4);
    assert_eq!(
        v2.metrics().snapshot_hits,
        0,
        "the v1 snapshot was not used"
    );
    assert_eq!(v2.metrics().events_replayed, 4);
}

/// A store on which every append conflicts, counting the attempts.
struct AlwaysConflicts {
    inner: MemoryStore,
    appends: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl EventStore for AlwaysConflicts {
    async fn append(
        &self,
        stream: &keel::StreamId,
        expected: ExpectedVersion,
        _: Vec<NewEvent>,
    ) -> keel::Result<keel::AppendResult> {
        self.appends
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Err(Error::Conflict {
            stream: stream.clone(),
            expected,
            actual: Some(99),
        })
    }
    fn read_stream<'a>(
        &'a self,
        stream: &'a keel::StreamId,
        from_version: u64,
    ) -> keel::store::EventStream<'a> {
        self.inner.read_stream(stream, from_version)
    }
    fn read_slice(&self, slice: u32, from_position: u64) -> keel::store::EventStream<'_> {
        self.inner.read_slice(slice, from_position)
    }
    async fn stream_version(&self, stream: &keel::StreamId) -> keel::Result<Option<u64>> {
        self.inner.stream_version(stream).await
    }
    async fn feed_heads(&self) -> keel::Result<keel::Cursor> {
        self.inner.feed_heads().await
    }
}

/// The README's stack, a `RetryLayer` over a handler that runs a repository, tries a hot
/// command as often as the repository alone says (1 + 3), not (1 + 3) x (1 + 3) times.
#[tokio::test]
async fn retries_do_not_multiply_across_the_bus_and_the_repository() {
    #[derive(Clone, Debug)]
    struct Add(u64);
    impl keel::bus::Command for Add {
        type Output = u64;
    }
    let store = Arc::new(AlwaysConflicts {
        inner: MemoryStore::new(),
        appends: Default::default(),
    });
    let counters = Repository::<Counter>::builder(store.clone())
        .retries(3, Duration::ZERO)
        .build();
    let bus = keel::CommandBus::builder()
        .layer(keel::bus::RetryLayer::new(3, Duration::ZERO))
        .command(move |Add(by), _| {
            let counters = counters.clone();
            async move { Ok(counters.execute("hot", by).await?.version) }
        })
        .unwrap()
        .build();
    let err = bus.send(Add(1)).await.unwrap_err();
    assert!(err.is_conflict(), "{err}");
    assert_eq!(
        store.appends.load(std::sync::atomic::Ordering::SeqCst),
        4,
        "one try and the repository's three retries"
    );
}
