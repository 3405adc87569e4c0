//! Projection status, operator requests and dead letters on ScyllaDB, plus [`ViewBatch`] for
//! read models kept in denormalised tables.

use async_trait::async_trait;
use keel::projection::{Control, DeadLetter, ProjectionStatus, ProjectionStore, Request};
use keel::{Error, Result};
use scylla::client::session::Session;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::CqlValue;
use uuid::Uuid;

use crate::error::store_err;
use crate::events::Lwt;
use crate::KeelScylla;

fn encode<T: serde::Serialize>(what: &str, value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::Encode {
        what: what.into(),
        reason: e.to_string(),
    })
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| store_err(format!("decode {what}"), e))
}

#[async_trait]
impl ProjectionStore for KeelScylla {
    async fn save_status(&self, status: &ProjectionStatus) -> Result<()> {
        let blob = encode("projection status", status)?;
        self.shared
            .session
            .execute_unpaged(&self.shared.st.save_status, (&status.name, blob))
            .await
            .map_err(|e| store_err(format!("save status of `{}`", status.name), e))?;
        Ok(())
    }

    async fn load_status(&self, name: &str) -> Result<Option<ProjectionStatus>> {
        let rows = self
            .shared
            .select(
                &self.shared.st.load_status,
                (name,),
                format!("load status of `{name}`"),
            )
            .await?;
        match rows
            .maybe_first_row::<(Option<Vec<u8>>,)>()
            .map_err(|e| store_err(format!("load status of `{name}`"), e))?
        {
            Some((Some(blob),)) => Ok(Some(decode("projection status", &blob)?)),
            _ => Ok(None),
        }
    }

