//! keel-scylla on a three-node cluster (RF 3, `NetworkTopologyStrategy`) with a node failing:
//! killed, two of three killed, paused past the request timeout. Each case runs writers that
//! append at exact versions (some contending on one stream, the others on streams of their
//! own) with the feeder running, records every acknowledgement, and afterwards checks that
//! every acknowledged event is stored once, versions are dense, nothing refused was stored,
//! the feed holds every stored event once in stream order, and no call hung.
//!
//! Run by `./scripts/test` after `scripts/scylla-node cluster start`, one case at a time
//! (each leaves the cluster whole again):
//! `cargo test -p keel-cqrs-scylla --features cluster-tests --test cluster -- --test-threads=1`.
//! The nodes are `KEEL_CLUSTER_NODES` (default 127.0.0.1-3:9042); faults go through
//! `scripts/scylla-node cluster kill|pause|resume|restart N`.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use keel::{Error, EventStore, ExpectedVersion, NewEvent, RecordedEvent, StreamId};
use keel_scylla::{KeelScylla, KeelScyllaBuilder, Replication};
use uuid::Uuid;

/// The data centre SimpleSnitch puts every node in.
const DC: &str = "datacenter1";
/// Longest any one call may take before the test calls it hung.
const HUNG: Duration = Duration::from_secs(40);

fn cluster_nodes() -> Vec<String> {
    std::env::var("KEEL_CLUSTER_NODES")
        .unwrap_or_else(|_| "127.0.0.1:9042,127.0.0.2:9042,127.0.0.3:9042".to_owned())
        .split(',')
        .map(str::to_owned)
        .collect()
}

/// Runs `scripts/scylla-node cluster <args>`, failing the test if it fails.
fn ctl(args: &[&str]) {
    let script = format!("{}/../../scripts/scylla-node", env!("CARGO_MANIFEST_DIR"));
    let status = std::process::Command::new(&script)
        .arg("cluster")
        .args(args)
        .status()
        .expect("run scripts/scylla-node");
    assert!(
        status.success(),
        "`scylla-node cluster {}` failed",
        args.join(" ")
    );
}

async fn ctl_async(args: &'static [&'static str]) {
    tokio::task::spawn_blocking(move || ctl(args))
        .await
        .unwrap();
}

/// Brings every node back when a case ends, also when it fails midway.
struct Heal;
impl Drop for Heal {
    fn drop(&mut self) {
        for n in ["1", "2", "3"] {
            // A paused node is resumed; a killed one restarted (no-op when running).
            let script = format!("{}/../../scripts/scylla-node", env!("CARGO_MANIFEST_DIR"));
            let _ = std::process::Command::new(&script)
                .args(["cluster", "resume", n])
                .status();
        }
        let script = format!("{}/../../scripts/scylla-node", env!("CARGO_MANIFEST_DIR"));
        let status = std::process::Command::new(&script)
            .args(["cluster", "status"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&status.stdout).into_owned();
        for (i, line) in text.lines().enumerate() {
            if line.contains("stopped") {
                let _ = std::process::Command::new(&script)
                    .args(["cluster", "restart", &(i + 1).to_string()])
                    .status();
            }
        }
    }
}

fn builder(keyspace: &str) -> KeelScyllaBuilder {
    KeelScylla::builder()
        .known_nodes(cluster_nodes())
        .keyspace(keyspace)
        .replication(Replication::NetworkTopology(vec![(DC.into(), 3)]))
        .local_datacenter(DC)
        .bucket_size(500)
        .feed_bucket_size(1_000)
        .append_timeout(Duration::from_secs(2))
        .request_timeout(Duration::from_secs(3))
        .feeder_lease_ttl(Duration::from_secs(3))
        .feeder_interval(Duration::from_millis(20))
}

/// What the writers were told.
#[derive(Default)]
struct Outcomes {
    acked: HashMap<Uuid, StreamId>,
    refused: HashSet<Uuid>,
    unsure: HashSet<Uuid>,
    /// When each acknowledgement came.
    acked_at: Vec<Instant>,
    errors: HashMap<String, usize>,
    slowest: Duration,
}

impl Outcomes {
    fn acked_between(&self, from: Instant, to: Instant) -> usize {
        self.acked_at
            .iter()
            .filter(|at| **at >= from && **at <= to)
            .count()
    }
}

fn kind(e: &Error) -> &'static str {
    match e {
        Error::Conflict { .. } => "conflict",
        Error::UnknownOutcome { .. } => "unknown outcome",
        Error::Unavailable { .. } => "unavailable",
        Error::Store { .. } => "store",
        Error::Timeout { .. } => "timeout",
        _ => "other",
    }
}

