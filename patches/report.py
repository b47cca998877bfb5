"""`accel.report(model)`: which layers are patched, by which method, on which kernel path."""
from __future__ import annotations

from dataclasses import dataclass

from .core import state_of


@dataclass
class Report:
    rows: list[dict]

    def __str__(self) -> str:
        if not self.rows:
            return "model is not patched by accel"
        cols = ["module", "method", "kind", "kernel", "detail"]
        widths = {c: max(len(c), *(len(str(r[c])) for r in self.rows)) for c in cols}
        lines = ["  ".join(c.ljust(widths[c]) for c in cols), "  ".join("-" * widths[c] for c in cols)]
        lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in self.rows]
        return "\n".join(lines)

    def __len__(self) -> int:
        return len(self.rows)

    def by_method(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r["method"]] = out.get(r["method"], 0) + 1
        return out


def report(model) -> Report:
    state = state_of(model)
    rows = [] if state is None else [
        {"module": r.module, "method": r.method, "kind": r.kind, "kernel": r.kernel, "detail": r.detail}
        for r in state.rows]
    return Report(rows)
