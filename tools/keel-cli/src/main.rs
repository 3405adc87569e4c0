//! `keel`: the operator's command for a Keel store on ScyllaDB.
//!
//! ```text
//! keel projections list
//! keel projections status NAME
//! keel projections rebuild NAME        # waits, with a progress bar
//! keel projections pause NAME | resume NAME | reset NAME POSITION
//! keel projections dead-letters NAME
//! keel sagas list [--unfinished] | show ID | retry ID
//! keel health
//! keel stream show ID [--from VERSION]
//! keel subjects show SUBJECT
//! keel subjects shred SUBJECT --yes    # crypto-shredding: deletes the subject's key
//! keel subjects rewrap                 # master key rotation (KEEL_MASTER_KEY, KEEL_PREVIOUS_MASTER_KEYS)
//! keel feed status                     # head, feeder, last heartbeat, unfinished plan
//! keel feed reconcile                  # finds committed events missing from the feed
//! keel feed skip STREAM VERSION --yes  # lets the feed go past a damaged row
//! ```
//!
//! Where: `--nodes host:port,...` (or `KEEL_SCYLLA_NODES`, default `127.0.0.1:9042`) and
//! `--keyspace NAME` (or `KEEL_KEYSPACE`, default `keel`); on a secured cluster
//! `--username`/`--password`, `--tls-ca` (with `--tls-cert`/`--tls-key` for a client
//! certificate), `--local-dc` and `--request-timeout-ms`, each also from its `KEEL_SCYLLA_*`
//! variable (see `docs/scylla.md`). `--json` prints JSON for scripts.
//! Requests (pause, resume, reset, rebuild) are left in the store and carried out by whichever
//! `ProjectionManager` runs the projection. The memory store lives inside its process, so this
//! command works on ScyllaDB only.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures::TryStreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use keel::codec::MasterKey;
use keel::projection::{Control, ProjectionState, ProjectionStatus, ProjectionStore, Request};
use keel::saga::{SagaRecord, SagaStore};
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
    /// User name, for a cluster with PasswordAuthenticator.
    #[arg(long, env = "KEEL_SCYLLA_USERNAME", global = true)]
    username: Option<String>,
    /// Password, with --username.
    #[arg(
        long,
        env = "KEEL_SCYLLA_PASSWORD",
        global = true,
        hide_env_values = true
    )]
    password: Option<String>,
    /// PEM file of the CA that signed the nodes' certificates: connects with TLS.
    #[arg(long, env = "KEEL_SCYLLA_TLS_CA", global = true)]
    tls_ca: Option<std::path::PathBuf>,
    /// PEM file of a client certificate, for nodes that require one (with --tls-key).
    #[arg(long, env = "KEEL_SCYLLA_TLS_CERT", global = true)]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM file of the client certificate's key.
    #[arg(long, env = "KEEL_SCYLLA_TLS_KEY", global = true)]
    tls_key: Option<std::path::PathBuf>,
    /// The data centre to talk to (the others are never used).
    #[arg(long, env = "KEEL_SCYLLA_LOCAL_DC", global = true)]
    local_dc: Option<String>,
    /// Client-side timeout of each request, milliseconds (default 5,000).
    #[arg(long, env = "KEEL_SCYLLA_REQUEST_TIMEOUT_MS", global = true)]
    request_timeout_ms: Option<u64>,
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
    /// Sagas: their state, and an operator's retry of a failed compensation.
    Sagas {
        #[command(subcommand)]
        action: SagaAction,
    },
    /// The store's, the projections' and the sagas' health; exits non-zero when unhealthy.
    Health,
    /// Event streams.
    Stream {
        #[command(subcommand)]
        action: StreamAction,
    },
    /// Encryption subjects (payload codecs): their keys, and forgetting them.
    Subjects {
        #[command(subcommand)]
        action: SubjectAction,
    },
    /// The global feed that projections read.
    Feed {
        #[command(subcommand)]
        action: FeedAction,
    },
}

