//! Conformance cases for the saga store and the saga orchestrator on a store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::aggregate::Aggregate;
use crate::bus::{Command, CommandBus};
use crate::error::{Error, Result};
use crate::event::{DomainEvent, Metadata};
use crate::repository::Repository;
use crate::saga::{SagaOrchestrator, SagaRecord, SagaStatus, SagaStep, SagaStore, StepState};
use crate::store::{EventStore, LeaseStore};

/// Everything a store needs to host sagas whose steps change aggregates in it.
pub trait SagaHost: EventStore + LeaseStore + SagaStore {}
impl<S: EventStore + LeaseStore + SagaStore> SagaHost for S {}

/// A bin of units: the resource the test sagas take from and put back.
#[derive(Default, Serialize, Deserialize)]
struct Bin {
    units: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum BinEvent {
    Put { units: i64 },
    Taken { units: i64 },
}

impl DomainEvent for BinEvent {
    fn event_type(&self) -> &'static str {
        match self {
            BinEvent::Put { .. } => "Put",
            BinEvent::Taken { .. } => "Taken",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("only {have} units, {wanted} wanted")]
struct NotEnough {
    have: i64,
    wanted: i64,
}

impl Aggregate for Bin {
    const TYPE: &'static str = "bin";
    type Command = BinEvent;
    type Event = BinEvent;
    type Error = NotEnough;
    fn handle(&self, command: BinEvent) -> Result<Vec<BinEvent>, NotEnough> {
        match command {
            BinEvent::Taken { units } if units > self.units => Err(NotEnough {
                have: self.units,
                wanted: units,
            }),
            other => Ok(vec![other]),
        }
    }
    fn apply(&mut self, event: &BinEvent) {
        match event {
            BinEvent::Put { units } => self.units += units,
            BinEvent::Taken { units } => self.units -= units,
        }
    }
}

/// Take units from a bin (refused when there are not enough).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Take {
    bin: String,
    units: i64,
}

/// Put units into a bin; fails while its `flaky` key has failures left.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct PutBack {
    bin: String,
    units: i64,
    flaky: Option<String>,
}

/// Takes longer than any step timeout in these tests.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Stall;

/// Succeeds at once; used for steps that await a reply.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Ask;

impl Command for PutBack {
    type Output = ();
}
impl Command for Stall {
    type Output = ();
}
impl Command for Ask {
    type Output = ();
}

/// Takes units, then stalls past any step timeout while its `stalls` key has stalls left:
/// a step whose command commits and whose reply is lost.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TakeThenStall {
    bin: String,
    units: i64,
    stalls: String,
}

/// Takes units, but first waits at its gate (when one is set for its key): a step during
/// which its orchestrator stalls.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct GatedTake {
    bin: String,
    units: i64,
    gate: String,
}

impl Command for Take {
    type Output = ();
}
impl Command for TakeThenStall {
    type Output = ();
}
impl Command for GatedTake {
    type Output = ();
}

crate::saga_command!(Take, TakeThenStall, GatedTake, PutBack, Stall, Ask);

/// Gates by key: (entered, release). The first command at a gate takes it out of the map,
/// says it entered and waits for the release; later ones pass.
type Gates = HashMap<String, (Arc<tokio::sync::Notify>, Arc<tokio::sync::Notify>)>;
fn gates() -> &'static Mutex<Gates> {
    static GATES: OnceLock<Mutex<Gates>> = OnceLock::new();
    GATES.get_or_init(Mutex::default)
}

/// A new closed gate: its key, and the (entered, release) pair of its first command.
fn closed_gate() -> (String, Arc<tokio::sync::Notify>, Arc<tokio::sync::Notify>) {
    let key = format!("gate-{}", Uuid::new_v4().simple());
    let (entered, release) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    gates()
        .lock()
        .unwrap()
        .insert(key.clone(), (entered.clone(), release.clone()));
    (key, entered, release)
}

/// Remaining failures per flaky key.
fn failures() -> &'static Mutex<HashMap<String, u32>> {
    static FAILURES: OnceLock<Mutex<HashMap<String, u32>>> = OnceLock::new();
    FAILURES.get_or_init(Mutex::default)
}

