"""Data hooks for accel's offline lm-eval tasks, built in memory from accel's evaluation split
(no files, no network)."""
from __future__ import annotations

import json
import random
import re


def _eval_articles():
    from accel.data import wiki_json_path, wiki_split

    raw = json.loads(wiki_json_path().read_text(encoding="utf-8"))
    return [(t, x, raw[t].get("description") or "") for t, x in wiki_split("evaluation")]


def load_wiki_ppl(**kwargs):
    """Documents of 3 consecutive evaluation-split articles each (~1.5K tokens)."""
    import datasets

    arts = _eval_articles()
    docs = [{"page": "\n\n".join(x for _, x, _ in arts[i:i + 3])} for i in range(0, len(arts), 3)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def load_wiki_mc(**kwargs):
    """4-way multiple choice: which short description fits the article title (seeded)."""
    import datasets

    arts = [(t, d) for t, _, d in _eval_articles() if d]
    descs = sorted({d for _, d in arts})
    rng = random.Random(1234)
    items = []
    for title, desc in rng.sample(arts, min(500, len(arts))):
        choices = rng.sample([s for s in descs if s != desc], 3) + [desc]
        rng.shuffle(choices)
        items.append({"title": title, "choices": choices, "label": choices.index(desc)})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(items)})


def process_results_ppl(doc, results):
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["page"]))
    nbytes = len(doc["page"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, nbytes),
            "bits_per_byte": (loglikelihood, nbytes)}
