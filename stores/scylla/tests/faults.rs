//! keel-scylla under faults and at its edges, on a real CQL node: bucket boundaries (also
//! under random histories), a writer
//! that dies before the feed hears of its events, a feeder that dies mid-plan, markers that
//! expired with no feeder running (reconciliation), timed-out LWTs, payloads that no longer
//! decode.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use keel::{Error, EventStore, ExpectedVersion, NewEvent, RecordedEvent, Repository, StreamId};
use keel_scylla::KeelScylla;

fn events(n: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|i| {
            NewEvent::new(
                "Incremented",
                1,
                format!("{{\"Incremented\":{{\"by\":{}}}}}", i + 1).into_bytes(),
            )
        })
        .collect()
}

async fn read(store: &KeelScylla, stream: &StreamId) -> Vec<RecordedEvent> {
    store.read_stream(stream, 1).try_collect().await.unwrap()
}

fn assert_dense(events: &[RecordedEvent]) {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.version, i as u64 + 1, "versions are dense");
    }
    let ids: HashSet<_> = events.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), events.len(), "no event stored twice");
}

/// Asserts that `fed` holds `count` events, none twice, and each of `streams` as versions
/// `1..=n` in feed order.
fn assert_once_in_order(fed: &[RecordedEvent], count: usize, streams: &[(&StreamId, u64)]) {
    assert_eq!(fed.len(), count, "every committed event reached the feed");
    let ids: HashSet<_> = fed.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), count, "none twice");
    for &(stream, n) in streams {
        let versions: Vec<u64> = fed
            .iter()
            .filter(|e| &e.stream == stream)
            .map(|e| e.version)
            .collect();
        assert_eq!(
            versions,
            (1..=n).collect::<Vec<u64>>(),
            "`{stream}` in order"
        );
    }
}

