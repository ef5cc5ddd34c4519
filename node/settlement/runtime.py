"""The settlement worker's long-lived objects, built once per process from Settings.

`SettlementRuntime.from_settings(settings)` reads the deployment file, opens the database, and
builds the TxManager (SQL TxStore, finality = `finality_depth` blocks) and the SettlementService of
the operator key. The epoch policy and the beat interval are Settings fields (epoch_max_age_s,
epoch_max_value, epoch_expiry_margin_s, settlement_interval_s).
"""

from __future__ import annotations

from dataclasses import dataclass

from eth_account import Account

from node.chain.contract_client import web3_for
from node.chain.contracts import Contracts
from node.chain.deploy import read_deployment
from node.chain.tx_manager import FeePolicy, TxManager
from node.chain.tx_store import SqlTxStore
from node.config import Settings
from node.db.session import make_engine, session_factory
from node.errors import ConfigError
from node.settlement.service import EpochPolicy, SettlementService


def epoch_policy(settings: Settings) -> EpochPolicy:
    return EpochPolicy(max_age_s=settings.epoch_max_age_s, max_value=settings.epoch_max_value,
                       expiry_margin_s=settings.epoch_expiry_margin_s)


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
        tx = TxManager(w3, key, SqlTxStore(factory), FeePolicy(confirmations=settings.finality_depth))
        contracts = Contracts.connect(w3, deployment, key)
        return cls(SettlementService(factory, contracts, tx, policy or epoch_policy(settings)))
