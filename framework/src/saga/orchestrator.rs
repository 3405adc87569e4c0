//! The [`SagaOrchestrator`]: runs sagas step by step, compensates, recovers after a crash.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::Instrument;
use uuid::Uuid;

use super::{Saga, SagaRecord, SagaState, SagaStatus, SagaStep, SagaStore, StepOutcome, StepState};
use crate::bus::CommandBus;
use crate::error::{Error, Result};
use crate::event::{now_millis, Metadata};
use crate::retry::Backoff;
use crate::store::LeaseStore;

#[derive(Clone)]
struct Config {
    id: String,
    max_attempts: u32,
    resends: u32,
    backoff: Backoff,
    lease_ttl: Duration,
    tick: Duration,
    health_grace: Duration,
}

/// Counters of one orchestrator, as a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SagaMetrics {
    /// Sagas started by this orchestrator.
    pub started: u64,
    /// Sagas it saw complete.
    pub completed: u64,
    /// Sagas it saw fully compensated.
    pub compensated: u64,
    /// Sagas it left in `compensation_failed`.
    pub compensation_failed: u64,
    /// Steps (and compensations) it dispatched.
    pub steps: u64,
    /// Their total latency.
    pub step_latency: Duration,
    /// Times it stopped driving a saga because another orchestrator had taken it over (it
    /// stalled past the lease's time to live): its saves were refused or its lease lost.
    pub fenced: u64,
}

#[derive(Default)]
struct Counters {
    started: AtomicU64,
    completed: AtomicU64,
    compensated: AtomicU64,
    compensation_failed: AtomicU64,
    steps: AtomicU64,
    step_micros: AtomicU64,
    fenced: AtomicU64,
}

/// Configures a [`SagaOrchestrator`].
pub struct SagaOrchestratorBuilder {
    store: Arc<dyn SagaStore>,
    leases: Arc<dyn LeaseStore>,
    bus: CommandBus,
    config: Config,
}

impl SagaOrchestratorBuilder {
    /// How many times a failing compensation is tried before the saga is left in
    /// `compensation_failed` (default 3).
    pub fn max_compensation_attempts(mut self, attempts: u32) -> Self {
        self.config.max_attempts = attempts.max(1);
        self
    }

    /// How many times a synchronous step whose outcome is unknown (it timed out, or its
    /// command ended in [`Error::UnknownOutcome`]) is sent again, with the same command id,
    /// to learn whether it was applied (default 2). When every re-send is unknown too, the
    /// step counts as possibly applied: it is compensated with the steps before it.
    pub fn unknown_outcome_resends(mut self, resends: u32) -> Self {
        self.config.resends = resends;
        self
    }

    /// How long to wait between compensation attempts (default: 100 ms, doubled each time up
    /// to 1 s, with jitter; a bare [`Duration`] is the first delay).
    pub fn retry_backoff(mut self, backoff: impl Into<Backoff>) -> Self {
        self.config.backoff = backoff.into();
        self
    }

    /// The per-saga lease's time to live (default 30 s). The orchestrator renews it every
    /// third of it while it drives the saga, and stops driving if a renewal fails for a whole
    /// time to live (another orchestrator may have taken the saga over).
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.config.lease_ttl = ttl;
        self
    }

    /// How often [`start`](SagaOrchestrator::start)'s background task looks for expired
    /// deadlines and unfinished sagas (default 1 s).
    pub fn tick(mut self, tick: Duration) -> Self {
        self.config.tick = tick;
        self
    }

    /// How long past its deadline a saga may wait before the orchestrator's health as a
    /// [`Component`](crate::lifecycle::Component) reports it (default 60 s; see
    /// [`SagaOrchestrator::health`]).
    pub fn health_grace(mut self, grace: Duration) -> Self {
        self.config.health_grace = grace;
        self
    }

    /// This orchestrator's identity in leases (default: a random UUID).
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.config.id = id.into();
        self
    }

    /// The orchestrator.
    pub fn build(self) -> SagaOrchestrator {
        SagaOrchestrator {
            inner: Arc::new(Inner {
                store: self.store,
                leases: self.leases,
                bus: self.bus,
                config: self.config,
                counters: Counters::default(),
                task: Mutex::new(None),
            }),
        }
    }
}

