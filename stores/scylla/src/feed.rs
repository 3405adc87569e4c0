//! The global feed: a leased feeder gives committed events dense positions.
//!
//! # How an event reaches the feed exactly once
//! 1. Before its LWT, every append writes a marker `(minute, at, marker, stream)` to `pending`
//!    (plain insert, one-hour TTL). The marker exists before the events can.
//! 2. One feeder per keyspace holds the `keel.feeder` lease. It learns of streams to look at
//!    from in-process wake-ups (fast path) and by scanning recent markers (appends of other
//!    processes, and writers that died after their commit). Each marked stream is looked at
//!    when the marker is first seen and once more after `settle_after`, by which time any
//!    append behind the marker has committed or failed for good.
//! 3. For each stream it reads the events after the stream's fed progress, then allocates
//!    positions with one LWT on `feed_meta` (`IF head = <last known>`) that also stores the
//!    plan (stream, versions, first position). Then it writes the feed rows and the progress
//!    rows, both idempotent.
//! 4. A feeder that finds a plan in `feed_meta` (its predecessor died mid-way) applies it
//!    again before anything else; a feeder whose LWT fails (another feeder moved the head)
//!    drops its caches and starts over from `feed_meta`. Positions are therefore allocated
//!    once, and each event is planned once.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{stream, StreamExt, TryStreamExt};
use keel::{Error, EventStream, Lease, RecordedEvent, Result, StreamId};
use scylla::value::CqlTimestamp;
use serde_json::json;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::error::{outcome_unknown, store_err};
use crate::events::{Lwt, PAGE};
use crate::{partition_batch, Shared};

/// The lease every feeder competes for.
pub(crate) const FEEDER_LEASE: &str = "keel.feeder";
/// Events planned in one allocation at most.
const MAX_PLAN: usize = 2_000;
/// Requests the feeder and the feed's maintenance reads keep in flight at once (a round's
/// stream reads, its feed-row and progress writes, status and reconciliation reads). Read one
/// after the other, a round of many one-event streams cost two round trips per stream.
pub(crate) const IN_FLIGHT: usize = 32;
/// The fewest events a stream may bring to a round when many streams share its plan.
const MIN_SHARE: usize = 64;
/// How far back a new leader looks for markers: their time to live.
const FULL_LOOKBACK_MS: i64 = 3_600_000;
/// The row (in `checkpoints`) where the leading feeder notes that it is alive.
const HEARTBEAT: &str = "keel.feeder.heartbeat";
/// How long the heartbeat row lives: five minutes less than a marker. A new leader that finds
/// no heartbeat reconciles the feed, since markers of appends made since the last one may have
/// expired. Both times to live are counted by the database's clocks, so the decision does not
/// depend on the clocks of the processes (the row's `updated_at`, for display, does).
pub(crate) const HEARTBEAT_TTL_SECS: i64 = FULL_LOOKBACK_MS / 1000 - 300;

/// Streams appended to by this process since the feeder last looked.
#[derive(Default)]
pub(crate) struct Wake {
    enabled: AtomicBool,
    /// Whether this process's feeder holds the lease (its appends are fed without markers).
    pub(crate) leading: AtomicBool,
    streams: Mutex<HashSet<StreamId>>,
    notify: Notify,
}

impl Wake {
    pub(crate) fn notify(&self, stream: StreamId) {
        if self.enabled.load(Ordering::Relaxed) {
            self.streams
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(stream);
            self.notify.notify_one();
        }
    }

    fn take(&self) -> HashSet<StreamId> {
        std::mem::take(&mut *self.streams.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether appends of this process are waiting for the feeder.
    fn pending(&self) -> bool {
        !self
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }
}

/// The next round's gather: doubled, up to `max`, when appends kept arriving while the last
/// round ran (the load is sustained, so fewer and larger rounds cost the node less); back to
/// `base` as soon as a round finds nothing waiting.
fn next_gather(current: Duration, busy: bool, base: Duration, max: Duration) -> Duration {
    if busy {
        (current * 2).clamp(base, max.max(base))
    } else {
        base
    }
}

/// The feed as an operator sees it: [`KeelScylla::feed_status`](crate::KeelScylla::feed_status).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedStatus {
    /// The last position allocated (events up to it are in the feed, or about to be).
    pub head: u64,
    /// The id of the feeder holding the lease, if any holds it.
    pub feeder: Option<String>,
    /// The lease's epoch: how many times the lease has been taken.
    pub epoch: i64,
    /// How long ago a leading feeder last noted that it was alive, by the clock of the process
    /// that noted it; `None` when none did in the last 55 minutes (the note lives that long).
    pub last_alive: Option<Duration>,
    /// Streams in a plan that was allocated but not yet fully written (a feeder died in the
    /// middle of a round; the next one finishes it first). Usually 0.
    pub unfinished_plan: usize,
    /// Streams the feed cannot carry past a damaged row (a null column, a version gap,
    /// metadata that does not decode): each names the stream, the version and why. The
    /// feed goes on for every other stream; this one waits until the row is repaired or an
    /// operator skips it ([`KeelScylla::skip_in_feed`](crate::KeelScylla::skip_in_feed),
    /// `keel feed skip`).
    pub stuck: Vec<keel::projection::DeadLetter>,
}

/// The dead-letter name under which the feeder records a stream it cannot carry past a
/// damaged row (`keel projections dead-letters keel.feed` lists them all, old ones too).
pub const FEED_DEAD_LETTERS: &str = "keel.feed";

/// Whether a stream read failed for that stream's own rows: the feed goes on without it.
fn is_stream_damage(e: &Error) -> Option<(u64, String)> {
    match e {
        Error::Damaged {
            version, reason, ..
        } => Some((*version, reason.clone())),
        Error::Decode {
            version, reason, ..
        } => Some((*version, reason.clone())),
        _ => None,
    }
}

/// A planned range: `stream` versions `first..=last` at positions from `position`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Range {
    stream: String,
    first: i64,
    last: i64,
    position: i64,
}

