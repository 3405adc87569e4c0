//! `keel feed`: the feed's status, reconciliation, and skipping a damaged row.

use clap::Subcommand;
use futures::TryStreamExt;
use keel::{EventStore, StreamId};
use keel_scylla::KeelScylla;
use serde::Serialize;

/// One event of the feed, as `keel feed show` prints it.
#[derive(Serialize)]
struct FeedEntry {
    slice: u32,
    position: u64,
    stream: String,
    version: u64,
    event_type: String,
    /// Milliseconds since the epoch.
    recorded_at: i64,
}

async fn show(
    store: &KeelScylla,
    slice: Option<u32>,
    from: u64,
    limit: usize,
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let slices = store.feed_slices();
    let wanted: Vec<u32> = match slice {
        Some(s) if s >= slices => {
            return Err(Box::new(crate::failure::Failure::Usage(format!(
                "the feed has {slices} slice(s), 0 to {}: there is no slice {s}",
                slices - 1
            ))))
        }
        Some(s) => vec![s],
        None => (0..slices).collect(),
    };
    let mut entries = Vec::new();
    for s in wanted {
        let mut events = store.read_slice(s, from.max(1));
        while entries.len() < limit {
            let Some(e) = events.try_next().await? else {
                break;
            };
            entries.push(FeedEntry {
                slice: s,
                position: e.position.unwrap_or_default(),
                stream: e.stream.to_string(),
                version: e.version,
                event_type: e.event_type.to_string(),
                recorded_at: e.recorded_at,
            });
        }
        if entries.len() >= limit {
            break;
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    println!(
        "{:>5} {:>9}  {:<24} {:>7}  {:<20} RECORDED",
        "SLICE", "POSITION", "STREAM", "VERSION", "TYPE"
    );
    for e in &entries {
        println!(
            "{:>5} {:>9}  {:<24} {:>7}  {:<20} {}",
            e.slice,
            e.position,
            e.stream,
            e.version,
            e.event_type,
            crate::time::rfc3339(e.recorded_at)
        );
    }
    println!("{} event(s)", entries.len());
    Ok(())
}

#[derive(Subcommand)]
pub(crate) enum FeedAction {
    /// The feed's heads, the feeders and the slices each holds, when a feeder was last alive,
    /// and whether a round was left unfinished; `--slices` lists every slice.
    Status {
        /// One line per slice: its head, feeder and lease epoch.
        #[arg(long)]
        slices: bool,
        /// Print again every second until Ctrl-C.
        #[arg(long)]
        watch: bool,
    },
    /// The feed's events by position: one slice's from `--from`, or every slice's in turn.
    Show {
        /// The slice to read (default: every slice, in order).
        #[arg(long)]
        slice: Option<u32>,
        /// The first position to show, in each slice read.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// At most this many events.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Compare every stream's head with the feed and mark the streams that are behind, so the
    /// running feeder publishes their missing events. Needed after writers ran for over an
    /// hour with no feeder anywhere (their markers expired). Reads every stream's head.
    Reconcile,
    /// Let the feed go past a version it cannot carry (a damaged row `feed status` lists
    /// as stuck): the feed will never hold that event. Repair the row instead where you can.
    /// Needs `--yes`.
    Skip {
        /// The stream held back.
        stream: String,
        /// The version to leave out of the feed.
        version: u64,
        /// Confirms that the event is to be left out of the feed for good.
        #[arg(long)]
        yes: bool,
    },
}

async fn feed_status(
    store: &KeelScylla,
    json: bool,
    per_slice: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let status = store.feed_status().await?;
    let alive = status.last_alive.map(|d| d.as_secs());
    if json {
        println!(
            "{}",
            serde_json::json!({
                "head": status.head,
                "members": status.members,
                "held_by": status.held_by(),
                "unheld": status.unheld(),
                "slices": status.slices.iter().map(|s| serde_json::json!({
                    "slice": s.slice,
                    "head": s.head,
                    "feeder": s.feeder,
                    "epoch": s.epoch,
                    "unfinished_plan": s.unfinished_plan,
                })).collect::<Vec<_>>(),
                "last_alive_seconds_ago": alive,
                "unfinished_plan": status.unfinished_plan,
                "stuck": status.stuck.iter().map(|l| serde_json::json!({
                    "stream": l.event.stream,
                    "version": l.event.version,
                    "reason": l.error,
                })).collect::<Vec<_>>(),
            })
        );
        return Ok(());
    }
    let slices = status.slices.len();
    println!("feed head:  {} event(s) in {slices} slice(s)", status.head);
    for (feeder, held) in status.held_by() {
        println!("feeder:     `{feeder}` holds {held} of {slices} slice(s)");
    }
    let unheld = status.unheld();
    if unheld.len() == slices {
        println!("feeder:     none holds a slice lease: the feed does not advance");
    } else if !unheld.is_empty() {
        println!(
            "unheld:     {} slice(s) without a feeder, not advancing: {unheld:?}",
            unheld.len()
        );
    }
    println!(
        "members:    {} process(es) run a feeder",
        status.members.len()
    );
    if per_slice {
        println!("{:>6} {:>12} {:>6}  FEEDER", "SLICE", "HEAD", "EPOCH");
        for s in &status.slices {
            println!(
                "{:>6} {:>12} {:>6}  {}",
                s.slice,
                s.head,
                s.epoch,
                s.feeder.as_deref().unwrap_or("-")
            );
        }
    }
    match alive {
        Some(s) => println!("last alive: {s} s ago"),
        None => println!("last alive: not in the last 55 minutes"),
    }
    if status.unfinished_plan > 0 {
        println!(
            "unfinished: a round for {} stream(s); the next feeder finishes it first",
            status.unfinished_plan
        );
    }
    for letter in &status.stuck {
        println!(
            "stuck:      `{}` version {}: {} (other streams go on; repair the row, or `keel feed skip`)",
            letter.event.stream, letter.event.version, letter.error
        );
    }
    Ok(())
}

async fn reconcile(store: &KeelScylla, json: bool) -> Result<(), Box<dyn std::error::Error>> {
    let bar = crate::progress::counter("event partitions looked at", json);
    let found = store.reconcile_feed_with(&|n| bar.set_position(n)).await?;
    bar.finish_and_clear();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "partitions": found.partitions,
                "lagging": found.lagging,
                "unfed_events": found.unfed_events,
            })
        );
    } else if found.lagging.is_empty() {
        println!(
            "looked at {} event partition(s): the feed has every committed event",
            found.partitions
        );
    } else {
        println!(
            "looked at {} event partition(s): {} stream(s) had {} event(s) missing from the feed",
            found.partitions,
            found.lagging.len(),
            found.unfed_events
        );
        for stream in &found.lagging {
            println!("  {stream}");
        }
        println!("marked for the feeder: the process holding the feeder lease publishes them");
    }
    Ok(())
}

/// Runs one `keel feed` action.
pub(crate) async fn feed(
    store: &KeelScylla,
    action: FeedAction,
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    match action {
        FeedAction::Status { slices, watch } => {
            crate::watch::every_second(watch, json, || feed_status(store, json, slices)).await
        }
        FeedAction::Show { slice, from, limit } => show(store, slice, from, limit, json).await,
        FeedAction::Reconcile => reconcile(store, json).await,
        FeedAction::Skip {
            stream,
            version,
            yes,
        } => {
            if !yes {
                return Err(format!(
                    "skipping leaves `{stream}` version {version} out of the feed for good: add --yes"
                )
                .into());
            }
            store.skip_in_feed(&StreamId::new(&stream), version).await?;
            println!("the feed goes on past `{stream}` version {version}");
            Ok(())
        }
    }
}