/// Runs sagas through the command bus and keeps their state in a [`SagaStore`].
///
/// Cloning is cheap and shares everything. Any number of orchestrators may share a store: a
/// lease per saga lets one drive it at a time, and every transition is guarded by the saga's
/// revision.
#[derive(Clone)]
pub struct SagaOrchestrator {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn SagaStore>,
    leases: Arc<dyn LeaseStore>,
    bus: CommandBus,
    config: Config,
    counters: Counters,
    /// The background task, and what tells it to end after its current pass.
    task: Mutex<Option<(tokio::task::JoinHandle<()>, Arc<tokio::sync::Notify>)>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some((task, _)) = self.task.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
    }
}

/// A saga's own id in causation chains (and the correlation id of a saga stored without
/// one): the same for every orchestrator.
pub(crate) fn saga_uuid(saga: &str) -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("keel/saga/{saga}").as_bytes())
}

/// The id of a step's command (`undo`: its compensation): the same on every attempt, so the
/// receiving repository can tell a repeat.
pub(crate) fn command_id(saga: &str, step: &str, undo: bool) -> Uuid {
    let action = if undo { "undo" } else { "do" };
    Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("keel/saga/{saga}/{step}/{action}").as_bytes(),
    )
}

fn encode(saga: &Saga, revision: u64) -> Result<SagaRecord> {
    let data = serde_json::to_vec(saga).map_err(|e| Error::Encode {
        what: format!("saga `{}`", saga.id),
        reason: e.to_string(),
    })?;
    Ok(SagaRecord {
        id: saga.id.clone(),
        revision,
        status: saga.status,
        deadline: saga.deadline,
        data: Bytes::from(data),
    })
}

fn decode(record: &SagaRecord) -> Result<Saga> {
    serde_json::from_slice(&record.data).map_err(|e| {
        Error::store(
            "saga",
            format!("decode saga `{}`", record.id),
            format!("{e} (is every command type of this saga registered with saga_command!?)"),
        )
    })
}

fn state_of(saga: &Saga, revision: u64) -> SagaState {
    SagaState {
        id: saga.id.clone(),
        status: saga.status,
        current_step: (!saga.status.is_finished())
            .then(|| saga.steps.get(saga.current).map(|s| s.id.clone()))
            .flatten(),
        failed_step: saga.failed_step.clone(),
        error: saga.error.clone(),
        steps: saga
            .steps
            .iter()
            .zip(&saga.states)
            .map(|(s, st)| (s.id.clone(), *st))
            .collect(),
        history: saga.history.clone(),
        revision,
        correlation_id: saga.correlation_id.unwrap_or_else(|| saga_uuid(&saga.id)),
        message_id: saga_uuid(&saga.id),
        caused_by: saga.caused_by,
    }
}

impl Saga {
    fn note(&mut self, step: &str, outcome: &str, detail: Option<String>) {
        self.history.push(StepOutcome {
            step: step.to_owned(),
            outcome: outcome.to_owned(),
            detail,
            at: now_millis(),
        });
    }

    fn fail_step(&mut self, index: usize, outcome: &str, reason: String) {
        let step = self.steps[index].id.clone();
        self.states[index] = StepState::Failed;
        self.failed_step = Some(step.clone());
        self.error = Some(reason.clone());
        self.status = SagaStatus::Compensating;
        self.deadline = None;
        self.note(&step, outcome, Some(reason));
    }

    /// The step's outcome stayed unknown after every re-send: it may have been applied, so it
    /// counts as completed for compensation (its compensation has its own command id and is
    /// applied at most once), and the saga compensates.
    fn possibly_applied(&mut self, index: usize, reason: String) {
        let step = self.steps[index].id.clone();
        self.states[index] = StepState::Completed;
        self.failed_step = Some(step.clone());
        self.error = Some(format!(
            "step `{step}`: outcome unknown after every re-send ({reason}); compensated as possibly applied"
        ));
        self.status = SagaStatus::Compensating;
        self.deadline = None;
        self.note(&step, "possibly_applied", Some(reason));
    }

