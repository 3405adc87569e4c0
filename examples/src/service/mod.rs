//! Keel in a long-running service: an HTTP API over the bank and blog domains, and a
//! projector that keeps the blog's read models, in one process or two.
//!
//! ```text
//! cargo run --bin service                                   # API and projector, memory store
//! cargo run --bin service -- --store scylla --role projector --listen 127.0.0.1:8081
//! cargo run --bin service -- --store scylla --role api      --listen 127.0.0.1:8080
//! ```
//!
//! - [`app`]: what a process holds for its role (buses, read models, components).
//! - [`routes`]: the HTTP endpoints.
//! - [`errors`]: the one place where Keel's errors become HTTP statuses.
//! - [`throttle`]: a cap on a rebuild's rate.
//!
//! [`run`] serves until SIGTERM or Ctrl-C, then stops taking requests, finishes those in
//! hand, and stops the components (the projection manager checkpoints and lets its leases
//! go, the feeder hands its slices to the other processes), all within
//! `--shutdown-timeout-ms`.

pub mod app;
pub mod errors;
pub mod routes;
pub mod throttle;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

pub use app::App;

/// What renders `/metrics`: the Prometheus recorder's handle (feature `prometheus`).
#[cfg(feature = "prometheus")]
pub type Metrics = metrics_exporter_prometheus::PrometheusHandle;
/// Without the `prometheus` feature there is no recorder: `/metrics` answers 404.
#[cfg(not(feature = "prometheus"))]
pub type Metrics = std::convert::Infallible;

/// What a process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Commands and queries over HTTP; no projection manager, no feeder.
    Api,
    /// The projection manager and the feeder; HTTP only for `/health`, `/metrics` and
    /// `/projections`.
    Projector,
    /// Both, in one process (the only role the memory store allows).
    All,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Api => "api",
            Role::Projector => "projector",
            Role::All => "all",
        })
    }
}

/// Where the events are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// In this process (gone when it exits).
    Memory,
    /// ScyllaDB (or Cassandra) at `KEEL_SCYLLA_NODES`, default `127.0.0.1:9042`.
    Scylla,
}

impl StoreKind {
    /// Its name in `/health`.
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Memory => "memory",
            StoreKind::Scylla => "scylla",
        }
    }
}

/// The service's command line. The ScyllaDB connection itself (nodes, credentials, TLS) is
/// read from the `KEEL_SCYLLA_*` variables (`keel_scylla::ScyllaConfig::from_env`).
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "service",
    about = "Keel's example service: an HTTP API and a projector"
)]
pub struct Options {
    /// Where events are kept.
    #[arg(long, value_enum, default_value = "memory")]
    pub store: StoreKind,
    /// What this process runs.
    #[arg(long, value_enum, default_value = "all")]
    pub role: Role,
    /// The address to serve HTTP on (port 0: any free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// The keyspace on ScyllaDB (created if missing; every process of a service names the same).
    #[arg(long, env = "KEEL_KEYSPACE", default_value = "keel_service")]
    pub keyspace: String,
    /// This process's name in leases and status (a random suffix is added).
    #[arg(long, default_value = "service")]
    pub name: String,
    /// Lease time to live of the projection manager and the feeder, milliseconds: how long a
    /// process that died without stopping keeps its work from the others.
    #[arg(long, default_value_t = 10_000)]
    pub lease_ttl_ms: u64,
    /// A rebuild applies at most this many events per second (0: no cap), leaving the
    /// database to the live traffic.
    #[arg(long, default_value_t = 0)]
    pub rebuild_rate: u32,
    /// The longest a read with `?after=` waits for its write, milliseconds.
    #[arg(long, default_value_t = 5_000)]
    pub wait_limit_ms: u64,
    /// How long a shutdown may take before the process gives up on it, milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub shutdown_timeout_ms: u64,
    /// Logs as JSON lines instead of text (the filter is `RUST_LOG`, default `info`).
    #[arg(long, env = "KEEL_LOG_JSON")]
    pub log_json: bool,
    /// Also logs each span as it closes, with its time: a request's `http` span, and inside
    /// it the bus's `keel.dispatch` span of its command or query.
    #[arg(long, env = "KEEL_LOG_SPANS")]
    pub log_spans: bool,
}

/// Installs the `tracing` subscriber: `RUST_LOG` filters (default `info`), text or JSON
/// (`options.log_json`), spans logged as they close (`options.log_spans`).
pub fn init_tracing(options: &Options) {
    use tracing_subscriber::fmt::format::FmtSpan;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let spans = if options.log_spans {
        FmtSpan::CLOSE
    } else {
        FmtSpan::NONE
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(spans)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if options.log_json {
        builder.json().with_current_span(true).init();
    } else {
        builder.init();
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C: shutting down"),
        _ = term => tracing::info!("SIGTERM: shutting down"),
    }
}

/// Serves `options` until `shutdown` resolves, then shuts down within the configured bound.
/// Prints `listening on http://ADDR` (and the manager's id) on stdout once it answers.
pub async fn run(
    options: Options,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), keel::BoxError> {
    #[cfg(feature = "prometheus")]
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .ok();
    #[cfg(not(feature = "prometheus"))]
    let metrics = None;
    let app = Arc::new(App::build(&options, metrics).await?);
    let listener = tokio::net::TcpListener::bind(&options.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", options.listen))?;
    let address = listener.local_addr()?;
    app.components.start();
    println!(
        "keel service: role {}, store {}, manager {}",
        app.role, app.store_name, app.manager_id
    );
    println!("listening on http://{address}");
    tracing::info!(%address, role = %app.role, store = app.store_name, "serving");

    // Stop taking requests on the signal and finish those in hand; then stop the components
    // (what consumes first), so leases are released before the process exits.
    let (stopping, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, routes::router(app.clone())).with_graceful_shutdown(async {
        let _ = stopped.await;
    });
    let server = tokio::spawn(async move { server.await });
    shutdown.await;
    let bound = Duration::from_millis(options.shutdown_timeout_ms);
    let _ = stopping.send(());
    let drained = tokio::time::timeout(bound, async {
        let _ = server.await;
        app.components.shutdown().await;
    })
    .await;
    match drained {
        Ok(()) => {
            tracing::info!("stopped");
            println!("stopped");
            Ok(())
        }
        Err(_) => Err(format!("shutdown took longer than {bound:?}; exiting anyway").into()),
    }
}
