//! Streams that end, on ScyllaDB: deletion, truncation, archive (see `keel::ending`).
//!
//! Each ending appends its notice through the exact append, so the feed carries it once in
//! the stream's order. A closing notice (deleted, archived) stores its bucket's static head
//! negated: every later append's condition (`IF head = n`, or the fresh bucket's check of
//! the previous head) fails, and the refused append reads the head back and reports the
//! stream closed. The common path pays nothing: no extra read, no extra column.
//!
//! Removing events waits until the feed has carried the notice (so every event before it),
//! then works bucket by bucket: the rows below the boundary are counted (and copied to
//! `events_archive` for an archive), the highest of them is overwritten by a *placeholder*
//! (type `$keel.removed`, saying what removed it and the first version held), and the rest
//! are deleted with one range delete. A read that reaches a removed version meets the
//! placeholder first and fails with `Truncated` or `StreamClosed` instead of returning a
//! shortened stream. Every step is idempotent: an interrupted removal is finished by running
//! the operation again.

use std::time::{Duration, Instant};

use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use keel::ending::{Deletion, Ended, StreamInfo, StreamNotice, StreamStatus};
use keel::{Error, ExpectedVersion, RecordedEvent, Result, StreamId};
use scylla::value::CqlTimestamp;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::store_err;
use crate::events::{Seal, StoredRow};
use crate::Shared;

/// The type of a placeholder row: it stands for the removed events below it.
pub(crate) const REMOVED: &str = "$keel.removed";

/// Rows read per page while removing.
const REMOVE_PAGE: i32 = 1_000;

/// Archive rows written at once.
const IN_FLIGHT: usize = 32;

/// How many times an ending retries its notice against concurrent appends.
const ATTEMPTS: usize = 8;

/// What a placeholder says.
#[derive(Serialize, Deserialize)]
struct Removed {
    /// The notice that removed the events.
    notice: StreamNotice,
    /// Its version.
    at: u64,
    /// The first version still held.
    first_version: u64,
}

/// The error for a read from `from` that met the placeholder `event`.
pub(crate) fn removed_error(stream: &StreamId, from: u64, event: &RecordedEvent) -> Error {
    let removed: Removed = match serde_json::from_slice(&event.payload) {
        Ok(removed) => removed,
        Err(e) => {
            return Error::Damaged {
                stream: stream.clone(),
                version: event.version,
                reason: format!("a placeholder of removed events does not decode: {e}"),
            }
        }
    };
    match removed.notice.closed_status() {
        Some(status) => Error::StreamClosed {
            stream: stream.clone(),
            version: removed.at,
            status,
        },
        None => Error::Truncated {
            stream: stream.clone(),
            from,
            first_version: removed.first_version,
        },
    }
}

/// The progress callback of a removal: events removed (moved) so far.
pub(crate) type Progress<'a> = &'a (dyn Fn(u64) + Send + Sync);

impl Shared {
    /// The error for an append refused because `stream` is sealed at `version`.
    pub(crate) async fn closed(&self, stream: &StreamId, version: u64) -> Error {
        match self.notice_at(stream, version).await {
            Ok(Some(notice)) => Error::StreamClosed {
                stream: stream.clone(),
                version,
                status: notice.closed_status().unwrap_or(StreamStatus::Archived),
            },
            Ok(None) => Error::Damaged {
                stream: stream.clone(),
                version,
                reason: "the stream is sealed but its last event is no closing notice".into(),
            },
            Err(e) => e,
        }
    }

    /// The notice at `version`, if the event there is one.
    async fn notice_at(&self, stream: &StreamId, version: u64) -> Result<Option<StreamNotice>> {
        let mut events = self.events_from(stream, version, 1);
        match events.try_next().await? {
            Some(event) if event.version == version => StreamNotice::of(&event).transpose(),
            _ => Ok(None),
        }
    }

    /// The first version the stream holds: 1, or what the placeholder in bucket 0 says.
    async fn first_version(&self, stream: &StreamId) -> Result<u64> {
        let rows = self.read_rows(stream, 0, 1, i64::MAX, 1).await?;
        Ok(match rows.first() {
            Some(row) if row.2.as_deref() == Some(REMOVED) => row
                .4
                .as_ref()
                .and_then(|payload| serde_json::from_slice::<Removed>(payload).ok())
                .map_or(1, |removed| removed.first_version),
            _ => 1,
        })
    }

