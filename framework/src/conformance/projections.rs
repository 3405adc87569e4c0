//! Conformance cases for the projection store and the projection manager on a store.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use uuid::Uuid;

use super::{counter_events, fresh_stream, wait_for_feed, FEED_WAIT};
use crate::error::{BoxError, Error};
use crate::event::{ExpectedVersion, RecordedEvent, StreamId};
use crate::projection::{
    AppliedRequest, Control, DeadLetter, ErrorPolicy, FailedEvent, Generations, Projection,
    ProjectionManager, ProjectionState, ProjectionStatus, ProjectionStore, Request,
};
use crate::store::{CheckpointStore, EventStore, Fence, LeaseStore};

/// Everything a store needs to host projections.
pub trait ProjectionHost: EventStore + CheckpointStore + LeaseStore + ProjectionStore {}
impl<S: EventStore + CheckpointStore + LeaseStore + ProjectionStore> ProjectionHost for S {}

/// Records which events of its own streams it saw, per generation; can be told to fail on
/// events of one stream.
pub(super) struct Recorder {
    pub(super) name: String,
    prefix: String,
    pub(super) model: Generations<Vec<(String, u64)>>,
    poison: Option<String>,
    poisoned: AtomicBool,
    /// Applying to generations from the first number on takes the second's time per event.
    slow: Option<(u64, Duration)>,
    /// The last event applied (of any stream): when it was recorded and when applied (ms).
    last: std::sync::Mutex<Option<(i64, i64)>>,
}

impl Recorder {
    pub(super) fn new(prefix: &str) -> Arc<Self> {
        Self::poisoned_on(prefix, None)
    }

    fn poisoned_on(prefix: &str, poison: Option<String>) -> Arc<Self> {
        Arc::new(Recorder {
            name: format!("{prefix}-proj"),
            prefix: prefix.to_owned(),
            model: Generations::default(),
            poison,
            poisoned: AtomicBool::new(true),
            slow: None,
            last: std::sync::Mutex::new(None),
        })
    }

    /// A recorder that takes `delay` per event of its own from `generation` on: a rebuild
    /// long enough to watch.
    fn slow_from(prefix: &str, generation: u64, delay: Duration) -> Arc<Self> {
        let mut recorder = Self::poisoned_on(prefix, None);
        Arc::get_mut(&mut recorder).expect("not shared yet").slow = Some((generation, delay));
        recorder
    }

    pub(super) fn seen(&self) -> Vec<(String, u64)> {
        self.model.read(|m| m.clone())
    }
}

#[async_trait]
impl Projection for Recorder {
    fn name(&self) -> &str {
        &self.name
    }
    async fn apply(&self, generation: u64, event: &RecordedEvent) -> Result<(), BoxError> {
        *self.last.lock().unwrap() = Some((event.recorded_at, crate::event::now_millis()));
        if !event.stream.as_str().starts_with(&self.prefix) {
            return Ok(());
        }
        if self.poisoned.load(Ordering::SeqCst)
            && self.poison.as_deref() == Some(event.stream.as_str())
        {
            return Err("this event cannot be projected".into());
        }
        if let Some((_, delay)) = self.slow.filter(|(from, _)| generation >= *from) {
            tokio::time::sleep(delay).await;
        }
        self.model.update(generation, |m| {
            m.push((event.stream.to_string(), event.version))
        });
        Ok(())
    }
    async fn reset(&self, generation: u64) -> Result<(), BoxError> {
        self.model.reset(generation);
        Ok(())
    }
    async fn activate(&self, generation: u64) -> Result<(), BoxError> {
        self.model.activate(generation);
        Ok(())
    }
}

pub(super) fn manager<S: ProjectionHost>(
    store: &Arc<S>,
    projection: Arc<dyn Projection>,
) -> ProjectionManager {
    ProjectionManager::builder(store.clone(), store.clone(), store.clone(), store.clone())
        .projection(projection)
        .batch_size(64)
        .lease_ttl(Duration::from_secs(2))
        .poll_interval(Duration::from_millis(20))
        .build()
}

/// Appends `per_stream` events to `count` fresh streams under `prefix` and waits for the feed.
pub(super) async fn write<S: ProjectionHost>(
    store: &Arc<S>,
    prefix: &str,
    count: usize,
    per_stream: u64,
) -> Vec<StreamId> {
    let from = store.feed_heads().await.unwrap();
    let streams: Vec<StreamId> = (0..count).map(|_| fresh_stream(prefix)).collect();
    for s in &streams {
        let bys: Vec<u64> = (1..=per_stream).collect();
        store
            .append(s, ExpectedVersion::NoStream, counter_events(&bys))
            .await
            .unwrap();
    }
    let refs: Vec<&StreamId> = streams.iter().collect();
    wait_for_feed(&**store, &from, &refs, count * per_stream as usize).await;
    streams
}

/// Every event of the projection's streams, stream by stream in version order: what a model
/// built from scratch holds (see [`by_stream`]).
pub(super) async fn from_scratch<S: ProjectionHost>(
    store: &Arc<S>,
    prefix: &str,
) -> Vec<(String, u64)> {
    let events: Vec<(String, u64)> = store
        .read_feed(&crate::Cursor::new())
        .try_filter(|e| futures::future::ready(e.stream.as_str().starts_with(prefix)))
        .map_ok(|e| (e.stream.to_string(), e.version))
        .try_collect()
        .await
        .unwrap();
    by_stream(events)
}

