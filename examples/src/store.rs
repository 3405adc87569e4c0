//! Picks the store the examples run on: `--store memory` (default) or `--store scylla`.

use std::sync::Arc;

use keel::{EventStore, SnapshotStore};

/// The stores an example needs, behind their traits.
pub struct Stores {
    /// Events and the feed.
    pub events: Arc<dyn EventStore>,
    /// Snapshots.
    pub snapshots: Arc<dyn SnapshotStore>,
    /// Which one was picked, for printing.
    pub name: &'static str,
}

/// The store named by `--store NAME` on the command line (memory when absent).
///
/// `--store scylla` connects to the nodes in `KEEL_SCYLLA_NODES` (default `127.0.0.1:9042`,
/// as started by `scripts/scylla-node start`) and uses the keyspace `keel_examples`.
pub async fn from_args() -> Result<Stores, String> {
    let args: Vec<String> = std::env::args().collect();
    let name = args
        .iter()
        .position(|a| a == "--store")
        .map(|i| args.get(i + 1).cloned().unwrap_or_default())
        .unwrap_or_else(|| "memory".to_owned());
    match name.as_str() {
        "memory" => {
            let store = Arc::new(keel_memory::MemoryStore::new());
            Ok(Stores {
                events: store.clone(),
                snapshots: store,
                name: "memory",
            })
        }
        "scylla" => {
            let nodes =
                std::env::var("KEEL_SCYLLA_NODES").unwrap_or_else(|_| "127.0.0.1:9042".into());
            let store = keel_scylla::KeelScylla::builder()
                .known_nodes(nodes.split(','))
                .keyspace("keel_examples")
                .build()
                .await
                .map_err(|e| format!("cannot open the ScyllaDB store at {nodes}: {e}"))?;
            let store = Arc::new(store);
            Ok(Stores {
                events: store.clone(),
                snapshots: store,
                name: "scylla",
            })
        }
        other => Err(format!(
            "unknown store `{other}`: use `--store memory` or `--store scylla`"
        )),
    }
}
