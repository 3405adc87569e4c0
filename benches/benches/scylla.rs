//! keel-scylla against the raw driver doing the same work, in the same run, on the node of
//! `scripts/scylla-node` (or `KEEL_SCYLLA_NODES`).
//!
//! `./scripts/bench` starts the node and runs this.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures::{StreamExt, TryStreamExt};
use keel::doc::{Counter, CounterEvent};
use keel::{
    Aggregate, EventStore, ExpectedVersion, Metadata, NewEvent, Repository, SnapshotStore, StreamId,
};
use keel_scylla::KeelScylla;
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::CqlTimestamp;
use uuid::Uuid;

const LONG: u64 = 10_000;

struct Bench {
    rt: tokio::runtime::Runtime,
    store: KeelScylla,
    session: Arc<Session>,
    keyspace: String,
}

fn setup() -> Bench {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let nodes = std::env::var("KEEL_SCYLLA_NODES").unwrap_or_else(|_| "127.0.0.1:9042".into());
    let keyspace = format!("keel_bench_{}", &Uuid::new_v4().simple().to_string()[..8]);
    // `KEEL_BENCH_REPLICATION` (`simple:N` or `dc:N,...`) for a cluster: `./scripts/bench cluster`.
    let replication = std::env::var("KEEL_BENCH_REPLICATION")
        .map(|text| keel_scylla::Replication::parse(&text).expect("KEEL_BENCH_REPLICATION"))
        .unwrap_or(keel_scylla::Replication::Simple(1));
    let store = rt
        .block_on(
            KeelScylla::builder()
                .known_nodes(nodes.split(','))
                .keyspace(&keyspace)
                .replication(replication)
                .master_key(keel::codec::MasterKey::generate())
                .build(),
        )
        .unwrap_or_else(|e| panic!("no CQL node at {nodes}: {e}; run ./scripts/scylla-node start"));
    let session = store.session().clone();
    rt.block_on(async {
        session
            .query_unpaged(
                format!(
                    "CREATE TABLE IF NOT EXISTS {keyspace}.raw_events (stream text, version bigint, event_id uuid, \
                     event_type text, schema_version int, payload blob, metadata blob, recorded_at timestamp, \
                     PRIMARY KEY ((stream), version))"
                ),
                (),
            )
            .await
            .unwrap();
        // Let the feeder take its lease before measuring.
        let deadline = Instant::now() + Duration::from_secs(15);
        while !store.is_feeding() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let bench = Bench {
        rt,
        store,
        session,
        keyspace,
    };
    warm_up(&bench);
    bench
}

/// Ten seconds of untimed appends through both paths the benchmarks compare (the raw LWT
/// insert and Keel's), so that the first baseline measured is not charged for a node just
/// started: a few hundred were not enough for its JIT (the raw insert still ran 25% slower).
fn warm_up(b: &Bench) {
    let raw = raw_insert(b);
    b.rt.block_on(async {
        let warm = StreamId::new("warm-up");
        let until = Instant::now() + Duration::from_secs(10);
        for v in (0..).take_while(|_| Instant::now() < until) {
            let body = keel_benches::order_payload(v);
            let values = raw_row("raw-warm-up", v as i64, "OrderPlaced", body.clone());
            b.session.execute_unpaged(&raw, values).await.unwrap();
            let event = NewEvent::new("OrderPlaced", 1, body);
            b.store
                .append(&warm, ExpectedVersion::from_version(v), vec![event])
                .await
                .unwrap();
        }
    });
}

fn payload() -> Bytes {
    Bytes::from(serde_json::to_vec(&CounterEvent::Incremented { by: 1 }).unwrap())
}

/// The values of one [`raw_insert`]: an event row as Keel would write it, without metadata.
type RawRow = (
    String,
    i64,
    Uuid,
    &'static str,
    i32,
    Bytes,
    Option<Vec<u8>>,
    CqlTimestamp,
);

fn raw_row(
    stream: impl Into<String>,
    version: i64,
    event_type: &'static str,
    body: Bytes,
) -> RawRow {
    let id = Uuid::new_v4();
    (
        stream.into(),
        version,
        id,
        event_type,
        1,
        body,
        None,
        CqlTimestamp(0),
    )
}

/// The raw driver's baseline append: a prepared LWT insert of one event row.
fn raw_insert(b: &Bench) -> PreparedStatement {
    b.rt.block_on(b.session.prepare(format!(
        "INSERT INTO {}.raw_events (stream, version, event_id, event_type, schema_version, payload, metadata, recorded_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS",
        b.keyspace
    )))
    .unwrap()
}

fn appends(c: &mut Criterion, b: &Bench) {
    let mut group = c.benchmark_group("scylla_append");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(8));
    let raw = raw_insert(b);
    let body = payload();
    let version = AtomicI64::new(0);
    group.throughput(Throughput::Elements(1));
    group.bench_function("baseline: raw driver LWT insert, 1 event", |bench| {
        bench.to_async(&b.rt).iter(|| async {
            let v = version.fetch_add(1, Ordering::Relaxed) + 1;
            let values = raw_row("raw-1", v, "Incremented", body.clone());
            let result = b.session.execute_unpaged(&raw, values).await.unwrap();
            assert!(result
                .into_rows_result()
                .unwrap()
                .single_row::<(bool,)>()
                .map(|(a,)| a)
                .unwrap_or(true));
        })
    });
    for batch in [1usize, 10] {
        let stream = StreamId::new(format!("keel-{batch}"));
        let at = AtomicI64::new(0);
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(
            format!("keel: append, {batch} event(s) per commit"),
            |bench| {
                bench.to_async(&b.rt).iter(|| async {
                    let events: Vec<NewEvent> = (0..batch)
                        .map(|_| NewEvent::new("Incremented", 1, body.clone()))
                        .collect();
                    let v = at.load(Ordering::Relaxed) as u64;
                    let r = b
                        .store
                        .append(&stream, ExpectedVersion::from_version(v), events)
                        .await
                        .unwrap();
                    at.store(r.last_version as i64, Ordering::Relaxed);
                })
            },
        );
    }
    group.finish();
}

/// One command through the repository on the node, with the aggregate cache (a hit is one LWT
/// round and no read) and without (a read of the stream's events first), against the raw
/// driver's LWT insert. Each aggregate takes 10 commands, then the next one begins, so the
/// uncached path replays at most 9 events and the cached one misses once in 10.
fn commands(c: &mut Criterion, b: &Bench) {
    const PER_AGGREGATE: u64 = 10;
    let mut group = c.benchmark_group("scylla_command");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Elements(1));
    let raw = raw_insert(b);
    let body = payload();
    let version = AtomicI64::new(0);
    group.bench_function("baseline: raw driver LWT insert, 1 event", |bench| {
        bench.to_async(&b.rt).iter(|| async {
            let v = version.fetch_add(1, Ordering::Relaxed) + 1;
            let values = raw_row("raw-command", v, "Incremented", body.clone());
            b.session.execute_unpaged(&raw, values).await.unwrap();
        })
    });
    for (label, entries) in [("cache on", 10_000), ("cache off", 0)] {
        let repo = Repository::<Counter>::builder(Arc::new(b.store.clone()))
            .cache(entries, None)
            .build();
        let run = Uuid::new_v4().simple().to_string();
        let n = AtomicI64::new(0);
        let meta = Metadata::default();
        group.bench_function(format!("keel: Repository::execute, {label}"), |bench| {
            bench.to_async(&b.rt).iter(|| async {
                let n = n.fetch_add(1, Ordering::Relaxed) as u64;
                let id = format!("{run}-{}", n / PER_AGGREGATE);
                repo.execute_with(&id, 1, &meta).await.unwrap();
            })
        });
    }
    group.finish();
}