    fn complete_step(&mut self, index: usize) {
        let step = self.steps[index].id.clone();
        self.states[index] = StepState::Completed;
        self.current = index + 1;
        self.deadline = None;
        self.note(&step, "completed", None);
    }
}

/// Whether an error leaves a command's outcome unknown: it may have been applied.
fn is_unknown(e: &Error) -> bool {
    matches!(e, Error::Timeout { .. } | Error::UnknownOutcome { .. })
}

/// What one pass of the drive loop decided.
enum Next {
    /// Look again (a transition was recorded, or the revision moved).
    Again,
    /// Nothing more to do now.
    Stop,
}

impl SagaOrchestrator {
    /// A builder: the saga store, leases (one active orchestrator per saga) and the bus the
    /// steps' commands go through.
    pub fn builder(
        store: Arc<dyn SagaStore>,
        leases: Arc<dyn LeaseStore>,
        bus: CommandBus,
    ) -> SagaOrchestratorBuilder {
        SagaOrchestratorBuilder {
            store,
            leases,
            bus,
            config: Config {
                id: Uuid::new_v4().to_string(),
                max_attempts: 3,
                resends: 2,
                backoff: Backoff::new(Duration::from_millis(100)),
                lease_ttl: Duration::from_secs(30),
                health_grace: Duration::from_secs(60),
                tick: Duration::from_secs(1),
            },
        }
    }

    /// Persists a new saga, then runs it as far as it goes now (to its end, or to a step that
    /// awaits a reply). An id already used is refused.
    ///
    /// Inside a bus handler the saga joins the dispatch's conversation and names the command
    /// as its cause; elsewhere it starts a conversation of its own. To name the event or
    /// request that started it, use [`start_saga_with`](SagaOrchestrator::start_saga_with).
    pub async fn start_saga(&self, id: &str, steps: Vec<SagaStep>) -> Result<SagaState> {
        let metadata = crate::bus::current_metadata().unwrap_or_default();
        self.start_saga_with(id, steps, &metadata).await
    }

