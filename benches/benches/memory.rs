//! Keel on the memory store against hand-written baselines, measured in the same run.
//!
//! `cargo bench -p keel-benches --bench memory` (or `./scripts/bench`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures::TryStreamExt;
use keel::doc::{Counter, CounterEvent};
use keel::{
    Aggregate, CommandBus, EventStore, ExpectedVersion, Metadata, NewEvent, Repository,
    SnapshotPolicy,
};
use keel_benches::{counter_bus, Increment};
use keel_memory::MemoryStore;

const STREAM_LEN: u64 = 10_000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Aggregates the command benchmarks spread their commands over.
const AGGREGATES: u64 = 100_000;

/// Events each aggregate has before the `command_warm` group's timed commands.
const WARM_EVENTS: u64 = 2;

/// One command through the bus and the repository to a memory append, against hand-written
/// loops doing the same work by hand: load the aggregate's events from a map, decode them,
/// apply, decide, encode the new event and push it.
///
/// Every sample starts from empty maps and its commands go round 100,000 aggregates, so most
/// commands create their aggregate and the rest meet a history of a few events: this weighs
/// the framework's fixed cost per command, not replay (the `replay` group measures that).
/// Keel's side runs on a current-thread runtime entered once per sample, as in an
/// application that is already async.
fn command(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("command");
    group.bench_function("baseline: hand-written map loop", |b| {
        b.iter_custom(|iters| {
            let mut streams = HashMap::new();
            let started = std::time::Instant::now();
            for n in 1..=iters {
                bare_command(&mut streams, n);
            }
            started.elapsed()
        })
    });
    // The same loop keeping what an event store keeps: the ratio to this one is the
    // framework's own overhead.
    group.bench_function(
        "reference: hand-written loop keeping ids, versions, times, a log",
        |b| {
            b.iter_custom(|iters| {
                let mut log = Log::default();
                let started = std::time::Instant::now();
                for n in 1..=iters {
                    log.command(n);
                }
                started.elapsed()
            })
        },
    );
    group.bench_function("keel: bus -> repository -> memory", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            // The default cache (10,000 entries) misses on a round-robin over 100,000: the
            // cache is sized to the working set here, and turned off in the next line.
            let repo = Repository::<Counter>::builder(Arc::new(MemoryStore::new()))
                .cache(AGGREGATES as usize, None)
                .build();
            let bus = counter_bus(repo);
            let started = std::time::Instant::now();
            for n in 1..=iters {
                let id = format!("c-{}", n % AGGREGATES);
                bus.send(Increment { id, by: 1 }).await.unwrap();
            }
            started.elapsed()
        })
    });
    group.bench_function("keel: bus -> repository -> memory, cache off", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let repo = Repository::<Counter>::builder(Arc::new(MemoryStore::new()))
                .cache(0, None)
                .build();
            let bus = counter_bus(repo);
            let started = std::time::Instant::now();
            for n in 1..=iters {
                let id = format!("c-{}", n % AGGREGATES);
                bus.send(Increment { id, by: 1 }).await.unwrap();
            }
            started.elapsed()
        })
    });
    group.finish();

    // The same command on aggregates that already exist: each sample first gives every one of
    // the 100,000 aggregates two events (untimed), then times commands round-robin over them,
    // so every command meets a short history (two to a few events) and, with the cache on, a
    // cached aggregate. The group above mostly creates aggregates (a sample runs fewer
    // commands than there are aggregates), which no cache can help with.
    let mut group = c.benchmark_group("command_warm");
    group.bench_function("reference: hand-written loop, short histories", |b| {
        b.iter_custom(|iters| {
            let mut log = Log::default();
            for n in 1..=WARM_EVENTS * AGGREGATES {
                log.command(n);
            }
            let started = std::time::Instant::now();
            for n in 1..=iters {
                log.command(n);
            }
            started.elapsed()
        })
    });
    for (label, capacity) in [
        (
            "keel: bus -> repository -> memory, short histories, cache on",
            AGGREGATES as usize,
        ),
        (
            "keel: bus -> repository -> memory, short histories, cache off",
            0,
        ),
    ] {
        group.bench_function(label, |b| {
            b.to_async(&rt).iter_custom(|iters| async move {
                let repo = Repository::<Counter>::builder(Arc::new(MemoryStore::new()))
                    .cache(capacity, None)
                    .build();
                let bus = counter_bus(repo);
                for n in 1..=WARM_EVENTS * AGGREGATES {
                    let id = format!("c-{}", n % AGGREGATES);
                    bus.send(Increment { id, by: 1 }).await.unwrap();
                }
                let started = std::time::Instant::now();
                for n in 1..=iters {
                    let id = format!("c-{}", n % AGGREGATES);
                    bus.send(Increment { id, by: 1 }).await.unwrap();
                }
                started.elapsed()
            })
        });
    }
    group.finish();

    // Where the time goes, each from empty maps per sample like the command itself.
    let mut group = c.benchmark_group("command_parts");
    // Where the time goes: the bus alone (a handler that does nothing), the repository alone
    // (no bus), and the store alone (read the stream's pages, append one encoded event).
    group.bench_function("part: bus only, empty handler", |b| {
        let bus = CommandBus::builder()
            .command(|c: Increment, _meta: Metadata| async move { Ok(c.by) })
            .unwrap()
            .build();
        let n = AtomicU64::new(0);
        b.to_async(&rt).iter(|| async {
            let id = format!("c-{}", next(&n) % AGGREGATES);
            bus.send(Increment { id, by: 1 }).await.unwrap()
        })
    });
    group.bench_function("part: repository only, no bus", |b| {
        let repo = Repository::<Counter>::new(Arc::new(MemoryStore::new()));
        let meta = Metadata::default();
        let n = AtomicU64::new(0);
        b.to_async(&rt).iter(|| async {
            let id = format!("c-{}", next(&n) % AGGREGATES);
            repo.execute_with(&id, 1, &meta).await.unwrap().version
        })
    });
    group.bench_function("part: store only, read pages + append", |b| {
        let store = MemoryStore::new();
        let payload =
            Bytes::from(serde_json::to_vec(&CounterEvent::Incremented { by: 1 }).unwrap());
        let n = AtomicU64::new(0);
        b.to_async(&rt).iter(|| async {
            let stream = keel::StreamId::new(format!("counter-c-{}", next(&n) % AGGREGATES));
            let mut pages = store.read_stream_pages(&stream, 1);
            let mut version = 0;
            while let Some(page) = pages.try_next().await.unwrap() {
                version = page.last().map_or(version, |e| e.version);
            }
            drop(pages);
            let event = NewEvent::new("Incremented", 1, payload.clone());
            store
                .append(&stream, ExpectedVersion::from_version(version), vec![event])
                .await
                .unwrap()
        })
    });
    group.finish();
}

