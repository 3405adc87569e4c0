//! Upcasting over a store: events stored at older schema versions keep their version through
//! the store (stream reads and the feed) and are upcast through the chain on read; a failing
//! upcaster names the event.

use std::sync::Arc;

use futures::TryStreamExt;
use serde::{Deserialize, Serialize};

use super::wait_for_feed;
use crate::error::Error;
use crate::event::{ExpectedVersion, Metadata, NewEvent, RecordedEvent};
use crate::repository::Repository;
use crate::store::EventStore;
use crate::upcast::Upcasters;
use crate::{Aggregate, DomainEvent};

/// Schema 3 of a payment: `amount` was `amt` in schema 1, and schema 1 and 2 had no currency.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum WalletEvent {
    /// A payment.
    Paid {
        /// How much.
        amount: u64,
        /// In what.
        currency: String,
    },
}

impl DomainEvent for WalletEvent {
    fn event_type(&self) -> &'static str {
        "Paid"
    }
    fn schema_version(&self) -> u32 {
        3
    }
}

/// The payments made.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Wallet {
    /// Amount and currency of each payment, in order.
    pub paid: Vec<(u64, String)>,
}

impl Aggregate for Wallet {
    const TYPE: &'static str = "wallet";
    type Command = ();
    type Event = WalletEvent;
    type Error = std::convert::Infallible;
    fn handle(&self, _: ()) -> Result<Vec<WalletEvent>, Self::Error> {
        Ok(vec![])
    }
    fn apply(&mut self, WalletEvent::Paid { amount, currency }: &WalletEvent) {
        self.paid.push((*amount, currency.clone()));
    }
}

/// 1 → 2 renames `amt`, 2 → 3 adds the currency; schema 1 without `amt` fails.
fn upcasters() -> Upcasters {
    Upcasters::new()
        .register("Paid", 1, |mut body| {
            let amt = body.get("amt").cloned().ok_or("v1 `Paid` without `amt`")?;
            body["amount"] = amt;
            Ok::<_, &str>(body)
        })
        .register("Paid", 2, |mut body| {
            body["currency"] = "EUR".into();
            Ok::<_, &str>(body)
        })
}

/// Events of schema 1, 2 and 3 in one stream: each keeps its schema version in the stream
/// and in the feed, and each loads, upcast, as schema 3, through the repository and from the
/// feed.
pub async fn old_schema_versions_are_upcast_on_read<S: EventStore>(store: Arc<S>) {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let stream = Wallet::stream_id(&id);
    let from = store.feed_heads().await.expect("feed_heads");
    let v1 = NewEvent::new("Paid", 1, &br#"{"Paid":{"amt":5}}"#[..]);
    let v2 = NewEvent::new("Paid", 2, &br#"{"Paid":{"amount":7}}"#[..]);
    let v3 = NewEvent::encode(
        &WalletEvent::Paid {
            amount: 9,
            currency: "USD".into(),
        },
        Metadata::default(),
    )
    .expect("encodes");
    store
        .append(&stream, ExpectedVersion::NoStream, vec![v1, v2, v3])
        .await
        .expect("append");
    let stored: Vec<RecordedEvent> = store
        .read_stream(&stream, 1)
        .try_collect()
        .await
        .expect("read_stream");
    let schemas: Vec<u32> = stored.iter().map(|e| e.schema_version).collect();
    assert_eq!(schemas, [1, 2, 3], "schema versions as stored");
    let expected = vec![(5, "EUR".into()), (7, "EUR".into()), (9, "USD".into())];

    let repo = Repository::<Wallet>::builder(store.clone())
        .upcasters(upcasters())
        .cache(0, None)
        .build();
    assert_eq!(repo.load(&id).await.expect("load").state.paid, expected);

    let fed = wait_for_feed(&*store, &from, &[&stream], 3).await;
    let schemas: Vec<u32> = fed.iter().map(|e| e.schema_version).collect();
    assert_eq!(schemas, [1, 2, 3], "schema versions in the feed");
    let upcasters = upcasters();
    let from_feed: Vec<(u64, String)> = fed
        .iter()
        .map(
            |e| match upcasters.decode::<WalletEvent>(e).expect("upcasts") {
                WalletEvent::Paid { amount, currency } => (amount, currency),
            },
        )
        .collect();
    assert_eq!(from_feed, expected, "the feed's events upcast alike");
}

/// An upcaster that fails gives [`Error::Upcast`] naming the stream, version, event type and
/// schema version, with the upcaster's reason; nothing is decoded past it.
pub async fn a_failing_upcaster_names_the_event<S: EventStore>(store: Arc<S>) {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let stream = Wallet::stream_id(&id);
    let good = NewEvent::new("Paid", 2, &br#"{"Paid":{"amount":1}}"#[..]);
    let bad = NewEvent::new("Paid", 1, &br#"{"Paid":{"oops":1}}"#[..]);
    store
        .append(&stream, ExpectedVersion::NoStream, vec![good, bad])
        .await
        .expect("append");
    let repo = Repository::<Wallet>::builder(store.clone())
        .upcasters(upcasters())
        .build();
    match repo.load(&id).await {
        Err(Error::Upcast {
            stream: s,
            version,
            event_type,
            from_version,
            reason,
        }) => {
            assert_eq!(
                (s, version, event_type.as_str(), from_version),
                (stream, 2, "Paid", 1)
            );
            assert!(reason.contains("without `amt`"), "{reason}");
        }
        other => panic!(
            "expected an upcast error, got {:?}",
            other.map(|l| l.version)
        ),
    }
}