    /// [`start_saga`](SagaOrchestrator::start_saga) with the starter's metadata: the saga and
    /// every step command carry its correlation id, and the saga names the starter as its
    /// cause (its `message_id` when it is a dispatched command, else its `causation_id`:
    /// the id of the event that started the saga, say). Each step command then names the
    /// saga ([`SagaState::message_id`]) as its cause, and its events name the step command.
    ///
    /// ```
    /// # use keel::Metadata;
    /// // Started by an event: the conversation carries on, the event is the cause.
    /// # let (correlation, event_id) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    /// let starter = Metadata::correlated(correlation).caused_by(event_id);
    /// # let _ = starter;
    /// ```
    pub async fn start_saga_with(
        &self,
        id: &str,
        steps: Vec<SagaStep>,
        metadata: &Metadata,
    ) -> Result<SagaState> {
        if steps.is_empty() {
            return Err(Error::Config {
                field: "steps".into(),
                reason: format!("saga `{id}` has no steps"),
            });
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = steps.iter().find(|s| !seen.insert(s.id.clone())) {
            return Err(Error::Config {
                field: "steps".into(),
                reason: format!("saga `{id}` has two steps named `{}`", dup.id),
            });
        }
        let saga = Saga {
            id: id.to_owned(),
            states: vec![StepState::Pending; steps.len()],
            steps,
            status: SagaStatus::Running,
            current: 0,
            failed_step: None,
            error: None,
            deadline: None,
            compensation_attempts: 0,
            history: Vec::new(),
            started_at: now_millis(),
            correlation_id: Some(metadata.correlation_id.unwrap_or_else(|| saga_uuid(id))),
            caused_by: metadata.message_id.or(metadata.causation_id),
            driver_epoch: None,
        };
        if !self.inner.store.create_saga(&encode(&saga, 1)?).await? {
            return Err(Error::Config {
                field: "saga id".into(),
                reason: format!("a saga `{id}` already exists"),
            });
        }
        self.inner.counters.started.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("keel_sagas_started_total").increment(1);
        metrics::gauge!("keel_sagas_active").increment(1.0);
        tracing::info!(saga = id, "saga started");
        self.drive(id).await
    }

    /// The saga's state, history included.
    pub async fn get_saga_state(&self, id: &str) -> Result<SagaState> {
        let (saga, revision) = self.load(id).await?;
        Ok(state_of(&saga, revision))
    }

    /// Every saga's state (`unfinished_only`: not completed or compensated).
    pub async fn list(&self, unfinished_only: bool) -> Result<Vec<SagaState>> {
        let mut all = Vec::new();
        for record in self.inner.store.list_sagas(unfinished_only).await? {
            all.push(state_of(&decode(&record)?, record.revision));
        }
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }

    /// Records that an awaited step completed (an asynchronous reply), then runs the saga on.
    /// A late completion of a step that already timed out marks it completed so that its
    /// compensation runs too.
    pub async fn handle_step_completion(&self, id: &str, step: &str) -> Result<SagaState> {
        self.update(id, |saga| {
            let index = step_index(saga, step)?;
            match (saga.status, saga.states[index]) {
                (SagaStatus::Running, StepState::Dispatched) => saga.complete_step(index),
                (SagaStatus::Compensating | SagaStatus::Compensated, StepState::Failed) => {
                    saga.states[index] = StepState::Completed;
                    saga.status = SagaStatus::Compensating;
                    saga.note(
                        step,
                        "late_completion",
                        Some("completed after it had failed: it will be compensated".into()),
                    );
                }
                _ => return Ok(false), // a repeat, or nothing awaited: nothing to record
            }
            Ok(true)
        })
        .await?;
        self.drive(id).await
    }

    /// Records that an awaited step failed, then compensates.
    pub async fn handle_step_failure(
        &self,
        id: &str,
        step: &str,
        error: &str,
    ) -> Result<SagaState> {
        self.update(id, |saga| {
            let index = step_index(saga, step)?;
            if saga.status == SagaStatus::Running && saga.states[index] == StepState::Dispatched {
                saga.fail_step(index, "failed", error.to_owned());
                return Ok(true);
            }
            Ok(false)
        })
        .await?;
        self.drive(id).await
    }

    /// Moves a saga out of `compensation_failed` and tries its compensations again.
    pub async fn retry(&self, id: &str) -> Result<SagaState> {
        let changed = self
            .update(id, |saga| {
                if saga.status != SagaStatus::CompensationFailed {
                    return Ok(false);
                }
                saga.status = SagaStatus::Compensating;
                saga.compensation_attempts = 0;
                let step = saga.failed_step.clone().unwrap_or_default();
                saga.note(
                    &step,
                    "retried",
                    Some("an operator asked to retry the compensation".into()),
                );
                Ok(true)
            })
            .await?;
        if !changed {
            let state = self.get_saga_state(id).await?;
            return Err(Error::Config {
                field: "saga".into(),
                reason: format!(
                    "saga `{id}` is {}, not compensation_failed: nothing to retry",
                    state.status.as_str()
                ),
            });
        }
        self.drive(id).await
    }

    /// Runs every unfinished saga as far as it goes: after a crash, this resumes them; it also
    /// fires expired step deadlines. Returns how many sagas it looked at.
    pub async fn recover(&self) -> Result<usize> {
        let unfinished = self.inner.store.list_sagas(true).await?;
        for record in &unfinished {
            if record.status == SagaStatus::CompensationFailed {
                continue; // waits for an operator
            }
            if let Err(e) = self.drive(&record.id).await {
                tracing::warn!(saga = %record.id, error = %e, "saga could not be resumed");
            }
        }
        Ok(unfinished.len())
    }

    /// Starts a background task that calls [`recover`](Self::recover) every tick, until
    /// [`stop`](Self::stop) or until the last clone of the orchestrator is dropped. Starting
    /// one that runs does nothing.
    pub fn start(&self) {
        let mut slot = self.inner.task.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|(t, _)| !t.is_finished()) {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let tick = self.inner.config.tick;
        let stopping = Arc::new(tokio::sync::Notify::new());
        let stop = stopping.clone();
        let task = tokio::spawn(async move {
            loop {
                // Sleep a tick, or return at once when asked to stop.
                if tokio::time::timeout(tick, stopping.notified())
                    .await
                    .is_ok()
                {
                    return;
                }
                let Some(inner) = weak.upgrade() else { return };
                let orchestrator = SagaOrchestrator { inner };
                if let Err(e) = orchestrator.recover().await {
                    tracing::warn!(error = %e, "saga recovery pass failed");
                }
            }
        });
        *slot = Some((task, stop));
    }

    /// Stops the background task of [`start`](Self::start) and returns once it has ended: a
    /// recovery pass under way finishes first (a saga is left between steps, its lease
    /// released), so nothing is cut off mid-transition. Sagas run by
    /// [`start_saga`](Self::start_saga) and [`recover`](Self::recover) calls are not affected.
    pub async fn stop(&self) {
        let task = self
            .inner
            .task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((task, stopping)) = task {
            // Kept as a permit: a task in the middle of a pass takes it at its next wait.
            stopping.notify_one();
            let _ = task.await;
        }
    }

    /// The grace [`health`](Self::health) is given as a component
    /// ([`SagaOrchestratorBuilder::health_grace`]).
    pub fn health_grace(&self) -> Duration {
        self.inner.config.health_grace
    }

    /// Whether the background task of [`start`](Self::start) runs.
    pub fn is_running(&self) -> bool {
        self.inner
            .task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|(t, _)| !t.is_finished())
    }

