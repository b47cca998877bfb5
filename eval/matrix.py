"""`accel eval matrix`: every row of eval/matrix_rows.py on every model, accuracy and speed.

Per model: load it twice (in `dtype` for calibration, perplexity and passkey; in bf16 for speed,
the dtype a CPU user picks), then per row
  1. the artifact: from the cache (`<cache_dir>/<model>/<row>-<key>`, key = the model's
     fingerprint, every stage's full config (defaults and config version included), the
     tokenizer's BOS, a digest of the calibration tokens, the settings and the accel version) or calibrated
     now as one recipe (`accel.calibrate(model, accel.Recipe(...))`) and saved there (an
     interrupted calibration resumes from `<dir>.partial`);
  2. perplexity on each corpus, all rows in `seq_len` windows (2048 by default: DS rows need long
     windows, and the composition check divides perplexities of different rows), Double Sparsity
     in its every-query-row scoring mode with `min_context=0` (as `accel eval ds-sweep`), so its
     selection counts in the perplexity;
  3. passkey retrieval at `passkey_context` for rows with Double Sparsity (eval/ds_retrieval.py;
     every decode step sparse; a composed row's weight method stays applied throughout);
then the speed of every row against dense bf16 in one interleaved run (eval/matrix_speed.py),
which also reads the weight bytes (accel.report) of each row on the bf16 model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

CORPORA = ("wiki", "shakespeare")
COMPOSITION_SLACK = 1.03
SPEED_TARGET = 2.5  # ds+gqsa decode speedup at the largest context, 2 threads


@dataclasses.dataclass(frozen=True)
class MatrixSettings:
    max_tokens: int = 16384
    seq_len: int = 2048
    batch_size: int = 2
    corpora: tuple = CORPORA
    passkey_context: int = 4096
    passkey_n: int = 10
    contexts: tuple = (1024, 8192)
    threads: tuple = (1, 2)
    rounds: int = 3
    new_tokens: int = 32
    num_calibration_samples: int | None = None  # None: each method's default
    max_seq_length: int | None = None
    seed: int = 0
    dtype: str = "float32"
    speed: bool = True


QUICK = dict(max_tokens=1024, seq_len=256, passkey_context=512, passkey_n=2, contexts=(128, 256), rounds=1,
             new_tokens=4, num_calibration_samples=4, max_seq_length=128)


def check_models(names) -> list[str]:
    """Embedded model names (accel.models), local directories, or tiny-<arch> (tests); ConfigError otherwise."""
    import accel
    from accel.configs import ConfigError

    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ConfigError("--models: no models given")
    known = accel.models.EMBEDDED_NAMES
    for n in names:
        if not (accel.models.find(n) or Path(n).is_dir() or n.startswith("tiny-")):
            raise ConfigError(f"--models: unknown model {n!r}: not an embedded model ({', '.join(known)}) "
                              f"nor a local model directory")
    return names


def load_model(name: str, dtype: str):
    """(model, tokenizer); tests replace this."""
    import accel

    return accel.models.load(name, dtype=dtype)


def _calibrate(model, recipe, tok, output: Path, settings: MatrixSettings, progress: bool):
    """One row's calibration (a module function so that tests can count the calls)."""
    import accel

    return accel.calibrate(model, recipe, tokenizer=tok, output=output,
                           num_calibration_samples=settings.num_calibration_samples,
                           max_seq_length=settings.max_seq_length, seed=settings.seed, progress=progress)


def cache_key(model, tok, row: str, settings: MatrixSettings) -> str:
    """What a cached calibration is valid for. Every stage's full resolved config (each field,
    defaults included, and the config version: a default that changes is another key, not a
    stale artifact), the tokenizer's BOS and a digest of each stage's calibration tokens (both
    change what calibration sees), the calibration settings, dtype and model fingerprint."""
    from accel._version import __version__
    from accel.artifact import fingerprint
    from accel.calibrate.checkpoint import samples_digest
    from accel.calibrate.recipe import _stage_data
    from accel.calibrate.registry import get_calibrator
    from accel.data import bos_token_id

    from .matrix_rows import recipe

    rec = recipe(row)
    call_over = dict(num_calibration_samples=settings.num_calibration_samples,
                     max_seq_length=settings.max_seq_length, seed=settings.seed)
    stages = []
    for i, (c, so) in enumerate(zip(rec.stages, rec.calibration)):
        samples, spec = _stage_data(i, model, c, get_calibrator(c.method), None, so, call_over, None, tok)
        stages.append({"config": c.to_dict(), "spec": dataclasses.asdict(spec),
                       "data": samples_digest(samples) if samples is not None else None})
    doc = {"fingerprint": fingerprint(model), "stages": stages, "accel": __version__,
           "bos_token_id": bos_token_id(tok),
           "calibration": [settings.num_calibration_samples, settings.max_seq_length, settings.seed],
           "dtype": settings.dtype}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:12]


