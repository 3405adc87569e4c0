//! The `command_warm` benchmark's timed loop alone, long enough to profile: 100,000
//! aggregates given two events each, then `KEEL_PROFILE_COMMANDS` (default 3,000,000)
//! commands round-robin over them. Prints when the timed loop starts, so that a profiler can
//! skip the setup: `perf record -g -D <ms> target/release/examples/profile_command`.
//!
//! `cargo run --release -p keel-benches --example profile_command`

use std::sync::Arc;
use std::time::Instant;

use keel::doc::Counter;
use keel::Repository;
use keel_benches::{counter_bus, Increment};
use keel_memory::MemoryStore;

const AGGREGATES: u64 = 100_000;

fn main() {
    let commands: u64 = std::env::var("KEEL_PROFILE_COMMANDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3_000_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let repo = Repository::<Counter>::builder(Arc::new(MemoryStore::new()))
            .cache(AGGREGATES as usize, None)
            .build();
        let bus = counter_bus(repo);
        let setup = Instant::now();
        for n in 1..=2 * AGGREGATES {
            let id = format!("c-{}", n % AGGREGATES);
            bus.send(Increment { id, by: 1 })
                .await
                .expect("a setup command");
        }
        eprintln!("setup took {:?}; timed loop starts", setup.elapsed());
        let started = Instant::now();
        for n in 1..=commands {
            let id = format!("c-{}", n % AGGREGATES);
            bus.send(Increment { id, by: 1 }).await.expect("a command");
        }
        let took = started.elapsed();
        eprintln!(
            "{commands} commands in {took:?}: {:?} per command",
            took / commands as u32
        );
        // Exit before dropping the store: freeing millions of events would dominate a profile.
        std::process::exit(0);
    });
}
