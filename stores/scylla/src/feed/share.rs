//! Sharing the slices: who feeds (the `members` rows), which slices each holds (a lease per
//! slice), and the fair share that each process keeps.
//!
//! Every third of the lease TTL a feeder refreshes its member row, counts the live members,
//! renews the slice leases it holds, hands back what is above its share (`ceil(slices /
//! members)`) and takes free slices up to it. The share needs no agreement: a process that
//! counts one member too many or too few for a round takes a slice too few or one too many,
//! and the next rounds settle it. What keeps the feed exactly once is not the lease but the
//! conditional allocation on each slice's `feed_meta` row; the lease keeps the feeders from
//! competing for the same slice.

use std::time::{Duration, Instant};

use futures::StreamExt;
use keel::{Lease, Result};
use scylla::value::CqlTimestamp;

use super::{feeder_lease, FeederState, SliceFeeder, FEED_MEMBERS, IN_CHUNK, IN_FLIGHT};
use crate::error::store_err;
use crate::Shared;

/// The share of `slices` that each of `members` processes keeps at most.
pub(super) fn fair_share(slices: u32, members: usize) -> usize {
    (slices as usize).div_ceil(members.max(1))
}

/// The slices not held here, in the order this feeder tries to take them: from a place that
/// depends on its id, so that feeders joining together try different slices first.
pub(super) fn try_order(slices: u32, id: &str, held: impl Fn(u32) -> bool) -> Vec<u32> {
    let start = keel::feed::slice_of(&keel::StreamId::new(id), slices);
    (0..slices)
        .map(|i| (start + i) % slices)
        .filter(|&s| !held(s))
        .collect()
}

impl FeederState {
    /// Keeps this feeder's fair share of the slices (see the module doc); `true` while it holds
    /// at least one. Does nothing between renewals unless it holds none.
    pub(super) async fn hold_slices(&mut self) -> bool {
        let ttl = self.config.lease_ttl;
        if !self.held.is_empty() && self.renewed.elapsed() < ttl / 3 {
            return true;
        }
        let sent = Instant::now();
        let had_none = self.held.is_empty();
        let slices = self.shared.feed_slices;
        let id = self.config.id.clone();
        if let Err(e) = self.shared.join(FEED_MEMBERS, &id, ttl).await {
            tracing::debug!(error = %e, "feeder membership not written");
        }
        let members = match self.shared.members(FEED_MEMBERS).await {
            Ok(members) => members.len() + usize::from(!members.contains(&id)),
            Err(e) => {
                tracing::debug!(error = %e, "feeder members unreadable; keeping what is held");
                self.held.len().max(1).min(slices as usize)
            }
        };
        let share = fair_share(slices, members);
        self.renew_held().await;
        self.hand_back_above(share).await;
        let taken = if self.held.len() < share {
            self.take_free(share - self.held.len()).await
        } else {
            0
        };
        self.renewed = sent;
        if taken > 0 {
            // Markers of the slices just taken may be up to an hour old: look at all of them.
            self.scanned_full = false;
            self.seen.clear();
            self.last_scan = None;
            tracing::info!(
                taken,
                held = self.held.len(),
                share,
                members,
                "feeder took slices"
            );
            if had_none && self.config.reconcile_after_outage {
                self.reconcile_after_outage().await;
            }
        }
        if self.held.is_empty() {
            return false;
        }
        self.beat().await;
        true
    }

    /// Renews every held lease at once; a slice whose lease is lost (or cannot be renewed) is
    /// dropped.
    async fn renew_held(&mut self) {
        let leases: Vec<(u32, Lease)> = self
            .leases()
            .iter()
            .map(|(&slice, lease)| (slice, lease.clone()))
            .collect();
        let shared = &self.shared;
        let renewed: Vec<(u32, bool)> = futures::stream::iter(leases)
            .map(|(slice, lease)| async move {
                (slice, matches!(shared.renew_lease(&lease).await, Ok(true)))
            })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        for (slice, kept) in renewed {
            if !kept {
                tracing::warn!(slice, "feeder lost a slice's lease");
                self.drop_slice(slice);
            }
        }
    }

    /// Releases the slices held above `share`, highest first.
    async fn hand_back_above(&mut self, share: usize) {
        if self.held.len() <= share {
            return;
        }
        let mut slices: Vec<u32> = self.held.keys().copied().collect();
        slices.sort_unstable();
        for slice in slices.split_off(share) {
            let lease = self.leases().get(&slice).cloned();
            self.drop_slice(slice);
            if let Some(lease) = lease {
                if let Err(e) = self.shared.release_lease(&lease).await {
                    tracing::debug!(slice, error = %e, "slice lease not released; it expires");
                }
            }
            tracing::info!(slice, share, "feeder handed a slice back");
        }
    }