    /// Healthy unless a saga waits for an operator (`compensation_failed`) or a deadline
    /// passed more than `grace` ago without the saga moving on (no orchestrator is running
    /// recovery, or it keeps failing).
    pub async fn health(&self, grace: Duration) -> crate::health::Health {
        let mut health = crate::health::Health::new("saga orchestrator");
        match self.inner.store.list_sagas(true).await {
            Err(e) => {
                health.check("saga store", false, e.to_string());
            }
            Ok(records) => {
                let stuck: Vec<&str> = records
                    .iter()
                    .filter(|r| r.status == SagaStatus::CompensationFailed)
                    .map(|r| r.id.as_str())
                    .collect();
                let overdue: Vec<&str> = records
                    .iter()
                    .filter(|r| {
                        r.deadline
                            .is_some_and(|d| d + (grace.as_millis() as i64) < now_millis())
                    })
                    .map(|r| r.id.as_str())
                    .collect();
                health.check(
                    "saga store",
                    true,
                    format!("{} unfinished saga(s)", records.len()),
                );
                health.check(
                    "compensation_failed",
                    stuck.is_empty(),
                    format!("{} saga(s) need an operator: {stuck:?}", stuck.len()),
                );
                health.check(
                    "overdue deadlines",
                    overdue.is_empty(),
                    format!("{} saga(s) past their deadline: {overdue:?}", overdue.len()),
                );
            }
        }
        health
    }

    /// The counters so far.
    pub fn metrics(&self) -> SagaMetrics {
        let c = &self.inner.counters;
        SagaMetrics {
            started: c.started.load(Ordering::Relaxed),
            completed: c.completed.load(Ordering::Relaxed),
            compensated: c.compensated.load(Ordering::Relaxed),
            compensation_failed: c.compensation_failed.load(Ordering::Relaxed),
            steps: c.steps.load(Ordering::Relaxed),
            step_latency: Duration::from_micros(c.step_micros.load(Ordering::Relaxed)),
            fenced: c.fenced.load(Ordering::Relaxed),
        }
    }

    async fn load(&self, id: &str) -> Result<(Saga, u64)> {
        let record = self
            .inner
            .store
            .load_saga(id)
            .await?
            .ok_or_else(|| Error::Config {
                field: "saga".into(),
                reason: format!("no saga `{id}`"),
            })?;
        Ok((decode(&record)?, record.revision))
    }

    async fn save(&self, saga: &Saga, revision: u64) -> Result<bool> {
        self.inner
            .store
            .update_saga(&encode(saga, revision + 1)?, revision)
            .await
    }

