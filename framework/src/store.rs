//! The store traits: what a backend implements to hold Keel's data.
//!
//! Each trait is small and object safe, so applications hold `Arc<dyn EventStore>` and pick
//! the backend at start-up. `keel-memory` implements all of them on DashMap; `keel-scylla` on
//! ScyllaDB (or Cassandra 5). Every implementation runs the same
//! conformance suite (`keel::conformance`, feature `conformance`).
//!
//! | trait | holds | used by |
//! |---|---|---|
//! | [`EventStore`] | streams of events and the feed, in slices | [`Repository`](crate::Repository), projections |
//! | [`SnapshotStore`] | the latest state of an aggregate at a version | [`Repository`](crate::Repository) |
//! | [`CheckpointStore`] | how far a feed consumer got | projections |
//! | [`LeaseStore`] | who may run a singleton worker right now | projections, sagas |

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::ending::{unsupported, Deletion, Ended, StreamInfo};
use crate::error::Result;
use crate::event::{AppendResult, ExpectedVersion, NewEvent, RecordedEvent, StreamId};
use crate::feed::Cursor;

/// A stream of recorded events, read lazily page by page; never a whole history in memory.
pub type EventStream<'a> = BoxStream<'a, Result<RecordedEvent>>;

/// A run of consecutive events of one stream, as a store hands them out: shared, not copied.
/// Dereferences to a slice.
#[derive(Clone, Debug)]
pub struct EventPage {
    events: Arc<[RecordedEvent]>,
    start: usize,
}

impl EventPage {
    /// The events of `events` from index `start` on.
    pub fn new(events: Arc<[RecordedEvent]>, start: usize) -> Self {
        let start = start.min(events.len());
        EventPage { events, start }
    }
}

impl From<Vec<RecordedEvent>> for EventPage {
    fn from(events: Vec<RecordedEvent>) -> Self {
        EventPage {
            events: events.into(),
            start: 0,
        }
    }
}

impl std::ops::Deref for EventPage {
    type Target = [RecordedEvent];
    fn deref(&self) -> &[RecordedEvent] {
        &self.events[self.start..]
    }
}

/// A stream of pages of events.
pub type PageStream<'a> = BoxStream<'a, Result<EventPage>>;

