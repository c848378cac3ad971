"""The state machines: pure logic, no I/O, no clock. Time and randomness are inputs."""

from typing import Any

from safereset.machines._base import MachineDefinition, Transition, Verdict
from safereset.machines.account import ACCOUNT
from safereset.machines.flow import FLOW
from safereset.machines.outbox import MESSAGE
from safereset.machines.request import REQUEST
from safereset.machines.session import SESSION
from safereset.machines.ticket import TICKET

MACHINES: dict[str, MachineDefinition[Any, Any]] = {
    machine.name: machine for machine in (TICKET, FLOW, REQUEST, SESSION, ACCOUNT, MESSAGE)
}

__all__ = ["MACHINES", "MachineDefinition", "Transition", "Verdict"]
