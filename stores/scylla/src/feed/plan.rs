//! Planning a round: which streams to look at (wake-ups and markers), what each brings,
//! and the position allocation that stores the plan.

use std::collections::HashSet;
use std::time::Duration;

use futures::{stream, StreamExt, TryStreamExt};
use keel::{Error, RecordedEvent, Result, StreamId};
use serde_json::json;
use uuid::Uuid;

use super::{
    is_stream_damage, FeederState, Range, SliceFeeder, FULL_LOOKBACK_MS, IN_FLIGHT, MAX_PLAN,
    MIN_SHARE,
};
use crate::error::{outcome_unknown, store_err};
use crate::events::Lwt;
use crate::Shared;

/// The next round's gather: doubled, up to `max`, when appends kept arriving while the last
/// round ran (the load is sustained, so fewer and larger rounds cost the node less); back to
/// `base` as soon as a round finds nothing waiting.
pub(super) fn next_gather(
    current: Duration,
    busy: bool,
    base: Duration,
    max: Duration,
) -> Duration {
    if busy {
        (current * 2).clamp(base, max.max(base))
    } else {
        base
    }
}

impl FeederState {
    /// Streams whose markers are new, or have just settled.
    pub(super) async fn scan_markers(&mut self) -> Result<HashSet<String>> {
        let now = keel::event::now_millis();
        let settle = self.config.settle_after.as_millis() as i64;
        let lookback = if self.scanned_full {
            settle + 5_000
        } else {
            FULL_LOOKBACK_MS
        };
        let since = now - lookback;
        let mut found = HashSet::new();
        for minute in (since / 60_000)..=(now / 60_000) {
            for (at, marker, stream) in self.shared.markers_in_minute(minute, since).await? {
                self.seen.entry(marker).or_insert_with(|| {
                    found.insert(stream.clone());
                    (at, stream, false)
                });
            }
        }
        self.scanned_full = true;
        for (at, stream, settled) in self.seen.values_mut() {
            if !*settled && *at <= now - settle {
                *settled = true;
                found.insert(stream.clone());
            }
        }
        self.seen
            .retain(|_, (at, _, settled)| !*settled || *at > now - settle - 60_000);
        Ok(found)
    }
}

impl SliceFeeder {
    /// One round of this slice: plans and publishes the new events of `candidates`, up to [`MAX_PLAN`].
    /// `true` when the plan was full and published, so that more events wait (their streams
    /// are back among the wake-ups).
    pub(super) async fn publish(&mut self, candidates: HashSet<String>) -> Result<bool> {
        let head = self.load_meta().await?;
        let mut candidates: Vec<String> = candidates.into_iter().collect();
        candidates.sort();
        let (found, planned) = self.gather_new_events(&candidates).await?;
        let mut plan = Vec::new();
        let mut events = Vec::new();
        let mut next = head + 1;
        let stuck: HashSet<String> = self.shared.stuck_streams().into_iter().collect();
        for (stream, fed, new) in found {
            if stuck.contains(&stream) {
                // Its progress is read again next time: an operator may skip the damaged
                // version in the meantime.
                self.progress.remove(&stream);
                continue;
            }
            self.progress.insert(stream.clone(), fed);
            let Some(last) = new.last().map(|e| e.version as i64) else {
                continue;
            };
            plan.push(Range {
                stream,
                first: fed + 1,
                last,
                position: next,
            });
            next += new.len() as i64;
            events.push(new);
        }
        if plan.is_empty() {
            return Ok(false);
        }
        let new_head = next - 1;
        let blob = serde_json::to_vec(&json!(plan)).map_err(|e| Error::Encode {
            what: "feed plan".into(),
            reason: e.to_string(),
        })?;
        let allocated = match self
            .shared
            .session
            .execute_unpaged(
                &self.shared.st.meta_allocate,
                (new_head, &blob, self.slice as i32, head),
            )
            .await
        {
            Ok(result) => {
                Lwt::from_result(result)
                    .map_err(|r| store_err("allocate feed positions", std::io::Error::other(r)))?
                    .applied
            }
            Err(e) if outcome_unknown(&e) => {
                // Read back: if the head and plan are ours, the allocation went through.
                matches!(self.shared.read_meta(self.slice).await?, Some((h, p)) if h == new_head && p == plan)
            }
            Err(e) => return Err(store_err("allocate feed positions", e)),
        };
        if !allocated {
            // Another feeder moved the head: start over from what it left.
            self.reset();
            return Ok(false);
        }
        self.meta = Some(new_head);
        self.write_plan(&plan, &events).await?;
        Ok(planned >= MAX_PLAN)
    }

