"""Typed errors. Each carries the facts of what went wrong; the API maps them to HTTP in one table.

Every error a user can cause (a request, an adapter file, a config value, a chain event) is a
`NodeError` subclass. `code` is a stable machine-readable name; `status` the HTTP status the API
answers with. Subclasses add fields, never behaviour.
"""

from __future__ import annotations

from typing import Any, ClassVar


class NodeError(Exception):
    """Base of every error loranode raises on purpose."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, **facts: Any) -> None:
        super().__init__(message)
        self.message = message
        self.facts = facts

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **_jsonable(self.facts)}


def _jsonable(facts: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)
            for k, v in facts.items()}


# --- configuration -------------------------------------------------------------------------------
class ConfigError(NodeError):
    code = "config_error"


# --- requests ------------------------------------------------------------------------------------
class BadRequest(NodeError):
    status = 400
    code = "invalid_request"


class NoChatTemplate(BadRequest):
    """Neither the adapter nor the base model has a chat template: chat is refused, never invented."""

    code = "no_chat_template"


class ChatTemplateError(BadRequest):
    """The chat template refused the messages (it raised), or is not a template a node will render."""

    code = "chat_template_error"


class PromptTooLong(NodeError):
    status = 413
    code = "prompt_too_long"


class RequestTooLarge(NodeError):
    """The request body is over the API's size limit (it is not read past the limit)."""

    status = 413
    code = "request_too_large"


class Overloaded(NodeError):
    status = 429
    code = "overloaded"


# --- payment -------------------------------------------------------------------------------------
class PaymentError(NodeError):
    status = 402
    code = "payment_error"


class BadSignature(PaymentError):
    status = 401
    code = "bad_signature"


class InsufficientEscrow(PaymentError):
    status = 402
    code = "insufficient_escrow"


class VoucherExpiresTooSoon(PaymentError):
    """A new voucher with less time left than the node's minimum validity (`minVoucherValiditySeconds`
    of GET /v1/node): the node could not settle it before its deadline."""

    status = 401
    code = "voucher_expires_too_soon"


class DepositNotFinal(InsufficientEscrow):
    """The escrow covers the request only with deposits that are not final yet (facts: how much, and
    the chain head at which it counts)."""

    code = "deposit_not_final"


class VoucherConflict(PaymentError):
    """A replayed, stale or out-of-order voucher on a lane."""

    status = 409
    code = "voucher_conflict"


# --- reading a receipt's text -------------------------------------------------------------------
class ReadUnauthorized(NodeError):
    """An X-Receipt-Read that is malformed, expired, valid for too long, for another receipt, or whose
    signature does not recover to the payer it names."""

    status = 401
    code = "read_unauthorized"


class AdminUnauthorized(NodeError):
    """A call to the admin port without the operator's admin token (or with another one)."""

    status = 401
    code = "admin_unauthorized"


class NotThePayer(NodeError):
    """A valid read authorization from someone who did not pay for this receipt."""

    status = 403
    code = "not_the_payer"


# --- a node's answer, as its clients see it --------------------------------------------------------
class NodeRefusal(NodeError):
    """A node answered with an error: its HTTP status, error code and message as it sent them (facts:
    its details). Raised by clients (the SDK, the CLI), never by the node itself."""

    code = "node_refusal"

    def __init__(self, http_status: int, node_code: str, message: str, url: str, **facts: Any) -> None:
        super().__init__(message, **facts)
        self.http_status, self.node_code, self.url = http_status, node_code, url


class NodeUnreachable(NodeError):
    """Nothing answers at a node's URL: connection refused or reset, a timeout, or not its API."""

    status = 503
    code = "node_unreachable"

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"no node answers at {url}", reason=reason)
        self.url = url


# --- adapters ------------------------------------------------------------------------------------
class AdapterError(NodeError):
    status = 422
    code = "adapter_error"


class AdapterNotFound(AdapterError):
    status = 404
    code = "adapter_not_found"


class AdapterFormatError(AdapterError):
    """An adapter folder that is not a PEFT LoRA we can serve (pickles, shapes, modules, rank)."""

    code = "adapter_format"


class AdapterIntegrityError(AdapterError):
    """The adapter's bytes do not hash to what the registry says."""

    code = "adapter_integrity"


class AdapterTooLarge(AdapterError):
    code = "adapter_too_large"


class AdapterSourceError(AdapterError):
    """The adapter's URI could not be fetched (missing file, HTTP error, timeout, size limit)."""

    code = "adapter_source"


class ModelFormatError(NodeError):
    code = "model_format"


class TensorParallelError(NodeError):
    """A tensor-parallel rank died or its collectives broke: the step's requests fail, and the group
    cannot step again (the engine core exits, and its supervisor starts it again)."""

    status = 503
    code = "tensor_parallel"


class UnsupportedArchitecture(ModelFormatError):
    """A base model whose architecture (config.json `model_type`) no family here serves."""

    code = "unsupported_architecture"


# --- attribution ---------------------------------------------------------------------------------
class AttributionError(NodeError):
    """Evidence or weights that do not follow the attribution rule, or that cannot be recomputed."""

    status = 422
    code = "attribution_error"


# --- chain, mirror, storage ----------------------------------------------------------------------
class Unavailable(NodeError):
    status = 503
    code = "unavailable"


class MirrorUnavailable(Unavailable):
    code = "mirror_unavailable"


class DatabaseUnavailable(Unavailable):
    code = "database_unavailable"


class ChainError(NodeError):
    code = "chain_error"


class TxNotMined(ChainError):
    """A transaction was not mined in time, fee bumps up to the configured cap included: it may still be
    mined later (its nonce holds every later transaction of the key), so never send more behind it."""

    status = 503
    code = "tx_not_mined"


class ReorgTooDeep(ChainError):
    code = "reorg_too_deep"


class ChainMismatch(ChainError):
    """The RPC's chain is not the one the mirror was written from (chain id, genesis hash or the
    contracts differ, or a contract has no code): the indexer halts, the API refuses paid work."""

    code = "chain_mismatch"


class MirrorHalted(ChainError):
    """The indexer halted this mirror for good (its reason is on the cursor); it refuses to run on."""

    code = "mirror_halted"


class ChainOverruled(ChainError):
    """The guardian vetoed the node, or amended an epoch to a root the node did not build: nothing may be
    built on, or land on, the node's own leaves until it adopts the corrected tree."""

    code = "chain_overruled"


class ContractBuildError(ChainError):
    code = "contract_build"


# --- chain RPC (indexer) -------------------------------------------------------------------------
class RpcError(ChainError):
    """The RPC answered with an error that retrying will not fix."""

    code = "rpc_error"


class RpcTransient(ChainError):
    """An RPC failure worth retrying (the indexer retries these, with a smaller range for logs)."""

    status = 503
    code = "rpc_transient"


class RpcTimeout(RpcTransient):
    code = "rpc_timeout"


class RpcUnreachable(RpcTransient):
    """Connection refused, dropped or reset; or an HTTP 429/5xx from the provider."""

    code = "rpc_unreachable"


class RangeTooLarge(RpcTransient):
    """The provider refused an `eth_getLogs` range (facts: `suggested_blocks` when it said one)."""

    code = "rpc_range_too_large"


class ChainMoved(RpcTransient):
    """The chain changed between two reads of one range (a log's block hash is not the header's)."""

    code = "chain_moved"


class RpcBehind(RpcTransient):
    """The RPC does not have a block the mirror already has: a lagging or syncing node (or a chain
    that got shorter). The indexer waits rather than roll back on its word."""

    code = "rpc_behind"
