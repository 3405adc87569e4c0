//! Upcasting: turning events stored in an old shape into the current one, on read.
//!
//! History is never rewritten. When an event type changes shape, bump its
//! [`schema_version`](crate::DomainEvent::schema_version) and register an upcaster from the old
//! version; reads then pass old payloads through the chain of upcasters (v1 → v2 → v3 ...)
//! before deserialising.
//!
//! ```
//! use keel::Upcasters;
//! use serde_json::json;
//!
//! // v1 of `Deposited` stored the amount as `amt`.
//! let upcasters = Upcasters::new().register("Deposited", 1, |mut body| {
//!     let amt = body.get("amt").cloned().ok_or("missing `amt`")?;
//!     body["amount"] = amt;
//!     Ok::<_, &str>(body)
//! });
//! assert!(upcasters.handles("Deposited", 1));
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::event::{DomainEvent, RecordedEvent};

type UpcastFn = dyn Fn(Value) -> std::result::Result<Value, String> + Send + Sync;

/// The registered upcasters, keyed by (event type, schema version they upgrade from).
///
/// Each upcaster receives the event's body (the fields inside the serde variant) and returns
/// the body one schema version up.
#[derive(Clone, Default)]
pub struct Upcasters {
    by_type: HashMap<(String, u32), Arc<UpcastFn>>,
}

impl std::fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.by_type.keys()).finish()
    }
}

impl Upcasters {
    /// No upcasters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the upcaster of `event_type` from schema version `from_version` to the next.
    pub fn register<F, E>(mut self, event_type: &str, from_version: u32, upcast: F) -> Self
    where
        F: Fn(Value) -> std::result::Result<Value, E> + Send + Sync + 'static,
        E: std::fmt::Display,
    {
        let f = move |v: Value| upcast(v).map_err(|e| e.to_string());
        self.by_type
            .insert((event_type.to_owned(), from_version), Arc::new(f));
        self
    }

    /// Whether an upcaster from `from_version` of `event_type` is registered.
    pub fn handles(&self, event_type: &str, from_version: u32) -> bool {
        self.by_type
            .contains_key(&(event_type.to_owned(), from_version))
    }

    /// Decodes a recorded event into the domain type, upcasting old schema versions first.
    pub fn decode<E: DomainEvent>(&self, event: &RecordedEvent) -> Result<E> {
        if let Some(why) = &event.unreadable {
            return Err(why.to_error(event));
        }
        if self.by_type.is_empty() || !self.handles(&event.event_type, event.schema_version) {
            return decode_json(event, &event.payload);
        }
        let json = event.json()?;
        let mut value: Value = serde_json::from_slice(&json).map_err(|e| decode_error(event, e))?;
        // The payload is serde's externally tagged form: `{"Variant": body}` or `"Variant"`.
        let (tag, mut body) = match value.take() {
            Value::Object(map) if map.len() == 1 => map.into_iter().next().unwrap_or_default(),
            Value::String(tag) => (tag, Value::Null),
            _ => (event.event_type.to_string(), value),
        };
        let mut version = event.schema_version;
        while let Some(up) = self.by_type.get(&(event.event_type.to_string(), version)) {
            body = up(body).map_err(|reason| Error::Upcast {
                stream: event.stream.clone(),
                version: event.version,
                event_type: event.event_type.to_string(),
                from_version: version,
                reason,
            })?;
            version += 1;
        }
        let rebuilt = if body.is_null() {
            Value::String(tag)
        } else {
            Value::Object([(tag, body)].into_iter().collect())
        };
        serde_json::from_value(rebuilt).map_err(|e| decode_error(event, e))
    }
}

/// Decodes an event's JSON payload, naming the event on failure.
///
/// Keep this exactly this small: anything more here (even a cold branch) stops the compiler
/// inlining serde's `from_slice` through it, which costs replays a quarter of their time
/// (`cargo bench -p keel-benches --bench memory -- replay`). Encoded payloads are told apart
/// in [`decode_error`], off the hot path.
pub(crate) fn decode_json<T: DeserializeOwned>(event: &RecordedEvent, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| decode_error(event, e))
}

#[cold]
fn decode_error(event: &RecordedEvent, e: serde_json::Error) -> Error {
    if crate::codec::is_envelope(&event.payload) {
        // JSON never starts with NUL: a codec encoded this payload. Name what it needs.
        let reason = match event.json() {
            Err(error) => return error,
            Ok(json) => match serde_json::from_slice::<serde::de::IgnoredAny>(&json) {
                // The JSON inside is broken itself.
                Err(inner) => format!("inside the compressed payload: {inner}"),
                Ok(_) if e.is_data() => format!("inside the compressed payload: {e}"),
                Ok(_) => "the payload is compressed; decode it with `RecordedEvent::json` or read it through a `keel::codec::Codec` store".to_owned(),
            },
        };
        return Error::Decode {
            stream: event.stream.clone(),
            version: event.version,
            event_type: event.event_type.to_string(),
            schema_version: event.schema_version,
            reason,
        };
    }
    let reason = e.to_string();
    if reason.starts_with("unknown variant") {
        Error::UnknownEventType {
            stream: event.stream.clone(),
            version: event.version,
            event_type: event.event_type.to_string(),
        }
    } else {
        Error::Decode {
            stream: event.stream.clone(),
            version: event.version,
            event_type: event.event_type.to_string(),
            schema_version: event.schema_version,
            reason,
        }
    }
}
