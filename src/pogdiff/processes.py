"""The processes of ``accelerate launch`` (one without it): their shared state, and work only the main one does."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import TypeVar

from accelerate import PartialState
from accelerate.utils import broadcast_object_list, parse_flag_from_env

from pogdiff.errors import PogdiffError, first_line

T = TypeVar("T")

# how long a collective waits for the other processes (--ddp-timeout's default, and the process group's when it is
# made here): torch's own is 10 min under NCCL, shorter than building a neighbour table or converting a dataset
DEFAULT_TIMEOUT_S = 6 * 3600


def process_state() -> PartialState:
    """accelerate's process state. ``PartialState()`` alone ignores ``accelerate launch --cpu``
    (ACCELERATE_USE_CPU) until an ``Accelerator`` has read it, and the first call fixes the state. A process group
    made here waits :data:`DEFAULT_TIMEOUT_S` for the others (:func:`set_process_group_timeout` changes it)."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), timeout=timedelta(seconds=DEFAULT_TIMEOUT_S))


def set_process_group_timeout(seconds: float) -> None:
    """Make the collectives of the process group, if there is one, wait ``seconds`` for the other processes: for a
    group made before the ``Accelerator`` (by :func:`process_state`, e.g. while ``--dataset-name`` is converted),
    whose timeout the Accelerator's ``InitProcessGroupKwargs`` no longer sets."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            from torch.distributed.distributed_c10d import _set_pg_timeout
        except ImportError:  # torch < 2.2: the group keeps the timeout it was made with (process_state's)
            return
        _set_pg_timeout(timedelta(seconds=seconds))


BUILD_STAGES = 3  # the main process; the first process of each other machine; every other process


@contextlib.contextmanager
def built_once_first() -> Iterator[None]:
    """Around work that builds something into the cache folder, then reads it (a table built from all rows, a
    memo of file digests, a dataset's conversion): the main process runs the block first, then the local main
    process of each other machine, then every other process, each stage waiting for the one before (the
    process group's timeout, --ddp-timeout). An error in a stage reaches every process at the end of that stage:
    all stop with its line, none waits for a stage that will not come.

    When the cache folder is shared by the machines, the block finds what the main process built and only reads
    it: built once in all. When each machine has its own cache folder, the first process of each machine finds
    it missing and builds its machine's copy (atomically: :func:`pogdiff.files.atomic_path`), which that
    machine's other processes then read. Nothing here needs to know which of the two it is (docs/scale.md,
    "Several machines"). One process alone runs the block and nothing more."""
    state = process_state()
    if state.num_processes == 1:
        yield
        return
    mine = 0 if state.is_main_process else 1 if state.is_local_main_process else 2
    for _ in range(mine):  # the stages before this process's
        _end_of_stage(None)
    try:
        yield
    except Exception as error:  # every error, not only ours: the others would wait at the end of the stage
        _end_of_stage(str(error) if isinstance(error, PogdiffError) else f"another process: {first_line(error)}",
                      error)
        raise
    _end_of_stage(None)
    for _ in range(mine + 1, BUILD_STAGES):
        _end_of_stage(None)


def _end_of_stage(failure: str | None, error: Exception | None = None) -> None:
    """Every process's outcome of a stage of :func:`built_once_first`; the first failure is raised everywhere (the
    failing process raises its own ``error``)."""
    from accelerate.utils import gather_object

    failures = [f for f in gather_object([failure]) if f is not None]
    if failures and error is None:
        raise PogdiffError(failures[0])


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
