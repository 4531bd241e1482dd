"""A KV-event sink that records what the subscriber tells it (unit and component tests)."""

from __future__ import annotations

from epp.datalayer.kvevents.events import EventBatch


class RecordingSink:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def apply(self, address: str, batch: EventBatch) -> None:
        self.calls.append(("apply", batch.seq))

    def restarted(self, address: str) -> None:
        self.calls.append(("restarted", None))

    def desynced(self, address: str, reason: str) -> None:
        self.calls.append(("desynced", reason))
