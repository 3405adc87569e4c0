//! The feed in slices: leased feeders give committed events dense positions, slice by slice.
//!
//! # Slices
//! The feed is cut into `feed_slices` slices (recorded in `keel_schema`; a keyspace from before
//! slices has one). A stream's events are all in slice [`keel::feed::slice_of`] its id. Each
//! slice has its own position row (`feed_meta`, `id` = the slice), its own plan, its own
//! feed partitions (`feed.bucket` = slice << 32 | position / `feed_bucket_size`) and its own
//! lease (`keel.feeder.<slice>`; `keel.feeder` when there is one slice). Everything below
//! holds per slice, and rounds of different slices run concurrently.
//!
//! # How an event reaches the feed exactly once
//! 1. Before its LWT, every append writes a marker `(minute, at, marker, stream)` to `pending`
//!    (plain insert, one-hour TTL). The marker exists before the events can.
//! 2. One feeder holds each slice's lease. It learns of streams to look at from in-process
//!    wake-ups (fast path) and by scanning recent markers (appends of other processes, and
//!    writers that died after their commit), keeping those of its slices. Each marked stream
//!    is looked at when the marker is first seen and once more after `settle_after`, by which
//!    time any append behind the marker has committed or failed for good.
//! 3. For each stream it reads the events after the stream's fed progress, then allocates
//!    positions with one LWT on the slice's `feed_meta` row (`IF head = <last known>`) that
//!    also stores the plan (stream, versions, first position). Then it writes the feed rows
//!    and the progress rows, both idempotent.
//! 4. A feeder that finds a plan in `feed_meta` (its predecessor died mid-way) applies it
//!    again before anything else; a feeder whose LWT fails (another feeder moved the head)
//!    drops its caches and starts over from `feed_meta`. Positions are therefore allocated
//!    once, and each event is planned once.
//!
//! # Sharing the slices
//! Every process with a feeder keeps a row in `members` (work `feed`, with a TTL) and takes a
//! fair share of the slices, `ceil(slices / members)`: it renews what it holds, takes free
//! slices while below its share, and hands back what is above it (see [`share`]). A process
//! that dies loses its slices to the others within the lease TTL.
//!
//! # Where each part lives
//! - this module: the feeder task (its loop and wake-ups), the shared types;
//! - [`share`]: membership, the slice leases and the fair share, the heartbeat;
//! - [`plan`]: a round's planning: which streams (wake-ups, markers), what each brings, and
//!   the position allocation that stores the plan;
//! - [`write`](mod@write): applying a plan: feed rows batched by partition and size, fed progress;
//! - [`recovery`]: a predecessor's unfinished plan, and the reconciliation a new leader runs
//!   after an outage;
//! - [`reconcile`]: the reconciliation itself (also `keel feed reconcile`);
//! - [`read`]: the feed's heads and its rows from a position;
//! - [`status`]: what an operator sees: status, stuck streams, unfed markers.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel::{Error, Lease, StreamId};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::Shared;

mod plan;
mod read;
mod reconcile;
mod recovery;
mod share;
mod status;
mod write;

pub use reconcile::Reconciled;
pub use status::SliceStatus;

use plan::next_gather;

/// The lease of one slice of the feed: `keel.feeder` for a feed of one slice (the name it had
/// before slices), `keel.feeder.<slice>` otherwise.
pub(crate) fn feeder_lease(slice: u32, slices: u32) -> String {
    if slices <= 1 {
        "keel.feeder".to_owned()
    } else {
        format!("keel.feeder.{slice}")
    }
}

