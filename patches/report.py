"""`accel.report(model)`: which layers are patched, by which method, on which kernel path, and
totals (weight bytes against dense bf16, modules per kernel path)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .core import state_of

BF16_BYTES = 2


@dataclass
class Totals:
    """Sums over the report's rows. Bytes count the linears a method replaced (attention and
    cache rows change no weights): `weight_bytes` is what the patched modules store (their
    `weight_bytes()`: codes, indices, scales, low-rank factors, bias...), `dense_bf16_bytes` what
    the same linears take as dense bf16 (out x in weights, plus the bias)."""
    linears: int = 0
    weight_bytes: int = 0
    dense_bf16_bytes: int = 0
    kernels: dict[str, int] = field(default_factory=dict)  # kernel path -> number of patched modules

    @property
    def ratio(self) -> float | None:
        """weight_bytes / dense_bf16_bytes (None when no linear is patched)."""
        return self.weight_bytes / self.dense_bf16_bytes if self.dense_bf16_bytes else None


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
        t = self.totals()
        if t.linears:
            lines.append(f"total: {t.linears} linears store {t.weight_bytes:,} bytes vs {t.dense_bf16_bytes:,} "
                         f"dense bf16 ({t.ratio:.3f}x)")
        lines.append("modules per kernel path: " + ", ".join(f"{k} {n}" for k, n in sorted(t.kernels.items())))
        return "\n".join(lines)

    def __len__(self) -> int:
        return len(self.rows)

    def by_method(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r["method"]] = out.get(r["method"], 0) + 1
        return out

    def totals(self) -> Totals:
        t = Totals()
        for r in self.rows:
            t.kernels[r["kernel"]] = t.kernels.get(r["kernel"], 0) + 1
            if r.get("weight_bytes") is not None:
                t.linears += 1
                t.weight_bytes += r["weight_bytes"]
                t.dense_bf16_bytes += r["dense_bf16_bytes"]
        return t


def _bytes(row) -> tuple[int | None, int | None]:
    """(stored bytes, dense bf16 bytes) of a replaced linear; (None, None) for other rows."""
    m = row.target
    if row.kind != "linear" or not callable(getattr(m, "weight_bytes", None)):
        return None, None
    bias = getattr(m, "bias", None)
    dense = (m.in_features * m.out_features + (m.out_features if bias is not None else 0)) * BF16_BYTES
    return int(m.weight_bytes()), dense


def report(model) -> Report:
    state = state_of(model)
    rows = []
    for r in ([] if state is None else state.rows):
        stored, dense = _bytes(r)
        rows.append({"module": r.module, "method": r.method, "kind": r.kind, "kernel": r.kernel, "detail": r.detail,
                     "weight_bytes": stored, "dense_bf16_bytes": dense})
    return Report(rows)
