//! A given/when/then fixture for aggregates: no store, no async, just the decision logic.
//!
//! ```
//! use keel::doc::{Counter, CounterEvent, ZeroIncrement};
//! use keel::testing::AggregateTest;
//!
//! AggregateTest::<Counter>::given(vec![CounterEvent::Incremented { by: 2 }])
//!     .when(3)
//!     .then_expect(vec![CounterEvent::Incremented { by: 3 }]);
//!
//! AggregateTest::<Counter>::given_no_history()
//!     .when(0)
//!     .then_expect_error(ZeroIncrement);
//! ```

use std::fmt::Debug;

use crate::aggregate::Aggregate;

/// An aggregate built from past events, ready to handle one command.
pub struct AggregateTest<A: Aggregate> {
    state: A,
}

/// The outcome of [`AggregateTest::when`], to be checked.
pub struct Outcome<A: Aggregate> {
    result: Result<Vec<A::Event>, A::Error>,
    state: A,
}

impl<A: Aggregate> AggregateTest<A> {
    /// An aggregate that has seen `events`.
    pub fn given(events: Vec<A::Event>) -> Self {
        let mut state = A::default();
        for event in &events {
            state.apply(event);
        }
        AggregateTest { state }
    }

    /// An aggregate with no history.
    pub fn given_no_history() -> Self {
        Self::given(Vec::new())
    }

    /// Lets the aggregate handle `command`.
    pub fn when(self, command: A::Command) -> Outcome<A> {
        let result = self.state.handle(command);
        Outcome {
            result,
            state: self.state,
        }
    }
}

impl<A: Aggregate> Outcome<A>
where
    A::Event: PartialEq + Debug,
    A::Error: Debug,
{
    /// Asserts the command produced exactly `expected`; returns the state after applying them.
    #[track_caller]
    pub fn then_expect(self, expected: Vec<A::Event>) -> A {
        match self.result {
            Ok(events) => {
                assert_eq!(events, expected, "the command produced other events");
                let mut state = self.state;
                for event in &events {
                    state.apply(event);
                }
                state
            }
            Err(e) => panic!("expected events {expected:?}, the command was refused: {e:?}"),
        }
    }

    /// Asserts the command was refused with an error equal to `expected`.
    #[track_caller]
    pub fn then_expect_error(self, expected: A::Error)
    where
        A::Error: PartialEq,
    {
        match self.result {
            Ok(events) => panic!("expected error {expected:?}, the command produced {events:?}"),
            Err(e) => assert_eq!(e, expected, "the command was refused with another error"),
        }
    }

    /// Asserts the command was refused, with any error, and returns it for closer checks.
    #[track_caller]
    pub fn then_expect_refusal(self) -> A::Error {
        match self.result {
            Ok(events) => panic!("expected a refusal, the command produced {events:?}"),
            Err(e) => e,
        }
    }
}
