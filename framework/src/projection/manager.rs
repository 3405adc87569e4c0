//! The [`ProjectionManager`]: runs projections from their checkpoints, rebuilds them, reports.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use tokio::sync::Mutex as AsyncMutex;
use tracing::Instrument;

use super::{
    AppliedRequest, Control, DeadLetter, FailedEvent, Projection, ProjectionState,
    ProjectionStatus, ProjectionStore, RebuildProgress, Request,
};
use crate::error::{Error, Result};
use crate::event::{now_millis, RecordedEvent};
use crate::feed::{all_slices, Cursor};

mod share;
use crate::store::{CheckpointStore, EventStore, Fence, Lease, LeaseStore};
use share::SharedKey;

/// How often a busy projection reads operator requests.
const POLL_EVERY: Duration = Duration::from_millis(200);

/// Events applied per step of a batch, while the feed reads on.
const APPLY_CHUNK: usize = 250;

/// What one batch applied in a slice: how many events it consumed, and the position the
/// slice's checkpoint moves to.
struct Applied {
    slice: u32,
    consumed: usize,
    next: u64,
}

/// How long after a switch the replaced generation is retired, unless configured otherwise.
pub const DEFAULT_RETIRE_AFTER: Duration = Duration::from_secs(10);

/// Lagging slices a step reads at once.
const SLICES_AT_ONCE: usize = 8;

/// What a projection does when `apply` fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ErrorPolicy {
    /// Stop the projection on the event, with the event and the error in its status, until
    /// an operator resumes (retrying the event) or resets it. The default.
    #[default]
    Stop,
    /// Record the event as a dead letter (visible in the status count and the store) and go on.
    DeadLetter,
}

#[derive(Clone)]
struct Config {
    id: String,
    batch_size: usize,
    poll: Duration,
    lease_ttl: Duration,
    policy: ErrorPolicy,
    stall_after: u32,
    share: bool,
    retire_after: Duration,
}

/// Configures a [`ProjectionManager`].
pub struct ProjectionManagerBuilder {
    events: Arc<dyn EventStore>,
    checkpoints: Arc<dyn CheckpointStore>,
    leases: Arc<dyn LeaseStore>,
    store: Arc<dyn ProjectionStore>,
    projections: Vec<Arc<dyn Projection>>,
    config: Config,
}

impl ProjectionManagerBuilder {
    /// Adds a projection.
    pub fn projection(mut self, projection: Arc<dyn Projection>) -> Self {
        self.projections.push(projection);
        self
    }

    /// Events read per batch (default 1,000); one checkpoint save per batch. A rebuild reads
    /// 16 batches per checkpoint.
    pub fn batch_size(mut self, size: usize) -> Self {
        self.config.batch_size = size.max(1);
        self
    }

    /// How long a caught-up projection waits before looking for new events (default 100 ms).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.config.poll = interval;
        self
    }

    /// The projection leases' time to live (default 10 s): how long a dead manager keeps
    /// another from taking over.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.config.lease_ttl = ttl;
        self
    }

    /// What to do when a projection fails on an event (default: stop).
    pub fn on_error(mut self, policy: ErrorPolicy) -> Self {
        self.config.policy = policy;
        self
    }

    /// After how many failed steps in a row a projection reports [`ProjectionState::Stalled`]
    /// and turns health red (default 3; at least 1). A failure that names one event (a feed
    /// row that does not decode) is not retried: it goes to the error policy like a failed
    /// `apply`.
    pub fn stall_after(mut self, failures: u32) -> Self {
        self.config.stall_after = failures.max(1);
        self
    }

    /// How long after a rebuild's switch the replaced generation is retired
    /// ([`Projection::retire`], which drops its rows; default [`DEFAULT_RETIRE_AFTER`]).
    /// Longer than readers in other processes cache the active generation
    /// ([`ActiveGeneration`](super::ActiveGeneration), 1 s by default) plus their longest
    /// query, so that no reader queries rows that are gone. Kept in the checkpoint store:
    /// a manager restarted within the grace retires on time.
    pub fn retire_after(mut self, grace: Duration) -> Self {
        self.config.retire_after = grace;
        self
    }

    /// Whether this manager shares its projections' feed slices with the other managers that
    /// run them with sharing on (default off: one manager, the lease holder, runs each
    /// projection over every slice).
    ///
    /// Shared, each manager holds a lease per slice for its fair share
    /// (`ceil(slices / managers)`, managers counted by [`LeaseStore::join`]) and applies
    /// only those slices, each slice's checkpoint fenced by its slice's lease. The holder of
    /// the projection's own lease coordinates: it takes operator requests, publishes the
    /// status (every slice), and switches a rebuild's generation once every slice has caught
    /// up; pause, resume and a rebuild reach every manager through the checkpoint store. A
    /// reset is applied by the coordinator and only to slices it holds. Every manager that
    /// runs a projection must share, or none.
    pub fn share_slices(mut self, share: bool) -> Self {
        self.config.share = share;
        self
    }

    /// This manager's identity in leases and status (default: a random UUID).
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.config.id = id.into();
        self
    }

    /// The manager. Two projections with one name are refused.
    pub fn build(self) -> ProjectionManager {
        let mut slots = HashMap::new();
        for projection in self.projections {
            let name = projection.name().to_owned();
            slots.insert(
                name.clone(),
                Arc::new(Slot {
                    projection,
                    runner: AsyncMutex::new(Runner::new(
                        name,
                        self.events.feed_slices(),
                        self.config.share,
                    )),
                }),
            );
        }
        ProjectionManager {
            inner: Arc::new(Inner {
                events: self.events,
                checkpoints: self.checkpoints,
                leases: self.leases,
                store: self.store,
                slots,
                config: self.config,
                tasks: Mutex::new(Vec::new()),
            }),
        }
    }
}

/// Runs projections: catch-up from the checkpoint, then live; blue/green rebuilds; pause,
/// resume, reset; one active instance per projection through a lease; status published to
/// a [`ProjectionStore`] where an operator's tool can read and steer it.
///
/// Cloning is cheap and shares everything.
#[derive(Clone)]
pub struct ProjectionManager {
    inner: Arc<Inner>,
}

