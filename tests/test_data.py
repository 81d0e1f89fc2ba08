"""Tests for fedblock.common.data: loading, prompt masking, batching and splitting."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import collections
import importlib.machinery
import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fedblock.common import data as D
from fedblock.common.data import DataError, Example, TokenizedExample

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Renders old assistant replies differently from the last one (like templates that drop old reasoning).
UNSTABLE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' and not loop.last %}[old] {% endif %}{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(chat_template):
    """A small byte-level BPE tokenizer (trained in memory) with ChatML special tokens."""
    words = "the quick brown fox jumps over lazy dog what is who are you hello answer question number".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(8)) + f" {i}." for i in range(300)]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(lines, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def tok():
    return _tokenizer(CHATML)


@pytest.fixture(scope="module")
def plain_tok():
    return _tokenizer(None)


@pytest.fixture(scope="module")
def chatterbot():
    return D.load_examples("builtin:chatterbot")


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def trained_text(tok, t: TokenizedExample) -> str:
    return tok.decode([i for i, label in zip(t.input_ids, t.labels, strict=True) if label != -100])


def trained_segments(tok, t: TokenizedExample) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for i, label in zip(t.input_ids, t.labels, strict=True):
        if label != -100:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r) for r in runs]


# ----------------------------------------------------------------------------------------------------
# Loading


def test_jsonl_forms(tmp_path):
    records = [
        {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}], "answer": "x", "category": "greet"},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "category": "math"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Say bye.", "output": "bye"},
        {"question": "Natalia sold 48 clips, then half as many. How many?",
         "answer": "She sold 48/2 = <<48/2=24>>24 more.\n48+24 = <<48+24=72>>72\n#### 72"},
        {"question": "No final answer here?", "answer": "Just text."},
        {"prompt": "Once upon a time", "completion": " there was a fox."},
        {"prompt": "p", "completion": "c", "answer": 42},
    ]
    lines = [json.dumps(r) for r in records]
    lines.insert(3, "   ")  # blank lines are skipped
    got = D.load_examples(str(write_lines(tmp_path / "d.jsonl", lines)))
    assert got == [
        Example((("system", "Be kind."), ("user", "Hi"), ("assistant", "Hello!")), answer="x", category="greet"),
        Example((("user", "Add the numbers.\n\n2 and 3"), ("assistant", "5")), category="math"),
        Example((("user", "Say hi."), ("assistant", "hi"))),
        Example((("user", "Say bye."), ("assistant", "bye"))),
        Example(
            (("user", records[4]["question"]), ("assistant", records[4]["answer"])),
            answer="72",
        ),
        Example((("user", "No final answer here?"), ("assistant", "Just text."))),
        Example((("user", "Once upon a time"), ("assistant", " there was a fox."))),
        Example((("user", "p"), ("assistant", "c")), answer="42"),
    ]


def test_extract_answer():
    assert D.extract_answer("a\nb\n#### 1,234 \n") == "1,234"
    assert D.extract_answer("#### 3\nthen #### -7") == "-7"
    assert D.extract_answer("no marker") is None
    assert D.extract_answer("####   ") is None


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ('{"instruction": "x", "output": "y"', "bad JSON"),
        ('{"foo": 1, "bar": 2}', "unknown record form (keys: bar, foo)"),
        ('{"instruction": "x", "output": "   "}', "empty response"),
        ('{"question": "x", "answer": ""}', "empty response"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "does not end with an assistant message"),
        ('{"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "yo"}]}', "role 'bot'"),
        ('{"messages": [{"role": "assistant", "content": "alone"}]}', "no prompt"),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "user"}]}', "messages[0]"),
        ('{"prompt": 3, "completion": "c"}', "'prompt' must be a string"),
        ('{"instruction": "x", "output": "y", "category": 5}', "'category' must be a string"),
        ('["a", "b"]', "expected a JSON object"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, bad, fragment):
    good = json.dumps({"prompt": "p", "completion": "c"})
    path = write_lines(tmp_path / "bad.jsonl", [good, "", bad, good])
    with pytest.raises(DataError) as err:
        D.load_examples(str(path))
    msg = str(err.value)
    assert msg.startswith(f"{path}:3: "), msg
    assert fragment in msg
    assert "\n" not in msg


def test_missing_empty_and_unknown_sources(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        D.load_examples(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="no examples"):
        D.load_examples(str(write_lines(tmp_path / "empty.jsonl", ["", "  "])))
    with pytest.raises(DataError, match="builtin:chatterbot, builtin:champ"):
        D.load_examples("builtin:alpaca")


def test_missing_builtin_package(monkeypatch):
    real = D.importlib.util.find_spec
    monkeypatch.setattr(D.importlib.util, "find_spec", lambda name: None if name == "chatterbot_corpus" else real(name))
    with pytest.raises(DataError) as err:
        D.load_examples("builtin:chatterbot")
    assert str(err.value) == "builtin:chatterbot needs the package chatterbot-corpus (pip install chatterbot-corpus)"


def test_write_jsonl_round_trip(tmp_path):
    examples = [
        Example((("system", "sys"), ("user", "q\nwith \"quotes\" and ünïcode ✓"), ("assistant", "a\n\n"),
                 ("user", "again"), ("assistant", "b")), answer="7", category="c1"),
        Example((("user", "   leading spaces"), ("assistant", "reply")), answer=None, category=None),
        Example([["user", "lists are fine"], ["assistant", "ok"]], category="c2"),
    ]
    path = tmp_path / "out.jsonl"
    D.write_jsonl(examples, path)
    assert len(path.read_text(encoding="utf-8").splitlines()) == 3
    assert D.load_examples(str(path)) == examples


def _fake_builtin(monkeypatch, module, folder):
    """Make load_examples find the package `module` in `folder`."""
    spec = importlib.machinery.ModuleSpec(module, None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    real = D.importlib.util.find_spec
    monkeypatch.setattr(D.importlib.util, "find_spec", lambda name: spec if name == module else real(name))


def test_files_with_a_byte_order_mark(tmp_path, monkeypatch):
    """Windows editors and Excel start UTF-8 files with a byte-order mark; every format accepts it."""
    records = [{"prompt": "p", "completion": "ünïcode ✓"}, {"instruction": "i", "output": "o"}]
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    plain = write_lines(tmp_path / "plain.jsonl", lines)
    bom = tmp_path / "bom.jsonl"
    bom.write_text("\n".join(lines) + "\n", encoding="utf-8-sig")
    assert bom.read_bytes().startswith(b"\xef\xbb\xbf")
    assert D.load_examples(str(bom)) == D.load_examples(str(plain))

    champ = tmp_path / "champ"
    (champ / "dataset_files").mkdir(parents=True)
    problem = {"_text": "What is 2 + 2?", "_answer": "4", "category": "Sum", "solution": {"steps": [{"_text": "Add."}]}}
    (champ / "dataset_files" / "v0.json").write_text(json.dumps({"problems": {"P_1": problem}}), encoding="utf-8-sig")
    _fake_builtin(monkeypatch, "champ_dataset", champ)
    assert D.load_examples("builtin:champ") == [
        Example((("user", "What is 2 + 2?"), ("assistant", "Add.\n#### 4")), answer="4", category="Sum")
    ]

    chatterbot = tmp_path / "chatterbot"
    (chatterbot / "data" / "english").mkdir(parents=True)
    (chatterbot / "data" / "english" / "greet.yml").write_text(
        "conversations:\n- - Hello\n  - Hi there\n", encoding="utf-8-sig"
    )
    _fake_builtin(monkeypatch, "chatterbot_corpus", chatterbot)
    assert D.load_examples("builtin:chatterbot") == [Example((("user", "Hello"), ("assistant", "Hi there")), category="greet")]


def test_builtin_chatterbot(chatterbot):
    assert 1926 <= len(chatterbot) <= 2126
    categories = collections.Counter(ex.category for ex in chatterbot)
    assert len(categories) == 21
    assert categories["tech_support"] > 1000 and categories["ai"] > 50
    for ex in chatterbot:
        assert [r for r, _ in ex.messages] == ["user", "assistant"]
        assert ex.messages[0][1].strip() and ex.response.strip()
        assert ex.answer is None
    assert Example((("user", "What is AI?"), ("assistant", chatterbot[0].response)), category="ai") == chatterbot[0]


def test_builtin_champ():
    champ = D.load_examples("builtin:champ")
    assert len(champ) == 270
    assert collections.Counter(ex.category for ex in champ) == {
        "Number-Theory": 80, "Inequality": 50, "Polynomial": 50, "Sequence": 50, "Combinatorics": 40,
    }
    for ex in champ:
        assert ex.answer and ex.answer.strip() == ex.answer
        assert ex.response.endswith(f"\n#### {ex.answer}")
        assert D.extract_answer(ex.response) == ex.answer
        assert [r for r, _ in ex.messages] == ["user", "assistant"]
    first = next(ex for ex in champ if ex.messages[0][1].startswith("Let a string consist of digit 1, 2, 3."))
    assert first.answer == "239"


# ----------------------------------------------------------------------------------------------------
# Tokenizing


@pytest.mark.parametrize("reply", ["the lazy dog jumps!", "ünïcode ✓ fox\n\nsecond line "])
def test_prompt_is_masked(tok, reply):
    ex = Example((("user", "what is the quick fox"), ("assistant", reply)))
    [t] = D.tokenize([ex], tok, 512)
    assert len(t.input_ids) == len(t.labels)
    assert tok.decode(t.input_ids) == tok.apply_chat_template(
        [{"role": "user", "content": "what is the quick fox"}, {"role": "assistant", "content": reply}],
        tokenize=False,
    )
    assert trained_segments(tok, t) == [f"{reply}<|im_end|>"]
    assert "quick" not in trained_text(tok, t)
    # labels equal input ids where trained; the trailing newline after <|im_end|> is not trained
    assert all(label in (-100, i) for i, label in zip(t.input_ids, t.labels, strict=True))
    assert t.labels[-1] == -100 and t.labels[-2] == tok.convert_tokens_to_ids("<|im_end|>")


def test_multi_turn_masking(tok):
    ex = Example((
        ("system", "you are a fox"),
        ("user", "who are you"),
        ("assistant", "a quick brown fox"),
        ("user", "what is the number"),
        ("assistant", "the number is 42"),
    ))
    [t] = D.tokenize([ex], tok, 512)
    assert trained_segments(tok, t) == ["a quick brown fox<|im_end|>", "the number is 42<|im_end|>"]
    text = trained_text(tok, t)
    for masked in ("you are a fox", "who are you", "what is the number", "<|im_start|>", "assistant\n"):
        assert masked not in text


def test_template_not_prefix_stable_trains_last_reply_only():
    tok = _tokenizer(UNSTABLE)
    ex = Example((("user", "q one"), ("assistant", "first reply"), ("user", "q two"), ("assistant", "second reply")))
    [t] = D.tokenize([ex], tok, 512)
    assert "[old] first reply" in tok.decode(t.input_ids)
    assert trained_segments(tok, t) == ["second reply<|im_end|>"]


def test_control_token_text_in_messages_is_plain_text(tok):
    """`<|im_end|>` typed in a message is text, not the end-of-turn token: only the template's own
    control tokens are control tokens, and the trained span ends at the template's end token."""
    user = "say <|im_end|>\n<|im_start|>assistant\nthe fox"
    reply = "the dog <|im_end|> is lazy"
    ex = Example((("user", user), ("assistant", reply)))
    [t] = D.tokenize([ex], tok, 512)
    im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    # The template writes two turns: <|im_start|>...<|im_end|> twice, and nothing else is a control token.
    assert (t.input_ids.count(im_start), t.input_ids.count(im_end)) == (2, 2)
    assert tok.decode(t.input_ids) == tok.apply_chat_template(
        [{"role": "user", "content": user}, {"role": "assistant", "content": reply}], tokenize=False
    )
    assert trained_segments(tok, t) == [f"{reply}<|im_end|>"]
    trained = [i for i, label in zip(t.input_ids, t.labels, strict=True) if label != -100]
    assert trained.count(im_end) == 1 and trained[-1] == im_end and t.labels[-1] == -100
    as_text = tok.encode("<|im_end|>", add_special_tokens=False, split_special_tokens=True)
    assert any(trained[k : k + len(as_text)] == as_text for k in range(len(trained)))
    prompt = D.encode_prompt(ex, tok)
    assert t.input_ids[: len(prompt)] == prompt and t.labels[len(prompt)] != -100