/// The metadata each `Take` handler received, by its message id: what a causation chain
/// test reads back for the commands, whose metadata is not stored.
fn dispatched() -> &'static Mutex<HashMap<Uuid, Metadata>> {
    static SEEN: OnceLock<Mutex<HashMap<Uuid, Metadata>>> = OnceLock::new();
    SEEN.get_or_init(Mutex::default)
}

fn bus<S: SagaHost>(store: &Arc<S>) -> CommandBus {
    let (take, put) = (
        Repository::<Bin>::new(store.clone()),
        Repository::<Bin>::new(store.clone()),
    );
    CommandBus::builder()
        .command(move |c: Take, meta: Metadata| {
            let repo = take.clone();
            async move {
                if let Some(id) = meta.message_id {
                    dispatched().lock().unwrap().insert(id, meta.clone());
                }
                repo.execute_with(&c.bin, BinEvent::Taken { units: c.units }, &meta)
                    .await
                    .map(|_| ())
            }
        })
        .and_then(|b| {
            b.command(move |c: PutBack, meta: Metadata| {
                let repo = put.clone();
                async move {
                    if let Some(key) = &c.flaky {
                        let mut f = failures().lock().unwrap();
                        if let Some(left) = f.get_mut(key).filter(|n| **n > 0) {
                            *left -= 1;
                            return Err(Error::store(
                                "test",
                                "put back",
                                "the warehouse is closed",
                            ));
                        }
                    }
                    repo.execute_with(&c.bin, BinEvent::Put { units: c.units }, &meta)
                        .await
                        .map(|_| ())
                }
            })
        })
        .and_then(|b| {
            let repo = Repository::<Bin>::new(store.clone());
            b.command(move |c: TakeThenStall, meta: Metadata| {
                let repo = repo.clone();
                async move {
                    repo.execute_with(&c.bin, BinEvent::Taken { units: c.units }, &meta)
                        .await?;
                    let stall = {
                        let mut f = failures().lock().unwrap();
                        f.get_mut(&c.stalls)
                            .filter(|n| **n > 0)
                            .map(|left| *left -= 1)
                            .is_some()
                    };
                    if stall {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                    Ok(())
                }
            })
        })
        .and_then(|b| {
            let repo = Repository::<Bin>::new(store.clone());
            b.command(move |c: GatedTake, meta: Metadata| {
                let repo = repo.clone();
                async move {
                    let gate = gates().lock().unwrap().remove(&c.gate);
                    if let Some((entered, release)) = gate {
                        entered.notify_one();
                        release.notified().await;
                    }
                    repo.execute_with(&c.bin, BinEvent::Taken { units: c.units }, &meta)
                        .await
                        .map(|_| ())
                }
            })
        })
        .and_then(|b| {
            b.command(|_: Stall, _| async move {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(())
            })
        })
        .and_then(|b| b.command(|_: Ask, _| async move { Ok(()) }))
        .expect("test handlers register")
        .build()
}

fn orchestrator<S: SagaHost>(store: &Arc<S>) -> SagaOrchestrator {
    SagaOrchestrator::builder(store.clone(), store.clone(), bus(store))
        .max_compensation_attempts(2)
        .retry_backoff(Duration::from_millis(5))
        .lease_ttl(Duration::from_secs(5))
        .build()
}

async fn units<S: SagaHost>(store: &Arc<S>, bin: &str) -> i64 {
    Repository::<Bin>::new(store.clone())
        .load(bin)
        .await
        .unwrap()
        .state
        .units
}

/// Three fresh bins holding 10 units each.
async fn bins<S: SagaHost>(store: &Arc<S>) -> Vec<String> {
    let repo = Repository::<Bin>::new(store.clone());
    let mut names = Vec::new();
    for i in 0..3 {
        let name = format!("b{i}-{}", Uuid::new_v4().simple());
        repo.execute(&name, BinEvent::Put { units: 10 })
            .await
            .unwrap();
        names.push(name);
    }
    names
}

/// Take `units[i]` from bin i, put it back on compensation.
fn steps(bins: &[String], units: [i64; 3]) -> Vec<SagaStep> {
    bins.iter()
        .zip(units)
        .enumerate()
        .map(|(i, (bin, units))| {
            SagaStep::new(
                format!("take-{i}"),
                Take {
                    bin: bin.clone(),
                    units,
                },
            )
            .compensate_with(PutBack {
                bin: bin.clone(),
                units,
                flaky: None,
            })
        })
        .collect()
}

fn saga_id() -> String {
    format!("saga-{}", Uuid::new_v4().simple())
}

fn outcomes(state: &crate::saga::SagaState) -> Vec<(String, String)> {
    state
        .history
        .iter()
        .map(|h| (h.step.clone(), h.outcome.clone()))
        .collect()
}

/// Sagas are created once and updated only at the expected revision.
pub async fn saga_store_guards_revisions<S: SagaHost>(store: Arc<S>) {
    let id = saga_id();
    let record = SagaRecord {
        id: id.clone(),
        revision: 1,
        status: SagaStatus::Running,
        deadline: Some(5),
        data: bytes::Bytes::from_static(b"{}"),
    };
    assert!(store.create_saga(&record).await.unwrap());
    assert!(
        !store.create_saga(&record).await.unwrap(),
        "an id is used once"
    );
    let next = SagaRecord {
        revision: 2,
        status: SagaStatus::Completed,
        deadline: None,
        ..record.clone()
    };
    assert!(
        !store.update_saga(&next, 5).await.unwrap(),
        "a stale revision is refused"
    );
    assert!(store.update_saga(&next, 1).await.unwrap());
    assert!(
        !store.update_saga(&next, 1).await.unwrap(),
        "the same transition applies once"
    );
    assert_eq!(store.load_saga(&id).await.unwrap(), Some(next));
    assert!(
        !store
            .list_sagas(true)
            .await
            .unwrap()
            .iter()
            .any(|r| r.id == id),
        "finished sagas are not unfinished"
    );
    assert!(store
        .list_sagas(false)
        .await
        .unwrap()
        .iter()
        .any(|r| r.id == id));
}

/// Every step completes in order and the saga ends completed.
pub async fn saga_happy_path<S: SagaHost>(store: Arc<S>) {
    let bins = bins(&store).await;
    let o = orchestrator(&store);
    let id = saga_id();
    let state = o.start_saga(&id, steps(&bins, [1, 2, 3])).await.unwrap();
    assert_eq!(state.status, SagaStatus::Completed);
    for (bin, left) in bins.iter().zip([9, 8, 7]) {
        assert_eq!(units(&store, bin).await, left);
    }
    assert!(state.steps.iter().all(|(_, s)| *s == StepState::Completed));
    let completed: Vec<String> = state
        .history
        .iter()
        .filter(|h| h.outcome == "completed")
        .map(|h| h.step.clone())
        .collect();
    assert_eq!(completed, vec!["take-0", "take-1", "take-2"]);
    assert_eq!(o.get_saga_state(&id).await.unwrap(), state);
    assert_eq!(o.metrics().completed, 1);
}

/// A failure at step k undoes exactly steps k-1 .. 0, in that order, and restores the bins.
pub async fn saga_failure_compensates_completed_steps_in_reverse<S: SagaHost>(store: Arc<S>) {
    for failing in 0..3 {
        let bins = bins(&store).await;
        let mut wanted = [1, 2, 3];
        wanted[failing] = 99; // more than the bin holds
        let state = orchestrator(&store)
            .start_saga(&saga_id(), steps(&bins, wanted))
            .await
            .unwrap();
        assert_eq!(
            state.status,
            SagaStatus::Compensated,
            "failing at step {failing}"
        );
        assert_eq!(
            state.failed_step.as_deref(),
            Some(format!("take-{failing}").as_str())
        );
        assert!(
            state
                .error
                .as_deref()
                .unwrap_or("")
                .contains("only 10 units"),
            "{:?}",
            state.error
        );
        let compensated: Vec<String> = state
            .history
            .iter()
            .filter(|h| h.outcome == "compensated")
            .map(|h| h.step.clone())
            .collect();
        let expected: Vec<String> = (0..failing).rev().map(|i| format!("take-{i}")).collect();
        assert_eq!(
            compensated, expected,
            "exactly the completed steps, in reverse"
        );
        for bin in &bins {
            assert_eq!(
                units(&store, bin).await,
                10,
                "stock is back where it started"
            );
        }
    }
}

/// A step that takes longer than its timeout fails and the saga compensates.
pub async fn saga_timeout_triggers_compensation<S: SagaHost>(store: Arc<S>) {
    let bins = bins(&store).await;
    let mut plan = steps(&bins, [1, 2, 3]);
    plan.insert(
        2,
        SagaStep::new("stall", Stall).timeout(Duration::from_millis(100)),
    );
    let state = orchestrator(&store)
        .start_saga(&saga_id(), plan)
        .await
        .unwrap();
    assert_eq!(state.status, SagaStatus::Compensated);
    assert_eq!(state.failed_step.as_deref(), Some("stall"));
    assert!(outcomes(&state).contains(&("stall".into(), "timed_out".into())));
    for bin in &bins {
        assert_eq!(units(&store, bin).await, 10);
    }
}

/// The deadline of an awaited step is stored: it fires in another orchestrator after the
/// first one is gone.
pub async fn saga_deadline_fires_after_restart<S: SagaHost>(store: Arc<S>) {
    let bins = bins(&store).await;
    let mut plan = steps(&bins, [1, 1, 1]);
    plan.insert(
        1,
        SagaStep::new("approval", Ask)
            .awaiting_reply()
            .timeout(Duration::from_millis(300)),
    );
    let id = saga_id();
    let first = orchestrator(&store);
    let waiting = first.start_saga(&id, plan).await.unwrap();
    assert_eq!(
        (waiting.status, waiting.current_step.as_deref()),
        (SagaStatus::Running, Some("approval"))
    );
    drop(first);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let second = orchestrator(&store);
    assert!(second.recover().await.unwrap() >= 1);
    let state = second.get_saga_state(&id).await.unwrap();
    assert_eq!(state.status, SagaStatus::Compensated);
    assert!(outcomes(&state).contains(&("approval".into(), "timed_out".into())));
    assert_eq!(units(&store, &bins[0]).await, 10);
}

/// Awaited steps are completed or failed by outside replies.
pub async fn saga_steps_complete_by_reply<S: SagaHost>(store: Arc<S>) {
    for succeed in [true, false] {
        let bins = bins(&store).await;
        let mut plan = steps(&bins, [1, 1, 1]);
        plan.insert(1, SagaStep::new("payment", Ask).awaiting_reply());
        let o = orchestrator(&store);
        let id = saga_id();
        assert_eq!(
            o.start_saga(&id, plan)
                .await
                .unwrap()
                .current_step
                .as_deref(),
            Some("payment")
        );
        let state = if succeed {
            o.handle_step_completion(&id, "payment").await.unwrap()
        } else {
            o.handle_step_failure(&id, "payment", "card declined")
                .await
                .unwrap()
        };
        if succeed {
            assert_eq!(state.status, SagaStatus::Completed);
            assert_eq!(units(&store, &bins[2]).await, 9);
        } else {
            assert_eq!(state.status, SagaStatus::Compensated);
            assert_eq!(state.error.as_deref(), Some("card declined"));
            assert_eq!(units(&store, &bins[0]).await, 10);
        }
        // A repeated reply changes nothing.
        assert_eq!(
            o.handle_step_completion(&id, "payment")
                .await
                .unwrap()
                .status,
            state.status
        );
    }
}

/// A saga store that fails the `n`-th update: the process "crashes" between a step's command
/// and the record of its outcome.
struct CrashAt<S> {
    inner: Arc<S>,
    update: AtomicU32,
    crash_at: u32,
}

#[async_trait]
impl<S: SagaHost> SagaStore for CrashAt<S> {
    async fn create_saga(&self, record: &SagaRecord) -> Result<bool> {
        self.inner.create_saga(record).await
    }
    async fn load_saga(&self, id: &str) -> Result<Option<SagaRecord>> {
        self.inner.load_saga(id).await
    }
    async fn update_saga(&self, record: &SagaRecord, expected: u64) -> Result<bool> {
        if self.update.fetch_add(1, Ordering::SeqCst) + 1 == self.crash_at {
            return Err(Error::store("test", "update saga", "the process died here"));
        }
        self.inner.update_saga(record, expected).await
    }
    async fn list_sagas(&self, unfinished_only: bool) -> Result<Vec<SagaRecord>> {
        self.inner.list_sagas(unfinished_only).await
    }
}

/// A crash after a step's command and before its outcome is recorded: recovery sends the
/// command again and the step is applied once.
pub async fn saga_recovery_applies_a_step_once<S: SagaHost>(store: Arc<S>) {
    let bins = bins(&store).await;
    let id = saga_id();
    // Updates: 1 = take-0 dispatched, 2 = take-0 completed (crash here, after the command ran).
    let crashing = Arc::new(CrashAt {
        inner: store.clone(),
        update: AtomicU32::new(0),
        crash_at: 2,
    });
    let doomed = SagaOrchestrator::builder(crashing, store.clone(), bus(&store))
        .lease_ttl(Duration::from_secs(1))
        .build();
    assert!(
        doomed
            .start_saga(&id, steps(&bins, [4, 1, 1]))
            .await
            .is_err(),
        "the first process dies"
    );
    drop(doomed);
    assert_eq!(
        units(&store, &bins[0]).await,
        6,
        "the command ran before the crash"
    );
    let heir = orchestrator(&store);
    tokio::time::sleep(Duration::from_millis(1_100)).await; // the dead process's lease (if any) lapses
    heir.recover().await.unwrap();
    let state = heir.get_saga_state(&id).await.unwrap();
    assert_eq!(state.status, SagaStatus::Completed);
    assert_eq!(
        units(&store, &bins[0]).await,
        6,
        "take-0 was applied once, not twice"
    );
    let events: Vec<_> = store
        .read_stream(&Bin::stream_id(&bins[0]), 1)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(events.len(), 2, "one Put, one Taken");
}

/// A compensation that keeps failing leaves the saga in compensation_failed, visible; an
/// operator's retry finishes it.
pub async fn saga_compensation_failure_then_retry<S: SagaHost>(store: Arc<S>) {
    let bins = bins(&store).await;
    let key = Uuid::new_v4().to_string();
    failures().lock().unwrap().insert(key.clone(), 5);
    let mut plan = steps(&bins, [1, 2, 99]);
    plan[1].compensation = Some(Box::new(PutBack {
        bin: bins[1].clone(),
        units: 2,
        flaky: Some(key.clone()),
    }));
    let o = orchestrator(&store);
    let id = saga_id();
    let state = o.start_saga(&id, plan).await.unwrap();
    assert_eq!(state.status, SagaStatus::CompensationFailed);
    assert!(
        state.error.as_deref().unwrap_or("").contains("take-1"),
        "{:?}",
        state.error
    );
    assert_eq!(units(&store, &bins[1]).await, 8, "not yet put back");
    assert_eq!(
        units(&store, &bins[0]).await,
        9,
        "and the earlier step not yet either: reverse order"
    );
    assert_eq!(o.metrics().compensation_failed, 1);
    assert!(o
        .list(true)
        .await
        .unwrap()
        .iter()
        .any(|s| s.id == id && s.status == SagaStatus::CompensationFailed));
    failures().lock().unwrap().insert(key, 0); // the warehouse reopens
    let state = o.retry(&id).await.unwrap();
    assert_eq!(state.status, SagaStatus::Compensated);
    for bin in &bins {
        assert_eq!(units(&store, bin).await, 10);
    }
    assert!(o.retry(&id).await.is_err(), "nothing left to retry");
}

/// One orchestrator drives a saga at a time: while another holds its lease nothing moves, and
/// two racing orchestrators apply each step once.
pub async fn saga_has_one_active_orchestrator<S: SagaHost>(store: Arc<S>) {
    let bins = bins(&store).await;
    let id = saga_id();
    let busy = store
        .acquire(
            &format!("saga/{id}"),
            "another-process",
            Duration::from_secs(30),
        )
        .await
        .unwrap()
        .unwrap();
    let (a, b) = (orchestrator(&store), orchestrator(&store));
    let parked = a.start_saga(&id, steps(&bins, [1, 1, 1])).await.unwrap();
    assert_eq!(parked.status, SagaStatus::Running);
    assert!(
        parked.steps.iter().all(|(_, s)| *s == StepState::Pending),
        "nothing ran while another held the lease"
    );
    assert_eq!(units(&store, &bins[0]).await, 10);
    store.release(&busy).await.unwrap();
    let (ra, rb) = tokio::join!(a.drive(&id), b.drive(&id));
    ra.unwrap();
    rb.unwrap();
    let state = a.get_saga_state(&id).await.unwrap();
    assert_eq!(state.status, SagaStatus::Completed);
    for bin in &bins {
        assert_eq!(units(&store, bin).await, 9, "each step applied once");
    }
}

/// The commands a saga sends carry its correlation id and a command id per step, and so do
/// the events they cause.
pub async fn saga_commands_carry_correlation<S: SagaHost>(store: Arc<S>) {
    let bins = bins(&store).await;
    let id = saga_id();
    orchestrator(&store)
        .start_saga(&id, steps(&bins, [1, 1, 1]))
        .await
        .unwrap();
    let mut correlations = std::collections::HashSet::new();
    let mut causations = std::collections::HashSet::new();
    for bin in &bins {
        let events: Vec<_> = store
            .read_stream(&Bin::stream_id(bin), 2)
            .try_collect()
            .await
            .unwrap();
        let meta = &events[0].metadata;
        correlations.insert(meta.correlation_id.expect("a correlation id"));
        causations.insert(meta.causation_id.expect("a causation id"));
        assert_eq!(meta.user.get("saga"), Some(&id));
    }
    assert_eq!(correlations.len(), 1, "one conversation");
    assert_eq!(causations.len(), 3, "one command id per step");
}

/// Causation is a chain from a request to the last event a saga's step produced: one
/// correlation id throughout, and each message names the one before it. Request → command
/// (sent on the bus) → event → saga (started with the event's metadata) → step command →
/// event.
pub async fn causation_is_a_chain<S: SagaHost>(store: Arc<S>) {
    let (requested, bins) = (bins(&store).await.remove(0), bins(&store).await);
    let (conversation, request) = (Uuid::new_v4(), Uuid::new_v4());
    let sent = Metadata::correlated(conversation).caused_by(request);
    bus(&store)
        .send_with(
            Take {
                bin: requested.clone(),
                units: 1,
            },
            sent,
        )
        .await
        .unwrap();
    let first = store
        .read_stream(&Bin::stream_id(&requested), 2)
        .try_collect::<Vec<_>>()
        .await
        .unwrap()
        .remove(0);
    let command_id = first
        .metadata
        .causation_id
        .expect("the event names its command");
    let command = dispatched()
        .lock()
        .unwrap()
        .get(&command_id)
        .cloned()
        .expect("the event's causation id is the id of the command that the bus dispatched");
    assert_eq!(
        command.causation_id,
        Some(request),
        "the command names the request"
    );
    assert_eq!(command.correlation_id, Some(conversation));
    assert_eq!(first.metadata.correlation_id, Some(conversation));

    let id = saga_id();
    let starter = Metadata::correlated(conversation).caused_by(first.event_id);
    let state = orchestrator(&store)
        .start_saga_with(&id, steps(&bins, [1, 1, 1]), &starter)
        .await
        .unwrap();
    assert_eq!(state.status, SagaStatus::Completed);
    assert_eq!(
        state.correlation_id, conversation,
        "the saga joins the conversation"
    );
    assert_eq!(
        state.caused_by,
        Some(first.event_id),
        "the saga names the event"
    );
    for bin in &bins {
        let event = store
            .read_stream(&Bin::stream_id(bin), 2)
            .try_collect::<Vec<_>>()
            .await
            .unwrap()
            .remove(0);
        let step = event
            .metadata
            .causation_id
            .expect("a step event names its command");
        assert_eq!(
            event.metadata.command_id,
            Some(step),
            "caused by the step command"
        );
        assert_eq!(event.metadata.correlation_id, Some(conversation));
        let step_command = dispatched()
            .lock()
            .unwrap()
            .get(&step)
            .cloned()
            .expect("the step command went through the bus");
        assert_eq!(
            step_command.causation_id,
            Some(state.message_id),
            "it names the saga"
        );
        assert_eq!(step_command.correlation_id, Some(conversation));
    }
}

/// Three steps on the bins, the middle one `middle` with `timeout` (compensated by putting
/// its unit back).
fn around(
    bins: &[String],
    middle: impl crate::saga::SagaCommand + 'static,
    timeout: Duration,
) -> Vec<SagaStep> {
    let mut plan = steps(bins, [1, 1, 1]);
    plan[1] = SagaStep::new("middle", middle)
        .compensate_with(PutBack {
            bin: bins[1].clone(),
            units: 1,
            flaky: None,
        })
        .timeout(timeout);
    plan
}

/// Runs a saga whose middle step takes a unit from `bins[1]` and then stalls past its 200 ms
/// timeout on its first `stalls` attempts.
async fn run_stalling<S: SagaHost>(
    store: &Arc<S>,
    bins: &[String],
    stalls: u32,
) -> crate::saga::SagaState {
    let key = format!("stall-{}", Uuid::new_v4().simple());
    failures().lock().unwrap().insert(key.clone(), stalls);
    let middle = TakeThenStall {
        bin: bins[1].clone(),
        units: 1,
        stalls: key,
    };
    orchestrator(store)
        .start_saga(&saga_id(), around(bins, middle, Duration::from_millis(200)))
        .await
        .unwrap()
}

/// A step that commits and then times out is sent again with the same command id: the
/// repository recognises it, the re-send answers, and the saga completes with the step
/// applied once.
pub async fn saga_step_committed_before_its_timeout_completes_once<S: SagaHost>(store: Arc<S>) {
    let bins = bins(&store).await;
    let state = run_stalling(&store, &bins, 1).await;
    assert_eq!(state.status, SagaStatus::Completed, "{:?}", state.history);
    assert!(outcomes(&state).contains(&("middle".into(), "timed_out".into())));
    for bin in &bins {
        assert_eq!(units(&store, bin).await, 9, "each step applied once");
    }
}

/// A step whose every re-send times out after committing is never guessed to have failed:
/// it counts as possibly applied and is compensated with the steps before it, so the saga
/// ends compensated with nothing left applied.
pub async fn saga_step_of_unknown_outcome_is_compensated<S: SagaHost>(store: Arc<S>) {
    let bins = bins(&store).await;
    let state = run_stalling(&store, &bins, u32::MAX).await;
    assert_eq!(state.status, SagaStatus::Compensated, "{:?}", state.history);
    assert_eq!(state.failed_step.as_deref(), Some("middle"));
    let middle_state = state.steps.iter().find(|(s, _)| s == "middle").unwrap().1;
    assert_eq!(
        middle_state,
        StepState::Compensated,
        "the possibly applied step is undone"
    );
    assert!(outcomes(&state).contains(&("middle".into(), "possibly_applied".into())));
    for bin in &bins {
        assert_eq!(units(&store, bin).await, 10, "nothing left applied");
    }
}

/// Leases whose renewals wait while `paused` is true: an orchestrator process stopped (say by
/// SIGSTOP) with its lease running out.
struct Stalling<S> {
    inner: Arc<S>,
    paused: tokio::sync::watch::Receiver<bool>,
}

#[async_trait]
impl<S: SagaHost> LeaseStore for Stalling<S> {
    async fn acquire(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<crate::store::Lease>> {
        self.inner.acquire(name, holder, ttl).await
    }
    async fn renew(&self, lease: &crate::store::Lease) -> Result<bool> {
        let mut paused = self.paused.clone();
        let _ = paused.wait_for(|p| !*p).await;
        self.inner.renew(lease).await
    }
    async fn release(&self, lease: &crate::store::Lease) -> Result<bool> {
        self.inner.release(lease).await
    }
}

/// Two orchestrators on one store; the first stalls in a step past its lease's time to live,
/// the second takes the saga over and finishes it. When the first wakes up, its saves are
/// refused and it stops: no step is applied twice and the saga's record is the second's.
pub async fn saga_stale_orchestrator_is_fenced<S: SagaHost>(store: Arc<S>) {
    let bins = bins(&store).await;
    let id = saga_id();
    let (gate, entered, release) = closed_gate();
    let (pause, paused) = tokio::sync::watch::channel(true);
    let ttl = Duration::from_secs(1);
    let leases = Arc::new(Stalling {
        inner: store.clone(),
        paused,
    });
    let stalled = SagaOrchestrator::builder(store.clone(), leases, bus(&store))
        .lease_ttl(ttl)
        .retry_backoff(Duration::from_millis(5))
        .build();
    let middle = GatedTake {
        bin: bins[1].clone(),
        units: 1,
        gate,
    };
    let plan = around(&bins, middle, Duration::from_secs(30));
    let first = {
        let (stalled, id) = (stalled.clone(), id.clone());
        tokio::spawn(async move { stalled.start_saga(&id, plan).await })
    };
    entered.notified().await;
    // Past the ttl, and past the second a store may add to it.
    tokio::time::sleep(ttl * 2 + Duration::from_millis(500)).await;

    let other = orchestrator(&store);
    let done = other.drive(&id).await.unwrap();
    assert_eq!(done.status, SagaStatus::Completed, "{:?}", done.history);

    // It wakes up in its step, renewals still stalled: its next save is what stops it.
    release.notify_one();
    let stale = first.await.unwrap();
    assert!(
        matches!(&stale, Err(Error::Fenced { .. })),
        "the stalled orchestrator's save is refused and it stops: {stale:?}"
    );
    drop(pause);
    assert_eq!(stalled.metrics().fenced, 1);
    let after = other.get_saga_state(&id).await.unwrap();
    assert_eq!(
        after.revision, done.revision,
        "the stalled orchestrator saved nothing"
    );
    assert_eq!(after.status, SagaStatus::Completed);
    for bin in &bins {
        assert_eq!(units(&store, bin).await, 9, "each step applied once");
    }
}

/// The lease is renewed while a saga runs: a step that takes longer than the lease's time to
/// live does not let a second orchestrator in.
pub async fn saga_lease_is_renewed_while_a_step_runs<S: SagaHost>(store: Arc<S>) {
    let bins = bins(&store).await;
    let id = saga_id();
    let (gate, entered, release) = closed_gate();
    let ttl = Duration::from_secs(1);
    let driver = SagaOrchestrator::builder(store.clone(), store.clone(), bus(&store))
        .lease_ttl(ttl)
        .build();
    let middle = GatedTake {
        bin: bins[1].clone(),
        units: 1,
        gate,
    };
    let plan = around(&bins, middle, Duration::from_secs(30));
    let running = {
        let (driver, id) = (driver.clone(), id.clone());
        tokio::spawn(async move { driver.start_saga(&id, plan).await })
    };
    entered.notified().await;
    tokio::time::sleep(ttl * 3).await;
    let other = orchestrator(&store);
    let seen = other.drive(&id).await.unwrap();
    assert_eq!(
        (seen.status, seen.current_step.as_deref()),
        (SagaStatus::Running, Some("middle")),
        "the lease is still held: the other orchestrator leaves the saga alone"
    );
    release.notify_one();
    let done = running.await.unwrap().unwrap();
    assert_eq!(done.status, SagaStatus::Completed);
    assert_eq!(driver.metrics().fenced, 0);
    for bin in &bins {
        assert_eq!(units(&store, bin).await, 9, "each step applied once");
    }
}

/// `start()`'s background task does what `recover()` does, every tick, without being called:
/// it fires an awaited step's deadline and resumes a saga left unstarted when its lease was
/// held elsewhere.
pub async fn saga_background_task_recovers_and_fires_deadlines<S: SagaHost>(store: Arc<S>) {
    let (waiting_bins, parked_bins) = (bins(&store).await, bins(&store).await);
    let (waiting, parked) = (saga_id(), saga_id());
    let mut plan = steps(&waiting_bins, [1, 1, 1]);
    plan.insert(
        1,
        SagaStep::new("approval", Ask)
            .awaiting_reply()
            .timeout(Duration::from_millis(300)),
    );
    let first = orchestrator(&store);
    first.start_saga(&waiting, plan).await.unwrap();
    let busy = store
        .acquire(
            &format!("saga/{parked}"),
            "another-process",
            Duration::from_secs(1),
        )
        .await
        .unwrap()
        .unwrap();
    let state = first
        .start_saga(&parked, steps(&parked_bins, [1, 1, 1]))
        .await
        .unwrap();
    assert!(state.steps.iter().all(|(_, s)| *s == StepState::Pending));
    drop((first, busy)); // the lease is left to expire, as a crashed holder's would

    let background = SagaOrchestrator::builder(store.clone(), store.clone(), bus(&store))
        .tick(Duration::from_millis(50))
        .build();
    background.start();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (a, b) = (
            background.get_saga_state(&waiting).await.unwrap(),
            background.get_saga_state(&parked).await.unwrap(),
        );
        if a.status.is_finished() && b.status.is_finished() {
            assert_eq!(a.status, SagaStatus::Compensated, "{:?}", a.history);
            assert!(outcomes(&a).contains(&("approval".into(), "timed_out".into())));
            assert_eq!(b.status, SagaStatus::Completed, "{:?}", b.history);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the background task did not finish them: {:?} / {:?}",
            a.status,
            b.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(units(&store, &waiting_bins[0]).await, 10, "compensated");
    for bin in &parked_bins {
        assert_eq!(units(&store, bin).await, 9, "each step applied once");
    }
    assert!(background.metrics().completed >= 1);
}
