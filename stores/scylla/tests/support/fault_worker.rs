//! A lease holder in its own process, for the cluster's fencing case (`tests/cluster.rs`):
//! the test starts two, pauses one with SIGSTOP past its lease and resumes it.
//!
//! `keel-fault-worker feeder KEYSPACE ID`: runs the feeder; prints `feeding N slices` (how
//! many slices of the feed it holds) on every change.
//!
//! `keel-fault-worker projection KEYSPACE ID`: runs the projection `fenced` over a read model
//! in `KEYSPACE.fenced_model`, one row per feed position, each written by one LWT that is
//! conditional on the writer's lease epoch (kept in the partition's static column). Prints
//! `fence EPOCH CHECKPOINT` when it takes the lease, `write START_MS END_MS EPOCH POSITION
//! applied|refused` for every write, and `state STATE` on every change.
//!
//! `keel-fault-worker shared KEYSPACE ID`: one of several managers sharing the projection
//! `shared` slice by slice (`share_slices`), over a read model in `KEYSPACE.shared_model`
//! with a partition per slice, each fenced by the epoch of that slice's lease (a static
//! column). Prints `fence SLICE EPOCH` for every slice it takes, `write START_MS END_MS SLICE
//! EPOCH POSITION applied|refused` for every write, and `holding N slices` on every change.
//!
//! Nodes: `KEEL_CLUSTER_NODES` (default 127.0.0.1-3:9042).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use keel::projection::{Projection, ProjectionManager};
use keel::{BoxError, CheckpointStore, Error, Fence, RecordedEvent};
use keel_scylla::{KeelScylla, Replication};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};

/// The projection's name, its checkpoint key and the read model's table.
pub const PROJECTION: &str = "fenced";
/// The projection the `shared` role runs.
pub const SHARED: &str = "shared";
const LEASE_TTL: Duration = Duration::from_secs(3);

fn now() -> i64 {
    keel::event::now_millis()
}

/// A read-model table whose partitions take writes only under the newest lease epoch: each
/// partition's static `fence` column is raised when a manager takes the lease (or the slice)
/// the partition belongs to, and every write is conditional on it.
struct FencedTable {
    claim: PreparedStatement,
    claim_first: PreparedStatement,
    write: PreparedStatement,
}

fn lwt(mut s: PreparedStatement) -> PreparedStatement {
    s.set_consistency(Consistency::Quorum);
    s.set_serial_consistency(Some(SerialConsistency::Serial));
    s
}

fn applied(result: scylla::response::query_result::QueryResult) -> Result<bool, BoxError> {
    let rows = result.into_rows_result()?;
    let first = rows
        .rows::<scylla::value::Row>()?
        .next()
        .ok_or("no LWT row")??;
    Ok(matches!(
        first.columns.first(),
        Some(Some(scylla::value::CqlValue::Boolean(true)))
    ))
}

impl FencedTable {
    /// Creates `table` (partitioned by the int column `key`) and prepares its statements. A
    /// fence is raised when the new epoch is above the stored one (`raise_if` `<`) or at
    /// least it (`<=`, for a holder that hands the same fence again).
    async fn new(
        session: &scylla::client::session::Session,
        table: &str,
        key: &str,
        raise_if: &str,
    ) -> Result<Self, BoxError> {
        session
            .query_unpaged(
                format!(
                    "CREATE TABLE IF NOT EXISTS {table} ({key} int, position bigint, \
                     stream text, version bigint, epoch bigint, fence bigint static, \
                     PRIMARY KEY ({key}, position))"
                ),
                (),
            )
            .await?;
        let prep = |cql: String| async move { session.prepare(cql).await.map(lwt) };
        Ok(FencedTable {
            claim: prep(format!(
                "UPDATE {table} SET fence = ? WHERE {key} = ? IF fence {raise_if} ?"
            ))
            .await?,
            claim_first: prep(format!(
                "UPDATE {table} SET fence = ? WHERE {key} = ? IF fence = null"
            ))
            .await?,
            write: prep(format!(
                "UPDATE {table} SET stream = ?, version = ?, epoch = ? \
                 WHERE {key} = ? AND position = ? IF fence = ?"
            ))
            .await?,
        })
    }