/// Waits until the feed holds `count` events of `streams`.
async fn feed_of(
    store: &KeelScylla,
    streams: &HashSet<StreamId>,
    count: usize,
    wait: Duration,
) -> Vec<RecordedEvent> {
    let deadline = Instant::now() + wait;
    loop {
        let seen: Vec<RecordedEvent> = store
            .read_feed(&keel::Cursor::new())
            .try_filter(|e| futures::future::ready(streams.contains(&e.stream)))
            .try_collect()
            .await
            .unwrap();
        if seen.len() >= count || Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_histories_hold_on_three_version_buckets() {
    // Appends of 0 to 3 events into buckets of 3 versions: every way an append can start
    // in, fill, overflow or follow a bucket, with right and wrong expectations.
    let keyspace = common::fresh_keyspace("keel_small_buckets");
    let store = common::open(common::builder(&keyspace).bucket_size(3)).await;
    keel::conformance::random_histories_match_a_model(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_cross_bucket_boundaries_exactly() {
    // bucket_size 500 (common::builder): versions 1..=500 in bucket 0, unless an append
    // overflows it.
    let store = common::open(common::builder(&common::fresh_keyspace("keel_bucket"))).await;
    let stream = StreamId::new("acct-overflow");
    store
        .append(&stream, ExpectedVersion::NoStream, events(400))
        .await
        .unwrap();
    // Starts in bucket 0 at 401 and overflows it up to 700.
    let r = store
        .append(&stream, ExpectedVersion::Exact(400), events(300))
        .await
        .unwrap();
    assert_eq!((r.first_version, r.last_version), (401, 700));
    // Version 701 belongs to bucket 1, which does not exist yet: the fresh path checks bucket 0.
    assert!(store
        .append(&stream, ExpectedVersion::Exact(699), events(1))
        .await
        .unwrap_err()
        .is_conflict());
    assert!(store
        .append(&stream, ExpectedVersion::Exact(701), events(1))
        .await
        .unwrap_err()
        .is_conflict());
    assert!(store
        .append(&stream, ExpectedVersion::Exact(1000), events(1))
        .await
        .unwrap_err()
        .is_conflict());
    store
        .append(&stream, ExpectedVersion::Exact(700), events(300))
        .await
        .unwrap();
    // Exactly at a boundary (1000 = 2 * 500): version 1001 opens bucket 2.
    store
        .append(&stream, ExpectedVersion::Exact(1000), events(2))
        .await
        .unwrap();
    assert_eq!(store.stream_version(&stream).await.unwrap(), Some(1002));
    let all = read(&store, &stream).await;
    assert_eq!(all.len(), 1002);
    assert_dense(&all);
    let tail: Vec<RecordedEvent> = store.read_stream(&stream, 650).try_collect().await.unwrap();
    assert_eq!(
        tail.first().map(|e| e.version),
        Some(650),
        "a version in an overflowed bucket is found"
    );
    assert_eq!(tail.len(), 1002 - 649);
    // Too many events for one partition is refused before anything is written.
    match store
        .append(&stream, ExpectedVersion::Exact(1002), events(501))
        .await
    {
        Err(Error::Config { reason, .. }) => {
            assert!(reason.contains("bucket size 500"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_appenders_at_a_bucket_boundary_have_one_winner() {
    let store = Arc::new(common::open(common::builder(&common::fresh_keyspace("keel_race"))).await);
    let stream = StreamId::new("acct-boundary");
    store
        .append(&stream, ExpectedVersion::NoStream, events(500))
        .await
        .unwrap();
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (store, stream) = (store.clone(), stream.clone());
            tokio::spawn(async move {
                store
                    .append(&stream, ExpectedVersion::Exact(500), events(3))
                    .await
            })
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => wins += 1,
            Err(e) => assert!(e.is_conflict(), "only conflicts may fail: {e}"),
        }
    }
    assert_eq!(wins, 1);
    let all = read(&store, &stream).await;
    assert_eq!(all.len(), 503);
    assert_dense(&all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_of_a_writer_that_died_before_the_feed_heard_reach_the_feed_once() {
    let keyspace = common::fresh_keyspace("keel_dead");
    // The writer has no feeder and is gone after its appends: only its markers remain.
    let writer = common::open(common::builder(&keyspace).feeder(false)).await;
    let streams: Vec<StreamId> = (0..5)
        .map(|i| StreamId::new(format!("order-{i}")))
        .collect();
    for s in &streams {
        writer
            .append(s, ExpectedVersion::NoStream, events(3))
            .await
            .unwrap();
        writer
            .append(s, ExpectedVersion::Exact(3), events(2))
            .await
            .unwrap();
    }
    assert_eq!(
        writer
            .read_feed(&keel::Cursor::new())
            .try_collect::<Vec<_>>()
            .await
            .unwrap()
            .len(),
        0,
        "nothing fed yet"
    );
    drop(writer);
    // A new process with a feeder finds the markers and publishes every event once.
    let feeder = common::open(common::builder(&keyspace)).await;
    let wanted: HashSet<StreamId> = streams.iter().cloned().collect();
    let fed = feed_of(&feeder, &wanted, 25, Duration::from_secs(20)).await;
    let each: Vec<(&StreamId, u64)> = streams.iter().map(|s| (s, 5)).collect();
    assert_once_in_order(&fed, 25, &each);
    // Give the feeder more rounds: nothing is published again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again: Vec<RecordedEvent> = feeder
        .read_feed(&keel::Cursor::new())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(again.len(), 25);
    assert_eq!(feeder.metrics().fed_events, 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_feeder_that_dies_mid_plan_is_finished_by_the_next() {
    let keyspace = common::fresh_keyspace("keel_plan");
    let writer = common::open(common::builder(&keyspace).feeder(false)).await;
    let stream = StreamId::new("cart-1");
    writer
        .append(&stream, ExpectedVersion::NoStream, events(4))
        .await
        .unwrap();
    // A feeder allocated positions 1..=4 of the stream's slice for the stream and died before
    // writing any feed row.
    let plan = serde_json::json!([{ "stream": "cart-1", "first": 1, "last": 4, "position": 1 }]);
    let slice = keel::feed::slice_of(&stream, writer.feed_slices());
    let session = writer.session();
    session
        .query_unpaged(
            format!(
                "INSERT INTO {keyspace}.feed_meta (id, head, plan) VALUES ({slice}, 4, ?) IF NOT EXISTS"
            ),
            (serde_json::to_vec(&plan).unwrap(),),
        )
        .await
        .unwrap();
    let status = writer.feed_status().await.unwrap();
    assert_eq!((status.head, status.unfinished_plan), (4, 1), "{status:?}");
    assert_eq!(status.held_by().len(), 0, "no feeder yet");
    assert_eq!(
        status.slices[slice as usize].unfinished_plan, 1,
        "{status:?}"
    );
    let feeder = common::open(common::builder(&keyspace)).await;
    writer
        .append(&stream, ExpectedVersion::Exact(4), events(1))
        .await
        .unwrap();
    let wanted: HashSet<StreamId> = [stream.clone()].into();
    let fed = feed_of(&feeder, &wanted, 5, Duration::from_secs(20)).await;
    let positions: Vec<(u64, u64)> = fed
        .iter()
        .map(|e| (e.position.unwrap(), e.version))
        .collect();
    assert_eq!(
        positions,
        vec![(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)],
        "the plan's positions kept, the rest after"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = feeder.feed_status().await.unwrap();
    assert_eq!((status.head, status.unfinished_plan), (5, 0), "{status:?}");
    assert!(
        status.unheld().is_empty() && status.last_alive.is_some(),
        "{status:?}"
    );
}

/// 64 appenders on one stream with a 2 ms append timeout: most LWTs outlive it, and their
/// coordinators go on retrying Paxos rounds after the client gave up. An append may only say
/// "not committed" (a conflict) when that is certain; otherwise it is `UnknownOutcome`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn timed_out_appends_are_resolved_by_reading_back() {
    let keyspace = common::fresh_keyspace("keel_lwt");
    let store = Arc::new(
        common::open(common::builder(&keyspace).append_timeout(Duration::from_millis(2))).await,
    );
    let stream = StreamId::new("acct-timeouts");
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (store, stream) = (store.clone(), stream.clone());
            tokio::spawn(async move {
                let (mut committed, mut refused, mut unsure) = (Vec::new(), Vec::new(), Vec::new());
                for _ in 0..4 {
                    let event = events(1).remove(0);
                    let id = event.event_id;
                    let at = store.stream_version(&stream).await.unwrap().unwrap_or(0);
                    match store
                        .append(&stream, ExpectedVersion::from_version(at), vec![event])
                        .await
                    {
                        Ok(_) => committed.push(id),
                        Err(e) if e.is_conflict() => refused.push(id),
                        Err(Error::UnknownOutcome { .. }) => unsure.push(id),
                        Err(e) => panic!("neither committed, refused nor unknown: {e}"),
                    }
                }
                (committed, refused, unsure)
            })
        })
        .collect();
    let (mut committed, mut refused, mut unsure) = (HashSet::new(), HashSet::new(), HashSet::new());
    for t in tasks {
        let (ok, no, maybe) = t.await.unwrap();
        committed.extend(ok);
        refused.extend(no);
        unsure.extend(maybe);
    }
    // Coordinators that outlived their client finish within their CAS timeout (1 s here).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all = read(&store, &stream).await;
    assert_dense(&all);
    let stored: HashSet<_> = all.iter().map(|e| e.event_id).collect();
    println!(
        "{} committed, {} refused, {} unknown; {} stored ({} of the unknown), {} outcomes read back",
        committed.len(),
        refused.len(),
        unsure.len(),
        stored.len(),
        unsure.intersection(&stored).count(),
        store.metrics().unknown_outcomes
    );
    assert!(
        committed.is_subset(&stored),
        "every reported success is stored"
    );
    let wrongly_refused: Vec<_> = refused.intersection(&stored).collect();
    assert!(
        wrongly_refused.is_empty(),
        "{} append(s) reported refused are stored",
        wrongly_refused.len()
    );
    assert!(
        stored
            .iter()
            .all(|id| committed.contains(id) || unsure.contains(id)),
        "a stored event that no appender reported as committed or unknown"
    );
    assert!(!committed.is_empty(), "some appends succeeded");
    assert!(
        store.metrics().unknown_outcomes > 0,
        "the timeout was actually hit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn undecodable_metadata_is_a_typed_error_naming_the_event() {
    let keyspace = common::fresh_keyspace("keel_corrupt");
    let store = Arc::new(common::open(common::builder(&keyspace)).await);
    let repo = Repository::<keel::doc::Counter>::new(store.clone());
    repo.execute("c1", 2).await.unwrap();
    repo.execute("c1", 3).await.unwrap();
    // Somebody damaged the stored metadata of version 2.
    store
        .session()
        .query_unpaged(
            format!("UPDATE {keyspace}.events SET metadata = 0xdeadbeef WHERE stream = 'counter-c1' AND bucket = 0 AND version = 2"),
            (),
        )
        .await
        .unwrap();
    match repo.load("c1").await {
        Err(Error::Decode {
            stream,
            version,
            event_type,
            ..
        }) => {
            assert_eq!(
                (stream.as_str(), version, event_type.as_str()),
                ("counter-c1", 2, "Incremented")
            );
        }
        other => panic!("expected a decode error, got {other:?}"),
    }
}

/// Rows damaged in the database (a column nulled, a version deleted) read back as
/// `Error::Damaged` naming the stream, the version and the column or the missing versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn damaged_rows_are_typed_errors_naming_stream_version_and_column() {
    let keyspace = common::fresh_keyspace("keel_damaged");
    let store = Arc::new(common::open(common::builder(&keyspace)).await);
    let cql = |statement: String| {
        let store = store.clone();
        async move { store.session().query_unpaged(statement, ()).await.unwrap() }
    };
    for (stream, column) in [
        ("nulled-type", "event_type"),
        ("nulled-payload", "payload"),
        ("nulled-schema", "schema_version"),
        ("nulled-id", "event_id"),
    ] {
        let id = StreamId::new(stream);
        store
            .append(&id, ExpectedVersion::NoStream, events(3))
            .await
            .unwrap();
        cql(format!(
            "UPDATE {keyspace}.events SET {column} = null WHERE stream = '{stream}' AND bucket = 0 AND version = 2"
        ))
        .await;
        match store.read_stream(&id, 1).try_collect::<Vec<_>>().await {
            Err(Error::Damaged {
                stream: s,
                version: 2,
                reason,
            }) => {
                assert_eq!(s, id);
                assert!(reason.contains(column), "{reason}");
            }
            other => panic!("{column} nulled: {other:?}"),
        }
    }
    let gap = StreamId::new("gap");
    store
        .append(&gap, ExpectedVersion::NoStream, events(5))
        .await
        .unwrap();
    cql(format!(
        "DELETE FROM {keyspace}.events WHERE stream = 'gap' AND bucket = 0 AND version = 4"
    ))
    .await;
    match store.read_stream(&gap, 1).try_collect::<Vec<_>>().await {
        Err(Error::Damaged {
            stream,
            version: 4,
            reason,
        }) => {
            assert_eq!(stream, gap);
            assert!(reason.contains("4..=4 are missing"), "{reason}");
        }
        other => panic!("a gap at version 4: {other:?}"),
    }
}

/// A damaged row in one stream holds that stream back and no other: events appended after
/// it to other streams are fed, `feed_status` and `health` name the stream, version and
/// reason, and `skip_in_feed` lets the feed go on past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_row_holds_back_its_stream_only() {
    let keyspace = common::fresh_keyspace("keel_stuck");
    // Written with no feeder anywhere, damaged, then a feeder starts.
    let writer = common::open(common::builder(&keyspace).feeder(false)).await;
    let bad = StreamId::new("bad");
    writer
        .append(&bad, ExpectedVersion::NoStream, events(3))
        .await
        .unwrap();
    writer
        .session()
        .query_unpaged(
            format!("UPDATE {keyspace}.events SET event_type = null WHERE stream = 'bad' AND bucket = 0 AND version = 2"),
            (),
        )
        .await
        .unwrap();
    let feeder = common::open(common::builder(&keyspace)).await;
    let good = StreamId::new("good");
    feeder
        .append(&good, ExpectedVersion::NoStream, events(4))
        .await
        .unwrap();
    let wanted: HashSet<StreamId> = [good.clone(), bad.clone()].into_iter().collect();
    // The bad stream is held back from the read that met the damaged row: none of its
    // events yet, all four of the good one's.
    let fed = feed_of(&feeder, &wanted, 4, Duration::from_secs(15)).await;
    let good_fed = fed.iter().filter(|e| e.stream == good).count();
    assert_eq!(
        good_fed, 4,
        "the good stream was fed past the bad one: {fed:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = feeder.feed_status().await.unwrap();
        if !status.stuck.is_empty() || Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.stuck.len(), 1, "{status:?}");
    let stuck = &status.stuck[0];
    assert_eq!(
        (stuck.event.stream.as_str(), stuck.event.version),
        ("bad", 2)
    );
    assert!(stuck.error.contains("event_type"), "{}", stuck.error);
    let health = feeder.health().await;
    let text = format!("{health:?}");
    assert!(
        !health.is_healthy() && text.contains("`bad` version 2"),
        "{text}"
    );
    // Skipping anything but the next version is refused; the right one lets it go on.
    let fed_bad = fed.iter().filter(|e| e.stream == bad).count() as u64;
    assert!(feeder.skip_in_feed(&bad, 3).await.is_err());
    assert_eq!(
        fed_bad, 0,
        "the bad stream is held back from the damaged read on: {fed:?}"
    );
    // Repaired in place: the feeder tries stuck streams again at every marker scan.
    writer
        .session()
        .query_unpaged(
            format!("UPDATE {keyspace}.events SET event_type = 'Incremented' WHERE stream = 'bad' AND bucket = 0 AND version = 2"),
            (),
        )
        .await
        .unwrap();
    let fed = feed_of(&feeder, &wanted, 7, Duration::from_secs(15)).await;
    assert_eq!(fed.len(), 7, "the repaired stream was fed: {fed:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !feeder.feed_status().await.unwrap().stuck.is_empty() {
        assert!(Instant::now() < deadline, "still stuck after the repair");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A second damage, skipped this time: the feed leaves version 4 out and goes on. The
    // feeder stops while the row is written and damaged, and a new one starts.
    feeder.shutdown().await;
    drop(feeder);
    writer
        .append(&bad, ExpectedVersion::Exact(3), events(2))
        .await
        .unwrap();
    writer
        .session()
        .query_unpaged(
            format!("UPDATE {keyspace}.events SET payload = null WHERE stream = 'bad' AND bucket = 0 AND version = 4"),
            (),
        )
        .await
        .unwrap();
    let feeder = common::open(common::builder(&keyspace)).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while feeder.feed_status().await.unwrap().stuck.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the second damage was not noticed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    feeder.skip_in_feed(&bad, 4).await.unwrap();
    let fed = feed_of(&feeder, &wanted, 8, Duration::from_secs(15)).await;
    let versions: Vec<u64> = fed
        .iter()
        .filter(|e| e.stream == bad)
        .map(|e| e.version)
        .collect();
    assert_eq!(versions, vec![1, 2, 3, 5], "version 4 skipped, 5 fed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn feeder_lease_moves_to_the_next_store_on_shutdown() {
    let keyspace = common::fresh_keyspace("keel_lead");
    let first = common::open(common::builder(&keyspace)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !first.is_feeding() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(first.is_feeding(), "the only store leads");
    let second = common::open(common::builder(&keyspace)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!second.is_feeding(), "one feeder at a time");
    first.shutdown().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !second.is_feeding() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(second.is_feeding(), "the second store took over");
    let stream = StreamId::new("after-handover");
    second
        .append(&stream, ExpectedVersion::NoStream, events(2))
        .await
        .unwrap();
    let fed = feed_of(&second, &[stream].into(), 2, Duration::from_secs(10)).await;
    assert_eq!(fed.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn feed_progress_keeps_one_row_per_stream() {
    let keyspace = common::fresh_keyspace("keel_progress");
    let store = common::open(common::builder(&keyspace)).await;
    let stream = StreamId::new("acct-progress");
    let only: HashSet<StreamId> = [stream.clone()].into();
    // Four appends, each fed in a round of its own.
    for round in 0..4u64 {
        store
            .append(&stream, ExpectedVersion::Exact(round * 2), events(2))
            .await
            .unwrap();
        let fed = feed_of(
            &store,
            &only,
            (round as usize + 1) * 2,
            Duration::from_secs(20),
        )
        .await;
        assert_eq!(fed.len() as u64, (round + 1) * 2, "round {round} fed");
    }
    let cql =
        format!("SELECT version FROM {keyspace}.feed_progress WHERE stream = 'acct-progress'");
    let versions: Vec<i64> = common::column(&store, cql).await;
    assert_eq!(versions, [8], "one progress row, at the last version fed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_of_thousands_of_streams_reaches_the_feed_once_and_in_order() {
    // Written with no feeder running, so that the feeder started next finds every stream at
    // once: 2,500 one-event streams and three of 1,500 events, 7,000 events in all - more
    // than three plans, shared between short and long backlogs.
    let keyspace = common::fresh_keyspace("keel_backlog");
    let writer = common::open(common::builder(&keyspace).feeder(false)).await;
    let short: Vec<StreamId> = (0..2_500)
        .map(|i| StreamId::new(format!("fan-{i:04}")))
        .collect();
    let long: Vec<StreamId> = (0..3).map(|i| StreamId::new(format!("deep-{i}"))).collect();
    let writer = &writer;
    futures::stream::iter(&short)
        .map(|stream| async move {
            writer
                .append(stream, ExpectedVersion::NoStream, events(1))
                .await
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    futures::future::try_join_all(long.iter().map(|stream| async move {
        for commit in 0..15u64 {
            writer
                .append(
                    stream,
                    ExpectedVersion::from_version(commit * 100),
                    events(100),
                )
                .await?;
        }
        Ok::<_, Error>(())
    }))
    .await
    .unwrap();

    let feeder = common::open(common::builder(&keyspace)).await;
    let all: HashSet<StreamId> = short.iter().chain(&long).cloned().collect();
    // Well within `settle_after` (60 s): streams that did not fit a plan come back through
    // the feeder's own wake-ups, not through the second look at their markers.
    let fed = feed_of(&feeder, &all, 7_000, Duration::from_secs(30)).await;
    let each: Vec<(&StreamId, u64)> = long.iter().map(|s| (s, 1_500)).collect();
    assert_once_in_order(&fed, 7_000, &each);
    let mut by_slice: std::collections::BTreeMap<u32, Vec<u64>> = Default::default();
    for e in &fed {
        by_slice
            .entry(e.slice)
            .or_default()
            .push(e.position.unwrap());
    }
    assert!(by_slice.len() > 1, "the streams spread over slices");
    let mut after = keel::Cursor::new();
    for (slice, mut positions) in by_slice {
        positions.sort_unstable();
        let n = positions.len() as u64;
        assert_eq!(
            positions,
            (1..=n).collect::<Vec<u64>>(),
            "dense positions in slice {slice}"
        );
        after.set(slice, n);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again: Vec<RecordedEvent> = feeder.read_feed(&after).try_collect().await.unwrap();
    assert!(again.is_empty(), "nothing after: {} more", again.len());
}

/// A writer without a feeder appends to a long stream (two partitions: an append stays in the
/// partition of its first version) and a short one; then its markers are dropped, as if an
/// hour had passed. Returns the two streams.
async fn appends_whose_markers_expired(keyspace: &str) -> (KeelScylla, StreamId, StreamId) {
    let writer = common::open(common::builder(keyspace).feeder(false)).await;
    let long = StreamId::new("ledger-long");
    let short = StreamId::new("ledger-short");
    for (from, n) in [(0, 300), (300, 300), (600, 10)] {
        writer
            .append(&long, ExpectedVersion::from_version(from), events(n))
            .await
            .unwrap();
    }
    writer
        .append(&short, ExpectedVersion::NoStream, events(2))
        .await
        .unwrap();
    writer
        .session()
        .query_unpaged(format!("TRUNCATE {keyspace}.pending"), ())
        .await
        .unwrap();
    (writer, long, short)
}

/// Sets when a feeder last noted it was alive: a minute ago (a note that lives 55 minutes, as
/// a feeder writes it), or longer ago than its note lives (none is left).
async fn feeder_last_alive(store: &KeelScylla, keyspace: &str, ago: Duration) {
    let cql = if ago < Duration::from_secs(55 * 60) {
        let at = keel::event::now_millis() - ago.as_millis() as i64;
        format!(
            "INSERT INTO {keyspace}.checkpoints (name, position, updated_at) \
             VALUES ('keel.feeder.heartbeat', 0, {at}) USING TTL 3300"
        )
    } else {
        format!("DELETE FROM {keyspace}.checkpoints WHERE name = 'keel.feeder.heartbeat'")
    };
    store.session().query_unpaged(cql, ()).await.unwrap();
}

/// Appends one event through `feeder` and waits until the feed has it (so the feeder has run
/// its rounds, the first full marker scan included); then asserts that the feed holds nothing
/// else.
async fn assert_feed_holds_only_a_fresh_event(feeder: &KeelScylla, why: &str) {
    let fresh = StreamId::new("ledger-fresh");
    feeder
        .append(&fresh, ExpectedVersion::NoStream, events(1))
        .await
        .unwrap();
    let only_fresh: HashSet<StreamId> = [fresh].into();
    let fed = feed_of(feeder, &only_fresh, 1, Duration::from_secs(20)).await;
    assert_eq!(fed.len(), 1, "the feeder runs");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let all: Vec<RecordedEvent> = feeder
        .read_feed(&keel::Cursor::new())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(all.len(), 1, "{why}");
}

/// Asserts that the feed holds the 612 events of the two streams once each, in order.
async fn assert_fed(feeder: &KeelScylla, long: &StreamId, short: &StreamId) {
    let wanted: HashSet<StreamId> = [long.clone(), short.clone()].into();
    let fed = feed_of(feeder, &wanted, 612, Duration::from_secs(30)).await;
    assert_once_in_order(&fed, 612, &[(long, 610), (short, 2)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_whose_markers_expired_reach_the_feed_by_reconciling() {
    let keyspace = common::fresh_keyspace("keel_reconcile");
    let (writer, long, short) = appends_whose_markers_expired(&keyspace).await;
    // A feeder was alive a minute ago, so the next one has no reason to reconcile by itself.
    feeder_last_alive(&writer, &keyspace, Duration::from_secs(60)).await;
    let feeder = common::open(common::builder(&keyspace)).await;
    assert_feed_holds_only_a_fresh_event(&feeder, "events without markers stay out").await;

    // Reconciling from a process without a feeder (as `keel feed reconcile` does) finds them
    // and the leading feeder publishes them, once each and in order.
    let found = writer.reconcile_feed().await.unwrap();
    assert_eq!(found.lagging, ["ledger-long", "ledger-short"]);
    assert_eq!(found.unfed_events, 612);
    assert_eq!(found.partitions, 4, "two for the long stream: {found:?}");
    assert_fed(&feeder, &long, &short).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = writer.reconcile_feed().await.unwrap();
    assert!(again.lagging.is_empty(), "nothing left: {again:?}");
    assert_eq!(again.unfed_events, 0);
    let all: Vec<RecordedEvent> = feeder
        .read_feed(&keel::Cursor::new())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(all.len(), 613, "and nothing published twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_feeder_after_an_hour_long_outage_reconciles_by_itself() {
    let keyspace = common::fresh_keyspace("keel_outage");
    let (writer, long, short) = appends_whose_markers_expired(&keyspace).await;
    // Turned off, a feeder taking over after two hours leaves them to the operator.
    feeder_last_alive(&writer, &keyspace, Duration::from_secs(2 * 3600)).await;
    let manual = common::open(common::builder(&keyspace).reconcile_after_outage(false)).await;
    assert_feed_holds_only_a_fresh_event(&manual, "not reconciled when turned off").await;
    manual.shutdown().await;

    // By default, the next feeder to take over after such an outage publishes them itself.
    feeder_last_alive(&writer, &keyspace, Duration::from_secs(2 * 3600)).await;
    let feeder = common::open(common::builder(&keyspace)).await;
    assert_fed(&feeder, &long, &short).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let all: Vec<RecordedEvent> = feeder
        .read_feed(&keel::Cursor::new())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(all.len(), 613, "nothing published twice");
    // The new feeder notes that it is alive: the next one will not reconcile again.
    let alive: Vec<scylla::value::CqlTimestamp> = common::column(
        &feeder,
        format!(
            "SELECT updated_at FROM {keyspace}.checkpoints WHERE name = 'keel.feeder.heartbeat'"
        ),
    )
    .await;
    let age = keel::event::now_millis() - alive[0].0;
    assert!(age < 60_000, "heartbeat {age} ms old");
    // The note expires by the database's clock 55 minutes after it was written, whatever the
    // clocks of the processes say.
    let ttl: Vec<Option<i32>> = common::column(
        &feeder,
        format!(
            "SELECT TTL(updated_at) FROM {keyspace}.checkpoints \
             WHERE name = 'keel.feeder.heartbeat'"
        ),
    )
    .await;
    assert!(
        ttl[0].is_some_and(|t| t > 3000 && t <= 3300),
        "heartbeat time to live {ttl:?}"
    );
}