/// Writers appending at once, each to a stream of its own, one event per append, against the
/// raw driver's LWT inserts issued at the same concurrency.
fn concurrent_appends(c: &mut Criterion, b: &Bench) {
    const WRITERS: usize = 32;
    let mut group = c.benchmark_group("scylla_concurrent_append");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(8))
        .throughput(Throughput::Elements(WRITERS as u64));
    let raw = raw_insert(b);
    let body = payload();
    let round = AtomicI64::new(0);
    group.bench_function(
        format!("baseline: raw driver LWT insert, {WRITERS} writers"),
        |bench| {
            bench.to_async(&b.rt).iter(|| async {
                let v = round.fetch_add(1, Ordering::Relaxed) + 1;
                futures::future::try_join_all((0..WRITERS).map(|w| {
                    let values = raw_row(format!("raw-w{w}"), v, "Incremented", body.clone());
                    let (session, raw) = (&b.session, &raw);
                    async move { session.execute_unpaged(raw, values).await }
                }))
                .await
                .unwrap();
            })
        },
    );
    let streams: Vec<StreamId> = (0..WRITERS)
        .map(|w| StreamId::new(format!("keel-w{w}")))
        .collect();
    let at = AtomicI64::new(0);
    group.bench_function(format!("keel: append, {WRITERS} writers"), |bench| {
        bench.to_async(&b.rt).iter(|| async {
            let v = at.fetch_add(1, Ordering::Relaxed) as u64;
            futures::future::try_join_all(streams.iter().map(|stream| {
                let events = vec![NewEvent::new("Incremented", 1, body.clone())];
                b.store
                    .append(stream, ExpectedVersion::from_version(v), events)
            }))
            .await
            .unwrap();
        })
    });
    group.finish();
}

