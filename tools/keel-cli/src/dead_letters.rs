//! `keel dead-letters`: the events a projection skipped under the dead-letter policy; shown,
//! replayed through the projection's manager, or skipped for good.

use clap::Subcommand;
use futures::TryStreamExt;
use keel::projection::{Control, DeadLetter, ProjectionStore};
use keel::EventStore;
use keel_scylla::KeelScylla;

use crate::failure::Failure;
use crate::projections::{report, request, Wait};

#[derive(Subcommand)]
pub(crate) enum DeadLetterAction {
    /// A projection's dead letters, oldest first.
    List { projection: String },
    /// One dead letter, with its event's payload.
    Show {
        projection: String,
        /// The event's place in the feed, `SLICE:POSITION` (as `list` shows it).
        at: String,
    },
    /// Has the projection's manager apply dead letters' events again (one, or `--all`):
    /// those that apply now are removed, the others stay with their new error.
    Replay {
        projection: String,
        /// `SLICE:POSITION` of the one to replay.
        at: Option<String>,
        /// Replay every dead letter of the projection.
        #[arg(long, conflicts_with = "at")]
        all: bool,
        #[command(flatten)]
        wait: Wait,
    },
    /// Removes a dead letter without applying its event. Needs `--yes`.
    Skip {
        projection: String,
        /// `SLICE:POSITION` of the one to skip.
        at: String,
        /// Confirms that the projection never gets this event.
        #[arg(long)]
        yes: bool,
    },
}

/// `SLICE:POSITION`.
fn place(at: &str) -> Result<(u32, u64), Failure> {
    let bad = || Failure::Usage(format!("`{at}` is not SLICE:POSITION (say `3:117`)"));
    let (slice, position) = at.split_once(':').ok_or_else(bad)?;
    Ok((
        slice.trim().parse().map_err(|_| bad())?,
        position.trim().parse().map_err(|_| bad())?,
    ))
}

fn line(l: &DeadLetter) -> String {
    format!(
        "{}:{}  {} v{} {}  at {}: {}",
        l.event.slice,
        l.event.position,
        l.event.stream,
        l.event.version,
        l.event.event_type,
        crate::time::rfc3339(l.at),
        l.error
    )
}

async fn find(
    store: &KeelScylla,
    projection: &str,
    at: (u32, u64),
) -> Result<DeadLetter, Box<dyn std::error::Error>> {
    store
        .dead_letters(projection)
        .await?
        .into_iter()
        .find(|l| (l.event.slice, l.event.position) == at)
        .ok_or_else(|| {
            format!(
                "projection `{projection}` has no dead letter at {}:{}",
                at.0, at.1
            )
            .into()
        })
}

pub(crate) async fn dead_letters(
    store: &KeelScylla,
    action: DeadLetterAction,
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    match action {
        DeadLetterAction::List { projection } => {
            let letters = store.dead_letters(&projection).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&letters)?);
            } else {
                for l in &letters {
                    println!("{}", line(l));
                }
                println!("{} dead letter(s)", letters.len());
            }
        }
        DeadLetterAction::Show { projection, at } => {
            let letter = find(store, &projection, place(&at)?).await?;
            let mut events = store.read_slice(letter.event.slice, letter.event.position);
            let event = events
                .try_next()
                .await?
                .filter(|e| e.position == Some(letter.event.position));
            let payload = event.as_ref().map(|e| match e.json() {
                Ok(json) => String::from_utf8_lossy(&json).into_owned(),
                Err(why) => format!("<unreadable: {why}>"),
            });
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "letter": letter, "payload": payload,
                    }))?
                );
            } else {
                println!("{}", line(&letter));
                match payload {
                    Some(p) => println!("  {p}"),
                    None => println!("  <the feed no longer holds this event>"),
                }
            }
        }
        DeadLetterAction::Replay {
            projection,
            at,
            all,
            wait,
        } => {
            let control = match (at, all) {
                (Some(at), _) => {
                    let (slice, position) = place(&at)?;
                    find(store, &projection, (slice, position)).await?;
                    Control::ReplayDeadLetter(slice, position)
                }
                (None, true) => Control::ReplayDeadLetters,
                (None, false) => {
                    return Err(Box::new(Failure::Usage(
                        "name the dead letter (SLICE:POSITION) or say --all".into(),
                    )))
                }
            };
            request(store, &projection, control, wait, json).await?;
        }
        DeadLetterAction::Skip {
            projection,
            at,
            yes,
        } => {
            let (slice, position) = place(&at)?;
            if !yes {
                return Err(Box::new(Failure::Usage(format!(
                    "skipping means `{projection}` never gets the event at {at}: add --yes"
                ))));
            }
            let removed = store
                .remove_dead_letter(&projection, slice, position)
                .await?;
            if removed == 0 {
                return Err(format!("projection `{projection}` has no dead letter at {at}").into());
            }
            report(&projection, &format!("dead letter {at} skipped"), json)?;
        }
    }
    Ok(())
}
