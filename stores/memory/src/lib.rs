//! # keel-memory
//!
//! The embedded store of Keel: every store trait of `keel`, in memory, on DashMap. It is the
//! default for examples, tests and single-process tools; nothing survives the process.
//!
//! Appends to one stream are serialised by that stream's map entry, so of concurrent appenders
//! expecting the same version exactly one wins. A feed slice is appended under a short lock
//! taken while the stream entry is held, which gives every event one dense position in its
//! stream's slice and keeps each stream's events in version order in the feed. Events are stamped and allocated before
//! either lock is taken; under the locks they are only numbered and pushed (so under
//! concurrent appends, feed order and timestamp order may differ by microseconds, as with any
//! store whose writers stamp their own events). Events are published to the feed in the
//! same step as the append: the feed never lags.
//!
//! ```
//! use std::sync::Arc;
//! use keel::{EventStore, ExpectedVersion, NewEvent, StreamId};
//! use futures::TryStreamExt;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> keel::Result<()> {
//! let store = Arc::new(keel_memory::MemoryStore::new());
//! let stream = StreamId::new("greeting-1");
//! store.append(&stream, ExpectedVersion::NoStream, vec![NewEvent::new("Said", 1, &b"\"hi\""[..])]).await?;
//! let events: Vec<_> = store.read_stream(&stream, 1).try_collect().await?;
//! assert_eq!(events[0].version, 1);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dashmap::DashMap;
use futures::stream;
use futures::StreamExt as _;
#[cfg(feature = "encryption")]
use keel::codec::{DataKey, KeyStore};
use keel::ending::{Deletion, Ended, StreamInfo, StreamNotice, StreamStatus};
use keel::projection::{DeadLetter, ProjectionStatus, ProjectionStore, Request};
use keel::saga::{SagaRecord, SagaStore};
use keel::{
    AppendResult, CheckpointStore, Error, EventPage, EventStore, EventStream, ExpectedVersion,
    Fence, Lease, LeaseStore, NewEvent, PageStream, RecordedEvent, Result, Snapshot, SnapshotStore,
    StreamId,
};

/// Events handed out per lock acquisition when reading.
const PAGE: usize = 512;

/// Every Keel store trait, in memory. Cloning shares the data.
///
/// The feed has [`keel::feed::DEFAULT_SLICES`] slices unless made with
/// [`with_slices`](MemoryStore::with_slices), as on ScyllaDB, so that an application tested in
/// memory meets the same (absent) order between slices as in production.
#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Inner>,
    max_event_bytes: MaxEventBytes,
}

/// The largest event an append takes ([`keel::event::DEFAULT_MAX_EVENT_BYTES`] unless set).
#[derive(Clone, Copy)]
struct MaxEventBytes(usize);

impl Default for MaxEventBytes {
    fn default() -> Self {
        MaxEventBytes(keel::event::DEFAULT_MAX_EVENT_BYTES)
    }
}

struct Inner {
    streams: DashMap<StreamId, StreamLog, foldhash::fast::RandomState>,
    /// Archived streams' events, by stream.
    archive: DashMap<StreamId, Vec<RecordedEvent>>,
    /// One feed per slice, each numbered from 1 under its own lock.
    feed: Vec<RwLock<Chunks<ByPosition>>>,
    snapshots: DashMap<StreamId, Snapshot>,
    /// Position and the epoch of the fence it was saved under.
    checkpoints: DashMap<String, (u64, u64)>,
    leases: Mutex<std::collections::HashMap<String, HeldLease>>,
    /// group -> member -> until when it takes part.
    members: Mutex<std::collections::HashMap<String, std::collections::HashMap<String, Instant>>>,
    statuses: DashMap<String, ProjectionStatus>,
    requests: DashMap<String, Request>,
    dead_letters: DashMap<String, Vec<DeadLetter>>,
    sagas: DashMap<String, SagaRecord>,
    #[cfg(feature = "encryption")]
    keys: DashMap<String, DataKey>,
    /// Ids of shredded keys (never their subjects).
    #[cfg(feature = "encryption")]
    shredded_keys: DashMap<uuid::Uuid, ()>,
}

