//! Messages as the buses see them: typed [`Command`]s and [`Query`]s, erased into [`Request`]s
//! for the layers.

use std::any::Any;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::event::Metadata;

/// A request to change state, handled by exactly one handler.
///
/// `validate` is called by [`ValidateLayer`](super::ValidateLayer) before the handler runs.
pub trait Command: Clone + Send + Sync + 'static {
    /// What the handler returns.
    type Output: Clone + Send + Sync + 'static;

    /// Checks the command on its own (no state): `Err(reason)` refuses it.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// A request to read state, handled by exactly one handler. Queries are `Hash` and `Eq` so
/// that [`CacheLayer`](super::CacheLayer) can key results by the query itself: two queries
/// share a cached answer only when they are equal, never because their hashes collide.
pub trait Query: Clone + Hash + Eq + Send + Sync + 'static {
    /// What the handler returns.
    type Output: Clone + Send + Sync + 'static;

    /// Checks the query on its own: `Err(reason)` refuses it.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Whether a request is a command or a query.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A [`Command`].
    Command,
    /// A [`Query`].
    Query,
}

impl Kind {
    /// `"command"` or `"query"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Command => "command",
            Kind::Query => "query",
        }
    }
}

/// A message in erased form, as layers see it.
pub trait Message: Send + Sync + 'static {
    /// The message type's short name (for errors, spans, metrics).
    fn type_name(&self) -> &'static str;
    /// The message's own validation.
    fn validate(&self) -> Result<(), String>;
    /// A hash of the query's type and value (`None` for commands: never cached). Equal
    /// queries hash alike; unequal ones may too, so a cache also compares with
    /// [`same_query`](Message::same_query).
    fn query_hash(&self) -> Option<u64>;
    /// Whether `other` is a query of the same type, equal to this one.
    fn same_query(&self, other: &dyn Message) -> bool;
    /// The typed message, for downcasting.
    fn as_any(&self) -> &dyn Any;
    /// The shared message as `Any`, so the handler can take it without a copy when no layer
    /// kept a reference.
    #[doc(hidden)]
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

pub(crate) struct CommandMessage<C>(pub C);
pub(crate) struct QueryMessage<Q>(pub Q);

impl<C: Command> Message for CommandMessage<C> {
    fn type_name(&self) -> &'static str {
        short_type_name::<C>()
    }
    fn validate(&self) -> Result<(), String> {
        self.0.validate()
    }
    fn query_hash(&self) -> Option<u64> {
        None
    }
    fn same_query(&self, _: &dyn Message) -> bool {
        false
    }
    fn as_any(&self) -> &dyn Any {
        &self.0
    }
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

impl<Q: Query> Message for QueryMessage<Q> {
    fn type_name(&self) -> &'static str {
        short_type_name::<Q>()
    }
    fn validate(&self) -> Result<(), String> {
        self.0.validate()
    }
    fn query_hash(&self) -> Option<u64> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        std::any::TypeId::of::<Q>().hash(&mut hasher);
        self.0.hash(&mut hasher);
        Some(hasher.finish())
    }
    fn same_query(&self, other: &dyn Message) -> bool {
        other.as_any().downcast_ref::<Q>() == Some(&self.0)
    }
    fn as_any(&self) -> &dyn Any {
        &self.0
    }
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

/// Takes the typed `M` out of an erased message: moved when this was the last reference,
/// cloned when a layer still holds one. `None` when the message is not an `M`.
pub(crate) fn take<M: Clone + Send + Sync + 'static>(message: Arc<dyn Message>) -> Option<M> {
    let any = message.into_any();
    let any = match any.downcast::<CommandMessage<M>>() {
        Ok(m) => return Some(Arc::try_unwrap(m).map_or_else(|s| s.0.clone(), |o| o.0)),
        Err(any) => any,
    };
    any.downcast::<QueryMessage<M>>()
        .ok()
        .map(|m| Arc::try_unwrap(m).map_or_else(|s| s.0.clone(), |o| o.0))
}

/// One dispatch travelling through the layers. Cloning is cheap (the message is shared), which
/// is what lets [`RetryLayer`](super::RetryLayer) send it again.
#[derive(Clone)]
pub struct Request {
    /// Command or query.
    pub kind: Kind,
    /// The message.
    pub message: Arc<dyn Message>,
    /// Correlation, causation and user metadata given by the sender.
    pub metadata: Metadata,
}

impl Request {
    /// The message type's short name.
    pub fn type_name(&self) -> &'static str {
        self.message.type_name()
    }
}

/// A handler's output in erased form; the bus downcasts it back to the message's `Output`.
pub type Reply = Arc<dyn Any + Send + Sync>;

/// The last path segment of a type's name, generics kept: `bank::Deposit` → `Deposit`.
pub(crate) fn short_type_name<T: ?Sized>() -> &'static str {
    let full = std::any::type_name::<T>();
    let base = full.split('<').next().unwrap_or(full);
    match base.rfind("::") {
        Some(i) => &full[i + 2..],
        None => full,
    }
}
