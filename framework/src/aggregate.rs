//! The [`Aggregate`] trait: commands in, events out, state rebuilt by applying events.

use serde::{de::DeserializeOwned, Serialize};

use crate::event::{DomainEvent, StreamId};

/// A consistency boundary of the domain.
///
/// All business rules live in [`handle`](Aggregate::handle), which decides from the current
/// state which events a command produces, or refuses it. [`apply`](Aggregate::apply) only
/// evolves state from an event, never fails and never checks rules: it replays history that
/// already happened. Both are pure, which is what lets the [`Repository`](crate::Repository)
/// retry a command after a concurrency conflict and lets tests run without any store.
///
/// The state is serde so the repository can snapshot it; bump
/// [`SNAPSHOT_VERSION`](Aggregate::SNAPSHOT_VERSION) when its shape changes and old snapshots
/// are ignored (the stream is replayed instead).
///
/// ```
/// use keel::{Aggregate, DomainEvent};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Default, Serialize, Deserialize)]
/// struct Counter { value: u64 }
///
/// #[derive(Clone, Serialize, Deserialize)]
/// enum CounterEvent { Incremented { by: u64 } }
///
/// impl DomainEvent for CounterEvent {
///     fn event_type(&self) -> &'static str { "Incremented" }
/// }
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("cannot increment by zero")]
/// struct ZeroIncrement;
///
/// impl Aggregate for Counter {
///     const TYPE: &'static str = "counter";
///     type Command = u64;
///     type Event = CounterEvent;
///     type Error = ZeroIncrement;
///
///     fn handle(&self, by: u64) -> Result<Vec<CounterEvent>, ZeroIncrement> {
///         if by == 0 { return Err(ZeroIncrement); }
///         Ok(vec![CounterEvent::Incremented { by }])
///     }
///
///     fn apply(&mut self, event: &CounterEvent) {
///         match event { CounterEvent::Incremented { by } => self.value += by }
///     }
/// }
///
/// let mut counter = Counter::default();
/// for event in counter.handle(5).unwrap() { counter.apply(&event); }
/// assert_eq!(counter.value, 5);
/// assert!(counter.handle(0).is_err());
/// ```
pub trait Aggregate: Default + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The aggregate type's stable name; streams are named `"<TYPE>-<id>"`.
    const TYPE: &'static str;

    /// Schema version of the serialised state, for snapshots.
    const SNAPSHOT_VERSION: u32 = 1;

    /// What the aggregate can be asked to do.
    type Command: Send + 'static;

    /// What it emits.
    type Event: DomainEvent;

    /// Why it refuses a command.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Decides: the events `command` produces from the current state, or why it is refused.
    fn handle(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Evolves the state by one event that already happened.
    fn apply(&mut self, event: &Self::Event);

    /// The stream holding the aggregate with this id.
    fn stream_id(id: &str) -> StreamId {
        StreamId::of(Self::TYPE, id)
    }
}
