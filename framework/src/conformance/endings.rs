//! Streams that end: deletion (soft and hard), truncation and archive (see
//! [`ending`](crate::ending)).

use std::sync::Arc;

use futures::TryStreamExt;

use super::{counter_events, fresh_stream, read, wait_for_feed};
use crate::doc::Counter;
use crate::ending::{Deletion, StreamNotice, StreamStatus};
use crate::error::Error;
use crate::event::{ExpectedVersion, NewEvent, RecordedEvent, StreamId};
use crate::repository::{Repository, SnapshotPolicy};
use crate::store::{EventStore, SnapshotStore};
use crate::Aggregate;

async fn try_read<S: EventStore + ?Sized>(
    store: &S,
    stream: &StreamId,
    from: u64,
) -> Result<Vec<RecordedEvent>, Error> {
    store.read_stream(stream, from).try_collect().await
}

/// A stream's feed events: its events and its notices, each once, in version order.
async fn feed_of<S: EventStore + ?Sized>(
    store: &S,
    stream: &StreamId,
    count: usize,
) -> Vec<RecordedEvent> {
    let mut seen = wait_for_feed(store, &crate::Cursor::new(), &[stream], count).await;
    seen.sort_by_key(|e| e.version);
    let versions: Vec<u64> = seen.iter().map(|e| e.version).collect();
    assert_eq!(
        versions,
        (1..=count as u64).collect::<Vec<_>>(),
        "`{stream}`: each version once in the feed"
    );
    seen
}

fn assert_closed(
    result: Result<impl std::fmt::Debug, Error>,
    stream: &StreamId,
    want: StreamStatus,
) {
    match result {
        Err(Error::StreamClosed {
            stream: s, status, ..
        }) if s == *stream && status == want => {}
        other => panic!("`{stream}` should be {want}: {other:?}"),
    }
}

/// A soft delete appends one notice: appends after it are refused with
/// [`Error::StreamClosed`] (exact, any, and from a repository), the events and the notice
/// still read back, the feed carries the notice once after the events, and a second soft
/// delete changes nothing.
pub async fn soft_deleted_streams_refuse_appends<S: EventStore>(store: Arc<S>) {
    let stream = fresh_stream("conf-soft");
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            counter_events(&[1, 2, 3]),
        )
        .await
        .unwrap();
    let ended = store.delete_stream(&stream, Deletion::Soft).await.unwrap();
    assert!(ended.noticed);
    assert_eq!(ended.removed, 0);
    assert_eq!(ended.info.version, 4);
    assert_eq!(ended.info.status, StreamStatus::Deleted { hard: false });
    let deleted = StreamStatus::Deleted { hard: false };
    let info = store.stream_info(&stream).await.unwrap();
    assert_eq!(
        (info.version, info.status, info.first_version),
        (4, deleted, 1)
    );

    for expected in [ExpectedVersion::Exact(4), ExpectedVersion::Any] {
        let refused = store.append(&stream, expected, counter_events(&[9])).await;
        assert_closed(refused, &stream, deleted);
    }
    // An append that expected an older version is refused as closed too, not as a conflict
    // that a retry could win.
    let stale = store
        .append(&stream, ExpectedVersion::Exact(3), counter_events(&[9]))
        .await;
    assert_closed(stale, &stream, deleted);

    let events = read(&*store, &stream, 1).await;
    assert_eq!(events.len(), 4);
    assert_eq!(
        StreamNotice::of(&events[3]).unwrap().unwrap(),
        StreamNotice::Deleted { hard: false }
    );
    let fed = feed_of(&*store, &stream, 4).await;
    assert_eq!(&*fed[3].event_type, crate::ending::DELETED);

    // The repository says deleted, for a load and for a command.
    let repo = Repository::<Counter>::new(store.clone());
    let counter = fresh_stream("conf-soft-agg");
    let counter_id = counter.as_str().to_owned();
    repo.execute(&counter_id, 5).await.unwrap();
    let counter_stream = Counter::stream_id(&counter_id);
    store
        .delete_stream(&counter_stream, Deletion::Soft)
        .await
        .unwrap();
    assert_closed(repo.execute(&counter_id, 1).await, &counter_stream, deleted);
    assert_closed(
        Repository::<Counter>::new(store.clone())
            .load(&counter_id)
            .await,
        &counter_stream,
        deleted,
    );

    let again = store.delete_stream(&stream, Deletion::Soft).await.unwrap();
    assert!(!again.noticed);
    assert_eq!(again.info.version, 4);
}

