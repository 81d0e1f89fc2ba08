"""Training data: loading, tokenizing with prompt masking, batching and splitting across workers.

Every data set becomes a list of `Example`s (a chat: (role, content) pairs ending with an assistant
reply). `tokenize` turns them into token ids with labels that train only what the assistant says
(classification examples, those with `choices`, into the prompt's ids, one answer token per choice
and the index of the right one, which `training.task_loss` scores MeZO-style),
`BatchStream` serves deterministic batches from them (round by round), and `split_holdout` / `split_clients` cut a data
set into an evaluation part and per-worker parts (IID or Dirichlet label skew).

Sources accepted by `load_examples`:

* a JSONL file, one record per line, its form detected per record:
  chat `{"messages": [{"role", "content"}, ...]}`, Alpaca `{"instruction", "input", "output"}`,
  GSM8K `{"question", "answer"}` (the final answer after `####` becomes `Example.answer`) and
  `{"prompt", "completion"}`; any form may carry a `"category"`, and non-GSM8K forms an `"answer"`.
  Classification: `{"prompt", "choices", "answer"}` or `{"messages", "choices"[, "answer"]}`: the
  candidate answers (at least two distinct strings) and the right one, which must be among them.
* `builtin:chatterbot`: the English part of the `chatterbot-corpus` package (2,025 usable Q/A pairs in
  21 topics; the topic is the category). Each corpus entry is a list of statements; we use its first two
  as one user question and one assistant reply. The longer lists are mostly alternative replies to the
  same question (computers.yml, emotion.yml), not dialogues, so reading them as alternating turns would
  give the assistant's words to the user.
* `builtin:chatterbot-topics`: topic classification of the chatterbot questions (623 questions,
  9 topics), see `_load_chatterbot_topics`: prompt `Question: {question}\nTopic:`, choices the topic
  words (" trivia", " coding", " AI", ...; each one token for SmolLM2).
* `builtin:champ`: the 270 CHAMP competition math problems (`champ-dataset`); the reply is the
  step-by-step solution followed by `#### ANSWER` (the GSM8K convention, see `extract_answer`).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # label value that the loss skips (torch cross_entropy's default ignore_index)
ANSWER_MARKER = "####"
BUILTINS = {
    "builtin:chatterbot": ("chatterbot_corpus", "chatterbot-corpus"),
    "builtin:champ": ("champ_dataset", "champ-dataset"),
    "builtin:chatterbot-topics": ("chatterbot_corpus", "chatterbot-corpus"),
}


class DataError(ValueError):
    """Bad training data or data settings; the message is one line that names the file/line and the fault."""


@dataclass(frozen=True)
class Example:
    """One training conversation.

    `messages` are (role, content) pairs, roles from `ROLES`, with at least one system or user turn
    and a non-empty assistant reply last. `answer` is the final answer used for exact-match scoring,
    `category` the label that the Dirichlet split skews on. Lists are accepted and stored as tuples.

    A classification example has `choices`, the candidate answers (at least two, distinct, non-empty),
    and its `answer` is one of them. Its prompt is the text of the messages before the last (system or
    user ones, joined by a blank line, used as they are: no chat template) and the last message is the
    answer itself.
    """

    messages: tuple[tuple[str, str], ...]
    answer: str | None = None
    category: str | None = None
    choices: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        messages = tuple(tuple(m) for m in self.messages)
        object.__setattr__(self, "messages", messages)
        if not messages:
            raise DataError("no messages")
        for i, m in enumerate(messages):
            if len(m) != 2 or not isinstance(m[0], str) or not isinstance(m[1], str):
                raise DataError(f"message {i} is not a (role, content) pair of strings")
            if m[0] not in ROLES:
                raise DataError(f"message {i} has role {m[0]!r}; expected one of {', '.join(ROLES)}")
        if messages[-1][0] != "assistant":
            raise DataError("the last message must be an assistant reply")
        if not messages[-1][1].strip():
            raise DataError("empty response (the last assistant message has no text)")
        if all(role == "assistant" for role, _ in messages):
            raise DataError("no prompt: expected a user or system message before the assistant reply")
        if self.answer is not None and not isinstance(self.answer, str):
            raise DataError("answer must be a string")
        if self.category is not None and not isinstance(self.category, str):
            raise DataError("category must be a string")
        if self.choices is not None:
            self._check_choices()

    def _check_choices(self) -> None:
        if isinstance(self.choices, str) or not isinstance(self.choices, Sequence):
            raise DataError("choices must be a list of strings")
        choices = tuple(self.choices)
        object.__setattr__(self, "choices", choices)
        if not all(isinstance(c, str) and c.strip() for c in choices):
            raise DataError("every choice must be a non-empty string")
        twice = [c for i, c in enumerate(choices) if c in choices[:i]]
        if twice:
            raise DataError(f"choice {twice[0]!r} is listed twice")
        if len(choices) < 2:
            raise DataError(f"a classification example needs at least 2 distinct choices, got {len(choices)}")
        if self.answer is None:
            raise DataError("an example with choices needs an answer (one of the choices)")
        if self.answer not in choices:
            raise DataError(f"answer {self.answer!r} is not one of the choices ({', '.join(map(repr, choices))})")
        if self.response != self.answer:
            raise DataError(f"the assistant reply {self.response!r} of an example with choices must be its answer {self.answer!r}")
        if any(role == "assistant" for role, _ in self.messages[:-1]):
            raise DataError("an example with choices is one prompt (system/user messages) and the answer; it has an earlier assistant turn")

    @property
    def response(self) -> str:
        """The final assistant reply."""
        return self.messages[-1][1]

    @property
    def prompt_text(self) -> str:
        """The texts of the messages before the reply, joined by a blank line (a classification prompt)."""
        return "\n\n".join(content for _, content in self.messages[:-1])


def extract_answer(text: str) -> str | None:
    """The final answer in GSM8K style: what follows the last `####` on its line, stripped; None if absent."""
    pos = text.rfind(ANSWER_MARKER)
    if pos < 0:
        return None
    answer = text[pos + len(ANSWER_MARKER) :].split("\n", 1)[0].strip()
    return answer or None


# ----------------------------------------------------------------------------------------------------
# Loading


def load_examples(source: str | Path) -> list[Example]:
    """Load a data set: a JSONL file path or a built-in name (`builtin:chatterbot`, `builtin:champ`,
    `builtin:chatterbot-topics`).

    Files are read as UTF-8, with or without a byte-order mark.
    Raises DataError for a missing file, a bad record (message "FILE:LINE: what is wrong"), an empty
    result, an unknown built-in name or a built-in whose package is not installed.
    """
    source = str(source)
    if source.startswith("builtin:"):
        if source not in BUILTINS:
            raise DataError(f"unknown data set {source!r}; built-in sets are {', '.join(BUILTINS)}")
        module, package = BUILTINS[source]
        spec = importlib.util.find_spec(module)  # finds the folder without importing the package
        if spec is None or not spec.submodule_search_locations:
            raise DataError(f"{source} needs the package {package} (pip install {package})")
        folder = Path(list(spec.submodule_search_locations)[0])
        loader = {"builtin:chatterbot": _load_chatterbot, "builtin:champ": _load_champ,
                  "builtin:chatterbot-topics": _load_chatterbot_topics}[source]
        examples = loader(folder)
    else:
        examples = _load_jsonl(Path(source))
    if not examples:
        raise DataError(f"{source}: no examples")
    return examples


def _load_jsonl(path: Path) -> list[Example]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    examples = []
    try:
        # utf-8-sig: files saved by Windows editors and Excel start with a byte-order mark, which json refuses.
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: bad JSON: {e}") from None
                try:
                    examples.append(_parse_record(record))
                except DataError as e:
                    raise DataError(f"{path}:{lineno}: {e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    return examples


def _parse_record(record: object) -> Example:
    """One JSONL record in any accepted form -> Example (DataError without location on a bad record)."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    if record.get("choices") is not None:
        return _parse_choice_record(record)
    answer = None
    gsm8k = False
    if "messages" in record:
        pairs = _parse_messages(record["messages"])
    elif "instruction" in record and "output" in record:
        instruction, output = _strings(record, "instruction", "output")
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise DataError("field 'input' must be a string")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        pairs = [("user", prompt), ("assistant", output)]
    elif "question" in record and "answer" in record:
        question, solution = _strings(record, "question", "answer")
        pairs = [("user", question), ("assistant", solution)]
        answer = extract_answer(solution)
        gsm8k = True
    elif "prompt" in record and "completion" in record:
        prompt, completion = _strings(record, "prompt", "completion")
        pairs = [("user", prompt), ("assistant", completion)]
    else:
        raise DataError(
            f"unknown record form (keys: {', '.join(sorted(record)) or 'none'}); expected chat {{messages}}, "
            "Alpaca {instruction, input, output}, GSM8K {question, answer} or {prompt, completion}"
        )
    if not gsm8k:
        answer = _record_answer(record)
    return Example(tuple(pairs), answer=answer, category=_record_category(record))


