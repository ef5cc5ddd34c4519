"""Write-offs the database could not take, kept on the API process's local disk until it can.

A node fault after tokens left the node charges nothing, spends the voucher and records a loss, in one
database transaction (`Ledger.write_off`). When the database refuses that transaction, the write-off is
written here (one fsynced JSON file) and its voucher stays in flight: this process and its next life
on the same data folder refuse the voucher (409) until the write-off is in the database, so a restart
never lets it take its own old hold over and buy a second generation. `PaymentService` moves the
entries into the database at its next paid request, and the API at its start and every minute after
(node/api/app.py): a node that serves nothing records them too.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from node.db.loss import LossReason
from node.payment.ledger import Reservation
from node.payment.voucher_check import CheckedVoucher
from node.protocol.hexstr import from_hex, to_hex
from node.protocol.voucher import SignedVoucher


@dataclass(frozen=True)
class UnrecordedLoss:
    reservation: Reservation
    checked: CheckedVoucher
    amount: int
    reason: LossReason
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"reservation": {**asdict(self.reservation), "cumulative": str(self.reservation.cumulative)},
                "voucher": self.checked.to_json(), "digest": to_hex(self.checked.digest),
                "amount": str(self.amount), "reason": self.reason.value, "detail": self.detail}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> UnrecordedLoss:
        v = SignedVoucher.from_json(d["voucher"])
        checked = CheckedVoucher(v.payer, v.node, v.lane, v.cumulative, v.request_hash, v.deadline, v.signature,
                                 from_hex(d["digest"]))
        res = {**d["reservation"], "cumulative": int(d["reservation"]["cumulative"])}
        return cls(Reservation(**res), checked, int(d["amount"]), LossReason(d["reason"]), d["detail"])


class LossSpool:
    """A folder with one JSON file per unrecorded write-off, named by its voucher hash. Every API process
    on the data folder reads them all (replicas share it, and a container's name changes when it is
    recreated): each refuses their vouchers and moves them into the database; writing one twice records
    it once (`Ledger.write_off`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def add(self, loss: UnrecordedLoss) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{loss.checked.digest_hex}.json"
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.write(json.dumps(loss.to_json()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def entries(self) -> list[UnrecordedLoss]:
        if not self.folder.is_dir():
            return []
        out = []
        for path in sorted(self.folder.glob("0x*.json"), key=lambda p: p.stat().st_mtime):
            try:
                out.append(UnrecordedLoss.from_json(json.loads(path.read_text(encoding="utf-8"))))
            except FileNotFoundError:  # recorded by another process meanwhile
                continue
        return out

    def holds(self, voucher_hash: str) -> bool:
        return (self.folder / f"{voucher_hash}.json").is_file()

    def remove(self, loss: UnrecordedLoss) -> None:
        (self.folder / f"{loss.checked.digest_hex}.json").unlink(missing_ok=True)
