//! `keel`: the operator's command for a Keel store on ScyllaDB.
//!
//! ```text
//! keel projections list [--watch]
//! keel projections status NAME
//! keel projections rebuild NAME        # waits, with a progress bar
//! keel projections pause NAME | resume NAME | reset NAME POSITION   # wait for the manager; --no-wait
//! keel dead-letters list NAME | show NAME SLICE:POSITION | replay NAME (SLICE:POSITION | --all) | skip NAME SLICE:POSITION --yes
//! keel sagas list [--unfinished] | show ID | retry ID
//! keel health
//! keel stream show ID [--from VERSION]
//! keel subjects show SUBJECT
//! keel subjects shred SUBJECT --yes    # crypto-shredding: deletes the subject's key
//! keel subjects rewrap                 # master key rotation (KEEL_MASTER_KEY, KEEL_PREVIOUS_MASTER_KEYS)
//! keel feed status [--watch]           # head, feeder, last heartbeat, unfinished plan
//! keel feed reconcile                  # finds committed events missing from the feed
//! keel feed skip STREAM VERSION --yes  # lets the feed go past a damaged row
//! keel feed show [--slice S] [--from N] [--limit K]   # the feed's events by position
//! keel leases list | release NAME --yes   # holders, epochs, TTLs; take one from a hung holder
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
//!
//! Exit codes: 0 done, 1 failed, 2 unhealthy (`keel health`), 3 cannot connect, 64 bad
//! arguments; under `--json` a failure prints `{"error": {"kind", "message", "exit_code"}}`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keel_scylla::KeelScylla;

mod dead_letters;
mod failure;
mod feed;
mod health;
mod leases;
mod progress;
mod projections;
mod sagas;
mod streams;
mod subjects;
mod time;
mod watch;

use dead_letters::{dead_letters, DeadLetterAction};
use failure::Failure;
use feed::{feed, FeedAction};
use health::health;
use leases::{leases, LeaseAction};
use projections::{projections, ProjectionAction};
use sagas::{sagas, SagaAction};
use streams::StreamAction;
use subjects::{master_keys_from_env, subjects, SubjectAction};

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
    /// Events projections skipped under the dead-letter policy: list, show, replay, skip.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Leases: holders, epochs, time to live; taking one from a holder that hangs.
    Leases {
        #[command(subcommand)]
        action: LeaseAction,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    // `--json` decides how even a refused command line is reported.
    let json = std::env::args().any(|a| a == "--json");
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version: not failures.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) if json => return Failure::Usage(e.to_string().trim().to_owned()).report(true),
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(Failure::Usage(String::new()).code());
        }
    };
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(json),
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
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
        .config(&connection)
        .map_err(Failure::of_setup)?
        .create_schema(false)
        .feeder(false);
    if let Command::Subjects {
        action: SubjectAction::Rewrap,
    } = cli.command
    {
        let (current, previous) =
            master_keys_from_env().map_err(|e| Failure::Usage(e.to_string()))?;
        builder = builder.master_key(current).previous_master_keys(previous);
    }
    let store = builder.build().await.map_err(Failure::of_setup)?;
    let done = match cli.command {
        Command::Projections { action } => projections(&store, action, cli.json).await,
        Command::Sagas { action } => sagas(&store, action, cli.json).await,
        Command::Health => health(&store, cli.json).await,
        Command::Stream { action } => streams::stream(&store, action, cli.json).await,
        Command::Subjects { action } => subjects(&store, action, cli.json).await,
        Command::Feed { action } => feed(&store, action, cli.json).await,
        Command::Leases { action } => leases(&store, action, cli.json).await,
        Command::DeadLetters { action } => dead_letters(&store, action, cli.json).await,
    };
    done.map_err(Failure::from)
}
