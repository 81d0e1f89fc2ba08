"""Classification data (examples with choices, MeZO-style) and `builtin:chatterbot-topics`: loading,
tokenizing, the choice loss and accuracy, and their use by the trainer, the evaluator and `fedblock eval`."""

import collections
import json
import math

import pytest
import torch
import torch.nn.functional as F

from fedblock.common import data as D
from fedblock.common.blocks import block_params, partition
from fedblock.common.cli import main
from fedblock.common.data import IGNORE_INDEX, DataError, Example, TokenizedExample
from fedblock.common.models import load_model, load_tokenizer, make_tiny_tokenizer
from fedblock.common.training import (
    BlockTrainer,
    Evaluation,
    causal_lm_loss,
    choice_logits,
    evaluate,
    evaluate_loss,
    last_positions,
    task_loss,
)

CHOICES = ("yes", "no", "maybe")


def yes_no(n: int = 12) -> list[Example]:
    """Classification examples of different prompt lengths, answers cycling through CHOICES."""
    return [
        Example((("user", f"Question: is {i} {'even ' * (i % 3)}interesting?\nAnswer:"), ("assistant", CHOICES[i % 3])),
                answer=CHOICES[i % 3], category=f"c{i % 3}", choices=CHOICES)
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def topics():
    pytest.importorskip("chatterbot_corpus", reason="builtin:chatterbot-topics needs the chatterbot-corpus package")
    return D.load_examples("builtin:chatterbot-topics")


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.fixture()
def model(tiny_model):
    m = load_model(tiny_model)
    m.eval()
    return m


# ----------------------------------------------------------------------------------------------------
# The built-in set


def test_builtin_topics(topics):
    categories = collections.Counter(ex.category for ex in topics)
    assert len(categories) >= 5 and "conversations" not in categories
    assert min(categories.values()) >= D.TOPIC_MIN_EXAMPLES
    choices = topics[0].choices
    assert len(choices) == len(categories) and len(set(choices)) == len(choices)
    for ex in topics:
        assert ex.choices == choices and ex.answer in ex.choices and ex.response == ex.answer
        assert ex.prompt_text.startswith("Question: ") and ex.prompt_text.endswith("\nTopic:")
    # one example per distinct question: the corpus' repeats (tech_support's 10 questions x 105) are gone
    questions = [" ".join(ex.prompt_text.split()).casefold() for ex in topics]
    assert len(set(questions)) == len(questions)
    # the answer of a topic is the same word everywhere, and different topics have different words
    words = {ex.category: ex.answer for ex in topics}
    assert len(set(words.values())) == len(words) and sorted(words.values()) == sorted(choices)
    assert D.load_examples("builtin:chatterbot-topics") == topics  # deterministic


def test_builtin_topics_split_and_round_trip(topics, tmp_path):
    parts = D.split_clients(topics, 3, "dirichlet:0.3", seed=0)
    assert sorted(len(p) for p in parts) != [len(topics) // 3] * 3 and sum(map(len, parts)) == len(topics)
    train, held = D.split_holdout(topics, 0.1, seed=1)
    assert len(held) == round(0.1 * len(topics)) and all(ex.choices for ex in train + held)
    assert D.sample(topics, 50, seed=2) == D.sample(topics, 50, seed=2)
    D.write_jsonl(topics, tmp_path / "topics.jsonl")
    assert D.load_examples(tmp_path / "topics.jsonl") == topics


@pytest.mark.slow
def test_verbalizers_are_single_distinct_smollm2_tokens(topics):
    from fedblock.common.models import ModelError, resolve_model

    try:
        smollm = load_tokenizer(resolve_model("smollm2-135m-instruct"))
    except (ModelError, OSError) as e:
        pytest.skip(f"the SmolLM2 tokenizer is not available offline: {e}")
    for word in topics[0].choices:
        assert len(smollm.encode(" " + word, add_special_tokens=False)) == 1, word
    data = D.tokenize(topics, smollm, 256)
    assert len(data) == len(topics)
    first = data[0].choices
    assert len(set(first)) == len(first)
    assert [smollm.decode([t]) for t in first] == [" " + w for w in topics[0].choices]
    # no template, no bos: the plain prompt, nothing appended
    assert smollm.decode(data[0].input_ids) == topics[0].prompt_text
    assert D.encode_prompt(topics[0], smollm) == data[0].input_ids


def test_builtin_topics_with_a_byte_level_tiny_tokenizer(topics, tok, caplog):
    """The tiny tokenizer spells the topic words in several tokens; their first ones still differ."""
    data = D.tokenize(topics, tok, 128)
    assert len(data) == len(topics)
    assert len(set(data[0].choices)) == len(data[0].choices)
    assert "scored by their first" in caplog.text


# ----------------------------------------------------------------------------------------------------
# Records, validation, round trip


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_choice_records_and_round_trip(tmp_path):
    path = write_lines(tmp_path / "cls.jsonl", [
        {"prompt": "Review: great film\nSentiment:", "choices": ["good", "bad"], "answer": "good", "category": "pos"},
        {"messages": [{"role": "system", "content": "Classify."}, {"role": "user", "content": "Review: dull\nSentiment:"},
                      {"role": "assistant", "content": "bad"}], "choices": ["good", "bad"]},
        {"prompt": "2 + 2 =", "choices": ["3", "4"], "answer": 4},
    ])
    examples = D.load_examples(path)
    assert examples[0] == Example((("user", "Review: great film\nSentiment:"), ("assistant", "good")),
                                  answer="good", category="pos", choices=("good", "bad"))
    assert examples[1].answer == "bad" and examples[1].prompt_text == "Classify.\n\nReview: dull\nSentiment:"
    assert examples[2].answer == "4" and examples[2].choices == ("3", "4")
    D.write_jsonl(examples + yes_no(3), tmp_path / "out.jsonl")
    assert D.load_examples(tmp_path / "out.jsonl") == examples + yes_no(3)


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "choices": ["a", "b"], "answer": "c"}, "answer 'c' is not one of the choices ('a', 'b')"),
    ({"prompt": "p", "choices": ["a"], "answer": "a"}, "needs at least 2 distinct choices, got 1"),
    ({"prompt": "p", "choices": ["a", "a"], "answer": "a"}, "choice 'a' is listed twice"),
    ({"prompt": "p", "choices": ["a", " "], "answer": "a"}, "every choice must be a non-empty string"),
    ({"prompt": "p", "choices": "ab", "answer": "a"}, "field 'choices' must be a list of strings"),
    ({"prompt": "p", "choices": ["a", "b"]}, "needs an 'answer' (one of the choices)"),
    ({"instruction": "i", "output": "o", "choices": ["a", "b"]}, "needs a 'prompt' or 'messages'"),
    ({"prompt": "p", "completion": "b", "choices": ["a", "b"], "answer": "a"}, "assistant reply 'b' of an example with choices must be its answer 'a'"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "x"}, {"role": "user", "content": "v"},
                   {"role": "assistant", "content": "a"}], "choices": ["a", "b"]}, "earlier assistant turn"),
])
def test_bad_choice_records(tmp_path, record, message):
    path = write_lines(tmp_path / "bad.jsonl", [{"prompt": "p", "choices": ["a", "b"], "answer": "a"}, record])
    with pytest.raises(DataError) as err:
        D.load_examples(path)
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value)