pub(crate) struct FeederConfig {
    pub(crate) id: String,
    pub(crate) lease_ttl: Duration,
    pub(crate) interval: Duration,
    pub(crate) settle_after: Duration,
    pub(crate) gather: Duration,
    pub(crate) gather_max: Duration,
    pub(crate) reconcile_after_outage: bool,
}

/// The running feeder task of one store.
pub(crate) struct Feeder {
    task: tokio::task::JoinHandle<()>,
    leader: Arc<AtomicBool>,
    lease: Arc<Mutex<Option<Lease>>>,
    shared: Arc<Shared>,
}

impl Drop for Feeder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Feeder {
    pub(crate) fn start(shared: Arc<Shared>, config: FeederConfig) -> Feeder {
        shared.wake.enabled.store(true, Ordering::Relaxed);
        let leader = Arc::new(AtomicBool::new(false));
        let lease = Arc::new(Mutex::new(None));
        let mut state = FeederState {
            shared: shared.clone(),
            gather: config.gather,
            config,
            leader: leader.clone(),
            lease: lease.clone(),
            renewed: Instant::now(),
            meta: None,
            progress: HashMap::new(),
            seen: HashMap::new(),
            scanned_full: false,
            last_scan: None,
            reconciling: None,
        };
        let task = tokio::spawn(async move { state.run().await });
        Feeder {
            task,
            leader,
            lease,
            shared,
        }
    }

    pub(crate) fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    pub(crate) async fn shutdown(&self) {
        self.task.abort();
        let lease = self.lease.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.leader.store(false, Ordering::Relaxed);
        self.shared.wake.leading.store(false, Ordering::Relaxed);
        if let Some(lease) = lease {
            if let Err(e) = self.shared.release_lease(&lease).await {
                tracing::warn!(error = %e, "feeder lease release failed; it expires by itself");
            }
        }
    }
}

struct FeederState {
    shared: Arc<Shared>,
    config: FeederConfig,
    leader: Arc<AtomicBool>,
    lease: Arc<Mutex<Option<Lease>>>,
    renewed: Instant,
    /// The feed head as of the last successful read or allocation (`None`: read it again).
    meta: Option<i64>,
    /// Last fed version per stream, as far as this feeder knows.
    progress: HashMap<String, i64>,
    /// Markers seen: id -> (at, stream, rechecked after settling).
    seen: HashMap<Uuid, (i64, String, bool)>,
    scanned_full: bool,
    /// When markers were last scanned: at most once per `interval`, however often appends of
    /// this process wake the feeder.
    last_scan: Option<Instant>,
    /// How long the next wake-up waits for more appends (see [`next_gather`]).
    gather: Duration,
    /// A reconciliation this feeder started, stopped with it.
    reconciling: Option<Background>,
}

/// A task that stops when this is dropped: background work of the feeder ends with the feeder.
struct Background(tokio::task::AbortHandle);

impl Drop for Background {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl FeederState {
    async fn run(&mut self) {
        loop {
            if !self.hold_lease().await {
                self.shared.wake.take();
                let pause = (self.config.lease_ttl / 3).max(self.config.interval);
                tokio::time::sleep(pause).await;
                continue;
            }
            let mut candidates: HashSet<String> = self
                .shared
                .wake
                .take()
                .into_iter()
                .map(|s| s.as_str().to_owned())
                .collect();
            // This process's appends arrive as wake-ups; markers are for everyone else's
            // (other processes, dead writers), whose latency the interval bounds anyway.
            if self
                .last_scan
                .is_none_or(|at| at.elapsed() >= self.config.interval)
            {
                self.last_scan = Some(Instant::now());
                // Stuck streams are tried again as often: a repaired row goes on at once.
                candidates.extend(self.shared.stuck_streams());
                match self.scan_markers().await {
                    Ok(found) => candidates.extend(found),
                    Err(e) => tracing::warn!(error = %e, "feeder could not scan markers"),
                }
            }
            let mut full = false;
            if !candidates.is_empty() {
                match self.publish(candidates).await {
                    Ok(filled) => full = filled,
                    Err(e) => {
                        tracing::warn!(error = %e, "feeder round failed; starting over from feed_meta");
                        self.reset();
                    }
                }
            }
            if full {
                // Events are known to be waiting beyond a full plan: no reason to wait.
                continue;
            }
            self.gather = next_gather(
                self.gather,
                self.shared.wake.pending(),
                self.config.gather,
                self.config.gather_max,
            );
            tokio::select! {
                _ = self.shared.wake.notify.notified() => {
                    // Let a burst of appends gather so one allocation covers them all.
                    tokio::time::sleep(self.gather).await;
                }
                _ = tokio::time::sleep(self.config.interval) => {}
            }
        }
    }

    fn reset(&mut self) {
        self.meta = None;
        self.progress.clear();
    }

    fn set_lease(&mut self, lease: Option<Lease>) {
        // A feeder that takes (or loses) the lease scans markers at its next round.
        self.last_scan = None;
        self.leader.store(lease.is_some(), Ordering::Relaxed);
        self.shared
            .wake
            .leading
            .store(lease.is_some(), Ordering::Relaxed);
        *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = lease;
    }

