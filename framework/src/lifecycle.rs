//! One shape for the long-running parts of a service: [`Component`] (start, shutdown, health) and
//! [`Components`], the parts of one process started together and stopped in reverse order.
//!
//! A service process runs some of: a [`ProjectionManager`](crate::projection::ProjectionManager),
//! a [`SagaOrchestrator`](crate::saga::SagaOrchestrator), a store's feeder (keel-scylla's
//! `KeelScylla` is a component too). Each is started once the process is ready, asked for its
//! health by `GET /health` or the operator's tool, and stopped on SIGTERM so that its leases
//! go to the other processes at once instead of after their time to live.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use std::sync::Arc;
//! use keel::lifecycle::Components;
//! use keel::projection::ProjectionManager;
//!
//! let store = Arc::new(keel_memory::MemoryStore::new());
//! let projections =
//!     ProjectionManager::builder(store.clone(), store.clone(), store.clone(), store.clone())
//!         .build();
//! let components = Components::new().with(projections);
//! // Runs until the future resolves (a signal, in a service), then stops everything.
//! components.run_until(async {}).await;
//! assert!(components.is_healthy().await);
//! # });
//! ```

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;

use crate::health::Health;

/// A long-running part of a service.
///
/// `start` returns at once (the work runs in background tasks); `shutdown` returns once the work
/// has ended and the component's leases are released, so another process can take over
/// without waiting for them to expire. Both may be called more than once.
#[async_trait]
pub trait Component: Send + Sync {
    /// Its name in logs.
    fn name(&self) -> String;

    /// Starts its background work (nothing if it runs).
    fn start(&self);

    /// Stops its background work and releases its leases; returns when that is done.
    async fn shutdown(&self);

    /// What it checked and found.
    async fn health(&self) -> Health;
}

/// The components of one process: started in the order they were added, stopped in the
/// reverse order (what consumes stops before what it consumes from).
#[derive(Clone, Default)]
pub struct Components {
    parts: Vec<Arc<dyn Component>>,
}

impl Components {
    /// No components.
    pub fn new() -> Self {
        Components::default()
    }

    /// Adds `component`.
    pub fn with(mut self, component: impl Component + 'static) -> Self {
        self.parts.push(Arc::new(component));
        self
    }

    /// Adds a shared component.
    pub fn with_shared(mut self, component: Arc<dyn Component>) -> Self {
        self.parts.push(component);
        self
    }

    /// The components' names, in start order.
    pub fn names(&self) -> Vec<String> {
        self.parts.iter().map(|c| c.name()).collect()
    }

    /// Starts every component, in order.
    pub fn start(&self) {
        for part in &self.parts {
            tracing::info!(component = %part.name(), "starting");
            part.start();
        }
    }

    /// Stops every component, in reverse order, each after the one added after it.
    pub async fn shutdown(&self) {
        for part in self.parts.iter().rev() {
            tracing::info!(component = %part.name(), "stopping");
            part.shutdown().await;
        }
    }

    /// Every component's health, in order.
    pub async fn health(&self) -> Vec<Health> {
        let mut reports = Vec::with_capacity(self.parts.len());
        for part in &self.parts {
            reports.push(part.health().await);
        }
        reports
    }

    /// Whether every component is healthy.
    pub async fn is_healthy(&self) -> bool {
        self.health().await.iter().all(Health::is_healthy)
    }

    /// Starts everything, waits for `shutdown` (a signal, say), then stops everything.
    pub async fn run_until(&self, shutdown: impl Future<Output = ()>) {
        self.start();
        shutdown.await;
        self.shutdown().await;
    }
}

impl std::fmt::Debug for Components {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Components")
            .field("parts", &self.names())
            .finish()
    }
}

#[async_trait]
impl Component for crate::projection::ProjectionManager {
    fn name(&self) -> String {
        format!("projection manager {:?}", self.names())
    }

    fn start(&self) {
        crate::projection::ProjectionManager::start(self);
    }

    async fn shutdown(&self) {
        crate::projection::ProjectionManager::stop(self).await;
    }

    async fn health(&self) -> Health {
        crate::projection::ProjectionManager::health(self).await
    }
}

#[cfg(feature = "sagas")]
#[async_trait]
impl Component for crate::saga::SagaOrchestrator {
    fn name(&self) -> String {
        "saga orchestrator".to_owned()
    }

    fn start(&self) {
        crate::saga::SagaOrchestrator::start(self);
    }

    async fn shutdown(&self) {
        crate::saga::SagaOrchestrator::stop(self).await;
    }

    /// With the grace of [`health_grace`](crate::saga::SagaOrchestratorBuilder::health_grace).
    async fn health(&self) -> Health {
        crate::saga::SagaOrchestrator::health(self, self.health_grace()).await
    }
}
