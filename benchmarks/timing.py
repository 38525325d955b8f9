"""What the benchmarks share: adding up the seconds spent in a function they do not own."""

from __future__ import annotations

import time


def time_calls(owner: object, name: str, label: str, parts: dict[str, float]) -> None:
    """Replace ``owner.name`` with a wrapper that adds each call's seconds to ``parts[label]``."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        began = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            parts[label] = parts.get(label, 0.0) + time.perf_counter() - began

    setattr(owner, name, wrapper)