struct Inner {
    events: Arc<dyn EventStore>,
    checkpoints: Arc<dyn CheckpointStore>,
    leases: Arc<dyn LeaseStore>,
    store: Arc<dyn ProjectionStore>,
    slots: HashMap<String, Arc<Slot>>,
    config: Config,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

struct Slot {
    projection: Arc<dyn Projection>,
    runner: AsyncMutex<Runner>,
}

struct Rebuild {
    generation: u64,
    /// The last position the new generation consumed per slice.
    cursor: Cursor,
    started: Instant,
    done: u64,
    total: u64,
}

/// The mutable state of one projection in this manager.
struct Runner {
    name: String,
    loaded: bool,
    generation: u64,
    /// The feed's slice count: the checkpoint has one position per slice.
    slices: u32,
    /// The active generation's checkpoint: the last position consumed per slice.
    cursor: Cursor,
    state: ProjectionState,
    processed: u64,
    /// The feed's heads when last read.
    heads: Cursor,
    /// The slice the next step's batches start from: slices take turns.
    turn: u32,
    /// Whether this manager shares the projection's slices with others.
    share: bool,
    /// Sharing: the leases of the slices this manager works on.
    slice_leases: std::collections::BTreeMap<u32, Lease>,
    /// Sharing: when the slice leases were last renewed (sent).
    slices_renewed: Instant,
    /// Sharing: the count of resumes last seen (`<name>/resumed`).
    seen_resumes: u64,
    /// Sharing, on the coordinator: every slice's checkpoint of the active generation and of
    /// a rebuild's, for the status, and when they were read.
    shared_view: Option<(Instant, Cursor, Option<Cursor>)>,
    lag_ms: i64,
    last_error: Option<String>,
    failed_event: Option<FailedEvent>,
    dead_letters: u64,
    lease: Option<Lease>,
    renewed: Instant,
    rebuild: Option<Rebuild>,
    last_rebuild_events: u64,
    /// A replaced generation waiting to be retired, and when (ms since the epoch).
    retire: Option<(u64, i64)>,
    last_request: Option<AppliedRequest>,
    /// Failed steps of the background task in a row.
    failures: u32,
    /// When requests and the feed head were last read.
    last_poll: Instant,
    /// Whether the next step must read them (after an idle step).
    poll_due: bool,
}

impl Runner {
    fn new(name: String, slices: u32, share: bool) -> Self {
        Runner {
            name,
            loaded: false,
            generation: 1,
            slices: slices.max(1),
            cursor: Cursor::new(),
            state: ProjectionState::Stopped,
            processed: 0,
            heads: Cursor::new(),
            turn: 0,
            share,
            slice_leases: Default::default(),
            slices_renewed: Instant::now(),
            seen_resumes: 0,
            shared_view: None,
            lag_ms: 0,
            last_error: None,
            failed_event: None,
            dead_letters: 0,
            lease: None,
            renewed: Instant::now(),
            rebuild: None,
            last_rebuild_events: 0,
            retire: None,
            last_request: None,
            failures: 0,
            last_poll: Instant::now(),
            poll_due: true,
        }
    }

    fn generation_key(&self) -> String {
        super::generation_key(&self.name)
    }

    /// Where a generation's checkpoint of one slice is saved (the position to resume from).
    /// A feed of one slice keeps the name it had before slices, so such a store's checkpoints
    /// carry on.
    fn checkpoint_key(&self, generation: u64, slice: u32) -> String {
        super::checkpoint_name(&self.name, generation, slice, self.slices)
    }

    /// The checkpoint of `generation`: the rebuild's or the active one's.
    fn cursor_of(&self, generation: u64) -> &Cursor {
        match &self.rebuild {
            Some(r) if r.generation == generation => &r.cursor,
            _ => &self.cursor,
        }
    }

    /// The slices in which `generation` is behind the heads last read, of those this manager
    /// works on.
    fn lagging(&self, generation: u64) -> Vec<u32> {
        let cursor = self.cursor_of(generation);
        self.heads
            .iter()
            .filter(|&(slice, head)| head > cursor.get(slice) && self.works_on(slice))
            .map(|(slice, _)| slice)
            .collect()
    }

    /// Whether this manager applies `slice` now: it holds the slice's lease (sharing) or the
    /// projection's (not sharing).
    fn works_on(&self, slice: u32) -> bool {
        if self.share {
            self.slice_leases.contains_key(&slice)
        } else {
            self.lease.is_some()
        }
    }

    /// The active generation's checkpoint as the status shows it: this manager's own, or,
    /// sharing, every slice's as last read from the store.
    fn view(&self) -> Cursor {
        match &self.shared_view {
            Some((_, cursor, _)) if self.share => {
                let mut view = cursor.clone();
                for (slice, position) in self.cursor.iter() {
                    if self.works_on(slice) {
                        view.advance(slice, position);
                    }
                }
                view
            }
            _ => self.cursor.clone(),
        }
    }

    /// The fence that writes for `slice` are made under, while this manager works on it.
    fn fence_for(&self, slice: u32) -> Option<Fence> {
        if self.share {
            self.slice_leases.get(&slice).map(Fence::of)
        } else {
            self.lease.as_ref().map(Fence::of)
        }
    }

    fn lease_name(&self) -> String {
        format!("projection/{}", self.name)
    }

    fn status(&self, owner: &str) -> ProjectionStatus {
        let view = self.view();
        ProjectionStatus {
            name: self.name.clone(),
            state: self.state,
            generation: self.generation,
            consumed: view.total(),
            head: self.heads.total(),
            heads: self.heads.clone(),
            lag_events: view.behind(&self.heads),
            cursor: view,
            held: if self.share {
                self.slice_leases.keys().copied().collect()
            } else if self.lease.is_some() {
                all_slices(self.slices)
            } else {
                Vec::new()
            },
            lag_ms: self.lag_ms,
            processed: self.processed,
            last_error: self.last_error.clone(),
            failed_event: self.failed_event.clone(),
            rebuild: self.rebuild.as_ref().map(|r| {
                let done = match &self.shared_view {
                    Some((_, _, Some(rebuilt))) => rebuilt.total().max(r.done),
                    _ => r.done,
                };
                let secs = r.started.elapsed().as_secs_f64().max(1e-3);
                let rate = done as f64 / secs;
                let left = r.total.saturating_sub(done) as f64;
                RebuildProgress {
                    generation: r.generation,
                    done,
                    total: r.total,
                    rate,
                    eta_secs: if rate > 0.0 { left / rate } else { 0.0 },
                }
            }),
            dead_letters: self.dead_letters,
            owner: owner.to_owned(),
            updated_at: now_millis(),
            last_request: self.last_request,
        }
    }
}

/// What one step of a projection achieved.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Applied (or skipped) this many events.
    Progress(usize),
    /// Nothing to do now.
    Idle,
}

fn projection_error(name: &str, e: crate::error::BoxError) -> Error {
    Error::store("projection", format!("projection `{name}`"), e)
}

impl ProjectionManager {
    /// A builder over the stores it needs: events (the feed), checkpoints, leases, and the
    /// projection store for status and requests. One store value often implements all four.
    pub fn builder(
        events: Arc<dyn EventStore>,
        checkpoints: Arc<dyn CheckpointStore>,
        leases: Arc<dyn LeaseStore>,
        store: Arc<dyn ProjectionStore>,
    ) -> ProjectionManagerBuilder {
        ProjectionManagerBuilder {
            events,
            checkpoints,
            leases,
            store,
            projections: Vec::new(),
            config: Config {
                id: uuid::Uuid::new_v4().to_string(),
                batch_size: 1_000,
                poll: Duration::from_millis(100),
                lease_ttl: Duration::from_secs(10),
                policy: ErrorPolicy::Stop,
                stall_after: 3,
                retire_after: DEFAULT_RETIRE_AFTER,
                share: false,
            },
        }
    }

    fn slot(&self, name: &str) -> Result<&Arc<Slot>> {
        self.inner.slots.get(name).ok_or_else(|| Error::Config {
            field: "projection".into(),
            reason: format!("no projection named `{name}` is registered with this manager"),
        })
    }

