//! Snapshots, checkpoints and leases: one small table each.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use keel::{CheckpointStore, Fence, Lease, LeaseStore, Result, Snapshot, SnapshotStore, StreamId};
use scylla::statement::batch::{Batch, BatchType};
use scylla::value::CqlTimestamp;

use crate::error::store_err;
use crate::events::Lwt;
use crate::{KeelScylla, Shared};

fn lwt_err(op: &str, reason: String) -> keel::Error {
    store_err(op.to_owned(), std::io::Error::other(reason))
}

/// A lease TTL in whole seconds (CQL TTLs are seconds): rounded up, plus one. The server
/// counts a cell's expiry from the current whole second, so a TTL of `n` lasts between
/// `n - 1` and `n` seconds; one more keeps a lease at least `ttl` (and at most a second
/// longer), so that a holder renewing every third of its ttl never loses it between renewals.
fn ttl_secs(ttl: Duration) -> i32 {
    (ttl.as_secs_f64().ceil() + 1.0).clamp(2.0, i32::MAX as f64) as i32
}

impl Shared {
    pub(crate) async fn read_lease(&self, name: &str) -> Result<Option<(Option<String>, i64)>> {
        let rows = self
            .select(&self.st.lease_read, (name,), format!("read lease `{name}`"))
            .await?;
        let row = rows
            .maybe_first_row::<(Option<String>, Option<i64>)>()
            .map_err(|e| store_err(format!("read lease `{name}`"), e))?;
        Ok(row.map(|(holder, epoch)| (holder, epoch.unwrap_or(0))))
    }

    pub(crate) async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>> {
        let op = format!("acquire lease `{name}`");
        // Every write to `leases` is conditional (LWT and plain writes must not mix on a row).
        let (current, epoch) = match self.read_lease(name).await? {
            Some(found) => found,
            None => {
                self.session
                    .execute_unpaged(&self.st.lease_init, (name,))
                    .await
                    .map_err(|e| store_err(op.clone(), e))?;
                self.read_lease(name).await?.unwrap_or((None, 0))
            }
        };
        let lease = |epoch: i64| Lease {
            name: name.to_owned(),
            holder: holder.to_owned(),
            epoch: epoch as u64,
            ttl,
        };
        match current {
            Some(h) if h == holder => {
                let l = lease(epoch);
                Ok(self.renew_lease(&l).await?.then_some(l))
            }
            Some(_) => Ok(None),
            None => {
                // Take it and bump the epoch in one conditional batch: the holder cell expires
                // with the TTL, the epoch stays, so the next holder's epoch is always higher.
                let mut batch = Batch::new(BatchType::Logged);
                batch.append_statement(self.st.lease_take.clone());
                batch.append_statement(self.st.lease_bump.clone());
                batch.set_serial_consistency(self.st.lease_take.get_serial_consistency());
                if let Some(level) = self.st.lease_take.get_consistency() {
                    batch.set_consistency(level);
                }
                let result = self
                    .session
                    .batch(
                        &batch,
                        ((ttl_secs(ttl), holder, name, epoch), (epoch + 1, name)),
                    )
                    .await
                    .map_err(|e| store_err(op.clone(), e))?;
                let applied = Lwt::from_result(result)
                    .map_err(|r| lwt_err(&op, r))?
                    .applied;
                Ok(applied.then(|| lease(epoch + 1)))
            }
        }
    }

    pub(crate) async fn renew_lease(&self, lease: &Lease) -> Result<bool> {
        let op = format!("renew lease `{}`", lease.name);
        let result = self
            .session
            .execute_unpaged(
                &self.st.lease_renew,
                (
                    ttl_secs(lease.ttl),
                    &lease.holder,
                    &lease.name,
                    &lease.holder,
                    lease.epoch as i64,
                ),
            )
            .await
            .map_err(|e| store_err(op.clone(), e))?;
        Ok(Lwt::from_result(result)
            .map_err(|r| lwt_err(&op, r))?
            .applied)
    }