def row_path(model, tok, model_name: str, row: str, settings: MatrixSettings, cache_dir: Path) -> Path:
    """`<cache_dir>/<model>/<row>-<key>`: the row's artifact directory (for dense, only the stem of
    its cached accuracy file: the key is then the model's fingerprint and the tokenizer's BOS)."""
    from accel.artifact import fingerprint
    from accel.data import bos_token_id

    from .matrix_rows import recipe, safe_name

    if recipe(row) is None:
        key = hashlib.sha256(json.dumps([fingerprint(model), bos_token_id(tok), settings.dtype],
                                        default=str).encode()).hexdigest()[:12]
    else:
        key = cache_key(model, tok, row, settings)
    return Path(cache_dir) / safe_name(model_name) / f"{safe_name(row)}-{key}"


# What each cached accuracy part depends on (besides the artifact, named by its directory).
_PPL_FIELDS = ("max_tokens", "seq_len", "batch_size", "corpora", "dtype")
_PASSKEY_FIELDS = ("passkey_context", "passkey_n", "seed", "dtype")


def accuracy_path(row_dir: Path, settings: MatrixSettings, part: str) -> Path:
    """Where a row's perplexities (part "ppl") or passkey result ("passkey") are cached beside its
    artifact: a rerun with the same artifact and settings (for example to add the speed run) does
    not redo them. The passkey key includes the retrieval task's version, so a changed prompt
    is measured again while the perplexities stay."""
    from accel._version import __version__

    from .ds_retrieval import TASK_VERSION

    fields = _PPL_FIELDS if part == "ppl" else _PASSKEY_FIELDS
    doc = {k: getattr(settings, k) for k in fields} | {"accel": __version__}
    if part == "passkey":
        doc["task_version"] = TASK_VERSION
    key = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return row_dir.parent / f"{row_dir.name}.{part}-{key}.json"


def _cached(path: Path, label: str, recompute: bool, compute, valid):
    """(value, cached): the JSON at `path` when it is there and valid, else compute() written there."""
    from accel.artifact import write_file

    if path.is_file() and not recompute:
        try:
            out = json.loads(path.read_text())
        except ValueError:
            log.warning("[%s] unreadable cached result %s: recomputing", label, path)
        else:
            if valid(out):
                log.info("[%s] cached result %s", label, path)
                return out, True
    out = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, lambda tmp: Path(tmp).write_text(json.dumps(out, default=float)), overwrite=True)
    return out, False


def cached_accuracy(model, tok, art, row_dir: Path, tokens: dict, settings: MatrixSettings, progress: bool,
                    label: str, recompute: bool = False) -> tuple[dict, bool]:
    """({"ppl": ..., "passkey": ... for DS rows}, cached: bool, True when nothing was measured);
    computed parts are written atomically for the next run."""
    ppl, c1 = _cached(accuracy_path(row_dir, settings, "ppl"), label, recompute,
                      lambda: perplexities(model, tok, art, tokens, settings, progress, label),
                      lambda v: isinstance(v, dict) and set(v) == set(settings.corpora))
    out = {"ppl": ppl}
    if not _ds_configs(art):
        return out, c1
    pk, c2 = _cached(accuracy_path(row_dir, settings, "passkey"), label, recompute,
                     lambda: passkey(model, tok, art, settings, progress, label),
                     lambda v: isinstance(v, dict) and "ds" in v)
    return {**out, "passkey": pk}, c1 and c2


def row_artifact(model, tok, model_name: str, row: str, settings: MatrixSettings, cache_dir: Path,
                 progress: bool = True):
    """(artifact or None for dense, cached: bool, seconds)."""
    from accel.artifact import CONFIG_NAME, Artifact

    from .matrix_rows import recipe

    rec = recipe(row)
    if rec is None:
        return None, False, 0.0
    path = row_path(model, tok, model_name, row, settings, cache_dir)
    if (path / CONFIG_NAME).is_file():
        log.info("[%s] %s: calibration cached at %s", model_name, row, path)
        return Artifact.load(path), True, 0.0
    log.info("[%s] %s: calibrating %s into %s", model_name, row, " -> ".join(rec.methods), path)
    t0 = time.perf_counter()
    art = _calibrate(model, rec, tok, path, settings, progress)
    secs = time.perf_counter() - t0
    log.info("[%s] %s: calibrated in %.0fs", model_name, row, secs)
    return art, False, secs