    /// The names of the registered projections.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.inner.slots.keys().cloned().collect();
        names.sort();
        names
    }

    /// Starts one background task per projection; they run until [`stop`](Self::stop).
    pub fn start(&self) {
        let mut tasks = self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if tasks.iter().any(|t| !t.is_finished()) {
            return; // already running
        }
        tasks.clear();
        for slot in self.inner.slots.values() {
            let (inner, slot) = (self.inner.clone(), slot.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let step = {
                        let mut runner = slot.runner.lock().await;
                        let step = inner.step(&slot, &mut runner).await;
                        inner.count_failures(&mut runner, step.as_ref().err()).await;
                        step
                    };
                    match step {
                        Ok(Step::Progress(_)) => tokio::task::yield_now().await,
                        Ok(Step::Idle) => tokio::time::sleep(inner.config.poll).await,
                        Err(_) => tokio::time::sleep(inner.config.poll * 5).await,
                    }
                }
            }));
        }
    }

    /// Stops the background tasks, releases the leases and publishes `stopped`.
    pub async fn stop(&self) {
        let tasks =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        for slot in self.inner.slots.values() {
            let mut runner = slot.runner.lock().await;
            if let Some(lease) = runner.lease.take() {
                let _ = self.inner.leases.release(&lease).await;
            }
            if runner.share {
                for lease in std::mem::take(&mut runner.slice_leases).into_values() {
                    let _ = self.inner.leases.release(&lease).await;
                }
                let group = runner.group();
                let _ = self.inner.leases.leave(&group, &self.inner.config.id).await;
            }
            runner.state = ProjectionState::Stopped;
            let _ = self
                .inner
                .store
                .save_status(&runner.status(&self.inner.config.id))
                .await;
        }
    }

    /// Processes `name` until it has nothing left to do right now (caught up, paused, failed,
    /// or held by another manager), and returns its status. Useful in tests and tools; the
    /// background tasks of [`start`](Self::start) do the same continuously.
    pub async fn catch_up(&self, name: &str) -> Result<ProjectionStatus> {
        let slot = self.slot(name)?;
        loop {
            let mut runner = slot.runner.lock().await;
            match self.inner.step(slot, &mut runner).await? {
                Step::Progress(_) => continue,
                Step::Idle => return Ok(runner.status(&self.inner.config.id)),
            }
        }
    }

    /// Rebuilds `name` blue/green and waits until the new generation is active; returns the
    /// number of events the rebuild processed. Queries keep reading the old generation
    /// until the switch.
    ///
    /// Only the projection's lease holder rebuilds. When another manager holds the lease and
    /// keeps it for a lease TTL (it is alive), this returns [`Error::HeldElsewhere`] naming
    /// it; [`request`](Self::request) asks that manager instead.
    pub async fn rebuild(&self, name: &str) -> Result<u64> {
        let slot = self.slot(name)?;
        let held_elsewhere = |holder: Option<ProjectionStatus>, what: &str| Error::HeldElsewhere {
            name: format!("projection `{name}`"),
            holder: holder.map_or_else(|| "unknown".to_owned(), |s| s.owner),
            detail: format!("; {what} (`request(\"{name}\", Control::Rebuild)` asks the holder)"),
        };
        let deadline = Instant::now() + self.inner.config.lease_ttl + self.inner.config.poll;
        loop {
            let mut runner = slot.runner.lock().await;
            if self.inner.hold_lease(&mut runner).await? {
                let request = Request::new(Control::Rebuild);
                self.inner.control(slot, &mut runner, request).await?;
                break;
            }
            drop(runner);
            if Instant::now() >= deadline {
                let holder = self.inner.store.load_status(name).await?;
                let waited = self.inner.config.lease_ttl + self.inner.config.poll;
                return Err(held_elsewhere(
                    holder,
                    &format!("it kept the lease for {waited:?}; nothing was rebuilt"),
                ));
            }
            tokio::time::sleep(self.inner.config.poll).await;
        }
        loop {
            let mut runner = slot.runner.lock().await;
            let step = self.inner.step(slot, &mut runner).await?;
            if runner.lease.is_none() {
                drop(runner);
                let holder = self.inner.store.load_status(name).await?;
                return Err(held_elsewhere(
                    holder,
                    "this manager lost the lease during the rebuild, which stopped unfinished",
                ));
            }
            if runner.state == ProjectionState::Failed {
                let reason = runner
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "the rebuild stopped".into());
                return Err(Error::store(
                    "projection",
                    format!("rebuild of `{name}`"),
                    reason,
                ));
            }
            if runner.rebuild.is_none() {
                return Ok(runner.last_rebuild_events);
            }
            drop(runner);
            if step == Step::Idle {
                tokio::time::sleep(self.inner.config.poll).await;
            }
        }
    }

    /// Pauses `name` (in this manager; other managers get it through [`request`](Self::request)).
    pub async fn pause(&self, name: &str) -> Result<()> {
        self.local_control(name, Control::Pause).await
    }

    /// Resumes `name`; after a failure the failed event is tried again.
    pub async fn resume(&self, name: &str) -> Result<()> {
        self.local_control(name, Control::Resume).await
    }

    /// Moves `name`'s checkpoint in every feed slice to `position`: `reset(name, 1)` replays
    /// the whole feed. With one slice, the position is the feed's.
    pub async fn reset(&self, name: &str, position: u64) -> Result<()> {
        self.local_control(name, Control::ResetTo(position)).await
    }

    /// Moves `name`'s checkpoint in one feed slice to `position` (the next one it reads there),
    /// replaying or skipping that slice's events. A slice the feed does not have is refused
    /// with [`Error::Invalid`].
    pub async fn reset_slice(&self, name: &str, slice: u32, position: u64) -> Result<()> {
        self.local_control(name, Control::ResetSliceTo(slice, position))
            .await
    }

    /// Applies `control` here when this manager holds (or can take) the lease; otherwise
    /// leaves it as a request for the manager that does.
    async fn local_control(&self, name: &str, control: Control) -> Result<()> {
        let slot = self.slot(name)?;
        let mut runner = slot.runner.lock().await;
        if !self.inner.hold_lease(&mut runner).await? {
            drop(runner);
            return self.request(name, control).await.map(drop);
        }
        self.inner
            .control(slot, &mut runner, Request::new(control))
            .await?;
        self.inner.publish(&runner).await
    }

    /// Leaves a request for whichever manager holds `name`'s lease (this one or another
    /// process's); it applies it within a poll interval or two and names its id in
    /// [`ProjectionStatus::last_request`]. A request not yet taken is replaced by a newer one.
    pub async fn request(&self, name: &str, control: Control) -> Result<uuid::Uuid> {
        let request = Request::new(control);
        self.inner.store.request(name, request).await?;
        Ok(request.id)
    }

    /// Healthy unless a projection failed or stalled; reports each projection's state, lease
    /// and lag.
    pub async fn health(&self) -> crate::health::Health {
        let mut health = crate::health::Health::new("projection manager");
        for name in self.names() {
            match self.status(&name).await {
                Ok(s) => {
                    let detail = format!(
                        "{:?}, generation {}, lag {} events{}",
                        s.state,
                        s.generation,
                        s.lag_events,
                        s.last_error
                            .map(|e| format!(", last error: {e}"))
                            .unwrap_or_default()
                    );
                    health.check(
                        format!("projection {name}"),
                        !matches!(s.state, ProjectionState::Failed | ProjectionState::Stalled),
                        detail,
                    );
                }
                Err(e) => {
                    health.check(format!("projection {name}"), false, e.to_string());
                }
            }
        }
        health
    }

    /// Waits until projection `name` has applied `written` (read-your-writes), or fails with
    /// [`Error::Timeout`] after `timeout`; [`Error::Config`] for a projection this manager
    /// does not run. It reads the stores, so it answers the same whichever manager applies
    /// the projection; a process that runs no manager uses [`Visibility`](super::Visibility).
    pub async fn wait_for(
        &self,
        name: &str,
        written: &crate::feed::Written,
        timeout: Duration,
    ) -> Result<()> {
        self.slot(name)?;
        super::Visibility::new(self.inner.events.clone(), self.inner.checkpoints.clone())
            .wait_for(name, written, timeout)
            .await
    }

    /// The current status of `name` in this manager.
    pub async fn status(&self, name: &str) -> Result<ProjectionStatus> {
        let slot = self.slot(name)?;
        let mut runner = slot.runner.lock().await;
        self.inner.load(slot, &mut runner).await?;
        runner.heads = self.inner.events.feed_heads().await?;
        Ok(runner.status(&self.inner.config.id))
    }
}