#[derive(Subcommand)]
enum FeedAction {
    /// The feed's head, the feeder holding the lease, when a feeder was last alive, and
    /// whether a round was left unfinished.
    Status,
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

#[derive(Subcommand)]
enum SubjectAction {
    /// Whether the subject has a key, its id and when it was made (never the key itself).
    Show { subject: String },
    /// Delete the subject's key: every event and snapshot encrypted for it becomes unreadable
    /// for good (crypto-shredding). Irreversible; needs `--yes`.
    Shred {
        subject: String,
        /// Confirms that the subject's data is to be made unreadable for good.
        #[arg(long)]
        yes: bool,
    },
    /// Master key rotation: re-wrap every data key wrapped by a previous master key with the
    /// current one. The master keys come from the environment only (never the command
    /// line): `KEEL_MASTER_KEY` (the new one) and `KEEL_PREVIOUS_MASTER_KEYS` (the old ones,
    /// comma-separated), 64 hex digits each. Exits non-zero when a key opens with none of them.
    Rewrap,
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
enum SagaAction {
    /// Every saga (`--unfinished`: not completed or compensated).
    List {
        #[arg(long)]
        unfinished: bool,
    },
    /// One saga: its steps and history.
    Show { id: String },
    /// Move a saga out of compensation_failed; a running orchestrator compensates it again.
    Retry { id: String },
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
    let connection = keel_scylla::ScyllaConfig {
        nodes: cli.nodes.split(',').map(|n| n.trim().to_owned()).collect(),
        keyspace: Some(cli.keyspace.clone()),
        username: cli.username.clone(),
        password: cli.password.clone(),
        tls_ca_file: cli.tls_ca.clone(),
        tls_cert_file: cli.tls_cert.clone(),
        tls_key_file: cli.tls_key.clone(),
        local_datacenter: cli.local_dc.clone(),
        request_timeout_ms: cli.request_timeout_ms,
        ..Default::default()
    };
    let mut builder = KeelScylla::builder()
        .config(&connection)?
        .create_schema(false)
        .feeder(false);
    if let Command::Subjects {
        action: SubjectAction::Rewrap,
    } = cli.command
    {
        let (current, previous) = master_keys_from_env()?;
        builder = builder.master_key(current).previous_master_keys(previous);
    }
    let store = builder.build().await?;
    match cli.command {
        Command::Projections { action } => projections(&store, action, cli.json).await,
        Command::Sagas { action } => sagas(&store, action, cli.json).await,
        Command::Health => health(&store, cli.json).await,
        Command::Stream {
            action: StreamAction::Show { id, from },
        } => show_stream(&store, &id, from, cli.json).await,
        Command::Subjects { action } => subjects(&store, action, cli.json).await,
        Command::Feed { action } => match action {
            FeedAction::Status => feed_status(&store, cli.json).await,
            FeedAction::Reconcile => reconcile(&store, cli.json).await,
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
        },
    }
}

async fn feed_status(store: &KeelScylla, json: bool) -> Result<(), Box<dyn std::error::Error>> {
    let status = store.feed_status().await?;
    let alive = status.last_alive.map(|d| d.as_secs());
    if json {
        println!(
            "{}",
            serde_json::json!({
                "head": status.head,
                "feeder": status.feeder,
                "epoch": status.epoch,
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
    println!("feed head:  {}", status.head);
    match &status.feeder {
        Some(id) => println!("feeder:     `{id}` (lease epoch {})", status.epoch),
        None => println!("feeder:     none holds the lease: the feed does not advance"),
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
    let found = store.reconcile_feed().await?;
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

async fn subjects(
    store: &KeelScylla,
    action: SubjectAction,
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    match action {
        SubjectAction::Show { subject } => {
            // Read the row itself: showing that a key exists needs no master key.
            let rows = store
                .session()
                .query_unpaged(
                    format!(
                        "SELECT key_id, created_at FROM {}.keys WHERE subject = ?",
                        store.keyspace()
                    ),
                    (&subject,),
                )
                .await?
                .into_rows_result()?;
            let row = rows.maybe_first_row::<(uuid::Uuid, scylla::value::CqlTimestamp)>()?;
            if json {
                let value = match row {
                    Some((id, at)) => serde_json::json!({
                        "subject": subject, "has_key": true, "key_id": id, "created_at": at.0
                    }),
                    None => serde_json::json!({ "subject": subject, "has_key": false }),
                };
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                match row {
                    Some((id, at)) => {
                        println!("subject {subject}: key {id}, created at {} ms", at.0)
                    }
                    None => {
                        println!("subject {subject}: no key (never encrypted for, or shredded)")
                    }
                }
            }
        }
        SubjectAction::Shred { subject, yes } => {
            if !yes {
                return Err(format!(
                    "shredding `{subject}` makes its events unreadable for good; add --yes to do it"
                )
                .into());
            }
            let had = keel::codec::KeyStore::shred(store, &subject).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "subject": subject, "shredded": had })
                );
            } else if had {
                println!("subject {subject}: key deleted; its events can no longer be read");
            } else {
                println!("subject {subject}: had no key; nothing to do");
            }
        }
        SubjectAction::Rewrap => {
            let done = store.rewrap_keys().await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "scanned": done.scanned,
                        "rewrapped": done.rewrapped,
                        "unopenable": done.unopenable,
                    })
                );
            } else {
                println!(
                    "{} data keys looked at, {} rewrapped with the new master key",
                    done.scanned, done.rewrapped
                );
            }
            if !done.unopenable.is_empty() {
                return Err(format!(
                    "{} keys open with none of the master keys given (left as they are): {}",
                    done.unopenable.len(),
                    done.unopenable.join(", ")
                )
                .into());
            }
        }
    }
    Ok(())
}

