"""`loranode`: one CLI for every role and every process. Each command group lives in its own module."""

from __future__ import annotations

from node.cli.app import app

__all__ = ["app"]
