//! `keel subjects`: encryption subjects' keys, crypto-shredding, master key rotation.

use clap::Subcommand;
use keel::codec::MasterKey;
use keel_scylla::KeelScylla;

#[derive(Subcommand)]
pub(crate) enum SubjectAction {
    /// Whether the subject has a key, its id and when it was made (never the key itself).
    Show { subject: String },
    /// Delete the subject's key: every event and snapshot encrypted for it becomes unreadable
    /// for good (crypto-shredding). Irreversible; needs `--yes`.
    Shred {
        subject: String,
        /// Confirms that the subject's data is to be made unreadable for good.
        #[arg(long)]
        yes: bool,
    },
    /// Master key rotation: re-wrap every data key wrapped by a previous master key with the
    /// current one. The master keys come from the environment only (never the command
    /// line): `KEEL_MASTER_KEY` (the new one) and `KEEL_PREVIOUS_MASTER_KEYS` (the old ones,
    /// comma-separated), 64 hex digits each. Exits non-zero when a key opens with none of them.
    Rewrap,
}

pub(crate) async fn subjects(
    store: &KeelScylla,
    action: SubjectAction,
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    match action {
        SubjectAction::Show { subject } => {
            // Read the row itself: showing that a key exists needs no master key.
            let rows = store
                .session()
                .query_unpaged(
                    format!(
                        "SELECT key_id, created_at FROM {}.keys WHERE subject = ?",
                        store.keyspace()
                    ),
                    (&subject,),
                )
                .await?
                .into_rows_result()?;
            let row = rows.maybe_first_row::<(uuid::Uuid, scylla::value::CqlTimestamp)>()?;
            if json {
                let value = match row {
                    Some((id, at)) => serde_json::json!({
                        "subject": subject, "has_key": true, "key_id": id, "created_at": at.0
                    }),
                    None => serde_json::json!({ "subject": subject, "has_key": false }),
                };
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                match row {
                    Some((id, at)) => {
                        println!(
                            "subject {subject}: key {id}, created at {}",
                            crate::time::rfc3339(at.0)
                        )
                    }
                    None => {
                        println!("subject {subject}: no key (never encrypted for, or shredded)")
                    }
                }
            }
        }
        SubjectAction::Shred { subject, yes } => {
            if !yes {
                return Err(format!(
                    "shredding `{subject}` makes its events unreadable for good; add --yes to do it"
                )
                .into());
            }
            let had = keel::codec::KeyStore::shred(store, &subject).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "subject": subject, "shredded": had })
                );
            } else if had {
                println!("subject {subject}: key deleted; its events can no longer be read");
            } else {
                println!("subject {subject}: had no key; nothing to do");
            }
        }
        SubjectAction::Rewrap => {
            let bar = crate::progress::counter("data keys looked at", json);
            let done = store.rewrap_keys_with(&|n| bar.set_position(n)).await?;
            bar.finish_and_clear();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "scanned": done.scanned,
                        "rewrapped": done.rewrapped,
                        "unopenable": done.unopenable,
                    })
                );
            } else {
                println!(
                    "{} data keys looked at, {} rewrapped with the new master key",
                    done.scanned, done.rewrapped
                );
            }
            if !done.unopenable.is_empty() {
                return Err(format!(
                    "{} keys open with none of the master keys given (left as they are): {}",
                    done.unopenable.len(),
                    done.unopenable.join(", ")
                )
                .into());
            }
        }
    }
    Ok(())
}

/// `KEEL_MASTER_KEY` and `KEEL_PREVIOUS_MASTER_KEYS`, for a rotation.
pub(crate) fn master_keys_from_env(
) -> Result<(MasterKey, Vec<MasterKey>), Box<dyn std::error::Error>> {
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let current = var("KEEL_MASTER_KEY");
    if current.trim().is_empty() {
        return Err(
            "rewrapping needs the new master key in KEEL_MASTER_KEY (64 hex digits)".into(),
        );
    }
    let current = MasterKey::from_hex(&current).map_err(|e| format!("KEEL_MASTER_KEY: {e}"))?;
    let previous = var("KEEL_PREVIOUS_MASTER_KEYS");
    let previous = previous
        .split(',')
        .filter(|k| !k.trim().is_empty())
        .enumerate()
        .map(|(i, k)| {
            MasterKey::from_hex(k)
                .map_err(|e| format!("KEEL_PREVIOUS_MASTER_KEYS, key {}: {e}", i + 1))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if previous.is_empty() {
        return Err(
            "rewrapping needs the old master keys in KEEL_PREVIOUS_MASTER_KEYS (comma-separated)"
                .into(),
        );
    }
    Ok((current, previous))
}