/// Events as applied, grouped by stream, each stream's in the order applied: what two
/// histories must agree on when the feed has no order between slices. A stream applied out
/// of order, or an event twice, still shows.
pub(super) fn by_stream(mut events: Vec<(String, u64)>) -> Vec<(String, u64)> {
    events.sort_by(|a, b| a.0.cmp(&b.0)); // stable: each stream keeps its order
    events
}

pub(super) fn prefix() -> String {
    format!("p{}", &Uuid::new_v4().simple().to_string()[..10])
}

/// Statuses, requests and dead letters round-trip through the projection store.
pub async fn projection_store_round_trip<S: ProjectionHost>(store: Arc<S>) {
    let name = format!("{}-proj", prefix());
    assert!(store.load_status(&name).await.unwrap().is_none());
    let status = ProjectionStatus {
        name: name.clone(),
        state: ProjectionState::Failed,
        generation: 2,
        consumed: 16,
        cursor: [(0, 9), (3, 7)].into_iter().collect(),
        head: 20,
        heads: [(0, 11), (3, 9)].into_iter().collect(),
        held: vec![0, 3],
        lag_events: 4,
        lag_ms: 12,
        processed: 16,
        last_error: Some("boom".into()),
        failed_event: Some(FailedEvent {
            stream: "s-1".into(),
            version: 3,
            event_type: "E".into(),
            position: 8,
            slice: 3,
        }),
        rebuild: None,
        dead_letters: 1,
        owner: "m1".into(),
        updated_at: 1,
        last_request: Some(AppliedRequest {
            id: Uuid::new_v4(),
            control: Control::ResetTo(3),
            applied_at: 1,
            epoch: 7,
        }),
    };
    store.save_status(&status).await.unwrap();
    assert_eq!(
        store.load_status(&name).await.unwrap(),
        Some(status.clone())
    );
    assert!(store
        .list_status()
        .await
        .unwrap()
        .iter()
        .any(|s| s == &status));
    assert_eq!(store.take_request(&name).await.unwrap(), None);
    store
        .request(&name, Request::new(Control::Pause))
        .await
        .unwrap();
    let latest = Request::new(Control::ResetTo(5));
    store.request(&name, latest).await.unwrap();
    assert_eq!(
        store.take_request(&name).await.unwrap(),
        Some(latest),
        "the latest request wins, with its id"
    );
    assert_eq!(
        store.take_request(&name).await.unwrap(),
        None,
        "a request is taken once"
    );
    let letter = DeadLetter {
        projection: name.clone(),
        event: status.failed_event.clone().unwrap(),
        error: "bad".into(),
        at: 7,
    };
    store.add_dead_letter(&letter).await.unwrap();
    assert_eq!(store.dead_letters(&name).await.unwrap(), vec![letter]);
}

/// Catch-up applies every event of the history once, in per-stream order, and reports no lag.
pub async fn projection_catches_up_in_order<S: ProjectionHost>(store: Arc<S>) {
    let p = prefix();
    write(&store, &p, 4, 5).await;
    let recorder = Recorder::new(&p);
    let m = manager(&store, recorder.clone());
    let status = m.catch_up(&recorder.name).await.unwrap();
    assert_eq!(by_stream(recorder.seen()), from_scratch(&store, &p).await);
    assert_eq!(recorder.seen().len(), 20);
    assert_eq!(status.state, ProjectionState::Running);
    assert_eq!(status.lag_events, 0);
    assert!(
        status.cursor.covers(&status.heads),
        "the checkpoint is at every slice's head"
    );
    assert_eq!(status.consumed, status.head);
}

/// A new manager resumes from the checkpoint: nothing missed, nothing applied twice.
pub async fn projection_resumes_from_checkpoint<S: ProjectionHost>(store: Arc<S>) {
    let p = prefix();
    write(&store, &p, 2, 3).await;
    let recorder = Recorder::new(&p);
    let first = manager(&store, recorder.clone());
    first.catch_up(&recorder.name).await.unwrap();
    first.stop().await;
    write(&store, &p, 2, 3).await;
    let second = manager(&store, recorder.clone());
    second.catch_up(&recorder.name).await.unwrap();
    let seen = by_stream(recorder.seen());
    assert_eq!(
        seen,
        from_scratch(&store, &p).await,
        "the second manager applied exactly the rest"
    );
    assert_eq!(seen.len(), 12);
}

/// Lag is the number of feed events after the checkpoint, and 0 once caught up; its time is
/// how long the last applied event waited between its append and its application.
pub async fn projection_reports_lag<S: ProjectionHost>(store: Arc<S>) {
    let p = prefix();
    let recorder = Recorder::new(&p);
    let m = manager(&store, recorder.clone());
    m.catch_up(&recorder.name).await.unwrap();
    write(&store, &p, 1, 7).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = m.status(&recorder.name).await.unwrap();
    assert!(
        status.lag_events >= 7,
        "at least our 7 events are behind: {}",
        status.lag_events
    );
    assert_eq!(status.lag_events, status.cursor.behind(&status.heads));
    let per_slice: u64 = status.slice_lag().iter().map(|(_, _, _, lag)| lag).sum();
    assert_eq!(
        per_slice, status.lag_events,
        "per-slice lag adds up to the total"
    );
    let status = m.catch_up(&recorder.name).await.unwrap();
    assert_eq!(status.lag_events, 0);
    // The last event applied (ours, 300 ms old, unless another test's came after it on a
    // shared store) waited from its recording to at least its application, and at most until
    // now.
    let now = crate::event::now_millis();
    let (recorded, applied) = recorder.last.lock().unwrap().expect("events were applied");
    assert!(
        status.lag_ms >= applied - recorded && status.lag_ms <= now - recorded,
        "lag {} ms: the last event was recorded at {recorded}, applied at {applied}, now {now}",
        status.lag_ms
    );
    let ours = recorder.seen().last().cloned().expect("ours were applied");
    assert_eq!(ours.1, 7);
}