/// A hard delete removes the stream's events once they are in the feed and keeps its notice:
/// reads from version 1 say deleted, the notice reads from its own version, the feed still
/// holds every event and the notice once, and a soft-deleted stream can be deleted hard
/// later (a second notice, the hard one).
pub async fn hard_deleted_streams_lose_their_events<S: EventStore>(store: Arc<S>) {
    let stream = fresh_stream("conf-hard");
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            counter_events(&[1, 2, 3]),
        )
        .await
        .unwrap();
    let ended = store.delete_stream(&stream, Deletion::Hard).await.unwrap();
    let hard = StreamStatus::Deleted { hard: true };
    assert_eq!((ended.info.version, ended.info.status), (4, hard));
    assert_eq!(ended.removed, 3);
    assert_eq!(ended.info.first_version, 4);
    assert_closed(try_read(&*store, &stream, 1).await, &stream, hard);
    assert_closed(try_read(&*store, &stream, 3).await, &stream, hard);
    let notice = read(&*store, &stream, 4).await;
    assert_eq!(notice.len(), 1);
    assert_eq!(
        StreamNotice::of(&notice[0]).unwrap().unwrap(),
        StreamNotice::Deleted { hard: true }
    );
    assert_closed(
        store
            .append(&stream, ExpectedVersion::Exact(4), counter_events(&[1]))
            .await,
        &stream,
        hard,
    );
    let fed = feed_of(&*store, &stream, 4).await;
    assert_eq!(&*fed[0].event_type, "Incremented");
    let info = store.stream_info(&stream).await.unwrap();
    assert_eq!(
        (info.version, info.status, info.first_version),
        (4, hard, 4)
    );
    let again = store.delete_stream(&stream, Deletion::Hard).await.unwrap();
    assert_eq!((again.noticed, again.removed), (false, 0));

    // Soft first, hard later: two notices, the events removed.
    let later = fresh_stream("conf-hard-later");
    store
        .append(&later, ExpectedVersion::NoStream, counter_events(&[1, 2]))
        .await
        .unwrap();
    store.delete_stream(&later, Deletion::Soft).await.unwrap();
    let ended = store.delete_stream(&later, Deletion::Hard).await.unwrap();
    assert!(ended.noticed);
    assert_eq!((ended.info.version, ended.info.status), (4, hard));
    assert_eq!(ended.removed, 3, "two events and the soft notice");
    let fed = feed_of(&*store, &later, 4).await;
    let notices: Vec<_> = fed
        .iter()
        .filter_map(|e| StreamNotice::of(e).map(Result::unwrap))
        .collect();
    assert_eq!(
        notices,
        [
            StreamNotice::Deleted { hard: false },
            StreamNotice::Deleted { hard: true }
        ]
    );
}

