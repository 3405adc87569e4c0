//! The [`Repository`]: loads aggregates from their events (and snapshots) and stores the
//! events their commands produce.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::TryStreamExt;
use tracing::Instrument;

use crate::aggregate::Aggregate;
use crate::error::{Error, Result};
use crate::event::{now_millis, AppendResult, ExpectedVersion, Metadata, NewEvent, StreamId};
use crate::retry::Backoff;
use crate::store::{EventStore, Snapshot, SnapshotStore};
use crate::upcast::Upcasters;

mod cache;
mod window;

use cache::{AggregateCache, Entry, Slot};

pub use crate::config::DEFAULT_COMMAND_WINDOW;
use window::CommandWindow;

/// When the repository snapshots an aggregate. Off by default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SnapshotPolicy {
    /// Never snapshot: every load replays the whole stream.
    #[default]
    Never,
    /// Snapshot whenever a command takes the stream across a multiple of this many events.
    Every(u64),
}

impl SnapshotPolicy {
    /// Whether an append covering `first..=last` crosses a snapshot boundary.
    fn due(self, first: u64, last: u64) -> bool {
        match self {
            SnapshotPolicy::Never => false,
            SnapshotPolicy::Every(0) => false,
            SnapshotPolicy::Every(n) => last / n > (first - 1) / n,
        }
    }
}

/// An aggregate's state and the stream version it reflects.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded<A> {
    /// The state after every event up to `version`.
    pub state: A,
    /// The stream's version (0: no events yet).
    pub version: u64,
}

/// What a successful [`Repository::execute`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Executed<E> {
    /// The events the command produced (empty: nothing to do, nothing appended).
    pub events: Vec<E>,
    /// The aggregate's stream.
    pub stream: StreamId,
    /// The stream's version after the append.
    pub version: u64,
}

impl<E> Executed<E> {
    /// The write to wait for before reading a projection that should show it
    /// (read-your-writes: [`Visibility`](crate::projection::Visibility)). A command that
    /// appended nothing names the version it was decided on, which the projection may
    /// already have.
    pub fn written(&self) -> crate::feed::Written {
        crate::feed::Written {
            stream: self.stream.clone(),
            version: self.version,
        }
    }
}

/// Counters of one repository, as a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepositoryMetrics {
    /// Aggregates loaded.
    pub loads: u64,
    /// Events applied while loading.
    pub events_replayed: u64,
    /// Loads that started from a snapshot.
    pub snapshot_hits: u64,
    /// Snapshots written.
    pub snapshots_taken: u64,
    /// Appends that succeeded.
    pub appends: u64,
    /// Appends refused for a version conflict.
    pub conflicts: u64,
    /// Commands retried after a conflict.
    pub retries: u64,
    /// Commands decided on a cached aggregate, without a load.
    pub cache_hits: u64,
    /// Commands that found no (usable) cached aggregate and loaded it.
    pub cache_misses: u64,
    /// Cached aggregates pushed out by the cache's bound.
    pub cache_evictions: u64,
    /// Conflicts of commands decided on a cached aggregate (another writer had moved the
    /// stream on; the entry was dropped and the command decided again on a load).
    pub cache_conflicts: u64,
    /// Aggregates cached now.
    pub cached: u64,
}

/// The facade's metric handles, registered once per repository (with the recorder installed
/// at that time) instead of looked up on every command.
struct Handles {
    loads: metrics::Counter,
    events_replayed: metrics::Counter,
    load_seconds: metrics::Histogram,
    appends: metrics::Counter,
    events_per_append: metrics::Histogram,
    conflicts: metrics::Counter,
    retries: metrics::Counter,
    snapshots: metrics::Counter,
    cache_hits: metrics::Counter,
    cache_misses: metrics::Counter,
    cache_conflicts: metrics::Counter,
}

