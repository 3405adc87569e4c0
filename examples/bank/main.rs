//! A first hour with Keel: one aggregate, a command bus, a query, on the memory store.
//!
//! ```text
//! cargo run --example bank                    # in memory
//! cargo run --example bank -- --store scylla  # on the node of scripts/scylla-node
//! ```

use std::time::Duration;

use keel::bus::{RetryLayer, TimeoutLayer, TraceLayer, ValidateLayer};
use keel::{Command, CommandBus, Query, QueryBus, Repository};
use keel_examples::bank::{Account, AccountCommand, AccountError};

/// Open an account with a first deposit.
#[derive(Clone, Debug)]
struct OpenAccount {
    id: String,
    owner: String,
    initial: u64,
}

/// Put money in.
#[derive(Clone, Debug)]
struct Deposit {
    id: String,
    amount: u64,
}

/// Take money out.
#[derive(Clone, Debug)]
struct Withdraw {
    id: String,
    amount: u64,
}

// Each command answers with the account's new version.
impl Command for OpenAccount {
    type Output = u64;
    fn validate(&self) -> Result<(), String> {
        if self.owner.trim().is_empty() {
            return Err("the owner's name is empty".into());
        }
        Ok(())
    }
}
impl Command for Deposit {
    type Output = u64;
}
impl Command for Withdraw {
    type Output = u64;
}

/// How much is in an account?
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Balance {
    id: String,
}

impl Query for Balance {
    type Output = u64;
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let stores = keel_examples::store::from_args().await?;
    // The repository keeps the aggregates it decided on (10,000 by default): the next command
    // on the same account decides on the kept state instead of reading the stream again.
    let accounts = Repository::<Account>::new(stores.events());

    // One handler per command type: each turns the command into the aggregate's own command
    // and lets the repository load, decide, append (and retry on a version conflict).
    let (open, deposit, withdraw) = (accounts.clone(), accounts.clone(), accounts.clone());
    let commands = CommandBus::builder()
        .layer(TraceLayer)
        .layer(ValidateLayer)
        .layer(TimeoutLayer::new(Duration::from_secs(5)))
        .layer(RetryLayer::new(3, Duration::from_millis(5)))
        .command(move |c: OpenAccount, meta| {
            let repo = open.clone();
            async move {
                let cmd = AccountCommand::Open {
                    owner: c.owner,
                    initial: c.initial,
                };
                Ok(repo.execute_with(&c.id, cmd, &meta).await?.version)
            }
        })?
        .command(move |c: Deposit, meta| {
            let repo = deposit.clone();
            async move {
                let cmd = AccountCommand::Deposit { amount: c.amount };
                Ok(repo.execute_with(&c.id, cmd, &meta).await?.version)
            }
        })?
        .command(move |c: Withdraw, meta| {
            let repo = withdraw.clone();
            async move {
                let cmd = AccountCommand::Withdraw { amount: c.amount };
                Ok(repo.execute_with(&c.id, cmd, &meta).await?.version)
            }
        })?
        .build();

    // The query side reads the aggregate's state; a real app would read a projection.
    let reads = accounts.clone();
    let queries = QueryBus::builder()
        .query(move |q: Balance, _meta| {
            let repo = reads.clone();
            async move { Ok(repo.load(&q.id).await?.state.balance) }
        })?
        .build();

    let id = format!("acc-{}", uuid::Uuid::new_v4().simple());
    println!("store: {}", stores.name);
    commands
        .send(OpenAccount {
            id: id.clone(),
            owner: "Ada".into(),
            initial: 1000,
        })
        .await?;
    println!("opened {id} for Ada with 1000");
    commands
        .send(Deposit {
            id: id.clone(),
            amount: 500,
        })
        .await?;
    println!("deposited 500");
    commands
        .send(Withdraw {
            id: id.clone(),
            amount: 200,
        })
        .await?;
    println!("withdrew 200");

    // An overdraft is refused by the aggregate; the error is typed all the way back here.
    match commands
        .send(Withdraw {
            id: id.clone(),
            amount: 5000,
        })
        .await
    {
        Err(err) => match err.rejection::<AccountError>() {
            Some(AccountError::InsufficientFunds { balance, requested }) => {
                println!("refused: insufficient funds (balance {balance}, requested {requested})");
                println!("  error: {err}");
            }
            _ => return Err(err.into()),
        },
        Ok(_) => return Err("the overdraft was accepted".into()),
    }

    let balance = queries.ask(Balance { id }).await?;
    println!("balance: {balance}");
    let metrics = accounts.metrics();
    println!(
        "aggregate cache: {} hit(s), {} miss(es); {} load(s) from the store",
        metrics.cache_hits, metrics.cache_misses, metrics.loads
    );
    stores.finish().await.map_err(|e| e.to_string())?;
    Ok(())
}