/// Streams of events, each with a dense version sequence, plus a global feed of every event.
///
/// # Contract
/// - [`append`](EventStore::append) is atomic: all events of one call are stored, or none.
///   Versions continue the stream's sequence with no gap; a stream's first event is version 1.
/// - The expected-version check is exact: of concurrent appenders expecting the same version,
///   exactly one wins and the others get [`Error::Conflict`](crate::Error::Conflict).
/// - The feed is cut into [`feed_slices`](EventStore::feed_slices) slices; each stream's
///   events are in the one slice [`slice_of`](crate::feed::slice_of) names. Each slice
///   ([`read_slice`](EventStore::read_slice)) assigns every committed event of its streams
///   exactly one dense position (1, 2, 3 ...) and keeps each stream's events in version order.
///   There is no order between slices. A store may publish events to the feed shortly after
///   the append returns (the ScyllaDB store does); it never publishes an event that was not
///   committed, and never publishes one twice.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends `events` to `stream` if the stream is at `expected`. An empty `events` checks
    /// the expectation and appends nothing.
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult>;

    /// The events of `stream` from version `from_version` (inclusive) on, in version order.
    /// An unknown stream reads as empty.
    fn read_stream<'a>(&'a self, stream: &'a StreamId, from_version: u64) -> EventStream<'a>;

    /// The same events as [`read_stream`](EventStore::read_stream), a page at a time. Loading
    /// an aggregate uses this: a store that keeps events in memory hands out its pages without
    /// copying them. The default groups `read_stream` into pages of 256.
    fn read_stream_pages<'a>(&'a self, stream: &'a StreamId, from_version: u64) -> PageStream<'a> {
        use futures::StreamExt;
        Box::pin(
            self.read_stream(stream, from_version)
                .chunks(256)
                .map(|chunk| {
                    chunk
                        .into_iter()
                        .collect::<Result<Vec<_>>>()
                        .map(EventPage::from)
                }),
        )
    }

    /// How many slices the feed is cut into (a power of two; see [`feed`](crate::feed)). A
    /// stream's events are all in slice [`slice_of`](crate::feed::slice_of)`(stream, slices)`.
    /// The default, for a store with one undivided feed, is 1.
    fn feed_slices(&self) -> u32 {
        1
    }

    /// One slice of the feed from `from_position` (inclusive) up to the slice's current head;
    /// each event carries its `slice` and its `position` in it. A consumer resumes after the
    /// last position it consumed (see [`Cursor`]).
    ///
    /// An event that cannot be read (a damaged row, a payload that does not open) is an error
    /// *in its place*, one that names it ([`Error::event`](crate::Error::event)): every event
    /// of the slice before it is yielded first, so the unreadable one is at the consumer's
    /// next position in that slice, and nothing after the error is read. A projection manager
    /// gives it to its error policy. A slice number at or above
    /// [`feed_slices`](EventStore::feed_slices) reads as empty.
    fn read_slice(&self, slice: u32, from_position: u64) -> EventStream<'_>;

    /// The slices `slices` of the feed after `cursor`, interleaved: each slice in position
    /// order, no order between slices (see [`feed`](crate::feed)). An unreadable event ends
    /// its own slice's part of the stream (as in [`read_slice`](EventStore::read_slice)); the
    /// other slices go on.
    fn read_slices(&self, slices: &[u32], cursor: &Cursor) -> EventStream<'_> {
        let mut parts: Vec<EventStream<'_>> = slices
            .iter()
            .map(|&slice| self.read_slice(slice, cursor.next(slice)))
            .collect();
        if parts.len() == 1 {
            return parts.pop().expect("one part");
        }
        Box::pin(futures::stream::select_all(parts))
    }

    /// The whole feed after `cursor` (every slice; see [`read_slices`](EventStore::read_slices)).
    /// `read_feed(&Cursor::new())` reads every event the feed holds.
    fn read_feed(&self, cursor: &Cursor) -> EventStream<'_> {
        self.read_slices(&crate::feed::all_slices(self.feed_slices()), cursor)
    }

    /// The stream's current version (`None`: no such stream).
    async fn stream_version(&self, stream: &StreamId) -> Result<Option<u64>>;

    /// The last position published in each slice (a slice with none may be absent): the
    /// feed's heads, as a [`Cursor`], so a consumer's lag is `cursor.behind(&heads)`.
    async fn feed_heads(&self) -> Result<Cursor>;

    /// A position of `stream`'s slice at or after the feed position of its event `version`,
    /// once that event is in the feed (`None` before): a consumer whose checkpoint in that
    /// slice has passed it has seen the event. Read-your-writes waits on it
    /// ([`Visibility`](crate::projection::Visibility)).
    ///
    /// A store may answer a later position than the event's own (the slice's head once the
    /// stream's feed progress has reached `version`, say); never an earlier one. The default
    /// scans the stream's slice from its start: correct for any store, slow on a long feed,
    /// so stores override it.
    async fn fed_position(&self, stream: &StreamId, version: u64) -> Result<Option<u64>> {
        use futures::TryStreamExt;
        let slice = crate::feed::slice_of(stream, self.feed_slices());
        let mut events = self.read_slice(slice, 1);
        while let Some(event) = events.try_next().await? {
            if event.stream == *stream && event.version >= version {
                return Ok(event.position);
            }
        }
        Ok(None)
    }

    /// How many events the feed holds: the sum of its heads.
    async fn feed_head(&self) -> Result<u64> {
        Ok(self.feed_heads().await?.total())
    }

    /// A number that changes whenever state built from this store's events may have become
    /// stale without any append (a [`Codec`](crate::codec::Codec) store counts the subjects
    /// it shredded). A repository drops the aggregates it cached under another number. The
    /// default, for stores whose events never change, is always 0.
    fn cache_epoch(&self) -> u64 {
        0
    }

    /// Where `stream` stands: its version and whether it was ended (see
    /// [`ending`](crate::ending)). The default, for a store whose streams never end, reads
    /// [`stream_version`](EventStore::stream_version).
    async fn stream_info(&self, stream: &StreamId) -> Result<StreamInfo> {
        Ok(StreamInfo::open(stream, self.stream_version(stream).await?))
    }

    /// Deletes `stream`: appends a [`StreamNotice::Deleted`](crate::ending::StreamNotice)
    /// at its next version, after which appends are refused with
    /// [`Error::StreamClosed`](crate::Error::StreamClosed). [`Deletion::Hard`] then removes
    /// its events once the feed has carried them (the notice stays, so the stream keeps its
    /// version and its ending).
    ///
    /// Idempotent: a second soft delete changes nothing, a hard delete of a soft-deleted
    /// stream appends a hard notice and removes, and one that an earlier call left unfinished
    /// (the feed had not caught up) finishes. A missing stream is refused.
    async fn delete_stream(&self, stream: &StreamId, deletion: Deletion) -> Result<Ended> {
        let _ = (stream, deletion);
        Err(unsupported(
            std::any::type_name::<Self>(),
            "deleting streams",
        ))
    }

    /// Removes `stream`'s events before version `before` once the feed has carried them,
    /// after appending a [`StreamNotice::Truncated`](crate::ending::StreamNotice) (which the
    /// stream's version counts). Refused unless the store holds a snapshot of the stream that
    /// includes every removed event (at version `before - 1` or later), so that loads still
    /// work; a read from an earlier version is [`Error::Truncated`](crate::Error::Truncated).
    /// Refused on a closed stream.
    async fn truncate_stream(&self, stream: &StreamId, before: u64) -> Result<Ended> {
        let _ = (stream, before);
        Err(unsupported(
            std::any::type_name::<Self>(),
            "truncating streams",
        ))
    }

    /// Closes `stream` with a [`StreamNotice::Archived`](crate::ending::StreamNotice) and
    /// moves its events to the archive once the feed has carried them:
    /// [`read_archive`](EventStore::read_archive) reads them back. Appends are refused
    /// afterwards. Idempotent, as [`delete_stream`](EventStore::delete_stream).
    async fn archive_stream(&self, stream: &StreamId) -> Result<Ended> {
        let _ = stream;
        Err(unsupported(
            std::any::type_name::<Self>(),
            "archiving streams",
        ))
    }

    /// The archived events of `stream` from `from_version` on (empty: never archived).
    fn read_archive<'a>(&'a self, stream: &'a StreamId, from_version: u64) -> EventStream<'a> {
        let _ = (stream, from_version);
        Box::pin(futures::stream::once(std::future::ready(Err(unsupported(
            std::any::type_name::<Self>(),
            "archiving streams",
        )))))
    }
}

