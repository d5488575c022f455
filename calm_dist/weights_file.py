"""Reading safetensors weight files with errors that name the file.

safetensors' own errors ("MetadataIncompleteBuffer", "HeaderTooLarge") say neither which file nor
what to do; a truncated copy or a missing file should.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open


class WeightsFileError(ValueError):
    """A weights file that is missing, truncated or not safetensors."""


def _damaged(file: Path, exc: Exception) -> WeightsFileError:
    return WeightsFileError(f"{file} is truncated or not a safetensors file ({type(exc).__name__}: {exc}); "
                            "copy or convert it again")


@contextmanager
def open_safetensors(file: str | Path) -> Iterator:
    """`safetensors.safe_open(file, framework="pt")`, its failures as WeightsFileError."""
    file = Path(file)
    if not file.is_file():
        raise WeightsFileError(f"{file} is missing")
    try:
        handle = safe_open(str(file), framework="pt")
    except Exception as exc:  # SafetensorError, OSError
        raise _damaged(file, exc) from None
    with handle as f:
        yield f


def load_safetensors(file: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of `file`, its failures as WeightsFileError."""
    with open_safetensors(file) as f:
        try:
            return {name: f.get_tensor(name) for name in f.keys()}
        except Exception as exc:
            raise _damaged(Path(file), exc) from None
