//! The service lifecycle: components start in order, stop in reverse order, and a stopped
//! projection manager and saga orchestrator have really stopped (leases released, no task).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use keel::health::Health;
use keel::lifecycle::{Component, Components};
use keel::projection::{Generations, Projection, ProjectionManager, ProjectionState};
use keel::saga::SagaOrchestrator;
use keel::{BoxError, CommandBus, LeaseStore, RecordedEvent};
use keel_memory::MemoryStore;

/// Writes down what was done to it.
struct Probe {
    name: &'static str,
    log: Arc<Mutex<Vec<String>>>,
}

#[async_trait]
impl Component for Probe {
    fn name(&self) -> String {
        self.name.to_owned()
    }

    fn start(&self) {
        self.log
            .lock()
            .unwrap()
            .push(format!("start {}", self.name));
    }

    async fn shutdown(&self) {
        self.log.lock().unwrap().push(format!("stop {}", self.name));
    }

    async fn health(&self) -> Health {
        let mut health = Health::new(self.name);
        health.check("probe", self.name != "sick", "as configured");
        health
    }
}

#[tokio::test]
async fn components_start_in_order_and_stop_in_reverse() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let probe = |name| Probe {
        name,
        log: log.clone(),
    };
    let components = Components::new()
        .with(probe("store"))
        .with(probe("projections"));
    let (tell, told) = tokio::sync::oneshot::channel::<()>();
    let running = {
        let components = components.clone();
        tokio::spawn(async move {
            components
                .run_until(async {
                    let _ = told.await;
                })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(*log.lock().unwrap(), ["start store", "start projections"]);
    tell.send(()).unwrap();
    running.await.unwrap();
    assert_eq!(
        *log.lock().unwrap(),
        [
            "start store",
            "start projections",
            "stop projections",
            "stop store"
        ]
    );
    assert!(components.is_healthy().await);
    let sick = components.with(probe("sick"));
    assert!(
        !sick.is_healthy().await,
        "one unhealthy part makes the whole"
    );
    assert_eq!(sick.health().await.len(), 3);
}

#[derive(Clone, Default)]
struct Count(Generations<u64>);

#[async_trait]
impl Projection for Count {
    fn name(&self) -> &str {
        "count"
    }
    async fn apply(&self, generation: u64, _: &RecordedEvent) -> Result<(), BoxError> {
        self.0.update(generation, |n| *n += 1);
        Ok(())
    }
    async fn reset(&self, generation: u64) -> Result<(), BoxError> {
        self.0.reset(generation);
        Ok(())
    }
    async fn activate(&self, generation: u64) -> Result<(), BoxError> {
        self.0.activate(generation);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_manager_and_orchestrator_have_let_go() {
    let store = Arc::new(MemoryStore::new());
    let manager =
        ProjectionManager::builder(store.clone(), store.clone(), store.clone(), store.clone())
            .projection(Arc::new(Count::default()))
            .poll_interval(Duration::from_millis(5))
            .build();
    let orchestrator =
        SagaOrchestrator::builder(store.clone(), store.clone(), CommandBus::builder().build())
            .tick(Duration::from_millis(5))
            .build();
    let components = Components::new()
        .with(manager.clone())
        .with(orchestrator.clone());
    components.start();
    components.start(); // a second start changes nothing
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while manager.status("count").await.unwrap().state != ProjectionState::Running {
        assert!(
            std::time::Instant::now() < deadline,
            "the manager never ran"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(orchestrator.is_running());
    assert!(components.is_healthy().await);

    components.shutdown().await;
    assert!(!orchestrator.is_running(), "the orchestrator's task ended");
    assert_eq!(
        manager.status("count").await.unwrap().state,
        ProjectionState::Stopped
    );
    // The projection's lease is free at once: another manager takes it without waiting.
    let heir = store
        .acquire("projection/count", "heir", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(heir.is_some(), "the stopped manager released its lease");
    // And it starts again.
    components.start();
    assert!(orchestrator.is_running());
    components.shutdown().await;
}
