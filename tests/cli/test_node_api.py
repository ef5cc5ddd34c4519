"""The watching commands' shared output: every time is shown one way, ISO 8601 in UTC to the second."""

from __future__ import annotations

import pytest

from node.cli.node_api import utc_time


@pytest.mark.parametrize(("when", "shown"), [
    ("2026-12-06T09:50:01.536948+00:00", "2026-12-06T09:50:01Z"),  # the API's openedAt / finalizedAt
    ("2026-12-06T11:50:02+02:00", "2026-12-06T09:50:02Z"),  # another offset: converted, not cut
    ("2026-12-06T09:50:02", "2026-12-06T09:50:02Z"),  # no offset: the node stores UTC
    (1_796_550_602, "2026-12-06T09:50:02Z"),  # the chain's unix seconds (escrow's thaw end)
    (None, "-"),
    (0, "-"),  # the chain's "nothing thaws"
])
def test_a_time_is_shown_as_iso_8601_utc_to_the_second(when: str | int | None, shown: str) -> None:
    assert utc_time(when) == shown