impl Handles {
    fn register(aggregate: &'static str) -> Self {
        use crate::metrics as m;
        Handles {
            loads: metrics::counter!(m::LOADS, "aggregate" => aggregate),
            events_replayed: metrics::counter!(m::EVENTS_REPLAYED, "aggregate" => aggregate),
            load_seconds: metrics::histogram!(m::LOAD_SECONDS, "aggregate" => aggregate),
            appends: metrics::counter!(m::APPENDS, "aggregate" => aggregate),
            events_per_append: metrics::histogram!(m::EVENTS_PER_APPEND, "aggregate" => aggregate),
            conflicts: metrics::counter!(m::CONFLICTS, "aggregate" => aggregate),
            retries: metrics::counter!(m::RETRIES, "aggregate" => aggregate),
            snapshots: metrics::counter!(m::SNAPSHOTS, "aggregate" => aggregate),
            cache_hits: metrics::counter!(m::CACHE_HITS, "aggregate" => aggregate),
            cache_misses: metrics::counter!(m::CACHE_MISSES, "aggregate" => aggregate),
            cache_conflicts: metrics::counter!(m::CACHE_CONFLICTS, "aggregate" => aggregate),
        }
    }
}

#[derive(Default)]
struct Counters {
    loads: AtomicU64,
    events_replayed: AtomicU64,
    snapshot_hits: AtomicU64,
    snapshots_taken: AtomicU64,
    appends: AtomicU64,
    conflicts: AtomicU64,
    retries: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    cache_conflicts: AtomicU64,
}