    /// The fed progress and new events of `candidates` (in their order), up to [`MAX_PLAN`]
    /// events in all, and how many that is; see [`gather`]. Streams with events beyond the
    /// plan, and candidates not looked at, are woken for the next round.
    pub(super) async fn gather_new_events(
        &self,
        candidates: &[String],
    ) -> Result<(Vec<Found>, usize)> {
        let shared = self.shared.clone();
        let read = move |stream: String, after: Option<i64>, max: usize| {
            // Owned (a name and the shared state): a borrowing future would not be `Send`
            // for every lifetime, which the spawned feeder task needs.
            let shared = shared.clone();
            async move {
                let after = match after {
                    Some(version) => version,
                    None => shared.fed_version(&stream).await?,
                };
                let read: Result<Vec<RecordedEvent>> = shared
                    .events_from(&StreamId::new(&stream), after as u64 + 1, max)
                    .try_collect()
                    .await;
                match read {
                    Ok(new) => {
                        shared.unstuck(&stream);
                        Ok((after, new))
                    }
                    Err(e) => match is_stream_damage(&e) {
                        // One bad row holds its own stream back, never the others.
                        Some((version, reason)) => {
                            shared.stuck_at(&stream, version, reason).await;
                            Ok((after, Vec::new()))
                        }
                        None => Err(e),
                    },
                }
            }
        };
        let round = gather(candidates, |s| self.progress.get(s).copied(), read).await?;
        for stream in &round.waiting {
            self.shared.wake.notify(StreamId::new(stream));
        }
        Ok((round.found, round.planned))
    }
}

/// A stream looked at in a round: its name, its fed progress, and its new events read.
pub(super) type Found = (String, i64, Vec<RecordedEvent>);

/// What [`gather`] read for a round.
pub(super) struct Round {
    /// The streams looked at, in candidate order.
    found: Vec<Found>,
    /// Events in `found`: at most [`MAX_PLAN`].
    planned: usize,
    /// Streams that may have events beyond what was read, and candidates not looked at.
    waiting: Vec<String>,
}

/// Reads the new events of `candidates` for one round: `read(stream, after, max)` gives a
/// stream's progress (`after`, or read when `None`) and at most `max` events after it.
///
/// Streams are read [`IN_FLIGHT`] at a time: one after the other, a round of many
/// one-event streams cost two round trips per stream. Each stream first brings at most an
/// equal share of the plan, so reads stay bounded when many streams have long backlogs; the
/// streams that filled their share then share what is left of the plan, and so on.
pub(super) async fn gather<R, F>(
    candidates: &[String],
    known: impl Fn(&str) -> Option<i64>,
    read: R,
) -> Result<Round>
where
    R: Fn(String, Option<i64>, usize) -> F,
    F: std::future::Future<Output = Result<(i64, Vec<RecordedEvent>)>>,
{
    let mut found: Vec<Found> = Vec::new();
    let mut planned = 0usize;
    // Pass one reads every candidate from its progress; later passes read the streams that
    // filled their share (indices into `found`) from where they stopped.
    let mut full_share: Vec<usize> = Vec::new();
    let mut looked_at = 0;
    let mut first_pass = true;
    while planned < MAX_PLAN && (first_pass || !full_share.is_empty()) {
        let readers = if first_pass {
            candidates.len()
        } else {
            full_share.len()
        };
        let share = ((MAX_PLAN - planned) / readers.max(1)).max(MIN_SHARE);
        let reads: Vec<(String, Option<i64>)> = if first_pass {
            candidates.iter().map(|s| (s.clone(), known(s))).collect()
        } else {
            full_share
                .iter()
                .map(|&i| {
                    let (stream, fed, new) = &found[i];
                    let last = new.last().map_or(*fed, |e| e.version as i64);
                    (stream.clone(), Some(last))
                })
                .collect()
        };
        let mut reads = stream::iter(reads)
            .map(|(stream, after)| read(stream, after, share))
            .buffered(IN_FLIGHT);
        let mut filled = Vec::new();
        let mut consumed = 0;
        while planned < MAX_PLAN {
            let Some(result) = reads.next().await else {
                break;
            };
            let (after, mut new) = result?;
            // A stream that filled its share, or did not fit, may have more.
            let more = new.len() == share || new.len() > MAX_PLAN - planned;
            new.truncate(MAX_PLAN - planned);
            planned += new.len();
            let index = if first_pass {
                found.push((candidates[consumed].clone(), after, Vec::new()));
                found.len() - 1
            } else {
                full_share[consumed]
            };
            consumed += 1;
            if more {
                filled.push(index);
            }
            found[index].2.append(&mut new);
        }
        if first_pass {
            looked_at = consumed;
        } else {
            // Those not read again this pass (the plan filled up) still have more.
            filled.extend_from_slice(&full_share[consumed..]);
        }
        full_share = filled;
        first_pass = false;
    }
    let waiting = full_share
        .iter()
        .map(|&i| found[i].0.clone())
        .chain(candidates[looked_at..].iter().cloned())
        .collect();
    Ok(Round {
        found,
        planned,
        waiting,
    })
}