/// An aggregate's encoded state at a version.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// The aggregate's stream.
    pub stream: StreamId,
    /// The stream version the state includes.
    pub version: u64,
    /// The state's schema version; a snapshot of another version is ignored on load.
    pub schema_version: u32,
    /// The encoded state.
    pub payload: Bytes,
    /// When it was taken, in milliseconds since the Unix epoch.
    pub taken_at: i64,
    /// The ids of the stream's last commands up to `version`, oldest first: the repository's
    /// command window (see [`Repository`](crate::Repository)), so that a load from this
    /// snapshot still tells a re-sent command from a new one. `None` for a snapshot stored
    /// without them (by a store or a Keel version that kept none): a repository then loads
    /// from the stream's start when it must look for a command id.
    pub recent_commands: Option<Vec<uuid::Uuid>>,
}

/// Snapshots of aggregate state, so loading a long stream replays only its tail.
#[async_trait]
pub trait SnapshotStore: Send + Sync + 'static {
    /// Stores a snapshot. Keeping a snapshot older than one already stored is allowed; loads
    /// always see the highest version.
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()>;

    /// The snapshot with the highest version for `stream`, if any.
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>>;
}

/// Feed positions saved by named consumers (projections).
#[async_trait]
pub trait CheckpointStore: Send + Sync + 'static {
    /// The position `name` resumes from (`None`: never saved).
    async fn load_checkpoint(&self, name: &str) -> Result<Option<u64>>;

    /// Saves the position `name` resumes from, made under `fence`: refused with
    /// [`Error::Fenced`](crate::Error::Fenced) when a save under a higher epoch is stored, so a
    /// worker that lost its lease can never move a checkpoint (backwards, typically) after its
    /// successor saved one. The check and the write are one atomic step in the store.
    async fn save_checkpoint(&self, name: &str, position: u64, fence: &Fence) -> Result<()>;
}