def calibration_budget(art) -> list[dict]:
    """Per stage: method and the calibration tokens it used, from the artifact's record."""
    if art is None:
        return []
    stages = art.calibration.get("stages") or [art.calibration]
    out = []
    for cfg, st in zip(art.configs, stages):
        st = st or {}
        # Methods record their data spec at the top level or under "data" (prune).
        st = st.get("data") if isinstance(st.get("data"), dict) else st
        out.append({"method": cfg.method, **{k: st.get(k) for k in ("n_samples", "seq_len", "source", "seed")}})
    return out


def eval_artifact(art):
    """The artifact with Double Sparsity in its scoring mode, every window row sparse (min_context=0)."""
    from accel.artifact import Artifact

    cfgs = [dataclasses.replace(c, min_context=0, score_mode="sparse") if c.method == "double-sparsity" else c
            for c in art.configs]
    return Artifact(configs=cfgs, tensors=art.tensors, fingerprint=art.fingerprint, calibration=art.calibration)


def weight_part(art):
    """The artifact without its Double Sparsity stage (None when nothing is left)."""
    from accel.artifact import Artifact

    cfgs = [c for c in art.configs if c.method != "double-sparsity"]
    if not cfgs:
        return None
    tensors = {k: v for k, v in art.tensors.items() if not k.startswith("double-sparsity/")}
    return Artifact(configs=cfgs, tensors=tensors, fingerprint=art.fingerprint)


def _ds_configs(art) -> list:
    return [c for c in (art.configs if art is not None else []) if c.method == "double-sparsity"]


def perplexities(model, tok, art, tokens: dict, settings: MatrixSettings, progress: bool, label: str) -> dict:
    """{corpus: ppl}, DS rows in their scoring mode (eval_artifact)."""
    import accel
    from accel.data import bos_token_id

    from .perplexity import perplexity

    out: dict = {}
    ctx = accel.patched(model, eval_artifact(art)) if art is not None else _nullcontext()
    with ctx:
        for corpus, ids in tokens.items():
            t0 = time.perf_counter()
            r = perplexity(model, ids, seq_len=settings.seq_len, batch_size=settings.batch_size,
                           progress=progress, desc=f"{label} ppl {corpus}", bos_token_id=bos_token_id(tok))
            out[corpus] = r.ppl
            log.info("[%s] ppl %s %.4f (%d tokens, %.0fs)", label, corpus, r.ppl, r.tokens, time.perf_counter() - t0)
    return out


