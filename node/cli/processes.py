"""The long-running processes: `loranode api`, `indexer`, and `db upgrade` (worker and beat: see settle.py)."""

from __future__ import annotations

import asyncio
import signal
import threading
from typing import TYPE_CHECKING, Any

import typer

from node.cli.console import console
from node.config import Settings, load_settings
from node.errors import ConfigError

if TYPE_CHECKING:  # the chain libraries load only in the commands that use them (start-up time)
    from node.chain.deploy import Deployment

db_app = typer.Typer(help="The node's database.", no_args_is_help=True)


def require_deployment() -> tuple[Settings, Deployment]:
    """The node's settings and its deployment, once both the deployment file and the database exist."""
    from node.chain.deploy import read_deployment

    settings = load_settings()
    path = settings.resolved_deployment_file()
    if not path.exists():
        raise ConfigError(f"no deployment file at {path}: run `loranode chain deploy`", path=str(path))
    if settings.database_url is None and not (settings.data_dir / "loranode.db").is_file():
        raise ConfigError(f"no database in {settings.data_dir}: run `loranode db upgrade` first (or set "
                          "LORANODE_DATA_DIR to the node's data folder, or LORANODE_DATABASE_URL)",
                          data_dir=str(settings.data_dir))
    return settings, read_deployment(path)


def api(host: str = typer.Option(None, help="Bind address (default LORANODE_HOST)."),
        port: int = typer.Option(None, help="Port (default LORANODE_PORT)."),
        engine_process: bool = typer.Option(None, "--engine-process/--in-process",
                                            help="The engine in core processes of its own (default "
                                                 "LORANODE_ENGINE_PROCESS, true) or in the API's."),
        data_parallel_size: int = typer.Option(None, "--data-parallel-size", min=1,
                                               help="Engine cores, one per device on CUDA (default "
                                                    "LORANODE_DATA_PARALLEL_SIZE, 1)."),
        tensor_parallel_size: int = typer.Option(None, "--tensor-parallel-size", min=1,
                                                 help="Devices each engine splits the model across (default "
                                                      "LORANODE_TENSOR_PARALLEL_SIZE, 1).")) -> None:
    """Serve the paid OpenAI-compatible API, with its engine in core processes.

    It starts the engine cores and restarts one that dies; --in-process keeps the engine in the API."""
    import uvicorn

    from node.api.app import create_app
    from node.api.wiring import build_services

    settings, dep = require_deployment()
    # the port it serves on is part of the process's name in the ledger's holds (two replicas on one
    # host must not share it): --port goes into the settings, not only to uvicorn
    chosen = {"engine_process": engine_process, "data_parallel_size": data_parallel_size,
              "tensor_parallel_size": tensor_parallel_size, "host": host, "port": port}
    settings = load_settings(**{k: v for k, v in chosen.items() if v is not None})  # checked again
    if settings.admin_token_file is not None and settings.admin_port == settings.port:
        raise ConfigError("the admin port must not be the public API's port", port=settings.port)
    services = build_services(settings, dep)
    public = uvicorn.Server(uvicorn.Config(create_app(services), host=settings.host, port=settings.port,
                                           log_level="info", timeout_keep_alive=settings.keep_alive_s,
                                           access_log=settings.access_log))
    servers = [public]
    if settings.admin_token_file is not None:  # the operator's endpoints, on their own port only
        from node.api.admin import create_admin_app, read_admin_token

        admin = create_admin_app(services, read_admin_token(settings.admin_token_file))
        servers.append(uvicorn.Server(uvicorn.Config(admin, host=settings.admin_host, port=settings.admin_port,
                                                     log_level="info", lifespan="off")))
        console.print(f"admin endpoints on {settings.admin_host}:{settings.admin_port}")
    with asyncio.Runner(loop_factory=_fast_loop()) as runner:
        runner.run(_serve(servers))


def _fast_loop() -> Any:
    """uvloop's event loop (libuv, in C: less of the API's Python per request and per streamed token than
    asyncio's own loop; a dependency, and uvicorn picks it too where it makes the loop), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve(servers: list[Any]) -> None:
    """Every server until the first one stops (a signal stops them all: uvicorn's handlers)."""
    tasks = [asyncio.create_task(server.serve()) for server in servers]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for server in servers:
        server.should_exit = True
    await asyncio.gather(*tasks, return_exceptions=True)


def indexer() -> None:
    """Mirror the chain's registries, escrow and settlements into the database."""
    from node.chain.binding import IndexedContracts
    from node.chain.indexer import Indexer, IndexerConfig
    from node.db.session import make_engine, session_factory

    settings, dep = require_deployment()
    if settings.rpc_url is None:
        raise ConfigError("set LORANODE_RPC_URL for the indexer")
    config = IndexerConfig(chain_id=dep.chain_id, confirmations=settings.confirmations,
                           finality_depth=settings.finality_depth, start_block=dep.from_block)
    factory = session_factory(make_engine(settings.resolved_database_url()))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    console.print(f"indexing chain {dep.chain_id} from block {dep.from_block}")
    Indexer(config, settings.rpc_url, factory, IndexedContracts.from_deployment(dep)).run_forever(stop)


@db_app.command()
def upgrade() -> None:
    """Create or migrate the database schema to the latest version (idempotent)."""
    from node.db.session import upgrade as run_upgrade

    settings = load_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    run_upgrade(settings.resolved_database_url())
    console.print("database at the latest schema")