/// The `members` partition of the processes that run a feeder.
pub(crate) const FEED_MEMBERS: &str = "feed";
/// Events planned in one allocation at most.
const MAX_PLAN: usize = 2_000;
/// Requests the feeder and the feed's maintenance reads keep in flight at once (a round's
/// stream reads, its feed-row and progress writes, status and reconciliation reads). Read one
/// after the other, a round of many one-event streams cost two round trips per stream.
pub(crate) const IN_FLIGHT: usize = 32;
/// Partition keys per `IN (...)` read: ScyllaDB refuses more than 100 in one by default.
pub(crate) const IN_CHUNK: usize = 64;
/// The fewest events a stream may bring to a round when many streams share its plan.
const MIN_SHARE: usize = 64;
/// How far back a new leader looks for markers: their time to live.
const FULL_LOOKBACK_MS: i64 = 3_600_000;
/// The row (in `checkpoints`) where a feeder holding slices notes that it is alive.
const HEARTBEAT: &str = "keel.feeder.heartbeat";
/// How long the heartbeat row lives: five minutes less than a marker. A new leader that finds
/// no heartbeat reconciles the feed, since markers of appends made since the last one may have
/// expired. Both times to live are counted by the database's clocks, so the decision does not
/// depend on the clocks of the processes (the row's `updated_at`, for display, does).
pub(crate) const HEARTBEAT_TTL_SECS: i64 = FULL_LOOKBACK_MS / 1000 - 300;

/// Streams appended to by this process since the feeder last looked, and the slices this
/// process's feeder holds.
pub(crate) struct Wake {
    enabled: AtomicBool,
    /// Per slice, whether this process's feeder holds it (its appends to the slice's streams
    /// may reuse a recent marker: the feeder hears of them directly).
    held: Vec<AtomicBool>,
    streams: Mutex<HashSet<StreamId>>,
    notify: Notify,
}

impl Wake {
    pub(crate) fn new(slices: u32) -> Self {
        Wake {
            enabled: AtomicBool::new(false),
            held: (0..slices.max(1)).map(|_| AtomicBool::new(false)).collect(),
            streams: Mutex::new(HashSet::new()),
            notify: Notify::new(),
        }
    }

    pub(crate) fn notify(&self, stream: StreamId) {
        if self.enabled.load(Ordering::Relaxed) {
            self.streams
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(stream);
            self.notify.notify_one();
        }
    }

    /// Whether this process's feeder holds `slice`.
    pub(crate) fn holds(&self, slice: u32) -> bool {
        self.held
            .get(slice as usize)
            .is_some_and(|h| h.load(Ordering::Relaxed))
    }

