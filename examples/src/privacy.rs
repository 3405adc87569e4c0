//! Customers whose personal data is encrypted under a key of their own, and a directory read
//! model: the domain of `cargo run --example privacy` (the right to be forgotten by
//! crypto-shredding).

use std::collections::BTreeMap;

use async_trait::async_trait;
use keel::projection::{Generations, Projection};
use keel::{Aggregate, BoxError, DomainEvent, RecordedEvent, StreamId};
use serde::{Deserialize, Serialize};

/// A customer's state.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Customer {
    /// Their name (`None`: not registered).
    pub name: Option<String>,
    /// Their e-mail address.
    pub email: String,
}

/// What a customer record can be asked to do.
#[derive(Debug, Clone, PartialEq)]
pub enum CustomerCommand {
    /// Register a new customer.
    Register {
        /// Full name.
        name: String,
        /// E-mail address.
        email: String,
    },
    /// Change the e-mail address.
    ChangeEmail {
        /// The new address.
        email: String,
    },
}

/// What happened to a customer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CustomerEvent {
    /// The customer registered.
    Registered {
        /// Full name.
        name: String,
        /// E-mail address.
        email: String,
    },
    /// The e-mail address changed.
    EmailChanged {
        /// The new address.
        email: String,
    },
}

impl DomainEvent for CustomerEvent {
    fn event_type(&self) -> &'static str {
        match self {
            CustomerEvent::Registered { .. } => "Registered",
            CustomerEvent::EmailChanged { .. } => "EmailChanged",
        }
    }
}

/// Why a customer command was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CustomerError {
    /// Registering twice.
    #[error("the customer is already registered")]
    AlreadyRegistered,
    /// Changing an unknown customer.
    #[error("no such customer")]
    Unknown,
    /// An address without an `@`.
    #[error("`{0}` is not an e-mail address")]
    BadEmail(String),
}

fn check_email(email: &str) -> Result<(), CustomerError> {
    if email.contains('@') {
        Ok(())
    } else {
        Err(CustomerError::BadEmail(email.to_owned()))
    }
}

impl Aggregate for Customer {
    const TYPE: &'static str = "customer";
    type Command = CustomerCommand;
    type Event = CustomerEvent;
    type Error = CustomerError;

    fn handle(&self, command: CustomerCommand) -> Result<Vec<CustomerEvent>, CustomerError> {
        match (command, &self.name) {
            (CustomerCommand::Register { .. }, Some(_)) => Err(CustomerError::AlreadyRegistered),
            (CustomerCommand::Register { name, email }, None) => {
                check_email(&email)?;
                Ok(vec![CustomerEvent::Registered { name, email }])
            }
            (CustomerCommand::ChangeEmail { .. }, None) => Err(CustomerError::Unknown),
            (CustomerCommand::ChangeEmail { email }, Some(_)) => {
                check_email(&email)?;
                Ok(vec![CustomerEvent::EmailChanged { email }])
            }
        }
    }

    fn apply(&mut self, event: &CustomerEvent) {
        match event {
            CustomerEvent::Registered { name, email } => {
                self.name = Some(name.clone());
                self.email = email.clone();
            }
            CustomerEvent::EmailChanged { email } => self.email = email.clone(),
        }
    }
}

/// The subject whose key encrypts a stream: customer streams (`customer-<id>`) each have their
/// own; other streams are not encrypted.
pub fn subject_of(stream: &StreamId) -> Option<String> {
    stream
        .as_str()
        .strip_prefix("customer-")
        .map(|id| format!("customer:{id}"))
}

/// Customer id → (name, e-mail), kept by a projection.
#[derive(Default)]
pub struct Directory {
    model: Generations<BTreeMap<String, (String, String)>>,
}

impl Directory {
    /// Everyone in the directory, by id.
    pub fn entries(&self) -> Vec<(String, String, String)> {
        self.model.read(|m| {
            m.iter()
                .map(|(id, (name, email))| (id.clone(), name.clone(), email.clone()))
                .collect()
        })
    }
}

#[async_trait]
impl Projection for Directory {
    fn name(&self) -> &str {
        "customer_directory"
    }

    fn handles(&self, event_type: &str) -> bool {
        matches!(event_type, "Registered" | "EmailChanged")
    }

    async fn apply(&self, generation: u64, event: &RecordedEvent) -> Result<(), BoxError> {
        let Some(id) = event.stream.as_str().strip_prefix("customer-") else {
            return Ok(());
        };
        if event.is_shredded() {
            // A forgotten customer: make sure nothing of theirs stays in the read model.
            self.model.update(generation, |m| {
                m.remove(id);
            });
            return Ok(());
        }
        let event: CustomerEvent = event.decode()?;
        self.model.update(generation, |m| match event {
            CustomerEvent::Registered { name, email } => {
                m.insert(id.to_owned(), (name, email));
            }
            CustomerEvent::EmailChanged { email } => {
                if let Some(entry) = m.get_mut(id) {
                    entry.1 = email;
                }
            }
        });
        Ok(())
    }

    async fn notice(
        &self,
        generation: u64,
        event: &RecordedEvent,
        notice: keel::ending::StreamNotice,
    ) -> Result<(), BoxError> {
        // A closed account: its entry goes, whatever its events said.
        if let (Some(id), keel::ending::StreamNotice::Deleted { .. }) =
            (event.stream.as_str().strip_prefix("customer-"), notice)
        {
            self.model.update(generation, |m| {
                m.remove(id);
            });
        }
        Ok(())
    }

    async fn reset(&self, generation: u64) -> Result<(), BoxError> {
        self.model.reset(generation);
        Ok(())
    }

    async fn activate(&self, generation: u64) -> Result<(), BoxError> {
        self.model.activate(generation);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel::testing::AggregateTest;

    #[test]
    fn registering_needs_an_email_address_and_happens_once() {
        AggregateTest::<Customer>::given_no_history()
            .when(CustomerCommand::Register {
                name: "Ada".into(),
                email: "ada.example.com".into(),
            })
            .then_expect_error(CustomerError::BadEmail("ada.example.com".into()));
        AggregateTest::<Customer>::given(vec![CustomerEvent::Registered {
            name: "Ada".into(),
            email: "ada@example.com".into(),
        }])
        .when(CustomerCommand::Register {
            name: "Ada".into(),
            email: "ada@example.com".into(),
        })
        .then_expect_error(CustomerError::AlreadyRegistered);
    }

    #[test]
    fn only_customer_streams_have_a_subject() {
        assert_eq!(
            subject_of(&StreamId::new("customer-ada")).as_deref(),
            Some("customer:ada")
        );
        assert_eq!(subject_of(&StreamId::new("order-1")), None);
    }
}
