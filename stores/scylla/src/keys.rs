//! The key store for payload encryption: one row per subject in `keys`, the data key wrapped
//! with the builder's master key. Every write is conditional, so of concurrent creators one
//! key wins and all of them use it; shredding deletes the row and records the key's id (not
//! its subject) in `shredded_keys`.

use async_trait::async_trait;
use keel::codec::{DataKey, KeyStore, MasterKey};
use keel::Result;
use scylla::value::{CqlTimestamp, CqlValue};
use uuid::Uuid;

use crate::error::store_err;
use crate::events::Lwt;
use crate::{KeelScylla, Shared};

impl Shared {
    fn master_key(&self, subject: &str) -> Result<&MasterKey> {
        self.master_key.as_ref().ok_or_else(|| keel::Error::Config {
            field: "master_key".to_owned(),
            reason: format!(
                "the ScyllaDB key store needs a master key to wrap the key of subject `{subject}`: set one with `KeelScyllaBuilder::master_key`"
            ),
        })
    }

    async fn read_key(&self, subject: &str) -> Result<Option<DataKey>> {
        let master = self.master_key(subject)?;
        let op = || format!("read the key of subject `{subject}`");
        let rows = self.select(&self.st.key_read, (subject,), op()).await?;
        let row = rows
            .maybe_first_row::<(Uuid, Vec<u8>)>()
            .map_err(|e| store_err(op(), e))?;
        row.map(|(id, wrapped)| master.unwrap_key(subject, id, &wrapped))
            .transpose()
    }
}

#[async_trait]
impl KeyStore for KeelScylla {
    async fn key_for(&self, subject: &str) -> Result<DataKey> {
        // One Paxos round whether or not the subject has a key: the conditional insert either
        // stores ours or answers with the key that is there.
        let shared = &self.shared;
        let master = shared.master_key(subject)?;
        let key = DataKey::generate();
        let op = || format!("create the key of subject `{subject}`");
        let result = shared
            .session
            .execute_unpaged(
                &shared.st.key_insert,
                (
                    subject,
                    key.id(),
                    master.wrap_key(subject, &key),
                    CqlTimestamp(keel::event::now_millis()),
                ),
            )
            .await
            .map_err(|e| store_err(op(), e))?;
        let lwt =
            Lwt::from_result(result).map_err(|r| store_err(op(), std::io::Error::other(r)))?;
        if lwt.applied {
            return Ok(key);
        }
        match (lwt.column("key_id"), lwt.column("wrapped")) {
            (Some(CqlValue::Uuid(id)), Some(CqlValue::Blob(wrapped))) => {
                master.unwrap_key(subject, *id, wrapped)
            }
            // A server that does not return the existing row: read it.
            _ => shared.read_key(subject).await?.ok_or_else(|| {
                store_err(
                    op(),
                    std::io::Error::other("the key was created and deleted at once; try again"),
                )
            }),
        }
    }

    async fn find_key(&self, subject: &str) -> Result<Option<DataKey>> {
        self.shared.read_key(subject).await
    }

    async fn shred(&self, subject: &str) -> Result<bool> {
        let shared = &self.shared;
        let op = || format!("shred subject `{subject}`");
        let rows = shared
            .select(&shared.st.key_id_read, (subject,), op())
            .await?;
        let Some((key_id,)) = rows
            .maybe_first_row::<(Uuid,)>()
            .map_err(|e| store_err(op(), e))?
        else {
            return Ok(false);
        };
        // The id is recorded as shredded before the key goes, so a reader never finds neither;
        // the delete is conditional on that id, so a key created meanwhile is not taken with it.
        shared
            .session
            .execute_unpaged(
                &shared.st.shredded_insert,
                (key_id, CqlTimestamp(keel::event::now_millis())),
            )
            .await
            .map_err(|e| store_err(op(), e))?;
        let result = shared
            .session
            .execute_unpaged(&shared.st.key_delete, (subject, key_id))
            .await
            .map_err(|e| store_err(op(), e))?;
        let lwt =
            Lwt::from_result(result).map_err(|r| store_err(op(), std::io::Error::other(r)))?;
        Ok(lwt.applied)
    }

    async fn was_shredded(&self, key_id: Uuid) -> Result<bool> {
        let op = || format!("look up shredded key {key_id}");
        let rows = self
            .shared
            .select(&self.shared.st.shredded_read, (key_id,), op())
            .await?;
        Ok(rows
            .maybe_first_row::<(Uuid,)>()
            .map_err(|e| store_err(op(), e))?
            .is_some())
    }
}