    /// Takes or renews the feeder lease; `true` while this feeder is the leader.
    async fn hold_lease(&mut self) -> bool {
        let current = self.lease.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match current {
            Some(_) if self.renewed.elapsed() < self.config.lease_ttl / 3 => true,
            Some(lease) => match self.shared.renew_lease(&lease).await {
                Ok(true) => {
                    self.renewed = Instant::now();
                    self.beat().await;
                    true
                }
                Ok(false) | Err(_) => {
                    tracing::warn!("feeder lost its lease");
                    self.set_lease(None);
                    self.reset();
                    self.seen.clear();
                    self.scanned_full = false;
                    false
                }
            },
            None => match self
                .shared
                .acquire_lease(FEEDER_LEASE, &self.config.id, self.config.lease_ttl)
                .await
            {
                Ok(Some(lease)) => {
                    tracing::info!(epoch = lease.epoch, "feeder took the lease");
                    self.renewed = Instant::now();
                    self.set_lease(Some(lease));
                    self.reset();
                    if self.config.reconcile_after_outage {
                        self.reconcile_after_outage().await;
                    }
                    self.beat().await;
                    true
                }
                Ok(None) => false,
                Err(e) => {
                    tracing::debug!(error = %e, "feeder lease attempt failed");
                    false
                }
            },
        }
    }

    /// Notes that the leading feeder is alive (with the feed head it knows).
    async fn beat(&self) {
        let now = keel::event::now_millis();
        let head = self.meta.unwrap_or(0);
        if let Err(e) = self
            .shared
            .session
            .execute_unpaged(
                &self.shared.st.heartbeat_write,
                (HEARTBEAT, head, CqlTimestamp(now)),
            )
            .await
        {
            tracing::debug!(error = %e, "feeder heartbeat not written");
        }
    }

    /// When no feeder was alive for about as long as markers live (or none ever noted it),
    /// appends of that time may have lost their markers: reconcile the feed in the background,
    /// which marks every stream that is behind for this feeder.
    async fn reconcile_after_outage(&mut self) {
        match self.shared.feeder_last_alive().await {
            Ok(Some(_)) => return,
            Ok(None) => tracing::info!(
                "no feeder noted that it was alive in the last 55 minutes; reconciling the feed"
            ),
            // Not knowing is no reason to risk leaving events out: reconcile.
            Err(e) => {
                tracing::warn!(error = %e, "feeder heartbeat unreadable; reconciling the feed")
            }
        }
        let shared = self.shared.clone();
        let task = tokio::spawn(async move {
            match shared.reconcile_feed().await {
                Ok(found) if !found.lagging.is_empty() => tracing::warn!(
                    streams = found.lagging.len(),
                    events = found.unfed_events,
                    "events missing from the feed after a feeder outage; publishing them"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    error = %e,
                    "feed reconciliation failed; run `keel feed reconcile`"
                ),
            }
        });
        self.reconciling = Some(Background(task.abort_handle()));
    }

    /// Streams whose markers are new, or have just settled.
    async fn scan_markers(&mut self) -> Result<HashSet<String>> {
        let now = keel::event::now_millis();
        let settle = self.config.settle_after.as_millis() as i64;
        let lookback = if self.scanned_full {
            settle + 5_000
        } else {
            FULL_LOOKBACK_MS
        };
        let since = now - lookback;
        let mut found = HashSet::new();
        for minute in (since / 60_000)..=(now / 60_000) {
            for (at, marker, stream) in self.shared.markers_in_minute(minute, since).await? {
                self.seen.entry(marker).or_insert_with(|| {
                    found.insert(stream.clone());
                    (at, stream, false)
                });
            }
        }
        self.scanned_full = true;
        for (at, stream, settled) in self.seen.values_mut() {
            if !*settled && *at <= now - settle {
                *settled = true;
                found.insert(stream.clone());
            }
        }
        self.seen
            .retain(|_, (at, _, settled)| !*settled || *at > now - settle - 60_000);
        Ok(found)
    }

    /// The feed head from `feed_meta`, after finishing any plan left there.
    async fn load_meta(&mut self) -> Result<i64> {
        if let Some(head) = self.meta {
            return Ok(head);
        }
        let (head, plan) = match self.shared.read_meta().await? {
            Some(meta) => meta,
            None => {
                self.shared
                    .session
                    .execute_unpaged(&self.shared.st.meta_init, ())
                    .await
                    .map_err(|e| store_err("create feed_meta", e))?;
                self.shared.read_meta().await?.unwrap_or((0, Vec::new()))
            }
        };
        if !plan.is_empty() {
            let events = self.read_plan_events(&plan).await?;
            self.write_plan(&plan, &events).await?;
        }
        self.meta = Some(head);
        Ok(head)
    }

    /// The events of a recorded plan, read [`IN_FLIGHT`] streams at a time.
    async fn read_plan_events(&self, plan: &[Range]) -> Result<Vec<Vec<RecordedEvent>>> {
        // Owned futures (a stream name and the shared state each): a future that borrows
        // would not be `Send` for every lifetime, which the spawned feeder task needs.
        stream::iter(plan.to_vec())
            .map(|range| {
                let shared = self.shared.clone();
                async move {
                    let wanted = (range.last - range.first + 1) as usize;
                    let events: Vec<RecordedEvent> = shared
                        .events_from(&StreamId::new(&range.stream), range.first as u64, wanted)
                        .try_collect()
                        .await?;
                    if events.len() != wanted {
                        return Err(store_err(
                            "replay feed plan",
                            std::io::Error::other(format!(
                                "stream `{}` lacks versions {}..={}",
                                range.stream, range.first, range.last
                            )),
                        ));
                    }
                    Ok(events)
                }
            })
            .buffered(IN_FLIGHT)
            .try_collect()
            .await
    }

