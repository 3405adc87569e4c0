//! A cap on how fast a rebuild applies events, so that a rebuild reading the whole history
//! leaves the database to the live traffic.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keel::projection::{ActiveGeneration, Projection};
use keel::store::Fence;
use keel::{BoxError, CheckpointStore, RecordedEvent};

/// Wraps a projection: events applied to a generation newer than the active one (a rebuild)
/// wait `1 / rate` seconds each; the live generation is never slowed.
pub struct RebuildThrottle {
    inner: Arc<dyn Projection>,
    pause: Duration,
    active: ActiveGeneration,
}

impl RebuildThrottle {
    /// Caps `inner`'s rebuilds at `events_per_second`, reading the active generation from
    /// `checkpoints` (the store its manager uses).
    pub fn new(
        inner: Arc<dyn Projection>,
        checkpoints: Arc<dyn CheckpointStore>,
        events_per_second: u32,
    ) -> Self {
        let active = ActiveGeneration::new(checkpoints, inner.name());
        RebuildThrottle {
            inner,
            pause: Duration::from_secs(1) / events_per_second.max(1),
            active,
        }
    }
}

#[async_trait]
impl Projection for RebuildThrottle {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn handles(&self, event_type: &str) -> bool {
        self.inner.handles(event_type)
    }

    async fn apply(&self, generation: u64, event: &RecordedEvent) -> Result<(), BoxError> {
        if generation > self.active.get().await? {
            tokio::time::sleep(self.pause).await;
        }
        self.inner.apply(generation, event).await
    }

    async fn commit(&self, generation: u64) -> Result<(), BoxError> {
        self.inner.commit(generation).await
    }

    async fn fence(&self, fence: &Fence) -> Result<(), BoxError> {
        self.inner.fence(fence).await
    }

    async fn reset(&self, generation: u64) -> Result<(), BoxError> {
        self.inner.reset(generation).await
    }

    async fn activate(&self, generation: u64) -> Result<(), BoxError> {
        self.inner.activate(generation).await
    }

    async fn retire(&self, generation: u64) -> Result<(), BoxError> {
        self.inner.retire(generation).await
    }
}