/// Truncation removes the events before a version that a snapshot covers and appends a
/// notice: the aggregate still loads (from the snapshot) and takes commands, a read from a
/// removed version is [`Error::Truncated`] naming the first version held, and the stream is
/// not closed.
pub async fn truncated_streams_still_load<S: EventStore + SnapshotStore>(store: Arc<S>) {
    let repo = Repository::<Counter>::builder(store.clone())
        .snapshots(store.clone(), SnapshotPolicy::Every(10))
        .build();
    let id = fresh_stream("conf-trunc").as_str().to_owned();
    let stream = Counter::stream_id(&id);
    for _ in 0..12 {
        repo.execute(&id, 1).await.unwrap();
    }
    // The snapshot is at 10: truncating before 12 would remove version 11, which it lacks.
    match store.truncate_stream(&stream, 12).await {
        Err(Error::Refused {
            operation: "truncate",
            ..
        }) => {}
        other => panic!("a truncation past the snapshot: {other:?}"),
    }
    assert_eq!(read(&*store, &stream, 1).await.len(), 12, "nothing removed");
    let ended = store.truncate_stream(&stream, 11).await.unwrap();
    assert_eq!(ended.removed, 10);
    assert_eq!(ended.info.status, StreamStatus::Open);
    assert_eq!((ended.info.version, ended.info.first_version), (13, 11));
    match try_read(&*store, &stream, 1).await {
        Err(Error::Truncated {
            stream: s,
            first_version: 11,
            ..
        }) if s == stream => {}
        other => panic!("a read of a truncated version: {other:?}"),
    }
    let held = read(&*store, &stream, 11).await;
    assert_eq!(
        held.iter().map(|e| e.version).collect::<Vec<_>>(),
        [11, 12, 13]
    );
    assert_eq!(
        StreamNotice::of(&held[2]).unwrap().unwrap(),
        StreamNotice::Truncated { before: 11 }
    );
    // Loads and commands go on, from the snapshot, with the notice skipped.
    let fresh = Repository::<Counter>::builder(store.clone())
        .snapshots(store.clone(), SnapshotPolicy::Every(10))
        .build();
    let loaded = fresh.load(&id).await.unwrap();
    assert_eq!((loaded.state.value, loaded.version), (12, 13));
    fresh.execute(&id, 5).await.unwrap();
    assert_eq!(fresh.load(&id).await.unwrap().state.value, 17);
    feed_of(&*store, &stream, 14).await;
    // Again to the same version: nothing to do.
    let again = store.truncate_stream(&stream, 11).await.unwrap();
    assert_eq!((again.noticed, again.removed), (false, 0));
}

/// Archiving closes the stream and moves its events to the archive: appends are refused,
/// reads say archived, [`EventStore::read_archive`] gives every event back as it was, and a
/// second archive changes nothing.
pub async fn archived_streams_read_back<S: EventStore>(store: Arc<S>) {
    let stream = fresh_stream("conf-archive");
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            counter_events(&[1, 2, 3]),
        )
        .await
        .unwrap();
    let before = read(&*store, &stream, 1).await;
    let ended = store.archive_stream(&stream).await.unwrap();
    assert_eq!(ended.removed, 3);
    assert_eq!(
        (
            ended.info.version,
            ended.info.status,
            ended.info.first_version
        ),
        (4, StreamStatus::Archived, 4)
    );
    assert_closed(
        try_read(&*store, &stream, 1).await,
        &stream,
        StreamStatus::Archived,
    );
    assert_closed(
        store
            .append(&stream, ExpectedVersion::Any, counter_events(&[1]))
            .await,
        &stream,
        StreamStatus::Archived,
    );
    let archived: Vec<RecordedEvent> = store.read_archive(&stream, 1).try_collect().await.unwrap();
    assert_eq!(archived.len(), 3);
    for (a, b) in archived.iter().zip(&before) {
        assert_eq!(
            (a.version, &a.event_type, &a.payload, a.event_id),
            (b.version, &b.event_type, &b.payload, b.event_id)
        );
    }
    let from_two: Vec<RecordedEvent> = store.read_archive(&stream, 2).try_collect().await.unwrap();
    assert_eq!(from_two.len(), 2);
    feed_of(&*store, &stream, 4).await;
    let again = store.archive_stream(&stream).await.unwrap();
    assert_eq!((again.noticed, again.removed), (false, 0));
    let never: Vec<RecordedEvent> = store
        .read_archive(&fresh_stream("conf-never-archived"), 1)
        .try_collect()
        .await
        .unwrap();
    assert!(never.is_empty());
}

