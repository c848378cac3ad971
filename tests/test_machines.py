"""Every machine, every state by every input.

The pairs come from the machines themselves (their states and the inputs
their protocols declare). What each pair must do comes from the decision
tables below, written independently of the machines: a transition (the states
it enters, in order, and what the input returns) or a refusal (Automat's
NoTransition, with nothing entered). A pair without a decision fails and
names the machine, state and input, so a new state or input cannot slip in
untested.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import Any

import pytest
from automat import NoTransition
from automat._typed import TransitionRegistrar

from safereset.machines import (
    MACHINES,
    MachineDefinition,
    Verdict,
    account,
    flow,
    outbox,
    request,
    session,
    ticket,
)
from safereset.machines._base import HasJournal
from safereset.machines.account import AccountCore, Standing
from safereset.machines.flow import ATTEMPTS, FlowCore
from safereset.machines.flow import Ended as FlowEnded
from safereset.machines.flow import Open as FlowOpen
from safereset.machines.outbox import (
    Dead,
    Leased,
    MessageCore,
    Pending,
    Retrying,
    RetryPolicy,
    Sent,
)
from safereset.machines.request import Dropped, RequestCore
from safereset.machines.request import Issued as RequestIssued
from safereset.machines.request import Pending as RequestPending
from safereset.machines.session import Active, SessionCore
from safereset.machines.session import Ended as SessionEnded
from safereset.machines.ticket import Ended as TicketEnded
from safereset.machines.ticket import Issued, TicketCore

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
TTL = timedelta(minutes=30)
LATER = T0 + TTL  # the first instant at which a ticket or session is expired
POLICY = RetryPolicy(max_attempts=3)
ACCEPTED, REJECTED = Verdict.ACCEPTED, Verdict.REJECTED


@dataclass(frozen=True)
class Moves:
    """The input is accepted: it enters these states in order and returns this."""

    args: tuple[Any, ...]
    entered: tuple[str, ...]
    returns: object = None


@dataclass(frozen=True)
class Refused:
    """The input is a caller error in this state: NoTransition, nothing entered."""

    args: tuple[Any, ...]


Case = Moves | Refused


@dataclass(frozen=True)
class Spec:
    """How to build a core, what data each state holds, and every decision."""

    core: Callable[[], HasJournal]
    data: dict[str, object]
    decisions: dict[tuple[str, str], list[Case]]


def stays(args: tuple[Any, ...], returns: object = None) -> Moves:
    return Moves(args, (), returns)


TICKET_ARGS: dict[str, tuple[Any, ...]] = {
    "issue": (T0, TTL),
    "peek": (T0,),
    "redeem": (T0,),
    "supersede": (),
    "revoke": (),
    "_consume": (),
    "_lapse": (),
}


def ticket_decisions() -> dict[tuple[str, str], list[Case]]:
    table: dict[tuple[str, str], list[Case]] = {}
    ended = ("redeemed", "expired", "superseded", "revoked")
    for state in ("new", "issued", *ended):
        for name, args in TICKET_ARGS.items():
            table[state, name] = [Refused(args)]
    table["new", "issue"] = [Moves((T0, TTL), ("issued",))]
    table["issued", "peek"] = [
        stays((LATER - timedelta(microseconds=1),), ACCEPTED),
        Moves((LATER,), ("expired",), REJECTED),
    ]
    table["issued", "redeem"] = [
        Moves((T0,), ("redeemed",), ACCEPTED),
        Moves((LATER,), ("expired",), REJECTED),
    ]
    table["issued", "supersede"] = [Moves((), ("superseded",))]
    table["issued", "revoke"] = [Moves((), ("revoked",))]
    table["issued", "_consume"] = [Moves((), ("redeemed",))]
    table["issued", "_lapse"] = [Moves((), ("expired",))]
    for state in ended:
        table[state, "peek"] = [stays((T0,), REJECTED)]
        table[state, "redeem"] = [stays((T0,), REJECTED)]
        table[state, "supersede"] = [stays(())]
        table[state, "revoke"] = [stays(())]
    return table


def session_decisions() -> dict[tuple[str, str], list[Case]]:
    arguments: dict[str, tuple[Any, ...]] = {
        "open": (T0, TTL),
        "authenticate": (T0,),
        "revoke": (),
        "_lapse": (),
    }
    table: dict[tuple[str, str], list[Case]] = {
        (state, name): [Refused(args)]
        for state in ("new", "active", "expired", "revoked")
        for name, args in arguments.items()
    }
    table["new", "open"] = [Moves((T0, TTL), ("active",))]
    table["active", "authenticate"] = [
        stays((LATER - timedelta(microseconds=1),), ACCEPTED),
        Moves((LATER,), ("expired",), REJECTED),
    ]
    table["active", "revoke"] = [Moves((), ("revoked",))]
    table["active", "_lapse"] = [Moves((), ("expired",))]
    for state in ("expired", "revoked"):
        table[state, "authenticate"] = [stays((T0,), REJECTED)]
        table[state, "revoke"] = [stays(())]
    return table


def account_decisions() -> dict[tuple[str, str], list[Case]]:
    gated = ("log_in", "request_recovery", "reset_password")
    table: dict[tuple[str, str], list[Case]] = {
        ("new", name): [Refused(())] for name in ("disable", "enable", *gated)
    }
    table["new", "open"] = [Moves((), ("active",))]
    for state in ("active", "disabled"):
        table[state, "open"] = [Refused(())]
    table["active", "disable"] = [Moves((), ("disabled",))]
    table["active", "enable"] = [stays(())]
    table["disabled", "enable"] = [Moves((), ("active",))]
    table["disabled", "disable"] = [stays(())]
    for name in gated:
        table["active", name] = [stays((), ACCEPTED)]
        table["disabled", name] = [stays((), REJECTED)]
    return table


LEASE_END = T0 + timedelta(minutes=2)
NEXT_AT = T0 + timedelta(minutes=1)


def message_decisions() -> dict[tuple[str, str], list[Case]]:
    arguments: dict[str, tuple[Any, ...]] = {
        "queue": (),
        "lease": ("w2", T0, LEASE_END),
        "delivered": (),
        "failed": (T0, 0.5, "boom"),
        "requeue": (),
        "_take": ("w2", LEASE_END, 2),
        "_retry": (1, NEXT_AT, "boom"),
        "_give_up": (1, "boom"),
    }
    states = ("new", "pending", "leased", "retrying", "sent", "dead")
    table: dict[tuple[str, str], list[Case]] = {
        (state, name): [Refused(args)] for state in states for name, args in arguments.items()
    }
    table["new", "queue"] = [Moves((), ("pending",))]
    table["pending", "lease"] = [Moves(("w2", T0, LEASE_END), ("leased",), ACCEPTED)]
    table["pending", "_take"] = [Moves(("w2", LEASE_END, 1), ("leased",))]
    # The leased sample holds attempt 1 with a lease ending at LEASE_END.
    table["leased", "lease"] = [
        stays(("w2", LEASE_END - timedelta(microseconds=1), LEASE_END), REJECTED),
        Moves(("w2", LEASE_END, LEASE_END + TTL), ("retrying", "leased"), ACCEPTED),
    ]
    table["leased", "delivered"] = [Moves((), ("sent",))]
    table["leased", "failed"] = [Moves((T0, 0.5, "boom"), ("retrying",))]
    table["leased", "_retry"] = [Moves((1, NEXT_AT, "boom"), ("retrying",))]
    table["leased", "_give_up"] = [Moves((1, "boom"), ("dead",))]
    table["retrying", "lease"] = [
        stays(("w2", NEXT_AT - timedelta(microseconds=1), LEASE_END), REJECTED),
        Moves(("w2", NEXT_AT, LEASE_END), ("leased",), ACCEPTED),
    ]
    table["retrying", "_take"] = [Moves(("w2", LEASE_END, 2), ("leased",))]
    table["sent", "lease"] = [stays(("w2", T0, LEASE_END), REJECTED)]
    table["dead", "lease"] = [stays(("w2", T0, LEASE_END), REJECTED)]
    table["dead", "requeue"] = [Moves((), ("pending",))]
    return table


def flow_decisions() -> dict[tuple[str, str], list[Case]]:
    arguments: dict[str, tuple[Any, ...]] = {
        "open": (T0, TTL),
        "arm": (T0,),
        "present": (T0, False),
        "complete": (),
        "supersede": (),
        "revoke": (),
        "_verify": (),
        "_lapse": (),
        "_lock": (),
    }
    ended = ("completed", "expired", "locked", "superseded", "revoked")
    table: dict[tuple[str, str], list[Case]] = {
        (state, name): [Refused(args)]
        for state in ("new", "open", "verified", *ended)
        for name, args in arguments.items()
    }
    table["new", "open"] = [Moves((T0, TTL), ("open",))]
    # The open sample has 2 attempts left and expires at LATER.
    table["open", "present"] = [
        Moves((T0, True), ("verified",), ACCEPTED),
        Moves((T0, False), ("open",), REJECTED),
        Moves((LATER, True), ("expired",), REJECTED),
    ]
    table["open", "arm"] = [
        stays((LATER - timedelta(microseconds=1),), ACCEPTED),
        Moves((LATER,), ("expired",), REJECTED),
    ]
    table["open", "supersede"] = [Moves((), ("superseded",))]
    table["open", "revoke"] = [Moves((), ("revoked",))]
    table["open", "_verify"] = [Moves((), ("verified",))]
    table["open", "_lapse"] = [Moves((), ("expired",))]
    table["open", "_lock"] = [Moves((), ("locked",))]
    table["verified", "complete"] = [Moves((), ("completed",))]
    for state in ended:
        table[state, "arm"] = [stays((T0,), REJECTED)]
        table[state, "present"] = [stays((T0, True), REJECTED)]
        table[state, "supersede"] = [stays(())]
        table[state, "revoke"] = [stays(())]
    return table


def request_decisions() -> dict[tuple[str, str], list[Case]]:
    arguments: dict[str, tuple[Any, ...]] = {"record": (), "issue": (), "drop": ("no_account",)}
    table: dict[tuple[str, str], list[Case]] = {
        (state, name): [Refused(args)]
        for state in ("new", "pending", "issued", "dropped")
        for name, args in arguments.items()
    }
    table["new", "record"] = [Moves((), ("pending",))]
    table["pending", "issue"] = [Moves((), ("issued",))]
    table["pending", "drop"] = [Moves(("no_account",), ("dropped",))]
    return table


class FlowSamples(dict[str, object]):
    """Sample data of each flow state, made fresh on every lookup."""

    def __getitem__(self, state: str) -> object:
        if state == "open":
            return FlowOpen(LATER, 2)
        return FlowEnded()


SPECS: dict[str, Spec] = {
    "ticket": Spec(
        core=lambda: TicketCore("t1"),
        data={
            "issued": Issued(LATER),
            **{state: TicketEnded() for state in ("redeemed", "expired", "superseded", "revoked")},
        },
        decisions=ticket_decisions(),
    ),
    "flow": Spec(
        core=lambda: FlowCore("f1"),
        # A factory, not one object: the open state's data is changed in place.
        data=FlowSamples(),
        decisions=flow_decisions(),
    ),
    "request": Spec(
        core=lambda: RequestCore("r1"),
        data={
            "pending": RequestPending(),
            "issued": RequestIssued(),
            "dropped": Dropped("no_account"),
        },
        decisions=request_decisions(),
    ),
    "session": Spec(
        core=lambda: SessionCore("s1"),
        data={"active": Active(LATER), "expired": SessionEnded(), "revoked": SessionEnded()},
        decisions=session_decisions(),
    ),
    "account": Spec(
        core=lambda: AccountCore(1),
        data={"active": Standing(), "disabled": Standing()},
        decisions=account_decisions(),
    ),
    "message": Spec(
        core=lambda: MessageCore("m1", POLICY),
        data={
            "pending": Pending(),
            "leased": Leased("w1", LEASE_END, 1),
            "retrying": Retrying(1, NEXT_AT, "boom"),
            "sent": Sent(),
            "dead": Dead(3, "boom"),
        },
        decisions=message_decisions(),
    ),
}


def all_pairs() -> list[tuple[str, str, str]]:
    """Every (machine, state, input), from the machines, not from the tables."""
    return [
        (machine.name, state, name)
        for machine in MACHINES.values()
        for state in machine.state_names()
        for name in machine.input_names()
    ]


def start(machine: MachineDefinition[Any, Any], spec: Spec, state: str) -> tuple[Any, Any]:
    core = spec.core()
    if state == "new":
        return machine.create(core), core
    return machine.restore(core, state, spec.data[state]), core


def pair_failures(
    machine: MachineDefinition[Any, Any], spec: Spec, state: str, input_name: str
) -> list[str]:
    """Run every case decided for one pair; return a message per case that fails."""
    where = f"machine {machine.name}, state {state}, input {input_name}"
    cases = spec.decisions.get((state, input_name))
    if not cases:
        return [f"no test decision for {where}"]

    failures = []
    for case in cases:
        instance, core = start(machine, spec, state)
        call = f"{where}{case.args}"
        try:
            result = getattr(instance, input_name)(*case.args)
        except NoTransition:
            if isinstance(case, Moves):
                failures.append(f"{call}: the machine has no transition, expected {case}")
            elif core.journal.entries:
                failures.append(f"{call}: a refused input entered a state")
            continue
        if isinstance(case, Refused):
            failures.append(f"{call}: returned {result!r}, expected NoTransition")
            continue
        entered = tuple(entry.state for entry in core.journal.entries)
        if entered != case.entered:
            failures.append(f"{call}: entered {entered}, expected {case.entered}")
        if result != case.returns:
            failures.append(f"{call}: returned {result!r}, expected {case.returns!r}")
    return failures


@pytest.mark.parametrize(("machine_name", "state", "input_name"), all_pairs())
def test_state_input_pair(machine_name: str, state: str, input_name: str) -> None:
    failures = pair_failures(MACHINES[machine_name], SPECS[machine_name], state, input_name)
    assert failures == [], "\n".join(failures)


def build_without(module: ModuleType, skipped: int) -> MachineDefinition[Any, Any]:
    """Rebuild a machine as if the decorator of its transition number ``skipped`` were gone."""
    registered = 0
    original = TransitionRegistrar.__call__

    def register(self: TransitionRegistrar[Any, Any, Any], impl: Any) -> Any:
        nonlocal registered
        registered += 1
        if registered - 1 == skipped:
            self._callback = impl  # counts as decorated, but never reaches the table
            return impl
        return original(self, impl)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TransitionRegistrar, "__call__", register)
        return module._build()  # type: ignore[no-any-return]


MACHINE_MODULES = {
    "ticket": ticket,
    "flow": flow,
    "request": request,
    "session": session,
    "account": account,
    "message": outbox,
}


@pytest.mark.parametrize("machine_name", sorted(MACHINE_MODULES))
def test_removed_transition_is_caught(machine_name: str) -> None:
    """Each transition, removed alone, fails a case that names its state and input."""
    complete = MACHINES[machine_name]
    spec = SPECS[machine_name]
    rows = {(row.state, row.input) for row in complete.transitions()}
    for skipped in range(len(rows)):
        mutant = build_without(MACHINE_MODULES[machine_name], skipped)
        [(state, input_name)] = rows - {(row.state, row.input) for row in mutant.transitions()}
        messages = [
            message
            for pair_state, pair_input in [
                (s, i) for s in mutant.state_names() for i in mutant.input_names()
            ]
            for message in pair_failures(mutant, spec, pair_state, pair_input)
        ]
        named = f"machine {machine_name}, state {state}, input {input_name}"
        assert any(message.startswith(named) for message in messages), (
            f"removing {state} x {input_name} failed no case naming it: {messages}"
        )


def test_decisions_name_only_real_pairs() -> None:
    real = {(m, s, i) for m, s, i in all_pairs()}
    decided = {(m, s, i) for m, spec in SPECS.items() for (s, i) in spec.decisions}
    assert decided - real == set(), "decisions for pairs the machines do not have"


def test_case_count_is_states_times_inputs() -> None:
    for machine in MACHINES.values():
        pairs = [pair for pair in all_pairs() if pair[0] == machine.name]
        assert len(pairs) == len(machine.state_names()) * len(machine.input_names())


def test_every_transition_is_exercised() -> None:
    """Each declared transition row is the subject of at least one accepted case."""
    for name, machine in MACHINES.items():
        accepted = {
            pair
            for pair, cases in SPECS[name].decisions.items()
            if any(isinstance(case, Moves) for case in cases)
        }
        for row in machine.transitions():
            assert (row.state, row.input) in accepted, f"{name}: {row} has no accepted case"


def test_entered_data_of_transitions() -> None:
    """State data is computed by the machine: expiry, lease, attempt, back-off."""
    ticket, core = start(MACHINES["ticket"], SPECS["ticket"], "new")
    ticket.issue(T0, TTL)
    assert core.journal.last.data == Issued(T0 + TTL)

    message, core = start(MACHINES["message"], SPECS["message"], "leased")
    message.failed(T0, 0.0, "timeout")
    assert core.journal.last.data == Retrying(1, T0 + timedelta(seconds=15), "timeout")

    message, core = start(MACHINES["message"], SPECS["message"], "leased")
    message.lease("w2", LEASE_END, LEASE_END + TTL)
    assert core.journal.last.data == Leased("w2", LEASE_END + TTL, 2)


def test_last_attempt_failure_is_dead() -> None:
    message = MACHINES["message"]
    core = MessageCore("m1", POLICY)
    instance = message.restore(core, "leased", Leased("w1", LEASE_END, POLICY.max_attempts))
    instance.failed(T0, 0.5, "refused")
    assert core.journal.last.state == "dead"
    assert core.journal.last.data == Dead(POLICY.max_attempts, "refused")


def test_lapsed_last_lease_is_dead() -> None:
    """A message whose every lease lapses (it crashes each worker) still dies."""
    message = MACHINES["message"]
    core = MessageCore("m1", POLICY)
    instance = message.restore(core, "leased", Leased("w1", LEASE_END, POLICY.max_attempts))
    assert instance.lease("w2", LEASE_END, LEASE_END + TTL) is REJECTED
    assert core.journal.last.state == "dead"


@pytest.mark.parametrize(
    ("attempt", "jitter", "seconds"),
    [(1, 0.0, 15), (1, 1.0, 30), (2, 1.0, 60), (3, 0.5, 90), (20, 1.0, 3600)],
)
def test_retry_delay(attempt: int, jitter: float, seconds: float) -> None:
    assert RetryPolicy().delay(attempt, jitter) == timedelta(seconds=seconds)


@pytest.mark.parametrize("jitter", [-0.1, 1.1])
def test_retry_delay_rejects_bad_jitter(jitter: float) -> None:
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy().delay(1, jitter)


def test_ticket_rejects_non_positive_ttl() -> None:
    ticket, _ = start(MACHINES["ticket"], SPECS["ticket"], "new")
    with pytest.raises(ValueError, match="time to live"):
        ticket.issue(T0, timedelta(0))


def test_restore_unknown_state() -> None:
    with pytest.raises(ValueError, match="no state 'bogus'"):
        MACHINES["ticket"].restore(TicketCore("t1"), "bogus", TicketEnded())


def test_wrong_codes_lock_after_budget() -> None:
    """Each wrong code spends one attempt; the last one locks the flow for good."""
    core = FlowCore("f1")
    instance = MACHINES["flow"].create(core)
    instance.open(T0, TTL)
    left = [core.journal.last.data.attempts_left]

    for _ in range(ATTEMPTS - 1):
        assert instance.present(T0, False) is REJECTED
        left.append(core.journal.last.data.attempts_left)

    assert left == [5, 4, 3, 2, 1]
    assert instance.present(T0, False) is REJECTED
    assert core.journal.last.state == "locked"
    assert instance.present(T0, True) is REJECTED
    assert core.journal.last.state == "locked"
