//! Streams: bucketed partitions, exact appends in one conditional batch, paged reads.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream};
use futures::TryStreamExt;
use keel::ending::{Deletion, Ended, StreamInfo};
use keel::{
    AppendResult, Error, EventPage, EventStore, EventStream, ExpectedVersion, Metadata, NewEvent,
    PageStream, RecordedEvent, Result, StreamId,
};
use scylla::errors::ExecutionError;
use scylla::serialize::row::{RowSerializationContext, SerializeRow};
use scylla::serialize::writers::RowWriter;
use scylla::serialize::SerializationError;
use scylla::statement::batch::{Batch, BatchType};
use scylla::value::{CqlTimestamp, CqlValue, Row};
use tracing::Instrument;
use uuid::Uuid;

use crate::error::{outcome_unknown, store_err};
use crate::{KeelScylla, Shared};

/// Rows fetched per page when reading a stream or the feed.
pub(crate) const PAGE: i32 = 1_000;

/// How many times an append whose outcome was unknown and read back as absent is tried.
pub(crate) const ATTEMPTS: usize = 3;

/// The longest one append can take, every statement bounded: its marker write, then up to
/// [`ATTEMPTS`] rounds of the fresh bucket's SERIAL read, the LWT and its read-back.
pub(crate) fn longest_append(
    append_timeout: std::time::Duration,
    request_timeout: std::time::Duration,
) -> std::time::Duration {
    request_timeout + (append_timeout + request_timeout * 2) * ATTEMPTS as u32
}

/// One statement's values in the append batch: the head guard, then one insert per event.
enum AppendRow<'a> {
    Head(i64, &'a str, i64, i64),
    HeadNew(i64, &'a str, i64),
    #[allow(clippy::type_complexity)]
    Event(
        (
            &'a str,
            i64,
            i64,
            Uuid,
            &'a str,
            i32,
            &'a [u8],
            Option<Vec<u8>>,
            CqlTimestamp,
            Uuid,
        ),
    ),
}

impl SerializeRow for AppendRow<'_> {
    fn serialize(
        &self,
        ctx: &RowSerializationContext<'_>,
        writer: &mut RowWriter,
    ) -> Result<(), SerializationError> {
        match self {
            AppendRow::Head(a, b, c, d) => (a, b, c, d).serialize(ctx, writer),
            AppendRow::HeadNew(a, b, c) => (a, b, c).serialize(ctx, writer),
            AppendRow::Event(values) => values.serialize(ctx, writer),
        }
    }

    fn is_empty(&self) -> bool {
        false
    }
}

/// An event row as read: every column but the version may be null in a damaged row, which
/// [`Shared::decode_row`] names as such.
pub(crate) type StoredRow = (
    i64,
    Option<Uuid>,
    Option<String>,
    Option<i32>,
    Option<Bytes>,
    Option<Vec<u8>>,
    Option<CqlTimestamp>,
);

/// The outcome of a conditional write: applied or not, and the current value of `head` when
/// the server returned it.
pub(crate) struct Lwt {
    pub(crate) applied: bool,
    pub(crate) columns: Vec<(String, Option<CqlValue>)>,
}

impl Lwt {
    /// Reads `[applied]` from column 0 of the first row, whatever the rest of the shape (it
    /// differs between ScyllaDB and Cassandra).
    pub(crate) fn from_result(
        result: scylla::response::query_result::QueryResult,
    ) -> std::result::Result<Lwt, String> {
        let rows = result.into_rows_result().map_err(|e| e.to_string())?;
        let names: Vec<String> = rows
            .column_specs()
            .iter()
            .map(|c| c.name().to_owned())
            .collect();
        let first = rows
            .rows::<Row>()
            .map_err(|e| e.to_string())?
            .next()
            .ok_or("a conditional write returned no row")?
            .map_err(|e| e.to_string())?;
        let applied = matches!(first.columns.first(), Some(Some(CqlValue::Boolean(true))));
        Ok(Lwt {
            applied,
            columns: names.into_iter().zip(first.columns).collect(),
        })
    }

    /// The value of column `name`, when the server returned it.
    pub(crate) fn column(&self, name: &str) -> Option<&CqlValue> {
        self.columns
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_ref())
    }

    pub(crate) fn bigint(&self, name: &str) -> Option<i64> {
        match self.column(name) {
            Some(CqlValue::BigInt(i)) => Some(*i),
            _ => None,
        }
    }
}

