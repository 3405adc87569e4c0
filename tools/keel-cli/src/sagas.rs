//! `keel sagas`: their state, and an operator's retry.

use clap::Subcommand;
use keel::saga::{SagaRecord, SagaStore};
use keel_scylla::KeelScylla;

#[derive(Subcommand)]
pub(crate) enum SagaAction {
    /// Every saga (`--unfinished`: not completed or compensated).
    List {
        #[arg(long)]
        unfinished: bool,
    },
    /// One saga: its steps and history.
    Show { id: String },
    /// Move a saga out of compensation_failed; a running orchestrator compensates it again.
    Retry { id: String },
}

/// A saga as stored, read as JSON: the CLI does not know the application's command types, so
/// it never decodes the steps' commands, only the fields around them.
pub(crate) fn saga_json(
    record: &SagaRecord,
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    Ok(serde_json::from_slice(&record.data)?)
}

pub(crate) fn saga_summary(
    record: &SagaRecord,
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let data = saga_json(record)?;
    let steps: Vec<serde_json::Value> = data["steps"]
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .zip(data["states"].as_array().cloned().unwrap_or_default())
                .map(|(step, state)| serde_json::json!({ "step": step["id"], "state": state }))
                .collect()
        })
        .unwrap_or_default();
    let current = data["current"]
        .as_u64()
        .and_then(|i| data["steps"].get(i as usize))
        .map(|s| s["id"].clone());
    Ok(serde_json::json!({
        "id": record.id,
        "status": record.status.as_str(),
        "revision": record.revision,
        "current_step": if record.status.is_finished() { serde_json::Value::Null } else { current.unwrap_or_default() },
        "failed_step": data["failed_step"],
        "error": data["error"],
        "steps": steps,
        "history": data["history"],
    }))
}

pub(crate) async fn sagas(
    store: &KeelScylla,
    action: SagaAction,
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    match action {
        SagaAction::List { unfinished } => {
            let mut records = store.list_sagas(unfinished).await?;
            records.sort_by(|a, b| a.id.cmp(&b.id));
            let all: Vec<serde_json::Value> =
                records.iter().map(saga_summary).collect::<Result<_, _>>()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
                return Ok(());
            }
            println!("{:<36} {:<20} {:<20} ERROR", "ID", "STATUS", "STEP");
            for s in &all {
                println!(
                    "{:<36} {:<20} {:<20} {}",
                    s["id"].as_str().unwrap_or_default(),
                    s["status"].as_str().unwrap_or_default(),
                    s["current_step"].as_str().unwrap_or("-"),
                    s["error"].as_str().unwrap_or("-")
                );
            }
            println!("{} saga(s)", all.len());
        }
        SagaAction::Show { id } => {
            let record = store
                .load_saga(&id)
                .await?
                .ok_or_else(|| format!("no saga `{id}`"))?;
            let s = saga_summary(&record)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(());
            }
            println!("saga        {id}");
            println!("status      {}", s["status"].as_str().unwrap_or_default());
            println!("revision    {}", record.revision);
            if let Some(step) = s["failed_step"].as_str() {
                println!("failed step {step}");
            }
            if let Some(error) = s["error"].as_str() {
                println!("error       {error}");
            }
            println!("steps:");
            for step in s["steps"].as_array().cloned().unwrap_or_default() {
                println!(
                    "  {:<24} {}",
                    step["step"].as_str().unwrap_or_default(),
                    step["state"].as_str().unwrap_or_default()
                );
            }
            println!("history:");
            for h in s["history"].as_array().cloned().unwrap_or_default() {
                println!(
                    "  {:<24} {:<24} {:<20} {}",
                    h["at"]
                        .as_i64()
                        .map(crate::time::rfc3339)
                        .unwrap_or_default(),
                    h["step"].as_str().unwrap_or_default(),
                    h["outcome"].as_str().unwrap_or_default(),
                    h["detail"].as_str().unwrap_or("")
                );
            }
        }
        SagaAction::Retry { id } => {
            let record = store
                .load_saga(&id)
                .await?
                .ok_or_else(|| format!("no saga `{id}`"))?;
            if record.status != keel::saga::SagaStatus::CompensationFailed {
                return Err(format!(
                    "saga `{id}` is {}, not compensation_failed: nothing to retry",
                    record.status.as_str()
                )
                .into());
            }
            let mut data = saga_json(&record)?;
            data["status"] = "compensating".into();
            data["compensation_attempts"] = 0.into();
            let step = data["failed_step"].clone();
            if let Some(history) = data["history"].as_array_mut() {
                history.push(serde_json::json!({
                    "step": step.as_str().unwrap_or_default(),
                    "outcome": "retried",
                    "detail": "an operator asked to retry the compensation (keel sagas retry)",
                    "at": keel::event::now_millis(),
                }));
            }
            let next = SagaRecord {
                revision: record.revision + 1,
                status: keel::saga::SagaStatus::Compensating,
                data: serde_json::to_vec(&data)?.into(),
                ..record.clone()
            };
            if !store.update_saga(&next, record.revision).await? {
                return Err(format!(
                    "saga `{id}` changed meanwhile; look again with `keel sagas show {id}`"
                )
                .into());
            }
            let message =
                "compensating again; a running orchestrator picks it up on its next recovery pass";
            if json {
                println!("{}", serde_json::json!({ "saga": id, "result": message }));
            } else {
                println!("{id}: {message}");
            }
        }
    }
    Ok(())
}