impl Inner {
    /// Keeps count of the background task's failed steps: each is in `last_error` with the
    /// position it was at, and after `stall_after` in a row the projection reports `stalled`
    /// (health red). The first step that succeeds again clears both.
    async fn count_failures(&self, runner: &mut Runner, error: Option<&Error>) {
        match error {
            None if runner.failures == 0 => {}
            None => {
                tracing::info!(projection = %runner.name, failures = runner.failures, "projection steps succeed again");
                runner.failures = 0;
                if runner.state == ProjectionState::Stalled {
                    runner.state = if runner.rebuild.is_some() {
                        ProjectionState::Rebuilding
                    } else {
                        ProjectionState::Running
                    };
                    runner.last_error = None;
                    let _ = self.publish(runner).await;
                }
            }
            Some(e) => {
                runner.failures += 1;
                let at = match &runner.rebuild {
                    Some(r) => &r.cursor,
                    None => &runner.cursor,
                };
                let error = format!(
                    "`{}`: step failed {} time(s) in a row at cursor {at}: {e}",
                    runner.name, runner.failures
                );
                tracing::warn!(error = %error, "projection step failed; retrying");
                runner.last_error = Some(error);
                if runner.failures >= self.config.stall_after
                    && !matches!(
                        runner.state,
                        ProjectionState::Failed
                            | ProjectionState::Paused
                            | ProjectionState::Standby
                    )
                {
                    runner.state = ProjectionState::Stalled;
                }
                if runner.lease.is_some() {
                    // Best effort: the store may be what fails.
                    let _ = self.publish(runner).await;
                }
            }
        }
    }

    /// Loads the generation and checkpoint the first time a projection is touched.
    async fn load(&self, slot: &Slot, runner: &mut Runner) -> Result<()> {
        if runner.loaded {
            return Ok(());
        }
        runner.generation = self
            .checkpoints
            .load_checkpoint(&runner.generation_key())
            .await?
            .unwrap_or(1);
        runner.cursor = self.load_cursor(runner, runner.generation).await?;
        slot.projection
            .activate(runner.generation)
            .await
            .map_err(|e| projection_error(&runner.name, e))?;
        let retire = self.load_shared(runner, SharedKey::Retire).await?;
        runner.retire = if retire > 0 {
            let at = self.load_shared(runner, SharedKey::RetireAt).await? as i64;
            Some((retire, at))
        } else {
            None
        };
        if !runner.share && runner.rebuild.is_none() {
            // A rebuild the previous holder (or this manager, before a restart) left
            // unfinished goes on from its checkpoints.
            let target = self.load_shared(runner, SharedKey::Rebuild).await?;
            if target > runner.generation {
                tracing::info!(projection = %runner.name, generation = target, "resuming an unfinished rebuild");
                let cursor = self.load_cursor(runner, target).await?;
                runner.rebuild = Some(Rebuild {
                    generation: target,
                    done: cursor.total(),
                    cursor,
                    started: Instant::now(),
                    total: self.events.feed_head().await?,
                });
            }
        }
        // Before anything is applied under a new lease: a fenced read model learns its epoch
        // (sharing: the epoch of each slice's lease, whose name ends in the slice).
        let fences: Vec<Fence> = if runner.share {
            runner.slice_leases.values().map(Fence::of).collect()
        } else {
            runner.lease.iter().map(Fence::of).collect()
        };
        for fence in &fences {
            slot.projection
                .fence(fence)
                .await
                .map_err(|e| projection_error(&runner.name, e))?;
        }
        if runner.share {
            // Other managers moved the slices this one just took.
            if let Some(generation) = runner.rebuild.as_ref().map(|r| r.generation) {
                let cursor = self.load_cursor(runner, generation).await?;
                if let Some(r) = runner.rebuild.as_mut() {
                    r.cursor = cursor;
                }
            }
        }
        if matches!(
            runner.state,
            ProjectionState::Stopped | ProjectionState::Standby
        ) {
            runner.state = if runner.rebuild.is_some() {
                ProjectionState::Rebuilding
            } else {
                ProjectionState::Running
            };
        }
        runner.loaded = true;
        Ok(())
    }

    async fn publish(&self, runner: &Runner) -> Result<()> {
        if runner.share && runner.lease.is_none() {
            return Ok(()); // the coordinator publishes for every manager sharing the slices
        }
        let status = runner.status(&self.config.id);
        metrics::gauge!("keel_projection_lag_events", "projection" => runner.name.clone())
            .set(status.lag_events as f64);
        if let Some(r) = &status.rebuild {
            metrics::gauge!("keel_projection_rebuild_done", "projection" => runner.name.clone())
                .set(r.done as f64);
        }
        self.store.save_status(&status).await
    }

    /// Applies an operator's request, and records it for the status when it took effect
    /// under the held lease.
    async fn control(&self, slot: &Slot, runner: &mut Runner, request: Request) -> Result<()> {
        self.apply_control(slot, runner, request.control).await?;
        if let Some(lease) = &runner.lease {
            runner.last_request = Some(AppliedRequest {
                id: request.id,
                control: request.control,
                applied_at: now_millis(),
                epoch: lease.epoch,
            });
        }
        Ok(())
    }