/// Whether an append finds the stream sealed and whether it leaves it sealed: an
/// application's append is neither; a closing notice seals.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seal {
    /// The head is stored negated now.
    pub(crate) sealed: bool,
    /// The append stores it negated.
    pub(crate) seal: bool,
}

impl Seal {
    /// An ordinary append.
    pub(crate) const OPEN: Seal = Seal {
        sealed: false,
        seal: false,
    };
}

/// How one append attempt ended.
enum Attempt {
    /// Committed.
    Applied,
    /// The guard did not hold.
    Conflict,
    /// The target bucket does not exist yet: the fresh-bucket path applies.
    FreshBucket,
    /// The driver failed; the outcome may be unknown.
    Failed(Box<ExecutionError>),
}

impl Shared {
    pub(crate) fn bucket_of(&self, version: i64) -> i64 {
        (version - 1).max(0) / self.bucket_size
    }

    async fn head(&self, stream: &str, bucket: i64, serial: bool) -> Result<Option<i64>> {
        let st = if serial {
            &self.st.read_head_serial
        } else {
            &self.st.read_head
        };
        let rows = self
            .select(st, (stream, bucket), format!("read head of `{stream}`"))
            .await?;
        let row = rows
            .maybe_first_row::<(Option<i64>,)>()
            .map_err(|e| store_err(format!("read head of `{stream}`"), e))?;
        Ok(row.and_then(|(h,)| h))
    }

    /// The stream's version: follows the static heads from bucket 0 to the last bucket.
    pub(crate) async fn current_version(&self, stream: &str) -> Result<Option<u64>> {
        Ok(self.current_head(stream).await?.map(|(version, _)| version))
    }

    /// The stream's version and whether it is sealed: a closing notice (deleted, archived)
    /// stores its bucket's head negated, so that no append's `IF head = n` can hold after it
    /// (see `ending`).
    pub(crate) async fn current_head(&self, stream: &str) -> Result<Option<(u64, bool)>> {
        let Some(mut head) = self.head(stream, 0, false).await? else {
            return Ok(None);
        };
        let mut bucket = 0;
        loop {
            let next = head.abs() / self.bucket_size;
            if next == bucket {
                break;
            }
            match self.head(stream, next, false).await? {
                Some(h) => {
                    head = h;
                    bucket = next;
                }
                None => break,
            }
        }
        Ok(Some((head.unsigned_abs(), head < 0)))
    }

    /// Writes the feed marker for an append about to happen. When this process's feeder holds
    /// the stream's slice (and so hears of the append directly), a marker this process wrote for the
    /// stream recently is reused, as long as the feeder's recheck of that marker still comes
    /// after this append has finished: the marker then only has to cover a crash.
    async fn write_marker(&self, stream: &str) -> Result<()> {
        let started = std::time::Instant::now();
        let slice = keel::feed::slice_of(&keel::StreamId::new(stream), self.feed_slices);
        if self.wake.holds(slice) {
            let markers = self.markers.lock().unwrap_or_else(|p| p.into_inner());
            if markers
                .get(stream)
                .is_some_and(|at| at.elapsed() < self.marker_reuse)
            {
                return Ok(());
            }
        }
        self.insert_marker(stream).await?;
        let mut markers = self.markers.lock().unwrap_or_else(|p| p.into_inner());
        if markers.len() > 100_000 {
            let reuse = self.marker_reuse;
            markers.retain(|_, at| at.elapsed() < reuse);
        }
        markers.insert(stream.to_owned(), started);
        Ok(())
    }

    /// Writes a fresh marker for `stream`: the leading feeder, wherever it runs, looks at the
    /// stream at its next scan and once more after `settle_after`.
    pub(crate) async fn insert_marker(&self, stream: &str) -> Result<()> {
        let now = keel::event::now_millis();
        self.session
            .execute_unpaged(
                &self.st.insert_marker,
                (now / 60_000, now, Uuid::new_v4(), stream),
            )
            .await
            .map_err(|e| store_err(format!("write feed marker for `{stream}`"), e))?;
        Ok(())
    }