/// `KEEL_MASTER_KEY` and `KEEL_PREVIOUS_MASTER_KEYS`, for a rotation.
fn master_keys_from_env() -> Result<(MasterKey, Vec<MasterKey>), Box<dyn std::error::Error>> {
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let current = var("KEEL_MASTER_KEY");
    if current.trim().is_empty() {
        return Err(
            "rewrapping needs the new master key in KEEL_MASTER_KEY (64 hex digits)".into(),
        );
    }
    let current = MasterKey::from_hex(&current).map_err(|e| format!("KEEL_MASTER_KEY: {e}"))?;
    let previous = var("KEEL_PREVIOUS_MASTER_KEYS");
    let previous = previous
        .split(',')
        .filter(|k| !k.trim().is_empty())
        .enumerate()
        .map(|(i, k)| {
            MasterKey::from_hex(k)
                .map_err(|e| format!("KEEL_PREVIOUS_MASTER_KEYS, key {}: {e}", i + 1))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if previous.is_empty() {
        return Err(
            "rewrapping needs the old master keys in KEEL_PREVIOUS_MASTER_KEYS (comma-separated)"
                .into(),
        );
    }
    Ok((current, previous))
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
            store.request(&name, Request::new(Control::Rebuild)).await?;
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
    let request = Request::new(control);
    store.request(name, request).await?;
    // The lease holder names the request in its status once it has applied it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let status = status_of(store, name).await?;
        if let Some(applied) = status.last_request.filter(|a| a.id == request.id) {
            return report(
                name,
                &format!(
                    "{control:?} applied by manager {} under lease epoch {}",
                    status.owner, applied.epoch
                ),
                json,
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    report(
        name,
        &format!("{control:?} requested; no manager applied it within 5 s (is one running?): the lease holder takes it on its next step"),
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
    if let Some(r) = &s.last_request {
        println!(
            "last request {:?} ({}) applied at {} ms under lease epoch {}",
            r.control, r.id, r.applied_at, r.epoch
        );
    }
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
            e.recorded_at,
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
fn payload_json(e: &keel::RecordedEvent) -> serde_json::Value {
    match e.json() {
        Ok(json) => serde_json::from_slice(&json).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&json).into_owned())
        }),
        Err(why) => serde_json::json!({ "unreadable": payload_note(&why) }),
    }
}

fn payload_note(error: &keel::Error) -> String {
    match error {
        keel::Error::Decode { reason, .. }
        | keel::Error::Corrupt { reason, .. }
        | keel::Error::Tampered { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

/// A saga as stored, read as JSON: the CLI does not know the application's command types, so
/// it never decodes the steps' commands, only the fields around them.
fn saga_json(record: &SagaRecord) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    Ok(serde_json::from_slice(&record.data)?)
}

fn saga_summary(record: &SagaRecord) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let data = saga_json(record)?;
    let steps: Vec<serde_json::Value> = data["steps"]
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .zip(data["states"].as_array().cloned().unwrap_or_default())
                .map(|(step, state)| serde_json::json!({ "step": step["id"], "state": state }))
                .collect()
        })
        .unwrap_or_default();
    let current = data["current"]
        .as_u64()
        .and_then(|i| data["steps"].get(i as usize))
        .map(|s| s["id"].clone());
    Ok(serde_json::json!({
        "id": record.id,
        "status": record.status.as_str(),
        "revision": record.revision,
        "current_step": if record.status.is_finished() { serde_json::Value::Null } else { current.unwrap_or_default() },
        "failed_step": data["failed_step"],
        "error": data["error"],
        "steps": steps,
        "history": data["history"],
    }))
}

async fn sagas(
    store: &KeelScylla,
    action: SagaAction,
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    match action {
        SagaAction::List { unfinished } => {
            let mut records = store.list_sagas(unfinished).await?;
            records.sort_by(|a, b| a.id.cmp(&b.id));
            let all: Vec<serde_json::Value> =
                records.iter().map(saga_summary).collect::<Result<_, _>>()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
                return Ok(());
            }
            println!("{:<36} {:<20} {:<20} ERROR", "ID", "STATUS", "STEP");
            for s in &all {
                println!(
                    "{:<36} {:<20} {:<20} {}",
                    s["id"].as_str().unwrap_or_default(),
                    s["status"].as_str().unwrap_or_default(),
                    s["current_step"].as_str().unwrap_or("-"),
                    s["error"].as_str().unwrap_or("-")
                );
            }
            println!("{} saga(s)", all.len());
        }
        SagaAction::Show { id } => {
            let record = store
                .load_saga(&id)
                .await?
                .ok_or_else(|| format!("no saga `{id}`"))?;
            let s = saga_summary(&record)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(());
            }
            println!("saga        {id}");
            println!("status      {}", s["status"].as_str().unwrap_or_default());
            println!("revision    {}", record.revision);
            if let Some(step) = s["failed_step"].as_str() {
                println!("failed step {step}");
            }
            if let Some(error) = s["error"].as_str() {
                println!("error       {error}");
            }
            println!("steps:");
            for step in s["steps"].as_array().cloned().unwrap_or_default() {
                println!(
                    "  {:<24} {}",
                    step["step"].as_str().unwrap_or_default(),
                    step["state"].as_str().unwrap_or_default()
                );
            }
            println!("history:");
            for h in s["history"].as_array().cloned().unwrap_or_default() {
                println!(
                    "  {:>14} {:<24} {:<20} {}",
                    h["at"],
                    h["step"].as_str().unwrap_or_default(),
                    h["outcome"].as_str().unwrap_or_default(),
                    h["detail"].as_str().unwrap_or("")
                );
            }
        }
        SagaAction::Retry { id } => {
            let record = store
                .load_saga(&id)
                .await?
                .ok_or_else(|| format!("no saga `{id}`"))?;
            if record.status != keel::saga::SagaStatus::CompensationFailed {
                return Err(format!(
                    "saga `{id}` is {}, not compensation_failed: nothing to retry",
                    record.status.as_str()
                )
                .into());
            }
            let mut data = saga_json(&record)?;
            data["status"] = "compensating".into();
            data["compensation_attempts"] = 0.into();
            let step = data["failed_step"].clone();
            if let Some(history) = data["history"].as_array_mut() {
                history.push(serde_json::json!({
                    "step": step.as_str().unwrap_or_default(),
                    "outcome": "retried",
                    "detail": "an operator asked to retry the compensation (keel sagas retry)",
                    "at": keel::event::now_millis(),
                }));
            }
            let next = SagaRecord {
                revision: record.revision + 1,
                status: keel::saga::SagaStatus::Compensating,
                data: serde_json::to_vec(&data)?.into(),
                ..record.clone()
            };
            if !store.update_saga(&next, record.revision).await? {
                return Err(format!(
                    "saga `{id}` changed meanwhile; look again with `keel sagas show {id}`"
                )
                .into());
            }
            let message =
                "compensating again; a running orchestrator picks it up on its next recovery pass";
            if json {
                println!("{}", serde_json::json!({ "saga": id, "result": message }));
            } else {
                println!("{id}: {message}");
            }
        }
    }
    Ok(())
}

