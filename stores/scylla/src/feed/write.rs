//! Writing a plan: the feed rows, batched by partition and size, and each stream's fed
//! progress; both idempotent, so a plan is applied again safely.

use std::sync::atomic::Ordering;

use futures::{stream, StreamExt, TryStreamExt};
use keel::{Error, RecordedEvent, Result};
use scylla::value::CqlTimestamp;

use super::{Range, SliceFeeder, IN_FLIGHT};
use crate::error::store_err;
use crate::{partition_batch, Shared};

impl SliceFeeder {
    /// Writes the feed rows and progress of a plan. Idempotent: the same plan always writes
    /// the same rows.
    pub(super) async fn write_plan(
        &mut self,
        plan: &[Range],
        events: &[Vec<RecordedEvent>],
    ) -> Result<()> {
        let rows: Vec<(i64, RecordedEvent)> = plan
            .iter()
            .zip(events)
            .flat_map(|(range, events)| {
                events
                    .iter()
                    .enumerate()
                    .map(move |(i, e)| (range.position + i as i64, e.clone()))
            })
            .collect();
        let writer = self.shared.clone();
        let slice = self.slice;
        stream::iter(feed_batches(self.shared.feed_bucket_size, rows))
            .map(move |batch| {
                let shared = writer.clone();
                async move { shared.write_feed_rows(slice, &batch).await }
            })
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await?;
        let recorder = self.shared.clone();
        let progress: Vec<(String, i64)> =
            plan.iter().map(|r| (r.stream.clone(), r.last)).collect();
        stream::iter(progress)
            .map(move |(stream, last)| {
                let shared = recorder.clone();
                async move { shared.record_progress(&stream, last).await }
            })
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await?;
        for range in plan {
            self.progress.insert(range.stream.clone(), range.last);
        }
        let shared = &self.shared;
        let fed: usize = events.iter().map(Vec::len).sum();
        shared
            .counters
            .fed_events
            .fetch_add(fed as u64, Ordering::Relaxed);
        metrics::counter!("keel_scylla_fed_events_total").increment(fed as u64);
        Ok(())
    }
}

/// Feed rows per write: a batch stays in one feed partition and under Cassandra's default
/// batch size warning (5 KiB; ScyllaDB warns at 128 KiB).
pub(super) const FEED_BATCH_BYTES: usize = 4 * 1024;
pub(super) const FEED_BATCH_ROWS: usize = 32;

