//! A tiny aggregate shared by the documentation examples. Not part of the API.

use serde::{Deserialize, Serialize};

use crate::{Aggregate, DomainEvent};

/// A counter that refuses increments of zero.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Counter {
    /// The current value.
    pub value: u64,
}

/// The counter's one event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CounterEvent {
    /// The value grew.
    Incremented {
        /// By how much.
        by: u64,
    },
}

impl DomainEvent for CounterEvent {
    fn event_type(&self) -> &'static str {
        "Incremented"
    }
}

/// The counter's one refusal.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("cannot increment by zero")]
pub struct ZeroIncrement;

impl Aggregate for Counter {
    const TYPE: &'static str = "counter";
    type Command = u64;
    type Event = CounterEvent;
    type Error = ZeroIncrement;

    fn handle(&self, by: u64) -> Result<Vec<CounterEvent>, ZeroIncrement> {
        if by == 0 {
            return Err(ZeroIncrement);
        }
        Ok(vec![CounterEvent::Incremented { by }])
    }

    fn apply(&mut self, event: &CounterEvent) {
        match event {
            CounterEvent::Incremented { by } => self.value += by,
        }
    }
}
