//! Projections: read models kept up to date from the feed, rebuilt from history on demand.
//!
//! A [`Projection`] applies events to a read model. The [`ProjectionManager`] runs each one from
//! its checkpoint through the history, then follows new events; it saves the checkpoint after
//! the read-model write (at-least-once: a crash between the two replays a batch, so `apply`
//! must be idempotent, e.g. upserts keyed by stream and version). It rebuilds a projection
//! blue/green: a new *generation* of the read model is filled from position 1 while queries
//! keep reading the active one, then the new generation becomes active in one step.
//!
//! ```
//! use std::sync::Arc;
//! use keel::projection::{Generations, Projection, ProjectionManager};
//! use keel::{BoxError, RecordedEvent, Repository};
//!
//! /// Counts events per stream.
//! #[derive(Default)]
//! struct PerStream(Generations<std::collections::HashMap<String, u64>>);
//!
//! #[async_trait::async_trait]
//! impl Projection for PerStream {
//!     fn name(&self) -> &str { "per_stream" }
//!     async fn reset(&self, generation: u64) -> Result<(), BoxError> { self.0.reset(generation); Ok(()) }
//!     async fn activate(&self, generation: u64) -> Result<(), BoxError> { self.0.activate(generation); Ok(()) }
//!     async fn apply(&self, generation: u64, event: &RecordedEvent) -> Result<(), BoxError> {
//!         self.0.update(generation, |m| *m.entry(event.stream.to_string()).or_default() += 1);
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> keel::Result<()> {
//! let store = Arc::new(keel_memory::MemoryStore::new());
//! Repository::<keel::doc::Counter>::new(store.clone()).execute("a", 1).await?;
//! let per_stream = Arc::new(PerStream::default());
//! let manager = ProjectionManager::builder(store.clone(), store.clone(), store.clone(), store.clone())
//!     .projection(per_stream.clone())
//!     .build();
//! manager.catch_up("per_stream").await?;
//! assert_eq!(per_stream.0.read(|m| m["counter-a"]), 1);
//! # Ok(()) }
//! ```

mod active;
mod generations;
mod manager;
mod visibility;

pub use active::ActiveGeneration;
pub use generations::Generations;
pub use manager::{ErrorPolicy, ProjectionManager, ProjectionManagerBuilder, DEFAULT_RETIRE_AFTER};
pub use visibility::{Visibility, DEFAULT_POLL};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::ending::StreamNotice;
use crate::error::{BoxError, Result};
use crate::event::RecordedEvent;
use crate::store::Fence;

/// A read model fed by events.
///
/// Every method takes the *generation* it works on: the manager fills generation `g + 1`
/// during a rebuild while queries read generation `g`, then calls [`activate`](Projection::activate).
#[async_trait]
pub trait Projection: Send + Sync + 'static {
    /// Stable name: checkpoints, leases and status are keyed by it.
    fn name(&self) -> &str;

    /// Whether this projection wants events of `event_type` (default: all). Others are
    /// skipped without calling `apply`; the checkpoint still moves past them.
    fn handles(&self, event_type: &str) -> bool {
        let _ = event_type;
        true
    }

    /// Applies one event to `generation`. An error stops the projection on this event (or
    /// dead-letters it, per the manager's [`ErrorPolicy`]).
    async fn apply(&self, generation: u64, event: &RecordedEvent) -> Result<(), BoxError>;

    /// A stream was deleted, truncated or archived (see [`ending`](crate::ending)): `event`
    /// is the notice the stream's ending appended, in the stream's order after its events.
    /// A read model that keeps rows per stream drops them here on a deletion. Called for
    /// every notice, whatever [`handles`](Projection::handles) says; the default does nothing.
    async fn notice(
        &self,
        generation: u64,
        event: &RecordedEvent,
        notice: StreamNotice,
    ) -> Result<(), BoxError> {
        let _ = (generation, event, notice);
        Ok(())
    }

    /// Called after each batch, before its checkpoint is saved: flush buffered writes here.
    async fn commit(&self, generation: u64) -> Result<(), BoxError> {
        let _ = generation;
        Ok(())
    }

    /// Called when the manager takes the projection's lease, before anything is applied under
    /// it. A read model shared by several managers (a database table, say) records `fence`
    /// and makes its writes conditional on it, so that a manager that stalled past its lease
    /// cannot write once its successor has: see [`Generations::update_fenced`] for one, and
    /// return [`Error::Fenced`](crate::Error::Fenced) from `apply` or `commit` when a write
    /// is refused (the manager then lets the lease go; nothing is dead-lettered). The default
    /// records nothing: checkpoints are fenced by the store either way.
    async fn fence(&self, fence: &Fence) -> Result<(), BoxError> {
        let _ = fence;
        Ok(())
    }

    /// Starts `generation` empty (a rebuild begins with this).
    async fn reset(&self, generation: u64) -> Result<(), BoxError>;

    /// Makes `generation` the one queries read. Readers in this process switch at once;
    /// readers elsewhere follow within their cache time
    /// ([`ActiveGeneration`]), so the rows of older
    /// generations are best dropped in [`retire`](Projection::retire), not here.
    async fn activate(&self, generation: u64) -> Result<(), BoxError>;

    /// Drops what is left of every generation up to and including `generation`, which no
    /// query reads any more: the manager calls it
    /// [`retire_after`](crate::projection::ProjectionManagerBuilder::retire_after) the
    /// switch to a newer generation (also after a restart in between), so that readers that
    /// cached the old generation have moved on first. Called with the last generation
    /// replaced when several rebuilds switched within the grace. The default drops nothing.
    async fn retire(&self, generation: u64) -> Result<(), BoxError> {
        let _ = generation;
        Ok(())
    }
}

