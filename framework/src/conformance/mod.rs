//! The store conformance suite: what every Keel store must do, as runnable checks.
//!
//! A store crate runs it from its tests with [`conformance_tests!`](crate::conformance_tests),
//! naming a section and an async factory that returns the store under test:
//!
//! ```text
//! keel::conformance_tests!(events, || async { std::sync::Arc::new(MyStore::connect().await) });
//! keel::conformance_tests!(snapshots, || async { std::sync::Arc::new(MyStore::connect().await) });
//! ```
//!
//! Sections: `events` ([`EventStore`]), `snapshots` ([`EventStore`] + [`SnapshotStore`]),
//! `checkpoints` ([`CheckpointStore`]), `leases` ([`LeaseStore`]), `projections` (all of
//! those plus [`ProjectionStore`](crate::projection::ProjectionStore), running a
//! [`ProjectionManager`](crate::projection::ProjectionManager) on the store), `sagas`
//! ([`EventStore`] + [`LeaseStore`] + [`SagaStore`](crate::saga::SagaStore), running a
//! [`SagaOrchestrator`](crate::saga::SagaOrchestrator)), `codecs` (the projection host plus
//! [`SnapshotStore`] and [`KeyStore`](crate::codec::KeyStore): keys, codec round trips,
//! crypto-shredding, tampering). The `events` section includes random histories checked
//! against a model (proptest, which the `conformance` feature brings in). Each case uses
//! fresh stream and worker names, so the factory may hand every case the same database; feed
//! cases only look at their own streams and tolerate other writers.
//!
//! The feed may lag behind appends (the contract of [`EventStore::read_slice`]); the feed cases
//! wait up to [`FEED_WAIT`] for events to appear.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::TryStreamExt;
use uuid::Uuid;

mod cache;
mod codecs;
mod commands;
mod endings;
mod histories;
mod projections;
mod read_errors;
mod sagas;
mod sharing;
mod upcasting;
mod visibility;

pub use cache::*;
pub use codecs::*;
pub use commands::*;
pub use endings::*;
pub use histories::*;
pub use projections::*;
pub use read_errors::*;
pub use sagas::*;
pub use sharing::*;
pub use upcasting::*;
pub use visibility::*;

use crate::doc::{Counter, CounterEvent};
use crate::error::Error;
use crate::event::{ExpectedVersion, Metadata, NewEvent, RecordedEvent, StreamId};
use crate::feed::Cursor;
use crate::repository::{Repository, SnapshotPolicy};
use crate::store::{CheckpointStore, EventStore, Fence, LeaseStore, Snapshot, SnapshotStore};

/// How long feed cases wait for appended events to reach the feed.
pub const FEED_WAIT: Duration = Duration::from_secs(20);

/// The runtime every case of a test binary runs on. One runtime for all cases lets a factory
/// share one connection (a driver session is tied to the runtime that opened it).
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .expect("a tokio runtime for the conformance suite")
    })
}

/// Runs one case on the suite's [`runtime`]; used by [`conformance_tests!`](crate::conformance_tests).
pub fn run<S, F, Fut, C, CFut>(factory: F, case: C)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Arc<S>>,
    C: FnOnce(Arc<S>) -> CFut,
    CFut: Future<Output = ()>,
{
    runtime().block_on(async move {
        let store = factory().await;
        case(store).await;
    });
}

