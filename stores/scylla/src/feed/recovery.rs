//! Recovery: the heartbeat, the plan a predecessor left unfinished in a slice, and the
//! reconciliation after an outage.

use futures::{stream, StreamExt, TryStreamExt};
use keel::{RecordedEvent, Result, StreamId};
use scylla::value::CqlTimestamp;

use super::{Background, FeederState, Range, SliceFeeder, HEARTBEAT, IN_FLIGHT};
use crate::error::store_err;
use crate::Shared;

impl FeederState {
    /// Notes that a feeder holding slices is alive (with the number of slices it holds).
    pub(super) async fn beat(&self) {
        let now = keel::event::now_millis();
        let head = self.held.len() as i64;
        if let Err(e) = self
            .shared
            .session
            .execute_unpaged(
                &self.shared.st.heartbeat_write,
                (HEARTBEAT, head, CqlTimestamp(now)),
            )
            .await
        {
            tracing::debug!(error = %e, "feeder heartbeat not written");
        }
    }

    /// When no feeder was alive for about as long as markers live (or none ever noted it),
    /// appends of that time may have lost their markers: reconcile the feed in the background,
    /// which marks every stream that is behind for this feeder.
    pub(super) async fn reconcile_after_outage(&mut self) {
        match self.shared.feeder_last_alive().await {
            Ok(Some(_)) => return,
            Ok(None) => tracing::info!(
                "no feeder noted that it was alive in the last 55 minutes; reconciling the feed"
            ),
            // Not knowing is no reason to risk leaving events out: reconcile.
            Err(e) => {
                tracing::warn!(error = %e, "feeder heartbeat unreadable; reconciling the feed")
            }
        }
        let shared = self.shared.clone();
        let task = tokio::spawn(async move {
            match shared.reconcile_feed(&|_| {}).await {
                Ok(found) if !found.lagging.is_empty() => tracing::warn!(
                    streams = found.lagging.len(),
                    events = found.unfed_events,
                    "events missing from the feed after a feeder outage; publishing them"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(
                    error = %e,
                    "feed reconciliation failed; run `keel feed reconcile`"
                ),
            }
        });
        self.reconciling = Some(Background(task.abort_handle()));
    }
}

impl SliceFeeder {
    /// The slice's head from `feed_meta`, after finishing any plan left there.
    pub(super) async fn load_meta(&mut self) -> Result<i64> {
        if let Some(head) = self.meta {
            return Ok(head);
        }
        let slice = self.slice;
        let (head, plan) = match self.shared.read_meta(slice).await? {
            Some(meta) => meta,
            None => {
                self.shared
                    .session
                    .execute_unpaged(&self.shared.st.meta_init, (slice as i32,))
                    .await
                    .map_err(|e| store_err(format!("create feed_meta of slice {slice}"), e))?;
                self.shared
                    .read_meta(slice)
                    .await?
                    .unwrap_or((0, Vec::new()))
            }
        };
        if !plan.is_empty() {
            let events = self.read_plan_events(&plan).await?;
            self.write_plan(&plan, &events).await?;
        }
        self.meta = Some(head);
        Ok(head)
    }

    /// The events of a recorded plan, read [`IN_FLIGHT`] streams at a time.
    pub(super) async fn read_plan_events(&self, plan: &[Range]) -> Result<Vec<Vec<RecordedEvent>>> {
        // Owned futures (a stream name and the shared state each): a future that borrows
        // would not be `Send` for every lifetime, which the spawned feeder task needs.
        stream::iter(plan.to_vec())
            .map(|range| {
                let shared = self.shared.clone();
                async move {
                    let wanted = (range.last - range.first + 1) as usize;
                    let events: Vec<RecordedEvent> = shared
                        .events_from(&StreamId::new(&range.stream), range.first as u64, wanted)
                        .try_collect()
                        .await?;
                    if events.len() != wanted {
                        return Err(store_err(
                            "replay feed plan",
                            std::io::Error::other(format!(
                                "stream `{}` lacks versions {}..={}",
                                range.stream, range.first, range.last
                            )),
                        ));
                    }
                    Ok(events)
                }
            })
            .buffered(IN_FLIGHT)
            .try_collect()
            .await
    }
}

impl Shared {
    /// The head and the last plan of `slice` (`None`: the slice never had a round).
    pub(super) async fn read_meta(&self, slice: u32) -> Result<Option<(i64, Vec<Range>)>> {
        let op = || format!("read feed_meta of slice {slice}");
        let rows = self
            .select(&self.st.meta_read, (slice as i32,), op())
            .await?;
        let Some((head, plan)) = rows
            .maybe_first_row::<(Option<i64>, Option<Vec<u8>>)>()
            .map_err(|e| store_err(op(), e))?
        else {
            return Ok(None);
        };
        let plan = match plan {
            Some(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| store_err("decode feed plan", e))?
            }
            None => Vec::new(),
        };
        Ok(Some((head.unwrap_or(0), plan)))
    }
}