    /// Applies `change` to the stored saga, retrying on a revision race; `change` returns
    /// whether it changed anything.
    async fn update(&self, id: &str, change: impl Fn(&mut Saga) -> Result<bool>) -> Result<bool> {
        for _ in 0..20 {
            let (mut saga, revision) = self.load(id).await?;
            if !change(&mut saga)? {
                return Ok(false);
            }
            if self.save(&saga, revision).await? {
                return Ok(true);
            }
        }
        Err(Error::Conflict {
            stream: crate::StreamId::new(format!("saga-{id}")),
            expected: crate::ExpectedVersion::Any,
            actual: None,
        })
    }

    /// Runs the saga under its lease as far as it goes now. When another orchestrator holds the
    /// lease, returns the stored state and leaves the saga to it.
    ///
    /// The lease is renewed while the saga runs. An orchestrator that loses it (it stalled
    /// past the lease's time to live and another took the saga over) stops with
    /// [`Error::Fenced`] or [`Error::HeldElsewhere`]: the other's first write recorded its
    /// newer epoch, so the stalled one's saves are refused from then on.
    pub async fn drive(&self, id: &str) -> Result<SagaState> {
        let lease_name = format!("saga/{id}");
        let Some(lease) = self
            .inner
            .leases
            .acquire(
                &lease_name,
                &self.inner.config.id,
                self.inner.config.lease_ttl,
            )
            .await?
        else {
            tracing::debug!(saga = id, "another orchestrator drives this saga");
            return self.get_saga_state(id).await;
        };
        let span = tracing::info_span!("keel.saga", saga = id, epoch = lease.epoch);
        // Drive while keeping the lease; whichever ends first ends both.
        let drive = std::pin::pin!(self.drive_held(id, lease.epoch).instrument(span));
        let keep = std::pin::pin!(self.keep(&lease));
        let result = match futures::future::select(drive, keep).await {
            futures::future::Either::Left((result, _)) => result,
            futures::future::Either::Right((lost, _)) => Err(lost),
        };
        if let Err(e) = &result {
            if e.is_fenced() || matches!(e, Error::HeldElsewhere { .. }) {
                self.inner.counters.fenced.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(saga = id, error = %e, "saga taken over by another orchestrator; stopped driving it");
                return result; // the lease is another's now: nothing to release
            }
        }
        if let Err(e) = self.inner.leases.release(&lease).await {
            tracing::warn!(saga = id, error = %e, "saga lease release failed; it expires by itself");
        }
        result
    }

