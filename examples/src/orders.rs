//! Orders across three aggregates, coordinated by a saga: reserve stock, create the order,
//! charge the payment, confirm; undone in reverse when a step fails.

use keel::{Aggregate, Command, CommandBus, DomainEvent, Metadata, Repository};
use serde::{Deserialize, Serialize};

/// Stock of one product. The rule: never reserve more than is on hand.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    /// Units on hand (not reserved).
    pub on_hand: u32,
}

/// What happens to stock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum InventoryEvent {
    /// Units arrived.
    Restocked { units: u32 },
    /// Units were set aside for an order.
    Reserved { order: String, units: u32 },
    /// A reservation was given back.
    Released { order: String, units: u32 },
}

/// Why stock refuses.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InventoryError {
    /// The stock rule.
    #[error("only {on_hand} on hand, {wanted} wanted")]
    OutOfStock { on_hand: u32, wanted: u32 },
}

impl DomainEvent for InventoryEvent {
    fn event_type(&self) -> &'static str {
        match self {
            InventoryEvent::Restocked { .. } => "Restocked",
            InventoryEvent::Reserved { .. } => "Reserved",
            InventoryEvent::Released { .. } => "Released",
        }
    }
}

impl Aggregate for Inventory {
    const TYPE: &'static str = "inventory";
    type Command = InventoryEvent;
    type Event = InventoryEvent;
    type Error = InventoryError;

    fn handle(&self, command: InventoryEvent) -> Result<Vec<InventoryEvent>, InventoryError> {
        match command {
            InventoryEvent::Reserved { units, .. } if units > self.on_hand => {
                Err(InventoryError::OutOfStock {
                    on_hand: self.on_hand,
                    wanted: units,
                })
            }
            other => Ok(vec![other]),
        }
    }

    fn apply(&mut self, event: &InventoryEvent) {
        match event {
            InventoryEvent::Restocked { units } | InventoryEvent::Released { units, .. } => {
                self.on_hand += units
            }
            InventoryEvent::Reserved { units, .. } => self.on_hand -= units,
        }
    }
}

/// An order's lifecycle.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    /// `None` before creation, then `placed`, `confirmed` or `cancelled`.
    pub state: Option<String>,
}

/// What happens to an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OrderEvent {
    /// Created, awaiting payment.
    Placed { sku: String, units: u32, total: u64 },
    /// Paid and confirmed.
    Confirmed,
    /// Called off.
    Cancelled,
}

/// Why an order refuses.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OrderError {
    /// Not in a state that allows it.
    #[error("the order is {0}")]
    Wrong(String),
}

impl DomainEvent for OrderEvent {
    fn event_type(&self) -> &'static str {
        match self {
            OrderEvent::Placed { .. } => "Placed",
            OrderEvent::Confirmed => "Confirmed",
            OrderEvent::Cancelled => "Cancelled",
        }
    }
}

impl Aggregate for Order {
    const TYPE: &'static str = "order";
    type Command = OrderEvent;
    type Event = OrderEvent;
    type Error = OrderError;

    fn handle(&self, command: OrderEvent) -> Result<Vec<OrderEvent>, OrderError> {
        let state = self.state.as_deref();
        match (&command, state) {
            (OrderEvent::Placed { .. }, None) => Ok(vec![command]),
            (OrderEvent::Confirmed | OrderEvent::Cancelled, Some("placed")) => Ok(vec![command]),
            (_, s) => Err(OrderError::Wrong(s.unwrap_or("not placed").to_owned())),
        }
    }

    fn apply(&mut self, event: &OrderEvent) {
        self.state = Some(
            match event {
                OrderEvent::Placed { .. } => "placed",
                OrderEvent::Confirmed => "confirmed",
                OrderEvent::Cancelled => "cancelled",
            }
            .to_owned(),
        );
    }
}

/// A customer's card: charges up to its limit.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Payment {
    /// Charged and not refunded.
    pub charged: u64,
}

/// What happens to a card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PaymentEvent {
    /// Money taken for an order.
    Charged { order: String, amount: u64 },
    /// Money given back.
    Refunded { order: String, amount: u64 },
}

/// Why a card refuses.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PaymentError {
    /// Over the card's limit.
    #[error(
        "card declined: {charged} already charged, {amount} more is over the limit of {limit}"
    )]
    Declined {
        charged: u64,
        amount: u64,
        limit: u64,
    },
}

/// Every card's limit in this example.
pub const CARD_LIMIT: u64 = 500;

impl DomainEvent for PaymentEvent {
    fn event_type(&self) -> &'static str {
        match self {
            PaymentEvent::Charged { .. } => "Charged",
            PaymentEvent::Refunded { .. } => "Refunded",
        }
    }
}

impl Aggregate for Payment {
    const TYPE: &'static str = "payment";
    type Command = PaymentEvent;
    type Event = PaymentEvent;
    type Error = PaymentError;

    fn handle(&self, command: PaymentEvent) -> Result<Vec<PaymentEvent>, PaymentError> {
        match command {
            PaymentEvent::Charged { amount, .. } if self.charged + amount > CARD_LIMIT => {
                Err(PaymentError::Declined {
                    charged: self.charged,
                    amount,
                    limit: CARD_LIMIT,
                })
            }
            other => Ok(vec![other]),
        }
    }

    fn apply(&mut self, event: &PaymentEvent) {
        match event {
            PaymentEvent::Charged { amount, .. } => self.charged += amount,
            PaymentEvent::Refunded { amount, .. } => self.charged -= amount,
        }
    }
}

/// Set units of a product aside for an order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReserveStock {
    pub sku: String,
    pub order: String,
    pub units: u32,
}

/// Give a reservation back.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReleaseStock {
    pub sku: String,
    pub order: String,
    pub units: u32,
}

