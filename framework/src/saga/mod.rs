//! Sagas: multi-step processes across aggregates, persisted, compensated in reverse on failure.
//!
//! A saga is a list of [`SagaStep`]s. Each step has an id, a command, an optional compensation
//! command and a timeout. Commands are stored with the saga (serialised through `typetag`), so
//! any process can resume it. The [`SagaOrchestrator`] persists the saga before the first
//! command, records each step's outcome before starting the next, and on a failure or a timeout
//! sends the compensations of the completed steps in reverse order.
//!
//! Every command a saga sends carries metadata: a correlation id derived from the saga id and a
//! command id derived from (saga, step, do/undo), also its causation id.
//! [`Repository::execute_with`](crate::Repository::execute_with) skips a command whose command
//! id already produced events in the stream, so a step sent again after a crash is applied once.
//!
//! ```
//! use keel::saga::SagaCommand;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Clone, Debug, Serialize, Deserialize)]
//! struct ReserveStock { sku: String, quantity: u32 }
//! impl keel::Command for ReserveStock { type Output = u64; }
//!
//! // Makes ReserveStock storable in a saga and sendable through the command bus.
//! keel::saga_command!(ReserveStock);
//! ```

#[cfg(feature = "sagas")]
mod orchestrator;

#[cfg(feature = "sagas")]
pub use orchestrator::{SagaMetrics, SagaOrchestrator, SagaOrchestratorBuilder};

#[cfg(feature = "sagas")]
use std::fmt::Debug;
#[cfg(feature = "sagas")]
use std::time::Duration;

use async_trait::async_trait;
#[cfg(feature = "sagas")]
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[cfg(feature = "sagas")]
use crate::bus::CommandBus;
use crate::error::Result;
#[cfg(feature = "sagas")]
use crate::event::Metadata;

#[cfg(feature = "sagas")]
/// A command a saga can store and send. Implement it with [`saga_command!`](crate::saga_command).
#[typetag::serde(tag = "command")]
pub trait SagaCommand: Send + Sync + Debug {
    /// Sends the command through `bus` with `metadata` (correlation and command ids).
    fn dispatch<'a>(&'a self, bus: &'a CommandBus, metadata: Metadata)
        -> BoxFuture<'a, Result<()>>;
}

#[cfg(feature = "sagas")]
/// Implements [`SagaCommand`] for a bus command type that is `Serialize + Deserialize`: the
/// saga stores it by its type name and sends it through the command bus.
///
/// The expansion uses `typetag`'s registration, so the calling crate lists `typetag` among
/// its dependencies.
#[macro_export]
macro_rules! saga_command {
    ($($command:ty),+ $(,)?) => {$(
        #[$crate::saga::__typetag::serde]
        impl $crate::saga::SagaCommand for $command {
            fn dispatch<'a>(
                &'a self,
                bus: &'a $crate::CommandBus,
                metadata: $crate::Metadata,
            ) -> $crate::saga::__BoxFuture<'a, $crate::Result<()>> {
                Box::pin(async move { bus.send_with(self.clone(), metadata).await.map(|_| ()) })
            }
        }
    )+};
}

#[cfg(feature = "sagas")]
#[doc(hidden)]
pub use futures::future::BoxFuture as __BoxFuture;
#[cfg(feature = "sagas")]
#[doc(hidden)]
pub use typetag as __typetag;

#[cfg(feature = "sagas")]
/// One step of a saga.
#[derive(Debug, Serialize, Deserialize)]
pub struct SagaStep {
    /// The step's id, unique in its saga.
    pub id: String,
    /// What the step does.
    pub command: Box<dyn SagaCommand>,
    /// What undoes it (none: nothing to undo).
    pub compensation: Option<Box<dyn SagaCommand>>,
    /// How long the step may take; past it the step fails with a timeout.
    pub timeout: Duration,
    /// Whether the step completes by an outside reply ([`SagaOrchestrator::handle_step_completion`]
    /// or [`handle_step_failure`](SagaOrchestrator::handle_step_failure)) rather than by its
    /// command returning.
    pub awaits_reply: bool,
}

#[cfg(feature = "sagas")]
impl SagaStep {
    /// A step sending `command`, completed when the command succeeds, with a 30 s timeout.
    pub fn new(id: impl Into<String>, command: impl SagaCommand + 'static) -> Self {
        SagaStep {
            id: id.into(),
            command: Box::new(command),
            compensation: None,
            timeout: Duration::from_secs(30),
            awaits_reply: false,
        }
    }

    /// Sets the command that undoes this step.
    pub fn compensate_with(mut self, compensation: impl SagaCommand + 'static) -> Self {
        self.compensation = Some(Box::new(compensation));
        self
    }

    /// Sets the step's timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Makes the step wait for an outside reply after its command was sent.
    pub fn awaiting_reply(mut self) -> Self {
        self.awaits_reply = true;
        self
    }
}

/// Where a saga stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaStatus {
    /// Steps are being carried out.
    Running,
    /// Every step completed.
    Completed,
    /// A step failed; completed steps are being undone.
    Compensating,
    /// Every completed step was undone.
    Compensated,
    /// A compensation kept failing; an operator must look and retry.
    CompensationFailed,
}