impl Inner {
    fn with_slices(slices: u32) -> Self {
        Inner {
            streams: DashMap::default(),
            archive: DashMap::default(),
            feed: (0..slices).map(|_| RwLock::default()).collect(),
            snapshots: DashMap::default(),
            checkpoints: DashMap::default(),
            leases: Mutex::default(),
            members: Mutex::default(),
            statuses: DashMap::default(),
            requests: DashMap::default(),
            dead_letters: DashMap::default(),
            sagas: DashMap::default(),
            #[cfg(feature = "encryption")]
            keys: DashMap::default(),
            #[cfg(feature = "encryption")]
            shredded_keys: DashMap::default(),
        }
    }

    fn slices(&self) -> u32 {
        self.feed.len() as u32
    }
}

impl Default for Inner {
    fn default() -> Self {
        Inner::with_slices(keel::feed::DEFAULT_SLICES)
    }
}

/// Events numbered from 1 (a stream's versions, or the feed's positions), kept as the shared
/// slices their appends produced: loads lend the slices, and the feed shares them with the
/// streams instead of copying. Each slice's first number is read from its first event, so a
/// stream that is read from its start touches nothing but the slices.
struct Chunks<N> {
    chunks: Vec<Arc<[RecordedEvent]>>,
    len: u64,
    numbering: std::marker::PhantomData<N>,
}

/// How a [`Chunks`] numbers its events.
trait Numbering {
    /// The number of `event` in this sequence.
    fn number(event: &RecordedEvent) -> u64;
}

/// A stream's events, numbered by version.
struct ByVersion;

impl Numbering for ByVersion {
    fn number(event: &RecordedEvent) -> u64 {
        event.version
    }
}

/// The feed, numbered by position (which the memory store gives every event it records).
struct ByPosition;

impl Numbering for ByPosition {
    fn number(event: &RecordedEvent) -> u64 {
        event.position.unwrap_or(0)
    }
}

/// One stream's events, by version, and how it ended.
#[derive(Default)]
struct StreamLog {
    events: Chunks<ByVersion>,
    /// The first version still held (1 unless events were removed).
    first: u64,
    /// Set once the stream is deleted or archived.
    closed: Option<StreamStatus>,
}

impl StreamLog {
    fn info(&self, stream: &StreamId) -> StreamInfo {
        StreamInfo {
            stream: stream.clone(),
            version: self.events.len,
            status: match self.closed {
                Some(status) => status,
                None if self.events.len == 0 => StreamStatus::Missing,
                None => StreamStatus::Open,
            },
            first_version: self.first.max(1),
        }
    }

    /// The error for a read from `from`, if the stream no longer holds it.
    fn gone(&self, stream: &StreamId, from: u64) -> Option<Error> {
        if from.max(1) >= self.first.max(1) {
            return None;
        }
        Some(match self.closed {
            Some(status) => Error::StreamClosed {
                stream: stream.clone(),
                version: self.events.len,
                status,
            },
            None => Error::Truncated {
                stream: stream.clone(),
                from,
                first_version: self.first,
            },
        })
    }

    /// Removes the events before `version`; gives how many were removed and the events.
    fn remove_before(&mut self, version: u64) -> Vec<RecordedEvent> {
        if version <= self.first.max(1) {
            return Vec::new();
        }
        self.first = version;
        self.events.remove_before(version)
    }
}

impl<N> Default for Chunks<N> {
    fn default() -> Self {
        Chunks {
            chunks: Vec::new(),
            len: 0,
            numbering: std::marker::PhantomData,
        }
    }
}

impl<N: Numbering> Chunks<N> {
    /// Adds the events of one append (never empty).
    fn push(&mut self, chunk: Arc<[RecordedEvent]>) {
        self.len += chunk.len() as u64;
        self.chunks.push(chunk);
    }

    /// The slice holding event `n` and the offset in it (`n` at or after the first held).
    fn locate(&self, n: u64) -> Option<(usize, usize)> {
        let n = n.max(1);
        if n > self.len || self.chunks.is_empty() {
            return None;
        }
        if n <= N::number(&self.chunks[0][0]) {
            return Some((0, 0));
        }
        let chunk = self.chunks.partition_point(|c| N::number(&c[0]) <= n) - 1;
        Some((chunk, (n - N::number(&self.chunks[chunk][0])) as usize))
    }