    /// One conditional batch: the guard on the bucket's static head, then the events.
    async fn try_append(
        &self,
        stream: &str,
        bucket: i64,
        expected: i64,
        fresh: bool,
        rows: &[AppendRow<'_>],
        last: i64,
    ) -> Result<Attempt> {
        let result = if let [AppendRow::Event(e)] = rows {
            // One event: one conditional UPDATE setting the row and the static head together.
            let (stream_, bucket_, version, id, event_type, schema, payload, meta, at, commit) = e;
            let set = (
                last, id, event_type, schema, payload, meta, at, commit, stream_, bucket_, version,
            );
            let mut statement = if fresh {
                self.st.append_one_new.clone()
            } else {
                self.st.append_one_cond.clone()
            };
            statement.set_request_timeout(Some(self.st.append_timeout));
            let outcome = if fresh {
                self.session.execute_unpaged(&statement, set).await
            } else {
                let (a, b, c, d, e, f, g, h, i, j, k) = set;
                self.session
                    .execute_unpaged(&statement, (a, b, c, d, e, f, g, h, i, j, k, expected))
                    .await
            };
            match outcome {
                Ok(result) => result,
                Err(e) => return Ok(Attempt::Failed(Box::new(e))),
            }
        } else {
            let mut batch = Batch::new(BatchType::Logged);
            batch.set_serial_consistency(self.st.head_cond.get_serial_consistency());
            if let Some(level) = self.st.head_cond.get_consistency() {
                batch.set_consistency(level);
            }
            batch.set_is_idempotent(false);
            batch.set_retry_policy(self.st.head_cond.get_retry_policy().cloned());
            batch.set_request_timeout(Some(self.st.append_timeout));
            let guard = if fresh {
                batch.append_statement(self.st.head_new.clone());
                AppendRow::HeadNew(last, stream, bucket)
            } else {
                batch.append_statement(self.st.head_cond.clone());
                AppendRow::Head(last, stream, bucket, expected)
            };
            for _ in rows {
                batch.append_statement(self.st.insert_event.clone());
            }
            let values: Vec<&AppendRow<'_>> = std::iter::once(&guard).chain(rows.iter()).collect();
            match self.session.batch(&batch, values).await {
                Ok(result) => result,
                Err(e) => return Ok(Attempt::Failed(Box::new(e))),
            }
        };
        let lwt = Lwt::from_result(result).map_err(|reason| {
            store_err(
                format!("append to `{stream}`"),
                std::io::Error::other(reason),
            )
        })?;
        Ok(if lwt.applied {
            Attempt::Applied
        } else if !fresh && lwt.bigint("head").is_none() {
            Attempt::FreshBucket
        } else {
            Attempt::Conflict
        })
    }

    /// Reads back, at SERIAL consistency, whether the append with `commit_id` is stored.
    /// The SERIAL read also finishes or fences any proposal still in flight, so its answer is
    /// final. `Some(true)`: ours; `Some(false)`: another writer's; `None`: nothing there.
    async fn read_back(
        &self,
        stream: &str,
        bucket: i64,
        version: i64,
        commit_id: Uuid,
    ) -> Result<Option<bool>> {
        let rows = self
            .session
            .execute_unpaged(&self.st.read_commit, (stream, bucket, version))
            .await
            .map_err(|e| Error::UnknownOutcome {
                stream: StreamId::new(stream),
                reason: format!("read-back failed: {e}"),
            })?
            .into_rows_result()
            .map_err(|e| Error::UnknownOutcome {
                stream: StreamId::new(stream),
                reason: format!("read-back failed: {e}"),
            })?;
        let row = rows
            .maybe_first_row::<(Option<Uuid>,)>()
            .map_err(|e| Error::UnknownOutcome {
                stream: StreamId::new(stream),
                reason: format!("read-back failed: {e}"),
            })?;
        Ok(row.map(|(id,)| id == Some(commit_id)))
    }

    /// The error for a refused append: a conflict, or the stream's closing when a notice
    /// sealed it.
    async fn conflict(&self, stream: &StreamId, expected: ExpectedVersion) -> Error {
        let head = self.current_head(stream.as_str()).await.unwrap_or(None);
        if let Some((version, true)) = head {
            return self.closed(stream, version).await;
        }
        self.counters.conflicts.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("keel_scylla_conflicts_total").increment(1);
        Error::Conflict {
            stream: stream.clone(),
            expected,
            actual: head.map(|(version, _)| version),
        }
    }

    pub(crate) async fn append_exact(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        n: i64,
        events: &[NewEvent],
        seal: Seal,
    ) -> Result<AppendResult> {
        let s = stream.as_str();
        let count = events.len() as i64;
        let (first, last) = (n + 1, n + count);
        let bucket = self.bucket_of(first);
        let commit_id = Uuid::new_v4();
        let now = CqlTimestamp(keel::event::now_millis());
        let metadata: Vec<Option<Vec<u8>>> = events
            .iter()
            .map(|e| {
                if e.metadata.is_empty() {
                    Ok(None)
                } else {
                    serde_json::to_vec(&e.metadata).map(Some)
                }
            })
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::Encode {
                what: "event metadata".into(),
                reason: e.to_string(),
            })?;
        let rows: Vec<AppendRow<'_>> = events
            .iter()
            .zip(metadata)
            .enumerate()
            .map(|(i, (e, meta))| {
                AppendRow::Event((
                    s,
                    bucket,
                    first + i as i64,
                    e.event_id,
                    &*e.event_type,
                    e.schema_version as i32,
                    &e.payload[..],
                    meta,
                    now,
                    commit_id,
                ))
            })
            .collect();
        // A new stream, or the first append of a bucket whose predecessor is full, has no head
        // to guard on; the fresh path checks the predecessor instead.
        let mut fresh = n == 0 || (n % self.bucket_size == 0);
        // The head as it must be, and as it will be: negated while sealed.
        let guard = if seal.sealed { -n } else { n };
        let new_head = if seal.seal { -last } else { last };
        self.write_marker(s).await?;
        let committed = AppendResult {
            first_version: first as u64,
            last_version: last as u64,
        };
        // Whether an earlier attempt's outcome is unknown. A SERIAL read-back that finds
        // nothing does not make it final: the coordinator of a timed-out LWT goes on with new
        // Paxos rounds until its own CAS timeout, so that attempt may still commit. Every
        // attempt carries the same commit id, so a later "conflict" may be our own write.
        let mut unsure = false;
        for _ in 0..ATTEMPTS {
            // The fresh path: the stream must end at version n in the previous bucket. Once that
            // bucket's head reached n it cannot move any more (later versions belong here), so
            // this check and the conditional create of this bucket together are exact.
            if fresh && n > 0 && self.head(s, bucket - 1, true).await? != Some(guard) {
                return self
                    .conflict_unless_ours(stream, expected, bucket, first, commit_id, unsure)
                    .await
                    .map(|()| committed);
            }
            match self
                .try_append(s, bucket, guard, fresh, &rows, new_head)
                .await?
            {
                Attempt::Applied => {
                    self.record_commit(stream);
                    return Ok(committed);
                }
                Attempt::FreshBucket if n > 0 => fresh = true,
                Attempt::FreshBucket | Attempt::Conflict => {
                    return self
                        .conflict_unless_ours(stream, expected, bucket, first, commit_id, unsure)
                        .await
                        .map(|()| committed);
                }
                Attempt::Failed(e) if outcome_unknown(&e) => {
                    self.counters
                        .unknown_outcomes
                        .fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("keel_scylla_unknown_outcomes_total").increment(1);
                    tracing::warn!(stream = s, error = %e, "append outcome unknown; reading back at SERIAL");
                    match self.read_back(s, bucket, first, commit_id).await? {
                        Some(true) => {
                            self.record_commit(stream);
                            return Ok(committed);
                        }
                        Some(false) => return Err(self.conflict(stream, expected).await),
                        // Not there yet: try again with the same commit id.
                        None => unsure = true,
                    }
                }
                Attempt::Failed(e) if unsure => {
                    return Err(Error::UnknownOutcome {
                        stream: stream.clone(),
                        reason: format!(
                        "an earlier attempt timed out and may still commit; this one failed: {e}"
                    ),
                    })
                }
                Attempt::Failed(e) => return Err(store_err(format!("append to `{s}`"), *e)),
            }
        }
        Err(Error::UnknownOutcome {
            stream: stream.clone(),
            reason: format!(
                "{ATTEMPTS} attempts timed out and none was found stored at version {first}; \
                 a coordinator may still commit one: read the stream before deciding"
            ),
        })
    }