/// Generates one `#[test]` per conformance case of a section, in a module named after it.
///
/// `conformance_tests!(section, factory)`: `section` is one of the eight below; `factory` is
/// an expression of type `Fn() -> impl Future<Output = Arc<S>>`. A store that implements
/// every trait runs all eight:
///
/// - `events`: appends, version rules, conflicts, the feed, bad payloads and stream ids,
///   random histories against a model, the aggregate cache, upcasting;
/// - `snapshots`: snapshots, and a command id applied once under snapshots (the window);
/// - `checkpoints`: checkpoints, and fencing of a stale epoch's save;
/// - `leases`: exclusivity, release by the holder only, expiry, group membership;
/// - `projections`: catch-up, resume, lag, poison and dead letters, pause/resume/reset,
///   blue/green rebuilds (the live generation served meanwhile, progress reported), one
///   active manager, takeover, fencing of a stalled holder, requests reaching the holder,
///   feed errors that stall loudly, managers sharing the slices;
/// - `sagas`: revisions, completion, compensation, timeouts and unknown outcomes, deadlines
///   across restarts, replies, recovery applying a step once, one active orchestrator, lease
///   renewal, a stale orchestrator fenced, the background task, the causation chain;
/// - `codecs`: payload keys, encryption round trips, crypto-shredding, tamper detection.
#[macro_export]
macro_rules! conformance_tests {
    (events, $factory:expr) => {
        $crate::conformance_tests!(@section events, $factory;
            append_then_read, unknown_stream_is_empty, expected_version_rules,
            conflict_names_stream_and_versions, failed_append_writes_nothing,
            empty_append_checks_expectation, concurrent_appenders_one_winner_per_version,
            long_stream_reads_in_order, metadata_round_trips, feed_orders_and_resumes,
            feed_positions_are_dense_and_unique, bad_payloads_are_typed_errors,
            invalid_stream_ids_are_refused, oversize_events_are_refused,
            random_histories_match_a_model, warm_caches_never_decide_on_stale_state,
            the_cache_holds_at_most_its_bound, old_schema_versions_are_upcast_on_read,
            a_failing_upcaster_names_the_event);
    };
    (snapshots, $factory:expr) => {
        $crate::conformance_tests!(@section snapshots, $factory;
            snapshot_latest_wins, snapshot_missing_is_none, repository_loads_from_snapshot,
            command_ids_survive_snapshots, command_window_is_the_last_k_commands);
    };
    (endings, $factory:expr) => {
        $crate::conformance_tests!(@section endings, $factory;
            soft_deleted_streams_refuse_appends, hard_deleted_streams_lose_their_events,
            truncated_streams_still_load, archived_streams_read_back,
            endings_refuse_what_would_lose_data, a_deletion_racing_appends_loses_nothing);
    };
    (checkpoints, $factory:expr) => {
        $crate::conformance_tests!(@section checkpoints, $factory;
            checkpoint_round_trip, checkpoint_refuses_a_stale_epoch);
    };
    (projections, $factory:expr) => {
        $crate::conformance_tests!(@section projections, $factory;
            projection_store_round_trip, projection_catches_up_in_order,
            projection_resumes_from_checkpoint, projection_reports_lag,
            projection_stops_on_poison_event, projection_dead_letters_when_told,
            dead_letters_are_replayed_and_skipped,
            projection_pause_resume_reset, projection_rebuilds_while_writes_continue,
            projection_has_one_active_instance, projection_takeover_after_holder_dies,
            projection_stale_holder_stops_applying, projection_stale_writes_are_fenced,
            projection_requests_reach_the_holder, projection_feed_errors_stall_loudly,
            projection_unreadable_events_follow_the_policy,
            projection_rebuild_on_a_fresh_manager, projection_rebuild_resumes_after_a_restart,
            a_replaced_generation_is_retired_after_the_grace,
            projection_live_generation_serves_during_rebuild,
            projection_managers_share_the_slices, a_shared_rebuild_fills_every_slice,
            a_write_is_visible_once_applied, projections_hear_of_stream_endings);
    };
    (sagas, $factory:expr) => {
        $crate::conformance_tests!(@section sagas, $factory;
            saga_store_guards_revisions, saga_happy_path,
            saga_failure_compensates_completed_steps_in_reverse, saga_timeout_triggers_compensation,
            saga_deadline_fires_after_restart, saga_steps_complete_by_reply,
            saga_recovery_applies_a_step_once, saga_compensation_failure_then_retry,
            saga_has_one_active_orchestrator, saga_commands_carry_correlation,
            causation_is_a_chain, saga_step_committed_before_its_timeout_completes_once,
            saga_step_of_unknown_outcome_is_compensated, saga_stale_orchestrator_is_fenced,
            saga_lease_is_renewed_while_a_step_runs,
            saga_background_task_recovers_and_fires_deadlines);
    };
    (codecs, $factory:expr) => {
        $crate::conformance_tests!(@section codecs, $factory;
            keys_are_stable_per_subject, shredding_deletes_the_key, codec_round_trips,
            shredded_events_read_as_shredded, projections_skip_shredded_events,
            tampered_payloads_are_detected,
            shredded_subjects_are_not_decided_on_from_the_cache);
    };
    (leases, $factory:expr) => {
        $crate::conformance_tests!(@section leases, $factory;
            lease_is_exclusive, lease_release_only_by_holder, lease_expires,
            members_are_counted_until_they_leave_or_lapse);
    };
    (@section $section:ident, $factory:expr; $($case:ident),+ $(,)?) => {
        mod $section {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $case() {
                    $crate::conformance::run($factory, $crate::conformance::$case);
                }
            )+
        }
    };
}

pub(crate) fn fresh_stream(prefix: &str) -> StreamId {
    StreamId::new(format!("{prefix}-{}", Uuid::new_v4().simple()))
}

pub(crate) fn counter_events(bys: &[u64]) -> Vec<NewEvent> {
    bys.iter()
        .map(|&by| NewEvent::encode(&CounterEvent::Incremented { by }, Metadata::default()))
        .collect::<Result<_, _>>()
        .expect("counter events encode")
}

async fn read<S: EventStore + ?Sized>(
    store: &S,
    stream: &StreamId,
    from: u64,
) -> Vec<RecordedEvent> {
    store
        .read_stream(stream, from)
        .try_collect()
        .await
        .expect("read_stream succeeds")
}