/// Commands per aggregate in the `hot_aggregate` group: one aggregate at a time takes this
/// many commands in a row, as a new user's first benchmark would do.
const HOT_LENGTHS: [u64; 3] = [20, 200, 1_000];

/// One aggregate at a time, `length` commands in a row, through the repository on a fresh
/// memory store (no snapshots, no bus): with the aggregate cache (the default) and without
/// (every command loads and replays its stream). Reported per command.
fn hot_aggregate(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("hot_aggregate");
    group.throughput(Throughput::Elements(1));
    for length in HOT_LENGTHS {
        for (label, entries) in [("cache on", 10_000), ("cache off", 0)] {
            group.bench_function(format!("{label}, {length} commands per aggregate"), |b| {
                b.to_async(&rt).iter_custom(|iters| async move {
                    let repo = Repository::<Counter>::builder(Arc::new(MemoryStore::new()))
                        .cache(entries, None)
                        .build();
                    let meta = Metadata::default();
                    let mut id = String::new();
                    let started = std::time::Instant::now();
                    for n in 0..iters {
                        if n % length == 0 {
                            id = format!("hot-{}", n / length);
                        }
                        repo.execute_with(&id, 1, &meta).await.unwrap();
                    }
                    started.elapsed()
                })
            });
        }
    }
    group.finish();
}

