//! Keel's benchmarks live in `benches/`; run them with `./scripts/bench`. This library holds
//! what the benchmark targets share.

use std::sync::atomic::{AtomicU64, Ordering};

use keel::projection::Projection;
use keel::{BoxError, RecordedEvent};

/// A projection that sums the `by` of counter events: cheap, so a rebuild benchmark measures
/// the manager and the feed rather than the read model.
#[derive(Default)]
pub struct Tally(pub AtomicU64);

#[async_trait::async_trait]
impl Projection for Tally {
    fn name(&self) -> &str {
        "tally"
    }

    async fn apply(&self, _generation: u64, event: &RecordedEvent) -> Result<(), BoxError> {
        let keel::doc::CounterEvent::Incremented { by } = event.decode()?;
        self.0.fetch_add(by, Ordering::Relaxed);
        Ok(())
    }

    async fn reset(&self, _generation: u64) -> Result<(), BoxError> {
        self.0.store(0, Ordering::Relaxed);
        Ok(())
    }

    async fn activate(&self, _generation: u64) -> Result<(), BoxError> {
        Ok(())
    }
}
