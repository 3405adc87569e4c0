//! The [`CommandBus`] and [`QueryBus`]: typed dispatch to one handler per message type, through
//! composable [layers](Layer).
//!
//! A handler is registered for a message *type* (the type is the key, no strings), and
//! `send`/`ask` return that handler's typed output. Between the caller and the handler sits a
//! pipeline of layers, tower-style: each [`Layer`] wraps a [`Service`] and never knows what it
//! wraps. Layers see every message in erased form ([`Request`]), so one layer serves all types.
//!
//! # Order
//! Layers run in the order they are added: the first added is the outermost. With
//! `.layer(TraceLayer).layer(TimeoutLayer::new(d))` the span covers the timeout; with the
//! reverse order a timed-out dispatch would still end its span properly but the timeout would
//! not include the span's bookkeeping. Put [`RetryLayer`] inside [`TimeoutLayer`] to bound the
//! whole retried dispatch, outside it to give each attempt its own limit.
//!
//! ```
//! use std::time::Duration;
//! use keel::bus::{Command, CommandBus, MetricsLayer, TimeoutLayer, TraceLayer};
//!
//! #[derive(Clone, Debug)]
//! struct Greet(String);
//! impl Command for Greet { type Output = String; }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> keel::Result<()> {
//! let metrics = MetricsLayer::new();
//! let bus = CommandBus::builder()
//!     .layer(TraceLayer)
//!     .layer(metrics.clone())
//!     .layer(TimeoutLayer::new(Duration::from_secs(1)))
//!     .command(|Greet(name), _meta| async move { Ok(format!("hello, {name}")) })?
//!     .build();
//! assert_eq!(bus.send(Greet("ada".into())).await?, "hello, ada");
//! assert_eq!(metrics.snapshot()["Greet"].count, 1);
//! # Ok(()) }
//! ```

mod layers;
mod message;

pub use layers::{
    CacheLayer, DispatchStats, MetricsLayer, RetryLayer, TimeoutLayer, TraceLayer, ValidateLayer,
};
pub use message::{Command, Kind, Message, Query, Reply, Request};

use message::{CommandMessage, QueryMessage};

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;

use crate::error::{Error, Result};
use crate::event::Metadata;

/// One step of the dispatch pipeline: takes a [`Request`], eventually gives a [`Reply`].
pub trait Service: Send + Sync + 'static {
    /// Handles one request.
    fn call(&self, request: Request) -> BoxFuture<'static, Result<Reply>>;
}

/// Wraps a [`Service`] in another; cross-cutting behaviour for every message type.
pub trait Layer: Send + Sync + 'static {
    /// The service that runs this layer's behaviour around `inner`.
    fn layer(&self, inner: Arc<dyn Service>) -> Arc<dyn Service>;
}

/// A type-erased handler: calls the user's function with the typed message.
struct Handler<M, F> {
    f: F,
    _message: std::marker::PhantomData<fn(M)>,
}

impl<M, F, Fut, O> Service for Handler<M, F>
where
    M: Clone + Send + Sync + 'static,
    F: Fn(M, Metadata) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O>> + Send + 'static,
    O: Send + Sync + 'static,
{
    fn call(&self, request: Request) -> BoxFuture<'static, Result<Reply>> {
        let Request {
            message, metadata, ..
        } = request;
        let Some(message) = message::take::<M>(message) else {
            // The router keys handlers by TypeId, so this is unreachable by construction;
            // answer with an error rather than a panic all the same.
            let type_name = message::short_type_name::<M>();
            return Box::pin(async move { Err(Error::HandlerNotFound { type_name }) });
        };
        let scope = metadata.clone();
        // A handler can panic while building its future or while running it; both are caught.
        let fut = match std::panic::catch_unwind(AssertUnwindSafe(|| (self.f)(message, metadata))) {
            Ok(fut) => fut,
            Err(panic) => {
                let err = panicked(message::short_type_name::<M>(), panic);
                return Box::pin(async move { Err(err) });
            }
        };
        // The handler runs with the dispatch's metadata in scope, so a repository it calls
        // stamps the events with it even when the handler does not pass it on.
        //
        // Combinators rather than an `async` block: a block would hold the handler's future
        // twice (as captured and as awaited), and a smaller box is a cheaper allocation.
        let fut = AssertUnwindSafe(fut)
            .catch_unwind()
            .map(|outcome| match outcome {
                Ok(out) => out.map(|o| Arc::new(o) as Reply),
                Err(panic) => Err(panicked(message::short_type_name::<M>(), panic)),
            });
        Box::pin(DISPATCH.scope(scope, fut))
    }
}

tokio::task_local! {
    static DISPATCH: Metadata;
}