/// The bus alone, from a handler called directly to one behind the layers an application
/// typically stacks (trace, metrics, timeout, retry on conflict), with and without a metrics
/// recorder (Prometheus) installed. The handler does nothing but answer.
fn bus(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("bus");
    let handler = |c: Increment, _meta: Metadata| async move { Ok::<_, keel::Error>(c.by) };
    group.bench_function("baseline: the handler called directly", |b| {
        b.to_async(&rt).iter(|| async {
            handler(
                Increment {
                    id: String::new(),
                    by: 1,
                },
                Metadata::default(),
            )
            .await
            .unwrap()
        })
    });
    let bare = CommandBus::builder().command(handler).unwrap().build();
    group.bench_function("keel: no layers", |b| {
        b.to_async(&rt).iter(|| async {
            bare.send(Increment {
                id: String::new(),
                by: 1,
            })
            .await
            .unwrap()
        })
    });
    // Each its own bus: the metrics layer registers a type's handles with the recorder of
    // the type's first dispatch.
    let layered = || {
        CommandBus::builder()
            .layer(keel::bus::TraceLayer)
            .layer(keel::bus::MetricsLayer::new())
            .layer(keel::bus::TimeoutLayer::new(Duration::from_secs(5)))
            .layer(keel::bus::RetryLayer::new(3, Duration::from_millis(1)))
            .command(handler)
            .unwrap()
            .build()
    };
    let (layered, recorded) = (layered(), layered());
    group.bench_function("keel: trace, metrics, timeout, retry", |b| {
        b.to_async(&rt).iter(|| async {
            layered
                .send(Increment {
                    id: String::new(),
                    by: 1,
                })
                .await
                .unwrap()
        })
    });
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    group.bench_function("keel: the same layers, Prometheus recorder", |b| {
        b.iter_custom(|iters| {
            metrics::with_local_recorder(&recorder, || {
                rt.block_on(async {
                    let started = std::time::Instant::now();
                    for _ in 0..iters {
                        recorded
                            .send(Increment {
                                id: String::new(),
                                by: 1,
                            })
                            .await
                            .unwrap();
                    }
                    started.elapsed()
                })
            })
        })
    });
    group.finish();
}

/// Command `n` of the bare loop: decode and apply the aggregate's events, decide, push the
/// encoded event. It keeps nothing but the payloads.
fn bare_command(streams: &mut HashMap<String, Vec<Bytes>>, n: u64) {
    let id = format!("c-{}", n % AGGREGATES);
    let events = streams.entry(id).or_default();
    let mut state = Counter::default();
    for payload in events.iter() {
        let event: CounterEvent = serde_json::from_slice(payload).unwrap();
        state.apply(&event);
    }
    for e in state.handle(1).unwrap() {
        events.push(Bytes::from(serde_json::to_vec(&e).unwrap()));
    }
}

/// An event as the reference loop keeps it: what a Keel event carries.
#[allow(dead_code)] // Kept, as a store keeps it; only the payload is read back.
struct Stored {
    id: uuid::Uuid,
    stream: Arc<str>,
    version: u64,
    position: u64,
    recorded_at: i64,
    event_type: &'static str,
    schema_version: u32,
    correlation_id: uuid::Uuid,
    causation_id: uuid::Uuid,
    user: std::collections::BTreeMap<String, String>,
    payload: Bytes,
}

/// The reference loop's store, written plainly by hand: each aggregate's name and events, and
/// a global log in commit order sharing the events.
#[derive(Default)]
struct Log {
    streams: HashMap<String, (Arc<str>, Vec<Arc<Stored>>)>,
    log: Vec<Arc<Stored>>,
}

impl Log {
    /// Command `n`: as the bare loop, and the new event gets an id, its stream, version and
    /// feed position, the time, the command's correlation and causation ids.
    fn command(&mut self, n: u64) {
        let id = format!("c-{}", n % AGGREGATES);
        let (stream, events) = self
            .streams
            .entry(id)
            .or_insert_with_key(|id| (Arc::from(format!("counter-{id}")), Vec::new()));
        let mut state = Counter::default();
        for stored in events.iter() {
            let event: CounterEvent = serde_json::from_slice(&stored.payload).unwrap();
            state.apply(&event);
        }
        let (correlation_id, causation_id) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        for e in state.handle(1).unwrap() {
            let stored = Arc::new(Stored {
                id: uuid::Uuid::new_v4(),
                stream: stream.clone(),
                version: events.len() as u64 + 1,
                position: self.log.len() as u64 + 1,
                recorded_at: keel::event::now_millis(),
                event_type: "Incremented",
                schema_version: 1,
                correlation_id,
                causation_id,
                user: Default::default(),
                payload: Bytes::from(serde_json::to_vec(&e).unwrap()),
            });
            events.push(stored.clone());
            self.log.push(stored);
        }
    }
}

