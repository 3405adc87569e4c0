//! `keel`: the operator's command for a Keel store on ScyllaDB.
//!
//! ```text
//! keel projections list
//! keel projections status NAME
//! keel projections rebuild NAME        # waits, with a progress bar
//! keel projections pause NAME | resume NAME | reset NAME POSITION
//! keel projections dead-letters NAME
//! keel stream show ID [--from VERSION]
//! ```
//!
//! Where: `--nodes host:port,...` (or `KEEL_SCYLLA_NODES`, default `127.0.0.1:9042`) and
//! `--keyspace NAME` (or `KEEL_KEYSPACE`, default `keel`). `--json` prints JSON for scripts.
//! Requests (pause, resume, reset, rebuild) are left in the store and carried out by whichever
//! `ProjectionManager` runs the projection. The memory store lives inside its process, so this
//! command works on ScyllaDB only.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures::TryStreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use keel::projection::{Control, ProjectionState, ProjectionStatus, ProjectionStore};
use keel::{EventStore, StreamId};
use keel_scylla::KeelScylla;

#[derive(Parser)]
#[command(
    name = "keel",
    version,
    about = "Operate a Keel store on ScyllaDB: projections and streams"
)]
struct Cli {
    /// CQL nodes, comma-separated.
    #[arg(
        long,
        env = "KEEL_SCYLLA_NODES",
        default_value = "127.0.0.1:9042",
        global = true
    )]
    nodes: String,
    /// The keyspace holding the Keel store.
    #[arg(long, env = "KEEL_KEYSPACE", default_value = "keel", global = true)]
    keyspace: String,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Projections: their status, and requests to their managers.
    Projections {
        #[command(subcommand)]
        action: ProjectionAction,
    },
    /// Event streams.
    Stream {
        #[command(subcommand)]
        action: StreamAction,
    },
}

