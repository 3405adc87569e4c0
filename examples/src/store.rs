//! Picks the store the examples run on: `--store memory` (default) or `--store scylla`.

use std::sync::Arc;

use keel::codec::KeyStore;
use keel::projection::ProjectionStore;
use keel::saga::SagaStore;
use keel::{CheckpointStore, EventStore, LeaseStore, SnapshotStore};

/// Every store trait at once: both stores implement all of them.
pub trait AllStores:
    EventStore + SnapshotStore + CheckpointStore + LeaseStore + ProjectionStore + SagaStore + KeyStore
{
}
impl<S> AllStores for S where
    S: EventStore
        + SnapshotStore
        + CheckpointStore
        + LeaseStore
        + ProjectionStore
        + SagaStore
        + KeyStore
{
}

/// The store an example runs on.
pub struct Stores {
    /// Every store trait, for the framework's pieces.
    pub all: Arc<dyn AllStores>,
    /// The ScyllaDB store itself, for read models kept in their own tables.
    pub scylla: Option<keel_scylla::KeelScylla>,
    /// Which one was picked, for printing.
    pub name: &'static str,
}

impl Stores {
    /// Ends the run: on ScyllaDB, stops the feeder and drops the run's keyspace.
    pub async fn finish(self) -> Result<(), keel::BoxError> {
        if let Some(store) = self.scylla {
            store.shutdown().await;
            store
                .session()
                .query_unpaged(format!("DROP KEYSPACE IF EXISTS {}", store.keyspace()), ())
                .await?;
        }
        Ok(())
    }

    /// The event store.
    pub fn events(&self) -> Arc<dyn EventStore> {
        self.all.clone()
    }

    /// The saga store.
    pub fn sagas(&self) -> Arc<dyn SagaStore> {
        self.all.clone()
    }

    /// The key store (payload encryption).
    pub fn keys(&self) -> Arc<dyn KeyStore> {
        self.all.clone()
    }

    /// The lease store.
    pub fn leases(&self) -> Arc<dyn LeaseStore> {
        self.all.clone()
    }
}

/// The store named by `--store NAME` on the command line (memory when absent).
///
/// `--store scylla` connects to the nodes in `KEEL_SCYLLA_NODES` (default `127.0.0.1:9042`,
/// as started by `scripts/scylla-node start`) and creates a keyspace of its own for the run,
/// `keel_example_<random>`, dropped again by [`Stores::finish`]: each run starts from an empty
/// history. Its key store's master key comes from `KEEL_MASTER_KEY` (64 hex digits), or is
/// made up for the run (the keyspace is thrown away anyway).
pub async fn from_args() -> Result<Stores, String> {
    let args: Vec<String> = std::env::args().collect();
    let name = args
        .iter()
        .position(|a| a == "--store")
        .map(|i| args.get(i + 1).cloned().unwrap_or_default())
        .unwrap_or_else(|| "memory".to_owned());
    match name.as_str() {
        "memory" => Ok(Stores {
            all: Arc::new(keel_memory::MemoryStore::new()),
            scylla: None,
            name: "memory",
        }),
        "scylla" => {
            let nodes =
                std::env::var("KEEL_SCYLLA_NODES").unwrap_or_else(|_| "127.0.0.1:9042".into());
            let keyspace = format!(
                "keel_example_{}",
                &uuid::Uuid::new_v4().simple().to_string()[..12]
            );
            let master_key = match std::env::var("KEEL_MASTER_KEY") {
                Ok(hex) => keel::codec::MasterKey::from_hex(&hex).map_err(|e| e.to_string())?,
                Err(_) => keel::codec::MasterKey::generate(),
            };
            let store = keel_scylla::KeelScylla::builder()
                .known_nodes(nodes.split(','))
                .keyspace(keyspace)
                .master_key(master_key)
                .build()
                .await
                .map_err(|e| format!("cannot open the ScyllaDB store at {nodes}: {e}"))?;
            Ok(Stores {
                all: Arc::new(store.clone()),
                scylla: Some(store),
                name: "scylla",
            })
        }
        other => Err(format!(
            "unknown store `{other}`: use `--store memory` or `--store scylla`"
        )),
    }
}