    /// Takes up to `wanted` slices that no feeder holds; how many it took.
    async fn take_free(&mut self, wanted: usize) -> usize {
        let slices = self.shared.feed_slices;
        let order = try_order(slices, &self.config.id, |s| self.held.contains_key(&s));
        let names: Vec<String> = order.iter().map(|&s| feeder_lease(s, slices)).collect();
        let holders = match self.shared.lease_holders(&names).await {
            Ok(holders) => holders,
            Err(e) => {
                tracing::debug!(error = %e, "slice leases unreadable");
                return 0;
            }
        };
        let free: Vec<u32> = order
            .into_iter()
            .filter(|&s| {
                holders
                    .get(&feeder_lease(s, slices))
                    .is_none_or(Option::is_none)
            })
            .take(wanted)
            .collect();
        // Taken together: one after the other, a new feeder of 64 slices waited for 64 rounds
        // of Paxos before it fed anything.
        let (shared, id, ttl) = (&self.shared, &self.config.id, self.config.lease_ttl);
        let attempts: Vec<(u32, Result<Option<Lease>>)> = futures::stream::iter(free)
            .map(|slice| async move {
                let name = feeder_lease(slice, slices);
                (slice, shared.acquire_lease(&name, id, ttl).await)
            })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        let mut taken = 0;
        for (slice, attempt) in attempts {
            match attempt {
                Ok(Some(lease)) => {
                    tracing::debug!(slice, epoch = lease.epoch, "feeder took a slice");
                    self.leases().insert(slice, lease);
                    self.held
                        .insert(slice, SliceFeeder::new(slice, self.shared.clone()));
                    self.shared.wake.set_held(slice, true);
                    taken += 1;
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(slice, error = %e, "slice lease attempt failed"),
            }
        }
        taken
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u32, Lease>> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn drop_slice(&mut self, slice: u32) {
        self.shared.wake.set_held(slice, false);
        self.leases().remove(&slice);
        self.held.remove(&slice);
    }
}

impl Shared {
    /// Notes that `member` takes part in `work` for the next `ttl` (refreshed by calling again).
    pub(crate) async fn join(&self, work: &str, member: &str, ttl: Duration) -> Result<()> {
        let ttl = (ttl.as_secs_f64().ceil() + 1.0).clamp(2.0, i32::MAX as f64) as i32;
        let now = CqlTimestamp(keel::event::now_millis());
        self.session
            .execute_unpaged(&self.st.member_join, (work, member, now, ttl))
            .await
            .map_err(|e| store_err(format!("note `{member}` as a member of `{work}`"), e))?;
        Ok(())
    }

    /// Ends `member`'s part in `work` at once (on shutdown), instead of when its row expires.
    pub(crate) async fn leave(&self, work: &str, member: &str) {
        if let Err(e) = self
            .session
            .execute_unpaged(&self.st.member_leave, (work, member))
            .await
        {
            tracing::debug!(work, member, error = %e, "member row not deleted; it expires");
        }
    }

    /// The live members of `work`, by id.
    pub(crate) async fn members(&self, work: &str) -> Result<Vec<String>> {
        let op = format!("read the members of `{work}`");
        let rows = self.select(&self.st.member_list, (work,), &op).await?;
        rows.rows::<(String,)>()
            .map_err(|e| store_err(&op, e))?
            .map(|row| row.map(|(m,)| m).map_err(|e| store_err(&op, e)))
            .collect()
    }

    /// The holders of leases `names` (a plain read: what is probably free, for deciding which
    /// to try; taking one is conditional anyway). A name with no row is absent.
    pub(crate) async fn lease_holders(
        &self,
        names: &[String],
    ) -> Result<std::collections::HashMap<String, Option<String>>> {
        let op = "read slice leases";
        let mut holders = std::collections::HashMap::new();
        for chunk in names.chunks(IN_CHUNK) {
            let rows = self
                .select(&self.st.lease_holders, (chunk.to_vec(),), op)
                .await?;
            for row in rows
                .rows::<(String, Option<String>)>()
                .map_err(|e| store_err(op, e))?
            {
                let (name, holder) = row.map_err(|e| store_err(op, e))?;
                holders.insert(name, holder);
            }
        }
        Ok(holders)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_every_slice_and_differ_by_at_most_one_slice_per_member() {
        for slices in [1u32, 2, 8, 64, 1024] {
            for members in 1..=10usize {
                let share = fair_share(slices, members);
                assert!(
                    share * members >= slices as usize,
                    "{slices} over {members}"
                );
                assert!(share <= (slices as usize / members) + 1);
            }
        }
        assert_eq!(
            fair_share(64, 0),
            64,
            "a feeder that counts nobody counts itself"
        );
    }

    #[test]
    fn feeders_try_free_slices_from_different_places() {
        let order = try_order(8, "feeder-a", |s| s == 3);
        assert_eq!(order.len(), 7);
        assert!(!order.contains(&3));
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [0, 1, 2, 4, 5, 6, 7]);
        let starts: std::collections::HashSet<u32> = (0..20)
            .map(|i| try_order(64, &format!("feeder-{i}"), |_| false)[0])
            .collect();
        assert!(
            starts.len() > 10,
            "20 feeders start at {} places",
            starts.len()
        );
    }
}
