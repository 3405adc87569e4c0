//! The given/when/then fixture fails when the aggregate does not do what the test says: a
//! fixture that always passed would make every aggregate test worthless.

use keel::doc::{Counter, CounterEvent, ZeroIncrement};
use keel::testing::AggregateTest;

#[test]
fn it_passes_when_the_events_match() {
    let state = AggregateTest::<Counter>::given(vec![CounterEvent::Incremented { by: 2 }])
        .when(3)
        .then_expect(vec![CounterEvent::Incremented { by: 3 }]);
    assert_eq!(
        state.value, 5,
        "the new events are applied to the returned state"
    );
}

#[test]
#[should_panic(expected = "the command produced other events")]
fn it_fails_on_other_events() {
    AggregateTest::<Counter>::given_no_history()
        .when(3)
        .then_expect(vec![CounterEvent::Incremented { by: 4 }]);
}

#[test]
#[should_panic(expected = "the command was refused")]
fn it_fails_when_events_were_expected_and_the_command_was_refused() {
    AggregateTest::<Counter>::given_no_history()
        .when(0)
        .then_expect(vec![CounterEvent::Incremented { by: 0 }]);
}

#[test]
#[should_panic(expected = "expected error ZeroIncrement, the command produced")]
fn it_fails_when_an_error_was_expected_and_the_command_succeeded() {
    AggregateTest::<Counter>::given_no_history()
        .when(1)
        .then_expect_error(ZeroIncrement);
}

#[test]
#[should_panic(expected = "expected a refusal")]
fn it_fails_when_a_refusal_was_expected_and_the_command_succeeded() {
    AggregateTest::<Counter>::given_no_history()
        .when(1)
        .then_expect_refusal();
}