    async fn apply_control(
        &self,
        slot: &Slot,
        runner: &mut Runner,
        control: Control,
    ) -> Result<()> {
        self.load(slot, runner).await?;
        tracing::info!(projection = %runner.name, ?control, "projection control");
        match control {
            Control::Pause => {
                if runner.share && !self.save_shared(runner, SharedKey::Paused, 1).await? {
                    return Ok(());
                }
                runner.state = ProjectionState::Paused
            }
            Control::Resume => {
                if runner.share {
                    // Every manager sharing the projection resumes, and retries its failed event.
                    let resumes = self.load_shared(runner, SharedKey::Resumed).await? + 1;
                    if !self.save_shared(runner, SharedKey::Paused, 0).await?
                        || !self
                            .save_shared(runner, SharedKey::Resumed, resumes)
                            .await?
                    {
                        return Ok(());
                    }
                    runner.seen_resumes = resumes;
                }
                runner.state = if runner.rebuild.is_some() {
                    ProjectionState::Rebuilding
                } else {
                    ProjectionState::Running
                };
                runner.failed_event = None;
            }
            Control::ResetTo(_) | Control::ResetSliceTo(..) => {
                let (slices, position) = match control {
                    Control::ResetSliceTo(slice, position) => {
                        if slice >= runner.slices {
                            return Err(Error::Invalid {
                                type_name: "Control::ResetSliceTo",
                                reason: format!(
                                    "slice {slice} does not exist: the feed has {} slice(s)",
                                    runner.slices
                                ),
                            });
                        }
                        (vec![slice], position)
                    }
                    Control::ResetTo(position) => (all_slices(runner.slices), position),
                    _ => unreachable!("matched above"),
                };
                let mut cursor = runner.cursor.clone();
                for &slice in &slices {
                    cursor.set(slice, position.max(1) - 1);
                }
                let generation = runner.generation;
                if !self
                    .save_cursor(runner, generation, &cursor, &slices)
                    .await?
                {
                    return Ok(()); // fenced: the request was taken by a stale holder; drop it
                }
                runner.cursor = cursor;
                runner.failed_event = None;
                if runner.state == ProjectionState::Failed {
                    runner.state = ProjectionState::Running;
                }
            }
            Control::ReplayDeadLetters => self.replay_dead_letters(slot, runner, None).await?,
            Control::ReplayDeadLetter(slice, position) => {
                self.replay_dead_letters(slot, runner, Some((slice, position)))
                    .await?
            }
            Control::Rebuild => {
                if runner.rebuild.is_none() {
                    let generation = runner.generation + 1;
                    slot.projection
                        .reset(generation)
                        .await
                        .map_err(|e| projection_error(&runner.name, e))?;
                    // Recorded after the reset, so that nothing applies to the generation
                    // before it is clean: sharing, the other managers start on their slices
                    // when they read it; and a manager that takes the lease after a restart
                    // resumes the rebuild from its checkpoints instead of losing it.
                    if !self
                        .save_shared(runner, SharedKey::Rebuild, generation)
                        .await?
                    {
                        return Ok(());
                    }
                    runner.rebuild = Some(Rebuild {
                        generation,
                        cursor: Cursor::new(),
                        started: Instant::now(),
                        done: 0,
                        total: self.events.feed_head().await?,
                    });
                    runner.state = ProjectionState::Rebuilding;
                    runner.failed_event = None;
                }
            }
        }
        Ok(())
    }

    /// Applies dead letters' events again (all, or the one at `only`: slice and position) to
    /// the active generation, and removes each letter whose event now applies. A letter whose
    /// event fails again stays; its error becomes the status's `last_error`. The events are
    /// applied after later events of their streams: replaying suits projections whose writes
    /// do not depend on the order within a stream, or an operator who knows the event now
    /// fits.
    async fn replay_dead_letters(
        &self,
        slot: &Slot,
        runner: &mut Runner,
        only: Option<(u32, u64)>,
    ) -> Result<()> {
        let letters = self.store.dead_letters(&runner.name).await?;
        let generation = runner.generation;
        let mut seen = std::collections::HashSet::new();
        let (mut replayed, mut failing) = (0u64, 0u64);
        for letter in letters {
            let at = (letter.event.slice, letter.event.position);
            if only.is_some_and(|o| o != at) || !seen.insert(at) {
                continue;
            }
            let (slice, position) = at;
            let mut events = self.events.read_slice(slice, position);
            let event = match futures::TryStreamExt::try_next(&mut events).await? {
                Some(e) if e.position == Some(position) => e,
                _ => {
                    failing += 1;
                    runner.last_error = Some(format!(
                        "dead letter `{}` version {}: no event at position {position} of slice                          {slice} any more",
                        letter.event.stream, letter.event.version
                    ));
                    continue;
                }
            };
            let applied = match super::deliver(&*slot.projection, generation, &event).await {
                Ok(()) => slot.projection.commit(generation).await,
                Err(e) => Err(e),
            };
            match applied {
                Ok(()) => {
                    self.store
                        .remove_dead_letter(&runner.name, slice, position)
                        .await?;
                    replayed += 1;
                }
                Err(e) => {
                    failing += 1;
                    runner.last_error = Some(format!(
                        "replaying dead letter `{}` version {} failed again: {e}",
                        event.stream, event.version
                    ));
                }
            }
        }
        if let (Some((slice, position)), 0, 0) = (only, replayed, failing) {
            return Err(Error::Invalid {
                type_name: "Control::ReplayDeadLetter",
                reason: format!(
                    "projection `{}` has no dead letter at position {position} of slice {slice}",
                    runner.name
                ),
            });
        }
        runner.dead_letters = runner.dead_letters.saturating_sub(replayed);
        tracing::info!(projection = %runner.name, replayed, failing, "dead letters replayed");
        Ok(())
    }

