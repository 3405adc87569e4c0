//! Saga state: one row per saga, every transition an LWT guarded by the revision; and an index
//! of the unfinished ones (`sagas_unfinished`), so recovery does not read every saga ever run.
//!
//! The index is advisory and written around the LWTs so that it never misses an unfinished
//! saga: an entry is written before the saga is created and deleted only after the saga is
//! finished. In between it may hold entries for finished sagas (deleted when seen) or for
//! sagas whose creation failed (deleted once older than `ORPHAN_AFTER_MS`, an hour; a younger
//! one may belong to a creation still in flight).

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use keel::saga::{SagaRecord, SagaStatus, SagaStore};
use keel::Result;

use crate::error::store_err;
use crate::events::Lwt;
use crate::KeelScylla;

type Row = (String, i64, String, Option<i64>, Bytes);

/// Partitions of `sagas_unfinished`.
pub(crate) const SAGA_BUCKETS: i32 = 16;

/// The index partition of a saga id: FNV-1a, stable across processes and versions.
pub(crate) fn bucket(id: &str) -> i32 {
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % SAGA_BUCKETS as u64) as i32
}

/// An index entry without a saga row older than this is from a creation that failed.
const ORPHAN_AFTER_MS: i64 = 3_600_000;

/// Unfinished sagas loaded at once while listing.
const LOAD_CONCURRENCY: usize = 32;

fn status_from(text: &str) -> Result<SagaStatus> {
    serde_json::from_value(serde_json::Value::String(text.to_owned()))
        .map_err(|e| store_err(format!("decode saga status `{text}`"), e))
}

fn record(row: Row) -> Result<SagaRecord> {
    let (id, revision, status, deadline, data) = row;
    Ok(SagaRecord {
        id,
        revision: revision as u64,
        status: status_from(&status)?,
        deadline,
        data,
    })
}

#[async_trait]
impl SagaStore for KeelScylla {
    async fn create_saga(&self, r: &SagaRecord) -> Result<bool> {
        let op = format!("create saga `{}`", r.id);
        if !r.status.is_finished() {
            self.index_saga(&r.id, true, &op).await?;
        }
        let result = self
            .shared
            .session
            .execute_unpaged(
                &self.shared.st.saga_create,
                (
                    &r.id,
                    r.revision as i64,
                    r.status.as_str(),
                    r.deadline,
                    &r.data[..],
                ),
            )
            .await
            .map_err(|e| store_err(op.clone(), e))?;
        Ok(Lwt::from_result(result)
            .map_err(|m| store_err(op, std::io::Error::other(m)))?
            .applied)
    }

    async fn load_saga(&self, id: &str) -> Result<Option<SagaRecord>> {
        let op = || format!("load saga `{id}`");
        let rows = self
            .shared
            .select(&self.shared.st.saga_load, (id,), op())
            .await?;
        rows.maybe_first_row::<Row>()
            .map_err(|e| store_err(op(), e))?
            .map(record)
            .transpose()
    }

    async fn update_saga(&self, r: &SagaRecord, expected_revision: u64) -> Result<bool> {
        let op = format!("update saga `{}`", r.id);
        let values = (
            r.revision as i64,
            r.status.as_str(),
            r.deadline,
            &r.data[..],
            &r.id,
            expected_revision as i64,
        );
        let result = self
            .shared
            .session
            .execute_unpaged(&self.shared.st.saga_update, values)
            .await
            .map_err(|e| store_err(op.clone(), e))?;
        let applied = Lwt::from_result(result)
            .map_err(|m| store_err(op.clone(), std::io::Error::other(m)))?
            .applied;
        if applied && r.status.is_finished() {
            // Best effort: a stale entry is found finished and deleted by the next listing.
            if let Err(e) = self.index_saga(&r.id, false, &op).await {
                tracing::debug!(saga = %r.id, error = %e, "unfinished-saga index entry left behind");
            }
        }
        Ok(applied)
    }

    async fn list_sagas(&self, unfinished_only: bool) -> Result<Vec<SagaRecord>> {
        if unfinished_only {
            return self.unfinished_sagas().await;
        }
        // Every saga: a paged scan, for operators.
        let op = "list sagas";
        let mut rows = self
            .shared
            .session
            .execute_iter(self.shared.st.saga_list.clone(), ())
            .await
            .map_err(|e| store_err(op, e))?
            .rows_stream::<Row>()
            .map_err(|e| store_err(op, e))?;
        let mut all = Vec::new();
        while let Some(row) = rows.try_next().await.map_err(|e| store_err(op, e))? {
            all.push(record(row)?);
        }
        Ok(all)
    }
}

impl KeelScylla {
    /// Adds (`true`) or removes a saga's entry in the index of unfinished sagas.
    async fn index_saga(&self, id: &str, add: bool, op: &str) -> Result<()> {
        if add {
            let at = keel::event::now_millis();
            self.shared
                .session
                .execute_unpaged(&self.shared.st.saga_index, (bucket(id), id, at))
                .await
                .map_err(|e| store_err(op.to_owned(), e))?;
            Ok(())
        } else {
            self.unindex_saga(bucket(id), id, op).await
        }
    }

    /// Deletes an index entry from the partition it is in.
    async fn unindex_saga(&self, bucket: i32, id: &str, op: &str) -> Result<()> {
        self.shared
            .session
            .execute_unpaged(&self.shared.st.saga_unindex, (bucket, id))
            .await
            .map_err(|e| store_err(op.to_owned(), e))?;
        Ok(())
    }

    /// The unfinished sagas, through the index: its entries, then each saga's row.
    async fn unfinished_sagas(&self) -> Result<Vec<SagaRecord>> {
        let op = "list unfinished sagas";
        let mut ids = Vec::new();
        for b in 0..SAGA_BUCKETS {
            let mut rows = self
                .shared
                .session
                .execute_iter(self.shared.st.saga_unfinished.clone(), (b,))
                .await
                .map_err(|e| store_err(op, e))?
                .rows_stream::<(String, Option<i64>)>()
                .map_err(|e| store_err(op, e))?;
            while let Some((id, at)) = rows.try_next().await.map_err(|e| store_err(op, e))? {
                ids.push((b, id, at));
            }
        }
        let loaded: Vec<_> = stream::iter(ids)
            .map(|(b, id, at)| async move {
                let record = self.load_saga(&id).await?;
                Ok::<_, keel::Error>((b, id, at, record))
            })
            .buffer_unordered(LOAD_CONCURRENCY)
            .try_collect()
            .await?;
        let mut unfinished = Vec::new();
        let now = keel::event::now_millis();
        for (b, id, at, record) in loaded {
            let stale = match record {
                Some(r) if !r.status.is_finished() => {
                    unfinished.push(r);
                    false
                }
                // Its finishing update could not delete the entry.
                Some(_) => true,
                // A creation that failed long ago; a recent one may still be in flight.
                None => at.is_none_or(|at| now - at > ORPHAN_AFTER_MS),
            };
            if stale {
                if let Err(e) = self.unindex_saga(b, &id, op).await {
                    tracing::debug!(saga = %id, error = %e, "stale index entry kept");
                }
            }
        }
        unfinished.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(unfinished)
    }
}