    /// Drops the events numbered below `n` and hands them back (the numbering stays: `len`
    /// is still the last number).
    fn remove_before(&mut self, n: u64) -> Vec<RecordedEvent> {
        let mut removed = Vec::new();
        let mut kept = Vec::with_capacity(self.chunks.len());
        for chunk in self.chunks.drain(..) {
            let first = N::number(&chunk[0]);
            let last = first + chunk.len() as u64 - 1;
            if last < n {
                removed.extend_from_slice(&chunk);
            } else if first >= n {
                kept.push(chunk);
            } else {
                let split = (n - first) as usize;
                removed.extend_from_slice(&chunk[..split]);
                kept.push(chunk[split..].into());
            }
        }
        self.chunks = kept;
        removed
    }

    /// Up to `max` events from event `n`, copied out.
    fn copy_from(&self, n: u64, max: usize) -> Vec<RecordedEvent> {
        let Some((first, mut skip)) = self.locate(n) else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(max.min((self.len - n.max(1) + 1) as usize));
        for chunk in &self.chunks[first..] {
            let take = (max - out.len()).min(chunk.len() - skip);
            out.extend_from_slice(&chunk[skip..skip + take]);
            if out.len() == max {
                break;
            }
            skip = 0;
        }
        out
    }

    /// The shared slices from event `n` on, as a stream of pages.
    fn pages_from(&self, n: u64) -> PageStream<'static> {
        let Some((first, offset)) = self.locate(n) else {
            return Box::pin(stream::empty());
        };
        let page =
            |i: usize| EventPage::new(self.chunks[i].clone(), if i == first { offset } else { 0 });
        if first + 1 == self.chunks.len() {
            // The common case of a short stream: no list of pages to allocate.
            return Box::pin(stream::once(std::future::ready(Ok(page(first)))));
        }
        let pages: Vec<_> = (first..self.chunks.len()).map(|i| Ok(page(i))).collect();
        Box::pin(stream::iter(pages))
    }
}

struct HeldLease {
    holder: String,
    epoch: u64,
    expires: Instant,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store whose feed has `slices` slices (a power of two up to
    /// [`keel::feed::MAX_SLICES`]; 1 gives one feed in commit order).
    ///
    /// ```
    /// use keel::EventStore;
    /// let store = keel_memory::MemoryStore::with_slices(4)?;
    /// assert_eq!(store.feed_slices(), 4);
    /// assert!(keel_memory::MemoryStore::with_slices(3).is_err());
    /// # Ok::<(), keel::Error>(())
    /// ```
    pub fn with_slices(slices: u32) -> Result<Self> {
        let slices = keel::feed::validate_slices(slices)?;
        Ok(MemoryStore {
            inner: Arc::new(Inner::with_slices(slices)),
            max_event_bytes: MaxEventBytes::default(),
        })
    }

    /// Sets the largest event (payload, type and metadata, see [`NewEvent::stored_len`]) an
    /// append takes; larger ones are refused with [`Error::TooLarge`]. The default is
    /// [`keel::event::DEFAULT_MAX_EVENT_BYTES`], the same as the ScyllaDB store's, so that an
    /// application tested on this store is refused the same events in production.
    pub fn with_max_event_bytes(mut self, bytes: usize) -> Self {
        self.max_event_bytes = MaxEventBytes(bytes);
        self
    }

    /// Number of events in the feed.
    pub fn len(&self) -> usize {
        self.inner
            .feed
            .iter()
            .map(|slice| read_lock(slice).len as usize)
            .sum()
    }

    /// Whether the store holds no events.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn leases(&self) -> MutexGuard<'_, std::collections::HashMap<String, HeldLease>> {
        self.inner.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Numbers `recorded` after the stream's last version and publishes it, the stream's
    /// entry held (so that the feed gets one append's events together, in version order).
    fn push(
        &self,
        stream: &StreamId,
        entry: &mut StreamLog,
        mut recorded: Arc<[RecordedEvent]>,
    ) -> AppendResult {
        let current = entry.events.len;
        let count = recorded.len() as u64;
        let slice = keel::feed::slice_of(stream, self.inner.slices());
        let mut feed = write_lock(&self.inner.feed[slice as usize]);
        let first_position = feed.len + 1;
        let unshared = Arc::get_mut(&mut recorded).expect("not shared before it is pushed");
        for (i, event) in unshared.iter_mut().enumerate() {
            event.version = current + 1 + i as u64;
            event.position = Some(first_position + i as u64);
            event.slice = slice;
        }
        feed.push(recorded.clone());
        entry.events.push(recorded);
        if entry.first == 0 {
            entry.first = 1;
        }
        AppendResult {
            first_version: current + 1,
            last_version: current + count,
        }
    }

    /// Appends `notice` to the stream whose entry is held.
    fn notice(&self, stream: &StreamId, entry: &mut StreamLog, notice: StreamNotice) -> u64 {
        let event = RecordedEvent::record(stream.clone(), 0, None, notice.to_event());
        let version = self
            .push(stream, entry, Arc::from(vec![event]))
            .last_version;
        if let Some(status) = notice.closed_status() {
            entry.closed = Some(status);
        }
        version
    }

    /// The entry of a stream that exists, for `operation`.
    fn existing(
        &self,
        stream: &StreamId,
        operation: &'static str,
    ) -> Result<dashmap::mapref::one::RefMut<'_, StreamId, StreamLog>> {
        match self.inner.streams.get_mut(stream) {
            Some(entry) if entry.events.len > 0 => Ok(entry),
            _ => Err(Error::Refused {
                stream: stream.clone(),
                operation,
                reason: "no such stream".into(),
            }),
        }
    }
}