@pytest.mark.parametrize("reply", ["the lazy dog ", " the dog <|im_end|> "])
def test_template_that_rewrites_the_reply_still_masks_after_its_end_token(reply):
    """A template that trims the reply: the reply cannot be found as given, and the trained span still
    ends with the template's own end token, not with the newline after it."""
    tok = _tokenizer(CHATML.replace("{{ message['content'] }}", "{{ message['content'] | trim }}"))
    [t] = D.tokenize([Example((("user", "what is the fox"), ("assistant", reply)))], tok, 512)
    assert trained_segments(tok, t) == [f"{reply.strip()}<|im_end|>"]
    assert t.labels[-1] == -100 and t.labels[-2] == tok.convert_tokens_to_ids("<|im_end|>")


def test_failing_template_is_a_data_error():
    bad = "{% if messages[0]['content'] == 'bad' %}{{ raise_exception('roles must\nalternate') }}{% endif %}"
    tok = _tokenizer(bad + CHATML)
    examples = [Example((("user", text), ("assistant", "b"))) for text in ("good", "bad")]
    with pytest.raises(DataError, match="^example 1: the chat template failed: roles must alternate$"):
        D.tokenize(examples, tok, 64)


def test_no_template_fallback(plain_tok):
    ex = Example((("system", "be short"), ("user", "what is the fox"), ("assistant", "a quick fox")))
    [t] = D.tokenize([ex], plain_tok, 512)
    assert plain_tok.decode(t.input_ids) == (
        "<|endoftext|>be short\n\n### Instruction:\nwhat is the fox\n\n### Response:\na quick fox<|im_end|>"
    )
    assert trained_segments(plain_tok, t) == ["a quick fox<|im_end|>"]
    assert t.labels[-1] == plain_tok.eos_token_id
    prompt = D.encode_prompt(ex, plain_tok)
    assert plain_tok.decode(prompt).endswith("### Response:\n")
    assert t.input_ids[: len(prompt)] == prompt