async fn health(store: &KeelScylla, json: bool) -> Result<(), Box<dyn std::error::Error>> {
    use keel::health::Health;
    let mut reports = vec![store.health().await];
    let mut projections = Health::new("projections");
    for s in store.list_status().await? {
        let detail = format!(
            "{}, lag {} events{}",
            state_name(s.state),
            s.lag_events,
            s.last_error
                .map(|e| format!(", last error: {e}"))
                .unwrap_or_default()
        );
        projections.check(
            format!("projection {}", s.name),
            !matches!(s.state, ProjectionState::Failed | ProjectionState::Stalled),
            detail,
        );
    }
    reports.push(projections);
    let mut sagas = Health::new("sagas");
    let stuck: Vec<String> = store
        .list_sagas(true)
        .await?
        .into_iter()
        .filter(|r| r.status == keel::saga::SagaStatus::CompensationFailed)
        .map(|r| r.id)
        .collect();
    sagas.check(
        "compensation_failed",
        stuck.is_empty(),
        format!("{} saga(s) need an operator: {stuck:?}", stuck.len()),
    );
    reports.push(sagas);
    let healthy = reports.iter().all(Health::is_healthy);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "healthy": healthy, "components": reports })
            )?
        );
    } else {
        for r in &reports {
            println!(
                "{} {}",
                if r.is_healthy() { "ok  " } else { "FAIL" },
                r.component
            );
            for c in &r.checks {
                println!(
                    "     {} {:<28} {}",
                    if c.ok { "ok  " } else { "FAIL" },
                    c.name,
                    c.detail
                );
            }
        }
    }
    if healthy {
        Ok(())
    } else {
        Err("unhealthy".into())
    }
}