fn ended(info: StreamInfo, removed: usize, noticed: bool) -> Ended {
    Ended {
        info,
        removed: removed as u64,
        noticed,
    }
}

fn read_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // No code path panics while holding these locks with the data half-changed; a poisoned
    // lock's data is therefore still consistent.
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

/// Reads a growing vector page by page, taking the lock once per page.
fn paged<'a, F>(from_index: usize, page: F) -> EventStream<'a>
where
    F: Fn(usize) -> Result<Vec<RecordedEvent>> + Send + Sync + 'a,
{
    // `usize::MAX` marks a read that ended in an error.
    let pages = stream::unfold(from_index, move |at| {
        let page = (at != usize::MAX).then(|| page(at));
        async move {
            match page? {
                Ok(events) => {
                    let next = at + events.len();
                    (!events.is_empty())
                        .then(|| (stream::iter(events.into_iter().map(Ok)).left_stream(), next))
                }
                Err(e) => Some((stream::iter(vec![Err(e)]).right_stream(), usize::MAX)),
            }
        }
    });
    Box::pin(futures::StreamExt::flatten(pages))
}

#[async_trait]
impl EventStore for MemoryStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        stream.validate()?;
        for event in &events {
            event.check_size(stream, self.max_event_bytes.0)?;
            keel::ending::check_not_reserved(stream, &event.event_type)?;
        }
        // Recorded (stamped, allocated) before any lock is taken; only numbered under them.
        let count = events.len() as u64;
        let recorded: Arc<[RecordedEvent]> = events
            .into_iter()
            .map(|event| RecordedEvent::record(stream.clone(), 0, None, event))
            .collect();
        let mut entry = self.inner.streams.entry(stream.clone()).or_default();
        if entry.closed.is_some() {
            return Err(entry.info(stream).closed_error());
        }
        let current = entry.events.len;
        let actual = (current > 0).then_some(current);
        if !expected.accepts(actual) || count == 0 {
            let outcome = if expected.accepts(actual) {
                Ok(AppendResult {
                    first_version: current + 1,
                    last_version: current,
                })
            } else {
                Err(Error::Conflict {
                    stream: stream.clone(),
                    expected,
                    actual,
                })
            };
            drop(entry);
            // Don't leave an empty entry behind for a stream that was never written.
            self.inner
                .streams
                .remove_if(stream, |_, log| log.events.len == 0);
            return outcome;
        }
        Ok(self.push(stream, &mut entry, recorded))
    }

    fn read_stream<'a>(&'a self, stream: &'a StreamId, from_version: u64) -> EventStream<'a> {
        let start = from_version.max(1) as usize;
        paged(start, move |at| match self.inner.streams.get(stream) {
            Some(log) => match log.gone(stream, at as u64) {
                Some(gone) => Err(gone),
                None => Ok(log.events.copy_from(at as u64, PAGE)),
            },
            None => Ok(Vec::new()),
        })
    }

    fn read_stream_pages<'a>(&'a self, stream: &'a StreamId, from_version: u64) -> PageStream<'a> {
        // Taken at once: lending the shared slices needs no waiting.
        match self.inner.streams.get(stream) {
            Some(log) => match log.gone(stream, from_version) {
                Some(gone) => Box::pin(stream::once(std::future::ready(Err(gone)))),
                None => log.events.pages_from(from_version),
            },
            None => Box::pin(stream::empty()),
        }
    }

    fn feed_slices(&self) -> u32 {
        self.inner.slices()
    }

    fn read_slice(&self, slice: u32, from_position: u64) -> EventStream<'_> {
        let Some(feed) = self.inner.feed.get(slice as usize) else {
            return Box::pin(stream::empty());
        };
        paged(from_position.max(1) as usize, move |at| {
            Ok(read_lock(feed).copy_from(at as u64, PAGE))
        })
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Option<u64>> {
        Ok(self
            .inner
            .streams
            .get(stream)
            .map(|log| log.events.len)
            .filter(|&v| v > 0))
    }

    async fn fed_position(&self, stream: &StreamId, version: u64) -> Result<Option<u64>> {
        // An append is in the feed as it commits: the event's own position.
        Ok(self
            .inner
            .streams
            .get(stream)
            // A removed event was in the feed before the first one still held.
            .and_then(|log| {
                let from = version.max(log.first).max(1);
                log.events.copy_from(from, 1).into_iter().next()
            })
            .and_then(|event| event.position))
    }

    async fn feed_heads(&self) -> Result<keel::Cursor> {
        Ok(self
            .inner
            .feed
            .iter()
            .enumerate()
            .map(|(slice, feed)| (slice as u32, read_lock(feed).len))
            .collect())
    }

    async fn stream_info(&self, stream: &StreamId) -> Result<StreamInfo> {
        Ok(match self.inner.streams.get(stream) {
            Some(log) => log.info(stream),
            None => StreamInfo::open(stream, None),
        })
    }

    async fn delete_stream(&self, stream: &StreamId, deletion: Deletion) -> Result<Ended> {
        let mut entry = self.existing(stream, "delete")?;
        let hard = deletion == Deletion::Hard;
        let noticed = match entry.closed {
            None => true,
            Some(StreamStatus::Deleted { hard: false }) => hard,
            Some(StreamStatus::Archived) => {
                return Err(Error::Refused {
                    stream: stream.clone(),
                    operation: "delete",
                    reason: "the stream is archived".into(),
                })
            }
            Some(_) => false,
        };
        if noticed {
            self.notice(stream, &mut entry, StreamNotice::Deleted { hard });
        }
        let removed = if entry.closed == Some(StreamStatus::Deleted { hard: true }) {
            let last = entry.events.len;
            entry.remove_before(last).len()
        } else {
            0
        };
        Ok(ended(entry.info(stream), removed, noticed))
    }

    async fn truncate_stream(&self, stream: &StreamId, before: u64) -> Result<Ended> {
        let covered = self.inner.snapshots.get(stream).map(|s| s.version);
        let mut entry = self.existing(stream, "truncate")?;
        let refuse = |reason: String| Error::Refused {
            stream: stream.clone(),
            operation: "truncate",
            reason,
        };
        if entry.closed.is_some() {
            return Err(refuse(format!(
                "the stream is {}",
                entry.info(stream).status
            )));
        }
        if before <= entry.first.max(1) {
            return Ok(ended(entry.info(stream), 0, false));
        }
        let version = entry.events.len;
        if before > version + 1 {
            return Err(refuse(format!(
                "version {before} is past the stream's version {version}"
            )));
        }
        if covered.is_none_or(|v| v + 1 < before) {
            return Err(refuse(format!(
                "no snapshot includes version {} (the last one removed); the latest is {}",
                before - 1,
                covered.map_or("none".to_owned(), |v| format!("at version {v}"))
            )));
        }
        self.notice(stream, &mut entry, StreamNotice::Truncated { before });
        let removed = entry.remove_before(before).len();
        Ok(ended(entry.info(stream), removed, true))
    }

    async fn archive_stream(&self, stream: &StreamId) -> Result<Ended> {
        let mut entry = self.existing(stream, "archive")?;
        let noticed = match entry.closed {
            None | Some(StreamStatus::Deleted { hard: false }) => {
                self.notice(stream, &mut entry, StreamNotice::Archived);
                true
            }
            Some(StreamStatus::Archived) => false,
            Some(_) => {
                return Err(Error::Refused {
                    stream: stream.clone(),
                    operation: "archive",
                    reason: "the stream was deleted hard: its events are gone".into(),
                })
            }
        };
        let last = entry.events.len;
        let moved = entry.remove_before(last);
        let removed = moved.len();
        if !moved.is_empty() {
            self.inner
                .archive
                .entry(stream.clone())
                .or_default()
                .extend(moved);
        }
        Ok(ended(entry.info(stream), removed, noticed))
    }

    fn read_archive<'a>(&'a self, stream: &'a StreamId, from_version: u64) -> EventStream<'a> {
        let events: Vec<RecordedEvent> = self
            .inner
            .archive
            .get(stream)
            .map(|events| {
                events
                    .iter()
                    .filter(|e| e.version >= from_version)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        Box::pin(stream::iter(events.into_iter().map(Ok)))
    }
}

#[async_trait]
impl SnapshotStore for MemoryStore {
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        let mut slot = self
            .inner
            .snapshots
            .entry(snapshot.stream.clone())
            .or_insert_with(|| snapshot.clone());
        if snapshot.version >= slot.version {
            *slot = snapshot;
        }
        Ok(())
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>> {
        Ok(self.inner.snapshots.get(stream).map(|s| s.clone()))
    }
}

#[async_trait]
impl CheckpointStore for MemoryStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<u64>> {
        Ok(self.inner.checkpoints.get(name).map(|p| p.0))
    }

    async fn save_checkpoint(&self, name: &str, position: u64, fence: &Fence) -> Result<()> {
        // The entry's lock makes the epoch check and the write one step.
        let mut entry = self
            .inner
            .checkpoints
            .entry(name.to_owned())
            .or_insert((0, 0));
        let epoch = fence.check(entry.1)?;
        *entry = (position, epoch);
        Ok(())
    }
}