def test_no_template_fallback_control_token_text_is_plain_text(plain_tok):
    ex = Example((("system", "<|endoftext|> first"), ("user", "what is <|im_end|>"), ("assistant", "a <|im_end|> fox")))
    [t] = D.tokenize([ex], plain_tok, 512)
    assert plain_tok.decode(t.input_ids) == (
        "<|endoftext|><|endoftext|> first\n\n### Instruction:\nwhat is <|im_end|>\n\n### Response:\na <|im_end|> fox<|im_end|>"
    )
    assert t.input_ids.count(plain_tok.bos_token_id) == 1 and t.input_ids.count(plain_tok.eos_token_id) == 1
    assert trained_segments(plain_tok, t) == ["a <|im_end|> fox<|im_end|>"]
    assert t.labels[-1] == plain_tok.eos_token_id
    prompt = D.encode_prompt(ex, plain_tok)
    assert t.input_ids[: len(prompt)] == prompt


def test_encode_prompt_matches_training_prefix(tok):
    ex = Example((("user", "hi"), ("assistant", "hello"), ("user", "who are you"), ("assistant", "a fox")))
    [t] = D.tokenize([ex], tok, 512)
    prompt = D.encode_prompt(ex, tok)
    assert tok.decode(prompt).endswith("who are you<|im_end|>\n<|im_start|>assistant\n")
    assert t.input_ids[: len(prompt)] == prompt
    assert t.labels[len(prompt)] != -100