/// The lease a write is made under: stores (and read models) that see a write under a higher
/// epoch refuse every later one under a lower epoch.
///
/// ```
/// let fence = keel::Fence::new("projection/orders", 3);
/// assert!(fence.admits(3) && fence.admits(2) && !fence.admits(4));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Fence {
    /// What the lease guards.
    pub name: String,
    /// The lease's epoch when the write was made.
    pub epoch: u64,
}

impl Fence {
    /// A fence for writes under lease `name` at `epoch`.
    pub fn new(name: impl Into<String>, epoch: u64) -> Self {
        Fence {
            name: name.into(),
            epoch,
        }
    }

    /// The fence of a held lease.
    pub fn of(lease: &Lease) -> Self {
        Fence::new(lease.name.clone(), lease.epoch)
    }

    /// The feed slice this fence guards, when it is a slice lease's (a name ending in
    /// `/s<slice>`): a manager sharing a projection's slices hands its read model one fence
    /// per slice it holds, and a read model fenced per slice keys its epochs by this.
    ///
    /// ```
    /// assert_eq!(keel::Fence::new("projection/orders/s12", 3).slice(), Some(12));
    /// assert_eq!(keel::Fence::new("projection/orders", 3).slice(), None);
    /// ```
    pub fn slice(&self) -> Option<u32> {
        let (_, tail) = self.name.rsplit_once("/s")?;
        tail.parse().ok()
    }

    /// Whether a write under this fence may follow one made under epoch `seen`.
    pub fn admits(&self, seen: u64) -> bool {
        self.epoch >= seen
    }

    /// Checks this fence against the newest epoch `seen` by a store, and (when admitted)
    /// returns the epoch to record: the [`Error::Fenced`](crate::Error::Fenced) a store refuses with.
    pub fn check(&self, seen: u64) -> Result<u64> {
        if self.admits(seen) {
            Ok(self.epoch)
        } else {
            Err(crate::Error::Fenced {
                name: self.name.clone(),
                epoch: self.epoch,
                current: seen,
            })
        }
    }
}

/// A time-limited exclusive right to run the worker called `name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// What the lease guards.
    pub name: String,
    /// Who holds it.
    pub holder: String,
    /// Incremented on every change of holder: a fencing token for the work done under it.
    pub epoch: u64,
    /// How long it lasts without renewal.
    pub ttl: Duration,
}

/// Leases: at most one holder per name, expiring when not renewed.
#[async_trait]
pub trait LeaseStore: Send + Sync + 'static {
    /// Takes the lease if it is free or expired (or already held by `holder`, which renews it).
    /// `None`: somebody else holds it. A lease lasts at least `ttl` after it is taken or
    /// renewed; a store may keep it up to a second longer (CQL TTLs count whole seconds).
    async fn acquire(&self, name: &str, holder: &str, ttl: Duration) -> Result<Option<Lease>>;

    /// Extends a held lease by its ttl. `false`: it was lost (expired and taken, or released).
    async fn renew(&self, lease: &Lease) -> Result<bool>;

    /// Gives the lease up; only its holder can. `false`: it was not held by `lease.holder`.
    async fn release(&self, lease: &Lease) -> Result<bool>;

    /// Notes that `member` takes part in the work called `group` for at least `ttl` (calling
    /// again refreshes it), and returns the group's live members, `member` included, sorted.
    /// Workers that share work (the slices of a projection) size their fair share by it.
    /// The default, for a store that keeps no members, counts `member` alone: each worker
    /// then takes whatever is free, and nothing is balanced.
    async fn join(&self, group: &str, member: &str, ttl: Duration) -> Result<Vec<String>> {
        let _ = (group, ttl);
        Ok(vec![member.to_owned()])
    }

    /// Ends `member`'s part in `group` at once, instead of when its `ttl` runs out.
    async fn leave(&self, group: &str, member: &str) -> Result<()> {
        let _ = (group, member);
        Ok(())
    }
}