/// Waits until the feed after `from` holds `count` events of `streams`; returns them in the
/// order read (each slice in position order; no order between slices).
pub(crate) async fn wait_for_feed<S: EventStore + ?Sized>(
    store: &S,
    from: &Cursor,
    streams: &[&StreamId],
    count: usize,
) -> Vec<RecordedEvent> {
    let deadline = Instant::now() + FEED_WAIT;
    loop {
        let seen: Vec<RecordedEvent> = store
            .read_feed(from)
            .try_filter(|e| futures::future::ready(streams.contains(&&e.stream)))
            .try_collect()
            .await
            .expect("read_feed succeeds");
        if seen.len() >= count || Instant::now() > deadline {
            assert_eq!(
                seen.len(),
                count,
                "feed holds {} of {count} events after {FEED_WAIT:?}",
                seen.len()
            );
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An empty stream id and one over [`StreamId::MAX_BYTES`] are refused with
/// [`Error::InvalidStream`] and leave nothing behind: later appends to good streams reach the
/// feed, and the longest allowed id works.
pub async fn invalid_stream_ids_are_refused<S: EventStore>(store: Arc<S>) {
    let too_long = StreamId::new("x".repeat(StreamId::MAX_BYTES + 1));
    for bad in [StreamId::new(""), too_long] {
        match store
            .append(&bad, ExpectedVersion::Any, counter_events(&[1]))
            .await
        {
            Err(Error::InvalidStream { .. }) => {}
            other => panic!("a stream id of {} bytes: {other:?}", bad.as_str().len()),
        }
    }
    let longest = StreamId::new(format!(
        "{}{}",
        fresh_stream("conf-long").as_str(),
        "y".repeat(StreamId::MAX_BYTES - 48)
    ));
    assert!(longest.as_str().len() <= StreamId::MAX_BYTES);
    let good = fresh_stream("conf-after-bad");
    let from = store.feed_heads().await.expect("feed_heads");
    store
        .append(&longest, ExpectedVersion::NoStream, counter_events(&[1]))
        .await
        .expect("a stream id within the limit is stored");
    store
        .append(&good, ExpectedVersion::NoStream, counter_events(&[2]))
        .await
        .expect("append after refused ones");
    assert_eq!(read(&*store, &longest, 1).await.len(), 1);
    wait_for_feed(&*store, &from, &[&longest, &good], 2).await;
}

/// Appended events read back with dense versions, in order, with their types and payloads.
pub async fn append_then_read<S: EventStore>(store: Arc<S>) {
    let stream = fresh_stream("conf");
    let events = counter_events(&[1, 2, 3]);
    let r = store
        .append(&stream, ExpectedVersion::NoStream, events.clone())
        .await
        .expect("first append succeeds");
    assert_eq!((r.first_version, r.last_version), (1, 3));
    let all = read(&*store, &stream, 1).await;
    assert_eq!(
        all.iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    for (got, sent) in all.iter().zip(&events) {
        assert_eq!(got.event_id, sent.event_id);
        assert_eq!(got.stream, stream);
        assert_eq!(&*got.event_type, "Incremented");
        assert_eq!(got.schema_version, 1);
        assert_eq!(got.payload, sent.payload);
    }
    let tail = read(&*store, &stream, 2).await;
    assert_eq!(
        tail.iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![2, 3]
    );
    assert!(read(&*store, &stream, 4).await.is_empty());
    assert_eq!(store.stream_version(&stream).await.unwrap(), Some(3));
}

/// A stream never written reads as empty and has no version.
pub async fn unknown_stream_is_empty<S: EventStore>(store: Arc<S>) {
    let stream = fresh_stream("conf-none");
    assert!(read(&*store, &stream, 1).await.is_empty());
    assert_eq!(store.stream_version(&stream).await.unwrap(), None);
}

/// `NoStream`, `Exact` and `Any` accept and refuse exactly as documented.
pub async fn expected_version_rules<S: EventStore>(store: Arc<S>) {
    let stream = fresh_stream("conf-ev");
    let one = || counter_events(&[1]);
    assert!(store
        .append(&stream, ExpectedVersion::Exact(1), one())
        .await
        .unwrap_err()
        .is_conflict());
    store
        .append(&stream, ExpectedVersion::Exact(0), one())
        .await
        .expect("Exact(0) on a new stream");
    assert!(store
        .append(&stream, ExpectedVersion::NoStream, one())
        .await
        .unwrap_err()
        .is_conflict());
    assert!(store
        .append(&stream, ExpectedVersion::Exact(0), one())
        .await
        .unwrap_err()
        .is_conflict());
    assert!(store
        .append(&stream, ExpectedVersion::Exact(2), one())
        .await
        .unwrap_err()
        .is_conflict());
    let r = store
        .append(&stream, ExpectedVersion::Exact(1), one())
        .await
        .unwrap();
    assert_eq!(r.last_version, 2);
    let r = store
        .append(&stream, ExpectedVersion::Any, counter_events(&[1, 1]))
        .await
        .unwrap();
    assert_eq!((r.first_version, r.last_version), (3, 4));
    let fresh = fresh_stream("conf-ev-any");
    let r = store
        .append(&fresh, ExpectedVersion::Any, one())
        .await
        .unwrap();
    assert_eq!(r.last_version, 1);
    assert_eq!(read(&*store, &stream, 1).await.len(), 4);
}

/// A conflict names the stream, what was expected and what the stream is at.
pub async fn conflict_names_stream_and_versions<S: EventStore>(store: Arc<S>) {
    let stream = fresh_stream("conf-cf");
    store
        .append(&stream, ExpectedVersion::NoStream, counter_events(&[1, 2]))
        .await
        .unwrap();
    match store
        .append(&stream, ExpectedVersion::Exact(1), counter_events(&[3]))
        .await
    {
        Err(Error::Conflict {
            stream: s,
            expected,
            actual,
        }) => {
            assert_eq!(s, stream);
            assert_eq!(expected, ExpectedVersion::Exact(1));
            assert_eq!(actual, Some(2));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    let msg = store
        .append(&stream, ExpectedVersion::NoStream, counter_events(&[3]))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(stream.as_str()) && msg.contains("version 2"),
        "message: {msg}"
    );
}

/// A refused multi-event append leaves nothing behind.
pub async fn failed_append_writes_nothing<S: EventStore>(store: Arc<S>) {
    let stream = fresh_stream("conf-atomic");
    store
        .append(&stream, ExpectedVersion::NoStream, counter_events(&[1]))
        .await
        .unwrap();
    let refused = store
        .append(
            &stream,
            ExpectedVersion::Exact(0),
            counter_events(&[1, 2, 3, 4, 5]),
        )
        .await;
    assert!(refused.unwrap_err().is_conflict());
    assert_eq!(read(&*store, &stream, 1).await.len(), 1);
    let r = store
        .append(
            &stream,
            ExpectedVersion::Exact(1),
            counter_events(&[1, 2, 3, 4, 5]),
        )
        .await
        .unwrap();
    assert_eq!((r.first_version, r.last_version), (2, 6));
    assert_eq!(read(&*store, &stream, 1).await.len(), 6);
}

/// An event over the store's default limit ([`DEFAULT_MAX_EVENT_BYTES`](crate::event::DEFAULT_MAX_EVENT_BYTES))
/// is refused with [`Error::TooLarge`] naming the stream and event type, together with the
/// good events of its append: nothing of it is stored, and the feed carries on with the
/// stream's next append.
pub async fn oversize_events_are_refused<S: EventStore>(store: Arc<S>) {
    let stream = fresh_stream("conf-oversize");
    let from = store.feed_heads().await.unwrap();
    store
        .append(&stream, ExpectedVersion::NoStream, counter_events(&[1]))
        .await
        .unwrap();
    let max = crate::event::DEFAULT_MAX_EVENT_BYTES;
    let huge = NewEvent::new("Uploaded", 1, vec![b'x'; max + 1]);
    let mut events = counter_events(&[2]);
    events.push(huge);
    match store
        .append(&stream, ExpectedVersion::Exact(1), events)
        .await
    {
        Err(Error::TooLarge {
            stream: named,
            event_type,
            bytes,
            max: limit,
        }) => {
            assert_eq!(named, stream);
            assert_eq!(event_type, "Uploaded");
            assert!(bytes > limit && limit == max, "{bytes} over {limit}");
        }
        other => panic!(
            "an event of {} bytes was not refused as too large: {other:?}",
            max + 1
        ),
    }
    assert_eq!(store.stream_version(&stream).await.unwrap(), Some(1));
    store
        .append(&stream, ExpectedVersion::Exact(1), counter_events(&[3]))
        .await
        .expect("the stream takes its next append");
    let fed = wait_for_feed(&*store, &from, &[&stream], 2).await;
    let versions: Vec<u64> = fed.iter().map(|e| e.version).collect();
    assert_eq!(versions, [1, 2]);
}

/// Appending no events checks the expectation and stores nothing.
pub async fn empty_append_checks_expectation<S: EventStore>(store: Arc<S>) {
    let stream = fresh_stream("conf-empty");
    store
        .append(&stream, ExpectedVersion::NoStream, Vec::new())
        .await
        .expect("empty append on no stream");
    assert_eq!(store.stream_version(&stream).await.unwrap(), None);
    store
        .append(&stream, ExpectedVersion::NoStream, counter_events(&[1]))
        .await
        .unwrap();
    assert!(store
        .append(&stream, ExpectedVersion::NoStream, Vec::new())
        .await
        .unwrap_err()
        .is_conflict());
    let r = store
        .append(&stream, ExpectedVersion::Exact(1), Vec::new())
        .await
        .unwrap();
    assert_eq!(r.last_version, 1);
}

/// 64 appenders race on one stream: one winner per version, no gaps, no duplicates.
pub async fn concurrent_appenders_one_winner_per_version<S: EventStore>(store: Arc<S>) {
    const WRITERS: usize = 64;
    let stream = fresh_stream("conf-race");
    // Round 1: all expect an empty stream; exactly one wins.
    let tasks: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (store, stream) = (store.clone(), stream.clone());
            tokio::spawn(async move {
                store
                    .append(&stream, ExpectedVersion::NoStream, counter_events(&[1]))
                    .await
            })
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        match t.await.expect("appender task") {
            Ok(_) => wins += 1,
            Err(e) if e.is_conflict() => {}
            Err(e) => panic!("an appender failed with something other than a conflict: {e}"),
        }
    }
    assert_eq!(wins, 1, "exactly one appender wins version 1");

    // Round 2: every writer appends one event, re-reading the version after each conflict.
    let tasks: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (store, stream) = (store.clone(), stream.clone());
            tokio::spawn(async move {
                let event = counter_events(&[2]).remove(0);
                let id = event.event_id;
                for _ in 0..2_000 {
                    let at = store.stream_version(&stream).await.expect("stream_version");
                    match store
                        .append(
                            &stream,
                            ExpectedVersion::from_version(at.unwrap_or(0)),
                            vec![event.clone()],
                        )
                        .await
                    {
                        Ok(_) => return id,
                        Err(e) if e.is_conflict() => {}
                        Err(Error::UnknownOutcome { .. }) | Err(Error::Timeout { .. }) => {
                            // The store could not tell: look for the event before trying again.
                            let mine = store
                                .read_stream(&stream, 1)
                                .try_filter(|e| futures::future::ready(e.event_id == id));
                            let found: Vec<_> = mine.try_collect().await.expect("read back");
                            if !found.is_empty() {
                                return id;
                            }
                        }
                        Err(e) => panic!("append failed: {e}"),
                    }
                    tokio::task::yield_now().await;
                }
                panic!("an appender never got its event in");
            })
        })
        .collect();
    let mut ids = HashSet::new();
    for t in tasks {
        ids.insert(t.await.expect("appender task"));
    }
    let all = read(&*store, &stream, 1).await;
    assert_eq!(
        all.len(),
        WRITERS + 1,
        "one event per winner, none lost, none doubled"
    );
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.version, i as u64 + 1, "versions are dense");
    }
    let stored: HashSet<_> = all.iter().map(|e| e.event_id).collect();
    assert_eq!(stored.len(), all.len(), "no event stored twice");
    assert!(ids.is_subset(&stored), "every writer's event is stored");
}

