"""Which of a model's versions are served: ``latest:N`` (the N highest numbers), ``all``, or
``specific:1,3`` (those, when present), as TF Serving's and Triton's version policies say."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

POLICY = re.compile(r"^(latest:[1-9][0-9]*|all|specific:[0-9]+(,[0-9]+)*)$")


@dataclass(frozen=True)
class VersionPolicy:
    kind: str  # latest | all | specific
    count: int = 1  # latest's N
    numbers: frozenset[int] = frozenset()  # specific's versions

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """``latest:N``, ``all`` or ``specific:1,3``; raises ValueError naming the forms."""
        text = text.strip()
        if not POLICY.match(text):
            raise ValueError(f"version policy {text!r}: expected latest:N, all or specific:1,3")
        kind, _, rest = text.partition(":")
        if kind == "latest":
            return cls(kind, count=int(rest))
        if kind == "specific":
            return cls(kind, numbers=frozenset(int(number) for number in rest.split(",")))
        return cls(kind)

    def chosen(self, versions: Iterable[int]) -> set[int]:
        """The versions this policy serves out of those present."""
        present = sorted(set(versions))
        if self.kind == "latest":
            return set(present[-self.count:])
        if self.kind == "specific":
            return self.numbers & set(present)
        return set(present)

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest:{self.count}"
        if self.kind == "specific":
            return "specific:" + ",".join(str(number) for number in sorted(self.numbers))
        return "all"