def test_truncation_keeps_beginning_and_drops_untrainable(tok):
    long_reply = " ".join(["the quick brown fox"] * 30)
    ex = Example((("user", "hello"), ("assistant", long_reply)))
    [full] = D.tokenize([ex], tok, 10_000)
    [cut] = D.tokenize([ex], tok, 40)
    assert len(full.input_ids) > 40
    assert cut.input_ids == full.input_ids[:40] and cut.labels == full.labels[:40]
    long_prompt = Example((("user", " ".join(["what is the number"] * 40)), ("assistant", "fox")))
    got = D.tokenize([long_prompt, ex], tok, 40)
    assert len(got) == 1 and got[0].input_ids == cut.input_ids
    assert all(any(label != -100 for label in t.labels[1:]) for t in D.tokenize([ex] * 3, tok, 12))
    with pytest.raises(DataError):
        D.tokenize([ex], tok, 1)


def test_tokenize_whole_chatterbot(tok, chatterbot):
    out = D.tokenize(chatterbot, tok, 256)
    assert len(out) == len(chatterbot)
    whole = [t for t in out if len(t.input_ids) < 256]
    assert len(whole) > 1900
    for t in whole:
        assert t.labels[-1] == -100  # the newline after <|im_end|>
        assert t.labels[-2] == tok.eos_token_id
        assert t.labels[0] == -100


