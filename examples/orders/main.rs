//! An order saga across three aggregates: reserve stock, place the order, charge the card,
//! confirm. One order completes; one is declined at the card and undone in reverse.
//!
//! ```text
//! cargo run --example orders                    # in memory
//! cargo run --example orders -- --store scylla  # saga state in ScyllaDB
//! ```

use std::time::Duration;

use keel::saga::SagaOrchestrator;
use keel::Repository;
use keel_examples::orders::{command_bus, order_saga, Inventory, InventoryEvent};

#[tokio::main]
async fn main() -> Result<(), keel::BoxError> {
    let stores = keel_examples::store::from_args().await?;
    println!("store: {}", stores.name);
    let bus = command_bus(stores.events())?;
    let sagas = SagaOrchestrator::builder(stores.sagas(), stores.leases(), bus)
        .retry_backoff(Duration::from_millis(50))
        .build();

    let stock = Repository::<Inventory>::new(stores.events());
    stock
        .execute("widget", InventoryEvent::Restocked { units: 10 })
        .await?;
    let on_hand = |s: &Repository<Inventory>| {
        let s = s.clone();
        async move { s.load("widget").await.map(|l| l.state.on_hand) }
    };
    println!("widgets on hand: {}", on_hand(&stock).await?);

    // 3 widgets for 300: within the card's limit of 500.
    let first = format!("order-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let state = sagas
        .start_saga(&first, order_saga(&first, "widget", 3, "card-ada", 300))
        .await?;
    println!("order {first}: {}", state.status.as_str());
    println!("widgets on hand: {}", on_hand(&stock).await?);

    // 2 widgets for 400: the card has 300 on it already, so the charge is declined and the
    // saga undoes what it did (cancels the order, releases the stock), last step first.
    let second = format!("order-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let state = sagas
        .start_saga(&second, order_saga(&second, "widget", 2, "card-ada", 400))
        .await?;
    println!("order {second}: {}", state.status.as_str());
    println!(
        "  failed at {}: {}",
        state.failed_step.unwrap_or_default(),
        state.error.unwrap_or_default()
    );
    for step in state.history.iter().filter(|h| h.outcome == "compensated") {
        println!("  undid {}", step.step);
    }
    let left = on_hand(&stock).await?;
    println!("widgets on hand: {left}");
    if left != 7 {
        return Err(format!("expected 7 widgets on hand, found {left}").into());
    }
    println!("stock is back where the second order found it");
    stores.finish().await
}