/// The rows of a plan cut into writes: consecutive positions of one feed partition, up to
/// [`FEED_BATCH_ROWS`] rows and about [`FEED_BATCH_BYTES`] of payload and metadata.
pub(super) fn feed_batches(
    feed_bucket_size: i64,
    rows: Vec<(i64, RecordedEvent)>,
) -> Vec<Vec<(i64, RecordedEvent)>> {
    let mut batches: Vec<Vec<(i64, RecordedEvent)>> = Vec::new();
    let mut bytes = 0;
    for (position, event) in rows {
        let size = row_size(&event);
        let fits = batches.last().is_some_and(|b| {
            b.len() < FEED_BATCH_ROWS
                && bytes + size <= FEED_BATCH_BYTES
                && b[0].0 / feed_bucket_size == position / feed_bucket_size
        });
        if !fits {
            batches.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        if let Some(batch) = batches.last_mut() {
            batch.push((position, event));
        }
    }
    batches
}

/// About how many bytes a feed row takes in a batch: its blobs and texts, its metadata as
/// JSON (three ids and the user pairs), and the fixed columns.
fn row_size(event: &RecordedEvent) -> usize {
    let metadata = if event.metadata.is_empty() {
        0
    } else {
        let user: usize = event
            .metadata
            .user
            .iter()
            .map(|(k, v)| k.len() + v.len() + 8)
            .sum();
        160 + user
    };
    event.payload.len() + event.event_type.len() + event.stream.as_str().len() + metadata + 64
}

impl Shared {
    /// The feed partition of `position` in `slice`: the slice in the high 32 bits, the
    /// position's bucket in the low ones (slice 0, the only slice of a keyspace from before
    /// slices, has the partitions it always had).
    pub(super) fn feed_partition(&self, slice: u32, position: i64) -> i64 {
        (i64::from(slice) << 32) | (position / self.feed_bucket_size)
    }

    /// Records that `stream` is fed up to `last`. The newest row wins (reads take the highest
    /// version), so a late duplicate write never moves progress back; the same one-partition
    /// batch drops the rows below it with a range delete, so a long-lived stream keeps one row
    /// instead of one per feeder round.
    pub(super) async fn record_progress(&self, stream: &str, last: i64) -> Result<()> {
        let batch = partition_batch([&self.st.insert_progress, &self.st.prune_progress]);
        self.session
            .batch(&batch, ((stream, last), (stream, last)))
            .await
            .map_err(|e| store_err(format!("record feed progress of `{stream}`"), e))?;
        Ok(())
    }

    /// Writes feed rows of one feed partition: one insert, or one single-partition unlogged
    /// batch (one request, applied together) for several.
    pub(super) async fn write_feed_rows(
        &self,
        slice: u32,
        rows: &[(i64, RecordedEvent)],
    ) -> Result<()> {
        let mut values = Vec::with_capacity(rows.len());
        for (position, e) in rows {
            let metadata = if e.metadata.is_empty() {
                None
            } else {
                Some(
                    serde_json::to_vec(&*e.metadata).map_err(|err| Error::Encode {
                        what: "event metadata".into(),
                        reason: err.to_string(),
                    })?,
                )
            };
            values.push((
                self.feed_partition(slice, *position),
                *position,
                e.stream.as_str(),
                e.version as i64,
                e.event_id,
                &*e.event_type,
                e.schema_version as i32,
                &e.payload[..],
                metadata,
                CqlTimestamp(e.recorded_at),
            ));
        }
        let first = rows.first().map_or(0, |(p, _)| *p);
        let op = || {
            format!(
                "write feed positions {first}..={} of slice {slice}",
                first + rows.len() as i64 - 1
            )
        };
        if let [row] = values.as_slice() {
            self.session
                .execute_unpaged(&self.st.insert_feed, row)
                .await
                .map_err(|err| store_err(op(), err))?;
            return Ok(());
        }
        let batch = partition_batch(std::iter::repeat_n(&self.st.insert_feed, values.len()));
        self.session
            .batch(&batch, values)
            .await
            .map_err(|err| store_err(op(), err))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use keel::{RecordedEvent, StreamId};

    use super::*;

    fn row(position: i64, payload: usize) -> (i64, RecordedEvent) {
        let event = keel::NewEvent::new("Happened", 1, vec![b'x'; payload]);
        (
            position,
            RecordedEvent::record(StreamId::new("s"), position as u64, None, event),
        )
    }

    fn shape(batches: &[Vec<(i64, RecordedEvent)>]) -> Vec<(i64, usize)> {
        batches.iter().map(|b| (b[0].0, b.len())).collect()
    }

    #[test]
    fn feed_rows_batch_within_a_partition_and_the_size_limits() {
        // 40 small rows from position 990 in partitions of 1,000: cut at 1,000, then at 32.
        let small: Vec<_> = (990..1_030).map(|p| row(p, 10)).collect();
        assert_eq!(shape(&feed_batches(1_000, small)), [(990, 10), (1_000, 30)]);
        let many: Vec<_> = (1..=70).map(|p| row(p, 10)).collect();
        assert_eq!(
            shape(&feed_batches(100_000, many)),
            [(1, 32), (33, 32), (65, 6)]
        );
        // About 1 KB each: four fit under the byte limit; a row above it goes alone.
        let big: Vec<_> = (1..=9).map(|p| row(p, 900)).collect();
        assert_eq!(shape(&feed_batches(100_000, big)), [(1, 4), (5, 4), (9, 1)]);
        let huge = vec![row(1, 10), row(2, 10_000), row(3, 10)];
        assert_eq!(
            shape(&feed_batches(100_000, huge)),
            [(1, 1), (2, 1), (3, 1)]
        );
        assert!(feed_batches(100_000, Vec::new()).is_empty());
    }
}
