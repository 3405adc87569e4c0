//! Managers sharing a projection's slices
//! ([`share_slices`](super::ProjectionManagerBuilder::share_slices)).
//!
//! Each sharing manager refreshes its membership of the group `projection/<name>`
//! ([`LeaseStore::join`](crate::LeaseStore::join)) every third of the lease TTL, renews the
//! slice leases it holds (`projection/<name>/s<slice>`), hands back those above its fair share
//! `ceil(slices / members)` and takes free ones up to it. It applies only its slices, and
//! saves each slice's checkpoint under that slice's fence, so a manager that lost a slice
//! cannot move its checkpoint.
//!
//! The manager that holds the projection's own lease (`projection/<name>`) coordinates: it
//! takes operator requests and publishes the status. What every manager must follow is kept
//! as checkpoint rows beside the slices', written under the coordinator's fence and read by
//! each manager at every poll: `<name>/paused`, `<name>/resumed` (a count: each resume
//! retries every manager's failed event), `<name>/rebuild` (the generation being rebuilt;
//! every manager fills its slices of it; a manager that does not share reads it too, to resume
//! a rebuild its predecessor left unfinished) and `<name>/generation` (the active one, which the
//! coordinator moves once the rebuild's checkpoints cover every slice's head).

use std::time::{Duration, Instant};

use super::{projection_error, Inner, Rebuild, Runner, Slot};
use crate::error::Result;
use crate::feed::{slice_of, Cursor};
use crate::projection::ProjectionState;
use crate::store::Lease;
use crate::StreamId;

/// How often the coordinator reads every slice's checkpoint for the status.
const VIEW_EVERY: Duration = Duration::from_secs(1);

/// A projection-wide value the coordinator writes and every sharing manager reads.
#[derive(Clone, Copy, Debug)]
pub(super) enum SharedKey {
    /// 1 while paused.
    Paused,
    /// How many resumes were asked for.
    Resumed,
    /// The generation being rebuilt (0: none).
    Rebuild,
    /// The last generation replaced whose rows are not retired yet (0: none).
    Retire,
    /// When (ms since the epoch) [`Retire`](SharedKey::Retire) is due.
    RetireAt,
}

impl SharedKey {
    fn name(self, projection: &str) -> String {
        match self {
            SharedKey::Paused => format!("{projection}/paused"),
            SharedKey::Resumed => format!("{projection}/resumed"),
            SharedKey::Rebuild => format!("{projection}/rebuild"),
            SharedKey::Retire => format!("{projection}/retire"),
            SharedKey::RetireAt => format!("{projection}/retire_at"),
        }
    }
}

impl Runner {
    /// The group of the managers sharing this projection.
    pub(super) fn group(&self) -> String {
        format!("projection/{}", self.name)
    }

    fn slice_lease_name(&self, slice: u32) -> String {
        format!("projection/{}/s{slice}", self.name)
    }

    /// Running, or rebuilding when a rebuild is under way.
    fn going(&self) -> ProjectionState {
        if self.rebuild.is_some() {
            ProjectionState::Rebuilding
        } else {
            ProjectionState::Running
        }
    }
}

impl Inner {
    /// Whether, by this manager's own clock, the lease(s) it applies under are still its own.
    pub(super) fn work_current(&self, runner: &Runner) -> bool {
        if runner.share {
            let ttl = self.config.lease_ttl;
            !runner.slice_leases.is_empty() && runner.slices_renewed.elapsed() < ttl - ttl / 10
        } else {
            self.lease_current(runner)
        }
    }