/// Loads and saves aggregates of type `A` through an [`EventStore`].
///
/// Cloning is cheap; clones share the stores and the counters.
///
/// ```
/// # use keel::doc::Counter;
/// use keel::Repository;
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> keel::Result<()> {
/// let store = std::sync::Arc::new(keel_memory::MemoryStore::new());
/// let counters = Repository::<Counter>::new(store);
/// counters.execute("a", 2).await?;
/// counters.execute("a", 3).await?;
/// assert_eq!(counters.load("a").await?.state.value, 5);
/// # Ok(()) }
/// ```
pub struct Repository<A: Aggregate> {
    inner: Arc<Settings>,
    cache: Option<Arc<AggregateCache<A>>>,
    _aggregate: PhantomData<fn() -> A>,
}

/// Everything a repository holds, shared by its clones (a clone is one reference count).
struct Settings {
    events: Arc<dyn EventStore>,
    snapshots: Option<Arc<dyn SnapshotStore>>,
    policy: SnapshotPolicy,
    upcasters: Arc<Upcasters>,
    max_retries: u32,
    backoff: Backoff,
    command_window: usize,
    counters: Counters,
    handles: Handles,
}

impl<A: Aggregate> Clone for Repository<A> {
    fn clone(&self) -> Self {
        Repository {
            inner: self.inner.clone(),
            cache: self.cache.clone(),
            _aggregate: PhantomData,
        }
    }
}

/// Configures a [`Repository`].
pub struct RepositoryBuilder<A: Aggregate> {
    settings: Settings,
    cache_entries: usize,
    cache_max_age: Option<Duration>,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A: Aggregate> RepositoryBuilder<A> {
    /// Snapshots into `store` following `policy`.
    pub fn snapshots(mut self, store: Arc<dyn SnapshotStore>, policy: SnapshotPolicy) -> Self {
        self.settings.snapshots = Some(store);
        self.settings.policy = policy;
        self
    }

    /// Upcasts old event shapes on load.
    pub fn upcasters(mut self, upcasters: Upcasters) -> Self {
        self.settings.upcasters = Arc::new(upcasters);
        self
    }

    /// How many times [`Repository::execute`] retries a command after a version conflict
    /// (default 3), and how long it waits before each (default: 1 ms, doubled each time up to
    /// 1 s, with jitter; a bare [`Duration`] is the first delay). The repository is the one
    /// place that retries conflicts (see [the retry rule](crate::retry)).
    pub fn retries(mut self, max_retries: u32, backoff: impl Into<Backoff>) -> Self {
        self.settings.max_retries = max_retries;
        self.settings.backoff = backoff.into();
        self
    }

    /// How many of a stream's last commands are remembered by id (default
    /// [`DEFAULT_COMMAND_WINDOW`], 128): a command re-sent with the [`command_id`](Metadata::command_id)
    /// of one of them is not applied again (see [`Repository::execute_with`]). 0 turns the
    /// check off. Size it to the commands one aggregate may take between a send and its
    /// latest re-send (a saga's retry after its orchestrator died, say): each remembered id
    /// costs 16 bytes in every snapshot.
    pub fn command_window(mut self, commands: usize) -> Self {
        self.settings.command_window = commands;
        self
    }

    /// How many aggregates the repository keeps in memory between commands (default
    /// [`DEFAULT_CACHE_ENTRIES`](crate::config::DEFAULT_CACHE_ENTRIES), 10,000; 0 turns the
    /// cache off). A command on a cached aggregate skips the load and appends at the cached
    /// version; the store's exact version check refuses it if another process moved the
    /// stream on, and the retry loads it. `max_age` bounds how long an entry is used (none by
    /// default): with crypto-shredding done in *another* process, set it no longer than the
    /// codec's key cache TTL, so that no process decides on a forgotten subject's state for
    /// longer than it could still read its events.
    pub fn cache(mut self, entries: usize, max_age: Option<Duration>) -> Self {
        self.cache_entries = entries;
        self.cache_max_age = max_age;
        self
    }

    /// Applies a [`RepositoryConfig`](crate::config::RepositoryConfig): retries, and the
    /// snapshot policy into `snapshots` when it sets `snapshot_every`.
    pub fn config(
        mut self,
        config: &crate::config::RepositoryConfig,
        snapshots: Option<Arc<dyn SnapshotStore>>,
    ) -> Self {
        self = self
            .retries(
                config.max_retries,
                Duration::from_millis(config.retry_backoff_ms),
            )
            .command_window(config.command_window)
            .cache(
                config.cache_entries,
                config.cache_max_age_ms.map(Duration::from_millis),
            );
        if let (Some(every), Some(store)) = (config.snapshot_every, snapshots) {
            self = self.snapshots(store, SnapshotPolicy::Every(every));
        }
        self
    }

    /// The repository.
    pub fn build(self) -> Repository<A> {
        Repository {
            inner: Arc::new(self.settings),
            cache: AggregateCache::new(self.cache_entries, self.cache_max_age).map(Arc::new),
            _aggregate: PhantomData,
        }
    }
}

impl<A: Aggregate> Repository<A> {
    /// A repository on `events`, without snapshots, retrying conflicts 3 times.
    pub fn new(events: Arc<dyn EventStore>) -> Self {
        Self::builder(events).build()
    }

    /// A builder for a repository on `events`.
    pub fn builder(events: Arc<dyn EventStore>) -> RepositoryBuilder<A> {
        RepositoryBuilder {
            settings: Settings {
                events,
                snapshots: None,
                policy: SnapshotPolicy::Never,
                upcasters: Arc::new(Upcasters::new()),
                max_retries: 3,
                backoff: Backoff::new(Duration::from_millis(1)),
                command_window: DEFAULT_COMMAND_WINDOW,
                counters: Counters::default(),
                handles: Handles::register(A::TYPE),
            },
            cache_entries: crate::config::DEFAULT_CACHE_ENTRIES,
            cache_max_age: None,
            _aggregate: PhantomData,
        }
    }

    /// The event store.
    pub fn event_store(&self) -> &Arc<dyn EventStore> {
        &self.inner.events
    }

    /// Loads the aggregate `id`: its latest usable snapshot, then the events after it.
    /// An aggregate with no events loads as `A::default()` at version 0.
    pub async fn load(&self, id: &str) -> Result<Loaded<A>> {
        let stream = A::stream_id(id);
        let span = tracing::debug_span!("keel.load", aggregate = A::TYPE, stream = %stream,
            version = tracing::field::Empty);
        let loaded = self
            .load_stream(&stream, false)
            .instrument(span.clone())
            .await?
            .0;
        span.record("version", loaded.version);
        Ok(loaded)
    }

    /// Loads the stream with its command window. `need_window`: the caller will look for a
    /// command id, so a snapshot that kept no window is passed over.
    async fn load_stream(
        &self,
        stream: &StreamId,
        need_window: bool,
    ) -> Result<(Loaded<A>, CommandWindow)> {
        let started = Instant::now();
        let capacity = self.inner.command_window;
        let from_snapshot = match self.load_snapshot(stream).await {
            Some((loaded, Some(ids))) => Some((loaded, CommandWindow::from_ids(&ids, capacity))),
            Some((loaded, None)) if !need_window || capacity == 0 => {
                Some((loaded, CommandWindow::new(capacity)))
            }
            Some(_) => {
                tracing::debug!(stream = %stream, "snapshot without command ids; replaying the stream");
                None
            }
            None => None,
        };
        if from_snapshot.is_some() {
            self.inner
                .counters
                .snapshot_hits
                .fetch_add(1, Ordering::Relaxed);
        }
        let (mut loaded, mut window) = from_snapshot.unwrap_or_else(|| {
            let empty = Loaded {
                state: A::default(),
                version: 0,
            };
            (empty, CommandWindow::new(capacity))
        });
        let mut pages = self
            .inner
            .events
            .read_stream_pages(stream, loaded.version + 1);
        let mut replayed = 0u64;
        while let Some(page) = pages.try_next().await? {
            for recorded in page.iter() {
                if crate::ending::is_notice(&recorded.event_type) {
                    // Keel's own: the aggregate never sees it; a closing one ends the load.
                    let notice = crate::ending::StreamNotice::of(recorded).expect("a notice")?;
                    if let Some(status) = notice.closed_status() {
                        return Err(Error::StreamClosed {
                            stream: stream.clone(),
                            version: recorded.version,
                            status,
                        });
                    }
                    loaded.version = recorded.version;
                    continue;
                }
                window.record(recorded.metadata.command_id);
                let event: A::Event = self.inner.upcasters.decode(recorded)?;
                loaded.state.apply(&event);
                loaded.version = recorded.version;
            }
            replayed += page.len() as u64;
        }
        self.inner.counters.loads.fetch_add(1, Ordering::Relaxed);
        self.inner
            .counters
            .events_replayed
            .fetch_add(replayed, Ordering::Relaxed);
        self.inner.handles.loads.increment(1);
        self.inner.handles.events_replayed.increment(replayed);
        self.inner
            .handles
            .load_seconds
            .record(started.elapsed().as_secs_f64());
        Ok((loaded, window))
    }

    /// The latest snapshot, decoded, with the command ids it kept; `None` when there is none
    /// or it is unusable (wrong schema version, undecodable, store failure): the caller then
    /// replays from the start, which is always correct.
    async fn load_snapshot(
        &self,
        stream: &StreamId,
    ) -> Option<(Loaded<A>, Option<Vec<uuid::Uuid>>)> {
        let store = self.inner.snapshots.as_ref()?;
        let snapshot = match store.load_snapshot(stream).await {
            Ok(Some(s)) if s.schema_version == A::SNAPSHOT_VERSION => s,
            Ok(_) => return None,
            Err(e) => {
                tracing::warn!(stream = %stream, error = %e, "snapshot load failed; replaying the stream");
                return None;
            }
        };
        match serde_json::from_slice(&snapshot.payload) {
            Ok(state) => Some((
                Loaded {
                    state,
                    version: snapshot.version,
                },
                snapshot.recent_commands,
            )),
            Err(e) => {
                tracing::warn!(stream = %stream, version = snapshot.version, error = %e,
                    "snapshot does not decode; replaying the stream");
                None
            }
        }
    }

    /// Appends `events` to aggregate `id`'s stream if it is at `expected`.
    pub async fn save(
        &self,
        id: &str,
        expected: ExpectedVersion,
        events: &[A::Event],
        metadata: &Metadata,
    ) -> Result<AppendResult> {
        let stream = A::stream_id(id);
        // Written around the cache: its entry for the stream would only cost a conflict.
        if let Some(cache) = &self.cache {
            cache.forget(&stream);
        }
        self.append(&stream, expected, events, metadata).await
    }

    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[A::Event],
        metadata: &Metadata,
    ) -> Result<AppendResult> {
        // The effects' metadata is built once and moved into the last event, so stamping the
        // causation costs no clone more than the events need.
        let correlation_id = metadata.correlation_id;
        let mut effects = Some(metadata.for_effects());
        let mut encoded = Vec::with_capacity(events.len());
        for (i, event) in events.iter().enumerate() {
            let metadata = if i + 1 == events.len() {
                effects.take()
            } else {
                effects.clone()
            };
            encoded.push(NewEvent::encode(event, metadata.unwrap_or_default())?);
        }
        let span = tracing::debug_span!("keel.append", aggregate = A::TYPE, stream = %stream,
            expected = %expected, events = events.len(), version = tracing::field::Empty,
            event_type = events.first().map(crate::event::DomainEvent::event_type),
            correlation_id = correlation_id.map(tracing::field::display));
        match self
            .inner
            .events
            .append(stream, expected, encoded)
            .instrument(span.clone())
            .await
        {
            Ok(r) => {
                span.record("version", r.last_version);
                self.inner.counters.appends.fetch_add(1, Ordering::Relaxed);
                self.inner.handles.appends.increment(1);
                self.inner
                    .handles
                    .events_per_append
                    .record(events.len() as f64);
                Ok(r)
            }
            Err(e) => {
                if e.is_conflict() {
                    self.inner
                        .counters
                        .conflicts
                        .fetch_add(1, Ordering::Relaxed);
                    self.inner.handles.conflicts.increment(1);
                }
                Err(e)
            }
        }
    }

    /// Loads aggregate `id`, lets it handle `command`, and appends the events, retrying the
    /// whole cycle on a version conflict up to the configured number of times.
    ///
    /// A refused command gives [`Error::Rejected`] holding the aggregate's error.
    ///
    /// Inside a bus handler the events get the dispatch's metadata (its correlation id, and
    /// its id as causation id) without the handler passing it on.
    pub async fn execute(&self, id: &str, command: A::Command) -> Result<Executed<A::Event>>
    where
        A::Command: Clone,
    {
        let metadata = crate::bus::current_metadata().unwrap_or_default();
        self.execute_with(id, command, &metadata).await
    }

    /// [`execute`](Repository::execute) with metadata for the events (correlation and
    /// causation ids, user data).
    ///
    /// When the metadata carries a [`command_id`](Metadata::command_id) that one of the
    /// stream's last K commands carried (K: [`RepositoryBuilder::command_window`], 128 by
    /// default), the command was applied before and is not applied again; the result is then
    /// empty, at the stream's current version. Senders that may repeat a command (a saga after
    /// a crash) give it the same command id every time.
    ///
    /// The window is exact, however the aggregate was loaded (from the start, from a
    /// snapshot, which keeps the window): the last K commands that appended events. A command
    /// that appended no events (it was rejected, or had nothing to do) leaves no id, so a
    /// re-send of it is decided again on the state of that time; a command re-sent after K
    /// others is applied again.
    pub async fn execute_with(
        &self,
        id: &str,
        command: A::Command,
        metadata: &Metadata,
    ) -> Result<Executed<A::Event>>
    where
        A::Command: Clone,
    {
        let stream = A::stream_id(id);
        let mut attempt = 0;
        let mut delays = self.inner.backoff.delays();
        loop {
            match self.execute_once(&stream, command.clone(), metadata).await {
                Err(e) if e.is_conflict() && attempt < self.inner.max_retries => {
                    attempt += 1;
                    self.inner.counters.retries.fetch_add(1, Ordering::Relaxed);
                    self.inner.handles.retries.increment(1);
                    tracing::debug!(stream = %stream, attempt, "conflict; reloading and retrying");
                    tokio::time::sleep(delays.next().unwrap_or_default()).await;
                }
                other => return other,
            }
        }
    }

    /// The aggregate from the cache, or loaded; `true` when it came from the cache; the
    /// stream's cache slot, when it has one.
    async fn take_or_load(
        &self,
        stream: &StreamId,
        metadata: &Metadata,
    ) -> Result<(Entry<A>, bool, Option<Slot<A>>)> {
        let epoch = self.inner.events.cache_epoch();
        let mut slot = None;
        if let Some(cache) = &self.cache {
            let (entry, taken_from) = cache.take(stream, epoch);
            if let Some(entry) = entry {
                self.inner
                    .counters
                    .cache_hits
                    .fetch_add(1, Ordering::Relaxed);
                self.inner.handles.cache_hits.increment(1);
                return Ok((entry, true, taken_from));
            }
            slot = taken_from;
            self.inner
                .counters
                .cache_misses
                .fetch_add(1, Ordering::Relaxed);
            self.inner.handles.cache_misses.increment(1);
        }
        // With a cache, the window is always needed: the entry keeps it for later commands.
        let need_window = metadata.command_id.is_some() || self.cache.is_some();
        let (loaded, window) = self.load_stream(stream, need_window).await?;
        let entry = Entry {
            loaded,
            window,
            epoch,
            loaded_at: Instant::now(),
        };
        Ok((entry, false, slot))
    }

    /// Puts an aggregate whose state is known back in the cache (into `slot`, when the
    /// command took it from one).
    fn keep(&self, stream: &StreamId, slot: Option<&Slot<A>>, entry: Entry<A>) {
        if let Some(cache) = &self.cache {
            cache.keep(stream, slot, entry);
        }
    }

    async fn execute_once(
        &self,
        stream: &StreamId,
        command: A::Command,
        metadata: &Metadata,
    ) -> Result<Executed<A::Event>> {
        let (mut entry, cached, slot) = self.take_or_load(stream, metadata).await?;
        let slot = slot.as_ref();
        let version = entry.loaded.version;
        if metadata
            .command_id
            .is_some_and(|id| entry.window.contains(id))
        {
            tracing::debug!(stream = %stream, command_id = ?metadata.command_id, "command already applied; skipped");
            self.keep(stream, slot, entry);
            return Ok(Executed {
                events: Vec::new(),
                stream: stream.clone(),
                version,
            });
        }
        let events = match entry.loaded.state.handle(command) {
            Ok(events) => events,
            Err(e) => {
                // Refused: the state did not change.
                self.keep(stream, slot, entry);
                return Err(Error::Rejected {
                    aggregate: A::TYPE,
                    source: Box::new(e),
                });
            }
        };
        if events.is_empty() {
            self.keep(stream, slot, entry);
            return Ok(Executed {
                events,
                stream: stream.clone(),
                version,
            });
        }
        let expected = ExpectedVersion::from_version(version);
        // On any error the entry is dropped: a conflict means another writer moved the stream
        // on, and any other failure may leave the outcome unknown.
        let appended = match self.append(stream, expected, &events, metadata).await {
            Ok(appended) => appended,
            Err(e) => {
                if cached && e.is_conflict() {
                    self.inner
                        .counters
                        .cache_conflicts
                        .fetch_add(1, Ordering::Relaxed);
                    self.inner.handles.cache_conflicts.increment(1);
                }
                return Err(e);
            }
        };
        let snapshot_due = self
            .inner
            .policy
            .due(appended.first_version, appended.last_version);
        if snapshot_due || self.cache.is_some() {
            for event in &events {
                entry.loaded.state.apply(event);
            }
            entry.loaded.version = appended.last_version;
            entry.window.record(metadata.command_id);
            if snapshot_due {
                self.take_snapshot(
                    stream,
                    &entry.loaded.state,
                    &entry.window,
                    appended.last_version,
                )
                .await;
            }
            self.keep(stream, slot, entry);
        }
        Ok(Executed {
            events,
            stream: stream.clone(),
            version: appended.last_version,
        })
    }

    /// Drops every cached aggregate: the next command on each loads it from the store.
    pub fn clear_cache(&self) {
        if let Some(cache) = &self.cache {
            cache.clear();
        }
    }

    /// Writes a snapshot; a failure is logged, never returned: the events are committed and a
    /// missing snapshot only costs a longer replay.
    async fn take_snapshot(
        &self,
        stream: &StreamId,
        state: &A,
        window: &CommandWindow,
        version: u64,
    ) {
        let Some(store) = &self.inner.snapshots else {
            return;
        };
        let payload = match serde_json::to_vec(state) {
            Ok(p) => Bytes::from(p),
            Err(e) => {
                tracing::warn!(stream = %stream, error = %e, "snapshot does not encode; skipped");
                return;
            }
        };
        let snapshot = Snapshot {
            stream: stream.clone(),
            version,
            schema_version: A::SNAPSHOT_VERSION,
            payload,
            taken_at: now_millis(),
            recent_commands: Some(window.to_vec()),
        };
        match store.save_snapshot(snapshot).await {
            Ok(()) => {
                self.inner
                    .counters
                    .snapshots_taken
                    .fetch_add(1, Ordering::Relaxed);
                self.inner.handles.snapshots.increment(1);
            }
            Err(e) => tracing::warn!(stream = %stream, error = %e, "snapshot save failed"),
        }
    }

    /// The counters so far.
    pub fn metrics(&self) -> RepositoryMetrics {
        let c = &self.inner.counters;
        RepositoryMetrics {
            loads: c.loads.load(Ordering::Relaxed),
            events_replayed: c.events_replayed.load(Ordering::Relaxed),
            snapshot_hits: c.snapshot_hits.load(Ordering::Relaxed),
            snapshots_taken: c.snapshots_taken.load(Ordering::Relaxed),
            appends: c.appends.load(Ordering::Relaxed),
            conflicts: c.conflicts.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            cache_hits: c.cache_hits.load(Ordering::Relaxed),
            cache_misses: c.cache_misses.load(Ordering::Relaxed),
            cache_conflicts: c.cache_conflicts.load(Ordering::Relaxed),
            cache_evictions: self.cache.as_ref().map_or(0, |c| c.evictions()),
            cached: self.cache.as_ref().map_or(0, |c| c.len() as u64),
        }
    }
}
