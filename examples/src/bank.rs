//! A bank account: open it, deposit, withdraw, never below zero.

use keel::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

/// An account's state, rebuilt from its events.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Account {
    /// Who owns it (`None`: not opened yet).
    pub owner: Option<String>,
    /// The balance, in cents.
    pub balance: u64,
}

/// What an account can be asked to do.
#[derive(Debug, Clone, PartialEq)]
pub enum AccountCommand {
    /// Open the account with a first deposit.
    Open { owner: String, initial: u64 },
    /// Put money in.
    Deposit { amount: u64 },
    /// Take money out, if there is enough.
    Withdraw { amount: u64 },
}

/// What happened to an account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AccountEvent {
    /// The account was opened.
    Opened { owner: String, initial: u64 },
    /// Money was put in.
    Deposited { amount: u64 },
    /// Money was taken out.
    Withdrawn { amount: u64 },
}

impl DomainEvent for AccountEvent {
    fn event_type(&self) -> &'static str {
        match self {
            AccountEvent::Opened { .. } => "Opened",
            AccountEvent::Deposited { .. } => "Deposited",
            AccountEvent::Withdrawn { .. } => "Withdrawn",
        }
    }
}

/// Why an account refuses a command.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AccountError {
    /// Open twice.
    #[error("the account is already open")]
    AlreadyOpen,
    /// Deposit or withdraw before opening.
    #[error("the account is not open")]
    NotOpen,
    /// A zero amount.
    #[error("the amount must be positive")]
    ZeroAmount,
    /// Withdraw more than the balance.
    #[error("insufficient funds: balance {balance}, requested {requested}")]
    InsufficientFunds { balance: u64, requested: u64 },
}

impl Aggregate for Account {
    const TYPE: &'static str = "account";
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = AccountError;

    fn handle(&self, command: AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        use AccountCommand::*;
        match command {
            Open { .. } if self.owner.is_some() => Err(AccountError::AlreadyOpen),
            Open { owner, initial } => Ok(vec![AccountEvent::Opened { owner, initial }]),
            _ if self.owner.is_none() => Err(AccountError::NotOpen),
            Deposit { amount: 0 } | Withdraw { amount: 0 } => Err(AccountError::ZeroAmount),
            Deposit { amount } => Ok(vec![AccountEvent::Deposited { amount }]),
            Withdraw { amount } if amount > self.balance => Err(AccountError::InsufficientFunds {
                balance: self.balance,
                requested: amount,
            }),
            Withdraw { amount } => Ok(vec![AccountEvent::Withdrawn { amount }]),
        }
    }

    fn apply(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Opened { owner, initial } => {
                self.owner = Some(owner.clone());
                self.balance = *initial;
            }
            AccountEvent::Deposited { amount } => self.balance += amount,
            AccountEvent::Withdrawn { amount } => self.balance -= amount,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel::testing::AggregateTest;
    use AccountCommand::*;
    use AccountEvent::*;

    fn opened(initial: u64) -> AccountEvent {
        Opened {
            owner: "ada".into(),
            initial,
        }
    }

    #[test]
    fn opening_a_new_account() {
        let state = AggregateTest::<Account>::given_no_history()
            .when(Open {
                owner: "ada".into(),
                initial: 1000,
            })
            .then_expect(vec![opened(1000)]);
        assert_eq!(state.balance, 1000);
    }

    #[test]
    fn opening_twice_is_refused() {
        AggregateTest::<Account>::given(vec![opened(0)])
            .when(Open {
                owner: "bob".into(),
                initial: 1,
            })
            .then_expect_error(AccountError::AlreadyOpen);
    }

    #[test]
    fn deposits_and_withdrawals_move_the_balance() {
        let state = AggregateTest::<Account>::given(vec![opened(1000), Deposited { amount: 500 }])
            .when(Withdraw { amount: 200 })
            .then_expect(vec![Withdrawn { amount: 200 }]);
        assert_eq!(state.balance, 1300);
    }

    #[test]
    fn overdraft_is_refused_with_the_numbers() {
        AggregateTest::<Account>::given(vec![opened(1000), Withdrawn { amount: 300 }])
            .when(Withdraw { amount: 701 })
            .then_expect_error(AccountError::InsufficientFunds {
                balance: 700,
                requested: 701,
            });
    }

    #[test]
    fn unopened_account_refuses_money() {
        AggregateTest::<Account>::given_no_history()
            .when(Deposit { amount: 5 })
            .then_expect_error(AccountError::NotOpen);
        AggregateTest::<Account>::given(vec![opened(5)])
            .when(Deposit { amount: 0 })
            .then_expect_error(AccountError::ZeroAmount);
    }
}