/// A stream of 1,234 events written in uneven batches reads back complete and in order, from
/// the start and from the middle (stores page and partition long streams).
pub async fn long_stream_reads_in_order<S: EventStore>(store: Arc<S>) {
    let stream = fresh_stream("conf-long");
    let mut version = 0;
    for batch in [1usize, 99, 400, 3, 500, 231] {
        let bys: Vec<u64> = (0..batch as u64).map(|i| version + i + 1).collect();
        let r = store
            .append(
                &stream,
                ExpectedVersion::from_version(version),
                counter_events(&bys),
            )
            .await
            .expect("batch append");
        version = r.last_version;
    }
    assert_eq!(version, 1234);
    let all = read(&*store, &stream, 1).await;
    assert_eq!(all.len(), 1234);
    for (i, e) in all.iter().enumerate() {
        let expected = i as u64 + 1;
        assert_eq!(e.version, expected);
        let CounterEvent::Incremented { by } = serde_json::from_slice(&e.payload).unwrap();
        assert_eq!(by, expected, "payload of version {expected}");
    }
    let from_middle = read(&*store, &stream, 777).await;
    assert_eq!(from_middle.first().map(|e| e.version), Some(777));
    assert_eq!(from_middle.len(), 1234 - 776);
}

/// Event ids, correlation and causation ids, user metadata and timestamps survive storage.
pub async fn metadata_round_trips<S: EventStore>(store: Arc<S>) {
    let stream = fresh_stream("conf-meta");
    let (correlation, causation) = (Uuid::new_v4(), Uuid::new_v4());
    let metadata = Metadata::correlated(correlation)
        .caused_by(causation)
        .with("user", "ada")
        .with("ip", "127.0.0.1");
    let event = counter_events(&[1])
        .remove(0)
        .with_metadata(metadata.clone());
    let plain = counter_events(&[2]).remove(0);
    let before = crate::event::now_millis();
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![event.clone(), plain],
        )
        .await
        .unwrap();
    let all = read(&*store, &stream, 1).await;
    assert_eq!(all[0].event_id, event.event_id);
    assert_eq!(*all[0].metadata, metadata);
    assert!(all[1].metadata.is_empty());
    assert!(
        (all[0].recorded_at - before).abs() < 60_000,
        "recorded_at is a current timestamp in ms"
    );
}

