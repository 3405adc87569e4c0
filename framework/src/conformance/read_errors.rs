//! What a projection does when the feed cannot be read: never a silent stall. A failure that
//! is not about one event stalls the projection loudly (state, `last_error`, health) until it
//! passes; an event that cannot be read goes to the error policy like one that cannot be
//! applied.
//!
//! The faults are injected by [`Unreliable`], a wrapper around the store under test whose
//! feed can be taken down or made to fail on one position, as a damaged row would.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;

use super::projections::{prefix, write, ProjectionHost, Recorder};
use super::FEED_WAIT;
use crate::error::{Error, Result};
use crate::event::{AppendResult, ExpectedVersion, NewEvent, StreamId};
use crate::projection::{ErrorPolicy, ProjectionManager, ProjectionState, ProjectionStatus};
use crate::store::{EventStore, EventStream};

/// The store under test, with a feed that can fail.
struct Unreliable<S> {
    inner: Arc<S>,
    /// Every feed read fails, as with the feed's nodes unreachable.
    down: AtomicBool,
    /// The event with this id reads as damaged in the feed.
    damaged: std::sync::Mutex<Option<uuid::Uuid>>,
}

#[async_trait]
impl<S: EventStore> EventStore for Unreliable<S> {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        self.inner.append(stream, expected, events).await
    }

    fn read_stream<'a>(&'a self, stream: &'a StreamId, from_version: u64) -> EventStream<'a> {
        self.inner.read_stream(stream, from_version)
    }

    fn feed_slices(&self) -> u32 {
        self.inner.feed_slices()
    }

    fn read_slice(&self, slice: u32, from_position: u64) -> EventStream<'_> {
        if self.down.load(Ordering::SeqCst) {
            let down = Error::store("conformance", "read the feed", "the feed is unreachable");
            return futures::stream::once(async move { Err(down) }).boxed();
        }
        let damaged = *self.damaged.lock().unwrap();
        // As the contract says: the events before the damaged one, then its error, then
        // nothing.
        self.inner
            .read_slice(slice, from_position)
            .map(move |event| {
                event.and_then(|e| match damaged {
                    Some(id) if id == e.event_id => Err(Error::Damaged {
                        stream: e.stream.clone(),
                        version: e.version,
                        reason: "column `payload` is null (injected)".into(),
                    }),
                    _ => Ok(e),
                })
            })
            .scan(false, |failed, event| {
                let stop = *failed;
                *failed |= event.is_err();
                futures::future::ready((!stop).then_some(event))
            })
            .boxed()
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Option<u64>> {
        self.inner.stream_version(stream).await
    }

    async fn feed_heads(&self) -> Result<crate::Cursor> {
        self.inner.feed_heads().await
    }

    async fn fed_position(&self, stream: &StreamId, version: u64) -> Result<Option<u64>> {
        self.inner.fed_position(stream, version).await
    }
}

fn unreliable<S: ProjectionHost>(store: &Arc<S>) -> Arc<Unreliable<S>> {
    Arc::new(Unreliable {
        inner: store.clone(),
        down: AtomicBool::new(false),
        damaged: std::sync::Mutex::new(None),
    })
}

fn manager_on<S: ProjectionHost>(
    store: &Arc<S>,
    feed: &Arc<Unreliable<S>>,
    projection: Arc<Recorder>,
    policy: ErrorPolicy,
) -> ProjectionManager {
    ProjectionManager::builder(feed.clone(), store.clone(), store.clone(), store.clone())
        .projection(projection)
        .batch_size(64)
        .lease_ttl(Duration::from_secs(2))
        .poll_interval(Duration::from_millis(20))
        .on_error(policy)
        .stall_after(2)
        .build()
}

