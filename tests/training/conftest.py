"""Datasets on disk for the training tests: the built-in corpus repeated to a given size."""

from __future__ import annotations

from pathlib import Path

from node.devkit.corpus import STYLES

CORPUS = "\n".join(STYLES.values()) + "\n"


def write_dataset(path: Path, num_bytes: int) -> Path:
    """A text file of about `num_bytes` bytes (whole lines of the corpus)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < num_bytes:
            written += f.write(CORPUS)
    return path