def _parse_choice_record(record: dict) -> Example:
    """A classification record: {"prompt", "choices", "answer"} or {"messages", "choices"[, "answer"]}
    (the answer defaults to the last message)."""
    choices = record["choices"]
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise DataError("field 'choices' must be a list of strings")
    answer = _record_answer(record)
    if "messages" in record:
        pairs = _parse_messages(record["messages"])
        if answer is None:
            answer = pairs[-1][1]
    elif "prompt" in record:
        (prompt,) = _strings(record, "prompt")
        if answer is None:
            raise DataError("a record with 'choices' needs an 'answer' (one of the choices)")
        reply = record.get("completion", answer)
        if not isinstance(reply, str):
            raise DataError("field 'completion' must be a string")
        pairs = [("user", prompt), ("assistant", reply)]
    else:
        raise DataError(
            f"a record with 'choices' needs a 'prompt' or 'messages' (keys: {', '.join(sorted(record))})"
        )
    return Example(tuple(pairs), answer=answer, category=_record_category(record), choices=tuple(choices))


def _parse_messages(messages: object) -> list[tuple[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list")
    pairs = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"messages[{i}] must be an object with string 'role' and 'content'")
        pairs.append((m["role"], m["content"]))
    if pairs[-1][0] != "assistant":
        raise DataError("chat does not end with an assistant message")
    return pairs


def _record_answer(record: dict) -> str | None:
    answer = record.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if answer is not None and not isinstance(answer, str):
        raise DataError("field 'answer' must be a string or a number")
    return answer


def _record_category(record: dict) -> str | None:
    category = record.get("category")
    if category is not None and not isinstance(category, str):
        raise DataError("field 'category' must be a string")
    return category


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _strings(record: dict, *keys: str) -> list[str]:
    values = [record[k] for k in keys]
    for k, v in zip(keys, values, strict=True):
        if not isinstance(v, str):
            raise DataError(f"field {k!r} must be a string")
    return values


def _load_chatterbot(folder: Path) -> list[Example]:
    return [
        Example((("user", question), ("assistant", reply)), category=topic)
        for topic, question, reply in _chatterbot_pairs(folder, "builtin:chatterbot")
    ]


def _chatterbot_pairs(folder: Path, source: str) -> Iterator[tuple[str, str, str]]:
    """(topic, question, reply) of every usable corpus entry, stripped; files in name order, the
    topic being the file's stem."""
    files = sorted((folder / "data" / "english").glob("*.yml"))
    if not files:
        raise DataError(f"{source}: no topic files under {folder / 'data' / 'english'}")
    for file in files:
        try:
            doc = yaml.safe_load(file.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise DataError(f"{file}: cannot read ({_one_line(e)})") from None
        conversations = doc.get("conversations") if isinstance(doc, dict) else None
        for conv in conversations or []:
            # Malformed entries exist (trivia.yml holds one plain string); skip them.
            if not isinstance(conv, list) or len(conv) < 2:
                continue
            question, reply = conv[0], conv[1]
            if not isinstance(question, str) or not isinstance(reply, str) or not question.strip() or not reply.strip():
                continue
            yield file.stem, question.strip(), reply.strip()


TOPIC_PROMPT = "Question: {question}\nTopic:"
TOPIC_MIN_EXAMPLES = 20  # topics with fewer distinct questions are left out
TOPIC_EXCLUDED = frozenset({"conversations"})  # the corpus' catch-all of small talk, not a topic
# The answer word of a topic where its file stem is not a good one (the others answer with the stem).
# SmolLM2 spells " ai" with a rare token and " AI" with a common one; " sports" would start with the
# letter of " science", and byte-level tokenizers with few merges (the tiny test models') would then
# score both by the token " s". Every kept verbalizer is one SmolLM2 token after a space, and they all
# start with different letters.
TOPIC_VERBALIZERS = {"ai": "AI", "sports": "athletics"}


def _load_chatterbot_topics(folder: Path) -> list[Example]:
    """builtin:chatterbot-topics: which topic file does a chatterbot question come from?

    Each distinct question (compared with whitespace collapsed and case folded; the first spelling is
    kept) is one example: prompt `Question: {question}\\nTopic:`, answer the topic's verbalizer, the
    choices every kept topic's verbalizer (the sorted topics' order), category the topic. Duplicates go
    because the corpus repeats questions with alternative replies (tech_support.yml holds 10 questions
    105 times each), which would weight a few questions heavily and leak them into any held-out split;
    a question listed under two topics is ambiguous and dropped (3, all also in conversations.yml).
    Topics with fewer than TOPIC_MIN_EXAMPLES questions left, and TOPIC_EXCLUDED, are left out. With
    chatterbot-corpus 1.3.3: 623 questions, trivia 260, coding 96, psychology 62, ai 60, emotion 48,
    literature 29, movies 23, science 23, sports 22 (majority-class accuracy 0.42); the choices are
    AI, coding, emotion, literature, movies, psychology, science, athletics (sports) and trivia.
    """
    topics: dict[str, set[str]] = {}
    spelling: dict[str, str] = {}
    for topic, question, _ in _chatterbot_pairs(folder, "builtin:chatterbot-topics"):
        key = " ".join(question.split()).casefold()
        topics.setdefault(key, set()).add(topic)
        spelling.setdefault(key, question)
    unique = {key: next(iter(t)) for key, t in topics.items() if len(t) == 1}
    sizes: dict[str, int] = {}
    for topic in unique.values():
        sizes[topic] = sizes.get(topic, 0) + 1
    kept = sorted(t for t, n in sizes.items() if n >= TOPIC_MIN_EXAMPLES and t not in TOPIC_EXCLUDED)
    if len(kept) < 2:
        raise DataError(f"builtin:chatterbot-topics: fewer than 2 topics with {TOPIC_MIN_EXAMPLES} questions or more")
    words = {t: TOPIC_VERBALIZERS.get(t, t) for t in kept}
    choices = tuple(words[t] for t in kept)
    return [
        Example(
            (("user", TOPIC_PROMPT.format(question=spelling[key])), ("assistant", words[topic])),
            answer=words[topic],
            category=topic,
            choices=choices,
        )
        for key, topic in unique.items()
        if topic in words
    ]


def _load_champ(folder: Path) -> list[Example]:
    file = folder / "dataset_files" / "v0.json"
    try:
        with open(file, encoding="utf-8-sig") as f:
            problems = json.load(f)["problems"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{file}: cannot read the CHAMP problems ({_one_line(e)})") from None
    if isinstance(problems, dict):  # v0.json keys them by identifier, in file order
        problems = list(problems.values())
    examples = []
    for problem in problems:
        try:
            steps = [step["_text"].strip() for step in problem["solution"]["steps"]]
            answer = problem["_answer"].strip()
            reply = "\n".join([*steps, f"{ANSWER_MARKER} {answer}"])
            messages = (("user", problem["_text"].strip()), ("assistant", reply))
            examples.append(Example(messages, answer=answer, category=problem["category"]))
        except (KeyError, TypeError, AttributeError, DataError):
            continue
    return examples


def write_jsonl(examples: Sequence[Example], path: str | Path) -> None:
    """Write examples in chat form; `load_examples(path)` gives them back equal."""
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            record: dict = {"messages": [{"role": r, "content": c} for r, c in ex.messages]}
            if ex.answer is not None:
                record["answer"] = ex.answer
            if ex.category is not None:
                record["category"] = ex.category
            if ex.choices is not None:
                record["choices"] = list(ex.choices)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------------
# Tokenizing


@dataclass
class TokenizedExample:
    """Token ids and labels of equal length; labels are IGNORE_INDEX wherever the assistant did not speak.

    A classification example (from an Example with choices) holds the prompt's ids only, labels all
    IGNORE_INDEX (the causal-LM loss has nothing to train on it), `choices` the answer token of each
    choice and `label` the index of the right one: its score is the logits of those tokens at the
    prompt's last token.
    """

    input_ids: list[int]
    labels: list[int]
    choices: list[int] | None = None
    label: int | None = None


def tokenize(examples: Sequence[Example], tokenizer, max_seq_len: int) -> list[TokenizedExample]:
    """Tokenize examples so that only the assistant's replies are trained.

    With a chat template every assistant turn is trained, together with the end-of-turn token that
    closes it; the template's scaffolding (role headers, the newline after the end token), system and
    user turns are masked. The turns come from rendering prefixes of the conversation (messages[:i]
    with the generation prompt against messages[:i+1]); a turn is trained from its start through the
    first control token that the template writes after the reply (through its last control token when
    the template rewrote the reply, the whole turn when it writes none). When the template does not
    render prefixes as prefixes of the whole chat, only the last reply is trained. Without a chat
    template the text is `[bos]{system}\\n\\n### Instruction:\\n{user}\\n\\n### Response:\\n{reply}{eos}`
    (the Alpaca layout; repeated per turn) and the replies plus eos are trained.

    Message text is always plain text: a special token's text inside a message (say `<|im_end|>` typed
    by a user) is encoded as ordinary characters, never as the control token, the way
    `apply_chat_template(..., sanitize_control_tokens=True)` encodes it; only the template's (or the
    Alpaca layout's) own control tokens are control tokens.

    Sequences are cut to `max_seq_len` tokens (the beginning is kept); an example left with no
    trained token that the shifted causal-LM loss can use is dropped.

    Examples with choices are tokenized by `_tokenize_choices` instead (all examples must be of one
    kind, and have one number of choices).
    """
    if max_seq_len < 2:
        raise DataError(f"max_seq_len must be at least 2, got {max_seq_len}")
    with_choices = sum(ex.choices is not None for ex in examples)
    if with_choices:
        if with_choices < len(examples):
            raise DataError(
                f"the data mixes {with_choices} examples with choices (classification) and "
                f"{len(examples) - with_choices} without; a data set must be one kind or the other"
            )
        return _tokenize_choices(examples, tokenizer, max_seq_len)
    control = _control_tokens(tokenizer)
    rendered = [_render(ex, tokenizer, k, control) for k, ex in enumerate(examples)]
    out = []
    for r, ids, offsets in zip(rendered, *_encode(rendered, tokenizer), strict=True):
        # A token is trained if its characters touch a trained span (an empty offset counts as one char).
        labels = [t if _overlaps(a, max(b, a + 1), r.spans) else IGNORE_INDEX for t, (a, b) in zip(ids, offsets, strict=True)]
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        if any(label != IGNORE_INDEX for label in labels[1:]):
            out.append(TokenizedExample(ids, labels))
    if len(out) < len(examples):
        dropped = len(examples) - len(out)
        log.info("tokenize: dropped %d of %d examples (no trained token within %d tokens)", dropped, len(examples), max_seq_len)
    return out


def _tokenize_choices(examples: Sequence[Example], tokenizer, max_seq_len: int) -> list[TokenizedExample]:
    """Classification examples, MeZO-style: the input is the prompt as plain text (no chat template;
    [bos] first where the tokenizer starts texts with it), nothing appended; each choice is scored by
    one token, the first of `" " + choice` as it would follow the prompt (no space added when the
    choice starts with whitespace or the prompt ends with it). A choice of several tokens is scored by
    its first (with a warning); choices whose first tokens coincide are a DataError. An example whose
    prompt is longer than `max_seq_len` is dropped (cutting it would cut the cue at its end)."""
    counts = sorted({len(ex.choices) for ex in examples})
    if len(counts) > 1:
        raise DataError(f"examples have different numbers of choices ({', '.join(map(str, counts))}); a data set needs one")
    fast = getattr(tokenizer, "is_fast", False)
    tokens: dict[str, list[int]] = {}
    several: set[str] = set()
    out = []
    for k, ex in enumerate(examples):
        ids = _encode_choice_prompt(ex, tokenizer, k)
        first = []
        for choice in ex.choices:
            text = choice if choice[:1].isspace() or ex.prompt_text[-1:].isspace() else " " + choice
            if text not in tokens:
                tokens[text] = _encode_piece(tokenizer, text, True, False, fast)[0]
            if not tokens[text]:
                raise DataError(f"example {k}: choice {choice!r} encodes to no token")
            if len(tokens[text]) > 1:
                several.add(text)
            first.append(tokens[text][0])
        if len(set(first)) < len(first):
            a, b = next((a, b) for i, a in enumerate(ex.choices) for j, b in enumerate(ex.choices) if i < j and first[i] == first[j])
            token = tokenizer.convert_ids_to_tokens(first[ex.choices.index(a)])
            raise DataError(
                f"example {k}: choices {a!r} and {b!r} both start with the token {token!r}; an answer is scored "
                "by its first token, so the choices' first tokens must differ (pick other words)"
            )
        if len(ids) <= max_seq_len:
            out.append(TokenizedExample(ids, [IGNORE_INDEX] * len(ids), first, ex.choices.index(ex.answer)))
    if several:
        log.warning("tokenize: %d choices are several tokens and are scored by their first: %s",
                    len(several), ", ".join(map(repr, sorted(several))))
    if len(out) < len(examples):
        log.info("tokenize: dropped %d of %d examples (prompt longer than %d tokens)", len(examples) - len(out), len(examples), max_seq_len)
    return out


def _encode_choice_prompt(example: Example, tokenizer, index: int = 0) -> list[int]:
    """The prompt of a classification example: plain text (control-token text in it stays text)."""
    prefix = []
    if tokenizer.bos_token_id is not None and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]:
        prefix = [tokenizer.bos_token_id]  # Llama and Mistral start texts with bos; GPT-2, Qwen and SmolLM2 do not
    ids = prefix + _encode_piece(tokenizer, example.prompt_text, True, True, getattr(tokenizer, "is_fast", False))[0]
    if not ids:
        raise DataError(f"example {index}: empty prompt")
    return ids


def encode_prompt(example: Example, tokenizer) -> list[int]:
    """Token ids of everything before the final assistant reply, as `tokenize` renders it: the input
    from which a model generates its answer (for accuracy evaluation)."""
    if example.choices is not None:
        return _encode_choice_prompt(example, tokenizer)
    r = _render(example, tokenizer, 0, _control_tokens(tokenizer))
    cut = r.spans[-1][0]
    ids, _ = _encode([_Rendered(r.text[:cut], [], [(a, b) for a, b in r.plain if b <= cut])], tokenizer)
    return ids[0]


@dataclass(frozen=True)
class _Rendered:
    """An example as one text: the character spans (start, end) to train on, in order, and the spans
    of message text that looks like a control token, to be encoded as plain text (an empty span only
    separates the text on its two sides)."""

    text: str
    spans: list[tuple[int, int]]
    plain: list[tuple[int, int]]


# Private-use characters wrapped around control-token text in messages before the template renders
# them, so that it can be told apart from the control tokens the template writes (transformers'
# `mark_control_tokens` uses the same two).
_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"


def _control_tokens(tokenizer) -> re.Pattern:
    """A pattern matching any of the tokenizer's special tokens, the longest first (as the tokenizer
    matches them)."""
    tokens = sorted(_special_tokens(tokenizer), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens)) or "(?!)")  # (?!) never matches


