//! `keel health`: the store's, the projections' and the sagas' health.

use keel::projection::{ProjectionState, ProjectionStore};
use keel::saga::SagaStore;
use keel_scylla::KeelScylla;

use crate::projections::state_name;

pub(crate) async fn health(
    store: &KeelScylla,
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    use keel::health::Health;
    let mut reports = vec![store.health().await];
    let mut projections = Health::new("projections");
    for s in store.list_status().await? {
        let detail = format!(
            "{}, lag {} events{}",
            state_name(s.state),
            s.lag_events,
            s.last_error
                .map(|e| format!(", last error: {e}"))
                .unwrap_or_default()
        );
        projections.check(
            format!("projection {}", s.name),
            !matches!(s.state, ProjectionState::Failed | ProjectionState::Stalled),
            detail,
        );
    }
    reports.push(projections);
    let mut sagas = Health::new("sagas");
    let stuck: Vec<String> = store
        .list_sagas(true)
        .await?
        .into_iter()
        .filter(|r| r.status == keel::saga::SagaStatus::CompensationFailed)
        .map(|r| r.id)
        .collect();
    sagas.check(
        "compensation_failed",
        stuck.is_empty(),
        format!("{} saga(s) need an operator: {stuck:?}", stuck.len()),
    );
    reports.push(sagas);
    let healthy = reports.iter().all(Health::is_healthy);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "healthy": healthy, "components": reports })
            )?
        );
    } else {
        for r in &reports {
            println!(
                "{} {}",
                if r.is_healthy() { "ok  " } else { "FAIL" },
                r.component
            );
            for c in &r.checks {
                println!(
                    "     {} {:<28} {}",
                    if c.ok { "ok  " } else { "FAIL" },
                    c.name,
                    c.detail
                );
            }
        }
    }
    if healthy {
        Ok(())
    } else {
        Err(Box::new(crate::failure::Failure::Unhealthy))
    }
}