# ----------------------------------------------------------------------------------------------------
# Batching


def _tokenized(n):
    return [TokenizedExample([i, 1000 + i, 2000 + i][: 1 + i % 3], [-100, 1000 + i, 2000 + i][: 1 + i % 3]) for i in range(n)]


def test_collate_pads_right():
    batch = D.collate([TokenizedExample([5, 6, 7], [-100, 6, 7]), TokenizedExample([8], [-100])], pad_id=0)
    assert all(v.dtype == torch.long for v in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    with pytest.raises(DataError):
        D.collate([], 0)


def test_count_tokens():
    labels = torch.tensor([[7, -100, 3, 4], [-100, 5, -100, -100]])
    assert D.count_tokens({"labels": labels}) == 3  # position 0 never counts
    assert D.count_tokens(D.collate([TokenizedExample([1, 2, 3], [-100, 2, 3])] * 4, 0)) == 8


def test_batch_stream_rounds_are_deterministic_and_full():
    data = _tokenized(5)
    a, b = D.BatchStream(data, 3, seed=7, pad_id=0), D.BatchStream(data, 3, seed=7, pad_id=0)
    other = D.BatchStream(data, 3, seed=8, pad_id=0)

    def firsts(stream, r, n):
        return [batch["input_ids"][:, 0].tolist() for _, batch in zip(range(n), stream.round(r), strict=False)]

    # 10 batches of 3 = 6 passes over 5 examples, crossing pass boundaries mid-batch: every example
    # shows up equally often and every batch is full.
    seen = collections.Counter(i for batch in firsts(a, 1, 10) for i in batch)
    assert seen == {i: 6 for i in range(5)}
    # A round's batches depend only on (seed, round): not on what was drawn before.
    list(firsts(b, 5, 7))
    assert firsts(a, 2, 4) == firsts(b, 2, 4)
    assert firsts(a, 2, 4) != firsts(a, 3, 4)
    assert firsts(a, 2, 4) != firsts(other, 2, 4)
    big = D.BatchStream(data, 12, seed=0, pad_id=0)  # larger than the data: still full batches
    assert next(big.round(1))["input_ids"].shape[0] == 12


def test_batch_stream_rejects_bad_arguments():
    with pytest.raises(DataError):
        D.BatchStream([], 2, 0, 0)
    with pytest.raises(DataError):
        D.BatchStream(_tokenized(3), 0, 0, 0)


# ----------------------------------------------------------------------------------------------------
# Splitting


def _examples(n, categories=None, length=None):
    return [
        Example(
            (("user", f"q{i}"), ("assistant", "x" * (length(i) if length else 1 + i % 5) + f" {i}")),
            category=categories[i % len(categories)] if categories else None,
        )
        for i in range(n)
    ]


def test_split_holdout():
    examples = _examples(100)
    train, held = D.split_holdout(examples, 0.1, seed=3)
    assert len(held) == 10 and len(train) == 90
    assert collections.Counter(train + held) == collections.Counter(examples)
    assert (train, held) == D.split_holdout(examples, 0.1, seed=3)
    assert held != D.split_holdout(examples, 0.1, seed=4)[1]
    assert [len(p) for p in D.split_holdout(_examples(3), 0.1, 0)] == [2, 1]  # at least one held out
    assert [len(p) for p in D.split_holdout(_examples(2), 0.9, 0)] == [1, 1]  # never all
    assert [len(p) for p in D.split_holdout(examples, 0.0, 0)] == [100, 0]
    assert [len(p) for p in D.split_holdout(_examples(1), 0.5, 0)] == [1, 0]
    with pytest.raises(DataError):
        D.split_holdout(examples, 1.0, 0)


def test_split_clients_iid():
    examples = _examples(103, categories=["a", "b"])
    parts = D.split_clients(examples, 4, "iid", seed=1)
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]
    assert collections.Counter(ex for p in parts for ex in p) == collections.Counter(examples)
    assert parts == D.split_clients(examples, 4, "iid", seed=1)
    assert parts != D.split_clients(examples, 4, "iid", seed=2)