#[async_trait]
impl LeaseStore for MemoryStore {
    async fn acquire(&self, name: &str, holder: &str, ttl: Duration) -> Result<Option<Lease>> {
        let mut leases = self.leases();
        let now = Instant::now();
        let epoch = match leases.get(name) {
            Some(held) if held.holder == holder && held.expires > now => held.epoch,
            Some(held) if held.expires > now => return Ok(None),
            Some(held) => held.epoch + 1,
            None => 1,
        };
        leases.insert(
            name.to_owned(),
            HeldLease {
                holder: holder.to_owned(),
                epoch,
                expires: now + ttl,
            },
        );
        Ok(Some(Lease {
            name: name.to_owned(),
            holder: holder.to_owned(),
            epoch,
            ttl,
        }))
    }

    async fn renew(&self, lease: &Lease) -> Result<bool> {
        let mut leases = self.leases();
        let now = Instant::now();
        match leases.get_mut(&lease.name) {
            Some(held)
                if held.holder == lease.holder
                    && held.epoch == lease.epoch
                    && held.expires > now =>
            {
                held.expires = now + lease.ttl;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release(&self, lease: &Lease) -> Result<bool> {
        let mut leases = self.leases();
        match leases.get_mut(&lease.name) {
            Some(held)
                if held.holder == lease.holder
                    && held.epoch == lease.epoch
                    && held.expires > Instant::now() =>
            {
                // Keep the epoch so the next holder's is higher; mark the lease free.
                held.holder.clear();
                held.expires = Instant::now();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn join(&self, group: &str, member: &str, ttl: Duration) -> Result<Vec<String>> {
        let mut groups = self.inner.members.lock().unwrap_or_else(|p| p.into_inner());
        let members = groups.entry(group.to_owned()).or_default();
        let now = Instant::now();
        members.insert(member.to_owned(), now + ttl);
        members.retain(|_, until| *until > now);
        let mut live: Vec<String> = members.keys().cloned().collect();
        live.sort();
        Ok(live)
    }

    async fn leave(&self, group: &str, member: &str) -> Result<()> {
        let mut groups = self.inner.members.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(members) = groups.get_mut(group) {
            members.remove(member);
        }
        Ok(())
    }
}

#[async_trait]
impl ProjectionStore for MemoryStore {
    async fn save_status(&self, status: &ProjectionStatus) -> Result<()> {
        self.inner
            .statuses
            .insert(status.name.clone(), status.clone());
        Ok(())
    }

    async fn load_status(&self, name: &str) -> Result<Option<ProjectionStatus>> {
        Ok(self.inner.statuses.get(name).map(|s| s.clone()))
    }

    async fn list_status(&self) -> Result<Vec<ProjectionStatus>> {
        let mut all: Vec<ProjectionStatus> =
            self.inner.statuses.iter().map(|s| s.clone()).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    async fn request(&self, name: &str, request: Request) -> Result<()> {
        self.inner.requests.insert(name.to_owned(), request);
        Ok(())
    }

    async fn take_request(&self, name: &str) -> Result<Option<Request>> {
        Ok(self.inner.requests.remove(name).map(|(_, c)| c))
    }

    async fn add_dead_letter(&self, letter: &DeadLetter) -> Result<()> {
        self.inner
            .dead_letters
            .entry(letter.projection.clone())
            .or_default()
            .push(letter.clone());
        Ok(())
    }

    async fn dead_letters(&self, name: &str) -> Result<Vec<DeadLetter>> {
        Ok(self
            .inner
            .dead_letters
            .get(name)
            .map(|l| l.clone())
            .unwrap_or_default())
    }

    async fn remove_dead_letter(&self, name: &str, slice: u32, position: u64) -> Result<usize> {
        let mut removed = 0;
        if let Some(mut letters) = self.inner.dead_letters.get_mut(name) {
            letters.retain(|l| {
                let hit = l.event.slice == slice && l.event.position == position;
                removed += usize::from(hit);
                !hit
            });
        }
        Ok(removed)
    }
}

#[async_trait]
impl SagaStore for MemoryStore {
    async fn create_saga(&self, record: &SagaRecord) -> Result<bool> {
        match self.inner.sagas.entry(record.id.clone()) {
            dashmap::mapref::entry::Entry::Occupied(_) => Ok(false),
            dashmap::mapref::entry::Entry::Vacant(slot) => {
                slot.insert(record.clone());
                Ok(true)
            }
        }
    }

    async fn load_saga(&self, id: &str) -> Result<Option<SagaRecord>> {
        Ok(self.inner.sagas.get(id).map(|r| r.clone()))
    }

    async fn update_saga(&self, record: &SagaRecord, expected_revision: u64) -> Result<bool> {
        match self.inner.sagas.get_mut(&record.id) {
            Some(mut current) if current.revision == expected_revision => {
                *current = record.clone();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn list_sagas(&self, unfinished_only: bool) -> Result<Vec<SagaRecord>> {
        Ok(self
            .inner
            .sagas
            .iter()
            .filter(|r| !unfinished_only || !r.status.is_finished())
            .map(|r| r.clone())
            .collect())
    }
}

#[cfg(feature = "encryption")]
#[async_trait]
impl KeyStore for MemoryStore {
    async fn key_for(&self, subject: &str) -> Result<DataKey> {
        if let Some(key) = self.inner.keys.get(subject) {
            return Ok(key.clone());
        }
        Ok(self
            .inner
            .keys
            .entry(subject.to_owned())
            .or_insert_with(DataKey::generate)
            .clone())
    }

    async fn find_key(&self, subject: &str) -> Result<Option<DataKey>> {
        Ok(self.inner.keys.get(subject).map(|k| k.clone()))
    }

    async fn shred(&self, subject: &str) -> Result<bool> {
        let Some(id) = self.inner.keys.get(subject).map(|k| k.id()) else {
            return Ok(false);
        };
        // Recorded before the key goes, so a reader never finds neither.
        self.inner.shredded_keys.insert(id, ());
        Ok(self
            .inner
            .keys
            .remove_if(subject, |_, key| key.id() == id)
            .is_some())
    }

    async fn was_shredded(&self, key_id: uuid::Uuid) -> Result<bool> {
        Ok(self.inner.shredded_keys.contains_key(&key_id))
    }
}