    /// A refused append after `unsure` (an earlier attempt of it timed out): the refusal may
    /// be that attempt's own commit. Read back and tell; otherwise it is a conflict.
    async fn conflict_unless_ours(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        bucket: i64,
        first: i64,
        commit_id: Uuid,
        unsure: bool,
    ) -> Result<()> {
        if unsure
            && self
                .read_back(stream.as_str(), bucket, first, commit_id)
                .await?
                == Some(true)
        {
            self.record_commit(stream);
            return Ok(());
        }
        Err(self.conflict(stream, expected).await)
    }

    /// An append of `stream` committed, however it was learnt: counted, and the feeder woken.
    fn record_commit(&self, stream: &StreamId) {
        self.counters.appends.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("keel_scylla_appends_total").increment(1);
        self.wake.notify(stream.clone());
    }

    pub(crate) fn decode_row(
        &self,
        stream: &StreamId,
        position: Option<u64>,
        row: StoredRow,
    ) -> Result<RecordedEvent> {
        let (version, event_id, event_type, schema_version, payload, metadata, recorded_at) = row;
        fn column<T>(stream: &StreamId, version: i64, name: &str, value: Option<T>) -> Result<T> {
            value.ok_or_else(|| Error::Damaged {
                stream: stream.clone(),
                version: version as u64,
                reason: format!("column `{name}` is null"),
            })
        }
        let event_id = column(stream, version, "event_id", event_id)?;
        let event_type = column(stream, version, "event_type", event_type)?;
        let schema_version = column(stream, version, "schema_version", schema_version)?;
        let payload = column(stream, version, "payload", payload)?;
        let recorded_at = column(stream, version, "recorded_at", recorded_at)?;
        let metadata = match metadata {
            None => Metadata::default(),
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Decode {
                stream: stream.clone(),
                version: version as u64,
                event_type: event_type.clone(),
                schema_version: schema_version as u32,
                reason: format!("metadata: {e}"),
            })?,
        };
        Ok(RecordedEvent {
            event_id,
            stream: stream.clone(),
            version: version as u64,
            position,
            slice: keel::feed::slice_of(stream, self.feed_slices),
            recorded_at: recorded_at.0,
            event_type: Arc::from(event_type),
            schema_version: schema_version as u32,
            payload,
            metadata: Arc::new(metadata),
            unreadable: None,
        })
    }

    /// One page of a stream from `from` within `bucket`.
    pub(crate) async fn read_page(
        &self,
        stream: &StreamId,
        bucket: i64,
        from: i64,
        limit: i32,
    ) -> Result<Vec<RecordedEvent>> {
        let op = || format!("read stream `{stream}`");
        let rows = self
            .select(
                &self.st.read_events,
                (stream.as_str(), bucket, from, limit),
                op(),
            )
            .await?;
        rows.rows::<StoredRow>()
            .map_err(|e| store_err(op(), e))?
            .map(|row| self.decode_row(stream, None, row.map_err(|e| store_err(op(), e))?))
            .collect()
    }

    /// The stream from version `from`, at most `max` events, lazily, page by page and bucket
    /// by bucket (no page asks for more rows than are still wanted). Version `from` lives in
    /// its own bucket or, after an overflowing append, in the one before.
    fn pages_from<'a>(
        &'a self,
        stream: &'a StreamId,
        from: u64,
        max: usize,
    ) -> BoxStream<'a, Result<Vec<RecordedEvent>>> {
        let from = from.max(1) as i64;
        let start = (self.bucket_of(from) - 1).max(0);
        Box::pin(stream::try_unfold(
            (start, from, max),
            move |(mut bucket, mut next, wanted)| async move {
                if wanted == 0 {
                    return Ok(None);
                }
                loop {
                    let size = self
                        .read_page_size
                        .min(i32::try_from(wanted).unwrap_or(i32::MAX));
                    let page = self.read_page(stream, bucket, next, size).await?;
                    if page.is_empty() {
                        if bucket >= self.bucket_of(next) {
                            return Ok::<_, Error>(None);
                        }
                        bucket += 1;
                        continue;
                    }
                    for (expected, event) in (next..).zip(&page) {
                        if &*event.event_type == crate::ending::REMOVED {
                            return Err(crate::ending::removed_error(stream, next as u64, event));
                        }
                        if event.version as i64 != expected {
                            return Err(Error::Damaged {
                                stream: stream.clone(),
                                version: expected as u64,
                                reason: format!(
                                    "versions {expected}..={} are missing (version {} follows {})",
                                    event.version - 1,
                                    event.version,
                                    expected - 1
                                ),
                            });
                        }
                    }
                    next = page.last().map_or(next, |e| e.version as i64 + 1);
                    if page.len() < size as usize {
                        bucket += 1;
                    }
                    let wanted = wanted - page.len();
                    return Ok(Some((page, (bucket, next, wanted))));
                }
            },
        ))
    }

    /// The stream from version `from`, event by event.
    pub(crate) fn stream_from<'a>(&'a self, stream: &'a StreamId, from: u64) -> EventStream<'a> {
        self.events_from(stream, from, usize::MAX)
    }

    /// At most `max` events of the stream from version `from`, event by event, reading no
    /// more rows than that.
    pub(crate) fn events_from<'a>(
        &'a self,
        stream: &'a StreamId,
        from: u64,
        max: usize,
    ) -> EventStream<'a> {
        let pages = self
            .pages_from(stream, from, max)
            .map_ok(|page| stream::iter(page.into_iter().map(Ok)));
        Box::pin(pages.try_flatten())
    }
}