    /// Renews `lease` every third of its time to live; returns (the error to stop with) when
    /// it is lost, or when renewals have failed for a whole time to live.
    async fn keep(&self, lease: &crate::store::Lease) -> Error {
        let every = lease.ttl / 3;
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(every).await;
            match self.inner.leases.renew(lease).await {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => break,
                Err(e) if renewed.elapsed() < lease.ttl => {
                    tracing::warn!(lease = %lease.name, error = %e, "saga lease renewal failed; trying again");
                }
                Err(_) => break,
            }
        }
        Error::HeldElsewhere {
            name: lease.name.clone(),
            holder: "unknown".into(),
            detail: format!(
                "; the lease (epoch {}) was lost while this orchestrator drove the saga, so it stopped",
                lease.epoch
            ),
        }
    }

    async fn drive_held(&self, id: &str, epoch: u64) -> Result<SagaState> {
        loop {
            let (mut saga, revision) = self.load(id).await?;
            let stored = saga.driver_epoch;
            if let Some(current) = stored.filter(|&e| e > epoch) {
                return Err(Error::Fenced {
                    name: format!("saga/{id}"),
                    epoch,
                    current,
                });
            }
            // Every save from here carries this epoch; `claimed` says whether the stored saga
            // has it already (a command may leave only once it does).
            saga.driver_epoch = Some(epoch);
            let claimed = stored == Some(epoch);
            let next = match saga.status {
                SagaStatus::Completed
                | SagaStatus::Compensated
                | SagaStatus::CompensationFailed => {
                    return Ok(state_of(&saga, revision));
                }
                SagaStatus::Running => self.run_step(&mut saga, revision, claimed).await?,
                SagaStatus::Compensating => {
                    self.compensate_step(&mut saga, revision, claimed).await?
                }
            };
            if let Next::Stop = next {
                let (saga, revision) = self.load(id).await?;
                return Ok(state_of(&saga, revision));
            }
        }
    }

    /// Records this orchestrator's lease epoch in the saga before a command leaves, unless
    /// the stored saga has it. `false`: the revision moved (look again).
    async fn claim(&self, saga: &Saga, revision: &mut u64, claimed: bool) -> Result<bool> {
        if claimed {
            return Ok(true);
        }
        if self.save(saga, *revision).await? {
            *revision += 1;
            return Ok(true);
        }
        Ok(false)
    }

    async fn dispatch(&self, saga: &Saga, index: usize, undo: bool) -> Result<()> {
        let step = &saga.steps[index];
        let command = match (undo, &step.compensation) {
            (false, _) => &step.command,
            (true, Some(c)) => c,
            (true, None) => return Ok(()),
        };
        let id = command_id(&saga.id, &step.id, undo);
        let correlation_id = saga.correlation_id.unwrap_or_else(|| saga_uuid(&saga.id));
        let mut metadata = Metadata::correlated(correlation_id)
            .caused_by(saga_uuid(&saga.id))
            .with_command_id(id);
        metadata.message_id = Some(id);
        let metadata = metadata
            .with("saga", saga.id.clone())
            .with("saga_step", step.id.clone());
        let span = tracing::info_span!("keel.saga_step", saga = %saga.id, step = %step.id, undo,
            command = command.typetag_name(), correlation_id = %correlation_id);
        let started = Instant::now();
        let sent = tokio::time::timeout(step.timeout, command.dispatch(&self.inner.bus, metadata));
        let result = match sent.instrument(span).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout {
                operation: format!("saga `{}` step `{}`", saga.id, step.id),
                after: step.timeout,
            }),
        };
        let elapsed = started.elapsed();
        self.inner.counters.steps.fetch_add(1, Ordering::Relaxed);
        self.inner
            .counters
            .step_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        metrics::histogram!("keel_saga_step_seconds").record(elapsed.as_secs_f64());
        result
    }

    /// Ends the saga as completed or compensated. Only the writer whose save wins counts it.
    async fn finish(&self, saga: &mut Saga, revision: u64, status: SagaStatus) -> Result<Next> {
        let counters = &self.inner.counters;
        let (note, counter, metric, message) = if status == SagaStatus::Completed {
            (
                "saga_completed",
                &counters.completed,
                "keel_sagas_completed_total",
                "saga completed",
            )
        } else {
            (
                "saga_compensated",
                &counters.compensated,
                "keel_sagas_compensated_total",
                "saga compensated",
            )
        };
        saga.status = status;
        saga.note("", note, None);
        if self.save(saga, revision).await? {
            counter.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(metric).increment(1);
            metrics::gauge!("keel_sagas_active").decrement(1.0);
            tracing::info!(saga = %saga.id, "{message}");
        }
        Ok(Next::Again)
    }

    async fn run_step(&self, saga: &mut Saga, revision: u64, claimed: bool) -> Result<Next> {
        let index = saga.current;
        if index >= saga.steps.len() {
            return self.finish(saga, revision, SagaStatus::Completed).await;
        }
        let step_id = saga.steps[index].id.clone();
        let mut revision = revision;
        match saga.states[index] {
            StepState::Pending => {
                // Recorded before the command leaves: after a crash the step is sent again,
                // with the same command id, and the receiver recognises the repeat.
                saga.states[index] = StepState::Dispatched;
                saga.deadline = Some(now_millis() + saga.steps[index].timeout.as_millis() as i64);
                saga.note(&step_id, "dispatched", None);
                if !self.save(saga, revision).await? {
                    return Ok(Next::Again);
                }
                revision += 1;
            }
            StepState::Dispatched if saga.steps[index].awaits_reply => {
                if saga.deadline.is_some_and(|d| now_millis() >= d) {
                    let timeout = saga.steps[index].timeout;
                    saga.fail_step(
                        index,
                        "timed_out",
                        format!("step `{step_id}` got no reply within {timeout:?}"),
                    );
                    self.save(saga, revision).await?;
                    return Ok(Next::Again);
                }
                return Ok(Next::Stop); // waiting for the reply
            }
            StepState::Dispatched => {
                // Sent before a crash (or by an orchestrator that lost the saga), outcome not
                // recorded: send again, with the same command id.
                if !self.claim(saga, &mut revision, claimed).await? {
                    return Ok(Next::Again);
                }
            }
            StepState::Completed | StepState::Failed | StepState::Compensated => {
                // Inconsistent position (cannot happen through this code): move on safely.
                saga.current = index + 1;
                self.save(saga, revision).await?;
                return Ok(Next::Again);
            }
        }
        let outcome = self.dispatch(saga, index, false).await;
        if saga.steps[index].awaits_reply {
            if let Err(e) = outcome {
                saga.fail_step(index, "failed", e.to_string());
                self.save(saga, revision).await?;
                return Ok(Next::Again);
            }
            return Ok(Next::Stop);
        }
        match self.resolve(saga, index, outcome).await {
            Ok(()) => saga.complete_step(index),
            Err(e) if is_unknown(&e) => saga.possibly_applied(index, e.to_string()),
            Err(e) => saga.fail_step(index, "failed", e.to_string()),
        }
        self.save(saga, revision).await?;
        Ok(Next::Again)
    }

    /// A synchronous step's outcome, resolved: while it is unknown (a timeout, an unknown
    /// outcome), the step is sent again with the same command id, up to the configured
    /// number of times; the receiver applies a command id once, so a step that was applied
    /// answers as done.
    async fn resolve(&self, saga: &mut Saga, index: usize, first: Result<()>) -> Result<()> {
        let mut outcome = first;
        for resend in 1..=self.inner.config.resends {
            let Err(e) = &outcome else { break };
            if !is_unknown(e) {
                break;
            }
            let what = if matches!(e, Error::Timeout { .. }) {
                "timed_out"
            } else {
                "outcome_unknown"
            };
            let step = saga.steps[index].id.clone();
            saga.note(
                &step,
                what,
                Some(format!(
                    "{e}; sending it again with the same command id ({resend})"
                )),
            );
            tokio::time::sleep(self.inner.config.backoff.delay(resend)).await;
            outcome = self.dispatch(saga, index, false).await;
        }
        outcome
    }

    async fn compensate_step(&self, saga: &mut Saga, revision: u64, claimed: bool) -> Result<Next> {
        let Some(index) = (0..saga.steps.len())
            .rev()
            .find(|&i| saga.states[i] == StepState::Completed)
        else {
            return self.finish(saga, revision, SagaStatus::Compensated).await;
        };
        let step_id = saga.steps[index].id.clone();
        let mut revision = revision;
        if !self.claim(saga, &mut revision, claimed).await? {
            return Ok(Next::Again);
        }
        match self.dispatch(saga, index, true).await {
            Ok(()) => {
                saga.states[index] = StepState::Compensated;
                saga.compensation_attempts = 0;
                saga.note(&step_id, "compensated", None);
                self.save(saga, revision).await?;
                Ok(Next::Again)
            }
            Err(e) => {
                saga.compensation_attempts += 1;
                let attempts = saga.compensation_attempts;
                saga.note(
                    &step_id,
                    "compensation_failed",
                    Some(format!("attempt {attempts}: {e}")),
                );
                if attempts >= self.inner.config.max_attempts {
                    saga.status = SagaStatus::CompensationFailed;
                    saga.error = Some(format!(
                        "compensating step `{step_id}` failed {attempts} times: {e}"
                    ));
                    if self.save(saga, revision).await? {
                        self.inner
                            .counters
                            .compensation_failed
                            .fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("keel_sagas_compensation_failed_total").increment(1);
                        tracing::error!(saga = %saga.id, step = %step_id, "compensation failed; the saga needs an operator");
                    }
                    return Ok(Next::Again);
                }
                if self.save(saga, revision).await? {
                    tokio::time::sleep(self.inner.config.backoff.delay(attempts)).await;
                }
                Ok(Next::Again)
            }
        }
    }
}

fn step_index(saga: &Saga, step: &str) -> Result<usize> {
    saga.steps
        .iter()
        .position(|s| s.id == step)
        .ok_or_else(|| Error::Config {
            field: "step".into(),
            reason: format!("saga `{}` has no step `{step}`", saga.id),
        })
}
