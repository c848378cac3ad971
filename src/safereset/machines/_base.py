"""The journal every machine keeps of the states it enters.

Callers never ask a machine for its current state. The store still has to
persist each state change, so every state except the initial ``new`` is a
data state whose factory writes an ``Entered`` record to the journal in the
machine's core. The store reads the journal after feeding an input and writes
the last entered state with a compare-and-set. A transition that loops writes
nothing, so refusals leave the record untouched.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, cast

from automat import TypeMachine

DataT = TypeVar("DataT")


class Verdict(enum.Enum):
    """The result of an input that a caller may not be allowed to make."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"


@dataclass(frozen=True)
class Entered(Generic[DataT]):
    """One state change: the state's persisted name and its data."""

    state: str
    data: DataT


@dataclass
class Journal:
    """The states a machine entered while the caller fed it inputs, in order."""

    entries: list[Entered[Any]] = field(default_factory=list)

    def record(self, state: str, data: object) -> None:
        self.entries.append(Entered(state, data))

    @property
    def last(self) -> Entered[Any] | None:
        """The state to persist, or None when no input changed the state."""
        return self.entries[-1] if self.entries else None


class HasJournal(Protocol):
    @property
    def journal(self) -> Journal: ...


def entering(state: str, make: Callable[..., DataT]) -> Callable[..., DataT]:
    """Wrap a state-data factory so that entering ``state`` is journaled.

    Automat calls the factory with the input object, the core and the
    arguments of the input that caused the transition.
    """

    def factory(inputs: object, core: HasJournal, *args: Any, **kwargs: Any) -> DataT:
        data = make(core, *args, **kwargs)
        core.journal.record(state, data)
        return data

    factory.__name__ = f"enter_{state}"
    return factory


InputsT = TypeVar("InputsT")
CoreT = TypeVar("CoreT")


INITIAL_STATE = "new"


@dataclass(frozen=True)
class Transition:
    """One row of a machine's transition table."""

    state: str
    input: str
    next_state: str
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class MachineDefinition(Generic[InputsT, CoreT]):
    """A built machine with its persisted states, so the store can restore one.

    ``states`` maps each persisted state name to Automat's state object. The
    initial state ``new`` is not among them: it exists only in memory, before
    the first input creates the record. ``protocol`` declares every input,
    the private ones included.
    """

    name: str
    factory: TypeMachine[Any, CoreT]
    states: Mapping[str, Any]
    protocol: type

    def state_names(self) -> list[str]:
        """Return every state, the initial ``new`` first."""
        return [INITIAL_STATE, *self.states]

    def input_names(self) -> list[str]:
        """Return every input the protocol declares, in declaration order."""
        names: list[str] = []
        for klass in reversed(self.protocol.__mro__):
            if klass in (object, Protocol, Generic) or not getattr(klass, "_is_protocol", False):
                continue
            for name, value in vars(klass).items():
                if callable(value) and not name.startswith("__") and name not in names:
                    names.append(name)
        return names

    def transitions(self) -> list[Transition]:
        """Return the transition table, ordered by state and input declaration."""
        automaton = self.factory.__automat_automaton__
        rows = [
            Transition(old.name, symbol, new.name, tuple(output.name for output in outputs))
            for old, symbol, new, outputs in automaton.allTransitions()
        ]
        states, inputs = self.state_names(), self.input_names()
        return sorted(rows, key=lambda row: (states.index(row.state), inputs.index(row.input)))

    def create(self, core: CoreT) -> InputsT:
        """Start a machine in ``new``, ready for the input that creates the record."""
        return cast(InputsT, self.factory(core))

    def restore(self, core: CoreT, state: str, data: object) -> InputsT:
        """Rebuild a machine in a persisted state with that state's data."""
        try:
            automat_state = self.states[state]
        except KeyError:
            known = ", ".join(sorted(self.states))
            raise ValueError(f"{self.name} has no state {state!r}; known: {known}") from None
        return cast(InputsT, self.factory(core, automat_state, lambda inputs, core: data))