# ----------------------------------------------------------------------------------------------------
# Tokenizing and batching


def test_tokenize_choices(tok):
    examples = yes_no(6)
    data = D.tokenize(examples, tok, 64)
    firsts = [tok.encode(" " + c, add_special_tokens=False)[0] for c in CHOICES]
    for ex, t in zip(examples, data, strict=True):
        assert t.input_ids == tok.encode(ex.prompt_text, add_special_tokens=False)  # no template, nothing appended
        assert t.labels == [IGNORE_INDEX] * len(t.input_ids)
        assert t.choices == firsts and CHOICES[t.label] == ex.answer
        assert D.encode_prompt(ex, tok) == t.input_ids
    # too long a prompt is dropped, not cut (its end is the cue)
    assert len(D.tokenize(examples, tok, min(len(t.input_ids) for t in data))) < len(examples)


def test_tokenize_choice_errors(tok):
    with pytest.raises(DataError, match="mixes 2 examples with choices .* and 1 without"):
        D.tokenize([*yes_no(2), Example((("user", "q"), ("assistant", "a")))], tok, 64)
    other = Example((("user", "q"), ("assistant", "x")), answer="x", choices=("x", "y"))
    with pytest.raises(DataError, match=r"different numbers of choices \(2, 3\)"):
        D.tokenize([*yes_no(2), other], tok, 64)
    clash = Example((("user", "Sentiment:"), ("assistant", "science")), answer="science", choices=("science", "sports"))
    with pytest.raises(DataError, match=r"choices 'science' and 'sports' both start with the token 'Ġs'"):
        D.tokenize([clash], tok, 64)