fn loads(c: &mut Criterion, b: &Bench) {
    let repo = Repository::<Counter>::new(Arc::new(b.store.clone()));
    let stream = Counter::stream_id("long");
    b.rt.block_on(async {
        let mut v = 0;
        while v < LONG {
            let events: Vec<NewEvent> = (0..500)
                .map(|_| {
                    NewEvent::encode(&CounterEvent::Incremented { by: 1 }, Metadata::default())
                        .unwrap()
                })
                .collect();
            v = b
                .store
                .append(&stream, ExpectedVersion::from_version(v), events)
                .await
                .unwrap()
                .last_version;
        }
        let loaded = repo.load("long").await.unwrap();
        b.store
            .save_snapshot(keel::Snapshot {
                stream: stream.clone(),
                version: loaded.version,
                schema_version: Counter::SNAPSHOT_VERSION,
                payload: Bytes::from(serde_json::to_vec(&loaded.state).unwrap()),
                taken_at: 0,
                recent_commands: Some(Vec::new()),
            })
            .await
            .unwrap();
    });
    let with = Repository::<Counter>::builder(Arc::new(b.store.clone()))
        .snapshots(Arc::new(b.store.clone()), keel::SnapshotPolicy::Every(LONG))
        .build();
    let mut group = c.benchmark_group("scylla_load_10k");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(8));
    group.bench_function("without snapshot", |bench| {
        bench
            .to_async(&b.rt)
            .iter(|| async { assert_eq!(repo.load("long").await.unwrap().version, LONG) })
    });
    group.bench_function("with snapshot", |bench| {
        bench
            .to_async(&b.rt)
            .iter(|| async { assert_eq!(with.load("long").await.unwrap().version, LONG) })
    });
    group.finish();
}

/// Events the feed groups read at least: when the groups before left fewer (a filtered run),
/// more are appended, spread over streams of every slice.
const FEED_ROWS: u64 = 120_000;

