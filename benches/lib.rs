//! Keel's benchmarks live in `benches/`; run them with `./scripts/bench`. This library holds
//! what the benchmark targets share.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use keel::codec::{Codec, KeyStore};
use keel::doc::Counter;
use keel::projection::Projection;
use keel::{
    BoxError, Command, CommandBus, EventStore, ExpectedVersion, Metadata, NewEvent, RecordedEvent,
    Repository, StreamId,
};

/// The command of the command benchmarks: add `by` to counter `id`.
#[derive(Clone)]
pub struct Increment {
    /// The counter's id.
    pub id: String,
    /// How much to add.
    pub by: u64,
}

impl Command for Increment {
    type Output = u64;
}

/// A bus whose `Increment` handler runs the command through `repo` and answers the version
/// reached: the path of one command end to end.
pub fn counter_bus(repo: Repository<Counter>) -> CommandBus {
    CommandBus::builder()
        .command(move |c: Increment, meta: Metadata| {
            let repo = repo.clone();
            async move { Ok(repo.execute_with(&c.id, c.by, &meta).await?.version) }
        })
        .expect("one handler")
        .build()
}

/// A projection that sums the `by` of counter events: cheap, so a rebuild benchmark measures
/// the manager and the feed rather than the read model. Other events are skipped.
pub struct Tally {
    name: String,
    /// The sum so far.
    pub sum: AtomicU64,
}

impl Tally {
    /// A tally projection called `name` (several can run on one store).
    pub fn named(name: impl Into<String>) -> Self {
        Tally {
            name: name.into(),
            sum: AtomicU64::new(0),
        }
    }
}

impl Default for Tally {
    fn default() -> Self {
        Tally::named("tally")
    }
}

#[async_trait::async_trait]
impl Projection for Tally {
    fn name(&self) -> &str {
        &self.name
    }

    fn handles(&self, event_type: &str) -> bool {
        event_type == "Incremented"
    }

    async fn apply(&self, _generation: u64, event: &RecordedEvent) -> Result<(), BoxError> {
        let keel::doc::CounterEvent::Incremented { by } = event.decode()?;
        self.sum.fetch_add(by, Ordering::Relaxed);
        Ok(())
    }

    async fn reset(&self, _generation: u64) -> Result<(), BoxError> {
        self.sum.store(0, Ordering::Relaxed);
        Ok(())
    }

    async fn activate(&self, _generation: u64) -> Result<(), BoxError> {
        Ok(())
    }
}

/// An order of ten lines, about 1 KB of JSON: a typical business event, for the codec
/// benchmarks.
pub fn order_payload(n: u64) -> Bytes {
    let lines: Vec<_> = (0..10)
        .map(|i| {
            serde_json::json!({
                "sku": format!("SKU-{:06}", (n * 10 + i) % 1_000_000),
                "description": "stainless steel water bottle, 750 ml, blue",
                "quantity": i + 1,
                "unit_price_cents": 1999 + i * 100,
            })
        })
        .collect();
    let order = serde_json::json!({ "OrderPlaced": {
        "order_id": format!("order-{n}"),
        "customer": { "name": "Ada Lovelace", "email": "ada@example.com",
                      "address": "12 St James's Square, London SW1Y 4JH" },
        "lines": lines,
        "currency": "EUR",
    }});
    Bytes::from(serde_json::to_vec(&order).expect("json encodes"))
}

/// The codecs the benchmarks compare: none (plain JSON, the baseline), LZ4 above 256 bytes,
/// AES-256-GCM per stream, and both.
pub fn codecs(keys: Arc<dyn KeyStore>) -> Vec<(&'static str, Option<Arc<Codec>>)> {
    vec![
        ("plain JSON (baseline)", None),
        ("lz4", Some(Codec::builder().compress_above(256).build())),
        (
            "aes-256-gcm",
            Some(Codec::builder().encrypt_streams(keys.clone()).build()),
        ),
        (
            "lz4 + aes-256-gcm",
            Some(
                Codec::builder()
                    .compress_above(256)
                    .encrypt_streams(keys)
                    .build(),
            ),
        ),
    ]
}

/// `store` behind `codec`, or `store` itself.
pub fn encoded(store: Arc<dyn EventStore>, codec: &Option<Arc<Codec>>) -> Arc<dyn EventStore> {
    match codec {
        Some(codec) => codec.events(store),
        None => store,
    }
}

/// Appends `count` order events to `stream` in commits of 100.
pub async fn fill(store: &dyn EventStore, stream: &StreamId, count: u64) {
    for start in (0..count).step_by(100) {
        let events = (start..(start + 100).min(count))
            .map(|n| NewEvent::new("OrderPlaced", 1, order_payload(n)))
            .collect();
        store
            .append(stream, ExpectedVersion::from_version(start), events)
            .await
            .expect("append");
    }
}

/// Reads `stream` by pages and parses every payload's JSON (what loading an aggregate does
/// besides applying); returns the number of events.
pub async fn read_and_parse(store: &dyn EventStore, stream: &StreamId) -> usize {
    let mut pages = store.read_stream_pages(stream, 1);
    let mut n = 0;
    while let Some(page) = pages.try_next().await.expect("read") {
        for event in page.iter() {
            let json = event.json().expect("readable");
            let value: serde_json::Value = serde_json::from_slice(&json).expect("json");
            n += value.is_object() as usize;
        }
    }
    n
}