    /// Saves a checkpoint under the held lease's fence. `false`: the store refused it, because
    /// another manager took the lease over; this one lets go and applies nothing more.
    async fn save_fenced(&self, runner: &mut Runner, key: &str, position: u64) -> Result<bool> {
        let Some(lease) = runner.lease.as_ref() else {
            return Ok(false);
        };
        match self
            .checkpoints
            .save_checkpoint(key, position, &Fence::of(lease))
            .await
        {
            Ok(()) => Ok(true),
            Err(e) if e.is_fenced() => {
                Self::let_go(runner, &e);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Saves the positions of `slices` in `cursor` as `generation`'s checkpoints, all at once,
    /// under the held lease's fence. `false`: a save was refused (another manager has the
    /// lease) and this one let go.
    async fn save_cursor(
        &self,
        runner: &mut Runner,
        generation: u64,
        cursor: &Cursor,
        slices: &[u32],
    ) -> Result<bool> {
        let fences: Vec<Option<Fence>> = slices.iter().map(|&s| runner.fence_for(s)).collect();
        let elsewhere: Vec<u32> = slices
            .iter()
            .zip(&fences)
            .filter(|(_, f)| f.is_none())
            .map(|(s, _)| *s)
            .collect();
        if runner.share && !elsewhere.is_empty() {
            return Err(Error::Invalid {
                type_name: "projection reset",
                reason: format!(
                    "`{}` shares its slices, and slice(s) {elsewhere:?} are held by other managers: \
                     stop them (or reset while only this manager runs the projection)",
                    runner.name
                ),
            });
        }
        if fences.iter().any(Option::is_none) {
            return Ok(false);
        }
        let saves = slices.iter().zip(&fences).map(|(&slice, fence)| {
            let key = runner.checkpoint_key(generation, slice);
            let fence = fence.as_ref().expect("checked above");
            async move {
                self.checkpoints
                    .save_checkpoint(&key, cursor.next(slice), fence)
                    .await
            }
        });
        let results = futures::future::join_all(saves).await;
        let mut fenced = None;
        for result in results {
            match result {
                Ok(()) => {}
                Err(e) if e.is_fenced() => fenced = Some(e),
                Err(e) => return Err(e),
            }
        }
        if let Some(e) = fenced {
            Self::let_go(runner, &e);
            return Ok(false);
        }
        Ok(true)
    }

    /// The checkpoint of `generation`, one saved position per slice.
    async fn load_cursor(&self, runner: &Runner, generation: u64) -> Result<Cursor> {
        let loads = all_slices(runner.slices).into_iter().map(|slice| {
            let key = runner.checkpoint_key(generation, slice);
            async move {
                let next = self.checkpoints.load_checkpoint(&key).await?;
                Ok::<_, Error>((slice, next.unwrap_or(1).saturating_sub(1)))
            }
        });
        Ok(futures::future::try_join_all(loads)
            .await?
            .into_iter()
            .collect())
    }

    /// Drops a lease that a store (or the read model) says is stale.
    fn let_go(runner: &mut Runner, why: &dyn std::fmt::Display) {
        tracing::warn!(projection = %runner.name, %why, "projection fenced out; applying stops");
        runner.lease = None;
        runner.slice_leases.clear();
        runner.loaded = false;
    }

    /// Whether the held lease is still this manager's by its own clock: `renewed` is when the
    /// last successful renewal was *sent*, so the store's TTL ran out no earlier than
    /// `renewed + ttl`; a tenth of the TTL is kept back for clocks that run at other rates.
    /// A manager that was stalled (a long GC pause, SIGSTOP, an overloaded host) past that
    /// point stops applying at once, before it hears that another manager took over.
    fn lease_current(&self, runner: &Runner) -> bool {
        let ttl = self.config.lease_ttl;
        runner.lease.is_some() && runner.renewed.elapsed() < ttl - ttl / 10
    }

    /// Keeps this manager's lease on the projection; `false` when another manager holds it.
    async fn hold_lease(&self, runner: &mut Runner) -> Result<bool> {
        let ttl = self.config.lease_ttl;
        match runner.lease.clone() {
            Some(_) if runner.renewed.elapsed() < ttl / 3 => Ok(true),
            Some(lease) => {
                let sent = Instant::now();
                if self.lease_current(runner) && self.leases.renew(&lease).await? {
                    runner.renewed = sent;
                    Ok(true)
                } else {
                    tracing::warn!(projection = %runner.name, "projection lease lost or expired; applying stops");
                    runner.lease = None;
                    runner.loaded = false; // the next holder moved the checkpoint on: reload
                    Ok(false)
                }
            }
            None => {
                let sent = Instant::now();
                let acquired = self
                    .leases
                    .acquire(&runner.lease_name(), &self.config.id, ttl)
                    .await?;
                Ok(Self::took(runner, acquired, sent))
            }
        }
    }

    /// Records a lease `acquire` returned (sent at `sent`); `false` when somebody else has it.
    fn took(runner: &mut Runner, acquired: Option<Lease>, sent: Instant) -> bool {
        match acquired {
            Some(lease) => {
                runner.lease = Some(lease);
                runner.renewed = sent;
                runner.loaded = false;
                true
            }
            None => false,
        }
    }

    async fn step(&self, slot: &Slot, runner: &mut Runner) -> Result<Step> {
        // Requests are looked at after every idle step and at least every POLL_EVERY while
        // busy, so a long catch-up does not pay a request read per batch.
        // Only the lease holder takes requests: a standby would take (and lose) requests meant
        // for the manager that runs the projection.
        let poll = runner.poll_due || runner.last_poll.elapsed() >= POLL_EVERY;
        // Sharing, the projection's lease makes the coordinator, and slice leases the work.
        let coordinator = self.hold_lease(runner).await?;
        if runner.share {
            self.hold_slices(runner).await?;
        }
        let working = runner.share && !runner.slice_leases.is_empty();
        if !coordinator && !working {
            // A standby publishes nothing: the stored status is the holder's.
            runner.state = ProjectionState::Standby;
            runner.poll_due = true;
            return Ok(Step::Idle);
        }
        self.load(slot, runner).await?;
        if poll {
            if coordinator {
                if let Some(request) = self.store.take_request(&runner.name).await? {
                    let taken = self.control(slot, runner, request).await;
                    if let Err(e) = taken {
                        // A request that cannot be applied (a reset of slices held
                        // elsewhere) is reported, not retried.
                        tracing::warn!(projection = %runner.name, error = %e, "request refused");
                        runner.last_error = Some(format!("request refused: {e}"));
                    }
                    if runner.lease.is_none() && !runner.share {
                        return Ok(Step::Idle);
                    }
                }
            }
            if runner.share {
                self.sync_shared(slot, runner).await?;
            }
            if coordinator {
                self.retire_due(slot, runner).await?;
            }
        }
        if runner.state == ProjectionState::Standby || runner.state == ProjectionState::Stopped {
            runner.state = if runner.rebuild.is_some() {
                ProjectionState::Rebuilding
            } else {
                ProjectionState::Running
            };
        }
        // The heads are a cheap read, and both the status's lag and which slices to read
        // depend on them: read them every step.
        runner.heads = self.events.feed_heads().await?;
        if poll {
            runner.last_poll = Instant::now();
            runner.poll_due = false;
        }
        if matches!(
            runner.state,
            ProjectionState::Paused | ProjectionState::Failed
        ) {
            self.publish(runner).await?;
            runner.poll_due = true;
            return Ok(Step::Idle);
        }
        let state_before = runner.state;
        let step = match runner.rebuild.as_ref().map(|r| r.generation) {
            Some(generation) => {
                // A rebuild reads history in larger batches: fewer checkpoint writes and
                // fewer new feed reads.
                let n = self
                    .batches(slot, runner, generation, self.config.batch_size * 16)
                    .await?;
                // `runner.lease` is gone when the batch stopped for a lost lease.
                let going = (runner.lease.is_some() || runner.share)
                    && runner.state != ProjectionState::Failed;
                if runner.share {
                    // The coordinator switches once every slice, whoever holds it, caught up.
                    if n == 0 && poll && runner.lease.is_some() {
                        self.try_swap_shared(slot, runner).await?;
                    }
                } else if n == 0 && going {
                    self.swap(slot, runner).await?;
                }
                // The generation that queries read keeps getting new events until the swap:
                // one live batch after each rebuild batch.
                // Sharing, this manager's slices may be rebuilt while others' are not: its live
                // batches go on while it waits for the switch.
                let waiting = runner.share && runner.rebuild.is_some();
                let live = if going && (n > 0 || waiting) {
                    // The rebuild may have read events newer than the heads this step began
                    // with: look again, so the live generation gets them too.
                    runner.heads = self.events.feed_heads().await?;
                    let live = runner.generation;
                    self.batches(slot, runner, live, self.config.batch_size)
                        .await?
                } else {
                    0
                };
                if runner.share && n + live == 0 && runner.rebuild.is_some() {
                    // Sharing: this manager's slices are rebuilt; the others' are not yet.
                    Step::Idle
                } else {
                    Step::Progress((n + live).max(1))
                }
            }
            None => {
                let generation = runner.generation;
                let n = self
                    .batches(slot, runner, generation, self.config.batch_size)
                    .await?;
                if n == 0 {
                    Step::Idle
                } else {
                    Step::Progress(n)
                }
            }
        };
        if step == Step::Idle {
            runner.poll_due = true;
        }
        if poll || step == Step::Idle || runner.state != state_before {
            self.publish(runner).await?;
        }
        Ok(step)
    }

    /// Notes that generation `replaced` is to be retired `retire_after` from now (the note
    /// survives a restart). A generation replaced before the last one was retired is
    /// covered: `retire` drops every generation up to the one it is given.
    async fn schedule_retire(&self, runner: &mut Runner, replaced: u64) -> Result<()> {
        let at = now_millis() + self.config.retire_after.as_millis() as i64;
        if self
            .save_shared(runner, SharedKey::RetireAt, at.max(0) as u64)
            .await?
            && self
                .save_shared(runner, SharedKey::Retire, replaced)
                .await?
        {
            runner.retire = Some((replaced, at));
        }
        Ok(())
    }

    /// Retires the replaced generation once its grace is over (the holder, at a poll).
    async fn retire_due(&self, slot: &Slot, runner: &mut Runner) -> Result<()> {
        let Some((generation, at)) = runner.retire else {
            return Ok(());
        };
        if now_millis() < at || generation >= runner.generation {
            return Ok(());
        }
        slot.projection
            .retire(generation)
            .await
            .map_err(|e| projection_error(&runner.name, e))?;
        tracing::info!(projection = %runner.name, generation, "replaced generation retired");
        if self.save_shared(runner, SharedKey::Retire, 0).await? {
            runner.retire = None;
        }
        Ok(())
    }

    /// The rebuilt generation has caught up: make it the active one.
    async fn swap(&self, slot: &Slot, runner: &mut Runner) -> Result<()> {
        let Some(rebuild) = runner.rebuild.as_ref() else {
            return Ok(());
        };
        let (generation, cursor) = (rebuild.generation, rebuild.cursor.clone());
        let generation_key = runner.generation_key();
        let slices = all_slices(runner.slices);
        if !self
            .save_cursor(runner, generation, &cursor, &slices)
            .await?
            || !self
                .save_fenced(runner, &generation_key, generation)
                .await?
            || !self.save_shared(runner, SharedKey::Rebuild, 0).await?
        {
            return Ok(()); // the next holder finishes the rebuild
        }
        let Some(rebuild) = runner.rebuild.take() else {
            return Ok(());
        };
        slot.projection
            .activate(rebuild.generation)
            .await
            .map_err(|e| projection_error(&runner.name, e))?;
        let replaced = runner.generation;
        self.schedule_retire(runner, replaced).await?;
        tracing::info!(projection = %runner.name, generation = rebuild.generation, events = rebuild.done, "rebuild complete; generation active");
        runner.generation = rebuild.generation;
        runner.cursor = rebuild.cursor;
        runner.last_rebuild_events = rebuild.done;
        runner.state = ProjectionState::Running;
        Ok(())
    }

    /// Applies the slices in which `generation` is behind the heads, about `size` events in
    /// all, and checkpoints each slice it moved; returns how many events were consumed. Up to
    /// [`SLICES_AT_ONCE`] lagging slices are read at once, merged as they arrive (each in its
    /// own order; there is no order across slices), taken in turn across steps: a step is
    /// short, so status, requests and the live generation during a rebuild are never kept
    /// waiting long, and a rebuild over many slices is not one slice's read latency after
    /// another. Stops early when the lease is gone or the projection failed.
    async fn batches(
        &self,
        slot: &Slot,
        runner: &mut Runner,
        generation: u64,
        size: usize,
    ) -> Result<usize> {
        let mut lagging = runner.lagging(generation);
        let turn = runner.turn;
        lagging.sort_by_key(|&slice| slice.wrapping_sub(turn) % runner.slices);
        lagging.truncate(SLICES_AT_ONCE);
        let Some(&last_slice) = lagging.last() else {
            return Ok(0);
        };
        runner.turn = last_slice + 1;
        let cursor = runner.cursor_of(generation).clone();
        // The lease each slice is applied under. A slice whose lease changes during the step
        // (lost, even if taken again) is neither applied nor checkpointed any more: what this
        // step read for it may be behind what a successor has since saved.
        let under: HashMap<u32, Fence> = lagging
            .iter()
            .filter_map(|&slice| runner.fence_for(slice).map(|fence| (slice, fence)))
            .collect();
        // Where each slice's checkpoint goes, and how many events moved it.
        let mut next: HashMap<u32, (u64, usize)> =
            lagging.iter().map(|&s| (s, (cursor.next(s), 0))).collect();
        // Applied a chunk at a time as the feed delivers it, so a store that reads ahead (the
        // ScyllaDB feed fetches its next page while this one is consumed) reads while events
        // are applied, instead of reading the whole batch first.
        let mut chunks = self
            .events
            .read_slices(&lagging, &cursor)
            .take(size)
            .try_chunks(APPLY_CHUNK);
        let span = tracing::debug_span!("keel.project", projection = %runner.name, generation,
            slices = lagging.len(), events = tracing::field::Empty);
        // An event the feed could not read (a store yields every event of its slice before an
        // unreadable one, then its error): it goes to the error policy once what came before
        // it is applied.
        let mut unreadable = None;
        let mut total = 0;
        loop {
            let (chunk, last) = match chunks.try_next().await {
                Ok(Some(chunk)) => (chunk, false),
                Ok(None) => break,
                Err(futures::stream::TryChunksError(before, e)) => {
                    let about_one_event = e.event().is_some();
                    if !about_one_event && before.is_empty() && total == 0 {
                        return Err(e); // not about one event: the step fails and is retried
                    }
                    if about_one_event {
                        unreadable = Some(e);
                    }
                    // Apply and commit what was read, and read nothing after the error; a
                    // failure that is not about one event comes back on the next step's read.
                    (before, true)
                }
            };
            if !chunk.is_empty() {
                // Long batches renew as they go (a third of the TTL after the last renewal);
                // a slice lost meanwhile is neither applied nor checkpointed any more.
                if !self.keep_working(runner).await? {
                    return Ok(0);
                }
                next.retain(|&slice, _| Self::still_under(runner, &under, slice));
                let chunk: Vec<RecordedEvent> = chunk
                    .into_iter()
                    .filter(|e| next.contains_key(&e.slice))
                    .collect();
                let (applied, _) = self
                    .apply_batch(slot, runner, generation, &chunk)
                    .instrument(span.clone())
                    .await?;
                for e in &chunk[..applied] {
                    if let (Some(at), Some(position)) = (next.get_mut(&e.slice), e.position) {
                        *at = (position + 1, at.1 + 1);
                    }
                }
                total += applied;
                if applied < chunk.len() {
                    unreadable = None; // stopped at a failed event before the unreadable one
                    break;
                }
            }
            if last {
                break;
            }
        }
        if let Some(e) = unreadable {
            let slice = e
                .event()
                .map(|(stream, ..)| crate::feed::slice_of(stream, runner.slices));
            if let Some((slice, &(at, n))) =
                slice.and_then(|s| next.get(&s).map(|entry| (s, entry)))
            {
                if self.work_current(runner) && self.unreadable(runner, &e, slice, at).await? {
                    // Dead-lettered: the checkpoint moves past it.
                    next.insert(slice, (at + 1, n + 1));
                    total += 1;
                }
            }
        }
        span.record("events", total);
        let applied = next
            .into_iter()
            .map(|(slice, (next, consumed))| Applied {
                slice,
                consumed,
                next,
            })
            .collect();
        self.checkpoint(slot, runner, generation, applied, &under)
            .await
    }

    /// Whether `slice` is still applied under the lease it was when the step began.
    fn still_under(runner: &Runner, under: &HashMap<u32, Fence>, slice: u32) -> bool {
        runner.fence_for(slice).as_ref() == under.get(&slice)
    }

    /// Renews what this manager applies under (its slice leases, or the projection's lease)
    /// when due; `false` once it has lost the right to apply anything.
    async fn keep_working(&self, runner: &mut Runner) -> Result<bool> {
        if runner.share {
            self.hold_slices(runner).await?;
            Ok(self.work_current(runner))
        } else {
            self.hold_lease(runner).await
        }
    }

    /// Commits `generation`'s read model and saves the checkpoints of the slices `applied` in
    /// one step, concurrently (one checkpoint write after another cost a round trip per slice
    /// in every step); returns the events those checkpoints cover. The leases are checked
    /// again first: a manager that stalled mid-step must not write once another may have
    /// taken over, and a slice whose lease changed since the step began (`under`) is not
    /// checkpointed, even when this manager has taken it again.
    async fn checkpoint(
        &self,
        slot: &Slot,
        runner: &mut Runner,
        generation: u64,
        applied: Vec<Applied>,
        under: &HashMap<u32, Fence>,
    ) -> Result<usize> {
        if applied.iter().all(|a| a.consumed == 0) || !self.keep_working(runner).await? {
            return Ok(0);
        }
        let kept: Vec<Applied> = applied
            .into_iter()
            .filter(|a| a.consumed > 0 && Self::still_under(runner, under, a.slice))
            .collect();
        if kept.is_empty() {
            return Ok(0);
        }
        if let Err(e) = slot.projection.commit(generation).await {
            if is_keel(&*e, Error::is_fenced) {
                Self::let_go(runner, &e);
                return Ok(0);
            }
            return Err(projection_error(&runner.name, e));
        }
        let saves = kept.iter().map(|a| {
            let fence = runner.fence_for(a.slice);
            let key = runner.checkpoint_key(generation, a.slice);
            async move {
                match fence {
                    Some(fence) => {
                        Some(self.checkpoints.save_checkpoint(&key, a.next, &fence).await)
                    }
                    None => None,
                }
            }
        });
        let results = futures::future::join_all(saves).await;
        let (mut total, mut failed) = (0, None);
        for (a, result) in kept.into_iter().zip(results) {
            let saved = match result {
                None => false,
                Some(result) => match self.saved(runner, a.slice, result) {
                    Ok(saved) => saved,
                    Err(e) => {
                        failed.get_or_insert(e);
                        false
                    }
                },
            };
            if !saved {
                continue;
            }
            match runner.rebuild.as_mut() {
                Some(r) if r.generation == generation => {
                    r.cursor.set(a.slice, a.next - 1);
                    r.done += a.consumed as u64;
                }
                _ => runner.cursor.set(a.slice, a.next - 1),
            }
            runner.processed += a.consumed as u64;
            total += a.consumed;
        }
        metrics::counter!("keel_projection_events_total", "projection" => runner.name.clone())
            .increment(total as u64);
        match failed {
            Some(e) => Err(e),
            None => Ok(total),
        }
    }

    /// An event at `position` of `slice` that the feed could not read, under the error
    /// policy: `false` when the projection stops on it, `true` when it was dead-lettered and
    /// is passed.
    async fn unreadable(
        &self,
        runner: &mut Runner,
        e: &Error,
        slice: u32,
        position: u64,
    ) -> Result<bool> {
        let (stream, version, event_type) = e.event().expect("an error about one event");
        if e.is_shredded() {
            tracing::debug!(projection = %runner.name, stream = %stream, version, "shredded event skipped");
            return Ok(true);
        }
        let failed = FailedEvent {
            stream: stream.to_string(),
            version,
            event_type: event_type.unwrap_or("unknown").to_owned(),
            position,
            slice,
        };
        let error = format!(
            "`{}` cannot read `{}` version {} at position {position} of slice {slice}: {e}",
            runner.name, failed.stream, failed.version
        );
        self.poison(runner, failed, error).await
    }

    /// A failed event under the error policy: `false` when the projection stops on it,
    /// `true` when it was dead-lettered and processing goes on.
    async fn poison(
        &self,
        runner: &mut Runner,
        failed: FailedEvent,
        error: String,
    ) -> Result<bool> {
        metrics::counter!("keel_projection_errors_total", "projection" => runner.name.clone())
            .increment(1);
        tracing::error!(error = %error, "projection event failed");
        runner.last_error = Some(error.clone());
        match self.config.policy {
            ErrorPolicy::Stop => {
                runner.failed_event = Some(failed);
                runner.state = ProjectionState::Failed;
                Ok(false)
            }
            ErrorPolicy::DeadLetter => {
                self.store
                    .add_dead_letter(&DeadLetter {
                        projection: runner.name.clone(),
                        event: failed,
                        error,
                        at: now_millis(),
                    })
                    .await?;
                runner.dead_letters += 1;
                Ok(true)
            }
        }
    }

    /// Applies events in order; on a failure, stops (or dead-letters) at that event. Returns
    /// the number consumed and the next position.
    async fn apply_batch(
        &self,
        slot: &Slot,
        runner: &mut Runner,
        generation: u64,
        events: &[RecordedEvent],
    ) -> Result<(usize, u64)> {
        let projection = &slot.projection;
        let mut next = events[0].position.unwrap_or(1);
        for (i, event) in events.iter().enumerate() {
            let position = event.position.unwrap_or(next);
            if !self.work_current(runner) {
                // Past the lease by this manager's clock: stop here; the batch renews or
                // gives up before it commits anything.
                return Ok((i, position));
            }
            // `deliver` routes notices and skips events the projection does not handle.
            if let Err(e) = super::deliver(&**projection, generation, event).await {
                if is_keel(&*e, Error::is_fenced) {
                    // The read model refused a write under this lease: another manager
                    // has it. Nothing of this batch is committed.
                    Self::let_go(runner, &e);
                    return Ok((i, position));
                }
                if event.is_shredded() || is_keel(&*e, Error::is_shredded) {
                    // A forgotten subject: nothing to project, and nothing wrong.
                    metrics::counter!(crate::metrics::PROJECTION_SHREDDED, "projection" => runner.name.clone()).increment(1);
                    tracing::debug!(projection = %runner.name, stream = %event.stream,
                        version = event.version, "shredded event skipped");
                    next = position + 1;
                    continue;
                }
                let failed = FailedEvent {
                    stream: event.stream.to_string(),
                    version: event.version,
                    event_type: event.event_type.to_string(),
                    position,
                    slice: event.slice,
                };
                let error = format!(
                    "`{}` failed on `{}` version {} ({}) at position {position} of slice {}: {e}",
                    runner.name, failed.stream, failed.version, failed.event_type, failed.slice
                );
                if !self.poison(runner, failed, error).await? {
                    return Ok((i, position));
                }
            }
            next = position + 1;
        }
        // The lag of the batch's last event: one clock read per batch, not per event.
        if let Some(last) = events.last() {
            runner.lag_ms = now_millis() - last.recorded_at;
        }
        Ok((events.len(), next))
    }
}

/// Whether a projection's error is (or wraps) a Keel error that `kind` recognises.
fn is_keel(error: &(dyn std::error::Error + 'static), kind: fn(&Error) -> bool) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.downcast_ref::<Error>().is_some_and(kind) {
            return true;
        }
        current = e.source();
    }
    false
}
