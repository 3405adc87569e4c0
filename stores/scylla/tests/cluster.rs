//! keel-scylla on a three-node cluster (RF 3, `NetworkTopologyStrategy`) with a node failing:
//! killed, two of three killed, paused past the request timeout. Each case runs writers that
//! append at exact versions (some contending on one stream, the others on streams of their
//! own) with the feeder running, records every acknowledgement, and afterwards checks that
//! every acknowledged event is stored once, versions are dense, nothing refused was stored,
//! the feed holds every stored event once in stream order, and no call hung.
//!
//! Run by `./scripts/test` after `scripts/scylla-node cluster start`, one case at a time
//! (each leaves the cluster whole again):
//! `cargo test -p keel-scylla --features cluster-tests --test cluster -- --test-threads=1`.
//! The nodes are `KEEL_CLUSTER_NODES` (default 127.0.0.1-3:9042); faults go through
//! `scripts/scylla-node cluster kill|pause|resume|restart N`.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
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
async fn verify(store: &KeelScylla, outcomes: &Outcomes, from: u64, case: &str) {
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
            .read_all(from)
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
async fn under_fault<F, Fut>(tag: &str, fault: F) -> (Arc<KeelScylla>, Outcomes, u64)
where
    F: FnOnce(Arc<Mutex<Outcomes>>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let keyspace = common::fresh_keyspace(tag);
    let store = Arc::new(
        builder(&keyspace)
            .build()
            .await
            .unwrap_or_else(|e| panic!("cannot open the store on the cluster {:?}: {e}\nstart it with `./scripts/scylla-node cluster start`", cluster_nodes())),
    );
    let from = store.feed_head().await.unwrap() + 1;
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
    (store, outcomes, from)
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
    verify(&store, &outcomes, from, "node 3 killed").await;
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
    verify(&store, &outcomes, from, "node 1 killed").await;
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
    verify(&store, &outcomes, from, "node 2 paused").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_down_appends_fail_typed_within_the_timeout() {
    let _heal = Heal;
    let keyspace = common::fresh_keyspace("keel_cl_quorum");
    let store = Arc::new(builder(&keyspace).build().await.unwrap());
    let from = store.feed_head().await.unwrap() + 1;
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
            .read_all(from)
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
