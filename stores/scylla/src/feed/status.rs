//! The feed as an operator sees it: status, streams stuck on damaged rows, markers not yet
//! fed.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::{stream, StreamExt, TryStreamExt};
use keel::{Error, Result, StreamId};
use scylla::value::CqlTimestamp;
use uuid::Uuid;

use super::{
    feeder_lease, FeedStatus, FEED_DEAD_LETTERS, FEED_MEMBERS, FULL_LOOKBACK_MS, HEARTBEAT,
    IN_FLIGHT,
};

/// One slice of the feed as an operator sees it (in [`FeedStatus::slices`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceStatus {
    /// The slice.
    pub slice: u32,
    /// Its last allocated position.
    pub head: u64,
    /// The id of the feeder holding its lease, if any holds it.
    pub feeder: Option<String>,
    /// Its lease's epoch: how many times the lease has been taken.
    pub epoch: i64,
    /// Streams of its last plan not yet fully written (usually 0).
    pub unfinished_plan: usize,
}
use crate::error::store_err;
use crate::Shared;

impl crate::KeelScylla {
    /// The feed's heads, who feeds each slice, when a feeder was last alive, and whether a
    /// plan is left unfinished: what `keel feed status` prints.
    pub async fn feed_status(&self) -> Result<FeedStatus> {
        let shared = &self.shared;
        let slices: Vec<SliceStatus> = stream::iter(0..shared.feed_slices)
            .map(|slice| self.slice_status(slice))
            .buffered(IN_FLIGHT)
            .try_collect()
            .await?;
        let now = keel::event::now_millis();
        let last_alive = shared
            .feeder_last_alive()
            .await?
            .map(|at| Duration::from_millis((now - at).max(0) as u64));
        let mut members = shared.members(FEED_MEMBERS).await?;
        members.sort();
        Ok(FeedStatus {
            head: slices.iter().map(|s| s.head).sum(),
            unfinished_plan: slices.iter().map(|s| s.unfinished_plan).sum(),
            slices,
            members,
            last_alive,
            stuck: self.stuck_in_feed().await?,
        })
    }

    async fn slice_status(&self, slice: u32) -> Result<SliceStatus> {
        let shared = &self.shared;
        let (head, plan) = shared.read_meta(slice).await?.unwrap_or((0, Vec::new()));
        let name = feeder_lease(slice, shared.feed_slices);
        let (feeder, epoch) = shared.read_lease(&name).await?.unwrap_or((None, 0));
        // A plan stays recorded after it was written; it is unfinished while the progress of
        // one of its streams is short of it.
        let short: Vec<bool> = stream::iter(&plan)
            .map(|range| async move {
                Ok::<_, Error>(shared.fed_version(&range.stream).await? < range.last)
            })
            .buffer_unordered(IN_FLIGHT)
            .try_collect()
            .await?;
        Ok(SliceStatus {
            slice,
            head: head.max(0) as u64,
            feeder,
            epoch,
            unfinished_plan: short.into_iter().filter(|&s| s).count(),
        })
    }

    /// The streams the feed cannot carry past a damaged row, as recorded by any process's
    /// feeder, without those repaired or skipped since (their fed progress reached the
    /// version).
    pub async fn stuck_in_feed(&self) -> Result<Vec<keel::projection::DeadLetter>> {
        use keel::projection::ProjectionStore;
        let mut latest: HashMap<(String, u64), keel::projection::DeadLetter> = HashMap::new();
        for letter in self.dead_letters(FEED_DEAD_LETTERS).await? {
            latest.insert((letter.event.stream.clone(), letter.event.version), letter);
        }
        let mut stuck = Vec::new();
        for ((stream, version), letter) in latest {
            if self.shared.fed_version(&stream).await? < version as i64 {
                stuck.push(letter);
            }
        }
        stuck.sort_by(|a, b| {
            (&a.event.stream, a.event.version).cmp(&(&b.event.stream, b.event.version))
        });
        Ok(stuck)
    }

