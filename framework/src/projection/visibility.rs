//! Read-your-writes: [`Visibility`] tells whether a projection has applied a write, and waits
//! for it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::feed::{slice_of, Written};
use crate::projection::checkpoint_name;
use crate::store::{CheckpointStore, EventStore};

/// How often [`Visibility::wait_for`] looks again, unless configured otherwise.
pub const DEFAULT_POLL: Duration = Duration::from_millis(10);

/// Whether a projection has applied a write, read from the stores alone: the write's place
/// in the feed, and the checkpoint of the projection's active generation in that slice. It
/// needs no running [`ProjectionManager`](crate::projection::ProjectionManager), so an API
/// process can wait for the projector process beside it.
///
/// A projection has applied a write once its checkpoint in the write's slice has passed the
/// write's last event: every event of that stream up to the write's version is then in the
/// read model (the manager commits the read model before it saves a checkpoint). While a
/// rebuild runs, the generation queries read keeps being applied, so waiting works then too;
/// after the switch the new generation's checkpoints answer.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use keel::projection::Visibility;
/// use keel::feed::Written;
///
/// let store = Arc::new(keel_memory::MemoryStore::new());
/// let visibility = Visibility::new(store.clone(), store.clone());
/// // Nothing was written: a write that does not exist is never applied.
/// let never = Written::new("account-1", 1);
/// assert!(!visibility.applied("balances", &never).await.unwrap());
/// let waited = visibility.wait_for("balances", &never, Duration::from_millis(30)).await;
/// assert!(waited.unwrap_err().is_timeout());
/// # });
/// ```
#[derive(Clone)]
pub struct Visibility {
    events: Arc<dyn EventStore>,
    checkpoints: Arc<dyn CheckpointStore>,
    poll: Duration,
}

impl Visibility {
    /// Reads the feed from `events` and checkpoints from `checkpoints` (the stores the
    /// projection's manager uses).
    pub fn new(events: Arc<dyn EventStore>, checkpoints: Arc<dyn CheckpointStore>) -> Self {
        Visibility {
            events,
            checkpoints,
            poll: DEFAULT_POLL,
        }
    }

    /// How often [`wait_for`](Self::wait_for) looks again (default [`DEFAULT_POLL`]).
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll = every.max(Duration::from_millis(1));
        self
    }

    /// Whether `projection` has applied `written`, as of now.
    pub async fn applied(&self, projection: &str, written: &Written) -> Result<bool> {
        let Some(position) = self
            .events
            .fed_position(&written.stream, written.version)
            .await?
        else {
            return Ok(false); // not in the feed yet
        };
        let slices = self.events.feed_slices();
        let slice = slice_of(&written.stream, slices);
        let generation = self
            .checkpoints
            .load_checkpoint(&crate::projection::generation_key(projection))
            .await?
            .unwrap_or(1);
        let next = self
            .checkpoints
            .load_checkpoint(&checkpoint_name(projection, generation, slice, slices))
            .await?
            .unwrap_or(1);
        Ok(next > position)
    }

    /// Waits until `projection` has applied `written`, or fails with [`Error::Timeout`] after
    /// `timeout` (naming the projection and the write). A projection that is paused, failed
    /// or not running at all is waited for until the timeout like any other.
    pub async fn wait_for(
        &self,
        projection: &str,
        written: &Written,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.applied(projection, written).await? {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout {
                    operation: format!(
                        "waiting for projection `{projection}` to apply `{}` version {}",
                        written.stream, written.version
                    ),
                    after: timeout,
                });
            }
            tokio::time::sleep(self.poll.min(left)).await;
        }
    }
}

impl std::fmt::Debug for Visibility {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Visibility")
            .field("poll", &self.poll)
            .finish_non_exhaustive()
    }
}