/// The metadata of the command or query being handled by the current task, if any: what
/// [`Repository::execute`](crate::Repository::execute) stamps on the events it appends.
pub fn current_metadata() -> Option<Metadata> {
    DISPATCH.try_with(Metadata::clone).ok()
}

fn panicked(type_name: &'static str, panic: Box<dyn Any + Send>) -> Error {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned());
    Error::HandlerPanicked { type_name, message }
}

/// Hashes a `TypeId` by what it already is: a hash.
#[derive(Default)]
struct TypeIdHasher(u64);

impl std::hash::Hasher for TypeIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
    fn write_u128(&mut self, n: u128) {
        self.0 ^= n as u64 ^ (n >> 64) as u64;
    }
}

type HandlerMap = HashMap<TypeId, Arc<dyn Service>, std::hash::BuildHasherDefault<TypeIdHasher>>;

/// The innermost service: finds the handler by the message's type.
struct Router {
    handlers: HandlerMap,
}

impl Service for Router {
    fn call(&self, request: Request) -> BoxFuture<'static, Result<Reply>> {
        match self.handlers.get(&request.message.as_any().type_id()) {
            Some(handler) => handler.call(request),
            None => {
                let type_name = request.type_name();
                Box::pin(async move { Err(Error::HandlerNotFound { type_name }) })
            }
        }
    }
}

/// Handlers and layers being assembled; shared by both buses.
struct Assembly {
    handlers: HandlerMap,
    layers: Vec<Arc<dyn Layer>>,
}

impl Assembly {
    fn new() -> Self {
        Assembly {
            handlers: HandlerMap::default(),
            layers: Vec::new(),
        }
    }

    fn register<M, F, Fut, O>(&mut self, f: F) -> Result<()>
    where
        M: Clone + Send + Sync + 'static,
        F: Fn(M, Metadata) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O>> + Send + 'static,
        O: Send + Sync + 'static,
    {
        let handler = Arc::new(Handler {
            f,
            _message: std::marker::PhantomData,
        });
        match self.handlers.entry(TypeId::of::<M>()) {
            std::collections::hash_map::Entry::Occupied(_) => Err(Error::DuplicateHandler {
                type_name: message::short_type_name::<M>(),
            }),
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(handler);
                Ok(())
            }
        }
    }

    fn build(self) -> Arc<dyn Service> {
        let router: Arc<dyn Service> = Arc::new(Router {
            handlers: self.handlers,
        });
        self.layers
            .iter()
            .rev()
            .fold(router, |inner, layer| layer.layer(inner))
    }
}

async fn dispatch<M: 'static, O>(
    pipeline: &Arc<dyn Service>,
    kind: Kind,
    message: Arc<dyn Message>,
    metadata: Metadata,
) -> Result<O>
where
    O: Clone + Send + Sync + 'static,
{
    // Every dispatch has an id (its message id: the causation id of what it causes), names
    // what caused it (the enclosing dispatch, when sent from inside a handler) and belongs to
    // a conversation (the correlation id): the sender's, the enclosing one's, or a new one.
    let mut metadata = metadata;
    let parent = DISPATCH.try_with(|m| (m.correlation_id, m.message_id)).ok();
    if metadata.correlation_id.is_none() {
        metadata.correlation_id = parent
            .and_then(|(correlation, _)| correlation)
            .or_else(|| Some(uuid::Uuid::new_v4()));
    }
    if metadata.causation_id.is_none() {
        metadata.causation_id = parent.and_then(|(_, id)| id);
    }
    if metadata.message_id.is_none() {
        metadata.message_id = Some(metadata.command_id.unwrap_or_else(uuid::Uuid::new_v4));
    }
    let reply = pipeline
        .call(Request {
            kind,
            message,
            metadata,
        })
        .await?;
    match reply.downcast::<O>() {
        Ok(out) => Ok(Arc::try_unwrap(out).unwrap_or_else(|shared| (*shared).clone())),
        // Only a layer that replaced the reply with another type gets here.
        Err(_) => Err(Error::Encode {
            what: format!("reply to `{}`", message::short_type_name::<M>()),
            reason: "a layer returned a reply of another type".to_owned(),
        }),
    }
}