    /// Raises partition `key`'s fence to `fence`'s epoch; refused (`Error::Fenced`) when a
    /// newer epoch holds it.
    async fn raise(&self, store: &KeelScylla, key: i32, fence: &Fence) -> Result<(), BoxError> {
        let epoch = fence.epoch as i64;
        let session = store.session();
        let raised = applied(
            session
                .execute_unpaged(&self.claim, (epoch, key, epoch))
                .await?,
        )? || applied(
            session
                .execute_unpaged(&self.claim_first, (epoch, key))
                .await?,
        )?;
        if raised {
            Ok(())
        } else {
            Err(Box::new(Error::Fenced {
                name: fence.name.clone(),
                epoch: fence.epoch,
                current: u64::MAX,
            }))
        }
    }

    /// Writes `event` into partition `key` under `fence`: `Ok(false)` when a newer epoch holds
    /// the partition and the write was refused.
    async fn write(
        &self,
        store: &KeelScylla,
        key: i32,
        fence: &Fence,
        event: &RecordedEvent,
    ) -> Result<bool, BoxError> {
        let position = event.position.ok_or("an event without a feed position")? as i64;
        let values = (
            event.stream.as_str(),
            event.version as i64,
            fence.epoch as i64,
            key,
            position,
            fence.epoch as i64,
        );
        applied(store.session().execute_unpaged(&self.write, values).await?)
    }
}

/// What a refused write returns: the projection lost its lease.
fn fenced(fence: Fence) -> BoxError {
    Box::new(Error::Fenced {
        epoch: fence.epoch,
        current: fence.epoch + 1,
        name: fence.name,
    })
}

/// A read model in one partition, fenced by the projection's lease.
struct FencedModel {
    store: Arc<KeelScylla>,
    fence: Mutex<Option<Fence>>,
    table: FencedTable,
}

impl FencedModel {
    async fn new(store: Arc<KeelScylla>, keyspace: &str) -> Result<Self, BoxError> {
        let table = FencedTable::new(
            store.session(),
            &format!("{keyspace}.fenced_model"),
            "p",
            "<",
        )
        .await?;
        Ok(FencedModel {
            store,
            fence: Mutex::new(None),
            table,
        })
    }
}

#[async_trait]
impl Projection for FencedModel {
    fn name(&self) -> &str {
        PROJECTION
    }

    async fn fence(&self, fence: &Fence) -> Result<(), BoxError> {
        // Raise the partition's fence to this epoch; from then on a lower one cannot write.
        self.table.raise(&self.store, 0, fence).await?;
        let epoch = fence.epoch;
        let checkpoint = self
            .store
            .load_checkpoint(&format!("{PROJECTION}/1"))
            .await?
            .unwrap_or(1);
        println!("fence {epoch} {checkpoint}");
        *self.fence.lock().unwrap() = Some(fence.clone());
        Ok(())
    }

    async fn apply(&self, _generation: u64, event: &RecordedEvent) -> Result<(), BoxError> {
        let fence = self.fence.lock().unwrap().clone().ok_or("no fence yet")?;
        let position = event.position.ok_or("an event without a feed position")?;
        let started = now();
        let ok = self.table.write(&self.store, 0, &fence, event).await?;
        let outcome = if ok { "applied" } else { "refused" };
        println!(
            "write {started} {} {} {position} {outcome}",
            now(),
            fence.epoch
        );
        if ok {
            Ok(())
        } else {
            Err(fenced(fence))
        }
    }

    async fn reset(&self, _generation: u64) -> Result<(), BoxError> {
        Ok(())
    }

    async fn activate(&self, _generation: u64) -> Result<(), BoxError> {
        Ok(())
    }
}

/// A read model shared slice by slice: partition `slice` takes writes only under the epoch of
/// that slice's lease.
struct SharedModel {
    store: Arc<KeelScylla>,
    /// The epoch this process holds each slice under.
    fences: Mutex<HashMap<u32, Fence>>,
    table: FencedTable,
}

impl SharedModel {
    async fn new(store: Arc<KeelScylla>, keyspace: &str) -> Result<Self, BoxError> {
        // `<=`: the manager hands its read model every held slice's fence again whenever
        // its set of slices changes.
        let table = FencedTable::new(
            store.session(),
            &format!("{keyspace}.shared_model"),
            "slice",
            "<=",
        )
        .await?;
        Ok(SharedModel {
            store,
            fences: Mutex::new(HashMap::new()),
            table,
        })
    }
}