/// What an ending must refuse, with nothing written: a missing stream, a truncation without
/// a snapshot, a truncation of a closed stream or past its version, a deletion of an
/// archived stream, and an application event of a reserved type.
pub async fn endings_refuse_what_would_lose_data<S: EventStore + SnapshotStore>(store: Arc<S>) {
    let missing = fresh_stream("conf-end-missing");
    for result in [
        store.delete_stream(&missing, Deletion::Soft).await,
        store.truncate_stream(&missing, 2).await,
        store.archive_stream(&missing).await,
    ] {
        assert!(matches!(result, Err(Error::Refused { .. })), "{result:?}");
    }
    assert_eq!(store.stream_version(&missing).await.unwrap(), None);
    assert_eq!(
        store.stream_info(&missing).await.unwrap().status,
        StreamStatus::Missing
    );

    let stream = fresh_stream("conf-end-nosnap");
    store
        .append(&stream, ExpectedVersion::NoStream, counter_events(&[1, 2]))
        .await
        .unwrap();
    for before in [2, 9] {
        let refused = store.truncate_stream(&stream, before).await;
        assert!(matches!(refused, Err(Error::Refused { .. })), "{refused:?}");
    }
    assert_eq!(store.stream_version(&stream).await.unwrap(), Some(2));

    let reserved = store
        .append(
            &stream,
            ExpectedVersion::Exact(2),
            vec![NewEvent::new(crate::ending::DELETED, 1, &b"{}"[..])],
        )
        .await;
    assert!(
        matches!(reserved, Err(Error::Encode { .. })),
        "{reserved:?}"
    );
    assert_eq!(store.stream_version(&stream).await.unwrap(), Some(2));

    store.archive_stream(&stream).await.unwrap();
    let refused = store.delete_stream(&stream, Deletion::Hard).await;
    assert!(matches!(refused, Err(Error::Refused { .. })), "{refused:?}");
    let refused = store.truncate_stream(&stream, 2).await;
    assert!(matches!(refused, Err(Error::Refused { .. })), "{refused:?}");
    assert_eq!(store.stream_version(&stream).await.unwrap(), Some(3));
}

/// Counts each stream's events and drops a stream on its deletion notice; records every
/// notice it hears.
struct PerStream {
    name: String,
    prefix: String,
    model: crate::projection::Generations<std::collections::BTreeMap<String, u64>>,
    notices: std::sync::Mutex<Vec<(String, u64, StreamNotice)>>,
}

#[async_trait::async_trait]
impl crate::projection::Projection for PerStream {
    fn name(&self) -> &str {
        &self.name
    }
    fn handles(&self, event_type: &str) -> bool {
        // Only the counter's events: a notice comes anyway.
        event_type == "Incremented"
    }
    async fn apply(&self, generation: u64, event: &RecordedEvent) -> Result<(), crate::BoxError> {
        if crate::ending::is_notice(&event.event_type) {
            return Err(format!("a notice reached apply: {}", event.event_type).into());
        }
        if event.stream.as_str().starts_with(&self.prefix) {
            self.model.update(generation, |m| {
                *m.entry(event.stream.to_string()).or_default() += 1
            });
        }
        Ok(())
    }
    async fn notice(
        &self,
        generation: u64,
        event: &RecordedEvent,
        notice: StreamNotice,
    ) -> Result<(), crate::BoxError> {
        if !event.stream.as_str().starts_with(&self.prefix) {
            return Ok(());
        }
        self.notices
            .lock()
            .unwrap()
            .push((event.stream.to_string(), event.version, notice));
        if let StreamNotice::Deleted { .. } = notice {
            self.model
                .update(generation, |m| m.remove(event.stream.as_str()));
        }
        Ok(())
    }
    async fn reset(&self, generation: u64) -> Result<(), crate::BoxError> {
        self.model.reset(generation);
        self.notices.lock().unwrap().clear();
        Ok(())
    }
    async fn activate(&self, generation: u64) -> Result<(), crate::BoxError> {
        self.model.activate(generation);
        Ok(())
    }
}

