//! `keel stream`: a stream's events with their metadata.

use clap::Subcommand;
use futures::TryStreamExt;
use keel::{EventStore, StreamId};
use keel_scylla::KeelScylla;

#[derive(Subcommand)]
pub(crate) enum StreamAction {
    /// A stream's events with versions and metadata.
    Show {
        id: String,
        /// First version to show.
        #[arg(long, default_value_t = 1)]
        from: u64,
    },
}

pub(crate) async fn show_stream(
    store: &KeelScylla,
    id: &str,
    from: u64,
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let stream = StreamId::new(id);
    let events: Vec<_> = store.read_stream(&stream, from).try_collect().await?;
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
    for e in &events {
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
