"""Synthetic long-context retrieval, generated locally: passkey and key-value ("lines") retrieval.

Each prompt is prefilled once, densely (as the runtime does), without its last token. Then each
method decodes greedily from a copy of that KV cache, starting with the prompt's last token, so
every answer token is produced by a decode step of the method under test:
  dense; "ds" (Double Sparsity at the budget); "sink_recent" (first `sink` + last tokens only).
A prompt counts as solved when the expected string appears in the generated text.

Passkey haystacks: "filler" (one repeated five-sentence paragraph, the usual passkey test) or
"prose" (articles of the wiki evaluation split, drawn at random for each prompt, with the pass-key
sentence inserted at a sentence boundary; natural text gives the label channels a harder
selection than filler whose tokens repeat every 24 tokens).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import random
import re

import torch

from accel.patches import compat

log = logging.getLogger(__name__)

TASKS = ("passkey", "kv")
# Bumped whenever a prompt or the solved test changes: cached results (eval/matrix.py) of an
# older task are measured again. 2: the needle and the question each a paragraph of their own
# (dense Gemma-3 went from 0 to most prose prompts solved, SmolLM2 from 2 of 8 to most).
TASK_VERSION = 2
HAYSTACKS = ("filler", "prose")
_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_WORDS = ("amber", "bold", "cedar", "delta", "ember", "frost", "grove", "harbor", "ivory", "jade", "kite", "lunar",
          "maple", "noble", "onyx", "pearl", "quartz", "raven", "sable", "tundra", "umber", "velvet", "willow",
          "zephyr", "azure", "birch", "coral", "dune", "flint", "garnet")


@dataclasses.dataclass
class Prompt:
    task: str
    context: int
    text: str
    answer: str


# The usual passkey task (Landmark Attention, LongLoRA): an instruction line, the needle "The pass
# key is K. Remember it. K is the pass key.", the question with the answer's prefix. The needle and
# the question stand as paragraphs of their own: run into the prose, the small models read "The
# pass key is" as the start of a definition ("... is a musical instrument") even dense.
_PK_HEAD = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the pass key.\n\n")
_PK_TAIL = "\n\nNow, what is the pass key mentioned above? The pass key is"


def _needle(key: str) -> str:
    return f"\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"


def _bos(tok) -> int:
    """1 when the tokenizer puts a BOS token before a text (accel.data.bos_token_id), else 0."""
    from accel.data import bos_token_id

    return int(bos_token_id(tok) is not None)


def passkey_prompt(tok, context: int, rng: random.Random, haystack: str = "filler") -> Prompt:
    """About `context` tokens (never more) of haystack with a 5-digit pass key at a random depth
    in [10%, 90%]. haystack: "filler" (repeated paragraph) or "prose" (wiki evaluation articles)."""
    if haystack == "prose":
        return prose_passkey_prompt(tok, context, rng)
    if haystack != "filler":
        raise ValueError(f"unknown passkey haystack {haystack!r}; choose from {HAYSTACKS}")
    key = str(rng.randint(10000, 99999))
    needle = _needle(key)
    unit = len(tok(_FILLER, add_special_tokens=False).input_ids)
    # The BOS the tokenizer adds (Gemma's) counts inside `context` too.
    fixed = len(tok(_PK_HEAD + needle + _PK_TAIL, add_special_tokens=False).input_ids) + _bos(tok)
    n = max(1, (context - fixed) // unit)
    depth = rng.randint(max(0, n // 10), max(0, (9 * n) // 10))
    text = _PK_HEAD + _FILLER * depth + needle + _FILLER * (n - depth) + _PK_TAIL
    return Prompt("passkey", context, text, key)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def _prose_sentences(rng: random.Random) -> list[str]:
    """Sentences of wiki evaluation articles in a random article order (a fresh order per call)."""
    from accel.data import texts

    arts = texts("wiki", "evaluation")
    order = list(range(len(arts)))
    rng.shuffle(order)
    for i in order:
        for sent in _SENTENCE_END.split(arts[i].strip()):
            if sent.strip():
                yield sent.strip()


def prose_passkey_prompt(tok, context: int, rng: random.Random) -> Prompt:
    """The passkey task over natural prose: whole sentences of randomly drawn wiki evaluation
    articles, up to `context` tokens with the head, needle and question (and BOS, when the
    tokenizer adds one), the needle between two sentences at a random depth in [10%, 90%] of the
    haystack's tokens. The key is redrawn if the prose happens to contain it."""
    key = str(rng.randint(10000, 99999))
    fixed = len(tok(_PK_HEAD + _needle(key) + _PK_TAIL, add_special_tokens=False).input_ids) + _bos(tok)
    # Each sentence is counted with its leading space, as it appears joined; 1% headroom for the
    # merges at the joins, then whole sentences are dropped from the end until the text fits. A
    # sentence that does not fit is skipped (a shorter one may), up to 64 in a row.
    room = int((context - fixed) * 0.99)
    sents, lens, total, skipped = [], [], 0, 0
    for sent in _prose_sentences(rng):
        n = len(tok(" " + sent, add_special_tokens=False).input_ids)
        if total + n > room:
            skipped += 1
            if skipped > 64 or room - total < 4:
                break
            continue
        sents.append(sent)
        lens.append(n)
        total += n
    hay = " ".join(sents)
    while key in hay:
        key = str(rng.randint(10000, 99999))
    # The boundary nearest a depth drawn uniformly from [10%, 90%] of the haystack's tokens.
    target, acc = rng.uniform(0.1, 0.9) * total, 0
    bounds = []
    for j, n in enumerate(lens):
        acc += n
        bounds.append((abs(acc - target), j + 1))
    cut = min(bounds)[1] if bounds else 0
    cut = min(max(cut, 1), max(1, len(sents) - 1))
    while True:
        text = (_PK_HEAD + " ".join(sents[:cut]) + " " + _needle(key) + " ".join(sents[cut:]) + _PK_TAIL)
        if len(tok(text).input_ids) <= context or len(sents) <= cut + 1:
            break
        sents.pop()
    return Prompt("passkey", context, text, key)