/// A failing event stops the projection with the event named; resume retries it.
pub async fn projection_stops_on_poison_event<S: ProjectionHost>(store: Arc<S>) {
    let p = prefix();
    let streams = write(&store, &p, 3, 2).await;
    let bad = streams[1].to_string();
    let recorder = Recorder::poisoned_on(&p, Some(bad.clone()));
    let m = manager(&store, recorder.clone());
    let status = m.catch_up(&recorder.name).await.unwrap();
    assert_eq!(status.state, ProjectionState::Failed);
    let failed = status
        .failed_event
        .clone()
        .expect("the failed event is identified");
    assert_eq!(
        (
            failed.stream.as_str(),
            failed.version,
            failed.event_type.as_str()
        ),
        (bad.as_str(), 1, "Incremented")
    );
    assert_eq!(
        status.cursor.next(failed.slice),
        failed.position,
        "the checkpoint stays on the failed event"
    );
    assert!(status.last_error.as_deref().unwrap_or("").contains(&bad));
    assert!(
        !recorder.seen().iter().any(|(s, _)| s == &bad),
        "nothing after the failure"
    );
    // Nothing moves while failed.
    assert_eq!(
        m.catch_up(&recorder.name)
            .await
            .unwrap()
            .cursor
            .next(failed.slice),
        failed.position
    );
    // Fixed: resume applies the event and everything after it.
    recorder.poisoned.store(false, Ordering::SeqCst);
    m.resume(&recorder.name).await.unwrap();
    let status = m.catch_up(&recorder.name).await.unwrap();
    assert_eq!(status.state, ProjectionState::Running);
    assert_eq!(by_stream(recorder.seen()), from_scratch(&store, &p).await);
}

/// Under the dead-letter policy a failing event is recorded and skipped, never silently.
pub async fn projection_dead_letters_when_told<S: ProjectionHost>(store: Arc<S>) {
    let p = prefix();
    let streams = write(&store, &p, 2, 2).await;
    let bad = streams[0].to_string();
    let recorder = Recorder::poisoned_on(&p, Some(bad.clone()));
    let m = ProjectionManager::builder(store.clone(), store.clone(), store.clone(), store.clone())
        .projection(recorder.clone())
        .on_error(ErrorPolicy::DeadLetter)
        .build();
    let status = m.catch_up(&recorder.name).await.unwrap();
    assert_eq!(status.state, ProjectionState::Running);
    assert_eq!(status.dead_letters, 2);
    let letters = store.dead_letters(&recorder.name).await.unwrap();
    assert_eq!(
        letters
            .iter()
            .map(|l| (l.event.stream.clone(), l.event.version))
            .collect::<Vec<_>>(),
        vec![(bad.clone(), 1), (bad, 2)]
    );
    assert_eq!(
        recorder.seen().len(),
        2,
        "the other stream's events were applied"
    );
}

/// Dead letters are replayed through the manager (one, then all; a letter whose event fails
/// again stays) and skipped by removing them.
pub async fn dead_letters_are_replayed_and_skipped<S: ProjectionHost>(store: Arc<S>) {
    let p = prefix();
    let streams = write(&store, &p, 3, 2).await;
    let (bad, worse) = (streams[0].to_string(), streams[1].to_string());
    let recorder = Recorder::poisoned_on(&p, Some(bad.clone()));
    let m = ProjectionManager::builder(store.clone(), store.clone(), store.clone(), store.clone())
        .projection(recorder.clone())
        .on_error(ErrorPolicy::DeadLetter)
        .build();
    m.catch_up(&recorder.name).await.unwrap();
    let letters = store.dead_letters(&recorder.name).await.unwrap();
    assert_eq!(letters.len(), 2, "{letters:?}");
    let at = |i: usize| (letters[i].event.slice, letters[i].event.position);

    // Still poisoned: a replay changes nothing, and says why.
    m.request(&recorder.name, Control::ReplayDeadLetters)
        .await
        .unwrap();
    let status = m.catch_up(&recorder.name).await.unwrap();
    assert_eq!(store.dead_letters(&recorder.name).await.unwrap().len(), 2);
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("failed again"),
        "{status:?}"
    );

    // Fixed: the one named is applied and its letter removed; the other stays.
    recorder.poisoned.store(false, Ordering::SeqCst);
    let (slice, position) = at(1);
    m.request(&recorder.name, Control::ReplayDeadLetter(slice, position))
        .await
        .unwrap();
    m.catch_up(&recorder.name).await.unwrap();
    let left = store.dead_letters(&recorder.name).await.unwrap();
    assert_eq!(left, vec![letters[0].clone()]);
    let applied_bad = |recorder: &Recorder| {
        recorder
            .seen()
            .iter()
            .filter(|(stream, _)| stream == &bad)
            .map(|(_, version)| *version)
            .collect::<Vec<_>>()
    };
    assert_eq!(applied_bad(&recorder), vec![letters[1].event.version]);

    // All: the rest is applied.
    m.request(&recorder.name, Control::ReplayDeadLetters)
        .await
        .unwrap();
    let status = m.catch_up(&recorder.name).await.unwrap();
    assert!(store.dead_letters(&recorder.name).await.unwrap().is_empty());
    assert_eq!(status.dead_letters, 0, "{status:?}");
    let mut versions = applied_bad(&recorder);
    versions.sort();
    assert_eq!(versions, vec![1, 2]);

    // Skipping removes a letter without applying it.
    let letter = DeadLetter {
        projection: recorder.name.clone(),
        event: FailedEvent {
            stream: worse.clone(),
            version: 1,
            event_type: "Noted".into(),
            position: 9,
            slice: 0,
        },
        error: "refused".into(),
        at: 1,
    };
    store.add_dead_letter(&letter).await.unwrap();
    assert_eq!(
        store
            .remove_dead_letter(&recorder.name, 0, 8)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .remove_dead_letter(&recorder.name, 0, 9)
            .await
            .unwrap(),
        1
    );
    assert!(store.dead_letters(&recorder.name).await.unwrap().is_empty());
}