/// Hands `event` to `projection`: a stream notice to [`Projection::notice`], an event it
/// [`handles`](Projection::handles) to [`Projection::apply`], any other to nothing.
pub(crate) async fn deliver(
    projection: &dyn Projection,
    generation: u64,
    event: &RecordedEvent,
) -> Result<(), BoxError> {
    match StreamNotice::of(event) {
        Some(notice) => projection.notice(generation, event, notice?).await,
        None if projection.handles(&event.event_type) => projection.apply(generation, event).await,
        None => Ok(()),
    }
}

/// What a projection is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProjectionState {
    /// Applying events as they come.
    Running,
    /// Paused by an operator.
    Paused,
    /// Filling a new generation from the start of the feed.
    Rebuilding,
    /// Stopped on an event it could not apply or read (see `failed_event` and `last_error`).
    Failed,
    /// Its steps keep failing for a reason that is not one event (the feed or a key store
    /// unreachable, say): `last_error` says why and where; it keeps retrying and runs again
    /// by itself once a step succeeds.
    Stalled,
    /// Another manager holds the projection's lease; this one waits to take over.
    Standby,
    /// Not running.
    Stopped,
}

/// The event a projection failed on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedEvent {
    /// Its stream.
    pub stream: String,
    /// Its version in the stream.
    pub version: u64,
    /// Its type.
    pub event_type: String,
    /// Its position in its feed slice.
    pub position: u64,
    /// Its feed slice.
    #[serde(default)]
    pub slice: u32,
}

/// How far a rebuild got.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RebuildProgress {
    /// The generation being filled.
    pub generation: u64,
    /// Events processed so far.
    pub done: u64,
    /// Events in the feed when the rebuild started (it also catches up with newer ones).
    pub total: u64,
    /// Events per second so far.
    pub rate: f64,
    /// Seconds left at that rate.
    pub eta_secs: f64,
}

/// One projection's status, as the manager publishes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProjectionStatus {
    /// The projection's name.
    pub name: String,
    /// What it is doing.
    pub state: ProjectionState,
    /// The generation queries read.
    pub generation: u64,
    /// Events consumed through the checkpoint, over all slices ([`cursor`](Self::cursor)'s
    /// total): with one slice, the last position consumed.
    #[serde(default)]
    pub consumed: u64,
    /// The checkpoint: the last position consumed in each feed slice.
    #[serde(default)]
    pub cursor: crate::Cursor,
    /// Events in the feed when last looked at (the [`heads`](Self::heads)' total).
    pub head: u64,
    /// The last position published in each feed slice, when last looked at.
    #[serde(default)]
    pub heads: crate::Cursor,
    /// Events behind the heads, over all slices ([`slice_lag`](Self::slice_lag) per slice).
    pub lag_events: u64,
    /// The slices the publishing manager applies itself: every slice, unless it shares them
    /// with other managers ([`share_slices`](ProjectionManagerBuilder::share_slices)).
    #[serde(default)]
    pub held: Vec<u32>,
    /// Milliseconds between the last applied event's recording and its application.
    pub lag_ms: i64,
    /// Events processed by this manager (applied or skipped as not handled).
    pub processed: u64,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// The event it stopped on, when failed.
    pub failed_event: Option<FailedEvent>,
    /// Rebuild progress, while rebuilding.
    pub rebuild: Option<RebuildProgress>,
    /// Events sent to dead letters.
    pub dead_letters: u64,
    /// The manager instance publishing this status: the lease holder (a standby publishes
    /// nothing, so the status is always the holder's).
    pub owner: String,
    /// When it was published (ms since the epoch).
    pub updated_at: i64,
    /// The last operator request this holder applied.
    #[serde(default)]
    pub last_request: Option<AppliedRequest>,
}

impl ProjectionStatus {
    /// Per feed slice with events: `(slice, last position consumed, head, events behind)`.
    pub fn slice_lag(&self) -> Vec<(u32, u64, u64, u64)> {
        let mut slices: Vec<u32> = self.heads.iter().map(|(s, _)| s).collect();
        slices.extend(self.cursor.iter().map(|(s, _)| s));
        slices.sort_unstable();
        slices.dedup();
        slices
            .into_iter()
            .map(|s| {
                let (done, head) = (self.cursor.get(s), self.heads.get(s));
                (s, done, head, head.saturating_sub(done))
            })
            .collect()
    }
}