impl Shared {
    /// The markers `(at, marker, stream)` of one minute's partition written at `since` or later.
    pub(super) async fn markers_in_minute(
        &self,
        minute: i64,
        since: i64,
    ) -> Result<Vec<(i64, Uuid, String)>> {
        let op = "scan feed markers";
        let rows = self
            .select(&self.st.scan_markers, (minute, since), op)
            .await?;
        rows.rows::<(i64, Uuid, String)>()
            .map_err(|e| store_err(op, e))?
            .map(|row| row.map_err(|e| store_err(op, e)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use keel::{RecordedEvent, StreamId};
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Whatever the candidates' backlogs, a round reads for each stream a contiguous run
        /// from its progress, stays within the plan, fills it when enough waits, looks at
        /// every stream when they all fit a minimal share, and wakes every stream it left
        /// events of.
        #[test]
        fn a_round_reads_contiguous_runs_within_the_plan_and_wakes_what_is_left(
            streams in prop::collection::vec((0i64..50, 0usize..1_500, any::<bool>()), 0..80),
        ) {
            let candidates: Vec<String> =
                (0..streams.len()).map(|i| format!("s{i:03}")).collect();
            let of = |name: &str| streams[name[1..].parse::<usize>().unwrap()];
            let known = |name: &str| {
                let (fed, _, cached) = of(name);
                cached.then_some(fed)
            };
            let read = |name: String, after: Option<i64>, max: usize| {
                let (fed, backlog, _) = of(&name);
                let after = after.unwrap_or(fed);
                let events: Vec<RecordedEvent> = (after + 1..=fed + backlog as i64)
                    .take(max)
                    .map(|v| {
                        let event = keel::NewEvent::new("Happened", 1, &b"{}"[..]);
                        RecordedEvent::record(StreamId::new(&name), v as u64, None, event)
                    })
                    .collect();
                std::future::ready(Ok((after, events)))
            };
            let round = futures::executor::block_on(gather(&candidates, known, read)).unwrap();

            let total: usize = streams.iter().map(|s| s.1).sum();
            let read_count: usize = round.found.iter().map(|f| f.2.len()).sum();
            prop_assert_eq!(round.planned, read_count);
            prop_assert_eq!(round.planned, total.min(MAX_PLAN));
            let waiting: HashSet<&String> = round.waiting.iter().collect();
            for (i, (name, after, events)) in round.found.iter().enumerate() {
                let (fed, backlog, _) = of(name);
                prop_assert_eq!(name, &candidates[i], "candidate order");
                prop_assert_eq!(*after, fed);
                let versions: Vec<i64> = events.iter().map(|e| e.version as i64).collect();
                prop_assert_eq!(versions, (fed + 1..=fed + events.len() as i64).collect::<Vec<_>>());
                if events.len() < backlog {
                    prop_assert!(waiting.contains(name), "{} left events unwoken", name);
                }
            }
            for name in &candidates[round.found.len()..] {
                prop_assert!(of(name).1 == 0 || waiting.contains(name), "{} not looked at, not woken", name);
            }
            if total < MAX_PLAN {
                prop_assert!(round.waiting.is_empty(), "nothing left, nobody woken");
            }
            if streams.len() * MIN_SHARE <= MAX_PLAN {
                prop_assert_eq!(round.found.len(), streams.len(), "every stream looked at");
                let share = MAX_PLAN / streams.len().max(1);
                for (name, _, events) in &round.found {
                    prop_assert!(events.len() >= of(name).1.min(share), "{} got less than its share", name);
                }
            }
        }
    }

    #[test]
    fn the_gather_doubles_under_sustained_load_and_resets_when_idle() {
        let ms = Duration::from_millis;
        let (base, max) = (ms(20), ms(160));
        let mut gather = base;
        let mut seen = Vec::new();
        for _ in 0..5 {
            gather = next_gather(gather, true, base, max);
            seen.push(gather.as_millis());
        }
        assert_eq!(seen, [40, 80, 160, 160, 160]);
        assert_eq!(next_gather(gather, false, base, max), base);
        // A ceiling below the base leaves the base; equal ones give a fixed wait.
        assert_eq!(next_gather(base, true, base, ms(5)), base);
        assert_eq!(next_gather(base, true, base, base), base);
    }
}