/// Writers until `stop`: four contend on `hot`, four append to streams of their own.
fn spawn_writers(
    store: Arc<KeelScylla>,
    tag: &str,
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Outcomes>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let hot = StreamId::new(format!("{tag}-hot"));
    (0..8)
        .map(|w| {
            let stream = if w < 4 {
                hot.clone()
            } else {
                StreamId::new(format!("{tag}-own-{w}"))
            };
            let (store, stop, outcomes) = (store.clone(), stop.clone(), outcomes.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    let call = async {
                        let at = store.stream_version(&stream).await?.unwrap_or(0);
                        let event = NewEvent::new("Posted", 1, &b"{\"Posted\":{}}"[..]);
                        let id = event.event_id;
                        Ok::<_, Error>((
                            id,
                            store
                                .append(&stream, ExpectedVersion::from_version(at), vec![event])
                                .await,
                        ))
                    };
                    let result = tokio::time::timeout(HUNG, call)
                        .await
                        .unwrap_or_else(|_| panic!("a call on `{stream}` hung past {HUNG:?}"));
                    let took = started.elapsed();
                    {
                        let mut o = outcomes.lock().unwrap();
                        o.slowest = o.slowest.max(took);
                        match result {
                            Ok((id, Ok(_))) => {
                                o.acked.insert(id, stream.clone());
                                o.acked_at.push(Instant::now());
                            }
                            Ok((id, Err(e))) => {
                                *o.errors.entry(kind(&e).to_owned()).or_default() += 1;
                                if e.is_conflict() {
                                    o.refused.insert(id);
                                } else {
                                    o.unsure.insert(id);
                                }
                            }
                            Err(e) => {
                                *o.errors
                                    .entry(format!("version read: {}", kind(&e)))
                                    .or_default() += 1
                            }
                        }
                    }
                    if took > Duration::from_millis(500) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            })
        })
        .collect()
}