/// Where the generation that queries of `projection` read is saved (in the
/// [`CheckpointStore`](crate::CheckpointStore); absent means 1): `<projection>/generation`.
/// The manager moves it when a rebuild switches; [`ActiveGeneration`] follows it.
///
/// ```
/// assert_eq!(keel::projection::generation_key("orders"), "orders/generation");
/// ```
pub fn generation_key(projection: &str) -> String {
    format!("{projection}/generation")
}

/// The [`CheckpointStore`](crate::CheckpointStore) name under which a projection's manager
/// saves where `generation` resumes in `slice` of a feed of `slices` slices: the position to
/// read next there. A feed of one slice keeps the name from before slices
/// (`<projection>/<generation>`), so such a store's checkpoints carry on.
///
/// ```
/// use keel::projection::checkpoint_name;
/// assert_eq!(checkpoint_name("orders", 2, 5, 64), "orders/2/s5");
/// assert_eq!(checkpoint_name("orders", 2, 0, 1), "orders/2");
/// ```
pub fn checkpoint_name(projection: &str, generation: u64, slice: u32, slices: u32) -> String {
    if slices <= 1 {
        format!("{projection}/{generation}")
    } else {
        format!("{projection}/{generation}/s{slice}")
    }
}

/// An operator's request as it is stored for the lease holder to take: what to do, and an id
/// that the holder's status names once it has applied it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Names this request in [`ProjectionStatus::last_request`].
    pub id: uuid::Uuid,
    /// What to do.
    pub control: Control,
}

impl Request {
    /// A request with a fresh id.
    pub fn new(control: Control) -> Self {
        Request {
            id: uuid::Uuid::new_v4(),
            control,
        }
    }
}

/// A request a lease holder applied, as its status reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedRequest {
    /// The request's id ([`Request::id`]; a fresh one for a call on the holder itself).
    pub id: uuid::Uuid,
    /// What was done.
    pub control: Control,
    /// When (ms since the epoch).
    pub applied_at: i64,
    /// The epoch of the lease it was applied under.
    pub epoch: u64,
}

/// A request to a running projection, from an operator (possibly in another process).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Control {
    /// Stop applying events until resumed.
    Pause,
    /// Continue (also after a failure: the failed event is tried again).
    Resume,
    /// Rebuild a new generation from history, then switch to it.
    Rebuild,
    /// Move the checkpoint of every feed slice to this position (replays or skips events):
    /// `ResetTo(1)` replays the whole feed. With one slice, the position is the feed's.
    ResetTo(u64),
    /// Move the checkpoint of one feed slice (the first number) to a position in it.
    ResetSliceTo(u32, u64),
    /// Apply every dead letter's event again (to the active generation), removing the letters
    /// that now apply; the others stay, with their new error.
    ReplayDeadLetters,
    /// [`ReplayDeadLetters`](Control::ReplayDeadLetters) for the one dead letter of the event
    /// at this feed slice (first number) and position.
    ReplayDeadLetter(u32, u64),
}

/// An event a projection could not apply and skipped under [`ErrorPolicy::DeadLetter`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The projection.
    pub projection: String,
    /// The event.
    pub event: FailedEvent,
    /// Why it failed.
    pub error: String,
    /// When (ms since the epoch).
    pub at: i64,
}

/// Where projection status, operator requests and dead letters live, so that an operator's
/// tool in another process can see and steer running projections.
#[async_trait]
pub trait ProjectionStore: Send + Sync + 'static {
    /// Publishes a status.
    async fn save_status(&self, status: &ProjectionStatus) -> Result<()>;
    /// The last published status of `name`.
    async fn load_status(&self, name: &str) -> Result<Option<ProjectionStatus>>;
    /// Every published status.
    async fn list_status(&self) -> Result<Vec<ProjectionStatus>>;
    /// Leaves a request for the manager running `name` (a request not yet taken is replaced:
    /// the latest wins).
    async fn request(&self, name: &str, request: Request) -> Result<()>;
    /// Takes the pending request for `name`, if any: once, however many managers ask.
    async fn take_request(&self, name: &str) -> Result<Option<Request>>;
    /// Records a dead letter.
    async fn add_dead_letter(&self, letter: &DeadLetter) -> Result<()>;
    /// The dead letters of `name`, oldest first.
    async fn dead_letters(&self, name: &str) -> Result<Vec<DeadLetter>>;
    /// Removes `name`'s dead letters of the event at `position` of feed slice `slice` (an
    /// operator skipped it, or it was replayed); returns how many there were.
    async fn remove_dead_letter(&self, name: &str, slice: u32, position: u64) -> Result<usize>;
}