/// Appends from 8 tasks on a two-thread runtime, each to 5,000 streams of its own, one event
/// per append, into a fresh store per iteration: against a hand-written concurrent store doing
/// the least a store with one global order must (a DashMap of streams holding the payloads,
/// and a log behind a mutex).
fn concurrent(c: &mut Criterion) {
    const TASKS: u64 = 8;
    const APPENDS: u64 = 5_000;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let payload = Bytes::from(serde_json::to_vec(&CounterEvent::Incremented { by: 1 }).unwrap());
    let mut group = c.benchmark_group("concurrent_append");
    group
        .sample_size(20)
        .throughput(Throughput::Elements(TASKS * APPENDS));
    group.bench_function("baseline: DashMap of streams + a log behind a mutex", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let streams = Arc::new(dashmap::DashMap::<String, Vec<Bytes>>::new());
                let log = Arc::new(std::sync::Mutex::new(Vec::<Bytes>::new()));
                let started = std::time::Instant::now();
                rt.block_on(spawn_all((0..TASKS).map(|t| {
                    let (streams, log, payload) = (streams.clone(), log.clone(), payload.clone());
                    async move {
                        for i in 0..APPENDS {
                            let mut stream = streams.entry(format!("s-{t}-{i}")).or_default();
                            log.lock().unwrap().push(payload.clone());
                            stream.push(payload.clone());
                        }
                    }
                })));
                total += started.elapsed();
            }
            total
        })
    });
    group.bench_function("keel: MemoryStore::append", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let store = Arc::new(MemoryStore::new());
                let started = std::time::Instant::now();
                rt.block_on(spawn_all((0..TASKS).map(|t| {
                    let (store, payload) = (store.clone(), payload.clone());
                    async move {
                        for i in 0..APPENDS {
                            let stream = keel::StreamId::new(format!("s-{t}-{i}"));
                            let event = NewEvent::new("Incremented", 1, payload.clone());
                            store
                                .append(&stream, ExpectedVersion::NoStream, vec![event])
                                .await
                                .unwrap();
                        }
                    }
                })));
                total += started.elapsed();
            }
            total
        })
    });
    group.finish();
}

/// Spawns the futures on the current runtime and waits for all of them.
async fn spawn_all<F>(tasks: impl Iterator<Item = F>)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let handles: Vec<_> = tasks.map(tokio::spawn).collect();
    for handle in handles {
        handle.await.unwrap();
    }
}

fn next(n: &AtomicU64) -> u64 {
    n.fetch_add(1, Ordering::Relaxed) + 1
}

fn counter_payloads() -> Vec<Bytes> {
    (0..STREAM_LEN)
        .map(|i| {
            Bytes::from(serde_json::to_vec(&CounterEvent::Incremented { by: i % 7 + 1 }).unwrap())
        })
        .collect()
}

async fn filled_store(policy: SnapshotPolicy) -> (Arc<MemoryStore>, Repository<Counter>) {
    let store = Arc::new(MemoryStore::new());
    let repo = Repository::<Counter>::builder(store.clone())
        .snapshots(store.clone(), policy)
        .build();
    let stream = Counter::stream_id("long");
    let events: Vec<NewEvent> = (0..STREAM_LEN)
        .map(|i| {
            NewEvent::encode(
                &CounterEvent::Incremented { by: i % 7 + 1 },
                Metadata::default(),
            )
            .unwrap()
        })
        .collect();
    for (i, chunk) in events.chunks(1_000).enumerate() {
        store
            .append(
                &stream,
                ExpectedVersion::from_version(i as u64 * 1_000),
                chunk.to_vec(),
            )
            .await
            .unwrap();
    }
    (store, repo)
}

/// Loading a 10,000-event aggregate by replay, against decoding and applying the same payloads
/// from a Vec in a hand-written loop.
fn replay(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("replay_10k");
    group.measurement_time(Duration::from_secs(5));
    let payloads = counter_payloads();
    group.bench_function("baseline: hand-written apply loop", |b| {
        b.iter(|| {
            let mut state = Counter::default();
            for p in &payloads {
                let e: CounterEvent = serde_json::from_slice(p).unwrap();
                state.apply(&e);
            }
            state.value
        })
    });
    let (_store, repo) = rt.block_on(filled_store(SnapshotPolicy::Never));
    group.bench_function("keel: repository load", |b| {
        b.iter(|| rt.block_on(repo.load("long")).unwrap().state.value)
    });
    group.finish();
}

