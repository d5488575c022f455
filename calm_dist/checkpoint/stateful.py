"""The per-rank pieces of a checkpoint besides the engine's own files.

The engine saves and loads the model, the optimizer and the LR schedule (DeepSpeed's files, or the
3d engine's). Everything else a run needs to continue exactly (the data loader's position, the RNG
streams) is a `Stateful` piece, as torch's modules and optimizers are: the checkpoint manager
writes `{name: piece.state_dict()}` to each rank's `rank_XXXXX.pt` and, on resume, hands each
piece its state back. `Recorded` is a value written for the record only (read by tests and tools,
never restored).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class Recorded:
    """A value computed at save time and kept in the rank file; nothing to restore."""

    def __init__(self, value: Callable[[], Any]):
        self._value = value

    def state_dict(self) -> Any:
        return self._value()

    def load_state_dict(self, state: Any) -> None:
        pass


def states_of(pieces: Mapping[str, Stateful]) -> dict[str, Any]:
    return {name: piece.state_dict() for name, piece in pieces.items()}


def restore(pieces: Mapping[str, Stateful], rank_state: Mapping[str, Any], where: str) -> None:
    """Each piece its saved state; a piece the checkpoint does not hold is an error naming it
    (`Recorded` ones excepted: there is nothing to restore)."""
    missing = sorted(name for name, piece in pieces.items() if name not in rank_state and not isinstance(piece, Recorded))
    if missing:
        raise KeyError(f"{where} holds no saved state for {missing} (it has {sorted(rank_state)}): "
                       "it was not written by this trainer")
    for name, piece in pieces.items():
        if name in rank_state:
            piece.load_state_dict(rank_state[name])
