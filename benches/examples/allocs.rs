//! Counts the heap allocations of one command through the bus, the repository and the memory
//! store (the `command/keel` benchmark's path), and prints the future sizes that decide which
//! of them the allocator serves from its fast per-thread cache.
//!
//! `cargo run --release -p keel-benches --example allocs`; with `KEEL_ALLOC_TRACE=1` it also
//! prints a backtrace of each allocation of one command on an existing aggregate, with
//! `KEEL_ALLOC_TRACE_FIRST=1` of the command that creates one (the `command` benchmark's
//! usual case). A traced run's counts include the tracing's own allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use keel::doc::Counter;
use keel::{Metadata, Repository};
use keel_benches::{counter_bus, Increment};
use keel_memory::MemoryStore;

/// The system allocator, counting.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Whether this thread prints a backtrace per allocation (and is not already printing one).
    static TRACING: Cell<bool> = const { Cell::new(false) };
}

fn trace(layout: Layout) {
    if TRACING.try_with(|t| t.replace(false)).unwrap_or(false) {
        let backtrace = std::backtrace::Backtrace::force_capture().to_string();
        let frames: Vec<&str> = backtrace
            .lines()
            .filter(|l| !l.trim_start().starts_with("at ") && !l.contains("allocs::"))
            .take(8)
            .collect();
        eprintln!("{} bytes\n{}\n", layout.size(), frames.join("\n"));
        TRACING.with(|t| t.set(true));
    }
}

// SAFETY: every call is forwarded to `System` unchanged; counting and tracing do not touch the
// memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        trace(layout);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const AGGREGATES: u64 = 1_000;

#[tokio::main(flavor = "current_thread")]
async fn main() -> keel::Result<()> {
    let store = || Arc::new(MemoryStore::new());
    let repo = Repository::<Counter>::new(store());
    let meta = Metadata::default();
    println!(
        "future sizes (bytes): Repository::execute_with {}, Repository::load {}",
        std::mem::size_of_val(&repo.execute_with("x", 1, &meta)),
        std::mem::size_of_val(&repo.load("x")),
    );
    measure("aggregate cache on (the default)", repo).await?;
    let uncached = Repository::<Counter>::builder(store())
        .cache(0, None)
        .build();
    measure("aggregate cache off", uncached).await
}

/// Counts one command per aggregate over `AGGREGATES` aggregates, twice: the first creates
/// each stream, the second meets a history of one event.
async fn measure(label: &str, repo: Repository<Counter>) -> keel::Result<()> {
    println!("{label}:");
    let bus = counter_bus(repo);
    let send = |i: u64| {
        bus.send(Increment {
            id: format!("c-{i}"),
            by: 1,
        })
    };
    let first = std::env::var_os("KEEL_ALLOC_TRACE_FIRST").is_some();
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for i in 0..AGGREGATES {
        TRACING.with(|t| t.set(first && i == AGGREGATES / 2));
        send(i).await?;
        TRACING.with(|t| t.set(false));
    }
    let per_first = (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / AGGREGATES as f64;
    println!("  allocations per first command of an aggregate: {per_first:.1}");
    let trace = std::env::var_os("KEEL_ALLOC_TRACE").is_some();
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for i in 0..AGGREGATES {
        let traced = trace && i == AGGREGATES / 2;
        TRACING.with(|t| t.set(traced));
        send(i).await?;
        TRACING.with(|t| t.set(false));
    }
    let per_command = (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / AGGREGATES as f64;
    println!("  allocations per command (the id's format! included): {per_command:.1}");
    Ok(())
}
