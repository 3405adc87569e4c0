//! `keel projections`: status, requests to the managers, dead letters.

use std::time::{Duration, Instant};

use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use keel::projection::{Control, ProjectionState, ProjectionStatus, ProjectionStore, Request};
use keel_scylla::KeelScylla;

#[derive(Subcommand)]
pub(crate) enum ProjectionAction {
    /// Every projection's status.
    List {
        /// Print again every second until Ctrl-C.
        #[arg(long)]
        watch: bool,
    },
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
    /// Stop applying events until resumed; waits until the manager has.
    Pause {
        name: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Continue (after a failure: retry the failed event); waits until the manager has.
    Resume {
        name: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Move the checkpoint to a feed position: in every slice, or in the one named by
    /// `--slice`; waits until the manager has.
    Reset {
        name: String,
        position: u64,
        /// Only this slice's checkpoint.
        #[arg(long)]
        slice: Option<u32>,
        #[command(flatten)]
        wait: Wait,
    },
}

/// How long a request waits for the manager that carries it out.
#[derive(clap::Args, Clone, Copy)]
pub(crate) struct Wait {
    /// Only leave the request; do not wait for a manager to act on it.
    #[arg(long)]
    no_wait: bool,
    /// Seconds to wait for the manager before saying that none acted.
    #[arg(long, default_value_t = 10)]
    wait_secs: u64,
}

pub(crate) async fn status_of(
    store: &KeelScylla,
    name: &str,
) -> Result<ProjectionStatus, Box<dyn std::error::Error>> {
    store.load_status(name).await?.ok_or_else(|| {
        format!("no projection `{name}` has published a status in this keyspace").into()
    })
}

pub(crate) async fn projections(
    store: &KeelScylla,
    action: ProjectionAction,
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    match action {
        ProjectionAction::List { watch } => {
            crate::watch::every_second(watch, json, || list(store, json)).await?;
        }
        ProjectionAction::Status { name } => print_status(&status_of(store, &name).await?, json)?,
        ProjectionAction::Pause { name, wait } => {
            request(store, &name, Control::Pause, wait, json).await?
        }
        ProjectionAction::Resume { name, wait } => {
            request(store, &name, Control::Resume, wait, json).await?
        }
        ProjectionAction::Reset {
            name,
            position,
            slice,
            wait,
        } => {
            let control = match slice {
                Some(slice) => Control::ResetSliceTo(slice, position),
                None => Control::ResetTo(position),
            };
            request(store, &name, control, wait, json).await?
        }
        ProjectionAction::Rebuild {
            name,
            no_wait,
            timeout,
        } => rebuild(store, &name, no_wait, timeout, json).await?,
    }
    Ok(())
}

async fn list(store: &KeelScylla, json: bool) -> Result<(), Box<dyn std::error::Error>> {
    let all = store.list_status().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else if all.is_empty() {
        println!("no projections have published a status");
    } else {
        println!(
            "{:<24} {:<11} {:>4} {:>10} {:>8} {:>10}  LAST ERROR",
            "NAME", "STATE", "GEN", "CONSUMED", "LAG", "PROCESSED"
        );
        for s in all {
            println!(
                "{:<24} {:<11} {:>4} {:>10} {:>8} {:>10}  {}",
                s.name,
                state_name(s.state),
                s.generation,
                s.consumed,
                s.lag_events,
                s.processed,
                s.last_error.as_deref().unwrap_or("-")
            );
        }
    }
    Ok(())
}

async fn rebuild(
    store: &KeelScylla,
    name: &str,
    no_wait: bool,
    timeout: u64,
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let before = status_of(store, name).await?;
    store.request(name, Request::new(Control::Rebuild)).await?;
    if no_wait {
        return report(name, "rebuild requested", json);
    }
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(before.head.max(1))
    };
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} events, {per_sec}, eta {eta}")?
            .progress_chars("=> "),
    );
    bar.set_message(format!("rebuilding {name}"));
    let deadline = Instant::now() + Duration::from_secs(timeout);
    loop {
        let now = status_of(store, name).await?;
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
                    "rebuilt {name}: generation {} active, {} event(s) consumed",
                    now.generation, now.consumed
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
            return Err(format!(
                "rebuild of {name} not finished after {timeout} s (is a manager running it?)"
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(crate) async fn request(
    store: &KeelScylla,
    name: &str,
    control: Control,
    wait: Wait,
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    status_of(store, name).await?; // refuse unknown names
    let request = Request::new(control);
    store.request(name, request).await?;
    if wait.no_wait {
        return report(name, &format!("{control:?} requested"), json);
    }
    // The lease holder names the request in its status once it has applied it.
    let deadline = Instant::now() + Duration::from_secs(wait.wait_secs);
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
        &format!(
            "{control:?} requested; no manager applied it within {} s (is one running?): the lease holder takes it on its next step",
            wait.wait_secs
        ),
        json,
    )
}

pub(crate) fn report(
    name: &str,
    message: &str,
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
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

pub(crate) fn state_name(state: ProjectionState) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

pub(crate) fn print_status(
    s: &ProjectionStatus,
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    if json {
        println!("{}", serde_json::to_string_pretty(s)?);
        return Ok(());
    }
    println!("projection   {}", s.name);
    println!("state        {}", state_name(s.state));
    println!("generation   {}", s.generation);
    println!(
        "consumed     {} of {} event(s) in the feed",
        s.consumed, s.head
    );
    println!("lag          {} events, {} ms", s.lag_events, s.lag_ms);
    let behind: Vec<String> = s
        .slice_lag()
        .into_iter()
        .filter(|(_, _, _, lag)| *lag > 0)
        .map(|(slice, done, head, lag)| format!("slice {slice}: {done}/{head} ({lag} behind)"))
        .collect();
    if !behind.is_empty() {
        println!("behind in    {}", behind.join(", "));
    }
    println!("processed    {}", s.processed);
    println!("dead letters {}", s.dead_letters);
    if let Some(e) = &s.failed_event {
        println!(
            "failed on    {} version {} ({}) at position {} of slice {}",
            e.stream, e.version, e.event_type, e.position, e.slice
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
    println!("published    {}", crate::time::rfc3339(s.updated_at));
    if let Some(r) = &s.last_request {
        println!(
            "last request {:?} ({}) applied at {} under lease epoch {}",
            r.control,
            r.id,
            crate::time::rfc3339(r.applied_at),
            r.epoch
        );
    }
    Ok(())
}