    pub(crate) async fn stream_info(&self, stream: &StreamId) -> Result<StreamInfo> {
        let Some((version, sealed)) = self.current_head(stream.as_str()).await? else {
            return Ok(StreamInfo::open(stream, None));
        };
        let status = if sealed {
            match self.notice_at(stream, version).await? {
                Some(notice) => notice.closed_status().unwrap_or(StreamStatus::Open),
                None => return Err(self.closed(stream, version).await),
            }
        } else {
            StreamStatus::Open
        };
        Ok(StreamInfo {
            stream: stream.clone(),
            version,
            status,
            first_version: self.first_version(stream).await?,
        })
    }

    /// The stream's state, refused as `operation` when it does not exist.
    async fn existing(&self, stream: &StreamId, operation: &'static str) -> Result<StreamInfo> {
        stream.validate()?;
        let info = self.stream_info(stream).await?;
        if info.status == StreamStatus::Missing {
            return Err(refused(stream, operation, "no such stream".into()));
        }
        Ok(info)
    }

    /// Appends `notice` after `info.version`; retried from a fresh read when another append
    /// got there first. Gives the notice's version.
    async fn append_notice(
        &self,
        stream: &StreamId,
        mut info: StreamInfo,
        notice: StreamNotice,
        operation: &'static str,
        still_wanted: impl Fn(&StreamInfo) -> Result<bool>,
    ) -> Result<Option<u64>> {
        for _ in 0..ATTEMPTS {
            let seal = Seal {
                sealed: info.status.is_closed(),
                seal: notice.closes() || info.status.is_closed(),
            };
            let expected = ExpectedVersion::Exact(info.version);
            match self
                .append_exact(
                    stream,
                    expected,
                    info.version as i64,
                    &[notice.to_event()],
                    seal,
                )
                .await
            {
                Ok(done) => return Ok(Some(done.last_version)),
                Err(Error::Conflict { .. } | Error::StreamClosed { .. }) => {
                    info = self.existing(stream, operation).await?;
                    if !still_wanted(&info)? {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(refused(
            stream,
            operation,
            format!("{ATTEMPTS} attempts lost to concurrent appends; try again"),
        ))
    }

    pub(crate) async fn delete_stream(
        &self,
        stream: &StreamId,
        deletion: Deletion,
        wait: Duration,
    ) -> Result<Ended> {
        let hard = deletion == Deletion::Hard;
        let info = self.existing(stream, "delete").await?;
        // Whether a notice is (still) needed on a stream in this state.
        let wanted = |info: &StreamInfo| match info.status {
            StreamStatus::Archived => {
                Err(refused(stream, "delete", "the stream is archived".into()))
            }
            StreamStatus::Deleted { hard: true } => Ok(false),
            StreamStatus::Deleted { hard: false } => Ok(hard),
            _ => Ok(true),
        };
        let noticed = if wanted(&info)? {
            self.append_notice(
                stream,
                info,
                StreamNotice::Deleted { hard },
                "delete",
                wanted,
            )
            .await?
            .is_some()
        } else {
            false
        };
        let info = self.stream_info(stream).await?;
        if info.status != (StreamStatus::Deleted { hard: true }) {
            return Ok(Ended {
                info,
                removed: 0,
                noticed,
            });
        }
        let notice = StreamNotice::Deleted { hard: true };
        let boundary = info.version;
        let removed = self
            .remove(stream, &info, notice, boundary, false, wait, &|_| {})
            .await?;
        Ok(Ended {
            info: removed_below(info, boundary),
            removed,
            noticed,
        })
    }

    pub(crate) async fn truncate_stream(
        &self,
        stream: &StreamId,
        before: u64,
        wait: Duration,
    ) -> Result<Ended> {
        let info = self.existing(stream, "truncate").await?;
        if info.status.is_closed() {
            return Err(refused(
                stream,
                "truncate",
                format!("the stream is {}", info.status),
            ));
        }
        if before <= info.first_version {
            return Ok(Ended {
                info,
                removed: 0,
                noticed: false,
            });
        }
        if before > info.version + 1 {
            return Err(refused(
                stream,
                "truncate",
                format!(
                    "version {before} is past the stream's version {}",
                    info.version
                ),
            ));
        }
        let covered = self.snapshot_version(stream).await?;
        if covered.is_none_or(|v| v + 1 < before) {
            return Err(refused(
                stream,
                "truncate",
                format!(
                    "no snapshot includes version {} (the last one removed); the latest is {}",
                    before - 1,
                    covered.map_or("none".to_owned(), |v| format!("at version {v}"))
                ),
            ));
        }
        let notice = StreamNotice::Truncated { before };
        // An earlier call that appended this notice and stopped before removing: finish it.
        let pending = self.notice_at(stream, info.version).await? == Some(notice);
        let noticed = !pending
            && self
                .append_notice(stream, info.clone(), notice, "truncate", |info| {
                    if info.status.is_closed() {
                        return Err(refused(
                            stream,
                            "truncate",
                            format!("the stream is {}", info.status),
                        ));
                    }
                    Ok(true)
                })
                .await?
                .is_some();
        let info = self.stream_info(stream).await?;
        let removed = self
            .remove(stream, &info, notice, before, false, wait, &|_| {})
            .await?;
        Ok(Ended {
            info: removed_below(info, before),
            removed,
            noticed,
        })
    }

    pub(crate) async fn archive_stream(
        &self,
        stream: &StreamId,
        wait: Duration,
        progress: Progress<'_>,
    ) -> Result<Ended> {
        let info = self.existing(stream, "archive").await?;
        let wanted = |info: &StreamInfo| match info.status {
            StreamStatus::Deleted { hard: true } => Err(refused(
                stream,
                "archive",
                "the stream was deleted hard: its events are gone".into(),
            )),
            StreamStatus::Archived => Ok(false),
            _ => Ok(true),
        };
        let noticed = if wanted(&info)? {
            self.append_notice(stream, info, StreamNotice::Archived, "archive", wanted)
                .await?
                .is_some()
        } else {
            false
        };
        let info = self.stream_info(stream).await?;
        let boundary = info.version;
        let notice = StreamNotice::Archived;
        let removed = self
            .remove(stream, &info, notice, boundary, true, wait, progress)
            .await?;
        Ok(Ended {
            info: removed_below(info, boundary),
            removed,
            noticed,
        })
    }

    /// The version of the stream's latest snapshot.
    async fn snapshot_version(&self, stream: &StreamId) -> Result<Option<u64>> {
        let op = format!("read the latest snapshot version of `{stream}`");
        let rows = self
            .select(&self.st.snapshot_version, (stream.as_str(),), op.clone())
            .await?;
        let row = rows
            .maybe_first_row::<(i64,)>()
            .map_err(|e| store_err(op, e))?;
        Ok(row.map(|(v,)| v.max(0) as u64))
    }

    /// Waits until the feed holds the stream up to `version`.
    async fn wait_fed(&self, stream: &StreamId, version: u64, wait: Duration) -> Result<()> {
        let deadline = Instant::now() + wait;
        loop {
            if self.fed_version(stream.as_str()).await?.max(0) as u64 >= version {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    operation: format!(
                        "removing the events of `{stream}` (its notice is at version {version}): \
                         the feed has not carried them yet, so nothing was removed; is a feeder \
                         running? Run the operation again to finish"
                    ),
                    after: wait,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Removes the stream's events below `boundary` (moving them to the archive when
    /// `archive`), once the feed has carried `info.version`. Gives how many were removed.
    #[allow(clippy::too_many_arguments)]
    async fn remove(
        &self,
        stream: &StreamId,
        info: &StreamInfo,
        notice: StreamNotice,
        boundary: u64,
        archive: bool,
        wait: Duration,
        progress: Progress<'_>,
    ) -> Result<u64> {
        if boundary <= info.first_version {
            return Ok(0);
        }
        self.wait_fed(stream, info.version, wait).await?;
        let placeholder = Removed {
            notice,
            at: info.version,
            first_version: boundary,
        };
        let payload = serde_json::to_vec(&placeholder).expect("a placeholder serialises");
        let last_bucket = self.bucket_of(boundary as i64 - 1);
        let mut removed = 0u64;
        for bucket in 0..=last_bucket {
            let mut from = 1i64;
            let mut highest = None;
            loop {
                let rows = self
                    .read_rows(stream, bucket, from, boundary as i64, REMOVE_PAGE)
                    .await?;
                let Some(last) = rows.last() else { break };
                from = last.0 + 1;
                highest = Some(last.0);
                let full = rows.len() == REMOVE_PAGE as usize;
                let events: Vec<StoredRow> = rows
                    .into_iter()
                    .filter(|row| row.2.as_deref() != Some(REMOVED))
                    .collect();
                removed += events.len() as u64;
                if archive {
                    self.copy_to_archive(stream, bucket, events).await?;
                }
                progress(removed);
                if !full {
                    break;
                }
            }
            let Some(highest) = highest else { continue };
            let op = || format!("remove events of `{stream}` below version {boundary}");
            self.session
                .execute_unpaged(
                    &self.st.write_placeholder,
                    (
                        Uuid::nil(),
                        REMOVED,
                        &payload[..],
                        CqlTimestamp(keel::event::now_millis()),
                        stream.as_str(),
                        bucket,
                        highest,
                    ),
                )
                .await
                .map_err(|e| store_err(op(), e))?;
            self.session
                .execute_unpaged(&self.st.remove_below, (stream.as_str(), bucket, highest))
                .await
                .map_err(|e| store_err(op(), e))?;
        }
        tracing::info!(stream = %stream, boundary, removed, archive, "stream events removed");
        Ok(removed)
    }

    async fn copy_to_archive(
        &self,
        stream: &StreamId,
        bucket: i64,
        rows: Vec<StoredRow>,
    ) -> Result<()> {
        let op = || format!("copy events of `{stream}` to the archive");
        stream::iter(rows)
            .map(|row| async move {
                let (version, id, event_type, schema, payload, metadata, at) = row;
                self.session
                    .execute_unpaged(
                        &self.st.archive_insert,
                        (
                            stream.as_str(),
                            bucket,
                            version,
                            id,
                            event_type,
                            schema,
                            payload,
                            metadata,
                            at,
                        ),
                    )
                    .await
                    .map(|_| ())
            })
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<()>()
            .await
            .map_err(|e| store_err(op(), e))
    }

    /// Raw rows of `bucket` with versions in `from..below`, at most `limit`.
    async fn read_rows(
        &self,
        stream: &StreamId,
        bucket: i64,
        from: i64,
        below: i64,
        limit: i32,
    ) -> Result<Vec<StoredRow>> {
        let op = || format!("read rows of `{stream}`");
        let rows = self
            .select(
                &self.st.read_rows_below,
                (stream.as_str(), bucket, from, below, limit),
                op(),
            )
            .await?;
        rows.rows::<StoredRow>()
            .map_err(|e| store_err(op(), e))?
            .map(|row| row.map_err(|e| store_err(op(), e)))
            .collect()
    }

    /// The archived events of `stream` from `from` on, bucket by bucket.
    pub(crate) fn read_archive<'a>(
        &'a self,
        stream: &'a StreamId,
        from: u64,
    ) -> BoxStream<'a, Result<RecordedEvent>> {
        let pages = stream::try_unfold(Some((0i64, from.max(1) as i64)), move |at| async move {
            let Some((bucket, from)) = at else {
                return Ok(None);
            };
            let Some((version, _)) = self.current_head(stream.as_str()).await? else {
                return Ok(None);
            };
            let last_bucket = self.bucket_of(version as i64);
            let mut bucket = bucket;
            loop {
                if bucket > last_bucket {
                    return Ok::<_, Error>(None);
                }
                let op = || format!("read the archive of `{stream}`");
                let rows = self
                    .select(
                        &self.st.read_archive,
                        (stream.as_str(), bucket, from, REMOVE_PAGE),
                        op(),
                    )
                    .await?;
                let page: Vec<RecordedEvent> = rows
                    .rows::<StoredRow>()
                    .map_err(|e| store_err(op(), e))?
                    .map(|row| self.decode_row(stream, None, row.map_err(|e| store_err(op(), e))?))
                    .collect::<Result<_>>()?;
                if page.is_empty() {
                    bucket += 1;
                    continue;
                }
                let next = page.last().map_or(from, |e| e.version as i64 + 1);
                let next_bucket = if page.len() < REMOVE_PAGE as usize {
                    bucket + 1
                } else {
                    bucket
                };
                return Ok(Some((
                    stream::iter(page.into_iter().map(Ok)),
                    Some((next_bucket, next)),
                )));
            }
        });
        Box::pin(pages.try_flatten())
    }
}

/// `info` once the versions below `boundary` are removed: the state needs no second read.
fn removed_below(info: StreamInfo, boundary: u64) -> StreamInfo {
    StreamInfo {
        first_version: info.first_version.max(boundary),
        ..info
    }
}

fn refused(stream: &StreamId, operation: &'static str, reason: String) -> Error {
    Error::Refused {
        stream: stream.clone(),
        operation,
        reason,
    }
}