def passkey(model, tok, art, settings: MatrixSettings, progress: bool, label: str) -> dict:
    """Passkey retrieval of a DS row at `passkey_context`; a composed row's weight method stays applied."""
    import accel

    from .ds_retrieval import run_retrieval

    ds = _ds_configs(art)
    t0 = time.perf_counter()
    wp = weight_part(art)
    ctx = accel.patched(model, wp) if wp is not None else _nullcontext()
    with ctx:
        res = run_retrieval(model, tok, art, tasks=("passkey",), contexts=(settings.passkey_context,),
                            n=settings.passkey_n, budget=(ds[0].budget,), base=ds[0], seed=settings.seed,
                            progress=progress, min_context=0)
    acc = res["accuracy"]["passkey"]
    c = str(settings.passkey_context)
    log.info("[%s] passkey at %d: %.2f (without DS %.2f, %.0fs)", label, settings.passkey_context,
             acc["ds"][c], acc["dense"][c], time.perf_counter() - t0)
    return {"context": settings.passkey_context, "n": settings.passkey_n, "ds": acc["ds"][c],
            "without_ds": acc["dense"][c]}


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def run_model(model_name: str, rows, settings: MatrixSettings, cache_dir: Path, progress: bool = True,
              on_row=None, recompute: bool = False, on_accuracy=None) -> list[dict]:
    """Every row on one model: a list of row records (see docs/matrix.md). on_row(record) is
    called as each record is final (after the speed run when there is one); on_accuracy(records)
    after each row's accuracy, with this model's records so far (no bytes nor speed yet). Accuracy results
    cached by an earlier run with the same artifact and settings are reused unless `recompute`."""
    from accel.data import eval_tokens

    from .matrix_speed import measure_speed, model_bf16_bytes, weight_bytes

    t0 = time.perf_counter()
    log.info("[%s] loading (%s)", model_name, settings.dtype)
    model, tok = load_model(model_name, settings.dtype)
    tokens = {c: eval_tokens(tok, c, settings.max_tokens) for c in settings.corpora}
    records, arts = [], {}
    for i, row in enumerate(rows):
        log.info("[%s] row %d/%d: %s (%.0f min so far)", model_name, i + 1, len(rows), row,
                 (time.perf_counter() - t0) / 60)
        art, cached, secs = row_artifact(model, tok, model_name, row, settings, cache_dir, progress)
        arts[row] = art
        acc, acc_cached = cached_accuracy(model, tok, art, row_path(model, tok, model_name, row, settings, cache_dir),
                                          tokens, settings, progress, f"{model_name} {row}", recompute)
        rec = {"model": model_name, "row": row, "methods": [c.method for c in art.configs] if art else [],
               "calibration": calibration_budget(art), "calibration_cached": cached,
               "calibration_seconds": round(secs, 1), "seq_len": settings.seq_len,
               "tokens": settings.max_tokens, "accuracy_cached": acc_cached, **acc}
        records.append(rec)
        if on_accuracy is not None:
            on_accuracy(list(records))
    del model
    smodel, stok = load_model(model_name, "bfloat16")
    total = model_bf16_bytes(smodel)
    wb: dict = {}
    order = {"dense": None, **{r: arts[r] for r in rows if r != "dense"}}
    if settings.speed:
        log.info("[%s] speed: %d rows x contexts %s x threads %s x %d rounds, %d new tokens, bf16", model_name,
                 len(order), list(settings.contexts), list(settings.threads), settings.rounds, settings.new_tokens)
        speed = measure_speed(smodel, stok, order, settings.contexts, settings.threads, settings.rounds,
                              settings.new_tokens, on_patched=lambda r, m: wb.__setitem__(r, weight_bytes(m, total)))
    else:
        import accel

        for r, a in order.items():
            with (accel.patched(smodel, a) if a is not None else _nullcontext()):
                wb[r] = weight_bytes(smodel, total)
    for rec in records:
        rec.update(wb[rec["row"]])
        if settings.speed:
            rec["speed"] = speed[rec["row"]]
    del smodel
    for rec in records:
        if on_row is not None:
            on_row(rec)
    log.info("[%s] done in %.1f min", model_name, (time.perf_counter() - t0) / 60)
    return records


def summary(records: list[dict], settings: MatrixSettings) -> dict:
    """The composition check and the speed target, per model (see docs/matrix.md)."""
    from .matrix_rows import COMPOSED, DS_ROW

    by = {(r["model"], r["row"]): r for r in records}
    models = list(dict.fromkeys(r["model"] for r in records))
    comp, target = [], []
    for m in models:
        dense, ds = by.get((m, "dense")), by.get((m, DS_ROW))
        for row, x in COMPOSED.items():
            rx, rc = by.get((m, x)), by.get((m, row))
            if rc is None:
                continue
            for corpus in settings.corpora:
                if not (dense and ds and rx):
                    comp.append({"model": m, "row": row, "corpus": corpus, "verdict": "N/A",
                                 "why": f"needs rows dense, {DS_ROW} and {x}"})
                    continue
                lhs = rc["ppl"][corpus] / rx["ppl"][corpus]
                rhs = COMPOSITION_SLACK * ds["ppl"][corpus] / dense["ppl"][corpus]
                comp.append({"model": m, "row": row, "corpus": corpus, "ratio": lhs, "bound": rhs,
                             "verdict": "PASS" if lhs <= rhs else "FAIL"})
        rc = by.get((m, "ds+gqsa-w4s50"))
        if rc is not None and "speed" in rc:
            c, t = max(settings.contexts), max(settings.threads)
            sp = rc["speed"][f"{c}/{t}t"]["decode_speedup"]
            at_target = c >= 8192 and t == 2
            target.append({"model": m, "row": "ds+gqsa-w4s50", "context": c, "threads": t, "decode_speedup": sp,
                           "target": SPEED_TARGET,
                           "verdict": ("PASS" if sp >= SPEED_TARGET else "FAIL") if at_target else "N/A",
                           **({} if at_target else {"why": "the target is set at an 8K context, 2 threads"})})
    return {"summary": True, "models": models, "composition": comp, "speed_target": target,
            "settings": dataclasses.asdict(settings)}