/// Pause stops, resume continues, reset replays from a position.
pub async fn projection_pause_resume_reset<S: ProjectionHost>(store: Arc<S>) {
    let p = prefix();
    let recorder = Recorder::new(&p);
    let m = manager(&store, recorder.clone());
    m.catch_up(&recorder.name).await.unwrap();
    // An operator's request through the store is picked up by the manager.
    store
        .request(&recorder.name, Request::new(Control::Pause))
        .await
        .unwrap();
    write(&store, &p, 1, 3).await;
    let status = m.catch_up(&recorder.name).await.unwrap();
    assert_eq!(status.state, ProjectionState::Paused);
    assert!(recorder.seen().is_empty(), "paused: nothing applied");
    assert_eq!(
        store
            .load_status(&recorder.name)
            .await
            .unwrap()
            .unwrap()
            .state,
        ProjectionState::Paused
    );
    m.resume(&recorder.name).await.unwrap();
    m.catch_up(&recorder.name).await.unwrap();
    assert_eq!(recorder.seen().len(), 3);
    // Our three events are one stream's, so in one slice: replay that slice from the first.
    let (slice, first) = from_scratch_positions(&store, &p).await[0];
    m.reset_slice(&recorder.name, slice, first).await.unwrap();
    m.catch_up(&recorder.name).await.unwrap();
    assert_eq!(recorder.seen().len(), 6, "reset replays our three events");
    // Every slice from the start replays them once more.
    m.reset(&recorder.name, 1).await.unwrap();
    let status = m.catch_up(&recorder.name).await.unwrap();
    assert_eq!(
        recorder.seen().len(),
        9,
        "a reset of every slice replays them too"
    );
    assert_eq!(status.lag_events, 0);
    let slices = store.feed_slices();
    match m.reset_slice(&recorder.name, slices, 1).await {
        Err(crate::Error::Invalid { reason, .. }) => {
            assert!(reason.contains(&format!("slice {slices}")), "{reason}")
        }
        other => panic!("a reset of a slice that does not exist: {other:?}"),
    }
}

/// The `(slice, position)` of each event of the projection's streams in the feed, each
/// stream's in version order.
async fn from_scratch_positions<S: ProjectionHost>(
    store: &Arc<S>,
    prefix: &str,
) -> Vec<(u32, u64)> {
    let mut events: Vec<(String, u64, u32, u64)> = store
        .read_feed(&crate::Cursor::new())
        .try_filter(|e| futures::future::ready(e.stream.as_str().starts_with(prefix)))
        .map_ok(|e| {
            (
                e.stream.to_string(),
                e.version,
                e.slice,
                e.position.unwrap(),
            )
        })
        .try_collect()
        .await
        .unwrap();
    events.sort();
    events.into_iter().map(|(_, _, s, p)| (s, p)).collect()
}

/// A rebuild fills a new generation while writes continue, queries see the old one until the
/// switch (which keeps getting new events: see
/// `projection_live_generation_serves_during_rebuild`), and the result equals a model built
/// from scratch.
pub async fn projection_rebuilds_while_writes_continue<S: ProjectionHost>(store: Arc<S>) {
    let p = prefix();
    write(&store, &p, 3, 10).await;
    let recorder = Recorder::new(&p);
    let m = manager(&store, recorder.clone());
    m.catch_up(&recorder.name).await.unwrap();
    let before = recorder.seen();
    assert_eq!(recorder.model.active(), 1);
    let writer = {
        let (store, p) = (store.clone(), p.clone());
        tokio::spawn(async move {
            for _ in 0..5 {
                let s = fresh_stream(&p);
                store
                    .append(&s, ExpectedVersion::NoStream, counter_events(&[1, 2]))
                    .await
                    .unwrap();
            }
        })
    };
    let rebuilt = m.rebuild(&recorder.name).await.unwrap();
    assert!(
        rebuilt >= before.len() as u64,
        "the rebuild went through the history ({rebuilt} events)"
    );
    assert_eq!(recorder.model.active(), 2, "the new generation is active");
    writer.await.unwrap();
    // Let the feed publish the last writes, then catch up on the new generation.
    let deadline = std::time::Instant::now() + FEED_WAIT;
    let mut expected = from_scratch(&store, &p).await;
    while expected.len() < 40 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        expected = from_scratch(&store, &p).await;
    }
    assert_eq!(expected.len(), 40, "the feed holds every event");
    m.catch_up(&recorder.name).await.unwrap();
    assert_eq!(
        by_stream(recorder.seen()),
        expected,
        "the rebuilt model equals one built from scratch"
    );
    let status = m.status(&recorder.name).await.unwrap();
    assert_eq!(
        (status.generation, status.state),
        (2, ProjectionState::Running)
    );
}