    async fn list_status(&self) -> Result<Vec<ProjectionStatus>> {
        let rows = self
            .shared
            .select(&self.shared.st.list_status, (), "list projection status")
            .await?;
        let mut all = Vec::new();
        for row in rows
            .rows::<(Option<Vec<u8>>,)>()
            .map_err(|e| store_err("list projection status", e))?
        {
            if let (Some(blob),) = row.map_err(|e| store_err("list projection status", e))? {
                all.push(decode::<ProjectionStatus>("projection status", &blob)?);
            }
        }
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    async fn request(&self, name: &str, request: Request) -> Result<()> {
        // Every write to projection_requests is conditional, so a take never races a request.
        let Request {
            id: new_id,
            control,
        } = request;
        let blob = encode("projection request", &control)?;
        let op = format!("request {control:?} for `{name}`");
        for _ in 0..10 {
            let current = self.current_request(name).await?;
            let result = match current {
                None => {
                    self.shared
                        .session
                        .execute_unpaged(&self.shared.st.request_new, (name, &blob, new_id))
                        .await
                }
                Some((_, id)) => {
                    self.shared
                        .session
                        .execute_unpaged(&self.shared.st.request_replace, (&blob, new_id, name, id))
                        .await
                }
            }
            .map_err(|e| store_err(op.clone(), e))?;
            if Lwt::from_result(result)
                .map_err(|r| store_err(op.clone(), std::io::Error::other(r)))?
                .applied
            {
                return Ok(());
            }
        }
        Err(store_err(
            op,
            std::io::Error::other("the request kept racing with other writers"),
        ))
    }

    async fn take_request(&self, name: &str) -> Result<Option<Request>> {
        let op = format!("take request for `{name}`");
        let Some((control, id)) = self.current_request(name).await? else {
            return Ok(None);
        };
        let result = self
            .shared
            .session
            .execute_unpaged(&self.shared.st.request_take, (name, id))
            .await
            .map_err(|e| store_err(op.clone(), e))?;
        let taken = Lwt::from_result(result)
            .map_err(|r| store_err(op, std::io::Error::other(r)))?
            .applied;
        // Not applied: a newer request replaced it; the next step takes that one.
        Ok(taken.then_some(Request { id, control }))
    }

    async fn add_dead_letter(&self, letter: &DeadLetter) -> Result<()> {
        let blob = encode("dead letter", letter)?;
        self.shared
            .session
            .execute_unpaged(
                &self.shared.st.add_dead_letter,
                (&letter.projection, letter.at, Uuid::new_v4(), blob),
            )
            .await
            .map_err(|e| store_err(format!("record dead letter of `{}`", letter.projection), e))?;
        Ok(())
    }

    async fn dead_letters(&self, name: &str) -> Result<Vec<DeadLetter>> {
        let op = || format!("read dead letters of `{name}`");
        let rows = self
            .shared
            .select(&self.shared.st.dead_letters, (name,), op())
            .await?;
        rows.rows::<(Vec<u8>,)>()
            .map_err(|e| store_err(op(), e))?
            .map(|row| decode("dead letter", &row.map_err(|e| store_err(op(), e))?.0))
            .collect()
    }

    async fn remove_dead_letter(&self, name: &str, slice: u32, position: u64) -> Result<usize> {
        let op =
            || format!("remove dead letter of `{name}` at position {position} of slice {slice}");
        let rows = self
            .shared
            .select(&self.shared.st.dead_letter_keys, (name,), op())
            .await?;
        let mut removed = 0;
        for row in rows
            .rows::<(i64, Uuid, Vec<u8>)>()
            .map_err(|e| store_err(op(), e))?
        {
            let (at, id, blob) = row.map_err(|e| store_err(op(), e))?;
            let letter: DeadLetter = decode("dead letter", &blob)?;
            if letter.event.slice == slice && letter.event.position == position {
                self.shared
                    .session
                    .execute_unpaged(&self.shared.st.remove_dead_letter, (name, at, id))
                    .await
                    .map_err(|e| store_err(op(), e))?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

impl KeelScylla {
    async fn current_request(&self, name: &str) -> Result<Option<(Control, Uuid)>> {
        let op = || format!("read request for `{name}`");
        let rows = self
            .shared
            .select(&self.shared.st.request_read, (name,), op())
            .await?;
        match rows
            .maybe_first_row::<(Option<Vec<u8>>, Option<Uuid>)>()
            .map_err(|e| store_err(op(), e))?
        {
            Some((Some(blob), Some(id))) => Ok(Some((decode("projection request", &blob)?, id))),
            _ => Ok(None),
        }
    }
}

/// Writes to several denormalised read-model tables as one unit: a logged batch, so either
/// every table gets the change or (after the batch log replays) all of them do. Statements are
/// prepared once by the projection and rows are given as CQL values.
///
/// ```no_run
/// # async fn run(session: &scylla::client::session::Session, by_author: &scylla::statement::prepared::PreparedStatement,
/// #   by_tag: &scylla::statement::prepared::PreparedStatement) -> keel::Result<()> {
/// use keel_scylla::ViewBatch;
/// use scylla::value::CqlValue;
///
/// let mut batch = ViewBatch::new();
/// batch.add(by_author, vec![CqlValue::BigInt(1), CqlValue::Text("ada".into()), CqlValue::Text("post-1".into())]);
/// batch.add(by_tag, vec![CqlValue::BigInt(1), CqlValue::Text("rust".into()), CqlValue::Text("post-1".into())]);
/// batch.execute(session).await?;
/// # Ok(()) }
/// ```
#[derive(Default)]
pub struct ViewBatch {
    batch: Option<Batch>,
    rows: Vec<Vec<CqlValue>>,
}

impl ViewBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one statement with its values (one per bind marker, in order).
    pub fn add(&mut self, statement: &PreparedStatement, values: Vec<CqlValue>) -> &mut Self {
        self.batch
            .get_or_insert_with(|| Batch::new(BatchType::Logged))
            .append_statement(statement.clone());
        self.rows.push(values);
        self
    }

    /// How many statements it holds.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Runs the batch (nothing when empty) and leaves this value empty for reuse.
    pub async fn execute(&mut self, session: &Session) -> Result<()> {
        let (Some(batch), rows) = (self.batch.take(), std::mem::take(&mut self.rows)) else {
            return Ok(());
        };
        session
            .batch(&batch, rows)
            .await
            .map_err(|e| store_err("write read-model batch", e))?;
        Ok(())
    }
}