    fn set_held(&self, slice: u32, held: bool) {
        if let Some(h) = self.held.get(slice as usize) {
            h.store(held, Ordering::Relaxed);
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

/// The feed as an operator sees it: [`KeelScylla::feed_status`](crate::KeelScylla::feed_status).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedStatus {
    /// Events in the feed: the sum of the slices' heads (events up to them are in the feed,
    /// or about to be).
    pub head: u64,
    /// Each slice: its head, its feeder, its lease epoch, its unfinished plan.
    pub slices: Vec<SliceStatus>,
    /// The processes running a feeder, by the ids they registered (`feeder_id`).
    pub members: Vec<String>,
    /// How long ago a feeder holding slices last noted that it was alive, by the clock of the
    /// process that noted it; `None` when none did in the last 55 minutes (the note lives
    /// that long).
    pub last_alive: Option<Duration>,
    /// Streams in plans that were allocated but not yet fully written (a feeder died in the
    /// middle of a round; the next one finishes it first), over all slices. Usually 0.
    pub unfinished_plan: usize,
    /// Streams the feed cannot carry past a damaged row (a null column, a version gap,
    /// metadata that does not decode): each names the stream, the version and why. The
    /// feed goes on for every other stream; this one waits until the row is repaired or an
    /// operator skips it ([`KeelScylla::skip_in_feed`](crate::KeelScylla::skip_in_feed),
    /// `keel feed skip`).
    pub stuck: Vec<keel::projection::DeadLetter>,
}

impl FeedStatus {
    /// The slices no feeder holds right now.
    pub fn unheld(&self) -> Vec<u32> {
        self.slices
            .iter()
            .filter(|s| s.feeder.is_none())
            .map(|s| s.slice)
            .collect()
    }

    /// How many slices each feeder holds, by feeder id.
    pub fn held_by(&self) -> std::collections::BTreeMap<String, usize> {
        let mut held = std::collections::BTreeMap::new();
        for feeder in self.slices.iter().filter_map(|s| s.feeder.clone()) {
            *held.entry(feeder).or_insert(0) += 1;
        }
        held
    }
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
    leases: Arc<Mutex<HashMap<u32, Lease>>>,
    shared: Arc<Shared>,
    id: String,
}

impl Drop for Feeder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Feeder {
    pub(crate) fn start(shared: Arc<Shared>, config: FeederConfig) -> Feeder {
        shared.wake.enabled.store(true, Ordering::Relaxed);
        let leases = Arc::new(Mutex::new(HashMap::new()));
        let id = config.id.clone();
        let mut state = FeederState {
            shared: shared.clone(),
            gather: config.gather,
            config,
            leases: leases.clone(),
            held: HashMap::new(),
            renewed: Instant::now(),
            seen: HashMap::new(),
            scanned_full: false,
            last_scan: None,
            reconciling: None,
        };
        let task = tokio::spawn(async move { state.run().await });
        Feeder {
            task,
            leases,
            shared,
            id,
        }
    }

    /// How many slices this process's feeder holds.
    pub(crate) fn held(&self) -> usize {
        self.leases.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub(crate) async fn shutdown(&self) {
        self.task.abort();
        let leases: Vec<Lease> = self
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(slice, lease)| {
                self.shared.wake.set_held(slice, false);
                lease
            })
            .collect();
        let releases = leases.iter().map(|lease| self.shared.release_lease(lease));
        for result in futures::future::join_all(releases).await {
            if let Err(e) = result {
                tracing::warn!(error = %e, "feeder lease release failed; it expires by itself");
            }
        }
        self.shared.leave(FEED_MEMBERS, &self.id).await;
    }
}

/// One slice this feeder holds: its lease, and what it knows of the slice's feed.
struct SliceFeeder {
    slice: u32,
    shared: Arc<Shared>,
    /// The slice's head as of the last successful read or allocation (`None`: read it again).
    meta: Option<i64>,
    /// Last fed version per stream of the slice, as far as this feeder knows.
    progress: HashMap<String, i64>,
}

impl SliceFeeder {
    fn new(slice: u32, shared: Arc<Shared>) -> Self {
        SliceFeeder {
            slice,
            shared,
            meta: None,
            progress: HashMap::new(),
        }
    }

    fn reset(&mut self) {
        self.meta = None;
        self.progress.clear();
    }
}

struct FeederState {
    shared: Arc<Shared>,
    config: FeederConfig,
    /// The slice leases held, shared with [`Feeder`] for shutdown.
    leases: Arc<Mutex<HashMap<u32, Lease>>>,
    /// The slices held, by slice.
    held: HashMap<u32, SliceFeeder>,
    /// When the leases and membership were last renewed.
    renewed: Instant,
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
            if !self.hold_slices().await {
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
            let full = self.publish_held(candidates).await;
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
            let woken = self.shared.wake.notify.notified();
            if tokio::time::timeout(self.config.interval, woken)
                .await
                .is_ok()
            {
                // Let a burst of appends gather so one allocation covers them all.
                tokio::time::sleep(self.gather).await;
            }
        }
    }

    /// One round in every held slice with candidates, concurrently; `true` when some slice's
    /// plan was full (more events wait). Candidates of slices held elsewhere are dropped: their
    /// markers bring them to their slice's feeder.
    async fn publish_held(&mut self, candidates: HashSet<String>) -> bool {
        let slices = self.shared.feed_slices;
        let mut by_slice: HashMap<u32, HashSet<String>> = HashMap::new();
        for stream in candidates {
            let slice = keel::feed::slice_of(&StreamId::new(&stream), slices);
            if self.held.contains_key(&slice) {
                by_slice.entry(slice).or_default().insert(stream);
            }
        }
        let rounds = self.held.values_mut().filter_map(|feeder| {
            let candidates = by_slice.remove(&feeder.slice)?;
            Some(async move {
                match feeder.publish(candidates).await {
                    Ok(full) => full,
                    Err(e) => {
                        tracing::warn!(slice = feeder.slice, error = %e,
                            "feeder round failed; starting over from feed_meta");
                        feeder.reset();
                        false
                    }
                }
            })
        });
        futures::future::join_all(rounds)
            .await
            .into_iter()
            .any(|full| full)
    }
}
