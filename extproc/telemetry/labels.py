"""Bounded entitlement label values: a metrics label must not grow with the number of tenants.

Every time series costs memory in this process and in Prometheus, and entitlements are created by users
(custom resources), so their names cannot be label values without a cap. Beyond the cap a name becomes
`other`. Which names keep their own label is deterministic: a configured allow list, or else the first N
names seen (in the order they are first labelled; a restart starts over).
"""

from __future__ import annotations

from collections.abc import Iterable

OTHER = "other"
DEFAULT_MAX_ENTITLEMENTS = 100


class EntitlementLabels:
    def __init__(self, max_entitlements: int = DEFAULT_MAX_ENTITLEMENTS, allow: Iterable[str] | None = None) -> None:
        if max_entitlements < 0:
            raise ValueError("max_entitlements must be >= 0")
        self.max = max_entitlements
        self.allow = frozenset(allow) if allow else None
        self._known: dict[str, str] = {}  # name -> label, grows to at most max (+ names mapped to OTHER)
        self._own = 0  # names labelled with their own name

    def __call__(self, name: str) -> str:
        label = self._known.get(name)
        if label is not None:
            return label
        if self.allow is not None:
            label = name if name in self.allow else OTHER
        elif self._own < self.max and name != OTHER:
            label = name
            self._own += 1
        else:
            label = OTHER
        # Remember names mapped to OTHER too, but only a bounded number of them: the map must stay bounded.
        if label is not OTHER or len(self._known) < 4 * self.max + 1024:
            self._known[name] = label
        return label
