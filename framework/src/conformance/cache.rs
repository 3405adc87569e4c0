//! The aggregate cache over a store: warm caches in two repositories (two processes' worth)
//! never decide on stale state, the bound holds, and a shredded subject is never decided on
//! from memory.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::codec::{Codec, KeyStore};
use crate::doc::Counter;
use crate::error::Error;
use crate::repository::{Repository, RepositoryMetrics};
use crate::store::EventStore;
use crate::testing::AggregateTest;
use crate::{Aggregate, DomainEvent};

/// Hands out tickets in order: each decision depends on the state, so a decision on a stale
/// state shows as a ticket number handed out twice.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Tickets {
    /// The last ticket handed out.
    pub last: u64,
}

/// A ticket was handed out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Taken {
    /// Its number: the last one plus one, as the deciding state saw it.
    pub number: u64,
    /// Who took it.
    pub by: String,
}

impl DomainEvent for Taken {
    fn event_type(&self) -> &'static str {
        "Taken"
    }
}

/// Refuses a ticket to a nameless taker.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("a ticket needs a taker")]
pub struct NoTaker;

impl Aggregate for Tickets {
    const TYPE: &'static str = "tickets";
    type Command = String;
    type Event = Taken;
    type Error = NoTaker;

    fn handle(&self, by: String) -> Result<Vec<Taken>, NoTaker> {
        if by.is_empty() {
            return Err(NoTaker);
        }
        Ok(vec![Taken {
            number: self.last + 1,
            by,
        }])
    }

    fn apply(&mut self, event: &Taken) {
        self.last = event.number;
    }
}

fn id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Two repositories on one store, each with a warm cache, take turns on one aggregate: every
/// command is decided on the latest state (ticket numbers are the versions, none twice),
/// none is lost, versions are dense, and the stale entries show as cache conflicts.
pub async fn warm_caches_never_decide_on_stale_state<S: EventStore>(store: Arc<S>) {
    const TURNS: u64 = 20;
    let make = || Repository::<Tickets>::new(store.clone());
    let (a, b) = (make(), make());
    let id = id();
    let mut versions = Vec::new();
    for turn in 0..TURNS {
        for (who, repo) in [("a", &a), ("b", &b)] {
            let done = repo
                .execute(&id, format!("{who}{turn}"))
                .await
                .unwrap_or_else(|e| panic!("{who}'s command of turn {turn} failed: {e}"));
            assert_eq!(done.events.len(), 1);
            assert_eq!(
                done.events[0].number, done.version,
                "{who} decided turn {turn} on a stale state"
            );
            versions.push(done.version);
        }
    }
    assert_eq!(versions, (1..=2 * TURNS).collect::<Vec<_>>(), "dense");
    let stored: Vec<u64> = {
        use futures::TryStreamExt;
        store
            .read_stream(&Tickets::stream_id(&id), 1)
            .map_ok(|e| e.decode::<Taken>().expect("decodes").number)
            .try_collect()
            .await
            .expect("read_stream succeeds")
    };
    assert_eq!(stored, versions, "every command stored once, in order");
    for (who, repo) in [("a", &a), ("b", &b)] {
        let RepositoryMetrics {
            cache_hits,
            cache_conflicts,
            ..
        } = repo.metrics();
        // After its first command, each of a repository's commands found the entry it kept,
        // one version behind the other repository's write: a hit, then a conflict.
        assert!(
            cache_hits >= TURNS - 1 && cache_conflicts >= TURNS - 1,
            "{who} did not decide on its cache: {:?}",
            repo.metrics()
        );
    }
    // One repository alone: every command after the first is a hit that appends.
    let alone = make();
    for n in 0..5 {
        alone.execute(&id, format!("alone{n}")).await.unwrap();
    }
    let m = alone.metrics();
    assert_eq!(
        (m.cache_hits, m.cache_conflicts, m.loads),
        (4, 0, 1),
        "{m:?}"
    );
}

/// A cache bounded at N entries never holds more, however many aggregates pass through it;
/// an evicted aggregate loads again, correctly.
pub async fn the_cache_holds_at_most_its_bound<S: EventStore>(store: Arc<S>) {
    const BOUND: usize = 8;
    let repo = Repository::<Counter>::builder(store.clone())
        .cache(BOUND, None)
        .build();
    let ids: Vec<String> = (0..60).map(|_| id()).collect();
    for round in 1..=2u64 {
        for id in &ids {
            repo.execute(id, round).await.unwrap();
            let cached = repo.metrics().cached;
            assert!(
                cached <= BOUND as u64,
                "{cached} entries kept, bound {BOUND}"
            );
        }
    }
    let m = repo.metrics();
    assert!(m.cached > 0, "{m:?}");
    assert!(
        m.cache_evictions >= (2 * ids.len() - BOUND) as u64 / 2,
        "{m:?}"
    );
    for id in &ids {
        assert_eq!(repo.load(id).await.unwrap().state.value, 3, "{id}");
    }
}

/// A command after its subject was shredded is not decided on the state the cache kept from
/// before: the entry is passed over, the load reads shredded events, and the command fails
/// with [`Error::Shredded`]. A repository without a cache behaves the same (the fixture of
/// the comparison), and so does the given/when/then fixture, which keeps no state between
/// runs.
pub async fn shredded_subjects_are_not_decided_on_from_the_cache<S>(store: Arc<S>)
where
    S: EventStore + KeyStore,
{
    let codec = Codec::builder().encrypt_streams(store.clone()).build();
    let events = codec.events(store.clone());
    let cached = Repository::<Tickets>::new(events.clone());
    let uncached = Repository::<Tickets>::builder(events.clone())
        .cache(0, None)
        .build();
    let id = id();
    for n in 0..3 {
        cached.execute(&id, format!("before{n}")).await.unwrap();
    }
    assert_eq!(cached.metrics().cached, 1, "warm");
    let subject = Tickets::stream_id(&id).to_string();
    assert!(codec.shred(&subject).await.unwrap(), "the stream had a key");

    for (who, repo) in [("cached", &cached), ("uncached", &uncached)] {
        let hits = repo.metrics().cache_hits;
        match repo.execute(&id, "after".to_owned()).await {
            Err(e @ Error::Shredded { .. }) => assert!(e.to_string().contains(&subject), "{e}"),
            other => panic!("{who}: a command on a shredded aggregate gave {other:?}"),
        }
        assert_eq!(
            repo.metrics().cache_hits,
            hits,
            "{who}: decided from memory"
        );
    }
    // The fixture decides on the history it is given, nothing kept from other runs.
    let fixture = AggregateTest::<Tickets>::given(vec![Taken {
        number: 3,
        by: "x".into(),
    }])
    .when("y".into())
    .then_expect(vec![Taken {
        number: 4,
        by: "y".into(),
    }]);
    assert_eq!(fixture.last, 4);
}
