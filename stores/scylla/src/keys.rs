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

    /// Opens a stored key with the current master key or, after a rotation, a previous one;
    /// also tells whether it took a previous one.
    fn unwrap_key(&self, subject: &str, id: Uuid, wrapped: &[u8]) -> Result<(DataKey, bool)> {
        let current = self.master_key(subject)?.unwrap_key(subject, id, wrapped);
        if current.is_ok() || self.previous_master_keys.is_empty() {
            return current.map(|key| (key, false));
        }
        self.previous_master_keys
            .iter()
            .find_map(|master| master.unwrap_key(subject, id, wrapped).ok())
            .map(|key| (key, true))
            .ok_or_else(|| keel::Error::Config {
                field: "master_key".to_owned(),
                reason: format!(
                    "the data key of subject `{subject}` opens with neither the master key nor any previous master key (wrong keys, or the stored key was altered)"
                ),
            })
    }

    /// The subject's row at SERIAL: key id and wrapped key.
    async fn read_row(&self, subject: &str) -> Result<Option<(Uuid, Vec<u8>)>> {
        let op = || format!("read the key of subject `{subject}`");
        let rows = self.select(&self.st.key_read, (subject,), op()).await?;
        rows.maybe_first_row::<(Uuid, Vec<u8>)>()
            .map_err(|e| store_err(op(), e))
    }

    async fn read_key(&self, subject: &str) -> Result<Option<DataKey>> {
        self.master_key(subject)?;
        let row = self.read_row(subject).await?;
        row.map(|(id, wrapped)| self.unwrap_key(subject, id, &wrapped).map(|(key, _)| key))
            .transpose()
    }
}

/// What [`KeelScylla::rewrap_keys`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rewrapped {
    /// Keys looked at.
    pub scanned: u64,
    /// Keys that were wrapped by a previous master key and now are by the current one.
    pub rewrapped: u64,
    /// Subjects whose key opens with none of the master keys given (left as they are).
    pub unopenable: Vec<String>,
}

impl KeelScylla {
    /// Master key rotation: re-wraps every data key that a
    /// [previous master key](crate::KeelScyllaBuilder::previous_master_keys) wrapped with the
    /// current [master key](crate::KeelScyllaBuilder::master_key). The data keys themselves
    /// do not change, so no event is rewritten and every payload stays readable throughout.
    ///
    /// Each row is replaced with a conditional update (`IF key_id = .. AND wrapped = ..`): a
    /// key shredded or rewrapped meanwhile is left alone. Run it again until `rewrapped` is 0;
    /// then the previous master keys can be dropped from the configuration. Keys that open
    /// with none of the master keys are listed in `unopenable` and left as they are.
    pub async fn rewrap_keys(&self) -> Result<Rewrapped> {
        self.rewrap_keys_with(&|_| {}).await
    }

    /// [`rewrap_keys`](Self::rewrap_keys), calling `progress` with the number of keys looked
    /// at so far as the scan goes (for a progress bar).
    pub async fn rewrap_keys_with(
        &self,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<Rewrapped> {
        use futures::TryStreamExt;
        let shared = &self.shared;
        let master = shared
            .master_key
            .as_ref()
            .ok_or_else(|| keel::Error::Config {
                field: "master_key".to_owned(),
                reason: "rewrapping the data keys needs the new master key: set it with `KeelScyllaBuilder::master_key`, the old ones with `previous_master_keys`".to_owned(),
            })?;
        let op = "scan the data keys for rewrapping";
        let mut rows = shared
            .session
            .execute_iter(shared.st.key_scan.clone(), ())
            .await
            .map_err(|e| store_err(op, e))?
            .rows_stream::<(String, Uuid, Vec<u8>)>()
            .map_err(|e| store_err(op, e))?;
        let mut done = Rewrapped::default();
        while let Some((subject, id, wrapped)) =
            rows.try_next().await.map_err(|e| store_err(op, e))?
        {
            done.scanned += 1;
            progress(done.scanned);
            let key = match shared.unwrap_key(&subject, id, &wrapped) {
                Ok((_, false)) => continue,
                Ok((key, true)) => key,
                Err(_) => {
                    done.unopenable.push(subject);
                    continue;
                }
            };
            let op = || format!("rewrap the key of subject `{subject}`");
            let result = shared
                .session
                .execute_unpaged(
                    &shared.st.key_rewrap,
                    (master.wrap_key(&subject, &key), &subject, id, &wrapped),
                )
                .await
                .map_err(|e| store_err(op(), e))?;
            let lwt =
                Lwt::from_result(result).map_err(|r| store_err(op(), std::io::Error::other(r)))?;
            if lwt.applied {
                done.rewrapped += 1;
            }
        }
        tracing::info!(
            scanned = done.scanned,
            rewrapped = done.rewrapped,
            unopenable = done.unopenable.len(),
            "data keys rewrapped"
        );
        Ok(done)
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
                shared.unwrap_key(subject, *id, wrapped).map(|(key, _)| key)
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
