//! Keel's metrics on a Prometheus endpoint: run a few commands, then scrape the endpoint and
//! print the `keel_*` lines.
//!
//! ```text
//! cargo run --example prometheus
//! ```

use keel::bus::{MetricsLayer, TraceLayer};
use keel::{Command, CommandBus, Repository};
use keel_examples::bank::{Account, AccountCommand};

#[derive(Clone, Debug)]
struct Deposit {
    id: String,
    amount: u64,
}

impl Command for Deposit {
    type Output = u64;
}

#[tokio::main]
async fn main() -> Result<(), keel::BoxError> {
    let addr = keel_examples::metrics::serve_prometheus().await?;
    println!("metrics on http://{addr}/metrics");

    let store = std::sync::Arc::new(keel_memory::MemoryStore::new());
    let accounts = Repository::<Account>::new(store);
    accounts
        .execute(
            "acc-1",
            AccountCommand::Open {
                owner: "Ada".into(),
                initial: 0,
            },
        )
        .await?;
    let bus = CommandBus::builder()
        .layer(TraceLayer)
        .layer(MetricsLayer::new())
        .command(move |d: Deposit, meta| {
            let accounts = accounts.clone();
            async move {
                Ok(accounts
                    .execute_with(&d.id, AccountCommand::Deposit { amount: d.amount }, &meta)
                    .await?
                    .version)
            }
        })?
        .build();
    for amount in [10, 20, 30] {
        bus.send(Deposit {
            id: "acc-1".into(),
            amount,
        })
        .await?;
    }
    // A deposit to an account that was never opened: a counted failure.
    let _ = bus
        .send(Deposit {
            id: "nobody".into(),
            amount: 5,
        })
        .await;

    let body = keel_examples::metrics::scrape(addr).await?;
    for line in body
        .lines()
        .filter(|l| l.starts_with("keel_") && !l.contains("_bucket"))
    {
        println!("{line}");
    }
    Ok(())
}
