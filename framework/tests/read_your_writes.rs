//! Read-your-writes through the buses: a command's reply names its write, and a query asked
//! after it waits until the projection shows it, past a cache that still holds the answer
//! from before.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keel::bus::CacheLayer;
use keel::doc::{Counter, CounterEvent};
use keel::feed::Written;
use keel::projection::{Generations, Projection, ProjectionManager, Visibility};
use keel::{BoxError, Query, QueryBus, RecordedEvent, Repository};
use keel_memory::MemoryStore;

/// Each counter's total, by stream.
#[derive(Clone, Default)]
struct Totals(Generations<std::collections::HashMap<String, u64>>);

#[async_trait]
impl Projection for Totals {
    fn name(&self) -> &str {
        "totals"
    }

    async fn apply(&self, generation: u64, event: &RecordedEvent) -> Result<(), BoxError> {
        let CounterEvent::Incremented { by } = event.decode()?;
        self.0.update(generation, |totals| {
            *totals.entry(event.stream.to_string()).or_default() += by;
        });
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

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Total(String);
impl Query for Total {
    type Output = u64;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_after_a_write_sees_it_and_a_cache_does_not_hide_it() {
    let store = Arc::new(MemoryStore::new());
    let repo = Repository::<Counter>::new(store.clone());
    let totals = Totals::default();
    let model = totals.clone();
    let bus = QueryBus::builder()
        .layer(CacheLayer::new(Duration::from_secs(600)))
        .query(move |Total(stream), _| {
            let model = model.clone();
            async move { Ok(model.0.read(|t| t.get(&stream).copied().unwrap_or(0))) }
        })
        .unwrap()
        .build();
    let manager =
        ProjectionManager::builder(store.clone(), store.clone(), store.clone(), store.clone())
            .projection(Arc::new(totals))
            .poll_interval(Duration::from_millis(5))
            .build();
    let visibility = Visibility::new(store.clone(), store.clone());
    let wait = Duration::from_secs(10);

    let first = repo.execute("c-1", 5).await.unwrap();
    manager.start();
    let stream = first.stream.to_string();
    let seen = bus
        .ask_after(
            &visibility,
            "totals",
            &first.written(),
            wait,
            Total(stream.clone()),
        )
        .await
        .unwrap();
    assert_eq!(seen, 5);

    // The plain ask is now cached at 5; a second write is not in that answer.
    let second = repo.execute("c-1", 2).await.unwrap();
    assert_eq!(second.written(), Written::new(&stream, 2));
    visibility
        .wait_for("totals", &second.written(), wait)
        .await
        .unwrap();
    assert_eq!(
        bus.ask(Total(stream.clone())).await.unwrap(),
        5,
        "a plain ask is answered from the cache, from before the write"
    );
    let after = bus
        .ask_after(
            &visibility,
            "totals",
            &second.written(),
            wait,
            Total(stream.clone()),
        )
        .await
        .unwrap();
    assert_eq!(after, 7, "asked after the write, past the cached 5");
    assert_eq!(
        bus.ask(Total(stream.clone())).await.unwrap(),
        7,
        "the fresh answer replaced the cached one"
    );

    // A write that never happened: the query is not asked, the timeout says what was waited for.
    let never = Written::new(&stream, 9);
    let e = bus
        .ask_after(
            &visibility,
            "totals",
            &never,
            Duration::from_millis(50),
            Total(stream.clone()),
        )
        .await
        .unwrap_err();
    assert!(e.is_timeout(), "{e}");
    assert!(
        e.to_string().contains("totals") && e.to_string().contains("version 9"),
        "{e}"
    );
    manager.stop().await;
}

#[tokio::test]
async fn a_cached_active_generation_is_kept_until_it_is_refreshed() {
    use keel::projection::{generation_key, ActiveGeneration};
    use keel::{CheckpointStore, Fence};
    let store = Arc::new(MemoryStore::new());
    let active = ActiveGeneration::new(store.clone(), "posts").cache_for(Duration::from_secs(3600));
    assert_eq!(
        active.get().await.unwrap(),
        1,
        "no switch yet: generation 1"
    );
    let fence = Fence::new("projection posts", 1);
    store
        .save_checkpoint(&generation_key("posts"), 2, &fence)
        .await
        .unwrap();
    assert_eq!(active.get().await.unwrap(), 1, "within the cache time");
    assert_eq!(active.refresh().await.unwrap(), 2, "read from the store");
    assert_eq!(
        active.get().await.unwrap(),
        2,
        "the refreshed one is cached"
    );
    let uncached = ActiveGeneration::new(store, "posts").cache_for(Duration::ZERO);
    assert_eq!(uncached.get().await.unwrap(), 2);
}
