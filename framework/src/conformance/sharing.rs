//! Conformance cases for managers that share a projection's slices.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::projections::{by_stream, from_scratch, prefix, write, ProjectionHost, Recorder};
use super::FEED_WAIT;
use crate::projection::{ProjectionManager, ProjectionStatus};

fn sharing<S: ProjectionHost>(
    store: &Arc<S>,
    recorder: Arc<Recorder>,
    id: &str,
) -> ProjectionManager {
    ProjectionManager::builder(store.clone(), store.clone(), store.clone(), store.clone())
        .projection(recorder)
        .share_slices(true)
        .id(id)
        .batch_size(64)
        .lease_ttl(Duration::from_secs(2))
        .poll_interval(Duration::from_millis(20))
        .build()
}

/// A recorder for `prefix` and a manager `<prefix>-<id>` sharing its slices.
fn sharer<S: ProjectionHost>(
    store: &Arc<S>,
    prefix: &str,
    id: &str,
) -> (Arc<Recorder>, ProjectionManager) {
    let recorder = Recorder::new(prefix);
    let manager = sharing(store, recorder.clone(), &format!("{prefix}-{id}"));
    (recorder, manager)
}

/// Steps both managers until `done` holds for their statuses, or fails after `within`.
async fn step_until(
    managers: &[&ProjectionManager],
    name: &str,
    within: Duration,
    what: &str,
    done: impl Fn(&[ProjectionStatus]) -> bool,
) -> Vec<ProjectionStatus> {
    let deadline = Instant::now() + within;
    loop {
        let mut statuses = Vec::new();
        for m in managers {
            statuses.push(m.catch_up(name).await.unwrap());
        }
        if done(&statuses) {
            return statuses;
        }
        assert!(
            Instant::now() < deadline,
            "{what} within {within:?}: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two managers sharing a projection split the slices between them (disjoint, every slice
/// held), apply every new event once between them, each stream's in order and by the
/// manager holding its slice; once one stops, the other takes every slice within the lease
/// TTL and applies everything after.
pub async fn projection_managers_share_the_slices<S: ProjectionHost>(store: Arc<S>) {
    let p = prefix();
    let slices = store.feed_slices() as usize;
    write(&store, &p, 8, 2).await;
    let ((ra, a), (rb, b)) = (sharer(&store, &p, "a"), sharer(&store, &p, "b"));
    let name = ra.name.clone();
    let split = step_until(&[&a, &b], &name, FEED_WAIT, "the slices split", |s| {
        !s[0].held.is_empty()
            && !s[1].held.is_empty()
            && s[0].held.len() + s[1].held.len() == slices
    })
    .await;
    let (held_a, held_b): (HashSet<u32>, HashSet<u32>) = (
        split[0].held.iter().copied().collect(),
        split[1].held.iter().copied().collect(),
    );
    assert!(held_a.is_disjoint(&held_b), "{held_a:?} / {held_b:?}");
    assert_eq!(held_a.len() + held_b.len(), slices);
    if slices > 1 {
        let (big, small) = (
            held_a.len().max(held_b.len()),
            held_a.len().min(held_b.len()),
        );
        assert!(big - small <= 1, "fair shares: {big} and {small}");
    }

    // New events: applied once between the two, by the holder of each stream's slice.
    let (before_a, before_b) = (ra.seen().len(), rb.seen().len());
    let streams = write(&store, &p, 16, 3).await;
    let ours: HashSet<String> = streams.iter().map(|s| s.to_string()).collect();
    let fresh = |seen: Vec<(String, u64)>, skip: usize| -> Vec<(String, u64)> {
        seen.into_iter()
            .skip(skip)
            .filter(|(s, _)| ours.contains(s))
            .collect()
    };
    step_until(
        &[&a, &b],
        &name,
        FEED_WAIT,
        "the new events applied",
        |_| fresh(ra.seen(), before_a).len() + fresh(rb.seen(), before_b).len() >= 48,
    )
    .await;
    let (new_a, new_b) = (fresh(ra.seen(), before_a), fresh(rb.seen(), before_b));
    let mut both = new_a.clone();
    both.extend(new_b.iter().cloned());
    let expected: Vec<(String, u64)> = from_scratch(&store, &p)
        .await
        .into_iter()
        .filter(|(s, _)| ours.contains(s))
        .collect();
    assert_eq!(
        by_stream(both),
        expected,
        "every new event once, each stream in order"
    );
    for (applied, held, who) in [(&new_a, &held_a, "a"), (&new_b, &held_b, "b")] {
        for (stream, _) in applied {
            let slice =
                crate::feed::slice_of(&crate::StreamId::new(stream.as_str()), slices as u32);
            assert!(
                held.contains(&slice),
                "{who} applied `{stream}` of slice {slice}, not its own"
            );
        }
    }

    // One stops: the other takes every slice and applies what follows.
    b.stop().await;
    step_until(
        &[&a],
        &name,
        Duration::from_secs(8),
        "the survivor holds every slice",
        |s| s[0].held.len() == slices,
    )
    .await;
    let after = ra.seen().len();
    let later = write(&store, &p, 6, 2).await;
    let later: HashSet<String> = later.iter().map(|s| s.to_string()).collect();
    step_until(
        &[&a],
        &name,
        FEED_WAIT,
        "the survivor applied the rest",
        |_| {
            ra.seen()
                .iter()
                .skip(after)
                .filter(|(s, _)| later.contains(s))
                .count()
                >= 12
        },
    )
    .await;
    let status = step_until(&[&a], &name, FEED_WAIT, "no lag left", |s| {
        s[0].lag_events == 0
    })
    .await;
    assert!(status[0].cursor.covers(&status[0].heads), "{:?}", status[0]);
    a.stop().await;
}

/// A blue/green rebuild of a projection shared by two managers: each fills its own slices of
/// the new generation (events written after the request included), the generation switches
/// on both, and the two read models together hold every event once, each stream in order.
pub async fn a_shared_rebuild_fills_every_slice<S: ProjectionHost>(store: Arc<S>) {
    let p = prefix();
    let slices = store.feed_slices() as usize;
    write(&store, &p, 8, 2).await;
    let ((ra, a), (rb, b)) = (sharer(&store, &p, "a"), sharer(&store, &p, "b"));
    let name = ra.name.clone();
    let caught_up = |s: &[ProjectionStatus]| {
        s.iter().map(|s| s.held.len()).sum::<usize>() == slices
            && (slices == 1 || s.iter().all(|s| !s.held.is_empty()))
            && s.iter().all(|s| {
                s.held
                    .iter()
                    .all(|&slice| s.cursor.get(slice) >= s.heads.get(slice))
            })
    };
    let before = step_until(
        &[&a, &b],
        &name,
        FEED_WAIT,
        "shared and caught up",
        caught_up,
    )
    .await;
    let generation = before.iter().map(|s| s.generation).max().unwrap();
    a.request(&name, crate::projection::Control::Rebuild)
        .await
        .unwrap();
    write(&store, &p, 6, 3).await;
    step_until(
        &[&a, &b],
        &name,
        FEED_WAIT,
        "the rebuilt generation active on both",
        |s| {
            s.iter().all(|s| {
                s.generation == generation + 1
                    && s.state == crate::projection::ProjectionState::Running
            })
        },
    )
    .await;
    let mut both = ra.seen();
    both.extend(rb.seen());
    let (from_a, from_b) = (ra.seen().len(), rb.seen().len());
    assert_eq!(
        by_stream(both),
        from_scratch(&store, &p).await,
        "the new generation holds every event once between the two ({from_a} + {from_b})"
    );
    if slices > 1 {
        assert!(
            from_a > 0 && from_b > 0,
            "both filled their slices: {from_a} and {from_b}"
        );
    }
    a.stop().await;
    b.stop().await;
}