def kv_prompt(tok, context: int, rng: random.Random) -> Prompt:
    """Key-value retrieval: one "box -> 5-digit key" pair per ~256 tokens of filler (so 4 to 16
    pairs for 1K-4K contexts, all alike); the question asks for one box's key. (LongEval's
    "lines" format is beyond SmolLM2-135M even dense; this multi-key form it solves dense.)"""
    n_pairs = max(2, context // 256)
    names = rng.sample(_WORDS, n_pairs)
    vals = [str(rng.randint(10000, 99999)) for _ in names]
    head = "There are important keys hidden inside a lot of irrelevant text. Find them and memorize them.\n"
    pairs = [f"The key of the {n} box is {v}. Remember it. {v} is the key of the {n} box. " for n, v in zip(names, vals)]
    i = rng.randrange(n_pairs)
    tail = f"\nWhat is the key of the {names[i]} box? The key of the {names[i]} box is"
    unit = len(tok(_FILLER, add_special_tokens=False).input_ids)
    fixed = len(tok(head + "".join(pairs) + tail, add_special_tokens=False).input_ids)
    n = max(n_pairs + 1, (context - fixed) // unit)
    # Filler split into n_pairs + 1 gaps of near-equal size.
    gaps = [n // (n_pairs + 1) + (1 if j < n % (n_pairs + 1) else 0) for j in range(n_pairs + 1)]
    text = head + "".join(_FILLER * g + p for g, p in zip(gaps, pairs)) + _FILLER * gaps[-1] + tail
    return Prompt("kv", context, text, vals[i])


def make_prompts(tok, task: str, contexts, n: int, seed: int = 0, haystack: str = "filler") -> list[Prompt]:
    """`n` prompts per context. haystack ("filler" or "prose") applies to the passkey task."""
    if task not in TASKS:
        raise ValueError(f"unknown retrieval task {task!r}; choose from {TASKS}")
    if haystack not in HAYSTACKS:
        raise ValueError(f"unknown passkey haystack {haystack!r}; choose from {HAYSTACKS}")
    if task == "passkey" and haystack == "prose":
        # Its own seed stream: the filler prompts of a seed stay what they were.
        rng = random.Random(f"{task}-prose-{seed}")
        return [prose_passkey_prompt(tok, c, rng) for c in contexts for _ in range(n)]
    rng = random.Random(f"{task}-{seed}")
    gen = passkey_prompt if task == "passkey" else kv_prompt
    return [gen(tok, c, rng) for c in contexts for _ in range(n)]


@torch.inference_mode()
def _decode(model, cache, last_token: torch.Tensor, steps: int) -> list[int]:
    out, x = [], last_token.view(1, 1)
    for _ in range(steps):
        logits = model(input_ids=x, **compat.cache_kwargs(cache), use_cache=True).logits[:, -1]
        nxt = int(logits.argmax(-1))
        out.append(nxt)
        x = torch.tensor([[nxt]], device=last_token.device)
    return out


@torch.inference_mode()
def solve_prompts(model, tok, prompts, methods: dict, tensors: dict, new_tokens: int = 8,
                  progress: bool = True, desc: str = "retrieval") -> dict[str, list[bool]]:
    """Whether each method solves each prompt: {method: [ok per prompt]}. `methods` maps a name to
    a DoubleSparsityConfig (decoded patched with `tensors`, the artifact's prefixed DS tensors) or
    None (dense). Each prompt is prefilled once; every method decodes from a copy of that cache."""
    from tqdm.auto import tqdm

    import accel
    from accel.artifact import Artifact

    device = next(model.parameters()).device
    out = {m: [] for m in methods}
    for p in tqdm(prompts, desc=desc, unit="prompt", disable=not progress):
        ids = tok(p.text, return_tensors="pt").input_ids.to(device)
        # logits_to_keep=1: the prefill's logits are not used; the lm_head over every position of a
        # 4K prompt would cost more than the layers on a 262K-word vocabulary (Gemma-3).
        cache = compat.output_cache(model(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1))
        for m, cfg in methods.items():
            c = copy.deepcopy(cache)
            if cfg is None:
                gen = _decode(model, c, ids[0, -1], new_tokens)
            else:
                with accel.patched(model, Artifact(configs=[cfg], tensors=tensors), check_fingerprint=False):
                    gen = _decode(model, c, ids[0, -1], new_tokens)
            out[m].append(p.answer in tok.decode(gen, skip_special_tokens=True))
    return out


@torch.inference_mode()
def run_retrieval(model, tok, artifact, tasks=TASKS, contexts=(1024, 2048, 4096), n: int = 10,
                  budget=(1 / 16,), base=None, seed: int = 0, new_tokens: int = 8, progress: bool = True,
                  min_context: int = 0, haystack: str = "filler") -> dict:
    """Accuracy per task, method, budget and context: {"accuracy": {task: {method: {ctx: acc}}}, ...}.
    min_context: the runtime's (default 0: every decode step sparse, whatever `base` says).
    haystack: the passkey task's, "filler" or "prose" (wiki evaluation articles)."""
    from accel.configs.double_sparsity import DoubleSparsityConfig

    if haystack not in HAYSTACKS:
        raise ValueError(f"unknown passkey haystack {haystack!r}; choose from {HAYSTACKS}")
    artifact.check_model(model)
    base = dataclasses.replace(base or DoubleSparsityConfig(), min_context=min_context)
    budgets = list(budget) if isinstance(budget, (list, tuple)) else [budget]
    tensors = {f"double-sparsity/{k}": v for k, v in artifact.tensors_for("double-sparsity").items()}
    methods = {"dense": None}
    for b in budgets:
        sfx = "" if len(budgets) == 1 else f"@{b:g}"
        methods["ds" + sfx] = dataclasses.replace(base, budget=b)
        methods["sink_recent" + sfx] = dataclasses.replace(base, budget=b, recent=1 << 30)
    hits = {t: {m: {} for m in methods} for t in tasks}
    prompts = [p for t in tasks for p in make_prompts(tok, t, contexts, n, seed, haystack=haystack)]
    solved = solve_prompts(model, tok, prompts, methods, tensors, new_tokens, progress)
    for i, p in enumerate(prompts):
        for m in methods:
            hits[p.task][m].setdefault(p.context, []).append(solved[m][i])
    acc = {t: {m: {str(c): sum(v) / len(v) for c, v in per.items()} for m, per in hm.items()} for t, hm in hits.items()}
    for t in acc:
        for m in acc[t]:
            allv = [x for v in hits[t][m].values() for x in v]
            acc[t][m]["all"] = sum(allv) / len(allv)
    return {"accuracy": acc, "budgets": budgets, "n_per_context": n, "contexts": list(contexts),
            "haystack": haystack,
            "config": {k: v for k, v in dataclasses.asdict(base).items() if k != "budget"}}


def format_retrieval(res: dict) -> str:
    ctxs = [str(c) for c in res["contexts"]] + ["all"]
    lines = [f"retrieval accuracy, budget {', '.join(f'{b:g}' for b in res['budgets'])}, "
             f"{res['n_per_context']} prompts per context, passkey haystack {res.get('haystack', 'filler')}"]
    for task, per in res["accuracy"].items():
        lines.append(f"{task:<8} {'method':<14}" + "".join(c.rjust(7) for c in ctxs))
        for m, accs in per.items():
            lines.append(f"{'':<8} {m:<14}" + "".join(f"{accs.get(c, float('nan')):7.2f}" for c in ctxs))
    return "\n".join(lines)