#[async_trait]
impl EventStore for KeelScylla {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult> {
        let shared = &self.shared;
        stream.validate()?;
        for event in &events {
            event.check_size(stream, shared.max_event_bytes)?;
            keel::ending::check_not_reserved(stream, &event.event_type)?;
        }
        if events.len() as i64 > shared.bucket_size {
            return Err(Error::Config {
                field: "append".into(),
                reason: format!(
                    "{} events in one append to `{stream}` exceed the bucket size {}",
                    events.len(),
                    shared.bucket_size
                ),
            });
        }
        let span =
            tracing::debug_span!("keel_scylla.append", stream = %stream, events = events.len());
        async move {
            if events.is_empty() {
                let head = shared.current_head(stream.as_str()).await?;
                if let Some((version, true)) = head {
                    return Err(shared.closed(stream, version).await);
                }
                let actual = head.map(|(version, _)| version);
                if !expected.accepts(actual) {
                    return Err(shared.conflict(stream, expected).await);
                }
                let v = actual.unwrap_or(0);
                return Ok(AppendResult {
                    first_version: v + 1,
                    last_version: v,
                });
            }
            match expected {
                ExpectedVersion::NoStream => {
                    shared
                        .append_exact(stream, expected, 0, &events, Seal::OPEN)
                        .await
                }
                ExpectedVersion::Exact(n) => {
                    shared
                        .append_exact(stream, expected, n as i64, &events, Seal::OPEN)
                        .await
                }
                ExpectedVersion::Any => loop {
                    // "Any" has no conflict to report: retry at the version just read.
                    let n = shared.current_version(stream.as_str()).await?.unwrap_or(0) as i64;
                    match shared
                        .append_exact(stream, expected, n, &events, Seal::OPEN)
                        .await
                    {
                        Err(e) if e.is_conflict() => tokio::task::yield_now().await,
                        other => return other,
                    }
                },
            }
        }
        .instrument(span)
        .await
    }

