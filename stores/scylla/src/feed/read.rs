//! Reading the feed: its heads and a slice's rows from a position, page by page.

use bytes::Bytes;
use futures::{stream, StreamExt};
use keel::{Error, EventStream, RecordedEvent, Result, StreamId};
use scylla::value::CqlTimestamp;

use crate::error::store_err;
use crate::events::PAGE;
use crate::Shared;

impl Shared {
    /// The heads of the feed's slices: the last allocated position of each (plain reads: an
    /// estimate for lag and progress, never used to allocate). A slice that never had a round
    /// is absent.
    pub(crate) async fn feed_heads(&self) -> Result<keel::Cursor> {
        let op = "read feed heads";
        let ids: Vec<i32> = (0..self.feed_slices as i32).collect();
        let mut heads = keel::Cursor::new();
        for chunk in ids.chunks(super::IN_CHUNK) {
            let rows = self
                .select(&self.st.meta_heads, (chunk.to_vec(),), op)
                .await?;
            for row in rows
                .rows::<(i32, Option<i64>)>()
                .map_err(|e| store_err(op, e))?
            {
                let (slice, head) = row.map_err(|e| store_err(op, e))?;
                heads.set(slice.max(0) as u32, head.unwrap_or(0).max(0) as u64);
            }
        }
        Ok(heads)
    }

    /// A position of `stream`'s slice at or after its event `version`, once that is in the
    /// feed: the slice's head, read after the stream's feed progress has reached `version`.
    /// A feeder writes the progress only after the LWT that allocated the positions, so that
    /// head covers the event (it may be later than the event's own position: never earlier).
    pub(crate) async fn fed_position(
        &self,
        stream: &StreamId,
        version: u64,
    ) -> Result<Option<u64>> {
        let fed = self.fed_version(stream.as_str()).await?.max(0) as u64;
        if fed < version.max(1) {
            return Ok(None);
        }
        let slice = keel::feed::slice_of(stream, self.feed_slices);
        let op = "read a feed slice's head";
        let rows = self
            .select(&self.st.meta_heads, (vec![slice as i32],), op)
            .await?;
        let head = rows
            .maybe_first_row::<(i32, Option<i64>)>()
            .map_err(|e| store_err(op, e))?
            .and_then(|(_, head)| head)
            .unwrap_or(0);
        Ok((head > 0).then_some(head as u64))
    }

    /// The feed rows of `slice` at positions `start..end` (one feed bucket), up to the first
    /// gap, and the error of the first row that does not decode: the events before it are read.
    pub(super) async fn feed_range(
        &self,
        slice: u32,
        start: i64,
        end: i64,
    ) -> Result<(Vec<RecordedEvent>, Option<Error>)> {
        let rows = self
            .select(
                &self.st.read_feed,
                (self.feed_partition(slice, start), start, end),
                "read feed",
            )
            .await?;
        let mut page = Vec::new();
        type FeedRow = (
            i64,
            String,
            i64,
            Option<uuid::Uuid>,
            Option<String>,
            Option<i32>,
            Option<Bytes>,
            Option<Vec<u8>>,
            Option<CqlTimestamp>,
        );
        let typed = rows
            .rows::<FeedRow>()
            .map_err(|e| store_err("read feed", e))?;
        for (expected, row) in (start..).zip(typed) {
            let (
                position,
                stream,
                version,
                event_id,
                event_type,
                schema_version,
                payload,
                metadata,
                at,
            ) = row.map_err(|e| store_err("read feed", e))?;
            if position != expected {
                break; // allocated but not written yet: the feed ends here for now
            }
            let stream = StreamId::from(stream);
            let decoded = self.decode_row(
                &stream,
                Some(position as u64),
                (
                    version,
                    event_id,
                    event_type,
                    schema_version,
                    payload,
                    metadata,
                    at,
                ),
            );
            match decoded {
                Ok(event) => page.push(event),
                Err(e) => return Ok((page, Some(e))),
            }
        }
        Ok((page, None))
    }

    /// The feed of `slice` from `from`, page by page, up to the first position not written yet, or up
    /// to a row that does not decode: every event before it, then its error.
    ///
    /// Pages end on multiples of the page size, and a feed bucket's size is a multiple of it,
    /// so no page crosses a bucket and the next page's range is known before this one arrives:
    /// it is fetched while this one is consumed.
    pub(crate) fn feed_from(&self, slice: u32, from: u64) -> EventStream<'_> {
        if slice >= self.feed_slices {
            return Box::pin(stream::empty());
        }
        let page = PAGE as i64;
        let first = from.max(1) as i64;
        let ranges = (0..).map(move |k: i64| {
            let start = if k == 0 {
                first
            } else {
                (first / page + k) * page
            };
            (start, (first / page + k + 1) * page)
        });
        let pages = stream::iter(ranges)
            .map(move |(start, end)| async move {
                let (events, unreadable) = self.feed_range(slice, start, end).await?;
                let complete = unreadable.is_none() && events.len() as i64 == end - start;
                Ok::<_, Error>((events, unreadable, complete))
            })
            .buffered(2)
            .scan(false, |done, page| {
                if *done {
                    return futures::future::ready(None);
                }
                *done = !matches!(page, Ok((_, _, true)));
                futures::future::ready(Some(page))
            });
        Box::pin(pages.flat_map(|page| {
            let (events, unreadable) = match page {
                Ok((events, unreadable, _)) => (events, unreadable),
                Err(e) => (Vec::new(), Some(e)),
            };
            stream::iter(events.into_iter().map(Ok).chain(unreadable.map(Err)))
        }))
    }
}