/// The feed keeps each stream's order, and a reader resumes exactly after its checkpoint.
pub async fn feed_orders_and_resumes<S: EventStore>(store: Arc<S>) {
    let (a, b) = (fresh_stream("conf-feed-a"), fresh_stream("conf-feed-b"));
    let from = store.feed_heads().await.unwrap();
    store
        .append(&a, ExpectedVersion::NoStream, counter_events(&[1, 2]))
        .await
        .unwrap();
    store
        .append(&b, ExpectedVersion::NoStream, counter_events(&[1]))
        .await
        .unwrap();
    store
        .append(&a, ExpectedVersion::Exact(2), counter_events(&[3]))
        .await
        .unwrap();
    let seen = wait_for_feed(&*store, &from, &[&a, &b], 4).await;
    let a_versions: Vec<u64> = seen
        .iter()
        .filter(|e| e.stream == a)
        .map(|e| e.version)
        .collect();
    assert_eq!(a_versions, vec![1, 2, 3], "per-stream order in the feed");
    assert!(
        seen.iter().all(|e| e.position.is_some()),
        "feed events carry positions"
    );
    // Resume after the second event read: exactly the rest.
    let mut cursor = from.clone();
    for e in &seen[..2] {
        cursor.consume(e);
    }
    let rest = wait_for_feed(&*store, &cursor, &[&a, &b], 2).await;
    let mut rest_ids: Vec<_> = rest.iter().map(|e| e.event_id).collect();
    let mut expected: Vec<_> = seen[2..].iter().map(|e| e.event_id).collect();
    rest_ids.sort();
    expected.sort();
    assert_eq!(
        rest_ids, expected,
        "a cursor resumes exactly after what it consumed"
    );
    let heads = store.feed_heads().await.unwrap();
    for e in &seen {
        assert!(
            heads.get(e.slice) >= e.position.unwrap(),
            "heads cover what was read"
        );
        let slice = crate::feed::slice_of(&e.stream, store.feed_slices());
        assert_eq!(e.slice, slice, "an event is in its stream's slice");
    }
}

