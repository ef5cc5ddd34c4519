"""The CLI's console: its own output (stdout) and its errors (stderr)."""

from rich.console import Console

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)