    /// What a checkpoint save of `slice` came to: `false` when the store refused it (the
    /// slice, or the projection, is another manager's now; this manager lets it go).
    pub(super) fn saved(
        &self,
        runner: &mut Runner,
        slice: u32,
        result: Result<()>,
    ) -> Result<bool> {
        match result {
            Ok(()) => Ok(true),
            Err(e) if e.is_fenced() && runner.share => {
                tracing::warn!(projection = %runner.name, slice, error = %e, "slice fenced out; it is another manager's");
                runner.slice_leases.remove(&slice);
                runner.loaded = false;
                Ok(false)
            }
            Err(e) if e.is_fenced() => {
                Self::let_go(runner, &e);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Saves a projection-wide value under the coordinator's lease; `false` when fenced.
    pub(super) async fn save_shared(
        &self,
        runner: &mut Runner,
        key: SharedKey,
        value: u64,
    ) -> Result<bool> {
        let name = key.name(&runner.name);
        self.save_fenced(runner, &name, value).await
    }

    /// A projection-wide value (0 when never saved).
    pub(super) async fn load_shared(&self, runner: &Runner, key: SharedKey) -> Result<u64> {
        Ok(self
            .checkpoints
            .load_checkpoint(&key.name(&runner.name))
            .await?
            .unwrap_or(0))
    }

    /// Keeps this manager's fair share of the slices: every third of the lease TTL (or at
    /// once when it holds none) it refreshes its membership, renews its slice leases, hands
    /// back those above `ceil(slices / members)` and takes free ones up to it. A change of
    /// slices makes the next step reload the checkpoints (other managers moved them).
    pub(super) async fn hold_slices(&self, runner: &mut Runner) -> Result<()> {
        let ttl = self.config.lease_ttl;
        if !runner.slice_leases.is_empty() && runner.slices_renewed.elapsed() < ttl / 3 {
            return Ok(());
        }
        let sent = Instant::now();
        let before: Vec<u32> = runner.slice_leases.keys().copied().collect();
        if !runner.slice_leases.is_empty() && !self.work_current(runner) {
            // Stalled past the leases by this manager's clock: they may be another's now.
            tracing::warn!(projection = %runner.name, "slice leases expired by this manager's clock; applying stops");
            runner.slice_leases.clear();
        }
        let members = self
            .leases
            .join(&runner.group(), &self.config.id, ttl)
            .await?
            .len()
            .max(1);
        let share = (runner.slices as usize).div_ceil(members);
        let held: Vec<Lease> = runner.slice_leases.values().cloned().collect();
        let renewed = futures::future::join_all(held.iter().map(|l| self.leases.renew(l))).await;
        for (lease, kept) in held.iter().zip(renewed) {
            if !matches!(kept, Ok(true)) {
                runner.slice_leases.retain(|_, l| l.name != lease.name);
            }
        }
        while runner.slice_leases.len() > share {
            let Some((slice, lease)) = runner.slice_leases.pop_last() else {
                break;
            };
            tracing::debug!(projection = %runner.name, slice, share, "slice handed back");
            let _ = self.leases.release(&lease).await;
        }
        // From a place that depends on this manager's id, so that managers starting together
        // try different slices first.
        let start = slice_of(&StreamId::new(&self.config.id), runner.slices);
        for i in 0..runner.slices {
            if runner.slice_leases.len() >= share {
                break;
            }
            let slice = (start + i) % runner.slices;
            if runner.slice_leases.contains_key(&slice) {
                continue;
            }
            let name = runner.slice_lease_name(slice);
            if let Some(lease) = self.leases.acquire(&name, &self.config.id, ttl).await? {
                runner.slice_leases.insert(slice, lease);
            }
        }
        runner.slices_renewed = sent;
        if runner
            .slice_leases
            .keys()
            .copied()
            .ne(before.iter().copied())
        {
            tracing::info!(projection = %runner.name, held = runner.slice_leases.len(), share, members, "projection slices changed hands");
            runner.loaded = false;
        }
        Ok(())
    }

    /// Follows what the coordinator decided (at every poll): a switched generation, a rebuild
    /// under way, pause and resume. The coordinator also refreshes its view of every slice's
    /// checkpoint for the status.
    pub(super) async fn sync_shared(&self, slot: &Slot, runner: &mut Runner) -> Result<()> {
        let generation = self
            .checkpoints
            .load_checkpoint(&runner.generation_key())
            .await?
            .unwrap_or(1);
        if generation > runner.generation {
            slot.projection
                .activate(generation)
                .await
                .map_err(|e| projection_error(&runner.name, e))?;
            runner.cursor = self.load_cursor(runner, generation).await?;
            runner.generation = generation;
            if let Some(r) = runner.rebuild.take() {
                runner.last_rebuild_events = r.done;
            }
            if runner.state == ProjectionState::Rebuilding {
                runner.state = ProjectionState::Running;
            }
        }
        let target = self.load_shared(runner, SharedKey::Rebuild).await?;
        let known = runner.rebuild.as_ref().map(|r| r.generation);
        if target > runner.generation && known != Some(target) {
            let cursor = self.load_cursor(runner, target).await?;
            runner.rebuild = Some(Rebuild {
                generation: target,
                cursor,
                started: Instant::now(),
                done: 0,
                total: self.events.feed_head().await?,
            });
            if runner.state == ProjectionState::Running {
                runner.state = ProjectionState::Rebuilding;
            }
        }
        let resumes = self.load_shared(runner, SharedKey::Resumed).await?;
        if resumes > runner.seen_resumes {
            runner.seen_resumes = resumes;
            if runner.state == ProjectionState::Failed {
                runner.failed_event = None;
                runner.state = runner.going();
            }
        }
        let paused = self.load_shared(runner, SharedKey::Paused).await? == 1;
        match runner.state {
            ProjectionState::Paused if !paused => runner.state = runner.going(),
            ProjectionState::Running | ProjectionState::Rebuilding if paused => {
                runner.state = ProjectionState::Paused
            }
            _ => {}
        }
        if runner.lease.is_some()
            && runner
                .shared_view
                .as_ref()
                .is_none_or(|(at, ..)| at.elapsed() >= VIEW_EVERY)
        {
            let active = self.load_cursor(runner, runner.generation).await?;
            let rebuilt = match runner.rebuild.as_ref().map(|r| r.generation) {
                Some(g) => Some(self.load_cursor(runner, g).await?),
                None => None,
            };
            runner.shared_view = Some((Instant::now(), active, rebuilt));
        }
        Ok(())
    }

    /// The coordinator's switch to the rebuilt generation, once the rebuild's checkpoints,
    /// whoever saved them, cover every slice's head.
    pub(super) async fn try_swap_shared(&self, slot: &Slot, runner: &mut Runner) -> Result<()> {
        let Some(generation) = runner.rebuild.as_ref().map(|r| r.generation) else {
            return Ok(());
        };
        let rebuilt: Cursor = self.load_cursor(runner, generation).await?;
        if !rebuilt.covers(&runner.heads) {
            return Ok(());
        }
        let key = runner.generation_key();
        if !self.save_fenced(runner, &key, generation).await?
            || !self.save_shared(runner, SharedKey::Rebuild, 0).await?
        {
            return Ok(());
        }
        slot.projection
            .activate(generation)
            .await
            .map_err(|e| projection_error(&runner.name, e))?;
        let replaced = runner.generation;
        self.schedule_retire(runner, replaced).await?;
        tracing::info!(projection = %runner.name, generation, "rebuild complete on every slice; generation active");
        runner.last_rebuild_events = rebuilt.total();
        runner.rebuild = None;
        runner.generation = generation;
        runner.cursor = rebuilt;
        runner.shared_view = None;
        if runner.state == ProjectionState::Rebuilding {
            runner.state = ProjectionState::Running;
        }
        Ok(())
    }
}
