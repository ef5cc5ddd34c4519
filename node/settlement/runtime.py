"""The settlement worker's long-lived objects, built once per process from Settings.

`SettlementRuntime.from_settings(settings)` reads the deployment file, opens the database, and
builds the TxManager (SQL TxStore, finality = `finality_depth` blocks) and the SettlementService of
the operator key. The epoch policy and the beat interval are Settings fields (epoch_max_age_s,
epoch_max_value, epoch_expiry_margin_s, settlement_interval_s); the vouchers' horizon comes from the
worst-case settle latency, and a chain whose escrow thaws faster than that latency is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import requests
from eth_account import Account

from node.chain.contract_client import ContractClient, web3_for
from node.chain.contracts import Contracts
from node.chain.deploy import Deployment, read_deployment
from node.chain.tx_manager import TxManager
from node.chain.tx_store import SqlTxStore, key_lock
from node.chain.x402_channels import X402Chain
from node.config import Settings
from node.db.session import make_engine, session_factory
from node.errors import ConfigError
from node.settlement.policy import EpochPolicy
from node.settlement.service import SettlementService
from node.settlement.x402_guard import X402Guard
from node.settlement.x402_sweep import X402Sweep

log = logging.getLogger(__name__)
THAW_PERIOD_ABI = [{"type": "function", "name": "thawPeriod", "stateMutability": "view", "inputs": [],
                    "outputs": [{"name": "", "type": "uint64"}]}]


def epoch_policy(settings: Settings, has_x402: bool | None = None) -> EpochPolicy:
    latency = settings.settle_latency(has_x402)
    latency.check_voucher_horizon(settings.min_voucher_validity_s, settings.epoch_expiry_margin_s)
    if settings.token_per_eth is None and not settings.is_dev:
        log.warning("token_per_eth is not set: every lane is settled whatever its gas costs (about 53k gas a "
                    "lane, whatever its fees): set it so lanes of dust requests wait until they pay for it")
    return EpochPolicy(max_age_s=settings.epoch_max_age_s, max_value=settings.epoch_max_value,
                       expiry_margin_s=settings.epoch_expiry_margin_s,
                       land_within_s=latency.build_to_land_s, build_s=latency.build_s,
                       max_lanes=settings.epoch_max_lanes, token_per_eth=settings.token_per_eth)


def check_chain_parameters(settings: Settings, deployment: Deployment) -> None:
    """Refuse to run (ConfigError) where the escrow's thaw period lets a payer withdraw a charge before
    this node's worst-case settle latency has passed. Read on chain (it is immutable there); the
    deployment file's record stands in when the chain does not answer at start."""
    thaw_period_s = deployment.thaw_period_s
    if settings.rpc_url is not None:
        try:
            w3 = web3_for(settings.rpc_url)
            escrow = w3.eth.contract(address=w3.to_checksum_address(deployment.escrow), abi=THAW_PERIOD_ABI)
            thaw_period_s = int(escrow.functions.thawPeriod().call())
        except (requests.ConnectionError, requests.Timeout) as exc:
            log.warning("chain unreachable at start (%s): checking the deployment file's thaw period", exc)
    has_x402 = (settings.x402_router or deployment.x402_router) is not None
    settings.settle_latency(has_x402).check_thaw_period(thaw_period_s)


def operator_address(settings: Settings) -> str:
    key = settings.resolved_operator_key()
    if key is None:
        raise ConfigError("the settlement worker needs the operator key (operator_key or operator_key_file)")
    return str(Account.from_key(key).address)


@dataclass(frozen=True)
class SettlementRuntime:
    service: SettlementService

    @classmethod
    def from_settings(cls, settings: Settings, policy: EpochPolicy | None = None) -> SettlementRuntime:
        key = settings.resolved_operator_key()
        if key is None or settings.rpc_url is None:
            raise ConfigError("the settlement worker needs rpc_url and the operator key")
        deployment = read_deployment(settings.resolved_deployment_file())
        w3 = web3_for(settings.rpc_url)
        factory = session_factory(make_engine(settings.resolved_database_url()))
        tx = TxManager(w3, key, SqlTxStore(factory), settings.fee_policy())
        contracts = Contracts.connect(w3, deployment, key, nonce_lock=key_lock(factory.kw["bind"]))
        router = settings.x402_router or deployment.x402_router
        settings.settle_latency(router is not None).check_thaw_period(contracts.escrow.thaw_period_s())  # immutable
        sweep, guard = None, None
        if router is not None:  # x402 channels are claimed into the router's escrow first
            client = ContractClient(w3, key, fees=settings.fee_policy(), nonce_lock=key_lock(factory.kw["bind"]))
            chain = X402Chain(client, router)
            # the sweep's and the guard's transactions are intents of `tx`, like the settles (x402_intents.py)
            sweep = X402Sweep(factory, chain, deployment.settlement, tx)
            guard = (X402Guard(factory, chain, tx, settings.max_mirror_lag_s,  # reads the channel mirror
                               settings.max_mirror_lag_blocks, token_per_eth=settings.token_per_eth)
                     if deployment.x402_channels else None)
        policy = policy or epoch_policy(settings, has_x402=router is not None)  # an x402 epoch waits for its sweep
        return cls(SettlementService(factory, contracts, tx, policy, before_send=sweep,
                                     on_tick=guard))