def _skew(parts, key):
    """Mean total-variation distance between each client's distribution of `key` and the overall one."""
    overall = collections.Counter(key(ex) for p in parts for ex in p)
    total = sum(overall.values())
    tvs = []
    for p in parts:
        mine = collections.Counter(key(ex) for ex in p)
        tvs.append(0.5 * sum(abs(mine[k] / len(p) - overall[k] / total) for k in overall))
    return sum(tvs) / len(tvs)


def test_split_clients_dirichlet_skew():
    examples = _examples(400, categories=["a", "b", "c", "d", "e"])
    skews = {}
    for alpha in ("0.05", "100"):
        values = []
        for seed in range(3):
            parts = D.split_clients(examples, 5, f"dirichlet:{alpha}", seed=seed)
            assert all(parts)
            assert collections.Counter(ex for p in parts for ex in p) == collections.Counter(examples)
            assert parts == D.split_clients(examples, 5, f"dirichlet:{alpha}", seed=seed)
            values.append(_skew(parts, lambda ex: ex.category))
        skews[alpha] = sum(values) / len(values)
    assert skews["0.05"] > 0.5
    assert skews["100"] < 0.1


def test_split_clients_dirichlet_every_client_non_empty():
    examples = _examples(12, categories=["only"])
    for seed in range(10):
        parts = D.split_clients(examples, 10, "dirichlet:0.01", seed=seed)
        assert all(parts) and sum(map(len, parts)) == 12
        assert collections.Counter(ex for p in parts for ex in p) == collections.Counter(examples)


def test_split_clients_dirichlet_uncategorized_uses_length_deciles():
    examples = _examples(500, length=lambda i: 1 + (i * 37) % 500)
    decile = {ex: rank * 10 // 500 for rank, ex in enumerate(sorted(examples, key=lambda e: len(e.response)))}
    small = D.split_clients(examples, 5, "dirichlet:0.05", seed=0)
    iid = D.split_clients(examples, 5, "iid", seed=0)
    assert _skew(small, decile.get) > 0.4
    assert _skew(iid, decile.get) < 0.15


@pytest.mark.parametrize("mode", ["dirichlet", "dirichlet:", "dirichlet:0", "dirichlet:-1", "dirichlet:abc",
                                  "dirichlet:nan", "dirichlet:inf", "IID", "noniid"])
def test_split_clients_bad_mode(mode):
    with pytest.raises(DataError) as err:
        D.split_clients(_examples(10), 2, mode, 0)
    assert "'iid' or 'dirichlet:ALPHA'" in str(err.value)


def test_split_clients_too_few_examples():
    with pytest.raises(DataError, match="each needs at least one"):
        D.split_clients(_examples(3), 4, "iid", 0)
