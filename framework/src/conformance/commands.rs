//! The command window, through the repository: a re-sent command id is applied once, whether
//! the aggregate loads from the start or from a snapshot, and the window ends exactly where
//! the docs say.

use std::sync::Arc;

use uuid::Uuid;

use crate::doc::Counter;
use crate::event::Metadata;
use crate::repository::{Repository, SnapshotPolicy};
use crate::store::{EventStore, SnapshotStore};
use crate::Aggregate;

fn with_id(id: Uuid) -> Metadata {
    Metadata::default().with_command_id(id)
}

/// A command re-sent after a snapshot covers its event is not applied again: the snapshot
/// keeps the command window, so the re-send is recognised without replaying what the
/// snapshot covers, by this repository and by a second one on the same store (another
/// process).
pub async fn command_ids_survive_snapshots<S: EventStore + SnapshotStore>(store: Arc<S>) {
    let snapshotting = || {
        Repository::<Counter>::builder(store.clone())
            .cache(0, None) // every command loads: the snapshot path is under test
            .snapshots(store.clone(), SnapshotPolicy::Every(2))
            .build()
    };
    let repo = snapshotting();
    let id = Uuid::new_v4().simple().to_string();
    let step = Uuid::new_v4();
    let first = repo.execute_with(&id, 5, &with_id(step)).await.unwrap();
    assert_eq!((first.events.len(), first.version), (1, 1));
    repo.execute_with(&id, 1, &with_id(Uuid::new_v4()))
        .await
        .unwrap();
    repo.execute(&id, 1).await.unwrap();
    let snapshot = store
        .load_snapshot(&Counter::stream_id(&id))
        .await
        .unwrap()
        .expect("a snapshot at version 2");
    assert_eq!(snapshot.version, 2, "the snapshot covers the first command");

    for (who, repo) in [("the same repository", repo), ("another", snapshotting())] {
        let before = repo.metrics();
        let again = repo.execute_with(&id, 5, &with_id(step)).await.unwrap();
        let after = repo.metrics();
        assert!(
            again.events.is_empty(),
            "{who}: the re-sent command was applied again: {again:?}"
        );
        assert_eq!(
            again.version, 3,
            "{who}: the result names the current version"
        );
        assert_eq!(
            (
                after.snapshot_hits - before.snapshot_hits,
                after.events_replayed - before.events_replayed
            ),
            (1, 1),
            "{who}: loaded from the snapshot, replaying only the event after it"
        );
    }
    let loaded = Repository::<Counter>::new(store.clone())
        .load(&id)
        .await
        .unwrap();
    assert_eq!((loaded.state.value, loaded.version), (7, 3));
}

/// The window holds the last K commands that appended events, no more and no fewer, on every
/// way of loading: a command re-sent after K - 1 others is recognised, one re-sent after K
/// others is applied again. Commands with no command id do not count.
pub async fn command_window_is_the_last_k_commands<S: EventStore + SnapshotStore>(store: Arc<S>) {
    const K: usize = 4;
    let plain = Repository::<Counter>::builder(store.clone())
        .command_window(K)
        .build();
    let snapshotting = Repository::<Counter>::builder(store.clone())
        .command_window(K)
        .snapshots(store.clone(), SnapshotPolicy::Every(1))
        .build();
    for (how, repo) in [("replaying", plain), ("from snapshots", snapshotting)] {
        let id = Uuid::new_v4().simple().to_string();
        let step = Uuid::new_v4();
        repo.execute_with(&id, 1, &with_id(step)).await.unwrap();
        for _ in 0..K - 1 {
            repo.execute_with(&id, 1, &with_id(Uuid::new_v4()))
                .await
                .unwrap();
            // Neither does a command without an id push the step out of the window.
            repo.execute(&id, 1).await.unwrap();
        }
        let inside = repo.execute_with(&id, 1, &with_id(step)).await.unwrap();
        assert!(
            inside.events.is_empty(),
            "{how}: re-sent after {} others, inside the window of {K}: applied again",
            K - 1
        );
        repo.execute_with(&id, 1, &with_id(Uuid::new_v4()))
            .await
            .unwrap();
        let outside = repo.execute_with(&id, 1, &with_id(step)).await.unwrap();
        assert_eq!(
            outside.events.len(),
            1,
            "{how}: re-sent after {K} others, past the window of {K}: the docs say it is applied again"
        );
        let value = repo.load(&id).await.unwrap().state.value;
        assert_eq!(value, 2 * K as u64 + 1, "{how}");
    }
}