macro_rules! bus {
    ($bus:ident, $builder:ident, $trait:ident, $wrap:ident, $kind:expr, $register:ident, $send:ident, $send_with:ident, $doc:literal) => {
        #[doc = $doc]
        #[derive(Clone)]
        pub struct $bus {
            pipeline: Arc<dyn Service>,
        }

        #[doc = concat!("Assembles a [`", stringify!($bus), "`]: handlers and layers.")]
        pub struct $builder {
            assembly: Assembly,
        }

        impl $bus {
            #[doc = concat!("A builder for a [`", stringify!($bus), "`].")]
            pub fn builder() -> $builder {
                $builder {
                    assembly: Assembly::new(),
                }
            }

            #[doc = "Dispatches `message` to its handler through the layers and returns the handler's output."]
            pub async fn $send<M: $trait>(&self, message: M) -> Result<M::Output> {
                dispatch::<M, M::Output>(&self.pipeline, $kind, Arc::new($wrap(message)), Metadata::default()).await
            }

            #[doc = "Dispatches with metadata (correlation and causation ids) that the handler receives."]
            pub async fn $send_with<M: $trait>(
                &self,
                message: M,
                metadata: Metadata,
            ) -> Result<M::Output> {
                dispatch::<M, M::Output>(&self.pipeline, $kind, Arc::new($wrap(message)), metadata).await
            }
        }

        impl $builder {
            #[doc = "Registers the handler of message type `M`; a second handler for the same type is [`Error::DuplicateHandler`]."]
            pub fn $register<M, F, Fut>(mut self, handler: F) -> Result<Self>
            where
                M: $trait,
                F: Fn(M, Metadata) -> Fut + Send + Sync + 'static,
                Fut: Future<Output = Result<M::Output>> + Send + 'static,
            {
                self.assembly.register::<M, F, Fut, M::Output>(handler)?;
                Ok(self)
            }

            #[doc = "Adds a layer; the first added runs outermost."]
            pub fn layer(mut self, layer: impl Layer) -> Self {
                self.assembly.layers.push(Arc::new(layer));
                self
            }

            #[doc = "Adds a layer only when it is `Some`."]
            pub fn option_layer(self, layer: Option<impl Layer>) -> Self {
                match layer {
                    Some(layer) => self.layer(layer),
                    None => self,
                }
            }

            #[doc = "The bus."]
            pub fn build(self) -> $bus {
                $bus {
                    pipeline: self.assembly.build(),
                }
            }
        }
    };
}

/// The [`Metadata::user`] key that asks for an answer not taken from a [`CacheLayer`]:
/// [`QueryBus::ask_after`] sets it, since an answer kept from before a write may not show it.
pub const FRESH: &str = "keel.fresh";

impl QueryBus {
    /// Asks `query` once projection `projection` has applied `written` (read-your-writes:
    /// the reply of the command that wrote carries it, see
    /// [`Executed::written`](crate::Executed::written)). Waits with `visibility` up to
    /// `timeout`; on a timeout the query is not asked and the error is
    /// [`Error::Timeout`], naming the projection and the write. The query goes past any
    /// [`CacheLayer`] (metadata key [`FRESH`]).
    pub async fn ask_after<Q: Query>(
        &self,
        visibility: &crate::projection::Visibility,
        projection: &str,
        written: &crate::feed::Written,
        timeout: Duration,
        query: Q,
    ) -> Result<Q::Output> {
        visibility.wait_for(projection, written, timeout).await?;
        let mut metadata = Metadata::default();
        metadata.user.insert(FRESH.to_owned(), "1".to_owned());
        self.ask_with(query, metadata).await
    }
}

impl CommandBusBuilder {
    /// Adds the layers a [`BusConfig`](crate::config::BusConfig) asks for, outermost first:
    /// trace, validate, timeout, retry.
    pub fn config(self, config: &crate::config::BusConfig) -> Self {
        self.option_layer(config.tracing.then_some(TraceLayer))
            .option_layer(config.validation.then_some(ValidateLayer))
            .option_layer(
                config
                    .timeout_ms
                    .map(|ms| TimeoutLayer::new(Duration::from_millis(ms))),
            )
            .option_layer((config.retry_attempts > 0).then(|| {
                RetryLayer::new(
                    config.retry_attempts,
                    Duration::from_millis(config.retry_backoff_ms),
                )
            }))
    }
}

impl QueryBusBuilder {
    /// Adds the layers a [`BusConfig`](crate::config::BusConfig) asks for, outermost first:
    /// trace, validate, cache, timeout.
    pub fn config(self, config: &crate::config::BusConfig) -> Self {
        self.option_layer(config.tracing.then_some(TraceLayer))
            .option_layer(config.validation.then_some(ValidateLayer))
            .option_layer(
                config
                    .cache_ttl_ms
                    .map(|ms| CacheLayer::new(Duration::from_millis(ms))),
            )
            .option_layer(
                config
                    .timeout_ms
                    .map(|ms| TimeoutLayer::new(Duration::from_millis(ms))),
            )
    }
}

bus!(
    CommandBus,
    CommandBusBuilder,
    Command,
    CommandMessage,
    Kind::Command,
    command,
    send,
    send_with,
    "Dispatches commands to their handlers. Cloning is cheap."
);
bus!(
    QueryBus,
    QueryBusBuilder,
    Query,
    QueryMessage,
    Kind::Query,
    query,
    ask,
    ask_with,
    "Dispatches queries to their handlers. Cloning is cheap."
);
