//! `keel stream`: a stream's events with their metadata, its state, and ending it (delete,
//! truncate, archive).

use clap::Subcommand;
use futures::TryStreamExt;
use keel::ending::{Deletion, Ended};
use keel::{EventStore, StreamId};
use keel_scylla::KeelScylla;

use crate::failure::Failure;

#[derive(Subcommand)]
pub(crate) enum StreamAction {
    /// A stream's events with versions and metadata.
    Show {
        id: String,
        /// First version to show.
        #[arg(long, default_value_t = 1)]
        from: u64,
    },
    /// A stream's version, whether it is open, deleted or archived, and the first version it
    /// holds.
    Info { id: String },
    /// Deletes a stream: appends are refused from now on. `--hard` also removes its events
    /// once the feed has carried them (a feeder must run). Needs `--yes`.
    Delete {
        id: String,
        /// Remove the events too (the feed keeps them; shred a subject to forget data).
        #[arg(long)]
        hard: bool,
        /// Confirms the deletion.
        #[arg(long)]
        yes: bool,
    },
    /// Removes a stream's events before a version that its latest snapshot covers (loads
    /// start from the snapshot). Needs `--yes`.
    Truncate {
        id: String,
        /// The first version to keep.
        #[arg(long)]
        before: u64,
        /// Confirms the truncation.
        #[arg(long)]
        yes: bool,
    },
    /// Closes a stream and moves its events to the archive table. Needs `--yes`.
    Archive {
        id: String,
        /// Confirms the archive.
        #[arg(long)]
        yes: bool,
    },
    /// An archived stream's events, read back from the archive.
    Archived {
        id: String,
        /// First version to show.
        #[arg(long, default_value_t = 1)]
        from: u64,
    },
}

/// Runs a `keel stream` subcommand.
pub(crate) async fn stream(
    store: &KeelScylla,
    action: StreamAction,
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    match action {
        StreamAction::Show { id, from } => show_stream(store, &id, from, json).await,
        StreamAction::Info { id } => {
            let info = store.stream_info(&StreamId::new(&id)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!(
                    "stream {id}: {}, version {}, holds versions from {}",
                    info.status, info.version, info.first_version
                );
            }
            Ok(())
        }
        StreamAction::Delete { id, hard, yes } => {
            let how = if hard { "delete hard" } else { "delete" };
            confirm(yes, &id, how)?;
            let deletion = if hard { Deletion::Hard } else { Deletion::Soft };
            let ended = store.delete_stream(&StreamId::new(&id), deletion).await?;
            report(&ended, json)
        }
        StreamAction::Truncate { id, before, yes } => {
            confirm(yes, &id, "truncate")?;
            let ended = store.truncate_stream(&StreamId::new(&id), before).await?;
            report(&ended, json)
        }
        StreamAction::Archive { id, yes } => {
            confirm(yes, &id, "archive")?;
            let stream = StreamId::new(&id);
            let info = store.stream_info(&stream).await?;
            let total = info.version.saturating_sub(info.first_version);
            let bar = crate::progress::bar(total, "events moved to the archive", json);
            let ended = store
                .archive_stream_with(&stream, &|moved| bar.set_position(moved))
                .await;
            bar.finish_and_clear();
            report(&ended?, json)
        }
        StreamAction::Archived { id, from } => {
            let stream = StreamId::new(&id);
            let events: Vec<_> = store.read_archive(&stream, from).try_collect().await?;
            print_events(&id, from, &events, json)
        }
    }
}

fn confirm(yes: bool, id: &str, what: &str) -> Result<(), Failure> {
    if yes {
        return Ok(());
    }
    Err(Failure::Usage(format!(
        "`{what}` of stream `{id}` cannot be undone: add --yes"
    )))
}

fn report(ended: &Ended, json: bool) -> Result<(), Box<dyn std::error::Error>> {
    if json {
        println!("{}", serde_json::to_string_pretty(ended)?);
        return Ok(());
    }
    let info = &ended.info;
    println!(
        "stream {}: {}, version {}, holds versions from {}; {} event(s) removed{}",
        info.stream,
        info.status,
        info.version,
        info.first_version,
        ended.removed,
        if ended.noticed {
            ""
        } else {
            " (its notice was there already)"
        }
    );
    Ok(())
}

pub(crate) async fn show_stream(
    store: &KeelScylla,
    id: &str,
    from: u64,
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let stream = StreamId::new(id);
    let events: Vec<_> = store.read_stream(&stream, from).try_collect().await?;
    print_events(id, from, &events, json)
}

fn print_events(
    id: &str,
    from: u64,
    events: &[keel::RecordedEvent],
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    if json {
        let rows: Vec<serde_json::Value> = events
            .iter()
            .map(|e| {
                serde_json::json!({
                    "version": e.version,
                    "event_id": e.event_id,
                    "event_type": &*e.event_type,
                    "schema_version": e.schema_version,
                    "recorded_at": e.recorded_at,
                    "metadata": &*e.metadata,
                    "payload": payload_json(e),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if events.is_empty() {
        println!("stream {id}: no events from version {from}");
        return Ok(());
    }
    println!("stream {id}: {} event(s)", events.len());
    for e in events {
        let mut meta = Vec::new();
        if let Some(c) = e.metadata.correlation_id {
            meta.push(format!("correlation={c}"));
        }
        if let Some(c) = e.metadata.causation_id {
            meta.push(format!("causation={c}"));
        }
        meta.extend(e.metadata.user.iter().map(|(k, v)| format!("{k}={v}")));
        println!(
            "  v{:<6} {:<20} schema v{}  id {}  at {}  {}",
            e.version,
            e.event_type,
            e.schema_version,
            e.event_id,
            crate::time::rfc3339(e.recorded_at),
            if meta.is_empty() {
                String::new()
            } else {
                meta.join(" ")
            }
        );
        match e.json() {
            Ok(json) => println!("          {}", String::from_utf8_lossy(&json)),
            Err(why) => println!("          <{}>", payload_note(&why)),
        }
    }
    Ok(())
}

/// The payload as JSON: decompressed if need be; encrypted ones as a note, never bytes.
pub(crate) fn payload_json(e: &keel::RecordedEvent) -> serde_json::Value {
    match e.json() {
        Ok(json) => serde_json::from_slice(&json).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&json).into_owned())
        }),
        Err(why) => serde_json::json!({ "unreadable": payload_note(&why) }),
    }
}

pub(crate) fn payload_note(error: &keel::Error) -> String {
    match error {
        keel::Error::Decode { reason, .. }
        | keel::Error::Corrupt { reason, .. }
        | keel::Error::Tampered { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}
