"""The processes of ``accelerate launch`` (one without it): their shared state, and work only the main one does."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from accelerate import PartialState
from accelerate.utils import broadcast_object_list, parse_flag_from_env

from pogdiff.errors import PogdiffError, first_line

T = TypeVar("T")


def process_state() -> PartialState:
    """accelerate's process state. ``PartialState()`` alone ignores ``accelerate launch --cpu``
    (ACCELERATE_USE_CPU) until an ``Accelerator`` has read it, and the first call fixes the state."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def on_main_process(work: Callable[[], T]) -> T:
    """``work()`` on the main process while the others wait; every process gets its result, or its error."""
    state = process_state()
    if state.num_processes == 1:
        return work()
    outcome, failure = [None, None], None
    if state.is_main_process:
        try:
            outcome = [work(), None]
        except Exception as error:  # every error, not only ours: the others would wait for the broadcast
            failure = error
            outcome = [None, str(error) if isinstance(error, PogdiffError) else f"the main process: {first_line(error)}"]
    broadcast_object_list(outcome)
    if failure is not None:
        raise failure
    if outcome[1] is not None:
        raise PogdiffError(outcome[1])
    return outcome[0]