/// While a rebuild fills generation 2, generation 1 (the one queries read) keeps getting new
/// events, and the rebuild's progress (done, total, rate, time left) is published as it goes.
pub async fn projection_live_generation_serves_during_rebuild<S: ProjectionHost>(store: Arc<S>) {
    let p = prefix();
    write(&store, &p, 4, 10).await;
    let recorder = Recorder::slow_from(&p, 2, Duration::from_millis(40));
    // Small batches: a rebuild batch is 16 of them, so the 40 events take several batches.
    let m = ProjectionManager::builder(store.clone(), store.clone(), store.clone(), store.clone())
        .projection(recorder.clone())
        .batch_size(1)
        .lease_ttl(Duration::from_secs(2))
        .poll_interval(Duration::from_millis(20))
        .build();
    m.catch_up(&recorder.name).await.unwrap();
    let history = recorder.seen().len();
    assert_eq!(history, 40);
    let rebuild = {
        let (m, name) = (m.clone(), recorder.name.clone());
        tokio::spawn(async move { m.rebuild(&name).await })
    };
    let deadline = std::time::Instant::now() + FEED_WAIT;
    let progress = loop {
        let status = m.status(&recorder.name).await.unwrap();
        if let Some(progress) = status.rebuild.clone().filter(|r| r.done > 0) {
            assert_eq!(status.state, ProjectionState::Rebuilding);
            break progress;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no rebuild progress: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(progress.generation, 2);
    assert!(
        progress.total >= 40,
        "the history is the total: {progress:?}"
    );
    assert!(progress.done <= progress.total, "{progress:?}");
    assert!(
        progress.rate > 0.0 && progress.rate.is_finite(),
        "{progress:?}"
    );
    let expected_eta = (progress.total - progress.done) as f64 / progress.rate;
    assert!(
        (progress.eta_secs - expected_eta).abs() < 1e-6 && progress.eta_secs > 0.0,
        "time left is what remains at the rate so far: {progress:?}"
    );

    // A new event during the rebuild reaches the live generation before the swap.
    let late = fresh_stream(&p);
    store
        .append(&late, ExpectedVersion::NoStream, counter_events(&[1]))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + FEED_WAIT;
    loop {
        let (seen, active) = (recorder.seen(), recorder.model.active());
        assert_eq!(
            active, 1,
            "the rebuild finished before the live generation saw the new event"
        );
        if seen.contains(&(late.to_string(), 1)) {
            assert_eq!(seen.len(), history + 1);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "generation 1 got no new event"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rebuilt = rebuild.await.unwrap().unwrap();
    assert!(rebuilt >= 40, "{rebuilt}");
    assert_eq!(recorder.model.active(), 2);
    m.catch_up(&recorder.name).await.unwrap();
    assert_eq!(by_stream(recorder.seen()), from_scratch(&store, &p).await);
}

/// Of two managers only the lease holder applies events; the other takes over when it stops.
pub async fn projection_has_one_active_instance<S: ProjectionHost>(store: Arc<S>) {
    let p = prefix();
    write(&store, &p, 1, 4).await;
    let (a, b) = (Recorder::new(&p), Recorder::new(&p));
    let first = manager(&store, a.clone());
    let second = manager(&store, b.clone());
    assert_eq!(
        first.catch_up(&a.name).await.unwrap().state,
        ProjectionState::Running
    );
    let standby = second.catch_up(&b.name).await.unwrap();
    assert_eq!(standby.state, ProjectionState::Standby);
    assert!(b.seen().is_empty(), "the standby applied nothing");
    first.stop().await;
    write(&store, &p, 1, 2).await;
    let status = second.catch_up(&b.name).await.unwrap();
    assert_eq!(status.state, ProjectionState::Running);
    assert_eq!(
        b.seen().len(),
        2,
        "the new holder continued from the shared checkpoint"
    );
}

/// With two managers on one projection (the high-availability set-up), every operator
/// request reaches the lease holder: each kind ten times, none lost, each named in the
/// stored status (which only the holder publishes) with the holder's epoch. A `rebuild()`
/// called on the standby returns, within about a lease TTL, an error naming the holder.
pub async fn projection_requests_reach_the_holder<S: ProjectionHost>(store: Arc<S>) {
    let p = prefix();
    write(&store, &p, 1, 5).await;
    let name = format!("{p}-proj");
    let build = |id: &str| {
        ProjectionManager::builder(store.clone(), store.clone(), store.clone(), store.clone())
            .projection(Recorder::new(&p))
            .id(id)
            .batch_size(64)
            .lease_ttl(Duration::from_secs(2))
            .poll_interval(Duration::from_millis(20))
            .build()
    };
    let (a, b) = (build(&format!("{p}-a")), build(&format!("{p}-b")));
    a.start();
    b.start();
    let deadline = std::time::Instant::now() + FEED_WAIT;
    let holder = loop {
        if let Some(s) = store.load_status(&name).await.unwrap() {
            if s.state == ProjectionState::Running {
                break s.owner;
            }
        }
        assert!(std::time::Instant::now() < deadline, "nobody took `{name}`");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (held, standby) = if holder.ends_with("-a") {
        (&a, &b)
    } else {
        (&b, &a)
    };

    // Ask through either manager (and so through the store): alternately the holder and the
    // standby, which leaves the request for the holder.
    let mut epoch = None;
    let kinds = [
        Control::Pause,
        Control::Resume,
        Control::ResetTo(1),
        Control::Rebuild,
    ];
    for round in 0..10 {
        for control in kinds {
            let via = if round % 2 == 0 { held } else { standby };
            let id = via.request(&name, control).await.unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            let status = loop {
                let status = store.load_status(&name).await.unwrap().unwrap();
                let applied = status.last_request.filter(|r| r.id == id);
                let done = match control {
                    Control::Pause => status.state == ProjectionState::Paused,
                    Control::Rebuild => status.rebuild.is_none(),
                    _ => status.state == ProjectionState::Running,
                };
                if applied.is_some() && done {
                    break status;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "round {round}: {control:?} (request {id}) not applied within 5 s: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            let applied = status.last_request.unwrap();
            assert_eq!(applied.control, control);
            assert_eq!(status.owner, holder, "only the holder publishes the status");
            assert!(
                *epoch.get_or_insert(applied.epoch) == applied.epoch,
                "the same holder, under one epoch"
            );
        }
    }
    let generation = store.load_status(&name).await.unwrap().unwrap().generation;
    assert_eq!(generation, 11, "ten rebuilds, each switched");

    let started = std::time::Instant::now();
    match standby.rebuild(&name).await {
        Err(Error::HeldElsewhere { holder: named, .. }) => assert_eq!(named, holder),
        other => panic!("a rebuild on the standby: {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the standby's rebuild returned after {:?}",
        started.elapsed()
    );
    a.stop().await;
    b.stop().await;
}

/// A manager that dies without releasing its lease is replaced once the lease's TTL passes.
pub async fn projection_takeover_after_holder_dies<S: ProjectionHost>(store: Arc<S>) {
    let p = prefix();
    write(&store, &p, 1, 3).await;
    let (a, b) = (Recorder::new(&p), Recorder::new(&p));
    let dead = manager(&store, a.clone());
    dead.catch_up(&a.name).await.unwrap();
    drop(dead); // no stop(): the lease is still held
    write(&store, &p, 1, 2).await;
    let heir = manager(&store, b.clone());
    assert_eq!(
        heir.catch_up(&b.name).await.unwrap().state,
        ProjectionState::Standby
    );
    // The 2 s lease expires (and the second a store may add to it).
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let status = heir.catch_up(&b.name).await.unwrap();
    assert_eq!(
        status.state,
        ProjectionState::Running,
        "took over within the TTL"
    );
    assert_eq!(
        b.seen().len(),
        2,
        "continued from the dead manager's checkpoint"
    );
}

/// A rebuild asked of a manager that has not run the projection yet (so it first has to take
/// the lease and load the checkpoint) completes and switches generations.
pub async fn projection_rebuild_on_a_fresh_manager<S: ProjectionHost>(store: Arc<S>) {
    let p = prefix();
    write(&store, &p, 2, 3).await;
    let recorder = Recorder::new(&p);
    let m = manager(&store, recorder.clone());
    let events = tokio::time::timeout(FEED_WAIT, m.rebuild(&recorder.name))
        .await
        .expect("the rebuild finishes")
        .unwrap();
    assert!(events >= 6);
    assert_eq!(recorder.model.active(), 2);
    assert_eq!(by_stream(recorder.seen()), from_scratch(&store, &p).await);
}

/// Stalls once, inside `apply` of one event, for longer than the lease: a stand-in for a
/// process paused by SIGSTOP or a long GC. Counts what it applies after the stall.
struct Staller {
    name: String,
    prefix: String,
    stall_at: u64,
    stall_for: Duration,
    stalled: AtomicBool,
    resumed: AtomicBool,
    applied_after: std::sync::atomic::AtomicU64,
}

#[async_trait]
impl Projection for Staller {
    fn name(&self) -> &str {
        &self.name
    }
    async fn apply(&self, _generation: u64, event: &RecordedEvent) -> Result<(), BoxError> {
        if !event.stream.as_str().starts_with(&self.prefix) {
            return Ok(());
        }
        if self.resumed.load(Ordering::SeqCst) {
            self.applied_after.fetch_add(1, Ordering::SeqCst);
        } else if event.version == self.stall_at && !self.stalled.swap(true, Ordering::SeqCst) {
            tokio::time::sleep(self.stall_for).await;
            self.resumed.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
    async fn reset(&self, _generation: u64) -> Result<(), BoxError> {
        Ok(())
    }
    async fn activate(&self, _generation: u64) -> Result<(), BoxError> {
        Ok(())
    }
}

/// A read model shared by two managers, written with [`Generations::update_fenced`]: it keeps,
/// per event, the epoch of the manager that wrote it. One instance (the stalling one) stalls
/// *inside* the write of one event, after the manager's own lease check.
struct FencedModel {
    name: String,
    prefix: String,
    model: Generations<std::collections::HashMap<(String, u64), u64>>,
    fence: std::sync::Mutex<Option<Fence>>,
    stall_at: Option<u64>,
    stalled: AtomicBool,
    resumed: AtomicBool,
    refused: std::sync::atomic::AtomicU64,
}

impl FencedModel {
    fn new(
        name: &str,
        prefix: &str,
        model: &Generations<std::collections::HashMap<(String, u64), u64>>,
        stall_at: Option<u64>,
    ) -> Arc<Self> {
        Arc::new(FencedModel {
            name: name.to_owned(),
            prefix: prefix.to_owned(),
            model: model.clone(),
            fence: Default::default(),
            stall_at,
            stalled: AtomicBool::new(false),
            resumed: AtomicBool::new(false),
            refused: Default::default(),
        })
    }
}

#[async_trait]
impl Projection for FencedModel {
    fn name(&self) -> &str {
        &self.name
    }
    async fn fence(&self, fence: &Fence) -> Result<(), BoxError> {
        *self.fence.lock().unwrap() = Some(fence.clone());
        Ok(())
    }
    async fn apply(&self, generation: u64, event: &RecordedEvent) -> Result<(), BoxError> {
        if !event.stream.as_str().starts_with(&self.prefix) {
            return Ok(());
        }
        let fence = self
            .fence
            .lock()
            .unwrap()
            .clone()
            .ok_or("applied before fence()")?;
        if Some(event.version) == self.stall_at && !self.stalled.swap(true, Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(5)).await; // the lease is 2 s
            self.resumed.store(true, Ordering::SeqCst);
        }
        let key = (event.stream.to_string(), event.version);
        match self
            .model
            .update_fenced(&fence, generation, |m| m.insert(key, fence.epoch))
        {
            Ok(_) => Ok(()),
            Err(e) => {
                self.refused.fetch_add(1, Ordering::SeqCst);
                Err(e.into())
            }
        }
    }
    async fn reset(&self, generation: u64) -> Result<(), BoxError> {
        self.model.reset(generation);
        Ok(())
    }
    async fn activate(&self, generation: u64) -> Result<(), BoxError> {
        self.model.activate(generation);
        Ok(())
    }
}

/// A holder that stalls in the middle of a read-model write (past its own lease check, so its
/// clock cannot save it) while a second manager takes over: when it resumes, the read model
/// refuses its write (the fence), it lets the lease go without dead-lettering or failing, and
/// every event ends written under the successor's epoch.
pub async fn projection_stale_writes_are_fenced<S: ProjectionHost>(store: Arc<S>) {
    let p = prefix();
    let streams = write(&store, &p, 1, 20).await;
    let name = format!("{p}-proj");
    let model = Generations::default();
    let stale = FencedModel::new(&name, &p, &model, Some(10));
    let heir = FencedModel::new(&name, &p, &model, None);
    let a = manager(&store, stale.clone());
    a.start();
    let deadline = std::time::Instant::now() + FEED_WAIT;
    while !stale.stalled.load(Ordering::SeqCst) {
        assert!(
            std::time::Instant::now() < deadline,
            "the holder never reached event 10"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stale_epoch = stale.fence.lock().unwrap().as_ref().unwrap().epoch;
    // What the stale holder committed before it stalled is its own, rightly: the heir starts
    // after it.
    let slice = crate::feed::slice_of(&streams[0], store.feed_slices());
    let committed = store
        .load_checkpoint(&crate::projection::checkpoint_name(
            &name,
            1,
            slice,
            store.feed_slices(),
        ))
        .await
        .unwrap()
        .unwrap_or(1);
    let b = manager(&store, heir.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    let heir_epoch = loop {
        let status = b.catch_up(&name).await.unwrap();
        let epoch = heir.fence.lock().unwrap().as_ref().map(|f| f.epoch);
        if status.state == ProjectionState::Running && model.read(|m| m.len()) == 20 {
            break epoch.expect("the heir applied under a fence");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the second manager did not take over within the stall: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    while !stale.resumed.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status_a = a.status(&name).await.unwrap();
    a.stop().await;
    b.stop().await;
    assert!(
        stale.refused.load(Ordering::SeqCst) >= 1,
        "the stale holder's write after the takeover was not refused"
    );
    assert!(
        stale_epoch < heir_epoch,
        "epochs {stale_epoch} then {heir_epoch}"
    );
    let positions = from_scratch_positions(&store, &p).await;
    let by_stale: Vec<_> = model.read(|m| {
        m.iter()
            .filter(|((_, version), e)| {
                **e < heir_epoch && positions[*version as usize - 1].1 >= committed
            })
            .map(|(k, e)| (k.clone(), *e))
            .collect()
    });
    assert!(
        by_stale.is_empty(),
        "events past the stale holder's checkpoint {committed}, last written by it after its successor: {by_stale:?}"
    );
    assert_eq!(model.read(|m| m.len()), 20);
    assert_eq!(
        status_a.dead_letters, 0,
        "a fenced write is not a poison event"
    );
    assert_ne!(status_a.state, ProjectionState::Failed, "{status_a:?}");
}

/// A lease holder that stalls mid-batch past its lease while a second manager takes the
/// projection over: once it resumes it applies nothing more and writes no checkpoint, so the
/// stored checkpoint never moves back.
pub async fn projection_stale_holder_stops_applying<S: ProjectionHost>(store: Arc<S>) {
    let p = prefix();
    let streams = write(&store, &p, 1, 20).await;
    let stale = Arc::new(Staller {
        name: format!("{p}-proj"),
        prefix: p.clone(),
        stall_at: 10,
        stall_for: Duration::from_secs(5), // the lease is 2 s
        stalled: AtomicBool::new(false),
        resumed: AtomicBool::new(false),
        applied_after: Default::default(),
    });
    let a = manager(&store, stale.clone());
    a.start();
    let deadline = std::time::Instant::now() + FEED_WAIT;
    while !stale.stalled.load(Ordering::SeqCst) {
        assert!(
            std::time::Instant::now() < deadline,
            "the holder never reached event 10"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let heir = Recorder::new(&p);
    let b = manager(&store, heir.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    loop {
        let status = b.catch_up(&heir.name).await.unwrap();
        // The heir starts from the holder's last checkpoint, which may fall inside the
        // stream when a batch boundary does: it has caught up once it has the last event.
        let last = heir.seen().last().map(|(_, version)| *version);
        if status.state == ProjectionState::Running && last == Some(20) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the second manager did not take over within the stall: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let key = crate::projection::checkpoint_name(
        &heir.name,
        b.status(&heir.name).await.unwrap().generation,
        crate::feed::slice_of(&streams[0], store.feed_slices()),
        store.feed_slices(),
    );
    let before = store.load_checkpoint(&key).await.unwrap().unwrap();
    while !stale.resumed.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let after = store.load_checkpoint(&key).await.unwrap().unwrap();
    let late = stale.applied_after.load(Ordering::SeqCst);
    a.stop().await;
    b.stop().await;
    assert_eq!(
        late, 0,
        "the stale holder applied {late} event(s) after it resumed"
    );
    assert!(
        after >= before,
        "the checkpoint moved back from {before} to {after}"
    );
}

/// A rebuild left unfinished when its manager stops (a projector restarted in the middle of
/// one) is not lost: the next manager to take the lease goes on with it, without a new
/// request, and the rebuilt generation ends with every event.
pub async fn projection_rebuild_resumes_after_a_restart<S: ProjectionHost>(store: Arc<S>) {
    let p = prefix();
    write(&store, &p, 4, 5).await;
    // Slow from generation 2 on: the rebuild is still running when its manager stops.
    let recorder = Recorder::slow_from(&p, 2, Duration::from_millis(30));
    let name = recorder.name.clone();
    // Small batches: a stop takes effect between batches, well before the switch.
    let first =
        ProjectionManager::builder(store.clone(), store.clone(), store.clone(), store.clone())
            .projection(recorder.clone())
            .batch_size(2)
            .lease_ttl(Duration::from_secs(2))
            .poll_interval(Duration::from_millis(20))
            .build();
    first.catch_up(&name).await.unwrap();
    first.request(&name, Control::Rebuild).await.unwrap();
    first.start();
    let deadline = std::time::Instant::now() + FEED_WAIT;
    loop {
        let status = first.status(&name).await.unwrap();
        if status.rebuild.as_ref().is_some_and(|r| r.done >= 3) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the rebuild did not start: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.stop().await;
    assert_eq!(recorder.model.active(), 1, "stopped before the switch");

    let second = manager(&store, recorder.clone());
    second.start();
    let deadline = std::time::Instant::now() + FEED_WAIT;
    loop {
        let status = second.status(&name).await.unwrap();
        if status.generation == 2 && status.rebuild.is_none() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the unfinished rebuild was not resumed: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    second.stop().await;
    assert_eq!(recorder.model.active(), 2);
    // Events applied after the last checkpoint before the stop are applied again
    // (at-least-once): compare what the generation holds, once each.
    let mut seen = by_stream(recorder.seen());
    seen.dedup();
    assert_eq!(seen, from_scratch(&store, &p).await);
}

/// Counts nothing; writes down the generations it was told to retire.
struct Retirements {
    name: String,
    retired: std::sync::Mutex<Vec<(u64, std::time::Instant)>>,
}

#[async_trait]
impl Projection for Retirements {
    fn name(&self) -> &str {
        &self.name
    }
    async fn apply(&self, _generation: u64, _event: &RecordedEvent) -> Result<(), BoxError> {
        Ok(())
    }
    async fn reset(&self, _generation: u64) -> Result<(), BoxError> {
        Ok(())
    }
    async fn activate(&self, _generation: u64) -> Result<(), BoxError> {
        Ok(())
    }
    async fn retire(&self, generation: u64) -> Result<(), BoxError> {
        self.retired
            .lock()
            .unwrap()
            .push((generation, std::time::Instant::now()));
        Ok(())
    }
}

/// The generation a rebuild replaced is retired once, after the grace and not before, by
/// whichever manager holds the projection then: the manager that switched may have stopped
/// in between (the pending retirement is kept in the stores).
pub async fn a_replaced_generation_is_retired_after_the_grace<S: ProjectionHost>(store: Arc<S>) {
    let p = prefix();
    write(&store, &p, 2, 2).await;
    let grace = Duration::from_millis(800);
    let build = |projection: Arc<Retirements>| {
        ProjectionManager::builder(store.clone(), store.clone(), store.clone(), store.clone())
            .projection(projection)
            .batch_size(64)
            .lease_ttl(Duration::from_secs(2))
            .poll_interval(Duration::from_millis(20))
            .retire_after(grace)
            .build()
    };
    let log = |name: &str| {
        Arc::new(Retirements {
            name: name.to_owned(),
            retired: Default::default(),
        })
    };
    let name = format!("{p}-retire");
    let (first_log, heir_log) = (log(&name), log(&name));
    let first = build(first_log.clone());
    tokio::time::timeout(FEED_WAIT, first.rebuild(&name))
        .await
        .expect("the rebuild finishes")
        .unwrap();
    let switched = std::time::Instant::now();
    first.catch_up(&name).await.unwrap();
    assert!(
        first_log.retired.lock().unwrap().is_empty(),
        "retired at once, before the grace"
    );
    first.stop().await;

    let heir = build(heir_log.clone());
    heir.start();
    let deadline = switched + grace + FEED_WAIT;
    while heir_log.retired.lock().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the replaced generation was never retired"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A little longer: nothing is retired twice.
    tokio::time::sleep(Duration::from_millis(200)).await;
    heir.stop().await;
    let retired = heir_log.retired.lock().unwrap().clone();
    assert_eq!(retired.len(), 1, "{retired:?}");
    assert_eq!(retired[0].0, 1, "generation 1 was replaced");
    assert!(
        retired[0].1.duration_since(switched) >= grace - Duration::from_millis(50),
        "retired {:?} after the switch, within the grace of {grace:?}",
        retired[0].1.duration_since(switched)
    );
    assert!(first_log.retired.lock().unwrap().is_empty());
}
