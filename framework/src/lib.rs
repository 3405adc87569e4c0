//! # Keel
//!
//! CQRS and event sourcing for Rust, with ScyllaDB as the production store.
//!
//! Application code implements [`Aggregate`]s (commands in, events out, state rebuilt by
//! applying events), loads and saves them through a [`Repository`], and dispatches commands
//! and queries through the [`CommandBus`] and [`QueryBus`]. Everything is stored through the
//! small traits of [`store`]; `keel-memory` implements them in memory and `keel-scylla` on
//! ScyllaDB (or Cassandra 5). A [`codec::Codec`] in front of a store compresses payloads and
//! encrypts them with a key per subject, and forgets a subject by deleting its key.
//!
//! # Features
//!
//! | feature | default | what it adds | pulls in |
//! |---|---|---|---|
//! | `encryption` | yes | payload encryption and crypto-shredding: `codec::{DataKey, MasterKey, KeyStore}`, `CodecBuilder::encrypt_*`, `Codec::shred` | aes-gcm, zeroize |
//! | `compression` | yes | LZ4 payloads: `CodecBuilder::compress_above` (without it, a compressed payload reads as corrupt, naming the feature) | lz4_flex |
//! | `sagas` | yes | the [`saga::SagaOrchestrator`], saga steps and commands (the `SagaStore` trait is always there, for stores) | typetag |
//! | `conformance` | no | the store conformance suite (implies the three above) | proptest, tokio's multi-thread runtime |
//! | `test-util` | no | the given/when/then aggregate fixture | |
//!
//! The library needs tokio's `rt`, `sync` and `time` only; the application picks its runtime.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use keel::{Aggregate, DomainEvent, Repository};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Default, Serialize, Deserialize)]
//! struct Light { on: bool }
//!
//! #[derive(Clone, Debug, Serialize, Deserialize)]
//! enum LightEvent { SwitchedOn, SwitchedOff }
//!
//! impl DomainEvent for LightEvent {
//!     fn event_type(&self) -> &'static str {
//!         match self { LightEvent::SwitchedOn => "SwitchedOn", LightEvent::SwitchedOff => "SwitchedOff" }
//!     }
//! }
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("the light is already {0}")]
//! struct Already(&'static str);
//!
//! impl Aggregate for Light {
//!     const TYPE: &'static str = "light";
//!     type Command = bool; // switch on (true) or off (false)
//!     type Event = LightEvent;
//!     type Error = Already;
//!
//!     fn handle(&self, on: bool) -> Result<Vec<LightEvent>, Already> {
//!         match (self.on, on) {
//!             (true, true) => Err(Already("on")),
//!             (false, false) => Err(Already("off")),
//!             (_, true) => Ok(vec![LightEvent::SwitchedOn]),
//!             (_, false) => Ok(vec![LightEvent::SwitchedOff]),
//!         }
//!     }
//!
//!     fn apply(&mut self, event: &LightEvent) {
//!         self.on = matches!(event, LightEvent::SwitchedOn);
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> keel::Result<()> {
//! let lights = Repository::<Light>::new(Arc::new(keel_memory::MemoryStore::new()));
//! lights.execute("hall", true).await?;
//! let err = lights.execute("hall", true).await.unwrap_err();
//! assert_eq!(err.to_string(), "light rejected the command: the light is already on");
//! assert!(lights.load("hall").await?.state.on);
//! # Ok(()) }
//! ```
//!
//! # Features
//! - `conformance`: the store conformance suite (`keel::conformance`), for store authors.
//! - `test-util`: the `testing::AggregateTest` given/when/then fixture.
#![deny(missing_docs)]

pub mod aggregate;
pub mod bus;
pub mod codec;
pub mod config;
pub mod ending;
pub mod error;
pub mod event;
pub mod feed;
pub mod health;
pub mod lifecycle;
pub mod metrics;
pub mod projection;
pub mod repository;
pub mod retry;
pub mod saga;
pub mod store;
pub mod upcast;

#[cfg(feature = "conformance")]
pub mod conformance;
#[cfg(feature = "test-util")]
pub mod testing;

#[doc(hidden)]
pub mod doc;

pub use aggregate::Aggregate;
pub use bus::{Command, CommandBus, Query, QueryBus};
pub use error::{BoxError, Error, Result};
pub use event::{
    AppendResult, DomainEvent, ExpectedVersion, Metadata, NewEvent, RecordedEvent, StreamId,
};
pub use feed::Cursor;
pub use repository::{Executed, Loaded, Repository, RepositoryMetrics, SnapshotPolicy};
pub use store::{
    CheckpointStore, EventPage, EventStore, EventStream, Fence, Lease, LeaseStore, PageStream,
    Snapshot, SnapshotStore,
};
pub use upcast::Upcasters;