/// Checks everything the writers were told against the stores' streams and feed.
async fn verify(store: &KeelScylla, outcomes: &Outcomes, from: &keel::Cursor, case: &str) {
    let streams: HashSet<StreamId> = outcomes.acked.values().cloned().collect();
    let mut stored_total = 0;
    let mut all_stored = HashSet::new();
    for stream in &streams {
        let events: Vec<RecordedEvent> = store.read_stream(stream, 1).try_collect().await.unwrap();
        for (i, e) in events.iter().enumerate() {
            assert_eq!(
                e.version,
                i as u64 + 1,
                "{case}: `{stream}` has dense versions"
            );
        }
        let ids: HashSet<Uuid> = events.iter().map(|e| e.event_id).collect();
        assert_eq!(ids.len(), events.len(), "{case}: no event stored twice");
        stored_total += events.len();
        all_stored.extend(ids);
    }
    let lost = outcomes
        .acked
        .keys()
        .filter(|id| !all_stored.contains(id))
        .count();
    let wrongly_refused = outcomes.refused.intersection(&all_stored).count();
    let unsure_stored = outcomes.unsure.intersection(&all_stored).count();
    let unknown = all_stored
        .iter()
        .filter(|id| !outcomes.acked.contains_key(id) && !outcomes.unsure.contains(id))
        .count();
    // The feed: every stored event once, each stream in version order.
    let deadline = Instant::now() + Duration::from_secs(90);
    let fed = loop {
        let fed: Vec<RecordedEvent> = store
            .read_feed(from)
            .try_filter(|e| futures::future::ready(streams.contains(&e.stream)))
            .try_collect()
            .await
            .unwrap();
        if fed.len() >= stored_total || Instant::now() > deadline {
            break fed;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let fed_ids: HashSet<Uuid> = fed.iter().map(|e| e.event_id).collect();
    println!(
        "{case}: {} acknowledged, {} refused, {} unknown ({} of them stored); {} stored, {} fed; \
         lost {lost}, refused-but-stored {wrongly_refused}, duplicated in feed {}; slowest call {:?}; errors {:?}",
        outcomes.acked.len(),
        outcomes.refused.len(),
        outcomes.unsure.len(),
        unsure_stored,
        stored_total,
        fed.len(),
        fed.len() - fed_ids.len(),
        outcomes.slowest,
        outcomes.errors,
    );
    assert_eq!(lost, 0, "{case}: acknowledged events lost");
    assert_eq!(
        wrongly_refused, 0,
        "{case}: appends reported refused were stored"
    );
    assert_eq!(unknown, 0, "{case}: stored events nobody sent");
    assert_eq!(fed_ids.len(), fed.len(), "{case}: an event fed twice");
    assert_eq!(
        fed_ids, all_stored,
        "{case}: the feed holds exactly the stored events"
    );
    for stream in &streams {
        let versions: Vec<u64> = fed
            .iter()
            .filter(|e| &e.stream == stream)
            .map(|e| e.version)
            .collect();
        assert!(
            versions.windows(2).all(|w| w[1] == w[0] + 1),
            "{case}: `{stream}` out of order in the feed"
        );
    }
}

/// Runs the writers; `fault` runs beside them and returns when the cluster is whole again.
async fn under_fault<F, Fut>(tag: &str, fault: F) -> (Arc<KeelScylla>, Outcomes, keel::Cursor)
where
    F: FnOnce(Arc<Mutex<Outcomes>>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let store = open(builder(&common::fresh_keyspace(tag))).await;
    let (outcomes, from) = writing_through(store.clone(), tag, fault).await;
    (store, outcomes, from)
}

async fn open(builder: KeelScyllaBuilder) -> Arc<KeelScylla> {
    Arc::new(builder.build().await.unwrap_or_else(|e| {
        panic!(
            "cannot open the store on the cluster {:?}: {e}\nstart it with `./scripts/scylla-node cluster start`",
            cluster_nodes()
        )
    }))
}

/// Runs the writers on `store` while `fault` runs beside them.
async fn writing_through<F, Fut>(
    store: Arc<KeelScylla>,
    tag: &str,
    fault: F,
) -> (Outcomes, keel::Cursor)
where
    F: FnOnce(Arc<Mutex<Outcomes>>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let from = store.feed_heads().await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let writers = spawn_writers(store.clone(), tag, stop.clone(), outcomes.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    fault(outcomes.clone()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    let outcomes = Arc::try_unwrap(outcomes)
        .ok()
        .unwrap()
        .into_inner()
        .unwrap();
    (outcomes, from)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_mid_run_loses_and_doubles_nothing() {
    let _heal = Heal;
    let (store, outcomes, from) = under_fault("keel_cl_kill", |outcomes| async move {
        ctl_async(&["kill", "3"]).await;
        let down = Instant::now();
        tokio::time::sleep(Duration::from_secs(8)).await;
        let acked = outcomes.lock().unwrap().acked_between(down, Instant::now());
        assert!(
            acked > 0,
            "appends kept succeeding with two of three nodes up"
        );
        println!("node 3 down: {acked} appends acknowledged in 8 s");
        ctl_async(&["restart", "3"]).await;
    })
    .await;
    verify(&store, &outcomes, &from, "node 3 killed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_contact_node_killed_the_feed_carries_on() {
    let _heal = Heal;
    // Node 1 is the first contact point, the seed and where the driver's control connection
    // starts; the feeder's process loses it mid-round.
    let (store, outcomes, from) = under_fault("keel_cl_seed", |outcomes| async move {
        ctl_async(&["kill", "1"]).await;
        let down = Instant::now();
        tokio::time::sleep(Duration::from_secs(8)).await;
        let acked = outcomes.lock().unwrap().acked_between(down, Instant::now());
        assert!(acked > 0, "appends kept succeeding without node 1");
        ctl_async(&["restart", "1"]).await;
    })
    .await;
    assert!(
        store.is_feeding(),
        "the feeder kept (or took back) its lease"
    );
    verify(&store, &outcomes, &from, "node 1 killed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_paused_past_the_request_timeout_leaves_no_outcome_guessed() {
    let _heal = Heal;
    let (store, outcomes, from) = under_fault("keel_cl_pause", |_| async move {
        ctl_async(&["pause", "2"]).await;
        // Longer than the append and request timeouts: LWTs coordinated by or waiting on
        // node 2 time out with their outcome unknown.
        tokio::time::sleep(Duration::from_secs(8)).await;
        ctl_async(&["resume", "2"]).await;
    })
    .await;
    verify(&store, &outcomes, &from, "node 2 paused").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_down_appends_fail_typed_within_the_timeout() {
    let _heal = Heal;
    let keyspace = common::fresh_keyspace("keel_cl_quorum");
    let store = Arc::new(builder(&keyspace).build().await.unwrap());
    let from = store.feed_heads().await.unwrap();
    let before = StreamId::new("before");
    for i in 0..20 {
        store
            .append(
                &before,
                ExpectedVersion::from_version(i),
                vec![NewEvent::new("Posted", 1, &b"{}"[..])],
            )
            .await
            .unwrap();
    }
    ctl_async(&["kill", "2"]).await;
    ctl_async(&["kill", "3"]).await;
    // The survivor needs a few seconds to convict its peers; until then a write times out
    // (unknown outcome). After that, the refusal is immediate and says why.
    let bound = Duration::from_secs(3) + (Duration::from_secs(2) + Duration::from_secs(6)) * 3;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen: HashMap<&'static str, usize> = HashMap::new();
    let mut messages = HashSet::new();
    let mut unavailable = None;
    let mut slowest = Duration::ZERO;
    let mut attempt = 0;
    while unavailable.is_none() && Instant::now() < deadline {
        attempt += 1;
        let stream = StreamId::new(format!("during-{attempt}"));
        let started = Instant::now();
        let result = tokio::time::timeout(
            HUNG,
            store.append(
                &stream,
                ExpectedVersion::NoStream,
                vec![NewEvent::new("Posted", 1, &b"{}"[..])],
            ),
        )
        .await
        .expect("an append with two of three nodes down hung");
        slowest = slowest.max(started.elapsed());
        assert!(
            started.elapsed() <= bound,
            "an append took {:?}, over its bound {bound:?}",
            started.elapsed()
        );
        match result {
            Ok(_) => panic!("an append committed with one node of three"),
            Err(e @ Error::Unavailable { .. }) => unavailable = Some(e),
            Err(e @ (Error::UnknownOutcome { .. } | Error::Store { .. })) => {
                let text: String = e
                    .to_string()
                    .replace(stream.as_str(), "during-N")
                    .chars()
                    .skip(60)
                    .take(220)
                    .collect();
                if messages.insert(text.clone()) && messages.len() < 6 {
                    println!("{}: {text}", kind(&e));
                }
                *seen.entry(kind(&e)).or_default() += 1;
            }
            Err(e) => panic!("an untyped failure: {e:?}"),
        }
    }
    println!("two nodes down: {attempt} appends; before the refusal {seen:?}; slowest {slowest:?}; {unavailable:?}");
    let refusal = unavailable.expect("no append was refused as unavailable within 60 s");
    let text = refusal.to_string();
    assert!(text.contains("alive") && text.contains("replica"), "{text}");
    ctl_async(&["restart", "2"]).await;
    ctl_async(&["restart", "3"]).await;
    // Nothing acknowledged before the fault is gone; the stream takes appends again.
    let events: Vec<RecordedEvent> = store.read_stream(&before, 1).try_collect().await.unwrap();
    assert_eq!(events.len(), 20);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match store
            .append(
                &before,
                ExpectedVersion::from_version(20),
                vec![NewEvent::new("Posted", 1, &b"{}"[..])],
            )
            .await
        {
            Ok(r) => {
                assert_eq!(r.last_version, 21);
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "appends did not resume: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let fed: Vec<RecordedEvent> = store
            .read_feed(&from)
            .try_filter(|e| futures::future::ready(e.stream == before))
            .try_collect()
            .await
            .unwrap();
        if fed.len() == 21 {
            let versions: Vec<u64> = fed.iter().map(|e| e.version).collect();
            assert_eq!(versions, (1..=21).collect::<Vec<_>>());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the feed holds {} of 21",
            fed.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A lease holder in its own process (`tests/support/fault_worker.rs`), its output lines
/// collected with the time each arrived.
struct Worker {
    name: &'static str,
    child: std::process::Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Worker {
    fn start(role: &str, keyspace: &str, name: &'static str) -> Worker {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_keel-fault-worker"))
            .args([role, keyspace, name])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start keel-fault-worker");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().unwrap().push((Instant::now(), line));
            }
        });
        Worker { name, child, lines }
    }

    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {}", self.name);
    }

    /// Waits up to `within` for a line starting with `prefix` that arrived after `after`.
    async fn wait_for(&self, prefix: &str, after: Instant, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some((_, line)) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|(at, l)| *at >= after && l.starts_with(prefix))
            {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{} printed no `{prefix}` within {within:?}; it printed {:?}",
                self.name,
                self.lines
                    .lock()
                    .unwrap()
                    .iter()
                    .rev()
                    .take(5)
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill(); // SIGKILL; a paused process dies too
        let _ = self.child.wait();
    }
}

/// Two feeder processes share the feed's 64 slices (the second takes half when it joins);
/// one is paused (SIGSTOP) past its leases while the other takes its slices over, then
/// resumed: its rounds under the old epochs are refused, it learns it lost its slices, the
/// two share the slices again, and the feed holds every committed event once, in stream
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_feeder_is_fenced_out_when_it_resumes() {
    let _heal = Heal;
    let keyspace = common::fresh_keyspace("keel_cl_fence_feed");
    let store = open(builder(&keyspace).feeder(false)).await;
    let start = Instant::now();
    let a = Worker::start("feeder", &keyspace, "a");
    a.wait_for("feeding 64 slices", start, Duration::from_secs(30))
        .await;
    let joined = Instant::now();
    let b = Worker::start("feeder", &keyspace, "b");
    b.wait_for("feeding 32 slices", joined, Duration::from_secs(30))
        .await;
    a.wait_for("feeding 32 slices", joined, Duration::from_secs(10))
        .await;
    println!(
        "b joined and the two share the slices after {:?}",
        joined.elapsed()
    );
    let (outcomes, from) = writing_through(store.clone(), "fence-feed", |_| async {
        let paused = Instant::now();
        a.signal("-STOP");
        b.wait_for("feeding 64 slices", paused, Duration::from_secs(15))
            .await;
        println!(
            "feeder b took over {:?} after a was paused",
            paused.elapsed()
        );
        tokio::time::sleep(Duration::from_secs(8).saturating_sub(paused.elapsed())).await;
        let resumed = Instant::now();
        a.signal("-CONT");
        a.wait_for("feeding 0 slices", resumed, Duration::from_secs(10))
            .await;
        println!("feeder a let go {:?} after it resumed", resumed.elapsed());
        a.wait_for("feeding 32 slices", resumed, Duration::from_secs(20))
            .await;
        println!(
            "a has its share back {:?} after it resumed",
            resumed.elapsed()
        );
    })
    .await;
    verify(&store, &outcomes, &from, "feeder paused past its lease").await;
    let status = store.feed_status().await.unwrap();
    assert!(status.unheld().is_empty(), "{status:?}");
    let held: Vec<usize> = status.held_by().into_values().collect();
    assert_eq!(held, [32, 32], "{:?}", status.held_by());
    println!("feeder a: {:?}; b: {:?}", a.lines(), b.lines());
}

/// Appends one event to each of `n` new streams (spread over the slices), recording each
/// outcome as the writers do.
async fn spread_writes(store: &KeelScylla, tag: &str, n: usize, outcomes: &Mutex<Outcomes>) {
    futures::stream::iter(0..n)
        .map(|i| async move {
            let stream = StreamId::new(format!("{tag}-spread-{i:04}"));
            let event = NewEvent::new("Posted", 1, &b"{\"Posted\":{}}"[..]);
            let id = event.event_id;
            let result = tokio::time::timeout(
                HUNG,
                store.append(&stream, ExpectedVersion::NoStream, vec![event]),
            )
            .await
            .unwrap_or_else(|_| panic!("an append to `{stream}` hung past {HUNG:?}"));
            (id, stream, result)
        })
        .buffer_unordered(16)
        .for_each(|(id, stream, result)| {
            let mut o = outcomes.lock().unwrap();
            match result {
                Ok(_) => {
                    o.acked.insert(id, stream);
                    o.acked_at.push(Instant::now());
                }
                Err(e) => {
                    *o.errors.entry(kind(&e).to_owned()).or_default() += 1;
                    o.unsure.insert(id);
                }
            }
            futures::future::ready(())
        })
        .await;
}

/// Two feeder processes share the slices; one is killed with SIGKILL in the middle of a burst
/// of appends to many streams: the other takes all its slices within the lease TTL, the
/// killed one, started again, gets its share back, and the feed holds every committed event
/// once, each stream in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_feeder_loses_its_slices_to_the_other() {
    let _heal = Heal;
    let keyspace = common::fresh_keyspace("keel_cl_kill_feed");
    let store = open(builder(&keyspace).feeder(false)).await;
    let start = Instant::now();
    let a = Worker::start("feeder", &keyspace, "a");
    a.wait_for("feeding 64 slices", start, Duration::from_secs(30))
        .await;
    let b = Worker::start("feeder", &keyspace, "b");
    b.wait_for("feeding 32 slices", start, Duration::from_secs(30))
        .await;
    let (store_ref, b_ref, restarted_worker) = (store.clone(), &b, Mutex::new(None));
    let keep = &restarted_worker;
    let (outcomes, from) = writing_through(store.clone(), "kill-feed", |outcomes| async move {
        let b = b_ref;
        let burst = {
            let (store, outcomes) = (store_ref.clone(), outcomes.clone());
            tokio::spawn(async move { spread_writes(&store, "kill-feed", 600, &outcomes).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let killed = Instant::now();
        drop(a); // SIGKILL mid-burst
        b.wait_for("feeding 64 slices", killed, Duration::from_secs(15))
            .await;
        println!(
            "feeder b held every slice {:?} after a was killed",
            killed.elapsed()
        );
        burst.await.unwrap();
        let restarted = Instant::now();
        let c = Worker::start("feeder", &keyspace, "c");
        c.wait_for("feeding 32 slices", restarted, Duration::from_secs(30))
            .await;
        b.wait_for("feeding 32 slices", restarted, Duration::from_secs(10))
            .await;
        println!(
            "a restarted process has its share {:?} after it started",
            restarted.elapsed()
        );
        *keep.lock().unwrap() = Some(c); // runs until the end of the test
    })
    .await;
    verify(&store, &outcomes, &from, "feeder killed mid-burst").await;
    // The status reads 64 leases at SERIAL: on this loaded cluster one may time out, which
    // is a status read failing, not the feed; try again for a while.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match store.feed_status().await {
            Ok(status) if status.unheld().is_empty() && status.held_by().len() == 2 => break,
            other => assert!(
                Instant::now() < deadline,
                "every slice held, by the two: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A projection's holder paused (SIGSTOP) past its lease while a second process takes the
/// projection over, then resumed: no write it makes under its old epoch lands (its read
/// model is fenced per row, its checkpoint by the store), the stored checkpoint never moves
/// back, and the read model ends with every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_projection_holder_is_fenced_out_when_it_resumes() {
    let _heal = Heal;
    let keyspace = common::fresh_keyspace("keel_cl_fence_proj");
    // One slice: the read model keeps a row per feed position, and its checkpoint is one row
    // (the workers adopt the keyspace's slice count).
    let store = open(builder(&keyspace).feed_slices(1)).await;
    let start = Instant::now();
    let a = Worker::start("projection", &keyspace, "a");
    let fence_a = a.wait_for("fence", start, Duration::from_secs(30)).await;
    let b = Worker::start("projection", &keyspace, "b");
    b.wait_for("state Standby", start, Duration::from_secs(30))
        .await;
    // Sample the stored checkpoint all along: it must never go down.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (store, sampling) = (store.clone(), sampling.clone());
        tokio::spawn(async move {
            use keel::CheckpointStore;
            let (mut last, mut samples) = (0, 0);
            while sampling.load(Ordering::SeqCst) {
                if let Ok(Some(at)) = store.load_checkpoint("fenced/1").await {
                    assert!(at >= last, "the checkpoint moved back from {last} to {at}");
                    (last, samples) = (at, samples + 1);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (last, samples)
        })
    };
    let mut resumed_ms = 0;
    let mut fence_b = String::new();
    let (outcomes, _) = writing_through(store.clone(), "fence-proj", |_| async {
        let paused = Instant::now();
        a.signal("-STOP");
        fence_b = b.wait_for("fence", paused, Duration::from_secs(15)).await;
        tokio::time::sleep(Duration::from_secs(8).saturating_sub(paused.elapsed())).await;
        let resumed = Instant::now();
        resumed_ms = keel::event::now_millis();
        a.signal("-CONT");
        a.wait_for("state Standby", resumed, Duration::from_secs(10))
            .await;
        println!(
            "projection a went standby {:?} after it resumed",
            resumed.elapsed()
        );
    })
    .await;
    // Everything fed reaches the read model (b applies it).
    let head = loop {
        let head = store.feed_head().await.unwrap();
        let rows: Vec<i64> = common::column(
            &store,
            format!("SELECT position FROM {keyspace}.fenced_model WHERE p = 0"),
        )
        .await;
        use keel::CheckpointStore;
        let checkpoint = store
            .load_checkpoint("fenced/1")
            .await
            .unwrap()
            .unwrap_or(0);
        if head > 0 && rows.len() as u64 >= head && checkpoint > head {
            break head;
        }
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "the read model holds {} of {head} positions",
            rows.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    sampling.store(false, Ordering::SeqCst);
    let (last_checkpoint, samples) = sampler.await.unwrap();
    let epoch_of = |line: &str| line.split(' ').nth(1).unwrap().parse::<i64>().unwrap();
    let (epoch_a, epoch_b) = (epoch_of(&fence_a), epoch_of(&fence_b));
    let from_b: i64 = fence_b.split(' ').nth(2).unwrap().parse().unwrap();
    assert!(epoch_a < epoch_b, "epochs {epoch_a} then {epoch_b}");
    // a's writes begun after it resumed, under its old epoch.
    let mut late = (0, 0);
    for line in a.lines().iter().filter(|l| l.starts_with("write ")) {
        let f: Vec<&str> = line.split(' ').collect();
        let (started, epoch): (i64, i64) = (f[1].parse().unwrap(), f[3].parse().unwrap());
        if started >= resumed_ms && epoch == epoch_a {
            if f[5] == "applied" {
                late.0 += 1;
            } else {
                late.1 += 1;
            }
        }
    }
    // Rows b is responsible for (from its starting checkpoint on) hold no older epoch.
    let rows = store
        .session()
        .query_unpaged(
            format!("SELECT position, epoch FROM {keyspace}.fenced_model WHERE p = 0"),
            (),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap();
    let stale_rows: Vec<(i64, i64)> = rows
        .rows::<(i64, Option<i64>)>()
        .unwrap()
        .map(|r| r.unwrap())
        .map(|(p, e)| (p, e.unwrap_or(0)))
        .filter(|(p, e)| *p >= from_b && *e < epoch_b)
        .collect();
    println!(
        "projection holder paused: {} acknowledged appends, feed head {head}; a's epoch {epoch_a}, b's epoch {epoch_b} from checkpoint {from_b}; a after resuming: {} write(s) applied, {} refused; stale rows past b's start: {}; checkpoint {last_checkpoint} ({samples} samples, never back)",
        outcomes.acked.len(),
        late.0,
        late.1,
        stale_rows.len()
    );
    assert_eq!(late.0, 0, "a wrote under its old epoch after it resumed");
    assert!(
        stale_rows.is_empty(),
        "rows written by a after b took over: {stale_rows:?}"
    );
    assert!(
        last_checkpoint > 0 && samples > 10,
        "the checkpoint was sampled: {samples} samples, last {last_checkpoint}"
    );
}

/// Feed slices in the shared-worker cases: enough to split between two processes, few enough
/// that four processes renewing leases leave this machine's two cores to the cluster.
const SHARED_SLICES: usize = 8;

/// Two feeder processes and two projection managers sharing the projection `shared`, each
/// pair splitting the slices.
async fn start_crew(keyspace: &str) -> [Worker; 4] {
    let start = Instant::now();
    let (all, half) = (SHARED_SLICES, SHARED_SLICES / 2);
    let fa = Worker::start("feeder", keyspace, "fa");
    fa.wait_for(
        &format!("feeding {all} slices"),
        start,
        Duration::from_secs(30),
    )
    .await;
    let fb = Worker::start("feeder", keyspace, "fb");
    for f in [&fb, &fa] {
        f.wait_for(
            &format!("feeding {half} slices"),
            start,
            Duration::from_secs(30),
        )
        .await;
    }
    let pa = Worker::start("shared", keyspace, "pa");
    pa.wait_for(
        &format!("holding {all} slices"),
        start,
        Duration::from_secs(30),
    )
    .await;
    let pb = Worker::start("shared", keyspace, "pb");
    for p in [&pb, &pa] {
        p.wait_for(
            &format!("holding {half} slices"),
            start,
            Duration::from_secs(30),
        )
        .await;
    }
    println!(
        "two feeders and two projection managers share {all} slices after {:?}",
        start.elapsed()
    );
    [fa, fb, pa, pb]
}

/// Waits until the shared read model holds exactly the feed: a row per fed event, at its
/// slice and position, naming its stream and version; prints how many writes were applied
/// in all (a write replayed after a crash lands on its own row again).
async fn verify_shared_model(store: &KeelScylla, keyspace: &str, workers: &[&Worker], case: &str) {
    type Key = (i32, i64);
    let deadline = Instant::now() + Duration::from_secs(120);
    // Reads of the whole feed and table on a loaded cluster may time out: such a read is
    // tried again, not taken for an answer.
    let read = || async {
        let fed: HashMap<Key, (String, i64)> = store
            .read_feed(&keel::Cursor::default())
            .map_ok(|e| {
                let key = (e.slice as i32, e.position.unwrap_or(0) as i64);
                (key, (e.stream.as_str().to_owned(), e.version as i64))
            })
            .try_collect()
            .await
            .map_err(|e| e.to_string())?;
        let result = store
            .session()
            .query_unpaged(
                format!("SELECT slice, position, stream, version FROM {keyspace}.shared_model"),
                (),
            )
            .await
            .map_err(|e| e.to_string())?
            .into_rows_result()
            .map_err(|e| e.to_string())?;
        let rows: HashMap<Key, (String, i64)> = result
            .rows::<(i32, i64, Option<String>, Option<i64>)>()
            .map_err(|e| e.to_string())?
            .filter_map(|r| r.ok())
            .filter_map(|(s, p, stream, v)| Some(((s, p), (stream?, v?))))
            .collect();
        Ok::<_, String>((rows, fed))
    };
    let (rows, fed) = loop {
        match read().await {
            Ok((rows, fed)) if (!fed.is_empty() && rows == fed) || Instant::now() > deadline => {
                break (rows, fed)
            }
            Err(e) if Instant::now() > deadline => {
                panic!("{case}: reading the feed and the model: {e}")
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let missing = fed.keys().filter(|k| !rows.contains_key(k)).count();
    let wrong = fed
        .iter()
        .filter(|(k, v)| rows.get(k).is_some_and(|r| r != *v))
        .count();
    let extra = rows.keys().filter(|k| !fed.contains_key(k)).count();
    let applied = workers
        .iter()
        .flat_map(|w| w.lines())
        .filter(|l| l.starts_with("write ") && l.ends_with(" applied"))
        .count();
    println!(
        "{case}: {} events fed over {} slices, {} rows in the read model; missing {missing}, \
         wrong {wrong}, extra {extra}; {applied} writes applied in all",
        fed.len(),
        fed.keys().map(|k| k.0).collect::<HashSet<_>>().len(),
        rows.len()
    );
    assert_eq!(
        (missing, wrong, extra),
        (0, 0, 0),
        "{case}: the read model holds every fed event once"
    );
}

/// Two feeder processes and two projection managers sharing a projection by slice; one of
/// each killed with SIGKILL in the middle of a burst over many streams: the survivors take
/// every slice within the lease TTL, restarted processes get their share back, the feed
/// holds every committed event once, and the read model every fed event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_feeder_and_projection_worker_lose_their_slices() {
    let _heal = Heal;
    let keyspace = common::fresh_keyspace("keel_cl_kill_shared");
    let store = open(
        builder(&keyspace)
            .feed_slices(SHARED_SLICES as u32)
            .feeder(false),
    )
    .await;
    let [fa, fb, pa, pb] = start_crew(&keyspace).await;
    let (all, half) = (SHARED_SLICES, SHARED_SLICES / 2);
    let restarted = Mutex::new(Vec::new());
    let (store_ref, fb_ref, pb_ref, keep) = (store.clone(), &fb, &pb, &restarted);
    let ks = keyspace.as_str();
    let (outcomes, from) = writing_through(store.clone(), "kill-shared", |outcomes| async move {
        let burst = {
            let (store, outcomes) = (store_ref.clone(), outcomes.clone());
            tokio::spawn(async move { spread_writes(&store, "kill-shared", 400, &outcomes).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let killed = Instant::now();
        drop(fa); // SIGKILL mid-burst
        drop(pa);
        let within = Duration::from_secs(15);
        fb_ref
            .wait_for(&format!("feeding {all} slices"), killed, within)
            .await;
        pb_ref
            .wait_for(&format!("holding {all} slices"), killed, within)
            .await;
        println!(
            "the survivors held every slice {:?} after the kill",
            killed.elapsed()
        );
        burst.await.unwrap();
        let again = Instant::now();
        let fc = Worker::start("feeder", ks, "fc");
        let pc = Worker::start("shared", ks, "pc");
        let within = Duration::from_secs(30);
        for (w, what) in [
            (&fc, "feeding"),
            (fb_ref, "feeding"),
            (&pc, "holding"),
            (pb_ref, "holding"),
        ] {
            w.wait_for(&format!("{what} {half} slices"), again, within)
                .await;
        }
        println!(
            "restarted processes have their share {:?} after they started",
            again.elapsed()
        );
        keep.lock().unwrap().extend([fc, pc]); // run until the end of the test
    })
    .await;
    verify(&store, &outcomes, &from, "feeder and worker killed").await;
    let restarted = restarted.into_inner().unwrap();
    let mut workers = vec![&pb];
    workers.extend(restarted.iter().filter(|w| w.name == "pc"));
    verify_shared_model(&store, &keyspace, &workers, "feeder and worker killed").await;
}

/// The same crew; one feeder and one projection manager paused (SIGSTOP) past their leases
/// while the others take their slices over, then resumed: the paused manager's writes under
/// its old epochs are refused by the read model, the feed holds every committed event once,
/// the read model every fed event once, and the slices are shared again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paused_feeder_and_projection_worker_are_fenced_out() {
    let _heal = Heal;
    let keyspace = common::fresh_keyspace("keel_cl_pause_shared");
    let store = open(
        builder(&keyspace)
            .feed_slices(SHARED_SLICES as u32)
            .feeder(false),
    )
    .await;
    let [fa, fb, pa, pb] = start_crew(&keyspace).await;
    let (all, half) = (SHARED_SLICES, SHARED_SLICES / 2);
    let mut resumed_at = (Instant::now(), 0);
    let store_ref = store.clone();
    let (outcomes, from) = writing_through(store.clone(), "pause-shared", |outcomes| {
        let burst = {
            let (store, outcomes) = (store_ref.clone(), outcomes.clone());
            tokio::spawn(async move { spread_writes(&store, "pause-shared", 400, &outcomes).await })
        };
        async {
            let paused = Instant::now();
            fa.signal("-STOP");
            pa.signal("-STOP");
            let within = Duration::from_secs(15);
            fb.wait_for(&format!("feeding {all} slices"), paused, within)
                .await;
            pb.wait_for(&format!("holding {all} slices"), paused, within)
                .await;
            println!(
                "the others held every slice {:?} after the pause",
                paused.elapsed()
            );
            burst.await.unwrap();
            tokio::time::sleep(Duration::from_secs(8).saturating_sub(paused.elapsed())).await;
            resumed_at = (Instant::now(), keel::event::now_millis());
            fa.signal("-CONT");
            pa.signal("-CONT");
            let within = Duration::from_secs(30);
            for (w, what) in [
                (&fa, "feeding"),
                (&fb, "feeding"),
                (&pa, "holding"),
                (&pb, "holding"),
            ] {
                w.wait_for(&format!("{what} {half} slices"), resumed_at.0, within)
                    .await;
            }
            println!(
                "the resumed processes have their share back {:?} after they resumed",
                resumed_at.0.elapsed()
            );
        }
    })
    .await;
    verify(&store, &outcomes, &from, "feeder and worker paused").await;
    verify_shared_model(&store, &keyspace, &[&pa, &pb], "feeder and worker paused").await;
    // pa's writes begun after it resumed: each under an epoch it took after resuming, or
    // refused.
    let (resumed, resumed_ms) = resumed_at;
    let lines: Vec<(Instant, String)> = pa.lines.lock().unwrap().clone();
    let fresh: HashSet<(u32, u64)> = lines
        .iter()
        .filter(|(at, l)| *at >= resumed && l.starts_with("fence "))
        .map(|(_, l)| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[1].parse().unwrap(), f[2].parse().unwrap())
        })
        .collect();
    let (mut stale_applied, mut refused, mut after) = (0, 0, 0);
    for (_, line) in lines.iter().filter(|(_, l)| l.starts_with("write ")) {
        let f: Vec<&str> = line.split(' ').collect();
        let started: i64 = f[1].parse().unwrap();
        let (slice, epoch): (u32, u64) = (f[3].parse().unwrap(), f[4].parse().unwrap());
        if started < resumed_ms {
            continue;
        }
        after += 1;
        match f[6] {
            "applied" if !fresh.contains(&(slice, epoch)) => stale_applied += 1,
            "refused" => refused += 1,
            _ => {}
        }
    }
    println!(
        "paused manager after resuming: {after} writes, {refused} refused, {stale_applied} applied under an old epoch; fences taken again: {fresh:?}"
    );
    assert_eq!(
        stale_applied, 0,
        "the resumed manager wrote under an epoch it had lost"
    );
}