def test_collate_choices_and_count_tokens(tok):
    data = D.tokenize(yes_no(4), tok, 64)
    batch = D.collate(data, pad_id=0)
    assert batch["choice_ids"].shape == (4, 3) and batch["choice_label"].tolist() == [0, 1, 2, 0]
    assert batch["choice_ids"].dtype == batch["choice_label"].dtype == torch.long
    assert D.count_tokens(batch) == 4
    assert "choice_ids" not in D.collate([TokenizedExample([1, 2], [-100, 2])], 0)
    with pytest.raises(DataError, match="mixes 1 examples with choices and 1 without"):
        D.collate([data[0], TokenizedExample([1, 2], [-100, 2])], 0)


# ----------------------------------------------------------------------------------------------------
# Loss and accuracy


def right_padded_pair(tok):
    short, long = [t for t in D.tokenize(yes_no(3), tok, 64)][:2]
    assert len(short.input_ids) < len(long.input_ids)
    return [short, long], D.collate([short, long], tok.pad_token_id)


def hand_choice_logits(model, examples) -> torch.Tensor:
    """Each example alone, unpadded, full logits: its choices' logits at its last token."""
    with torch.no_grad():
        return torch.stack([model(input_ids=torch.tensor([ex.input_ids])).logits[0, -1, ex.choices].float()
                            for ex in examples])


def test_last_positions():
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert last_positions(right).tolist() == [1, 3, 0] and last_positions(left).tolist() == [3, 3]
    with pytest.raises(ValueError):
        last_positions(torch.tensor([[0, 0]]))


@pytest.mark.parametrize("separable", [True, False])
def test_task_loss_is_cross_entropy_over_choice_logits_at_the_last_real_token(model, tok, separable):
    examples, batch = right_padded_pair(tok)
    assert batch["attention_mask"].sum(1).tolist() != [batch["input_ids"].shape[1]] * 2  # one row is padded
    model._fedblock_separable_head = separable  # False: the logits_to_keep path
    try:
        expected = hand_choice_logits(model, examples)
        with torch.no_grad():
            got = choice_logits(model, batch)
            loss, n = task_loss(model, batch)
    finally:
        del model._fedblock_separable_head
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    labels = torch.tensor([ex.label for ex in examples])
    hand = -torch.stack([torch.log_softmax(expected[i], 0)[labels[i]] for i in range(2)]).mean()
    assert n == 2 and loss.dtype == torch.float32
    assert float(loss) == pytest.approx(float(hand), rel=1e-5)


