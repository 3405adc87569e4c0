//! Spans: one per dispatch and per append, with the fields the docs promise, and the
//! dispatch's correlation id carried into the append.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use keel::bus::{Command, CommandBus, TraceLayer};
use keel::doc::Counter;
use keel::{Metadata, Repository};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata as TraceMetadata, Subscriber};

type Spans = Vec<(String, BTreeMap<String, String>)>;

/// Every span's name and fields (as text), in creation order.
#[derive(Clone, Default)]
struct Recorder {
    spans: Arc<Mutex<Spans>>,
    next: Arc<AtomicU64>,
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_owned(),
            format!("{value:?}").trim_matches('"').to_owned(),
        );
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl Subscriber for Recorder {
    fn enabled(&self, _: &TraceMetadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut fields = BTreeMap::new();
        span.record(&mut Fields(&mut fields));
        let mut spans = self.spans.lock().unwrap();
        spans.push((span.metadata().name().to_owned(), fields));
        self.next.fetch_add(1, Ordering::SeqCst);
        Id::from_u64(spans.len() as u64)
    }
    fn record(&self, span: &Id, values: &Record<'_>) {
        let mut spans = self.spans.lock().unwrap();
        if let Some((_, fields)) = spans.get_mut(span.into_u64() as usize - 1) {
            values.record(&mut Fields(fields));
        }
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, _: &Event<'_>) {}
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

#[derive(Clone, Debug)]
struct Add {
    id: String,
    by: u64,
}

impl Command for Add {
    type Output = u64;
}

#[test]
fn dispatch_and_append_spans_carry_type_stream_version_and_correlation() {
    let recorder = Recorder::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tracing::subscriber::with_default(recorder.clone(), || {
        rt.block_on(async {
            let repo = Repository::<Counter>::new(Arc::new(keel_memory::MemoryStore::new()));
            let bus = CommandBus::builder()
                .layer(TraceLayer)
                .command(move |c: Add, _meta: Metadata| {
                    let repo = repo.clone();
                    async move { Ok(repo.execute(&c.id, c.by).await?.version) }
                })
                .unwrap()
                .build();
            bus.send(Add {
                id: "a".into(),
                by: 2,
            })
            .await
            .unwrap();
            bus.send(Add {
                id: "a".into(),
                by: 3,
            })
            .await
            .unwrap();
        })
    });
    let spans = recorder.spans.lock().unwrap().clone();
    let named = |name: &str| -> Vec<BTreeMap<String, String>> {
        spans
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, f)| f.clone())
            .collect()
    };
    let dispatches = named("keel.dispatch");
    let appends = named("keel.append");
    assert_eq!((dispatches.len(), appends.len()), (2, 2), "{spans:?}");
    for (i, (dispatch, append)) in dispatches.iter().zip(&appends).enumerate() {
        assert_eq!(dispatch["type"], "Add");
        assert_eq!(dispatch["kind"], "command");
        assert_eq!(append["stream"], "counter-a");
        assert_eq!(append["aggregate"], "counter");
        assert_eq!(append["event_type"], "Incremented");
        assert_eq!(
            append["version"],
            (i + 1).to_string(),
            "recorded after the append"
        );
        assert_eq!(
            append["correlation_id"], dispatch["correlation_id"],
            "the append belongs to the dispatch's conversation"
        );
        assert!(uuid::Uuid::parse_str(&dispatch["correlation_id"]).is_ok());
    }
    assert_ne!(
        dispatches[0]["correlation_id"],
        dispatches[1]["correlation_id"]
    );
}
