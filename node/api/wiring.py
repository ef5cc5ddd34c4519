"""Build a running API's services from Settings: engine, adapter store, database, payments, catalog."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator

from eth_account import Account
from prometheus_client.core import Metric
from sqlalchemy.orm import Session, sessionmaker

from node.api.deps import NodeServices
from node.api.engine_client import EngineClient
from node.api.generation import GenerationService
from node.api.metric_sources import BacklogReader, backlog_families, engine_families, gauge, tier_families
from node.api.metrics import APIMetrics
from node.api.receipt_issuer import ReceiptIssuer, dataset_refs
from node.api.shared_budget import shared_counts
from node.api.sqlite_lock import SQLiteLock
from node.attribution.attributor import Attributor
from node.attribution.index_store import IndexStore
from node.catalog import AdapterCatalog
from node.chain.binding import IndexedContracts, mirror_binding_fault
from node.chain.contract_client import ContractClient
from node.chain.deploy import Deployment
from node.chain.rpc import Rpc
from node.chain.tx_store import key_lock
from node.chain.x402_channels import X402Chain, token_domain
from node.config import Settings
from node.db.session import make_engine, session_factory
from node.engine import EngineConfig, LLMEngine
from node.engine.core_client import CoreClient
from node.engine.core_process import adapter_store as core_adapter_store
from node.engine.stats import device_tier, engine_stats
from node.errors import ConfigError, RpcTransient
from node.lora.content_hash import base_model_id
from node.lora.provider import AdapterRegistrar
from node.lora.store import AdapterStore, StoreConfig
from node.payment.ledger import Ledger
from node.payment.loss_spool import LossSpool
from node.payment.pricing import Pricing
from node.payment.service import PaymentService
from node.payment.x402.book import ChannelBook
from node.payment.x402.channel_mirror import ChannelMirror
from node.payment.x402.facilitator import Facilitator, erc20_balance_of
from node.payment.x402.gas_cover import GasCover
from node.payment.x402.refund import X402Refunds
from node.payment.x402.service import X402Payments
from node.payment.x402.terms import LaneTerms, Offer, X402Terms
from node.protocol.eip712 import Domain
from node.protocol.hexstr import to_hex
from node.settlement.runtime import check_chain_parameters
from node.settlement.split import SplitParams

log = logging.getLogger(__name__)
Engine = LLMEngine | CoreClient
StoreSnapshot = Callable[[], dict[str, dict[str, float]]]


def engine_config(settings: Settings) -> EngineConfig:
    if settings.model_path is None:
        raise ConfigError("set LORANODE_MODEL_PATH to the base model folder (config.json + safetensors)")
    return EngineConfig(model_path=settings.model_path, device=settings.device, dtype=settings.dtype,
                        max_num_seqs=settings.max_num_seqs, max_num_batched_tokens=settings.max_num_batched_tokens,
                        max_lora_rank=settings.max_lora_rank, max_adapter_slots=settings.max_adapter_slots,
                        max_adapter_memory_bytes=settings.max_adapter_device_bytes,
                        adapter_rank_pools=settings.rank_pools(),
                        max_model_len=settings.max_model_len, cuda_graphs=settings.cuda_graphs,
                        weight_quantization=settings.weight_quantization, prefix_caching=settings.prefix_caching,
                        tensor_parallel_size=settings.tensor_parallel_size)


def store_config(settings: Settings) -> StoreConfig:
    return StoreConfig(cache_dir=settings.resolved_adapter_cache_dir(), max_disk_bytes=settings.max_adapter_disk_bytes,
                       max_host_bytes=settings.max_adapter_host_bytes,
                       verify_every_load=settings.adapter_verify_every_load)


def start_engine(settings: Settings, config: EngineConfig) -> tuple[Engine, AdapterRegistrar, StoreSnapshot]:
    """The engine (its core processes started and ready, or in this process), where adapters are
    registered, and the adapter store's metrics (tier -> stat -> value, summed over the cores)."""
    if settings.engine_process:
        threads = settings.engine_threads
        if threads is None and settings.data_parallel_size > 1:
            threads = max(1, (os.cpu_count() or 1) // settings.data_parallel_size)
        client = CoreClient(config, settings.data_parallel_size, store=store_config(settings), num_threads=threads,
                            stall_timeout_s=settings.engine_stall_timeout_s)
        try:
            client.start()
        except BaseException:
            client.shutdown()
            raise
        return client, client.adapters, client.metrics.store_metrics
    store = core_adapter_store(store_config(settings), config)
    engine = LLMEngine(config, provider=store)
    return engine, store, lambda: _tiers(store.metrics().as_dict())


def _tiers(snapshot: dict[str, object]) -> dict[str, dict[str, float]]:
    return {tier: {k: float(v) for k, v in stats.items() if isinstance(v, int | float)}
            for tier, stats in snapshot.items() if isinstance(stats, dict)}


def build_services(settings: Settings, deployment: Deployment) -> NodeServices:
    """The API's services; on SQLite, only while no other API process serves the same file."""
    key = settings.resolved_operator_key()
    if key is None:
        raise ConfigError("the API signs receipts: set LORANODE_OPERATOR_KEY or LORANODE_OPERATOR_KEY_FILE")
    check_chain_parameters(settings, deployment)
    lock = SQLiteLock.for_database(settings.resolved_database_url())
    if lock is None:
        return _build_services(settings, deployment, key)
    lock.acquire()
    try:
        services = _build_services(settings, deployment, key)
    except BaseException:
        lock.release()
        raise
    services.on_shutdown.append(lock.release)
    return services


def _build_services(settings: Settings, deployment: Deployment, key: str) -> NodeServices:
    config = engine_config(settings)
    engine, adapters, store_metrics = start_engine(settings, config)
    try:
        return _wire(settings, deployment, key, config, engine, adapters, store_metrics)
    except BaseException:
        engine.shutdown()
        raise


def _wire(settings: Settings, deployment: Deployment, key: str, config: EngineConfig, engine: Engine,
          adapters: AdapterRegistrar, store_metrics: StoreSnapshot) -> NodeServices:
    db = session_factory(make_engine(settings.resolved_database_url()))
    node = Account.from_key(key).address
    ledger = Ledger(db, node, reservation_ttl_s=settings.reservation_ttl_s,
                    instance=f"{socket.gethostname()}:{settings.port}")
    pricing = Pricing(settings.prompt_token_price, settings.completion_token_price, settings.min_fee)
    base_pricing = Pricing(_or(settings.base_prompt_token_price, settings.prompt_token_price),
                           _or(settings.base_completion_token_price, settings.completion_token_price),
                           settings.min_fee)
    domain = Domain(chain_id=deployment.chain_id, verifying_contract=deployment.settlement)
    attributor = None
    if settings.attribution_method == 2:
        attributor = Attributor(IndexStore(settings.resolved_attribution_dir(), engine.tokenizer))
    payments = PaymentService(ledger, domain, node, pricing, min_validity_s=settings.min_voucher_validity_s,
                              base_pricing=base_pricing, loss_spool=LossSpool(settings.data_dir / "unrecorded-losses"))
    issuer = ReceiptIssuer(key, domain, attributor)
    catalog = AdapterCatalog(db, adapters, to_hex(base_model_id(config.model_path)),
                             settings.resolved_served_model_name(),
                             max_mirror_lag_s=settings.max_mirror_lag_s,
                             max_mirror_lag_blocks=settings.max_mirror_lag_blocks)
    catalog.binding_fault = binding_fault(settings, deployment, db)
    if attributor is not None:  # build the served adapters' indexes in the background from the start
        for view in catalog.served():
            attributor.prepare(dataset_refs(view))
    metrics = APIMetrics(settings.metrics_max_adapters)
    client = EngineClient(engine, settings.max_in_flight)
    offer, x402 = _x402(settings, deployment, key, payments, db)
    refunds = _x402_refunds(settings, deployment, key, x402, db)
    generation = GenerationService(client, payments, issuer, catalog, metrics, settings.default_max_tokens,
                                   offer=offer, x402=x402, shared=shared_counts(settings.resolved_broker_url(), node))
    _register_metrics(metrics, store_metrics, client, db, node)
    log.info("api for node %s on chain %d, base model %s", node, deployment.chain_id, catalog.base_model_id)
    return NodeServices(engine=client, payments=payments, catalog=catalog, db=db, metrics=metrics,
                        generation=generation, chain_id=deployment.chain_id,
                        settlement_address=deployment.settlement,
                        split=SplitParams(deployment.treasury, node, deployment.protocol_bps, deployment.node_bps),
                        max_mirror_lag_s=settings.max_mirror_lag_s,
                        idempotency_window_s=settings.idempotency_window_s,
                        x402_refunds=refunds,
                        on_shutdown=[generation.threads.close, engine.shutdown, client.templates.close,
                                     *_closers(adapters), *([attributor.close] if attributor else [])])


def _x402(settings: Settings, deployment: Deployment, key: str, payments: PaymentService,
          db: sessionmaker[Session]) -> tuple[Offer, X402Payments | None]:
    """What a 402 offers: our lanes always, x402 batch-settlement once the node has a router (docs/x402.md)."""
    lanes = LaneTerms(deployment.chain_id, deployment.token, payments.node, deployment.settlement, deployment.escrow)
    router = settings.x402_router or deployment.x402_router  # `loranode chain deploy --x402` writes it
    if router is None or settings.rpc_url is None:
        return Offer(lanes), None
    latency = settings.settle_latency(has_x402=True)  # an epoch with x402 lanes waits for its sweep
    latency.check_voucher_horizon(settings.min_voucher_validity_s, settings.epoch_expiry_margin_s)
    if settings.x402_withdraw_delay_s <= latency.min_thaw_period_s:  # channels are claimed when their epoch settles
        raise ConfigError("x402_withdraw_delay_s is too short for this node's settle latency: a payer could "
                          "withdraw what it was charged before the node claims it",
                          withdraw_delay_s=settings.x402_withdraw_delay_s, required_above_s=latency.min_thaw_period_s)
    client = ContractClient(settings.rpc_url, gas_key(settings, key),  # deposits: never an operator nonce
                            fees=settings.fee_policy(), nonce_lock=key_lock(db.kw["bind"]))  # replicas share it
    name, version = token_domain(client, deployment.token)
    terms = X402Terms(deployment.chain_id, deployment.token, name, version, router, payments.node,
                      settings.x402_withdraw_delay_s, min_deposit=settings.x402_min_deposit,
                      unfinal_credit=settings.x402_unfinal_credit)
    chain = X402Chain(client, router)
    # the indexer mirrors the channel contract when the deployment names it: the hold reads that
    mirror = ChannelMirror(db, settings.x402_withdraw_delay_s) if deployment.x402_channels else None
    x402 = X402Payments(payments, ChannelBook(db, payments.node), terms, key, chain.channel, chain.deposit,
                        chain_now=chain.now, read_mirror=mirror, simulate_deposit=chain.simulate_deposit)
    x402.facilitator = Facilitator(terms, chain, erc20_balance_of(client), reads=x402.chain_reads,
                                   is_funded=x402.is_funded, submit_deposit=x402.submit_deposit_once)
    return Offer(lanes, terms), x402


def gas_key(settings: Settings, operator_key: str) -> str:
    """The key paying the gas of what the API sends for x402 payers: its own account, so a transaction of
    the API's that never mines holds up none of the settlement worker's settles (docs/x402.md, "Keys")."""
    key = settings.resolved_x402_gas_key()
    if key is None:
        raise ConfigError("x402 needs a gas key of its own: set LORANODE_X402_GAS_KEY_FILE (docs/x402.md)")
    if Account.from_key(key).address == Account.from_key(operator_key).address:
        raise ConfigError("LORANODE_X402_GAS_KEY must not be the operator key: a deposit stuck in the mempool "
                          "would hold up every settle after it")
    return key


def _x402_refunds(settings: Settings, deployment: Deployment, key: str, x402: X402Payments | None,
                  db: sessionmaker[Session]) -> X402Refunds | None:
    """The cooperative refund, where the indexer mirrors the channel contract: a refunded channel stays held
    until the mirror shows the refund (node/payment/x402/refund.py)."""
    if x402 is None or not deployment.x402_channels or settings.rpc_url is None:
        return None
    # relayed by the gas key with the node's signatures: no operator nonce either
    client = ContractClient(settings.rpc_url, gas_key(settings, key), fees=settings.fee_policy(),
                            nonce_lock=key_lock(db.kw["bind"]))
    chain = X402Chain(client, x402.terms.router, authorizer_key=key)
    mirror = ChannelMirror(db, settings.x402_withdraw_delay_s)
    refunds = X402Refunds(x402, chain.channel, chain.refund, mirror.has_refund, gas=_refund_gas(settings, client))
    if x402.facilitator is not None:  # `refund` payloads at POST /x402/settle too
        x402.facilitator.refund = refunds.refund
    return refunds


def _refund_gas(settings: Settings, client: ContractClient) -> GasCover | None:
    """The rule that the channel's fees pay the node's gas on it before a gasless refund (x402/gas_cover.py),
    with the token's worth in ETH; without it, a warning (once, at start): refunds are granted whatever."""
    if settings.token_per_eth is None:
        log.warning("token_per_eth is not set: x402 refunds are granted whatever gas the node spent on the channel "
                    "(a payer looping deposit, one cheap request, refund costs the node ~212k gas a cycle): set "
                    "LORANODE_TOKEN_PER_ETH, token units one ETH is worth (docs/x402.md)")
        return None
    return GasCover(settings.token_per_eth, lambda: int(client.w3.eth.gas_price))


def _closers(adapters: AdapterRegistrar) -> list[Callable[[], None]]:
    return [adapters.close] if isinstance(adapters, AdapterStore) else []


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def binding_fault(settings: Settings, deployment: Deployment, db: sessionmaker[Session]) -> str | None:
    """Whether the configured chain is the one the mirror was written from, asked once at start (a dev
    chain restarted under an old data folder is another chain): the reason paid work is refused, or
    None. Without an RPC, or while it is unreachable, the indexer's checks on the cursor decide."""
    if settings.rpc_url is None:
        return None
    rpc = Rpc(settings.rpc_url, timeout_s=5.0)
    try:
        with db() as session:
            fault = mirror_binding_fault(rpc, IndexedContracts.from_deployment(deployment), session)
    except RpcTransient as e:
        log.warning("could not check the chain binding at start (%s); the indexer will", e.message)
        return None
    finally:
        rpc.close()
    if fault:
        log.error("refusing paid work: %s", fault)
    return fault


def _register_metrics(metrics: APIMetrics, store_metrics: StoreSnapshot, client: EngineClient,
                      db: sessionmaker[Session], node: str) -> None:
    engine = client.engine
    if isinstance(engine, CoreClient):
        def engine_sources() -> Iterator[Metric]:
            engine.refresh_metrics()  # the cores report now: a scrape counts every request answered before it
            yield from engine_families(engine.metrics.engine_stats)
            yield from tier_families(store_metrics)  # the cores report their device tier
    else:
        def figures() -> dict[str, float]:
            return engine_stats(engine)

        def tiers() -> dict[str, dict[str, float]]:
            return {**store_metrics(), "device": device_tier(engine)}

        def engine_sources() -> Iterator[Metric]:
            yield from engine_families(figures)
            yield from tier_families(tiers)

    metrics.add_source(engine_sources)
    backlog = BacklogReader(db, node)
    metrics.add_source(lambda: backlog_families(backlog))
    metrics.add_source(gauge("loranode_in_flight_requests", "Requests admitted and not finished",
                             lambda: float(client.in_flight)))