    pub(crate) async fn release_lease(&self, lease: &Lease) -> Result<bool> {
        let op = format!("release lease `{}`", lease.name);
        let result = self
            .session
            .execute_unpaged(
                &self.st.lease_release,
                (&lease.name, &lease.holder, lease.epoch as i64),
            )
            .await
            .map_err(|e| store_err(op.clone(), e))?;
        Ok(Lwt::from_result(result)
            .map_err(|r| lwt_err(&op, r))?
            .applied)
    }
}

#[async_trait]
impl LeaseStore for KeelScylla {
    async fn acquire(&self, name: &str, holder: &str, ttl: Duration) -> Result<Option<Lease>> {
        self.shared.acquire_lease(name, holder, ttl).await
    }

    async fn renew(&self, lease: &Lease) -> Result<bool> {
        self.shared.renew_lease(lease).await
    }

    async fn release(&self, lease: &Lease) -> Result<bool> {
        self.shared.release_lease(lease).await
    }

    async fn join(&self, group: &str, member: &str, ttl: Duration) -> Result<Vec<String>> {
        self.shared.join(group, member, ttl).await?;
        let mut members = self.shared.members(group).await?;
        // A read may miss the row just written (another consistency level, a lagging
        // replica): the member counts itself anyway.
        if !members.iter().any(|m| m == member) {
            members.push(member.to_owned());
        }
        members.sort();
        Ok(members)
    }

    async fn leave(&self, group: &str, member: &str) -> Result<()> {
        self.shared.leave(group, member).await;
        Ok(())
    }
}

#[async_trait]
impl SnapshotStore for KeelScylla {
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        // Snapshots are derivable data: plain writes, newest first. Only the newest is ever
        // read, so the same one-partition batch (one round trip, applied together) drops the
        // older ones with a range delete instead of letting a long-lived stream's partition
        // collect a full state per snapshot. A late save of an older snapshot leaves a newer
        // one in place (its delete only covers versions below its own).
        let st = &self.shared.st;
        let batch = crate::partition_batch([&st.save_snapshot, &st.prune_snapshots]);
        let stream = snapshot.stream.as_str();
        let version = snapshot.version as i64;
        self.shared
            .session
            .batch(
                &batch,
                (
                    (
                        stream,
                        version,
                        snapshot.schema_version as i32,
                        &snapshot.payload[..],
                        CqlTimestamp(snapshot.taken_at),
                        snapshot.recent_commands.as_deref(),
                    ),
                    (stream, version),
                ),
            )
            .await
            .map_err(|e| store_err(format!("save snapshot of `{}`", snapshot.stream), e))?;
        Ok(())
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>> {
        let op = || format!("load snapshot of `{stream}`");
        let rows = self
            .shared
            .select(&self.shared.st.load_snapshot, (stream.as_str(),), op())
            .await?;
        let row = rows
            .maybe_first_row::<(i64, i32, Bytes, CqlTimestamp, Option<Vec<uuid::Uuid>>)>()
            .map_err(|e| store_err(op(), e))?;
        Ok(row.map(
            |(version, schema_version, payload, taken_at, recent_commands)| Snapshot {
                stream: stream.clone(),
                version: version as u64,
                schema_version: schema_version as u32,
                payload,
                taken_at: taken_at.0,
                recent_commands,
            },
        ))
    }
}

#[async_trait]
impl CheckpointStore for KeelScylla {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<u64>> {
        let op = || format!("load checkpoint `{name}`");
        let rows = self
            .shared
            .select(&self.shared.st.load_checkpoint, (name,), op())
            .await?;
        let row = rows
            .maybe_first_row::<(Option<i64>,)>()
            .map_err(|e| store_err(op(), e))?;
        Ok(row.and_then(|(p,)| p).map(|p| p as u64))
    }