/// Waits until the stored status of `name` satisfies `done`.
async fn stored_status<S: ProjectionHost>(
    store: &Arc<S>,
    name: &str,
    what: &str,
    done: impl Fn(&ProjectionStatus) -> bool,
) -> ProjectionStatus {
    let deadline = Instant::now() + FEED_WAIT;
    loop {
        let status = store.load_status(name).await.unwrap();
        match status {
            Some(s) if done(&s) => return s,
            other => assert!(
                Instant::now() < deadline,
                "{what} not seen within {FEED_WAIT:?}: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A feed that cannot be read stalls a projection loudly: after `stall_after` failed steps
/// its status says `stalled` with the error and the position, and health is red; once the
/// feed reads again it runs by itself, catches up, and health turns green.
pub async fn projection_feed_errors_stall_loudly<S: ProjectionHost>(store: Arc<S>) {
    let p = prefix();
    write(&store, &p, 1, 3).await;
    let feed = unreliable(&store);
    feed.down.store(true, Ordering::SeqCst);
    let recorder = Recorder::new(&p);
    let m = manager_on(&store, &feed, recorder.clone(), ErrorPolicy::Stop);
    m.start();
    let stalled = stored_status(&store, &recorder.name, "a stalled status", |s| {
        s.state == ProjectionState::Stalled
    })
    .await;
    let error = stalled.last_error.clone().unwrap_or_default();
    assert!(
        error.contains("unreachable") && error.contains(&format!("cursor {}", stalled.cursor)),
        "the status says what failed and where: {error:?}"
    );
    assert!(
        !m.health().await.is_healthy(),
        "a stalled projection is unhealthy"
    );
    assert!(recorder.seen().is_empty());

    feed.down.store(false, Ordering::SeqCst);
    let running = stored_status(&store, &recorder.name, "recovery", |s| {
        s.state == ProjectionState::Running && recorder.seen().len() == 3
    })
    .await;
    assert_eq!(running.last_error, None, "{running:?}");
    assert!(m.health().await.is_healthy());
    m.stop().await;
}

/// An event that cannot be read is handled like one that cannot be applied. Under
/// [`ErrorPolicy::Stop`] the projection fails on it, naming its stream, version and position,
/// after applying the events before it; under [`ErrorPolicy::DeadLetter`] it becomes a dead
/// letter and the events after it are applied.
pub async fn projection_unreadable_events_follow_the_policy<S: ProjectionHost>(store: Arc<S>) {
    for policy in [ErrorPolicy::Stop, ErrorPolicy::DeadLetter] {
        let p = prefix();
        let from = store.feed_heads().await.unwrap();
        let stream = write(&store, &p, 1, 4).await.remove(0);
        let feed = unreliable(&store);
        let positions = super::wait_for_feed(&*store, &from, &[&stream], 4).await;
        let bad = positions[1].position.expect("a fed event has a position");
        *feed.damaged.lock().unwrap() = Some(positions[1].event_id);
        let recorder = Recorder::new(&p);
        let m = manager_on(&store, &feed, recorder.clone(), policy);
        let status = m.catch_up(&recorder.name).await.unwrap();
        let versions: Vec<u64> = recorder.seen().iter().map(|(_, v)| *v).collect();
        match policy {
            ErrorPolicy::Stop => {
                assert_eq!(status.state, ProjectionState::Failed, "{status:?}");
                let failed = status.failed_event.clone().expect("the failed event");
                assert_eq!(
                    (failed.stream.as_str(), failed.version, failed.position),
                    (stream.as_str(), 2, bad)
                );
                assert_eq!(failed.slice, positions[1].slice);
                assert_eq!(
                    status.cursor.next(failed.slice),
                    bad,
                    "stopped on the unreadable event"
                );
                assert!(status.last_error.unwrap_or_default().contains("injected"));
                assert_eq!(versions, [1]);
            }
            ErrorPolicy::DeadLetter => {
                assert_eq!(status.state, ProjectionState::Running, "{status:?}");
                let letters = store.dead_letters(&recorder.name).await.unwrap();
                assert_eq!(letters.len(), 1, "{letters:?}");
                assert_eq!(
                    (letters[0].event.version, letters[0].event.position),
                    (2, bad)
                );
                assert_eq!(versions, [1, 3, 4]);
            }
        }
        m.stop().await;
    }
}
