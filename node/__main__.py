"""`python -m node ...` is `loranode ...`."""

from node.cli import app

app()
