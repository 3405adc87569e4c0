//! Feed reconciliation: finds committed events that never reached the feed and hands their
//! streams to the feeder.
//!
//! The feeder learns of other processes' appends from markers that live for an hour (see
//! `docs/scylla.md`). Events committed while no feeder ran for longer than that have no marker
//! left, and would stay out of the feed until their stream is appended to again. A
//! reconciliation compares every stream's head with its fed progress and writes a fresh
//! marker for each stream that is behind; whichever feeder leads then publishes the missing
//! events, in order, exactly as it would have.
//!
//! The leading feeder notes that it is alive in `checkpoints` (row `keel.feeder.heartbeat`,
//! which lives 55 minutes) at every lease renewal; a feeder that takes the lease and finds no
//! such note reconciles by itself, in the background.

use std::collections::BTreeMap;

use futures::TryStreamExt;

use crate::error::store_err;
use crate::{KeelScylla, Shared};

/// What [`KeelScylla::reconcile_feed`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Event partitions looked at (a stream has one per `bucket_size` versions).
    pub partitions: u64,
    /// Streams with committed events the feed did not have, in name order: each was given a
    /// fresh marker, so the leading feeder publishes them.
    pub lagging: Vec<String>,
    /// How many events those streams had that the feed did not, when looked at.
    pub unfed_events: u64,
}

impl KeelScylla {
    /// Compares every stream's head with what the feed holds of it, and marks each stream
    /// that is behind for the feeder (a fresh marker; a wake-up too when this process's feeder
    /// leads). The leading feeder then publishes the missing events within about
    /// `feeder_interval`, in version order, each exactly once; a stream that is merely being
    /// appended to right now is harmlessly looked at once more.
    ///
    /// Needed only after the feed lost track of appends: when writers ran for more than an
    /// hour with no feeder running anywhere (their markers expired). The next feeder to take
    /// the lease does it by itself in that case; call it when that feeder's reconciliation
    /// failed (it logs a warning), or to check. It reads every event
    /// partition's head (a full scan of the partition keys, paged) and one progress row per
    /// partition, so its cost grows with the number of streams, not events. `keel feed
    /// reconcile` runs it from the command line.
    pub async fn reconcile_feed(&self) -> keel::Result<Reconciled> {
        self.shared.reconcile_feed(&|_| {}).await
    }

    /// [`reconcile_feed`](Self::reconcile_feed), calling `progress` with the number of
    /// partitions looked at so far as the scan goes (for a progress bar).
    pub async fn reconcile_feed_with(
        &self,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> keel::Result<Reconciled> {
        self.shared.reconcile_feed(progress).await
    }
}

impl Shared {
    pub(crate) async fn reconcile_feed(
        &self,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> keel::Result<Reconciled> {
        let op = "scan the event partitions' heads";
        let heads = self
            .session
            .execute_iter(self.st.head_scan.clone(), ())
            .await
            .map_err(|e| store_err(op, e))?
            .rows_stream::<(String, i64, Option<i64>)>()
            .map_err(|e| store_err(op, e))?
            .map_err(move |e| store_err(op, e));
        let mut found = Reconciled::default();
        // Per lagging stream: its head and fed versions (an append never splits across
        // partitions, so a partition's versions may run past its bucket's share; only the
        // stream's highest head says how many events it has).
        let mut lagging: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        let mut behind = std::pin::pin!(heads
            .map_ok(|(stream, _bucket, head)| async move {
                let fed = self.fed_version(&stream).await?;
                // A sealed (closed) stream's head is stored negated.
                Ok::<_, keel::Error>((stream, head.unwrap_or(0).abs(), fed))
            })
            .try_buffer_unordered(crate::feed::IN_FLIGHT));
        while let Some((stream, head, fed)) = behind.try_next().await? {
            found.partitions += 1;
            progress(found.partitions);
            if head > fed {
                let entry = lagging.entry(stream).or_insert((head, fed));
                entry.0 = entry.0.max(head);
            }
        }
        for stream in lagging.keys() {
            self.insert_marker(stream).await?;
            self.wake.notify(keel::StreamId::new(stream));
        }
        found.unfed_events = lagging
            .values()
            .map(|(head, fed)| (head - fed) as u64)
            .sum();
        found.lagging = lagging.into_keys().collect();
        tracing::info!(
            partitions = found.partitions,
            lagging = found.lagging.len(),
            unfed_events = found.unfed_events,
            "feed reconciled"
        );
        Ok(found)
    }
}