/// Feed positions are unique, increasing, and every committed event appears once, also with
/// concurrent writers on several streams.
pub async fn feed_positions_are_dense_and_unique<S: EventStore>(store: Arc<S>) {
    let streams: Vec<StreamId> = (0..8).map(|_| fresh_stream("conf-feed-many")).collect();
    let from = store.feed_heads().await.unwrap();
    let tasks: Vec<_> = streams
        .iter()
        .cloned()
        .map(|s| {
            let store = store.clone();
            tokio::spawn(async move {
                for v in 0..5u64 {
                    store
                        .append(
                            &s,
                            ExpectedVersion::from_version(v),
                            counter_events(&[v + 1]),
                        )
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let refs: Vec<&StreamId> = streams.iter().collect();
    let seen = wait_for_feed(&*store, &from, &refs, 40).await;
    let ids: HashSet<_> = seen.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), 40, "every event exactly once");
    let slices = store.feed_slices();
    assert!(slices.is_power_of_two(), "{slices} slices");
    for s in &streams {
        let mine: Vec<&RecordedEvent> = seen.iter().filter(|e| &e.stream == s).collect();
        let versions: Vec<u64> = mine.iter().map(|e| e.version).collect();
        assert_eq!(versions, vec![1, 2, 3, 4, 5]);
        assert!(
            mine.iter()
                .all(|e| e.slice == crate::feed::slice_of(s, slices)),
            "a stream's events are all in its slice"
        );
    }
    // Per slice: positions increase in the order read, and are dense: everything between our
    // first and last position in the slice is some event of the feed.
    let mut by_slice: std::collections::BTreeMap<u32, Vec<u64>> = Default::default();
    for e in &seen {
        by_slice
            .entry(e.slice)
            .or_default()
            .push(e.position.unwrap());
    }
    for (slice, positions) in by_slice {
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "positions increase in slice {slice}"
        );
        let (first, last) = (positions[0], *positions.last().unwrap());
        let span: Vec<RecordedEvent> = store.read_slice(slice, first).try_collect().await.unwrap();
        let span: Vec<u64> = span
            .iter()
            .map(|e| e.position.unwrap())
            .take_while(|&p| p <= last)
            .collect();
        assert_eq!(
            span,
            (first..=last).collect::<Vec<_>>(),
            "no gaps in the positions of slice {slice}"
        );
    }
}

/// Payloads that no longer decode, and unknown event types, are typed errors naming the
/// stream, version and type; the events before them stay readable.
pub async fn bad_payloads_are_typed_errors<S: EventStore>(store: Arc<S>) {
    let repo = Repository::<Counter>::new(store.clone());
    let id = Uuid::new_v4().simple().to_string();
    repo.execute(&id, 5).await.expect("a good command");
    let stream_id = <Counter as crate::Aggregate>::stream_id(&id);
    store
        .append(
            &stream_id,
            ExpectedVersion::Exact(1),
            vec![NewEvent::new(
                "Incremented",
                1,
                Bytes::from_static(b"{not json"),
            )],
        )
        .await
        .unwrap();
    match repo.load(&id).await {
        Err(Error::Decode {
            stream,
            version,
            event_type,
            ..
        }) => {
            assert_eq!(
                (stream, version, event_type.as_str()),
                (stream_id.clone(), 2, "Incremented")
            );
        }
        other => panic!("expected a decode error, got {other:?}"),
    }
    let other = Uuid::new_v4().simple().to_string();
    let other_stream = <Counter as crate::Aggregate>::stream_id(&other);
    store
        .append(
            &other_stream,
            ExpectedVersion::NoStream,
            vec![NewEvent::new(
                "Exploded",
                1,
                Bytes::from_static(b"{\"Exploded\":{}}"),
            )],
        )
        .await
        .unwrap();
    match repo.load(&other).await {
        Err(Error::UnknownEventType {
            stream,
            version,
            event_type,
        }) => {
            assert_eq!(
                (stream, version, event_type.as_str()),
                (other_stream, 1, "Exploded")
            );
        }
        other => panic!("expected an unknown-type error, got {other:?}"),
    }
    assert_eq!(
        read(&*store, &stream_id, 1).await.len(),
        2,
        "committed events are kept"
    );
}

fn snapshot(stream: &StreamId, version: u64, body: &'static [u8]) -> Snapshot {
    Snapshot {
        stream: stream.clone(),
        version,
        schema_version: 1,
        payload: Bytes::from_static(body),
        taken_at: crate::event::now_millis(),
        recent_commands: Some((1..=version).map(|v| Uuid::from_u128(v.into())).collect()),
    }
}

/// The snapshot with the highest version is the one loaded, whatever the order of saves.
pub async fn snapshot_latest_wins<S: SnapshotStore>(store: Arc<S>) {
    let stream = fresh_stream("conf-snap");
    store
        .save_snapshot(snapshot(&stream, 10, b"ten"))
        .await
        .unwrap();
    store
        .save_snapshot(snapshot(&stream, 20, b"twenty"))
        .await
        .unwrap();
    store
        .save_snapshot(snapshot(&stream, 15, b"fifteen"))
        .await
        .unwrap();
    let latest = store
        .load_snapshot(&stream)
        .await
        .unwrap()
        .expect("a snapshot");
    assert_eq!((latest.version, &latest.payload[..]), (20, &b"twenty"[..]));
    assert_eq!(latest.schema_version, 1);
    assert_eq!(
        latest.recent_commands,
        snapshot(&stream, 20, b"").recent_commands,
        "a snapshot keeps its command window"
    );
}

/// No snapshot loads as `None`.
pub async fn snapshot_missing_is_none<S: SnapshotStore>(store: Arc<S>) {
    assert!(store
        .load_snapshot(&fresh_stream("conf-snap-none"))
        .await
        .unwrap()
        .is_none());
}

/// With `SnapshotPolicy::Every(10)`, 25 commands leave a snapshot at 20 and a load replays 5.
pub async fn repository_loads_from_snapshot<S: EventStore + SnapshotStore>(store: Arc<S>) {
    let repo = Repository::<Counter>::builder(store.clone())
        .snapshots(store.clone(), SnapshotPolicy::Every(10))
        .build();
    let id = Uuid::new_v4().simple().to_string();
    for _ in 0..25 {
        repo.execute(&id, 1).await.unwrap();
    }
    let snap = store
        .load_snapshot(&<Counter as crate::Aggregate>::stream_id(&id))
        .await
        .unwrap()
        .expect("a snapshot was taken");
    assert_eq!(snap.version, 20);
    let before = repo.metrics();
    let loaded = repo.load(&id).await.unwrap();
    assert_eq!((loaded.state.value, loaded.version), (25, 25));
    let after = repo.metrics();
    assert_eq!(after.events_replayed - before.events_replayed, 5);
    assert_eq!(after.snapshot_hits - before.snapshot_hits, 1);
    // Without snapshots the same aggregate replays everything and agrees.
    let plain = Repository::<Counter>::new(store.clone())
        .load(&id)
        .await
        .unwrap();
    assert_eq!(plain, loaded);
}

/// Checkpoints start absent, then read back the last saved position.
pub async fn checkpoint_round_trip<S: CheckpointStore>(store: Arc<S>) {
    let name = format!("conf-proj-{}", Uuid::new_v4().simple());
    let fence = Fence::new(format!("projection/{name}"), 1);
    assert_eq!(store.load_checkpoint(&name).await.unwrap(), None);
    store.save_checkpoint(&name, 42, &fence).await.unwrap();
    assert_eq!(store.load_checkpoint(&name).await.unwrap(), Some(42));
    store.save_checkpoint(&name, 43, &fence).await.unwrap();
    assert_eq!(store.load_checkpoint(&name).await.unwrap(), Some(43));
    // The holder itself may move its checkpoint back (an operator's reset).
    store.save_checkpoint(&name, 7, &fence).await.unwrap();
    assert_eq!(store.load_checkpoint(&name).await.unwrap(), Some(7));
}

/// A save under an epoch lower than one already stored is refused with `Fenced` and changes
/// nothing, however it races: of two writers saving at once under epochs 1 and 2, the
/// checkpoint ends with epoch 2's position whatever the order.
pub async fn checkpoint_refuses_a_stale_epoch<S: CheckpointStore>(store: Arc<S>) {
    let name = format!("conf-fence-{}", Uuid::new_v4().simple());
    let (old, new) = (Fence::new("conf", 1), Fence::new("conf", 2));
    store.save_checkpoint(&name, 100, &old).await.unwrap();
    store.save_checkpoint(&name, 4_000, &new).await.unwrap();
    match store.save_checkpoint(&name, 1_201, &old).await {
        Err(Error::Fenced { epoch, current, .. }) => assert_eq!((epoch, current), (1, 2)),
        other => panic!("a save under a stale epoch must be refused as Fenced, got {other:?}"),
    }
    assert_eq!(store.load_checkpoint(&name).await.unwrap(), Some(4_000));
    // Racing: the stale writer never wins once the newer one has saved.
    for round in 0..10u64 {
        let name = format!("{name}-{round}");
        let (a, b) = tokio::join!(
            store.save_checkpoint(&name, 1, &old),
            store.save_checkpoint(&name, 2, &new)
        );
        b.unwrap();
        if let Err(e) = a {
            assert!(e.is_fenced(), "round {round}: {e}");
        }
        assert_eq!(
            store.load_checkpoint(&name).await.unwrap(),
            Some(2),
            "round {round}: the stale writer's position won"
        );
    }
}

/// One holder at a time; the holder can re-acquire and renew.
pub async fn lease_is_exclusive<S: LeaseStore>(store: Arc<S>) {
    let name = format!("conf-lease-{}", Uuid::new_v4().simple());
    let ttl = Duration::from_secs(30);
    let a = store
        .acquire(&name, "a", ttl)
        .await
        .unwrap()
        .expect("a takes the free lease");
    assert!(
        store.acquire(&name, "b", ttl).await.unwrap().is_none(),
        "b is refused"
    );
    let again = store
        .acquire(&name, "a", ttl)
        .await
        .unwrap()
        .expect("a re-acquires");
    assert_eq!(
        again.epoch, a.epoch,
        "re-acquiring by the holder keeps the epoch"
    );
    assert!(store.renew(&a).await.unwrap());
    let fake = crate::store::Lease {
        holder: "b".into(),
        ..a.clone()
    };
    assert!(
        !store.renew(&fake).await.unwrap(),
        "b cannot renew a's lease"
    );
}

/// Only the holder releases; after that another holder takes it with a higher epoch.
pub async fn lease_release_only_by_holder<S: LeaseStore>(store: Arc<S>) {
    let name = format!("conf-lease-{}", Uuid::new_v4().simple());
    let ttl = Duration::from_secs(30);
    let a = store.acquire(&name, "a", ttl).await.unwrap().unwrap();
    let fake = crate::store::Lease {
        holder: "b".into(),
        ..a.clone()
    };
    assert!(
        !store.release(&fake).await.unwrap(),
        "b cannot release a's lease"
    );
    assert!(store.acquire(&name, "b", ttl).await.unwrap().is_none());
    assert!(store.release(&a).await.unwrap());
    assert!(
        !store.renew(&a).await.unwrap(),
        "a released lease cannot be renewed"
    );
    let b = store
        .acquire(&name, "b", ttl)
        .await
        .unwrap()
        .expect("b takes the released lease");
    assert!(b.epoch > a.epoch, "the epoch grows with each new holder");
}

/// A group counts the members that joined and neither left nor let their time run out.
pub async fn members_are_counted_until_they_leave_or_lapse<S: LeaseStore>(store: Arc<S>) {
    let group = format!("conf-group-{}", Uuid::new_v4().simple());
    let long = Duration::from_secs(30);
    assert_eq!(store.join(&group, "b", long).await.unwrap(), ["b"]);
    assert_eq!(store.join(&group, "a", long).await.unwrap(), ["a", "b"]);
    assert_eq!(
        store.join(&group, "b", long).await.unwrap(),
        ["a", "b"],
        "joining again refreshes, it does not count twice"
    );
    store.leave(&group, "a").await.unwrap();
    assert_eq!(store.join(&group, "b", long).await.unwrap(), ["b"]);
    store
        .join(&group, "c", Duration::from_secs(1))
        .await
        .unwrap();
    // A store may keep a member up to a second past its time (CQL TTLs are whole seconds).
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    assert_eq!(
        store.join(&group, "b", long).await.unwrap(),
        ["b"],
        "a member that did not come back lapsed"
    );
    let other = format!("{group}-other");
    assert_eq!(
        store.join(&other, "z", long).await.unwrap(),
        ["z"],
        "groups are apart"
    );
}

/// An unrenewed lease expires and another holder takes it.
pub async fn lease_expires<S: LeaseStore>(store: Arc<S>) {
    let name = format!("conf-lease-{}", Uuid::new_v4().simple());
    // 3 s: long enough that a slow first acquire on a cold node cannot let it lapse before
    // b's attempt, short enough to wait out.
    let a = store
        .acquire(&name, "a", Duration::from_secs(3))
        .await
        .unwrap()
        .unwrap();
    assert!(store
        .acquire(&name, "b", Duration::from_secs(3))
        .await
        .unwrap()
        .is_none());
    tokio::time::sleep(Duration::from_millis(4_200)).await;
    let b = store
        .acquire(&name, "b", Duration::from_secs(5))
        .await
        .unwrap()
        .expect("b takes the expired lease");
    assert!(b.epoch > a.epoch);
    assert!(!store.renew(&a).await.unwrap(), "the old holder lost it");
}