    fn read_stream<'a>(&'a self, stream: &'a StreamId, from_version: u64) -> EventStream<'a> {
        self.shared.stream_from(stream, from_version)
    }

    fn read_stream_pages<'a>(&'a self, stream: &'a StreamId, from_version: u64) -> PageStream<'a> {
        Box::pin(
            self.shared
                .pages_from(stream, from_version, usize::MAX)
                .map_ok(EventPage::from),
        )
    }

    fn feed_slices(&self) -> u32 {
        self.shared.feed_slices
    }

    fn read_slice(&self, slice: u32, from_position: u64) -> EventStream<'_> {
        self.shared.feed_from(slice, from_position)
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<Option<u64>> {
        self.shared.current_version(stream.as_str()).await
    }

    async fn feed_heads(&self) -> Result<keel::Cursor> {
        self.shared.feed_heads().await
    }

    async fn fed_position(&self, stream: &StreamId, version: u64) -> Result<Option<u64>> {
        self.shared.fed_position(stream, version).await
    }

    async fn stream_info(&self, stream: &StreamId) -> Result<StreamInfo> {
        self.shared.stream_info(stream).await
    }

    async fn delete_stream(&self, stream: &StreamId, deletion: Deletion) -> Result<Ended> {
        let wait = self.shared.ending_wait;
        self.shared.delete_stream(stream, deletion, wait).await
    }

    async fn truncate_stream(&self, stream: &StreamId, before: u64) -> Result<Ended> {
        let wait = self.shared.ending_wait;
        self.shared.truncate_stream(stream, before, wait).await
    }

    async fn archive_stream(&self, stream: &StreamId) -> Result<Ended> {
        self.archive_stream_with(stream, &|_| {}).await
    }

    fn read_archive<'a>(&'a self, stream: &'a StreamId, from_version: u64) -> EventStream<'a> {
        self.shared.read_archive(stream, from_version)
    }
}

impl KeelScylla {
    /// [`archive_stream`](EventStore::archive_stream), calling `progress` with the number of
    /// events moved so far (after each page): `keel stream archive` draws its bar from it.
    pub async fn archive_stream_with(
        &self,
        stream: &StreamId,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<Ended> {
        let wait = self.shared.ending_wait;
        self.shared.archive_stream(stream, wait, progress).await
    }
}