impl SagaStatus {
    /// Whether the saga reached an end (completed or compensated).
    pub fn is_finished(self) -> bool {
        matches!(self, SagaStatus::Completed | SagaStatus::Compensated)
    }

    /// The status as stored and printed (`running`, `compensation_failed`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            SagaStatus::Running => "running",
            SagaStatus::Completed => "completed",
            SagaStatus::Compensating => "compensating",
            SagaStatus::Compensated => "compensated",
            SagaStatus::CompensationFailed => "compensation_failed",
        }
    }
}

/// Where one step stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Not started.
    Pending,
    /// Its command was sent (or is about to be); no outcome yet.
    Dispatched,
    /// Done.
    Completed,
    /// Failed (or timed out).
    Failed,
    /// Undone by its compensation.
    Compensated,
}

/// One entry of a saga's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepOutcome {
    /// The step.
    pub step: String,
    /// `dispatched`, `completed`, `failed`, `timed_out`, `outcome_unknown`, `possibly_applied`,
    /// `compensated`, `compensation_failed`, `retried`, `late_completion`.
    pub outcome: String,
    /// Details (an error message).
    pub detail: Option<String>,
    /// When (ms since the epoch).
    pub at: i64,
}

#[cfg(feature = "sagas")]
/// A saga's persisted state: its definition and its progress.
#[derive(Debug, Serialize, Deserialize)]
pub struct Saga {
    /// The saga's id.
    pub id: String,
    /// Its steps, in order.
    pub steps: Vec<SagaStep>,
    /// Each step's state, by index.
    pub states: Vec<StepState>,
    /// Where it stands.
    pub status: SagaStatus,
    /// The step the saga is on (the next to run, or the one awaited).
    pub current: usize,
    /// The step that failed, if one did.
    pub failed_step: Option<String>,
    /// Why it failed (or why a compensation failed).
    pub error: Option<String>,
    /// When the awaited step times out (ms since the epoch).
    pub deadline: Option<i64>,
    /// Failed attempts of the current compensation.
    pub compensation_attempts: u32,
    /// What happened, in order.
    pub history: Vec<StepOutcome>,
    /// When it started (ms since the epoch).
    pub started_at: i64,
    /// The conversation it belongs to: its starter's correlation id (`None` for sagas stored
    /// before Keel kept it: they use one derived from the saga's id).
    #[serde(default)]
    pub correlation_id: Option<Uuid>,
    /// What started it (the command or event its starter named), one hop back from the saga.
    #[serde(default)]
    pub caused_by: Option<Uuid>,
    /// The lease epoch of the orchestrator that drives it: recorded before that orchestrator
    /// sends a command, so that a save by one holding an older epoch (it stalled past the
    /// lease's time to live and another took over) is refused.
    #[serde(default)]
    pub driver_epoch: Option<u64>,
}

/// What [`SagaOrchestrator::get_saga_state`] reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SagaState {
    /// The saga's id.
    pub id: String,
    /// Where it stands.
    pub status: SagaStatus,
    /// The step it is on (`None` when finished).
    pub current_step: Option<String>,
    /// The step that failed, if one did.
    pub failed_step: Option<String>,
    /// The error that stopped it, or made a compensation fail.
    pub error: Option<String>,
    /// Each step and its state.
    pub steps: Vec<(String, StepState)>,
    /// What happened, in order, with times.
    pub history: Vec<StepOutcome>,
    /// The stored revision (grows with every recorded transition).
    pub revision: u64,
    /// The conversation the saga and its step commands belong to.
    pub correlation_id: Uuid,
    /// The saga's own id in causation chains: its step commands name it as their cause.
    pub message_id: Uuid,
    /// What started the saga, when its starter said.
    pub caused_by: Option<Uuid>,
}

/// A saga as a [`SagaStore`] holds it: the encoded [`Saga`] plus what the store needs to
/// guard and list it.
#[derive(Clone, Debug, PartialEq)]
pub struct SagaRecord {
    /// The saga's id.
    pub id: String,
    /// Grows by one with every update; updates are conditional on it.
    pub revision: u64,
    /// The status, for listing without decoding.
    pub status: SagaStatus,
    /// The deadline of the awaited step, for finding expired ones.
    pub deadline: Option<i64>,
    /// The encoded [`Saga`].
    pub data: bytes::Bytes,
}

/// Persisted saga state with revision-guarded transitions.
#[async_trait]
pub trait SagaStore: Send + Sync + 'static {
    /// Stores a new saga; `false` when one with that id exists.
    async fn create_saga(&self, record: &SagaRecord) -> Result<bool>;
    /// The saga `id`.
    async fn load_saga(&self, id: &str) -> Result<Option<SagaRecord>>;
    /// Replaces the saga if it is still at `expected_revision`; `false` otherwise (another
    /// orchestrator moved it on).
    async fn update_saga(&self, record: &SagaRecord, expected_revision: u64) -> Result<bool>;
    /// Every saga (`unfinished_only`: those not completed or compensated).
    async fn list_sagas(&self, unfinished_only: bool) -> Result<Vec<SagaRecord>>;
}
