//! Conformance cases for read-your-writes: a write is visible once the projection applied it.

use std::sync::Arc;
use std::time::Duration;

use super::projections::{manager, prefix, ProjectionHost, Recorder};
use super::{counter_events, fresh_stream, FEED_WAIT};
use crate::event::ExpectedVersion;
use crate::feed::Written;
use crate::projection::Visibility;

/// A write is not applied before a manager ran (waiting for it times out, naming the
/// projection and the write); once a manager runs, waiting returns, and by then the read
/// model holds the write's events; a write that never happened is never applied.
pub async fn a_write_is_visible_once_applied<S: ProjectionHost>(store: Arc<S>) {
    let p = prefix();
    let recorder = Recorder::new(&p);
    let name = recorder.name.clone();
    let stream = fresh_stream(&p);
    let appended = store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            counter_events(&[1, 2, 3]),
        )
        .await
        .unwrap();
    let written = Written::new(stream.as_str(), appended.last_version);
    let visibility =
        Visibility::new(store.clone(), store.clone()).poll_interval(Duration::from_millis(5));
    assert!(
        !visibility.applied(&name, &written).await.unwrap(),
        "applied before any manager ran"
    );
    let early = visibility
        .wait_for(&name, &written, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(early.is_timeout(), "{early}");
    let message = early.to_string();
    assert!(
        message.contains(&name) && message.contains(stream.as_str()),
        "the timeout names the projection and the write: {message}"
    );

    let m = manager(&store, recorder.clone());
    m.start();
    m.wait_for(&name, &written, FEED_WAIT).await.unwrap();
    let seen: Vec<u64> = recorder
        .seen()
        .into_iter()
        .filter(|(s, _)| s == stream.as_str())
        .map(|(_, v)| v)
        .collect();
    assert_eq!(
        seen,
        [1, 2, 3],
        "the read model holds the write when the wait returns"
    );
    // An earlier version of the same stream is visible too; a later one never came.
    visibility
        .wait_for(
            &name,
            &Written::new(stream.as_str(), 1),
            Duration::from_millis(50),
        )
        .await
        .unwrap();
    let later = Written::new(stream.as_str(), appended.last_version + 1);
    let never = m.wait_for(&name, &later, Duration::from_millis(100)).await;
    assert!(never.unwrap_err().is_timeout());
    assert!(
        m.wait_for("no-such-projection", &written, Duration::from_millis(10))
            .await
            .is_err(),
        "a projection the manager does not run is an error"
    );
    m.stop().await;
}
