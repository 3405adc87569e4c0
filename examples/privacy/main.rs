//! The right to be forgotten without rewriting history: customers' events are encrypted under
//! a key per customer, and deleting that key (crypto-shredding) makes them unreadable for
//! good, while the log, the other customers and the projections carry on. A customer who
//! closes an account has the stream deleted instead: its events leave the stream's table and
//! the directory hears of it through the deletion's notice.
//!
//! ```text
//! cargo run --example privacy                    # in memory
//! cargo run --example privacy -- --store scylla  # keys and events in ScyllaDB
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use keel::codec::Codec;
use keel::ending::Deletion;
use keel::projection::ProjectionManager;
use keel::{Aggregate, EventStore, RecordedEvent, Repository};
use keel_examples::privacy::{subject_of, Customer, CustomerCommand, Directory};

#[tokio::main]
async fn main() -> Result<(), keel::BoxError> {
    let stores = keel_examples::store::from_args().await?;
    println!("store: {}", stores.name);

    // Customer streams are encrypted with a key per customer (AES-256-GCM); payloads over
    // 512 bytes are compressed first. Every other stream stays plain JSON.
    let codec = Codec::builder()
        .compress_above(512)
        .encrypt_subjects(stores.keys(), subject_of)
        .build();
    let events = codec.events(stores.events());
    let customers = Repository::<Customer>::new(events.clone());

    let register = |name: &str, email: &str| CustomerCommand::Register {
        name: name.to_owned(),
        email: email.to_owned(),
    };
    customers
        .execute("ada", register("Ada Lovelace", "ada@example.com"))
        .await?;
    customers
        .execute("grace", register("Grace Hopper", "grace@example.com"))
        .await?;
    customers
        .execute("linus", register("Linus Pauling", "linus@example.com"))
        .await?;
    customers
        .execute(
            "ada",
            CustomerCommand::ChangeEmail {
                email: "countess@example.com".to_owned(),
            },
        )
        .await?;

    // What the database holds: ciphertext, not names.
    let stored: Vec<RecordedEvent> = stores
        .events()
        .read_stream(&Customer::stream_id("ada"), 1)
        .try_collect()
        .await?;
    let visible = String::from_utf8_lossy(&stored[0].payload).contains("Ada");
    println!(
        "stored `{}` of customer-ada: {} bytes of ciphertext, name visible: {visible}",
        stored[0].event_type,
        stored[0].payload.len()
    );

    // A directory read model, kept by a projection over the decoding store.
    let directory = Arc::new(Directory::default());
    let all = stores.all.clone();
    let manager = ProjectionManager::builder(events.clone(), all.clone(), all.clone(), all)
        .projection(directory.clone())
        .build();
    let lists = |d: &Directory| -> Vec<String> {
        d.entries()
            .into_iter()
            .map(|(_, name, email)| format!("{name} <{email}>"))
            .collect()
    };
    // The ScyllaDB feed trails appends by a moment: catch up until all three events are in.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lists(&directory).contains(&"Ada Lovelace <countess@example.com>".to_owned())
        || lists(&directory).len() < 3
    {
        if Instant::now() > deadline {
            return Err("the directory did not catch up within 30 s".into());
        }
        manager.catch_up(directory_name()).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("directory: {:?}", lists(&directory));

    // Ada asks to be forgotten: delete her key.
    codec.shred("customer:ada").await?;
    match customers.load("ada").await {
        Ok(_) => return Err("ada's events should no longer be readable".into()),
        Err(e) => println!("loading ada now: {e}"),
    }
    let grace = customers.load("grace").await?.state;
    println!(
        "loading grace still works: {:?}",
        grace.name.unwrap_or_default()
    );

    // Linus closes his account: the stream is deleted hard. Appends are refused from now on,
    // its events leave the stream's table once the feed has them, and the directory drops
    // him when the deletion's notice reaches it.
    let closed = events
        .delete_stream(&Customer::stream_id("linus"), Deletion::Hard)
        .await?;
    println!(
        "closed customer-linus: {}, {} event(s) removed",
        closed.info.status, closed.removed
    );
    match customers
        .execute("linus", register("Linus", "l@example.com"))
        .await
    {
        Ok(_) => return Err("a deleted stream should refuse commands".into()),
        Err(e) => println!("a command for linus now: {e}"),
    }

    // Rebuild the directory from the full history: Ada's events are skipped, Linus's deletion
    // replayed after his events, nothing fails.
    let processed = manager.rebuild(directory_name()).await?;
    let status = manager.status(directory_name()).await?;
    println!(
        "rebuilt from {processed} events: {:?}, errors: {:?}",
        status.state, status.last_error
    );
    println!("directory after rebuild: {:?}", lists(&directory));

    manager.stop().await;
    stores.finish().await?;
    Ok(())
}

fn directory_name() -> &'static str {
    "customer_directory"
}