    async fn save_checkpoint(&self, name: &str, position: u64, fence: &Fence) -> Result<()> {
        let op = format!("save checkpoint `{name}` under epoch {}", fence.epoch);
        let epoch = fence.epoch as i64;
        // `IF epoch <= ?` is false on a row without an epoch (never saved, or saved before
        // schema v3): such a row is claimed with `IF epoch = null`, and a claim that loses a
        // race is tried again against the winner's epoch.
        for _ in 0..3 {
            let values = (
                position as i64,
                epoch,
                CqlTimestamp(keel::event::now_millis()),
                name,
            );
            let result = self
                .shared
                .session
                .execute_unpaged(
                    &self.shared.st.save_checkpoint,
                    (values.0, values.1, values.2, values.3, epoch),
                )
                .await
                .map_err(|e| store_err(op.clone(), e))?;
            let saved = Lwt::from_result(result).map_err(|r| lwt_err(&op, r))?;
            if saved.applied {
                return Ok(());
            }
            if let Some(current) = saved.bigint("epoch") {
                fence.check(current as u64)?;
                continue; // admitted after all (an epoch written between): try again
            }
            let result = self
                .shared
                .session
                .execute_unpaged(&self.shared.st.claim_checkpoint, values)
                .await
                .map_err(|e| store_err(op.clone(), e))?;
            if Lwt::from_result(result)
                .map_err(|r| lwt_err(&op, r))?
                .applied
            {
                return Ok(());
            }
        }
        Err(lwt_err(
            &op,
            "the row's epoch kept changing; another writer saves the same checkpoint".into(),
        ))
    }
}

/// One lease as the operator's tool lists it ([`KeelScylla::leases`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LeaseInfo {
    /// What it guards (`projection posts_by_tag`, `feeder/12 of 64`, a saga...).
    pub name: String,
    /// Who holds it; `None`: free (expired or released).
    pub holder: Option<String>,
    /// Its fencing epoch: the next holder gets a higher one.
    pub epoch: u64,
    /// Seconds until the holder's claim expires unless renewed.
    pub ttl_secs: Option<u32>,
}

impl KeelScylla {
    /// Every lease of the keyspace: holder, epoch and time to live (one scan of the small
    /// `leases` table).
    pub async fn leases(&self) -> Result<Vec<LeaseInfo>> {
        let op = "list leases";
        let cql = format!(
            "SELECT name, holder, epoch, TTL(holder) FROM {}.leases",
            self.shared.keyspace
        );
        let mut rows = self
            .shared
            .session
            .query_iter(cql, ())
            .await
            .map_err(|e| store_err(op, e))?
            .rows_stream::<(String, Option<String>, Option<i64>, Option<i32>)>()
            .map_err(|e| store_err(op, e))?;
        let mut leases = Vec::new();
        while let Some((name, holder, epoch, ttl)) = futures::TryStreamExt::try_next(&mut rows)
            .await
            .map_err(|e| store_err(op, e))?
        {
            leases.push(LeaseInfo {
                name,
                holder,
                epoch: epoch.unwrap_or(0).max(0) as u64,
                ttl_secs: ttl.map(|t| t.max(0) as u32),
            });
        }
        leases.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(leases)
    }

    /// Takes lease `name` from its holder, for an operator (a holder that hangs without
    /// dying): released only if it is still held at the epoch just read, so a holder that
    /// changed meanwhile keeps it. The old holder's next renewal fails and its writes are
    /// fenced off; the next holder takes the lease at a higher epoch. Returns the holder it
    /// was taken from, or `None` when the lease was free.
    pub async fn force_release(&self, name: &str) -> Result<Option<String>> {
        let Some((Some(holder), epoch)) = self.shared.read_lease(name).await? else {
            return Ok(None);
        };
        let lease = Lease {
            name: name.to_owned(),
            holder: holder.clone(),
            epoch: epoch as u64,
            ttl: Duration::ZERO,
        };
        if self.shared.release_lease(&lease).await? {
            tracing::warn!(lease = name, %holder, epoch, "lease released by an operator");
            Ok(Some(holder))
        } else {
            Err(keel::Error::HeldElsewhere {
                name: format!("lease `{name}`"),
                holder,
                detail: "; it changed hands while it was being released: list it again".into(),
            })
        }
    }
}