    /// Writes the feed rows and progress of a plan. Idempotent: the same plan always writes
    /// the same rows.
    async fn write_plan(&mut self, plan: &[Range], events: &[Vec<RecordedEvent>]) -> Result<()> {
        let rows: Vec<(i64, RecordedEvent)> = plan
            .iter()
            .zip(events)
            .flat_map(|(range, events)| {
                events
                    .iter()
                    .enumerate()
                    .map(move |(i, e)| (range.position + i as i64, e.clone()))
            })
            .collect();
        let writer = self.shared.clone();
        stream::iter(feed_batches(self.shared.feed_bucket_size, rows))
            .map(move |batch| {
                let shared = writer.clone();
                async move { shared.write_feed_rows(&batch).await }
            })
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await?;
        let recorder = self.shared.clone();
        let progress: Vec<(String, i64)> =
            plan.iter().map(|r| (r.stream.clone(), r.last)).collect();
        stream::iter(progress)
            .map(move |(stream, last)| {
                let shared = recorder.clone();
                async move { shared.record_progress(&stream, last).await }
            })
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await?;
        for range in plan {
            self.progress.insert(range.stream.clone(), range.last);
        }
        let shared = &self.shared;
        let fed: usize = events.iter().map(Vec::len).sum();
        shared
            .counters
            .fed_events
            .fetch_add(fed as u64, Ordering::Relaxed);
        metrics::counter!("keel_scylla_fed_events_total").increment(fed as u64);
        Ok(())
    }

    /// One round: plans and publishes the new events of `candidates`, up to [`MAX_PLAN`].
    /// `true` when the plan was full and published, so that more events wait (their streams
    /// are back among the wake-ups).
    async fn publish(&mut self, candidates: HashSet<String>) -> Result<bool> {
        let head = self.load_meta().await?;
        let mut candidates: Vec<String> = candidates.into_iter().collect();
        candidates.sort();
        let (found, planned) = self.gather_new_events(&candidates).await?;
        let mut plan = Vec::new();
        let mut events = Vec::new();
        let mut next = head + 1;
        let stuck: HashSet<String> = self.shared.stuck_streams().into_iter().collect();
        for (stream, fed, new) in found {
            if stuck.contains(&stream) {
                // Its progress is read again next time: an operator may skip the damaged
                // version in the meantime.
                self.progress.remove(&stream);
                continue;
            }
            self.progress.insert(stream.clone(), fed);
            let Some(last) = new.last().map(|e| e.version as i64) else {
                continue;
            };
            plan.push(Range {
                stream,
                first: fed + 1,
                last,
                position: next,
            });
            next += new.len() as i64;
            events.push(new);
        }
        if plan.is_empty() {
            return Ok(false);
        }
        let new_head = next - 1;
        let blob = serde_json::to_vec(&json!(plan)).map_err(|e| Error::Encode {
            what: "feed plan".into(),
            reason: e.to_string(),
        })?;
        let allocated = match self
            .shared
            .session
            .execute_unpaged(&self.shared.st.meta_allocate, (new_head, &blob, head))
            .await
        {
            Ok(result) => {
                Lwt::from_result(result)
                    .map_err(|r| store_err("allocate feed positions", std::io::Error::other(r)))?
                    .applied
            }
            Err(e) if outcome_unknown(&e) => {
                // Read back: if the head and plan are ours, the allocation went through.
                matches!(self.shared.read_meta().await?, Some((h, p)) if h == new_head && p == plan)
            }
            Err(e) => return Err(store_err("allocate feed positions", e)),
        };
        if !allocated {
            // Another feeder moved the head: start over from what it left.
            self.reset();
            return Ok(false);
        }
        self.meta = Some(new_head);
        self.write_plan(&plan, &events).await?;
        Ok(planned >= MAX_PLAN)
    }