/// Create an order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlaceOrder {
    pub order: String,
    pub sku: String,
    pub units: u32,
    pub total: u64,
}

/// Cancel an order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CancelOrder {
    pub order: String,
}

/// Confirm a paid order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConfirmOrder {
    pub order: String,
}

/// Charge a card for an order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChargeCard {
    pub card: String,
    pub order: String,
    pub amount: u64,
}

/// Refund an order's charge.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RefundCard {
    pub card: String,
    pub order: String,
    pub amount: u64,
}

macro_rules! commands {
    ($($t:ty),+) => {$(impl Command for $t { type Output = (); })+};
}
commands!(
    ReserveStock,
    ReleaseStock,
    PlaceOrder,
    CancelOrder,
    ConfirmOrder,
    ChargeCard,
    RefundCard
);
keel::saga_command!(
    ReserveStock,
    ReleaseStock,
    PlaceOrder,
    CancelOrder,
    ConfirmOrder,
    ChargeCard,
    RefundCard
);

/// The command bus of the orders domain: one handler per command, each executing its
/// aggregate through a repository (which also recognises a command sent twice by its id).
pub fn command_bus(store: std::sync::Arc<dyn keel::EventStore>) -> keel::Result<CommandBus> {
    let inventory = Repository::<Inventory>::new(store.clone());
    let orders = Repository::<Order>::new(store.clone());
    let payments = Repository::<Payment>::new(store);
    fn run<A: Aggregate>(
        repo: &Repository<A>,
        id: String,
        command: A::Command,
        meta: Metadata,
    ) -> impl std::future::Future<Output = keel::Result<()>> + Send + 'static
    where
        A::Command: Clone + Sync,
    {
        let repo = repo.clone();
        async move { repo.execute_with(&id, command, &meta).await.map(|_| ()) }
    }
    let (i1, i2, o1, o2, o3, p1, p2) = (
        inventory.clone(),
        inventory,
        orders.clone(),
        orders.clone(),
        orders,
        payments.clone(),
        payments,
    );
    Ok(CommandBus::builder()
        .command(move |c: ReserveStock, m| {
            run(
                &i1,
                c.sku,
                InventoryEvent::Reserved {
                    order: c.order,
                    units: c.units,
                },
                m,
            )
        })?
        .command(move |c: ReleaseStock, m| {
            run(
                &i2,
                c.sku,
                InventoryEvent::Released {
                    order: c.order,
                    units: c.units,
                },
                m,
            )
        })?
        .command(move |c: PlaceOrder, m| {
            run(
                &o1,
                c.order,
                OrderEvent::Placed {
                    sku: c.sku,
                    units: c.units,
                    total: c.total,
                },
                m,
            )
        })?
        .command(move |c: CancelOrder, m| run(&o2, c.order, OrderEvent::Cancelled, m))?
        .command(move |c: ConfirmOrder, m| run(&o3, c.order, OrderEvent::Confirmed, m))?
        .command(move |c: ChargeCard, m| {
            run(
                &p1,
                c.card,
                PaymentEvent::Charged {
                    order: c.order,
                    amount: c.amount,
                },
                m,
            )
        })?
        .command(move |c: RefundCard, m| {
            run(
                &p2,
                c.card,
                PaymentEvent::Refunded {
                    order: c.order,
                    amount: c.amount,
                },
                m,
            )
        })?
        .build())
}

/// The order saga's steps for one order.
pub fn order_saga(
    order: &str,
    sku: &str,
    units: u32,
    card: &str,
    total: u64,
) -> Vec<keel::saga::SagaStep> {
    use keel::saga::SagaStep;
    let (o, s, c) = (order.to_owned(), sku.to_owned(), card.to_owned());
    vec![
        SagaStep::new(
            "reserve_stock",
            ReserveStock {
                sku: s.clone(),
                order: o.clone(),
                units,
            },
        )
        .compensate_with(ReleaseStock {
            sku: s.clone(),
            order: o.clone(),
            units,
        }),
        SagaStep::new(
            "place_order",
            PlaceOrder {
                order: o.clone(),
                sku: s,
                units,
                total,
            },
        )
        .compensate_with(CancelOrder { order: o.clone() }),
        SagaStep::new(
            "charge_card",
            ChargeCard {
                card: c.clone(),
                order: o.clone(),
                amount: total,
            },
        )
        .compensate_with(RefundCard {
            card: c,
            order: o.clone(),
            amount: total,
        }),
        SagaStep::new("confirm_order", ConfirmOrder { order: o }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel::testing::AggregateTest;

    #[test]
    fn stock_cannot_go_below_zero() {
        AggregateTest::<Inventory>::given(vec![InventoryEvent::Restocked { units: 3 }])
            .when(InventoryEvent::Reserved {
                order: "o".into(),
                units: 4,
            })
            .then_expect_error(InventoryError::OutOfStock {
                on_hand: 3,
                wanted: 4,
            });
    }

    #[test]
    fn cards_decline_over_the_limit() {
        AggregateTest::<Payment>::given(vec![PaymentEvent::Charged {
            order: "a".into(),
            amount: 400,
        }])
        .when(PaymentEvent::Charged {
            order: "b".into(),
            amount: 101,
        })
        .then_expect_error(PaymentError::Declined {
            charged: 400,
            amount: 101,
            limit: CARD_LIMIT,
        });
    }

    #[test]
    fn only_placed_orders_are_confirmed() {
        AggregateTest::<Order>::given(vec![
            OrderEvent::Placed {
                sku: "w".into(),
                units: 1,
                total: 5,
            },
            OrderEvent::Cancelled,
        ])
        .when(OrderEvent::Confirmed)
        .then_expect_error(OrderError::Wrong("cancelled".into()));
    }
}
