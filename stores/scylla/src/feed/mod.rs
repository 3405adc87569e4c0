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
//!
//! # Where each part lives
//! - this module: the feeder task (its loop, lease state and wake-ups), the shared types;
//! - [`plan`]: a round's planning: which streams (wake-ups, markers), what each brings, and
//!   the position allocation that stores the plan;
//! - [`write`](mod@write): applying a plan: feed rows batched by partition and size, fed progress;
//! - [`recovery`]: the lease and heartbeat, a predecessor's unfinished plan, and the
//!   reconciliation a new leader runs after an outage;
//! - [`reconcile`]: the reconciliation itself (also `keel feed reconcile`);
//! - [`read`]: the feed's head and its rows from a position;
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
mod status;
mod write;

pub use reconcile::Reconciled;

use plan::next_gather;

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
}
