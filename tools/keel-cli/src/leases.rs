//! `keel leases`: who holds what, at which epoch, for how long; and taking a lease from a
//! holder that hangs.

use clap::Subcommand;
use keel_scylla::KeelScylla;

#[derive(Subcommand)]
pub(crate) enum LeaseAction {
    /// Every lease: its holder, fencing epoch and seconds left.
    List,
    /// Takes a lease from its holder (one that hangs without dying): the holder is fenced
    /// off and another takes over at a higher epoch. Needs `--yes`.
    Release {
        /// The lease's name, as `leases list` shows it.
        name: String,
        /// Confirms taking the lease from its holder.
        #[arg(long)]
        yes: bool,
    },
}

pub(crate) async fn leases(
    store: &KeelScylla,
    action: LeaseAction,
    json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    match action {
        LeaseAction::List => {
            let all = store.leases().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
                return Ok(());
            }
            println!("{:<40} {:>7} {:>7}  HOLDER", "LEASE", "EPOCH", "TTL");
            for l in &all {
                println!(
                    "{:<40} {:>7} {:>7}  {}",
                    l.name,
                    l.epoch,
                    l.ttl_secs.map_or("-".to_owned(), |t| format!("{t} s")),
                    l.holder.as_deref().unwrap_or("(free)")
                );
            }
            let held = all.iter().filter(|l| l.holder.is_some()).count();
            println!("{} lease(s), {held} held", all.len());
        }
        LeaseAction::Release { name, yes } => {
            if !yes {
                return Err(Box::new(crate::failure::Failure::Usage(format!(
                    "releasing `{name}` takes it from its holder, which loses its work: add --yes"
                ))));
            }
            let taken = store.force_release(&name).await?;
            let message = match &taken {
                Some(holder) => format!("released; taken from `{holder}`"),
                None => "was free: nothing to release".to_owned(),
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "lease": name, "released_from": taken, "result": message })
                );
            } else {
                println!("{name}: {message}");
            }
        }
    }
    Ok(())
}
