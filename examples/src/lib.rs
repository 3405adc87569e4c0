//! The domains behind Keel's examples, as a library so their tests run with `cargo test`.
//!
//! - [`bank`]: an `Account` aggregate with an overdraft rule (`cargo run --example bank`).
//! - [`blog`]: posts and two projections, posts by author and by tag (`cargo run --example blog`).
//! - [`orders`]: an order saga over inventory, order and payment (`cargo run --example orders`).
//! - [`service`]: an HTTP API and a projector over the bank and blog domains
//!   (`cargo run --bin service`).
//! - [`privacy`]: customers encrypted under keys of their own, forgotten by crypto-shredding
//!   (`cargo run --example privacy`).

pub mod bank;
pub mod blog;
#[cfg(feature = "prometheus")]
pub mod metrics;
pub mod orders;
pub mod privacy;
pub mod service;
pub mod store;