    /// The fed progress and new events of `candidates` (in their order), up to [`MAX_PLAN`]
    /// events in all, and how many that is; see [`gather`]. Streams with events beyond the
    /// plan, and candidates not looked at, are woken for the next round.
    async fn gather_new_events(&self, candidates: &[String]) -> Result<(Vec<Found>, usize)> {
        let shared = self.shared.clone();
        let read = move |stream: String, after: Option<i64>, max: usize| {
            // Owned (a name and the shared state): a borrowing future would not be `Send`
            // for every lifetime, which the spawned feeder task needs.
            let shared = shared.clone();
            async move {
                let after = match after {
                    Some(version) => version,
                    None => shared.fed_version(&stream).await?,
                };
                let read: Result<Vec<RecordedEvent>> = shared
                    .events_from(&StreamId::new(&stream), after as u64 + 1, max)
                    .try_collect()
                    .await;
                match read {
                    Ok(new) => {
                        shared.unstuck(&stream);
                        Ok((after, new))
                    }
                    Err(e) => match is_stream_damage(&e) {
                        // One bad row holds its own stream back, never the others.
                        Some((version, reason)) => {
                            shared.stuck_at(&stream, version, reason).await;
                            Ok((after, Vec::new()))
                        }
                        None => Err(e),
                    },
                }
            }
        };
        let round = gather(candidates, |s| self.progress.get(s).copied(), read).await?;
        for stream in &round.waiting {
            self.shared.wake.notify(StreamId::new(stream));
        }
        Ok((round.found, round.planned))
    }
}

/// A stream looked at in a round: its name, its fed progress, and its new events read.
type Found = (String, i64, Vec<RecordedEvent>);

/// What [`gather`] read for a round.
struct Round {
    /// The streams looked at, in candidate order.
    found: Vec<Found>,
    /// Events in `found`: at most [`MAX_PLAN`].
    planned: usize,
    /// Streams that may have events beyond what was read, and candidates not looked at.
    waiting: Vec<String>,
}

/// Reads the new events of `candidates` for one round: `read(stream, after, max)` gives a
/// stream's progress (`after`, or read when `None`) and at most `max` events after it.
///
/// Streams are read [`IN_FLIGHT`] at a time: one after the other, a round of many
/// one-event streams cost two round trips per stream. Each stream first brings at most an
/// equal share of the plan, so reads stay bounded when many streams have long backlogs; the
/// streams that filled their share then share what is left of the plan, and so on.
async fn gather<R, F>(
    candidates: &[String],
    known: impl Fn(&str) -> Option<i64>,
    read: R,
) -> Result<Round>
where
    R: Fn(String, Option<i64>, usize) -> F,
    F: std::future::Future<Output = Result<(i64, Vec<RecordedEvent>)>>,
{
    let mut found: Vec<Found> = Vec::new();
    let mut planned = 0usize;
    // Pass one reads every candidate from its progress; later passes read the streams that
    // filled their share (indices into `found`) from where they stopped.
    let mut full_share: Vec<usize> = Vec::new();
    let mut looked_at = 0;
    let mut first_pass = true;
    while planned < MAX_PLAN && (first_pass || !full_share.is_empty()) {
        let readers = if first_pass {
            candidates.len()
        } else {
            full_share.len()
        };
        let share = ((MAX_PLAN - planned) / readers.max(1)).max(MIN_SHARE);
        let reads: Vec<(String, Option<i64>)> = if first_pass {
            candidates.iter().map(|s| (s.clone(), known(s))).collect()
        } else {
            full_share
                .iter()
                .map(|&i| {
                    let (stream, fed, new) = &found[i];
                    let last = new.last().map_or(*fed, |e| e.version as i64);
                    (stream.clone(), Some(last))
                })
                .collect()
        };
        let mut reads = stream::iter(reads)
            .map(|(stream, after)| read(stream, after, share))
            .buffered(IN_FLIGHT);
        let mut filled = Vec::new();
        let mut consumed = 0;
        while planned < MAX_PLAN {
            let Some(result) = reads.next().await else {
                break;
            };
            let (after, mut new) = result?;
            // A stream that filled its share, or did not fit, may have more.
            let more = new.len() == share || new.len() > MAX_PLAN - planned;
            new.truncate(MAX_PLAN - planned);
            planned += new.len();
            let index = if first_pass {
                found.push((candidates[consumed].clone(), after, Vec::new()));
                found.len() - 1
            } else {
                full_share[consumed]
            };
            consumed += 1;
            if more {
                filled.push(index);
            }
            found[index].2.append(&mut new);
        }
        if first_pass {
            looked_at = consumed;
        } else {
            // Those not read again this pass (the plan filled up) still have more.
            filled.extend_from_slice(&full_share[consumed..]);
        }
        full_share = filled;
        first_pass = false;
    }
    let waiting = full_share
        .iter()
        .map(|&i| found[i].0.clone())
        .chain(candidates[looked_at..].iter().cloned())
        .collect();
    Ok(Round {
        found,
        planned,
        waiting,
    })
}

/// Feed rows per write: a batch stays in one feed partition and under Cassandra's default
/// batch size warning (5 KiB; ScyllaDB warns at 128 KiB).
const FEED_BATCH_BYTES: usize = 4 * 1024;
const FEED_BATCH_ROWS: usize = 32;

/// The rows of a plan cut into writes: consecutive positions of one feed partition, up to
/// [`FEED_BATCH_ROWS`] rows and about [`FEED_BATCH_BYTES`] of payload and metadata.
fn feed_batches(
    feed_bucket_size: i64,
    rows: Vec<(i64, RecordedEvent)>,
) -> Vec<Vec<(i64, RecordedEvent)>> {
    let mut batches: Vec<Vec<(i64, RecordedEvent)>> = Vec::new();
    let mut bytes = 0;
    for (position, event) in rows {
        let size = row_size(&event);
        let fits = batches.last().is_some_and(|b| {
            b.len() < FEED_BATCH_ROWS
                && bytes + size <= FEED_BATCH_BYTES
                && b[0].0 / feed_bucket_size == position / feed_bucket_size
        });
        if !fits {
            batches.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        if let Some(batch) = batches.last_mut() {
            batch.push((position, event));
        }
    }
    batches
}

/// About how many bytes a feed row takes in a batch: its blobs and texts, its metadata as
/// JSON (three ids and the user pairs), and the fixed columns.
fn row_size(event: &RecordedEvent) -> usize {
    let metadata = if event.metadata.is_empty() {
        0
    } else {
        let user: usize = event
            .metadata
            .user
            .iter()
            .map(|(k, v)| k.len() + v.len() + 8)
            .sum();
        160 + user
    };
    event.payload.len() + event.event_type.len() + event.stream.as_str().len() + metadata + 64
}

impl crate::KeelScylla {
    /// The feed's head, who feeds it, when a feeder was last alive, and whether a plan is left
    /// unfinished: what `keel feed status` prints.
    pub async fn feed_status(&self) -> Result<FeedStatus> {
        let shared = &self.shared;
        let (head, plan) = shared.read_meta().await?.unwrap_or((0, Vec::new()));
        let (feeder, epoch) = shared.read_lease(FEEDER_LEASE).await?.unwrap_or((None, 0));
        let now = keel::event::now_millis();
        let last_alive = shared
            .feeder_last_alive()
            .await?
            .map(|at| Duration::from_millis((now - at).max(0) as u64));
        // A plan stays recorded after it was written; it is unfinished while the progress of
        // one of its streams is short of it.
        let short: Vec<bool> = stream::iter(&plan)
            .map(|range| async move {
                Ok::<_, Error>(shared.fed_version(&range.stream).await? < range.last)
            })
            .buffer_unordered(IN_FLIGHT)
            .try_collect()
            .await?;
        let unfinished_plan = short.into_iter().filter(|&s| s).count();
        Ok(FeedStatus {
            head: head.max(0) as u64,
            feeder,
            epoch,
            last_alive,
            unfinished_plan,
            stuck: self.stuck_in_feed().await?,
        })
    }

    /// The streams the feed cannot carry past a damaged row, as recorded by any process's
    /// feeder, without those repaired or skipped since (their fed progress reached the
    /// version).
    pub async fn stuck_in_feed(&self) -> Result<Vec<keel::projection::DeadLetter>> {
        use keel::projection::ProjectionStore;
        let mut latest: HashMap<(String, u64), keel::projection::DeadLetter> = HashMap::new();
        for letter in self.dead_letters(FEED_DEAD_LETTERS).await? {
            latest.insert((letter.event.stream.clone(), letter.event.version), letter);
        }
        let mut stuck = Vec::new();
        for ((stream, version), letter) in latest {
            if self.shared.fed_version(&stream).await? < version as i64 {
                stuck.push(letter);
            }
        }
        stuck.sort_by(|a, b| {
            (&a.event.stream, a.event.version).cmp(&(&b.event.stream, b.event.version))
        });
        Ok(stuck)
    }

    /// Lets the feed go past version `version` of `stream`, which it cannot carry (see
    /// [`FeedStatus::stuck`]): the feed will never hold that event, and carries on with the
    /// stream's next version. For an operator, once repairing the row is out of the question.
    /// Refused unless the feed holds the stream exactly up to `version - 1`.
    pub async fn skip_in_feed(&self, stream: &StreamId, version: u64) -> Result<()> {
        let fed = self.shared.fed_version(stream.as_str()).await?;
        if fed != version as i64 - 1 {
            return Err(Error::Invalid {
                type_name: "skip_in_feed",
                reason: format!(
                    "the feed holds `{stream}` up to version {fed}: only version {} can be skipped",
                    fed + 1
                ),
            });
        }
        self.shared
            .record_progress(stream.as_str(), version as i64)
            .await?;
        tracing::warn!(stream = %stream, version, "operator skipped a version in the feed");
        self.shared.unstuck(stream.as_str());
        self.shared.wake.notify(stream.clone());
        Ok(())
    }
}

impl Shared {
    /// Notes that `stream` cannot be fed past `version`; the first time in this process it
    /// is also logged and recorded as a dead letter of the feed.
    async fn stuck_at(&self, stream: &str, version: u64, reason: String) {
        let new = {
            let mut stuck = self.stuck.lock().unwrap_or_else(|p| p.into_inner());
            stuck.insert(stream.to_owned(), (version, reason.clone()))
                != Some((version, reason.clone()))
        };
        if !new {
            return;
        }
        tracing::error!(stream, version, reason = %reason, "the feed cannot carry this stream past a damaged row; other streams go on");
        metrics::counter!("keel_scylla_feed_stuck_total").increment(1);
        let letter = keel::projection::DeadLetter {
            projection: FEED_DEAD_LETTERS.to_owned(),
            event: keel::projection::FailedEvent {
                stream: stream.to_owned(),
                version,
                event_type: String::new(),
                position: 0,
            },
            error: reason,
            at: keel::event::now_millis(),
        };
        let blob = match serde_json::to_vec(&letter) {
            Ok(blob) => blob,
            Err(_) => return,
        };
        if let Err(e) = self
            .session
            .execute_unpaged(
                &self.st.add_dead_letter,
                (FEED_DEAD_LETTERS, letter.at, Uuid::new_v4(), blob),
            )
            .await
        {
            tracing::warn!(stream, error = %e, "could not record the stuck stream");
        }
    }

    fn unstuck(&self, stream: &str) {
        self.stuck
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(stream);
    }

    pub(crate) fn stuck_streams(&self) -> Vec<String> {
        self.stuck
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

impl Shared {
    /// When the leading feeder last noted that it was alive (ms since the epoch, by its clock),
    /// if it did in the last 55 minutes.
    async fn feeder_last_alive(&self) -> Result<Option<i64>> {
        let op = "read the feeder heartbeat";
        let rows = self
            .select(&self.st.heartbeat_read, (HEARTBEAT,), op)
            .await?;
        Ok(rows
            .maybe_first_row::<(Option<CqlTimestamp>,)>()
            .map_err(|e| store_err(op, e))?
            .and_then(|(at,)| at)
            .map(|at| at.0))
    }

    /// The streams of the last hour's markers whose committed events are not all in the feed
    /// (looking at up to `cap` streams), and how many events they lack. Without a feeder,
    /// these are appends waiting for one.
    pub(crate) async fn unfed_marked_streams(&self, cap: usize) -> Result<(usize, u64)> {
        let now = keel::event::now_millis();
        let since = now - FULL_LOOKBACK_MS;
        let mut streams = HashSet::new();
        'scan: for minute in (since / 60_000)..=(now / 60_000) {
            for (_, _, stream) in self.markers_in_minute(minute, since).await? {
                streams.insert(stream);
                if streams.len() >= cap {
                    break 'scan;
                }
            }
        }
        let behind: Vec<i64> = stream::iter(streams)
            .map(|s| async move {
                let head = self.current_version(&s).await?.unwrap_or(0) as i64;
                Ok::<_, Error>(head - self.fed_version(&s).await?)
            })
            .buffer_unordered(IN_FLIGHT)
            .try_filter(|&lag| futures::future::ready(lag > 0))
            .try_collect()
            .await?;
        Ok((behind.len(), behind.iter().map(|&lag| lag as u64).sum()))
    }

    /// The markers `(at, marker, stream)` of one minute's partition written at `since` or later.
    async fn markers_in_minute(&self, minute: i64, since: i64) -> Result<Vec<(i64, Uuid, String)>> {
        let op = "scan feed markers";
        let rows = self
            .select(&self.st.scan_markers, (minute, since), op)
            .await?;
        rows.rows::<(i64, Uuid, String)>()
            .map_err(|e| store_err(op, e))?
            .map(|row| row.map_err(|e| store_err(op, e)))
            .collect()
    }

    /// The last version of `stream` in the feed (0: none).
    pub(crate) async fn fed_version(&self, stream: &str) -> Result<i64> {
        let op = || format!("read feed progress of `{stream}`");
        let rows = self.select(&self.st.read_progress, (stream,), op()).await?;
        Ok(rows
            .maybe_first_row::<(i64,)>()
            .map_err(|e| store_err(op(), e))?
            .map_or(0, |(v,)| v))
    }

    fn feed_bucket(&self, position: i64) -> i64 {
        position / self.feed_bucket_size
    }

    async fn read_meta(&self) -> Result<Option<(i64, Vec<Range>)>> {
        let rows = self
            .select(&self.st.meta_read, (), "read feed_meta")
            .await?;
        let Some((head, plan)) = rows
            .maybe_first_row::<(Option<i64>, Option<Vec<u8>>)>()
            .map_err(|e| store_err("read feed_meta", e))?
        else {
            return Ok(None);
        };
        let plan = match plan {
            Some(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| store_err("decode feed plan", e))?
            }
            None => Vec::new(),
        };
        Ok(Some((head.unwrap_or(0), plan)))
    }

    /// Records that `stream` is fed up to `last`. The newest row wins (reads take the highest
    /// version), so a late duplicate write never moves progress back; the same one-partition
    /// batch drops the rows below it with a range delete, so a long-lived stream keeps one row
    /// instead of one per feeder round.
    async fn record_progress(&self, stream: &str, last: i64) -> Result<()> {
        let batch = partition_batch([&self.st.insert_progress, &self.st.prune_progress]);
        self.session
            .batch(&batch, ((stream, last), (stream, last)))
            .await
            .map_err(|e| store_err(format!("record feed progress of `{stream}`"), e))?;
        Ok(())
    }

    /// Writes feed rows of one feed partition: one insert, or one single-partition unlogged
    /// batch (one request, applied together) for several.
    async fn write_feed_rows(&self, rows: &[(i64, RecordedEvent)]) -> Result<()> {
        let mut values = Vec::with_capacity(rows.len());
        for (position, e) in rows {
            let metadata = if e.metadata.is_empty() {
                None
            } else {
                Some(
                    serde_json::to_vec(&*e.metadata).map_err(|err| Error::Encode {
                        what: "event metadata".into(),
                        reason: err.to_string(),
                    })?,
                )
            };
            values.push((
                self.feed_bucket(*position),
                *position,
                e.stream.as_str(),
                e.version as i64,
                e.event_id,
                &*e.event_type,
                e.schema_version as i32,
                &e.payload[..],
                metadata,
                CqlTimestamp(e.recorded_at),
            ));
        }
        let first = rows.first().map_or(0, |(p, _)| *p);
        let op = || {
            format!(
                "write feed positions {first}..={}",
                first + rows.len() as i64 - 1
            )
        };
        if let [row] = values.as_slice() {
            self.session
                .execute_unpaged(&self.st.insert_feed, row)
                .await
                .map_err(|err| store_err(op(), err))?;
            return Ok(());
        }
        let batch = partition_batch(std::iter::repeat_n(&self.st.insert_feed, values.len()));
        self.session
            .batch(&batch, values)
            .await
            .map_err(|err| store_err(op(), err))?;
        Ok(())
    }

    /// The head of the feed: the last allocated position (a plain read: an estimate for lag
    /// and progress, never used to allocate).
    pub(crate) async fn feed_head(&self) -> Result<u64> {
        let rows = self
            .select(&self.st.meta_head, (), "read feed head")
            .await?;
        let head = rows
            .maybe_first_row::<(Option<i64>,)>()
            .map_err(|e| store_err("read feed head", e))?
            .and_then(|(h,)| h);
        Ok(head.unwrap_or(0).max(0) as u64)
    }

    /// The feed rows at positions `start..end` (one feed bucket), up to the first gap, and the
    /// error of the first row that does not decode: the events before it are read.
    async fn feed_range(
        &self,
        start: i64,
        end: i64,
    ) -> Result<(Vec<RecordedEvent>, Option<Error>)> {
        let rows = self
            .select(
                &self.st.read_feed,
                (self.feed_bucket(start), start, end),
                "read feed",
            )
            .await?;
        let mut page = Vec::new();
        type FeedRow = (
            i64,
            String,
            i64,
            Option<uuid::Uuid>,
            Option<String>,
            Option<i32>,
            Option<Bytes>,
            Option<Vec<u8>>,
            Option<CqlTimestamp>,
        );
        let typed = rows
            .rows::<FeedRow>()
            .map_err(|e| store_err("read feed", e))?;
        for (expected, row) in (start..).zip(typed) {
            let (
                position,
                stream,
                version,
                event_id,
                event_type,
                schema_version,
                payload,
                metadata,
                at,
            ) = row.map_err(|e| store_err("read feed", e))?;
            if position != expected {
                break; // allocated but not written yet: the feed ends here for now
            }
            let stream = StreamId::from(stream);
            let decoded = self.decode_row(
                &stream,
                Some(position as u64),
                (
                    version,
                    event_id,
                    event_type,
                    schema_version,
                    payload,
                    metadata,
                    at,
                ),
            );
            match decoded {
                Ok(event) => page.push(event),
                Err(e) => return Ok((page, Some(e))),
            }
        }
        Ok((page, None))
    }

    /// The feed from `from`, page by page, up to the first position not written yet, or up
    /// to a row that does not decode: every event before it, then its error.
    ///
    /// Pages end on multiples of the page size, and a feed bucket's size is a multiple of it,
    /// so no page crosses a bucket and the next page's range is known before this one arrives:
    /// it is fetched while this one is consumed.
    pub(crate) fn feed_from(&self, from: u64) -> EventStream<'_> {
        let page = PAGE as i64;
        let first = from.max(1) as i64;
        let ranges = (0..).map(move |k: i64| {
            let start = if k == 0 {
                first
            } else {
                (first / page + k) * page
            };
            (start, (first / page + k + 1) * page)
        });
        let pages = stream::iter(ranges)
            .map(move |(start, end)| async move {
                let (events, unreadable) = self.feed_range(start, end).await?;
                let complete = unreadable.is_none() && events.len() as i64 == end - start;
                Ok::<_, Error>((events, unreadable, complete))
            })
            .buffered(2)
            .scan(false, |done, page| {
                if *done {
                    return futures::future::ready(None);
                }
                *done = !matches!(page, Ok((_, _, true)));
                futures::future::ready(Some(page))
            });
        Box::pin(pages.flat_map(|page| {
            let (events, unreadable) = match page {
                Ok((events, unreadable, _)) => (events, unreadable),
                Err(e) => (Vec::new(), Some(e)),
            };
            stream::iter(events.into_iter().map(Ok).chain(unreadable.map(Err)))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Whatever the candidates' backlogs, a round reads for each stream a contiguous run
        /// from its progress, stays within the plan, fills it when enough waits, looks at
        /// every stream when they all fit a minimal share, and wakes every stream it left
        /// events of.
        #[test]
        fn a_round_reads_contiguous_runs_within_the_plan_and_wakes_what_is_left(
            streams in prop::collection::vec((0i64..50, 0usize..1_500, any::<bool>()), 0..80),
        ) {
            let candidates: Vec<String> =
                (0..streams.len()).map(|i| format!("s{i:03}")).collect();
            let of = |name: &str| streams[name[1..].parse::<usize>().unwrap()];
            let known = |name: &str| {
                let (fed, _, cached) = of(name);
                cached.then_some(fed)
            };
            let read = |name: String, after: Option<i64>, max: usize| {
                let (fed, backlog, _) = of(&name);
                let after = after.unwrap_or(fed);
                let events: Vec<RecordedEvent> = (after + 1..=fed + backlog as i64)
                    .take(max)
                    .map(|v| {
                        let event = keel::NewEvent::new("Happened", 1, &b"{}"[..]);
                        RecordedEvent::record(StreamId::new(&name), v as u64, None, event)
                    })
                    .collect();
                std::future::ready(Ok((after, events)))
            };
            let round = futures::executor::block_on(gather(&candidates, known, read)).unwrap();

            let total: usize = streams.iter().map(|s| s.1).sum();
            let read_count: usize = round.found.iter().map(|f| f.2.len()).sum();
            prop_assert_eq!(round.planned, read_count);
            prop_assert_eq!(round.planned, total.min(MAX_PLAN));
            let waiting: HashSet<&String> = round.waiting.iter().collect();
            for (i, (name, after, events)) in round.found.iter().enumerate() {
                let (fed, backlog, _) = of(name);
                prop_assert_eq!(name, &candidates[i], "candidate order");
                prop_assert_eq!(*after, fed);
                let versions: Vec<i64> = events.iter().map(|e| e.version as i64).collect();
                prop_assert_eq!(versions, (fed + 1..=fed + events.len() as i64).collect::<Vec<_>>());
                if events.len() < backlog {
                    prop_assert!(waiting.contains(name), "{} left events unwoken", name);
                }
            }
            for name in &candidates[round.found.len()..] {
                prop_assert!(of(name).1 == 0 || waiting.contains(name), "{} not looked at, not woken", name);
            }
            if total < MAX_PLAN {
                prop_assert!(round.waiting.is_empty(), "nothing left, nobody woken");
            }
            if streams.len() * MIN_SHARE <= MAX_PLAN {
                prop_assert_eq!(round.found.len(), streams.len(), "every stream looked at");
                let share = MAX_PLAN / streams.len().max(1);
                for (name, _, events) in &round.found {
                    prop_assert!(events.len() >= of(name).1.min(share), "{} got less than its share", name);
                }
            }
        }
    }

    fn row(position: i64, payload: usize) -> (i64, RecordedEvent) {
        let event = keel::NewEvent::new("Happened", 1, vec![b'x'; payload]);
        (
            position,
            RecordedEvent::record(StreamId::new("s"), position as u64, None, event),
        )
    }

    fn shape(batches: &[Vec<(i64, RecordedEvent)>]) -> Vec<(i64, usize)> {
        batches.iter().map(|b| (b[0].0, b.len())).collect()
    }

    #[test]
    fn the_gather_doubles_under_sustained_load_and_resets_when_idle() {
        let ms = Duration::from_millis;
        let (base, max) = (ms(20), ms(160));
        let mut gather = base;
        let mut seen = Vec::new();
        for _ in 0..5 {
            gather = next_gather(gather, true, base, max);
            seen.push(gather.as_millis());
        }
        assert_eq!(seen, [40, 80, 160, 160, 160]);
        assert_eq!(next_gather(gather, false, base, max), base);
        // A ceiling below the base leaves the base; equal ones give a fixed wait.
        assert_eq!(next_gather(base, true, base, ms(5)), base);
        assert_eq!(next_gather(base, true, base, base), base);
    }

    #[test]
    fn feed_rows_batch_within_a_partition_and_the_size_limits() {
        // 40 small rows from position 990 in partitions of 1,000: cut at 1,000, then at 32.
        let small: Vec<_> = (990..1_030).map(|p| row(p, 10)).collect();
        assert_eq!(shape(&feed_batches(1_000, small)), [(990, 10), (1_000, 30)]);
        let many: Vec<_> = (1..=70).map(|p| row(p, 10)).collect();
        assert_eq!(
            shape(&feed_batches(100_000, many)),
            [(1, 32), (33, 32), (65, 6)]
        );
        // About 1 KB each: four fit under the byte limit; a row above it goes alone.
        let big: Vec<_> = (1..=9).map(|p| row(p, 900)).collect();
        assert_eq!(shape(&feed_batches(100_000, big)), [(1, 4), (5, 4), (9, 1)]);
        let huge = vec![row(1, 10), row(2, 10_000), row(3, 10)];
        assert_eq!(
            shape(&feed_batches(100_000, huge)),
            [(1, 1), (2, 1), (3, 1)]
        );
        assert!(feed_batches(100_000, Vec::new()).is_empty());
    }
}