#[derive(Subcommand)]
enum ProjectionAction {
    /// Every projection's status.
    List,
    /// One projection's status.
    Status { name: String },
    /// Rebuild from the full history (blue/green) and wait until the new generation is active.
    Rebuild {
        name: String,
        /// Only leave the request; do not wait.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Stop applying events until resumed.
    Pause { name: String },
    /// Continue (after a failure: retry the failed event).
    Resume { name: String },
    /// Move the checkpoint to a feed position.
    Reset { name: String, position: u64 },
    /// Events skipped under the dead-letter policy.
    DeadLetters { name: String },
}

#[derive(Subcommand)]
enum StreamAction {
    /// A stream's events with versions and metadata.
    Show {
        id: String,
        /// First version to show.
        #[arg(long, default_value_t = 1)]
        from: u64,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keel: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let store = KeelScylla::builder()
        .known_nodes(cli.nodes.split(','))
        .keyspace(&cli.keyspace)
        .create_schema(false)
        .feeder(false)
        .build()
        .await?;
    match cli.command {
        Command::Projections { action } => projections(&store, action, cli.json).await,
        Command::Stream {
            action: StreamAction::Show { id, from },
        } => show_stream(&store, &id, from, cli.json).await,
    }
}

async fn status_of(
    store: &KeelScylla,
    name: &str,
) -> Result<ProjectionStatus, Box<dyn std::error::Error>> {
    store.load_status(name).await?.ok_or_else(|| {
        format!("no projection `{name}` has published a status in this keyspace").into()
    })
}

async fn projections(
    store: &KeelScylla,
    action: ProjectionAction,
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    match action {
        ProjectionAction::List => {
            let all = store.list_status().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if all.is_empty() {
                println!("no projections have published a status");
            } else {
                println!(
                    "{:<24} {:<11} {:>4} {:>10} {:>8} {:>10}  LAST ERROR",
                    "NAME", "STATE", "GEN", "CHECKPOINT", "LAG", "PROCESSED"
                );
                for s in all {
                    println!(
                        "{:<24} {:<11} {:>4} {:>10} {:>8} {:>10}  {}",
                        s.name,
                        state_name(s.state),
                        s.generation,
                        s.checkpoint,
                        s.lag_events,
                        s.processed,
                        s.last_error.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        ProjectionAction::Status { name } => print_status(&status_of(store, &name).await?, json)?,
        ProjectionAction::Pause { name } => request(store, &name, Control::Pause, json).await?,
        ProjectionAction::Resume { name } => request(store, &name, Control::Resume, json).await?,
        ProjectionAction::Reset { name, position } => {
            request(store, &name, Control::ResetTo(position), json).await?
        }
        ProjectionAction::DeadLetters { name } => {
            let letters = store.dead_letters(&name).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&letters)?);
            } else {
                for l in &letters {
                    println!(
                        "{} v{} {} at position {}: {}",
                        l.event.stream,
                        l.event.version,
                        l.event.event_type,
                        l.event.position,
                        l.error
                    );
                }
                println!("{} dead letter(s)", letters.len());
            }
        }
        ProjectionAction::Rebuild {
            name,
            no_wait,
            timeout,
        } => {
            let before = status_of(store, &name).await?;
            store.request(&name, Control::Rebuild).await?;
            if no_wait {
                return report(&name, "rebuild requested", json);
            }
            let bar = if json {
                ProgressBar::hidden()
            } else {
                ProgressBar::new(before.head.max(1))
            };
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:40}] {pos}/{len} events, {per_sec}, eta {eta}",
                )?
                .progress_chars("=> "),
            );
            bar.set_message(format!("rebuilding {name}"));
            let deadline = Instant::now() + Duration::from_secs(timeout);
            loop {
                let now = status_of(store, &name).await?;
                if let Some(r) = &now.rebuild {
                    bar.set_length(r.total.max(r.done));
                    bar.set_position(r.done);
                }
                if now.generation > before.generation && now.rebuild.is_none() {
                    bar.finish_and_clear();
                    if json {
                        println!("{}", serde_json::to_string_pretty(&now)?);
                    } else {
                        println!(
                            "rebuilt {name}: generation {} active, checkpoint {}",
                            now.generation, now.checkpoint
                        );
                    }
                    return Ok(());
                }
                if now.state == ProjectionState::Failed {
                    bar.abandon();
                    return Err(format!(
                        "rebuild of {name} failed: {}",
                        now.last_error.unwrap_or_default()
                    )
                    .into());
                }
                if Instant::now() > deadline {
                    bar.abandon();
                    return Err(format!("rebuild of {name} not finished after {timeout} s (is a manager running it?)").into());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    Ok(())
}

async fn request(
    store: &KeelScylla,
    name: &str,
    control: Control,
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    status_of(store, name).await?; // refuse unknown names
    store.request(name, control).await?;
    report(
        name,
        &format!("{control:?} requested; the manager running it picks it up on its next step"),
        json,
    )
}

fn report(name: &str, message: &str, json: bool) -> Result<(), Box<dyn std::error::Error>> {
    if json {
        println!(
            "{}",
            serde_json::json!({ "projection": name, "result": message })
        );
    } else {
        println!("{name}: {message}");
    }
    Ok(())
}

fn state_name(state: ProjectionState) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn print_status(s: &ProjectionStatus, json: bool) -> Result<(), Box<dyn std::error::Error>> {
    if json {
        println!("{}", serde_json::to_string_pretty(s)?);
        return Ok(());
    }
    println!("projection   {}", s.name);
    println!("state        {}", state_name(s.state));
    println!("generation   {}", s.generation);
    println!("checkpoint   {} (feed head {})", s.checkpoint, s.head);
    println!("lag          {} events, {} ms", s.lag_events, s.lag_ms);
    println!("processed    {}", s.processed);
    println!("dead letters {}", s.dead_letters);
    if let Some(e) = &s.failed_event {
        println!(
            "failed on    {} version {} ({}) at position {}",
            e.stream, e.version, e.event_type, e.position
        );
    }
    if let Some(e) = &s.last_error {
        println!("last error   {e}");
    }
    if let Some(r) = &s.rebuild {
        println!(
            "rebuilding   generation {}: {}/{} events, {:.0}/s, eta {:.0} s",
            r.generation, r.done, r.total, r.rate, r.eta_secs
        );
    }
    println!("owner        {}", s.owner);
    Ok(())
}

async fn show_stream(
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
                    "payload": serde_json::from_slice::<serde_json::Value>(&e.payload)
                        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&e.payload).into_owned())),
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
            e.recorded_at,
            if meta.is_empty() {
                String::new()
            } else {
                meta.join(" ")
            }
        );
        println!("          {}", String::from_utf8_lossy(&e.payload));
    }
    Ok(())
}