    /// Lets the feed go past version `version` of `stream`, which it cannot carry (see
    /// [`FeedStatus::stuck`]): the feed will never hold that event, and carries on with the
    /// stream's next version. For an operator, once repairing the row is out of the question.
    /// Refused unless the feed holds the stream exactly up to `version - 1`.
    pub async fn skip_in_feed(&self, stream: &StreamId, version: u64) -> Result<()> {
        let fed = self.shared.fed_version(stream.as_str()).await?;
        if fed != version as i64 - 1 {
            return Err(Error::Invalid {
                type_name: "skip_in_feed",
                reason: format!(
                    "the feed holds `{stream}` up to version {fed}: only version {} can be skipped",
                    fed + 1
                ),
            });
        }
        self.shared
            .record_progress(stream.as_str(), version as i64)
            .await?;
        tracing::warn!(stream = %stream, version, "operator skipped a version in the feed");
        self.shared.unstuck(stream.as_str());
        self.shared.wake.notify(stream.clone());
        Ok(())
    }
}

impl Shared {
    /// Notes that `stream` cannot be fed past `version`; the first time in this process it
    /// is also logged and recorded as a dead letter of the feed.
    pub(super) async fn stuck_at(&self, stream: &str, version: u64, reason: String) {
        let new = {
            let mut stuck = self.stuck.lock().unwrap_or_else(|p| p.into_inner());
            stuck.insert(stream.to_owned(), (version, reason.clone()))
                != Some((version, reason.clone()))
        };
        if !new {
            return;
        }
        tracing::error!(stream, version, reason = %reason, "the feed cannot carry this stream past a damaged row; other streams go on");
        metrics::counter!("keel_scylla_feed_stuck_total").increment(1);
        let letter = keel::projection::DeadLetter {
            projection: FEED_DEAD_LETTERS.to_owned(),
            event: keel::projection::FailedEvent {
                stream: stream.to_owned(),
                version,
                event_type: String::new(),
                position: 0,
                slice: keel::feed::slice_of(&StreamId::new(stream), self.feed_slices),
            },
            error: reason,
            at: keel::event::now_millis(),
        };
        let blob = match serde_json::to_vec(&letter) {
            Ok(blob) => blob,
            Err(_) => return,
        };
        if let Err(e) = self
            .session
            .execute_unpaged(
                &self.st.add_dead_letter,
                (FEED_DEAD_LETTERS, letter.at, Uuid::new_v4(), blob),
            )
            .await
        {
            tracing::warn!(stream, error = %e, "could not record the stuck stream");
        }
    }

    pub(super) fn unstuck(&self, stream: &str) {
        self.stuck
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(stream);
    }

    pub(crate) fn stuck_streams(&self) -> Vec<String> {
        self.stuck
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

impl Shared {
    /// When the leading feeder last noted that it was alive (ms since the epoch, by its clock),
    /// if it did in the last 55 minutes.
    pub(super) async fn feeder_last_alive(&self) -> Result<Option<i64>> {
        let op = "read the feeder heartbeat";
        let rows = self
            .select(&self.st.heartbeat_read, (HEARTBEAT,), op)
            .await?;
        Ok(rows
            .maybe_first_row::<(Option<CqlTimestamp>,)>()
            .map_err(|e| store_err(op, e))?
            .and_then(|(at,)| at)
            .map(|at| at.0))
    }

    /// The streams of the last hour's markers whose committed events are not all in the feed
    /// (looking at up to `cap` streams), and how many events they lack. Without a feeder,
    /// these are appends waiting for one.
    pub(crate) async fn unfed_marked_streams(&self, cap: usize) -> Result<(usize, u64)> {
        let now = keel::event::now_millis();
        let since = now - FULL_LOOKBACK_MS;
        let mut streams = HashSet::new();
        'scan: for minute in (since / 60_000)..=(now / 60_000) {
            for (_, _, stream) in self.markers_in_minute(minute, since).await? {
                streams.insert(stream);
                if streams.len() >= cap {
                    break 'scan;
                }
            }
        }
        let behind: Vec<i64> = stream::iter(streams)
            .map(|s| async move {
                let head = self.current_version(&s).await?.unwrap_or(0) as i64;
                Ok::<_, Error>(head - self.fed_version(&s).await?)
            })
            .buffer_unordered(IN_FLIGHT)
            .try_filter(|&lag| futures::future::ready(lag > 0))
            .try_collect()
            .await?;
        Ok((behind.len(), behind.iter().map(|&lag| lag as u64).sum()))
    }

    /// The last version of `stream` in the feed (0: none).
    pub(crate) async fn fed_version(&self, stream: &str) -> Result<i64> {
        let op = || format!("read feed progress of `{stream}`");
        let rows = self.select(&self.st.read_progress, (stream,), op()).await?;
        Ok(rows
            .maybe_first_row::<(i64,)>()
            .map_err(|e| store_err(op(), e))?
            .map_or(0, |(v,)| v))
    }
}
