//! Keel's example service: an HTTP API over the bank and blog domains, and a projector that
//! keeps the blog's read models, in one process (`--role all`) or two.
//!
//! ```text
//! cargo run --bin service                                   # memory store, both roles
//! cargo run --bin service -- --store scylla --role projector --listen 127.0.0.1:8081
//! cargo run --bin service -- --store scylla --role api
//! ```
//!
//! See the README's "A service in ten minutes" and `docs/operations.md`.

use clap::Parser;
use keel_examples::service::{init_tracing, run, shutdown_signal, Options};

#[tokio::main]
async fn main() {
    let options = Options::parse();
    init_tracing(&options);
    if let Err(e) = run(options, shutdown_signal()).await {
        eprintln!("service: {e}");
        std::process::exit(1);
    }
}
