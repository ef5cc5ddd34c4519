"""One Settings for every process, from the environment (LORANODE_*) and an optional TOML file.

Embedded defaults need no service: SQLite in the data folder, an anvil chain the node starts
itself, Celery on an embedded broker. Production values (a PostgreSQL URL, a Redis URL, an RPC URL,
keys from a file or the environment) override them. Insecure combinations fail at start.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from node.errors import ConfigError
from node.settlement.latency import SettleLatency

if TYPE_CHECKING:
    from node.chain.tx_manager import FeePolicy

DEV_CHAIN_ID = 31337
# anvil's first development account: public knowledge, so only ever valid on the dev chain.
DEV_OPERATOR_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
# anvil's last development account (of the 20 our anvil starts): pays the gas of what the API sends for x402
# payers, so none of it takes an operator nonce (docs/x402.md, "Keys")
DEV_X402_GAS_KEY = "0xdf57089febbacf7ba0bc227dafbffa9fc08a93fdc68e1e42411a14efcf23656e"
CONFIG_ENV = "LORANODE_CONFIG"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORANODE_", extra="forbid", frozen=True)

    # where an embedded node keeps its state
    data_dir: Path = Path(".loranode")

    # storage and broker; None means the embedded default in data_dir
    database_url: str | None = None
    database_password_file: Path | None = None  # the password database_url leaves out (a compose secret)
    broker_url: str | None = None
    # the operator's admin endpoints (node/api/admin.py): their own port, loopback unless set otherwise;
    # off without a token file
    admin_token_file: Path | None = None
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(default=8001, ge=1, le=65535)

    # chain; rpc_url None means "start a local anvil" (dev only)
    rpc_url: str | None = None
    chain_id: int = DEV_CHAIN_ID
    deployment_file: Path | None = None
    operator_key: SecretStr | None = None
    operator_key_file: Path | None = None
    confirmations: int = Field(default=2, ge=0)
    finality_depth: int = Field(default=64, ge=1)
    # x402 batch-settlement (docs/x402.md): the node's X402Router (payTo); None serves lanes only
    x402_router: str | None = None
    x402_withdraw_delay_s: int = Field(default=86_400, ge=900, le=2_592_000)
    # the smallest deposit the node submits (announced as extra.minDeposit; 0: none): each costs it gas
    x402_min_deposit: int = Field(default=0, ge=0)
    # per channel, what may be charged against deposits not final yet beyond one request's price: the most a
    # reorg deeper than the node's confirmations that removes a deposit costs it, per channel (docs/x402.md)
    x402_unfinal_credit: int = Field(default=10**17, ge=0)
    # the key that pays the gas of the API's x402 transactions (deposits, refunds): never the operator key,
    # whose nonces are the settlement worker's
    x402_gas_key: SecretStr | None = None
    x402_gas_key_file: Path | None = None

    # engine
    model_path: Path | None = None
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int = Field(default=2048, ge=16)
    max_lora_rank: int = Field(default=64, ge=1)
    max_adapter_slots: int = Field(default=32, ge=1)
    max_adapter_device_bytes: int | None = Field(default=None, ge=1)  # caps the slots; KV gets the rest
    # device slots in pools by rank, "rank:slots,..." (e.g. "8:48,16:16,64:8", the largest rank =
    # max_lora_rank): an adapter takes a slot of its own rank's size. Empty: max_adapter_slots slots,
    # each sized for max_lora_rank.
    adapter_rank_pools: str = Field(default="", pattern=r"^(\d+:\d+(,\d+:\d+)*)?$")

    max_model_len: int | None = Field(default=None, ge=16)
    cuda_graphs: bool = True  # on CUDA: decode steps replayed from graphs per batch-size bucket
    prefix_caching: bool = True  # LORANODE_PREFIX_CACHING: full KV blocks cached by (adapter, tokens)
    # weight-only int8 (per output channel) or int4 (groups of 128), on torchao; fp8 on Ada/Hopper GPUs
    weight_quantization: Literal["none", "int8", "int4", "fp8"] = "none"
    # the engine's step loop in processes of its own (over ZeroMQ, restarted if one dies; the default of
    # `loranode api`), or in the API's (`loranode dev`, the demo and tests: LocalNode; docs/engine.md)
    engine_process: bool = True
    data_parallel_size: int = Field(default=1, ge=1, le=64)  # engine cores (one per device on CUDA)
    # devices (ranks) each engine core splits the model across: its workers are processes under it
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    engine_threads: int | None = Field(default=None, ge=1)  # torch threads per core; None: CPUs / cores
    # a core silent this long (a step that hangs; it reports every second) is killed and started again,
    # its requests in flight ending with 503 (a node fault)
    engine_stall_timeout_s: float = Field(default=60.0, gt=2.0)

    # adapters: device slots above; host memory and disk caches in bytes
    adapter_cache_dir: Path | None = None  # default: data_dir/adapter-cache
    max_adapter_host_bytes: int = Field(default=4 << 30, ge=1)
    max_adapter_disk_bytes: int = Field(default=64 << 30, ge=1)
    # the registered sha256 is checked when an adapter enters the disk cache; true: on every load too
    adapter_verify_every_load: bool = False

    # API and pricing (token units, integers): adapters at the token prices; the base model alone, called
    # by its served name (default: the model folder's name), at the base prices (default: the same)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # how long an idle HTTP/1.1 connection is kept open for the client's next request: longer than any proxy
    # in front keeps one idle (HAProxy's `timeout http-keep-alive` 60 s in deploy/haproxy; nginx's and cloud
    # balancers' 60 s), so the proxy always closes first and never sends a request on a connection the
    # API is closing (it would die unanswered)
    keep_alive_s: int = Field(default=75, ge=1)
    # uvicorn's access log, a line per request: off by default (its CPU is taken from the engine cores on
    # a box they share; deploy/haproxy's balancer logs each request it passes on); true: on, at INFO
    access_log: bool = False
    served_model_name: str | None = Field(default=None, min_length=1, max_length=128, pattern=r"^[^\s]+$")
    prompt_token_price: int = Field(default=10**12, ge=0)
    completion_token_price: int = Field(default=2 * 10**12, ge=0)
    base_prompt_token_price: int | None = Field(default=None, ge=0)
    base_completion_token_price: int | None = Field(default=None, ge=0)
    min_fee: int = Field(default=0, ge=0)
    default_max_tokens: int = Field(default=256, ge=1)
    min_voucher_validity_s: int = Field(default=1_800, ge=0)  # at least settle_latency().min_voucher_validity_s
    max_in_flight: int = Field(default=256, ge=1)
    metrics_max_adapters: int = Field(default=20, ge=1)  # adapters with series of their own; the rest: "other"
    # paid work stops (503, not ready) while the indexer has not reached the chain for max_mirror_lag_s, or
    # the mirror is more than max_mirror_lag_blocks behind the head it saw (it must exceed confirmations)
    max_mirror_lag_s: float = Field(default=120.0, gt=0)
    max_mirror_lag_blocks: int = Field(default=32, ge=1)
    idempotency_window_s: int = Field(default=86_400, ge=0)
    reservation_ttl_s: float = Field(default=600.0, gt=0)

    # attribution: the method this node signs receipts with (1: lineage weights; 2: lineage blended with
    # span evidence from the datasets, see docs/attribution.md) and where its span indexes live
    attribution_method: int = Field(default=1, ge=1, le=2)  # an int field: "2" from the environment parses
    attribution_dir: Path | None = None  # default: data_dir/attribution

    # settlement: an epoch closes when its oldest receipt is this old, its fees reach max_value, or a
    # voucher in it expires within the margin; the beat ticks every settlement_interval_s. A settle is
    # mined within settle_max_mine_s (fee bumps included); reorgs up to `confirmations` blocks of
    # block_time_s are hedged. These make the worst-case settle latency (node/settlement/latency.py).
    epoch_max_age_s: float = Field(default=1_800.0, ge=0)
    epoch_max_value: int | None = Field(default=None, ge=1)
    epoch_expiry_margin_s: float = Field(default=900.0, ge=0)  # at least settle_latency().worst_case_s
    # vouchers per settle transaction (one per lane, ~53k gas each); more lanes wait for the next epoch
    epoch_max_lanes: int = Field(default=200, ge=1, le=400)
    # token units one ETH is worth: with it, a lane is settled only once its fees pay for its voucher's gas
    # at the chain's gas price, and an epoch only once they pay for the settle's (docs/settlement.md);
    # unset, the node settles every lane whatever its gas costs
    token_per_eth: int | None = Field(default=None, ge=1)
    settlement_interval_s: float = Field(default=15.0, gt=0)
    settle_max_mine_s: float = Field(default=120.0, gt=0)
    # how long building an epoch (its cumulative rewards tree: every payee ever paid) may take; counted in
    # the voucher horizon. A build that takes longer is redone with the horizon it measured (a warning)
    epoch_build_allowance_s: float = Field(default=30.0, ge=0)
    # every transaction the node sends (settles, x402 claims and sweeps, the gas key's deposits and
    # refunds) not mined after fee_bump_after_s is replaced with fees raised 15 %, never above this
    max_fee_per_gas: int = Field(default=500 * 10**9, ge=1)
    fee_bump_after_s: float = Field(default=15.0, gt=0)
    block_time_s: float = Field(default=12.0, gt=0)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = os.environ.get(CONFIG_ENV)
        if toml_path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml_path)))
        return tuple(sources)

    @model_validator(mode="after")
    def _refuse_insecure(self) -> Settings:
        if self.operator_key and self.operator_key_file:
            raise ValueError("set operator_key or operator_key_file, not both")
        key = self.resolved_operator_key()
        if self.chain_id != DEV_CHAIN_ID and key is not None and key.lower() == DEV_OPERATOR_KEY:
            raise ValueError(f"the public development key cannot be used on chain id {self.chain_id}")
        self._check_gas_key(key)
        latency = self.settle_latency()
        worst, least_validity = latency.worst_case_s, latency.min_voucher_validity_s
        if self.epoch_expiry_margin_s < worst or self.min_voucher_validity_s < least_validity:
            raise ValueError(f"epoch_expiry_margin_s ({self.epoch_expiry_margin_s:g}) must be at least the worst-case "
                             f"settle latency ({worst:g} s) and min_voucher_validity_s ({self.min_voucher_validity_s}) "
                             f"at least reservation_ttl_s plus it ({least_validity:g} s: a voucher is charged up to a "
                             "hold's life after it is accepted), or an accepted voucher may expire before its epoch "
                             "settles")
        if self.chain_id != DEV_CHAIN_ID and self.rpc_url is None:
            raise ValueError(f"chain id {self.chain_id} needs an rpc_url (only the dev chain is started locally)")
        return self

    def _check_gas_key(self, operator_key: str | None) -> None:
        """The x402 gas key is its own account: a transaction of the API's that never mines must hold no
        nonce of the operator's (the worker's settles come after it)."""
        if self.x402_gas_key and self.x402_gas_key_file:
            raise ValueError("set x402_gas_key or x402_gas_key_file, not both")
        gas = self.resolved_x402_gas_key()
        if gas is None:
            return
        if not self.is_dev and gas.lower().removeprefix("0x") == DEV_X402_GAS_KEY[2:]:
            raise ValueError(f"the public development key cannot be used on chain id {self.chain_id}")
        if operator_key is not None and _address(gas, "x402_gas_key") == _address(operator_key, "operator_key"):
            raise ValueError("x402_gas_key must not be the operator key: a deposit stuck in the mempool would hold "
                             "up the settlement worker's next settle")

    @model_validator(mode="after")
    def _base_name_is_no_adapter_id(self) -> Settings:
        name = self.resolved_served_model_name()
        if name.removeprefix("adapter-").isdigit():
            raise ValueError(f"the base model's served name {name!r} reads as an adapter id: set served_model_name")
        return self

    @model_validator(mode="after")
    def _mirror_lag_above_confirmations(self) -> Settings:
        if self.max_mirror_lag_blocks <= self.confirmations:
            raise ValueError("max_mirror_lag_blocks must exceed confirmations (the mirror is always that far "
                             "behind the head), or the node is never ready")
        return self

    @model_validator(mode="after")
    def _data_parallel_out_of_process(self) -> Settings:
        if self.data_parallel_size > 1 and not self.engine_process:
            raise ValueError("data_parallel_size > 1 needs engine_process (one engine core process per device)")
        return self

    # --- derived values -------------------------------------------------------------------------
    @property
    def is_dev(self) -> bool:
        return self.chain_id == DEV_CHAIN_ID

    def settle_latency(self, has_x402: bool | None = None) -> SettleLatency:
        """The worst-case settle latency these settings give (the one formula: node/settlement/latency.py);
        `has_x402` where the router comes from the deployment file rather than these settings."""
        return SettleLatency(beat_s=self.settlement_interval_s, mine_s=self.settle_max_mine_s,
                             build_s=self.epoch_build_allowance_s,
                             reorg_s=self.confirmations * self.block_time_s, max_age_s=self.epoch_max_age_s,
                             hold_s=self.reservation_ttl_s,
                             mirror_lag_s=self.max_mirror_lag_s + self.max_mirror_lag_blocks * self.block_time_s,
                             has_x402=self.x402_router is not None if has_x402 is None else has_x402)

    def fee_policy(self) -> FeePolicy:
        """How every transaction of the node is priced and replaced while it is not mined."""
        from node.chain.tx_manager import FeePolicy  # web3 only where a transaction is sent

        return FeePolicy(bump_after_s=self.fee_bump_after_s, max_fee_cap=self.max_fee_per_gas,
                         confirmations=self.finality_depth)

    def resolved_database_url(self) -> str:
        if self.database_url and self.database_password_file is not None:
            from sqlalchemy.engine import make_url

            password = read_secret(self.database_password_file, "database_password_file")
            return make_url(self.database_url).set(password=password).render_as_string(hide_password=False)
        return self.database_url or f"sqlite:///{(self.data_dir / 'loranode.db').resolve()}"

    def resolved_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    def rank_pools(self) -> tuple[tuple[int, int], ...]:
        """`adapter_rank_pools` as (rank, num_slots) pairs."""
        pairs = (part.split(":") for part in self.adapter_rank_pools.split(",") if part)
        return tuple((int(rank), int(num)) for rank, num in pairs)

    def resolved_served_model_name(self) -> str:
        """The `model` that names the base model alone: served_model_name, or the model folder's name."""
        if self.served_model_name:
            return self.served_model_name
        return self.model_path.resolve().name if self.model_path is not None else "base"

    def resolved_adapter_cache_dir(self) -> Path:
        return self.adapter_cache_dir or self.data_dir / "adapter-cache"

    def resolved_attribution_dir(self) -> Path:
        return self.attribution_dir or self.data_dir / "attribution"

    def resolved_deployment_file(self) -> Path:
        return self.deployment_file or Path("deployments") / f"{self.chain_id}.json"

    def resolved_operator_key(self) -> str | None:
        """The operator's private key (0x-hex): from the file, the environment, or the dev default."""
        if self.operator_key_file is not None:
            return read_secret(self.operator_key_file, "operator_key_file")
        if self.operator_key is not None:
            return self.operator_key.get_secret_value()
        return DEV_OPERATOR_KEY if self.is_dev else None

    def resolved_x402_gas_key(self) -> str | None:
        """The key paying the gas of the API's x402 transactions: from the file, the environment, or the dev default."""
        if self.x402_gas_key_file is not None:
            return read_secret(self.x402_gas_key_file, "x402_gas_key_file")
        if self.x402_gas_key is not None:
            return self.x402_gas_key.get_secret_value()
        return DEV_X402_GAS_KEY if self.is_dev else None


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment and LORANODE_CONFIG, with a ConfigError naming every bad value."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}", errors=len(exc.errors())) from exc


def read_secret(path: Path, setting: str) -> str:
    """A secret from its file (a compose or Kubernetes secret), stripped of surrounding whitespace."""
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read {setting} {path}: {exc}") from exc


def _address(key: str, setting: str) -> str:
    from eth_account import Account

    try:
        return str(Account.from_key(key).address)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{setting} is not a 32-byte hex private key") from exc