#[async_trait]
impl Projection for SharedModel {
    fn name(&self) -> &str {
        SHARED
    }

    async fn fence(&self, fence: &Fence) -> Result<(), BoxError> {
        let slice = fence
            .slice()
            .ok_or("a shared projection's fence names its slice")?;
        self.table.raise(&self.store, slice as i32, fence).await?;
        let epoch = fence.epoch;
        let before = self.fences.lock().unwrap().insert(slice, fence.clone());
        if before.as_ref() != Some(fence) {
            println!("fence {slice} {epoch}");
        }
        Ok(())
    }

    async fn apply(&self, _generation: u64, event: &RecordedEvent) -> Result<(), BoxError> {
        let fence = self
            .fences
            .lock()
            .unwrap()
            .get(&event.slice)
            .cloned()
            .ok_or_else(|| format!("no fence for slice {}", event.slice))?;
        let position = event.position.ok_or("an event without a feed position")?;
        let started = now();
        let ok = self
            .table
            .write(&self.store, event.slice as i32, &fence, event)
            .await?;
        let outcome = if ok { "applied" } else { "refused" };
        println!(
            "write {started} {} {} {} {position} {outcome}",
            now(),
            event.slice,
            fence.epoch
        );
        if ok {
            Ok(())
        } else {
            Err(fenced(fence))
        }
    }

    async fn reset(&self, _generation: u64) -> Result<(), BoxError> {
        Ok(())
    }

    async fn activate(&self, _generation: u64) -> Result<(), BoxError> {
        Ok(())
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [role, keyspace, id] = &args[..] else {
        return Err("usage: keel-fault-worker feeder|projection|shared KEYSPACE ID".into());
    };
    let nodes: Vec<String> = std::env::var("KEEL_CLUSTER_NODES")
        .unwrap_or_else(|_| "127.0.0.1:9042,127.0.0.2:9042,127.0.0.3:9042".to_owned())
        .split(',')
        .map(str::to_owned)
        .collect();
    let store = Arc::new(
        KeelScylla::builder()
            .known_nodes(nodes)
            .keyspace(keyspace.as_str())
            .replication(Replication::NetworkTopology(vec![(
                "datacenter1".into(),
                3,
            )]))
            .local_datacenter("datacenter1")
            .bucket_size(500)
            .feed_bucket_size(1_000)
            .append_timeout(Duration::from_secs(2))
            .request_timeout(Duration::from_secs(3))
            .feeder(role == "feeder")
            .feeder_name(format!("worker-{id}"))
            .feeder_lease_ttl(LEASE_TTL)
            .feeder_interval(Duration::from_millis(20))
            .build()
            .await?,
    );
    println!("ready {id}");
    match role.as_str() {
        "feeder" => {
            let mut was = None;
            loop {
                let feeding = store.feeding_slices();
                if was != Some(feeding) {
                    println!("feeding {feeding} slices");
                    was = Some(feeding);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        "projection" => {
            let model = Arc::new(FencedModel::new(store.clone(), keyspace).await?);
            let manager = ProjectionManager::builder(
                store.clone(),
                store.clone(),
                store.clone(),
                store.clone(),
            )
            .projection(model)
            .id(id.as_str())
            .batch_size(50)
            .lease_ttl(LEASE_TTL)
            .poll_interval(Duration::from_millis(50))
            .build();
            manager.start();
            let mut was = None;
            loop {
                let state = manager.status(PROJECTION).await.map(|s| s.state);
                if let Ok(state) = state {
                    if was != Some(state) {
                        println!("state {state:?}");
                        was = Some(state);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        "shared" => {
            let model = Arc::new(SharedModel::new(store.clone(), keyspace).await?);
            let manager = ProjectionManager::builder(
                store.clone(),
                store.clone(),
                store.clone(),
                store.clone(),
            )
            .projection(model)
            .id(id.as_str())
            .share_slices(true)
            .batch_size(50)
            .lease_ttl(LEASE_TTL)
            .poll_interval(Duration::from_millis(50))
            .build();
            manager.start();
            let mut was = None;
            loop {
                if let Ok(status) = manager.status(SHARED).await {
                    if was != Some(status.held.len()) {
                        println!("holding {} slices", status.held.len());
                        was = Some(status.held.len());
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        other => Err(format!("unknown role `{other}`").into()),
    }
}
