//! Saga state: one row per saga, every transition an LWT guarded by the revision.

use async_trait::async_trait;
use bytes::Bytes;
use keel::saga::{SagaRecord, SagaStatus, SagaStore};
use keel::Result;

use crate::error::store_err;
use crate::events::Lwt;
use crate::KeelScylla;

type Row = (String, i64, String, Option<i64>, Bytes);

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
        Ok(Lwt::from_result(result)
            .map_err(|m| store_err(op, std::io::Error::other(m)))?
            .applied)
    }

    async fn list_sagas(&self, unfinished_only: bool) -> Result<Vec<SagaRecord>> {
        let rows = self
            .shared
            .select(&self.shared.st.saga_list, (), "list sagas")
            .await?;
        let mut all = Vec::new();
        for row in rows.rows::<Row>().map_err(|e| store_err("list sagas", e))? {
            let r = record(row.map_err(|e| store_err("list sagas", e))?)?;
            if !unfinished_only || !r.status.is_finished() {
                all.push(r);
            }
        }
        Ok(all)
    }
}