def _render(example: Example, tokenizer, index: int, control: re.Pattern) -> _Rendered:
    if getattr(tokenizer, "chat_template", None):
        return _render_chat(example, tokenizer, index, control)
    if tokenizer.eos_token is None:
        raise DataError("the tokenizer has neither a chat template nor an eos token")
    text = tokenizer.bos_token or ""
    spans: list[tuple[int, int]] = []
    plain: list[tuple[int, int]] = []

    def add(content: str) -> None:  # message text: what looks like a control token in it is plain text
        nonlocal text
        plain.extend((len(text) + m.start(), len(text) + m.end()) for m in control.finditer(content))
        text += content

    for role, content in example.messages:
        if role == "system":
            add(content)
            text += "\n\n"
        elif role == "user":
            text += "### Instruction:\n"
            add(content)
            text += "\n\n"
        else:
            text += "### Response:\n"
            spans.append((len(text), len(text) + len(content) + len(tokenizer.eos_token)))
            add(content)
            text += tokenizer.eos_token
    return _Rendered(text, spans, plain)


def _render_chat(example: Example, tokenizer, index: int, control: re.Pattern) -> _Rendered:
    # Control-token text in the messages is wrapped in markers, which survive the template (it sees the
    # message text otherwise unchanged) and show in the rendered text which control tokens are not its own.
    def mark(content: str) -> str:
        content = content.replace(_MARK_START, "").replace(_MARK_END, "")  # so that no message can forge a mark
        return control.sub(lambda m: f"{_MARK_START}{m.group()}{_MARK_END}", content)

    messages = [{"role": role, "content": mark(content)} for role, content in example.messages]
    marks = re.compile(f"{_MARK_START}({control.pattern}){_MARK_END}|[{_MARK_START}{_MARK_END}]")

    def render(msgs: list[dict], generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text without the markers, and the spans of marked text in it."""
        # tokenize=False: transformers 5 otherwise returns a BatchEncoding, not ids or text. Templates
        # raise whatever their authors chose (e.g. "roles must alternate"), hence the broad except.
        try:
            marked = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:
            raise DataError(f"example {index}: the chat template failed: {_one_line(e)}") from None
        if not isinstance(marked, str):
            raise DataError(f"example {index}: apply_chat_template(tokenize=False) returned {type(marked).__name__}")
        text, plain, pos = "", [], 0
        for m in marks.finditer(marked):
            text += marked[pos : m.start()]
            token = m.group(1) or ""  # a lone marker (the template split a marked token) still separates
            plain.append((len(text), len(text) + len(token)))
            text += token
            pos = m.end()
        return text + marked[pos:], plain

    full, plain = render(messages, False)
    spans: list[tuple[int, int]] = []
    for i, (role, content) in enumerate(example.messages):
        if role != "assistant" or i == 0:
            continue
        prompt, _ = render(messages[:i], True)
        upto, _ = render(messages[: i + 1], False)
        after_last = len(prompt) >= (spans[-1][1] if spans else 0)
        if not (full.startswith(upto) and upto.startswith(prompt) and after_last):
            break
        spans.append(_reply_span(full, len(prompt), len(upto), content, control, plain))
    else:
        return _Rendered(full, spans, plain)
    # The template renders earlier turns differently once the chat goes on (some drop reasoning text from
    # old replies): train only the last reply, which is still a suffix of the rendered prompt.
    prompt, _ = render(messages[:-1], True)
    if not full.startswith(prompt):
        raise DataError(
            f"example {index}: the chat template does not render the prompt as a prefix of the conversation, "
            "so the prompt cannot be masked"
        )
    return _Rendered(full, [_reply_span(full, len(prompt), len(full), example.response, control, plain)], plain)


def _reply_span(
    text: str, start: int, end: int, content: str, control: re.Pattern, plain: list[tuple[int, int]]
) -> tuple[int, int]:
    """The trained part of the rendered turn text[start:end]: from its start through the end-of-turn
    token, the first control token the template wrote after the reply's content; what the template adds
    after that is masked. Control-token text from a message (in `plain`) is not the template's and ends
    nothing. If the template rewrote the content (it is not in the turn as given), the span ends with
    the template's last control token in the turn; if the turn holds none, the whole turn is trained."""
    own = [m.span() for m in control.finditer(text, start, end) if not _overlaps(*m.span(), plain)]
    pos = text.rfind(content, start, end) if content else start
    if pos < 0:
        return start, own[-1][1] if own else end
    after = [e for s, e in own if s >= pos + len(content)]
    return start, after[0] if after else end


def _special_tokens(tokenizer) -> list[str]:
    tokens = set(tokenizer.all_special_tokens)
    tokens |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    return sorted(t for t in tokens if t)


def _encode(rendered: Sequence[_Rendered], tokenizer) -> tuple[list, list]:
    """Token ids of each text (no special tokens added) and each token's character span (start, end)."""
    n = len(rendered)
    all_ids: list = [None] * n
    all_offsets: list = [None] * n
    fast = getattr(tokenizer, "is_fast", False)
    whole = [k for k, r in enumerate(rendered) if fast and not r.plain]
    if whole:
        # One pass over the whole text, so that tokens at the prompt/reply border are the ones the model
        # sees at inference (encoding pieces separately adds a word-start marker to SentencePiece pieces).
        enc = tokenizer([rendered[k].text for k in whole], add_special_tokens=False, return_offsets_mapping=True)
        for k, ids, offs in zip(whole, enc["input_ids"], enc["offset_mapping"], strict=True):
            all_ids[k], all_offsets[k] = list(ids), [tuple(o) for o in offs]
    for k, r in enumerate(rendered):
        if all_ids[k] is not None:
            continue
        # In pieces: plain-text pieces without matching special tokens, the rest as usual. Tokenizers
        # without offsets also cut at the trained spans, each token carrying its piece's span.
        plain = {(a, b) for a, b in r.plain}
        cuts = sorted({0, len(r.text), *(x for span in r.plain for x in span),
                       *(() if fast else (x for span in r.spans for x in span))})
        ids, offsets = [], []
        for a, b in itertools.pairwise(cuts):
            piece_ids, piece_offsets = _encode_piece(tokenizer, r.text[a:b], (a, b) in plain, a == 0, fast)
            ids += piece_ids
            offsets += [(a + s, a + e) for s, e in piece_offsets] if fast else [(a, b)] * len(piece_ids)
        all_ids[k], all_offsets[k] = ids, offsets
    return all_ids, all_offsets


def _encode_piece(tokenizer, piece: str, as_text: bool, at_start: bool, fast: bool) -> tuple[list, list]:
    """Ids of a piece of a text, and with `fast` their character spans in it; `as_text`: no special tokens."""
    if not fast:
        return tokenizer.encode(piece, add_special_tokens=False, split_special_tokens=as_text), []

    def encode(s: str) -> tuple[list, list]:
        enc = tokenizer(s, add_special_tokens=False, split_special_tokens=as_text, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    if at_start:
        return encode(piece)
    # A piece from inside the text is encoded after a newline, which is then dropped, so that a
    # SentencePiece tokenizer does not add the word-start marker of a text's start (transformers'
    # `encode_marked_chat` does the same for sanitized chats).
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    ids, offsets = encode("\n" + piece)
    if ids[: len(newline)] == newline:
        return ids[len(newline) :], [(max(s - 1, 0), max(e - 1, 0)) for s, e in offsets[len(newline) :]]
    return encode(piece)


def _overlaps(a: int, b: int, spans: list[tuple[int, int]]) -> bool:
    return any(a < e and s < b for s, e in spans)


# ----------------------------------------------------------------------------------------------------
# Batching


def collate(batch: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: input_ids, attention_mask and labels (IGNORE_INDEX on pads), all long.

    A batch of classification examples also gets choice_ids [B, C] (each row's answer tokens) and
    choice_label [B] (the index of the right one).
    """
    if not batch:
        raise DataError("cannot collate an empty batch")
    with_choices = sum(ex.choices is not None for ex in batch)
    if with_choices not in (0, len(batch)):
        raise DataError(f"a batch mixes {with_choices} examples with choices and {len(batch) - with_choices} without")
    if with_choices and len({len(ex.choices) for ex in batch}) > 1:
        raise DataError(f"a batch holds examples with different numbers of choices ({sorted({len(ex.choices) for ex in batch})})")
    width = max(len(ex.input_ids) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if with_choices:
        out["choice_ids"] = torch.tensor([ex.choices for ex in batch], dtype=torch.long)
        out["choice_label"] = torch.tensor([ex.label for ex in batch], dtype=torch.long)
    return out


class BatchStream:
    """Deterministic training batches, round by round.

    `round(r)` is an endless iterator of full `batch_size` batches whose order depends only on
    (`seed`, `r`): a shuffled pass over the data, reshuffled when it runs out. So a worker's update for
    a round does not depend on what it trained before, and a round run again (after a coordinator
    restart, say) sees exactly the same batches.

    `shard` (rank, ranks): the batches are the site's batches of `batch_size` rows, of which this rank
    of a site of several processes gets rows rank, rank + ranks, ... (each rank at least one).
    """

    def __init__(self, data: Sequence[TokenizedExample], batch_size: int, seed: int, pad_id: int,
                 shard: tuple[int, int] = (0, 1)):
        if not data:
            raise DataError("no training examples (after tokenizing and truncating)")
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        rank, ranks = shard
        if not 0 <= rank < ranks or batch_size < ranks:
            raise DataError(f"a batch of {batch_size} rows cannot be shared by {ranks} processes (rank {rank})")
        self.data = list(data)
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.shard = shard

    def round(self, r: int) -> Iterator[dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + r)
        order: list[int] = []
        while True:
            while len(order) < self.batch_size:
                order += torch.randperm(len(self.data), generator=generator).tolist()
            picked, order = order[: self.batch_size], order[self.batch_size :]
            yield collate([self.data[i] for i in picked[self.shard[0] :: self.shard[1]]], self.pad_id)


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Number of label positions that contribute to the causal-LM loss (labels shift by one, so the
    first position never does); for a classification batch, its number of rows (each scores once)."""
    if "choice_ids" in batch:
        return int(batch["choice_ids"].shape[0])
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


# ----------------------------------------------------------------------------------------------------
# Splitting


def sample(examples: Sequence[Example], n: int, seed: int = 0) -> list[Example]:
    """At most `n` examples, a seeded random choice in their original order (data files are often
    sorted by topic, so the first n would not represent the set)."""
    if n <= 0 or n >= len(examples):
        return list(examples)
    keep = sorted(torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:n].tolist())
    return [examples[i] for i in keep]


def split_holdout(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, heldout): a seeded random `round(fraction * n)` examples are held out, at least one when
    fraction > 0 and n >= 2, and never all of them. Both parts keep the input order."""
    if not 0 <= fraction < 1:
        raise DataError(f"holdout fraction must be in [0, 1), got {fraction}")
    n = len(examples)
    k = round(fraction * n)
    if fraction > 0 and n >= 2:
        k = max(k, 1)
    k = min(k, max(n - 1, 0))
    held = set(np.random.default_rng(seed).permutation(n)[:k].tolist())
    train = [ex for i, ex in enumerate(examples) if i not in held]
    heldout = [ex for i, ex in enumerate(examples) if i in held]
    return train, heldout


def split_clients(examples: Sequence[Example], n: int, mode: str, seed: int) -> list[list[Example]]:
    """Split examples over `n` clients; every client gets at least one, and together they hold exactly
    the input. Each client's examples keep the input order.

    mode `iid`: a seeded shuffle dealt round-robin (sizes differ by at most one).
    mode `dirichlet:ALPHA`: for each category, client shares drawn from Dirichlet(ALPHA) (small ALPHA:
    each category lands on few clients). Examples without a category are grouped by the decile of
    their reply length (in characters) among themselves, so the split still skews on something
    observable. A client left empty gets one example from the largest client.
    """
    alpha = _parse_split_mode(mode)
    if n < 1:
        raise DataError(f"number of clients must be at least 1, got {n}")
    if len(examples) < n:
        raise DataError(f"cannot split {len(examples)} examples over {n} clients (each needs at least one)")
    rng = np.random.default_rng(seed)
    if alpha is None:
        order = rng.permutation(len(examples))
        parts = [order[c::n].tolist() for c in range(n)]
    else:
        parts = [[] for _ in range(n)]
        for members in _groups(examples).values():
            members = np.array(members)
            rng.shuffle(members)
            shares = rng.dirichlet(np.full(n, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for c, part in enumerate(np.split(members, cuts)):
                parts[c] += part.tolist()
        for c in range(n):
            if not parts[c]:
                largest = max(range(n), key=lambda j: len(parts[j]))
                parts[c].append(parts[largest].pop())
    return [[examples[i] for i in sorted(part)] for part in parts]


def _parse_split_mode(mode: str) -> float | None:
    """None for `iid`, ALPHA for `dirichlet:ALPHA`."""
    if mode == "iid":
        return None
    prefix = "dirichlet:"
    if mode.startswith(prefix):
        try:
            alpha = float(mode[len(prefix) :])
        except ValueError:
            alpha = math.nan
        if math.isfinite(alpha) and alpha > 0:
            return alpha
    raise DataError(f"bad split mode {mode!r}; expected 'iid' or 'dirichlet:ALPHA' with ALPHA > 0 (e.g. dirichlet:0.5)")


def _groups(examples: Sequence[Example]) -> dict[tuple, list[int]]:
    """Example indices by category, in order of first appearance; uncategorized ones by reply-length decile."""
    groups: dict[tuple, list[int]] = {}
    uncategorized = []
    for i, ex in enumerate(examples):
        if ex.category is None:
            uncategorized.append(i)
        else:
            groups.setdefault(("category", ex.category), []).append(i)
    by_length = sorted(uncategorized, key=lambda i: (len(examples[i].response), i))
    for rank, i in enumerate(by_length):
        groups.setdefault(("length-decile", rank * 10 // len(by_length)), []).append(i)
    return groups