/// Loading the same aggregate with a snapshot at version 10,000 against without.
fn snapshot(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("load_10k_snapshot");
    let (store, _) = rt.block_on(filled_store(SnapshotPolicy::Never));
    // A repository with no snapshot store replays everything; one with it starts from the
    // snapshot saved below at version 10,000.
    let plain = Repository::<Counter>::new(store.clone());
    let with = Repository::<Counter>::builder(store.clone())
        .snapshots(store.clone(), SnapshotPolicy::Every(STREAM_LEN))
        .build();
    let loaded = rt.block_on(plain.load("long")).unwrap();
    rt.block_on(keel::SnapshotStore::save_snapshot(
        &*store,
        keel::Snapshot {
            stream: Counter::stream_id("long"),
            version: loaded.version,
            schema_version: Counter::SNAPSHOT_VERSION,
            payload: Bytes::from(serde_json::to_vec(&loaded.state).unwrap()),
            taken_at: 0,
            recent_commands: Some(Vec::new()),
        },
    ))
    .unwrap();
    group.bench_function("without snapshot", |b| {
        b.iter(|| rt.block_on(plain.load("long")).unwrap().version)
    });
    group.bench_function("with snapshot", |b| {
        b.iter(|| rt.block_on(with.load("long")).unwrap().version)
    });
    group.finish();
}

/// A projection rebuild through the manager against reading the same feed raw and applying
/// the same projection by hand.
fn rebuild(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("rebuild_10k");
    group.throughput(criterion::Throughput::Elements(STREAM_LEN));
    let (store, _) = rt.block_on(filled_store(SnapshotPolicy::Never));
    let tally = Arc::new(keel_benches::Tally::default());
    group.bench_function("baseline: raw read_all + apply", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut events = store.read_feed(&keel::Cursor::new());
                while let Some(e) = events.try_next().await.unwrap() {
                    keel::projection::Projection::apply(&*tally, 1, &e)
                        .await
                        .unwrap();
                }
            })
        })
    });
    let manager = keel::projection::ProjectionManager::builder(
        store.clone(),
        store.clone(),
        store.clone(),
        store.clone(),
    )
    .projection(tally.clone())
    .build();
    group.bench_function("keel: ProjectionManager::rebuild", |b| {
        b.iter(|| rt.block_on(manager.rebuild("tally")).unwrap())
    });
    group.finish();
}

/// Appending one 1 KB event, and reading back and parsing a 1,000-event stream, with each
/// payload codec against plain JSON in the same run.
fn codecs(c: &mut Criterion) {
    let rt = runtime();
    let store = Arc::new(MemoryStore::new());
    let mut append = c.benchmark_group("codec_append_1kb");
    for (name, codec) in keel_benches::codecs(store.clone()) {
        let events = keel_benches::encoded(store.clone(), &codec);
        let stream = keel::StreamId::new(format!("append-{name}"));
        let payload = keel_benches::order_payload(1);
        append.bench_function(name, |b| {
            b.iter(|| {
                // A fresh copy, as a freshly encoded event would be: otherwise plain JSON would
                // store one shared buffer while every codec stores new bytes.
                let event = NewEvent::new("OrderPlaced", 1, Bytes::copy_from_slice(&payload));
                rt.block_on(events.append(&stream, ExpectedVersion::Any, vec![event]))
                    .unwrap()
            })
        });
    }
    append.finish();
    let mut load = c.benchmark_group("codec_read_1000x1kb");
    load.throughput(criterion::Throughput::Elements(1_000));
    for (name, codec) in keel_benches::codecs(store.clone()) {
        let events = keel_benches::encoded(store.clone(), &codec);
        let stream = keel::StreamId::new(format!("read-{name}"));
        rt.block_on(keel_benches::fill(&*events, &stream, 1_000));
        load.bench_function(name, |b| {
            b.iter(|| rt.block_on(keel_benches::read_and_parse(&*events, &stream)))
        });
    }
    load.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = command, hot_aggregate, bus, replay, snapshot, rebuild, codecs, concurrent
}
criterion_main!(benches);