fn feed(c: &mut Criterion, b: &Bench) {
    b.rt.block_on(async {
        let head = b.store.feed_head().await.unwrap();
        let missing = FEED_ROWS.saturating_sub(head);
        let appends = missing.div_ceil(100) as usize;
        let body = payload();
        futures::stream::iter(0..appends)
            .map(|a| {
                let body = body.clone();
                async move {
                    let events = (0..100)
                        .map(|_| NewEvent::new("Incremented", 1, body.clone()))
                        .collect();
                    let stream = StreamId::new(format!("feed-fill-{a}"));
                    b.store
                        .append(&stream, ExpectedVersion::NoStream, events)
                        .await
                }
            })
            .buffer_unordered(32)
            .try_collect::<Vec<_>>()
            .await
            .unwrap();
    });
    // Wait until the feeder has published everything appended so far.
    let head = b.rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let head = b.store.feed_head().await.unwrap();
            let readable = b
                .store
                .read_feed(&keel::Cursor::new())
                .try_fold(0u64, |n, _| async move { Ok(n + 1) })
                .await
                .unwrap();
            if (readable == head && head >= FEED_ROWS) || Instant::now() > deadline {
                break readable;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let raw = b.rt.block_on(b.session.prepare(format!(
        "SELECT position, stream, version, event_id, event_type, schema_version, payload, metadata, recorded_at \
         FROM {}.feed WHERE bucket = ?",
        b.keyspace
    )))
    .unwrap();
    let mut group = c.benchmark_group("scylla_feed_read");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Elements(head));
    type FeedRow = (
        i64,
        String,
        i64,
        Uuid,
        String,
        i32,
        Bytes,
        Option<Vec<u8>>,
        CqlTimestamp,
    );
    // The feed's partitions: a bucket of each slice's positions, keyed `slice << 32 | bucket`.
    let heads = b.rt.block_on(b.store.feed_heads()).unwrap();
    let partitions: Vec<i64> = heads
        .iter()
        .filter(|(_, last)| *last > 0)
        .flat_map(|(slice, last)| {
            (0..=last as i64 / keel_scylla::DEFAULT_FEED_BUCKET_SIZE)
                .map(move |bucket| (i64::from(slice) << 32) | bucket)
        })
        .collect();
    group.bench_function(
        format!(
            "baseline: raw driver paged scan, {head} rows, {} partitions at once",
            partitions.len()
        ),
        |bench| {
            bench.to_async(&b.rt).iter(|| async {
                let raw = &raw;
                let scans = futures::future::try_join_all(partitions.iter().map(|&p| async move {
                    b.session
                        .execute_iter(raw.clone(), (p,))
                        .await
                        .map(|pager| pager.rows_stream::<FeedRow>().unwrap())
                }))
                .await
                .unwrap();
                let n = futures::stream::select_all(scans)
                    .try_fold(0u64, |n, _| async move { Ok(n + 1) })
                    .await
                    .unwrap();
                assert_eq!(n, head);
            })
        },
    );
    group.bench_function(format!("keel: read_all, {head} events"), |bench| {
        bench.to_async(&b.rt).iter(|| async {
            let n = b
                .store
                .read_feed(&keel::Cursor::new())
                .try_fold(0u64, |n, _| async move { Ok(n + 1) })
                .await
                .unwrap();
            assert_eq!(n, head);
        })
    });
    // A projection rebuild: the feed, the manager's batches, checkpoints and status writes.
    let all = Arc::new(b.store.clone());
    let manager =
        keel::projection::ProjectionManager::builder(all.clone(), all.clone(), all.clone(), all)
            .projection(Arc::new(keel_benches::Tally::default()))
            .build();
    group.bench_function(
        format!("keel: ProjectionManager::rebuild, {head} events"),
        |bench| {
            bench
                .to_async(&b.rt)
                .iter(|| async { assert!(manager.rebuild("tally").await.unwrap() >= head) })
        },
    );
    for workers in [1, 2, 4] {
        shared_rebuild(&mut group, b, workers, head);
    }
    group.finish();
}