def test_ordinary_data_task_loss_is_causal_lm_loss(model, tok):
    examples = [Example((("user", f"What is {i} plus 1?"), ("assistant", f"It is {i + 1}.")), answer=str(i + 1)) for i in range(5)]
    data = D.tokenize(examples, tok, 64)
    batch = D.collate(data, tok.pad_token_id)
    with torch.no_grad():
        a, na = task_loss(model, batch)
        b, nb = causal_lm_loss(model, batch)
    assert torch.equal(a, b) and na == nb == D.count_tokens(batch)
    result = evaluate(model, data, 2, tok.pad_token_id)
    assert result.accuracy is None and (result.loss, result.tokens) == evaluate_loss(model, data, 2, tok.pad_token_id)


def test_evaluate_accuracy(model, tok):
    data = D.tokenize(yes_no(10), tok, 64)
    logits = hand_choice_logits(model, data)
    best = logits.argmax(1)
    rigged = [TokenizedExample(t.input_ids, t.labels, t.choices, int(b)) for t, b in zip(data, best, strict=True)]
    wrong = [TokenizedExample(t.input_ids, t.labels, t.choices, int((b + 1) % 3)) for t, b in zip(data, best, strict=True)]
    right = evaluate(model, rigged, 4, tok.pad_token_id)
    assert isinstance(right, Evaluation) and right.accuracy == 1.0 and right.tokens == 10
    assert evaluate(model, wrong, 3, tok.pad_token_id).accuracy == 0.0
    result = evaluate(model, data, 4, tok.pad_token_id)
    labels = torch.tensor([t.label for t in data])
    assert result.accuracy == pytest.approx(float((best == labels).float().mean()))
    assert result.loss == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)
    assert evaluate_loss(model, data, 4, tok.pad_token_id) == (result.loss, result.tokens)
    with pytest.raises(DataError, match="mixes"):
        evaluate(model, [*data, TokenizedExample([1, 2], [-100, 2])], 4, tok.pad_token_id)
    assert math.isnan(evaluate(model, [], 4, tok.pad_token_id).loss)


def test_block_trainer_steps_on_choice_batches(tiny_model, tok):
    model = load_model(tiny_model)
    blocks = partition(model)
    trainer = BlockTrainer(model, blocks)
    trainer.begin_round([b.name for b in blocks])
    data = D.tokenize(yes_no(8), tok, 64)
    batch = D.collate(data, tok.pad_token_id)
    before = evaluate(model, data, 8, tok.pad_token_id)
    for step in range(5):
        result = trainer.step(batch, lr=1e-2, seed=(0, 0, step))
        assert result.tokens == 8 and math.isfinite(result.loss)
    assert evaluate(model, data, 8, tok.pad_token_id).loss < before.loss


# ----------------------------------------------------------------------------------------------------
# The coordinator's evaluator and `fedblock eval`


def test_evaluator_keeps_the_whole_evaluation(tiny_model, tmp_path):
    from fedblock.server.evaluation import Evaluator

    path = tmp_path / "cls.jsonl"
    D.write_jsonl(yes_no(12), path)
    evaluator = Evaluator(tiny_model, str(path), max_examples=10, batch_size=4, max_seq_len=64)
    assert evaluator.last is None
    model = load_model(tiny_model)
    loss = evaluator({b.name: block_params(model, b) for b in partition(model)})  # the coordinator's call
    assert isinstance(loss, float) and loss == evaluator.last.loss
    assert evaluator.last == evaluate(model, evaluator.data, 4, evaluator.pad_id)
    assert evaluator.last.tokens == 10 and 0 <= evaluator.last.accuracy <= 1


def test_eval_command_prints_choice_accuracy(tiny_model, tmp_path, capsys):
    path = tmp_path / "cls.jsonl"
    D.write_jsonl(yes_no(9), path)
    assert main(["eval", "--model", str(tiny_model), "--data", str(path), "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "cross-entropy over 3 choices" in out and "/9 right" in out
    assert "exact-match" not in out  # no generation for classification data
