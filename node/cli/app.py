"""The root Typer app: global options, error reporting, and the command groups."""

from __future__ import annotations

from typing import Any, NoReturn

import typer
from typer._click.core import Context  # typer vendors click (0.29): its own classes, not click's
from typer._click.exceptions import NoArgsIsHelpError, UsageError
from typer.core import TyperGroup
from typer.exceptions import TyperException

from node import __version__
from node.cli import (
    adapter,
    adapter_admin,
    attribution,
    chain,
    cost,
    dataset,
    dev,
    earnings,
    epoch,
    escrow,
    health,
    model,
    processes,
    request,
    settle,
    status,
)
from node.cli.console import USAGE, Failure, console, describe, print_failure, print_traceback
from node.config import load_settings
from node.logs import configure_logging


class _Group(TyperGroup):
    """The root group: whatever a command ends with becomes one clear line on stderr (console.py's
    printer) and exit code 2 (the command cannot be done as given) or 1 (it failed); `--debug` adds
    the traceback. A usage mistake (a missing argument, an unknown command or option) is printed by the
    same printer with the `--help` to read; help, exits and aborts pass through."""

    def make_context(self, info_name: str | None, args: list[str], parent: Context | None = None,
                     **extra: Any) -> Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except UsageError as exc:  # the root's own options (`loranode --bogus`)
            _report_usage(exc)

    def invoke(self, ctx: Context) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as exc:  # a command's arguments, or a command that does not exist
            _report_usage(exc)
        except (TyperException, typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # the one place every error of every command is reported
            if ctx.params.get("debug"):
                print_traceback(exc)
            failure = describe(exc)
            print_failure(failure)
            raise typer.Exit(failure.exit_code) from exc


def _report_usage(exc: UsageError) -> NoReturn:
    """Click's usage error as the printer's one line, with the `--help` that shows the right usage."""
    if isinstance(exc, NoArgsIsHelpError):
        raise exc  # a group or command run bare: its help, as asked
    where = exc.ctx.command_path if exc.ctx is not None else "loranode"
    print_failure(Failure("usage", exc.format_message(), hint=f"`{where} --help` shows its usage",
                          exit_code=USAGE))
    raise typer.Exit(USAGE) from exc


app = typer.Typer(name="loranode", cls=_Group, no_args_is_help=True, pretty_exceptions_enable=False,
                  add_completion=False)
app.info.help = ("Serve thousands of LoRA adapters on one base model and pay the data behind them.\n\n"
                 "Every paid inference gets a signed receipt; settlement pays the node, adapter owners and "
                 "data contributors on chain.")
config_app = typer.Typer(help="Inspect the effective configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(chain.app, name="chain")
app.add_typer(model.app, name="model")
app.add_typer(dataset.app, name="dataset")
for _admin in (adapter_admin.pin, adapter_admin.unpin, adapter_admin.preload, adapter_admin.evict):
    adapter.app.command()(_admin)
app.add_typer(adapter.app, name="adapter")
app.add_typer(escrow.app, name="escrow")
app.add_typer(attribution.app, name="attribution")
app.add_typer(processes.db_app, name="db")
app.add_typer(health.app, name="health")
app.command()(request.request)
app.command()(status.status)
app.command()(cost.cost)
app.command()(processes.api)
app.command()(processes.indexer)
app.command()(dev.dev)
app.command()(settle.worker)
app.command()(settle.beat)
app.command()(settle.claim)
app.add_typer(epoch.app, name="epoch")
app.command()(earnings.earnings)
app.add_typer(settle.settle_app, name="settle")


@app.callback()
def _main(log_level: str = typer.Option("WARNING", "--log-level", help="DEBUG, INFO, WARNING or ERROR."),
          debug: bool = typer.Option(False, "--debug", help="On an error, print its Python traceback too.")) -> None:
    configure_logging(log_level.upper())


@app.command()
def version() -> None:
    """Print loranode's version."""
    console.print(__version__)


@config_app.command("show")
def config_show() -> None:
    """Print the effective settings (LORANODE_* and LORANODE_CONFIG), keys hidden."""
    settings = load_settings()
    for name, value in settings.model_dump().items():
        shown = "********" if "key" in name and value is not None and not name.endswith("_file") else value
        console.print(f"{name} = {shown}")
    console.print(f"database (resolved) = {settings.resolved_database_url()}")