/// A rebuild by `workers` managers sharing the projection's slices in this process, each its
/// own lease holder, as processes would: timed from the request to the switch of the active
/// generation, which the coordinator makes once every slice's new checkpoint is at its head.
fn shared_rebuild(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    b: &Bench,
    workers: usize,
    head: u64,
) {
    use keel::projection::{Control, ProjectionManager};
    use keel::CheckpointStore;
    let name = format!("tally-shared-{workers}");
    let all = Arc::new(b.store.clone());
    let managers: Vec<ProjectionManager> = (0..workers)
        .map(|w| {
            ProjectionManager::builder(all.clone(), all.clone(), all.clone(), all.clone())
                .projection(Arc::new(keel_benches::Tally::named(&name)))
                .share_slices(true)
                .id(format!("{name}-{w}"))
                .poll_interval(Duration::from_millis(5))
                .build()
        })
        .collect();
    b.rt.block_on(async {
        for m in &managers {
            m.start();
        }
        // Untimed: each has its share of the slices and the projection has caught up.
        let slices = b.store.feed_slices() as usize;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut held = Vec::new();
            for m in &managers {
                let status = m.status(&name).await.unwrap();
                held.push(status.held.len());
            }
            if held.iter().all(|h| *h == slices.div_ceil(workers)) || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let generation_key = format!("{name}/generation");
    group.bench_function(
        format!("keel: rebuild shared by {workers} manager(s), {head} events"),
        |bench| {
            bench.to_async(&b.rt).iter(|| async {
                let before = all
                    .load_checkpoint(&generation_key)
                    .await
                    .unwrap()
                    .unwrap_or(1);
                managers[0].request(&name, Control::Rebuild).await.unwrap();
                while all
                    .load_checkpoint(&generation_key)
                    .await
                    .unwrap()
                    .unwrap_or(1)
                    <= before
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        },
    );
    b.rt.block_on(async {
        for m in &managers {
            m.stop().await;
        }
    });
}

/// One 1 KB event per append, and reading and parsing a 1,000-event stream, with each payload
/// codec against plain JSON, in the same run.
fn codecs(c: &mut Criterion, b: &Bench) {
    let store: Arc<KeelScylla> = Arc::new(b.store.clone());
    let mut append = c.benchmark_group("scylla_codec_append_1kb");
    append
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    for (name, codec) in keel_benches::codecs(store.clone()) {
        let events = keel_benches::encoded(store.clone(), &codec);
        let stream = StreamId::new(format!("codec-append-{name}"));
        let at = AtomicI64::new(0);
        let payload = keel_benches::order_payload(1);
        append.bench_function(name, |bench| {
            bench.to_async(&b.rt).iter(|| async {
                let v = at.load(Ordering::Relaxed) as u64;
                let event = NewEvent::new("OrderPlaced", 1, payload.clone());
                let r = events
                    .append(&stream, ExpectedVersion::from_version(v), vec![event])
                    .await
                    .unwrap();
                at.store(r.last_version as i64, Ordering::Relaxed);
            })
        });
    }
    append.finish();
    let mut load = c.benchmark_group("scylla_codec_read_1000x1kb");
    load.sample_size(20).throughput(Throughput::Elements(1_000));
    for (name, codec) in keel_benches::codecs(store.clone()) {
        let events = keel_benches::encoded(store.clone(), &codec);
        let stream = StreamId::new(format!("codec-read-{name}"));
        b.rt.block_on(keel_benches::fill(&*events, &stream, 1_000));
        load.bench_function(name, |bench| {
            bench
                .to_async(&b.rt)
                .iter(|| keel_benches::read_and_parse(&*events, &stream))
        });
    }
    load.finish();
}

/// The shape of a burst of appends from 32 writers.
struct Burst {
    /// The benchmark group.
    group: &'static str,
    /// Appends per writer.
    appends: usize,
    /// Events per append.
    events: usize,
    /// Whether every append goes to a new stream (else each writer appends to one stream).
    fan_out: bool,
}

impl Burst {
    const WRITERS: usize = 32;

    fn events(&self) -> u64 {
        (Self::WRITERS * self.appends * self.events) as u64
    }
}

/// Bursts of appends from 32 writers, timed until committed (the baseline) and until the feed
/// holds every one of their events: how far the feeder trails a heavy load. Two shapes: deep
/// (60 appends of 10 events to one stream per writer: 19,200 events in 32 streams) and fanned
/// out (100 appends of one event, each to a new stream: 3,200 streams, as when many
/// aggregates are created at once). Each runs in a keyspace of its own, so that the feed's
/// expected length is known exactly; before each timed burst the feed has caught up with the
/// last.
fn feed_bursts(c: &mut Criterion, b: &Bench) {
    let deep = Burst {
        group: "scylla_feed_burst",
        appends: 60,
        events: 10,
        fan_out: false,
    };
    let wide = Burst {
        group: "scylla_feed_fan_out",
        appends: 100,
        events: 1,
        fan_out: true,
    };
    for shape in [deep, wide] {
        feed_burst(c, b, &shape);
    }
}

fn feed_burst(c: &mut Criterion, b: &Bench, shape: &Burst) {
    let size = shape.events();
    let keyspace = format!(
        "{}_{}",
        b.keyspace,
        shape.group.trim_start_matches("scylla_")
    );
    let nodes = std::env::var("KEEL_SCYLLA_NODES").unwrap_or_else(|_| "127.0.0.1:9042".into());
    let store = b.rt.block_on(async {
        let store = KeelScylla::builder()
            .known_nodes(nodes.split(','))
            .keyspace(&keyspace)
            .build()
            .await
            .unwrap();
        while !store.is_feeding() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        store
    });
    let bursts = AtomicI64::new(0);
    let body = payload();
    let burst = |until_fed: bool| {
        let (store, bursts, body) = (&store, &bursts, &body);
        async move {
            let n = bursts.fetch_add(1, Ordering::Relaxed) as u64;
            // Untimed: the feed holds every earlier burst.
            while store.feed_head().await.unwrap() < n * size {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let started = Instant::now();
            futures::future::try_join_all((0..Burst::WRITERS).map(|w| async move {
                for a in 0..shape.appends {
                    let events = (0..shape.events)
                        .map(|_| NewEvent::new("Incremented", 1, body.clone()))
                        .collect();
                    let (stream, expected) = if shape.fan_out {
                        (format!("burst{n}-w{w}-a{a}"), ExpectedVersion::NoStream)
                    } else {
                        let version = (a * shape.events) as u64;
                        (
                            format!("burst{n}-w{w}"),
                            ExpectedVersion::from_version(version),
                        )
                    };
                    store
                        .append(&StreamId::new(stream), expected, events)
                        .await?;
                }
                Ok::<_, keel::Error>(())
            }))
            .await
            .unwrap();
            while until_fed && store.feed_head().await.unwrap() < (n + 1) * size {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            started.elapsed()
        }
    };
    let mut group = c.benchmark_group(shape.group);
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(15))
        .throughput(Throughput::Elements(size));
    let committed = format!(
        "baseline: {size} events committed, {} writers",
        Burst::WRITERS
    );
    for (name, until_fed) in [
        (committed.as_str(), false),
        ("keel: the same, until the feed holds them", true),
    ] {
        group.bench_function(name, |bench| {
            bench.to_async(&b.rt).iter_custom(|iters| async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += burst(until_fed).await;
                }
                total
            })
        });
    }
    group.finish();
    b.rt.block_on(drop_keyspace(&store, &keyspace));
}

/// Stops the store's feeder and drops its keyspace: a benchmark run leaves nothing behind.
async fn drop_keyspace(store: &KeelScylla, keyspace: &str) {
    store.shutdown().await;
    store
        .session()
        .query_unpaged(format!("DROP KEYSPACE {keyspace}"), ())
        .await
        .unwrap();
}

fn all(c: &mut Criterion) {
    let b = setup();
    appends(c, &b);
    commands(c, &b);
    concurrent_appends(c, &b);
    loads(c, &b);
    feed(c, &b);
    codecs(c, &b);
    feed_bursts(c, &b);
    b.rt.block_on(drop_keyspace(&b.store, &b.keyspace));
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(2));
    targets = all
}
criterion_main!(benches);