/// A projection hears of each ending once, typed, in the stream's order after its events
/// ([`Projection::notice`](crate::projection::Projection::notice)), never through `apply`; a
/// rebuild from the whole feed (which still holds a hard-deleted stream's events) ends with
/// the same read model.
pub async fn projections_hear_of_stream_endings<S: super::ProjectionHost>(store: Arc<S>) {
    let prefix = fresh_stream("conf-notice").as_str().to_owned();
    let streams: Vec<StreamId> = (0..4)
        .map(|i| StreamId::new(format!("{prefix}-{i}")))
        .collect();
    for stream in &streams {
        store
            .append(stream, ExpectedVersion::NoStream, counter_events(&[1, 2]))
            .await
            .unwrap();
    }
    store
        .delete_stream(&streams[0], Deletion::Soft)
        .await
        .unwrap();
    store
        .delete_stream(&streams[1], Deletion::Hard)
        .await
        .unwrap();
    store.archive_stream(&streams[2]).await.unwrap();
    let refs: Vec<&StreamId> = streams.iter().collect();
    wait_for_feed(&*store, &crate::Cursor::new(), &refs, 11).await;

    let projection = Arc::new(PerStream {
        name: format!("{prefix}-proj"),
        prefix: prefix.clone(),
        model: Default::default(),
        notices: Default::default(),
    });
    let m = super::projections::manager(&store, projection.clone());
    let status = m.catch_up(&projection.name).await.unwrap();
    assert_eq!(
        status.state,
        crate::projection::ProjectionState::Running,
        "{status:?}"
    );
    let expected_model: std::collections::BTreeMap<String, u64> =
        [(streams[2].to_string(), 2), (streams[3].to_string(), 2)]
            .into_iter()
            .collect();
    let mut notices = projection.notices.lock().unwrap().clone();
    notices.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        notices,
        [
            (
                streams[0].to_string(),
                3,
                StreamNotice::Deleted { hard: false }
            ),
            (
                streams[1].to_string(),
                3,
                StreamNotice::Deleted { hard: true }
            ),
            (streams[2].to_string(), 3, StreamNotice::Archived),
        ]
    );
    assert_eq!(projection.model.read(|m| m.clone()), expected_model);

    m.rebuild(&projection.name).await.unwrap();
    assert_eq!(projection.model.read(|m| m.clone()), expected_model);
    assert_eq!(projection.notices.lock().unwrap().len(), 3);
    m.stop().await;
}

/// A deletion racing appenders: every append that succeeded is before the notice (and in the
/// feed once), every one after it is refused as closed, never lost or half-applied.
pub async fn a_deletion_racing_appends_loses_nothing<S: EventStore>(store: Arc<S>) {
    let stream = fresh_stream("conf-race-end");
    store
        .append(&stream, ExpectedVersion::NoStream, counter_events(&[1]))
        .await
        .unwrap();
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            let stream = stream.clone();
            tokio::spawn(async move {
                let mut committed = Vec::new();
                for _ in 0..20 {
                    match store
                        .append(&stream, ExpectedVersion::Any, counter_events(&[1]))
                        .await
                    {
                        Ok(done) => committed.push(done.first_version),
                        Err(Error::StreamClosed { .. }) => return (committed, true),
                        Err(e) => panic!("an append racing a deletion: {e}"),
                    }
                }
                (committed, false)
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let ended = store.delete_stream(&stream, Deletion::Soft).await.unwrap();
    let notice_at = ended.info.version;
    let mut committed = vec![1];
    for writer in writers {
        let (versions, _) = writer.await.unwrap();
        committed.extend(versions);
    }
    committed.sort_unstable();
    assert_eq!(
        committed,
        (1..notice_at).collect::<Vec<_>>(),
        "the appends that succeeded are exactly the versions before the notice"
    );
    let events = read(&*store, &stream, 1).await;
    assert_eq!(events.len() as u64, notice_at);
    assert!(crate::ending::is_notice(&events.last().unwrap().event_type));
    feed_of(&*store, &stream, notice_at as usize).await;
}
