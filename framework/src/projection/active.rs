//! [`ActiveGeneration`]: the generation a projection's queries read, followed from the stores.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::projection::generation_key;
use crate::store::CheckpointStore;

/// The generation of a projection that queries read, as the stores say, for readers in a
/// process that does not run the projection's manager (an API beside a projector): after a
/// rebuild switches generations, such a reader follows within [`cache_for`](Self::cache_for).
/// A manager that retires old generations waits
/// ([`retire_after`](crate::projection::ProjectionManagerBuilder::retire_after)) longer than
/// readers cache, so a reader never queries rows that are gone.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use keel::projection::ActiveGeneration;
///
/// let store = Arc::new(keel_memory::MemoryStore::new());
/// let active = ActiveGeneration::new(store, "posts_by_tag").cache_for(Duration::ZERO);
/// assert_eq!(active.get().await.unwrap(), 1, "before any rebuild");
/// # });
/// ```
pub struct ActiveGeneration {
    checkpoints: Arc<dyn CheckpointStore>,
    key: String,
    ttl: Duration,
    cached: Mutex<Option<(Instant, u64)>>,
}

impl ActiveGeneration {
    /// How long a read generation is reused unless configured otherwise.
    pub const DEFAULT_CACHE: Duration = Duration::from_secs(1);

    /// Follows `projection`'s active generation in `checkpoints` (the store its manager saves
    /// checkpoints to).
    pub fn new(checkpoints: Arc<dyn CheckpointStore>, projection: &str) -> Self {
        ActiveGeneration {
            checkpoints,
            key: generation_key(projection),
            ttl: Self::DEFAULT_CACHE,
            cached: Mutex::new(None),
        }
    }

    /// How long a generation read is reused before it is read again (default
    /// [`DEFAULT_CACHE`](Self::DEFAULT_CACHE); zero reads it every time).
    pub fn cache_for(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The generation to query now.
    pub async fn get(&self) -> Result<u64> {
        let cached = *self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, generation)) = cached {
            if at.elapsed() < self.ttl {
                return Ok(generation);
            }
        }
        self.refresh().await
    }

    /// The generation to query now, read from the store whatever the cache holds (for a read
    /// that must see a write the projection just applied: its generation may have switched).
    pub async fn refresh(&self) -> Result<u64> {
        let generation = self
            .checkpoints
            .load_checkpoint(&self.key)
            .await?
            .unwrap_or(1);
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), generation));
        Ok(generation)
    }
}

impl std::fmt::Debug for ActiveGeneration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActiveGeneration")
            .field("key", &self.key)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}
