//! Shared set-up of the keel-scylla tests: the node to use and fresh keyspaces on it.
//!
//! The node is `KEEL_SCYLLA_NODES` (comma-separated) or `127.0.0.1:9042`, the address
//! `scripts/scylla-node start` listens on. No node is a loud failure, never a skip.

#![allow(dead_code)]

use std::sync::Arc;

use keel_scylla::{KeelScylla, KeelScyllaBuilder};
use tokio::sync::OnceCell;

/// The nodes the tests connect to.
pub fn nodes() -> Vec<String> {
    std::env::var("KEEL_SCYLLA_NODES")
        .unwrap_or_else(|_| "127.0.0.1:9042".to_owned())
        .split(',')
        .map(str::to_owned)
        .collect()
}

/// A keyspace name no other test uses.
pub fn fresh_keyspace(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// A builder on the test node, with a short feeder lease and a small bucket size so tests
/// cross bucket boundaries.
pub fn builder(keyspace: &str) -> KeelScyllaBuilder {
    builder_without_master_key(keyspace).master_key(keel::codec::MasterKey::generate())
}

/// [`builder`] without a master key: its key store can neither create nor read keys.
pub fn builder_without_master_key(keyspace: &str) -> KeelScyllaBuilder {
    KeelScylla::builder()
        .known_nodes(nodes())
        .keyspace(keyspace)
        .bucket_size(500)
        .feed_bucket_size(1_000)
        .feeder_lease_ttl(std::time::Duration::from_secs(3))
        .feeder_interval(std::time::Duration::from_millis(20))
}

/// The first column of every row `cql` returns, in the order the node returns them.
pub async fn column<T>(store: &KeelScylla, cql: String) -> Vec<T>
where
    T: for<'frame, 'metadata> scylla::deserialize::value::DeserializeValue<'frame, 'metadata>,
{
    let rows = store
        .session()
        .query_unpaged(cql, ())
        .await
        .unwrap()
        .into_rows_result()
        .unwrap();
    rows.rows::<(T,)>().unwrap().map(|r| r.unwrap().0).collect()
}

/// Opens a store, failing loudly with what to do when there is no node.
pub async fn open(builder: KeelScyllaBuilder) -> KeelScylla {
    match builder.build().await {
        Ok(store) => store,
        Err(e) => panic!(
            "cannot open the ScyllaDB store on {:?}: {e}\n\
             start a node with `./scripts/scylla-node start` (./scripts/test does) \
             or point KEEL_SCYLLA_NODES at a running one",
            nodes()
        ),
    }
}

/// One store per test binary, in its own keyspace, shared by every case.
pub async fn shared_store() -> Arc<KeelScylla> {
    static STORE: OnceCell<Arc<KeelScylla>> = OnceCell::const_new();
    STORE
        .get_or_init(|| async { Arc::new(open(builder(&fresh_keyspace("keel_conf"))).await) })
        .await
        .clone()
}
