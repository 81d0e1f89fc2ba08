"""Held-out evaluation of the global model on the coordinator, on a thread of its own."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..common.adapters import LoraSettings, add_lora
from ..common.data import DataError, load_examples, sample, tokenize
from ..common.models import build_model_from_files, load_tokenizer
from ..common.training import Evaluation, evaluate
from .store import StoredModel

log = logging.getLogger("fedblock.coordinator")


class Evaluator:
    """Callable: {block: {param: tensor}} -> token-weighted mean loss on the first `max_examples` examples
    (for classification data the row-weighted loss over the choices). The whole result of the latest
    call, with the accuracy of classification data, is in `last`.

    It holds a whole float32 model (the memory of the model, on the coordinator, when it evaluates).
    The blocks of a StoredModel are copied in only when their file differs from the one copied last
    time: an evaluation reads the blocks that changed since the one before."""

    def __init__(self, model_dir: Path, source: str, max_examples: int, batch_size: int, max_seq_len: int,
                 lora: LoraSettings | None = None):
        tokenizer = load_tokenizer(model_dir)
        examples = sample(load_examples(source), max_examples)
        self.data = tokenize(examples, tokenizer, max_seq_len)
        if not self.data:
            raise DataError(f"--eval-data {source}: no example keeps a scored token within --max-seq-len {max_seq_len}")
        self.pad_id = tokenizer.pad_token_id
        self.batch_size = batch_size
        self.model = add_lora(build_model_from_files(model_dir, dtype=torch.float32), lora)
        self._params = dict(self.model.named_parameters())
        self._loaded: dict[str, str] = {}  # block -> SHA-256 of the file its values in the model came from
        self.last: Evaluation | None = None

    def __call__(self, blocks: Mapping[str, Mapping[str, Tensor]]) -> float:
        with torch.no_grad():
            for block in blocks:
                source = blocks.source(block) if isinstance(blocks, StoredModel) else None
                if source is not None and self._loaded.get(block) == source:
                    continue
                self._loaded.pop(block, None)  # (until it is copied whole)
                for name, t in blocks[block].items():
                    self._params[name].copy_(t)
                if source is not None:
                    self._loaded[block] = source
        self.last = evaluate(self.model, self.data, self.batch_size, self.pad_id)
        return self.last.loss


class BackgroundEvaluation:
    """Evaluates snapshots of the global model on its own thread, one at a time, oldest first, so that
    the round loop never waits for an evaluation. A snapshot must not change while it waits or is
    evaluated; one with a `release()` (StoredModel.snapshot) is released once evaluated or dropped.
    `submit` never blocks: beyond `backlog` waiting snapshots the oldest waiting one is dropped (with
    a warning), so memory and pinned files stay bounded when evaluating is slower than training.

    `evaluate(tensors) -> loss` (with an optional `.last.accuracy`, as `Evaluator` has);
    `on_result(round, loss, accuracy or None, seconds)` is called on the evaluation thread. An
    evaluation that raises ends the evaluations (`error`); training goes on."""

    def __init__(self, evaluate, on_result: Callable[[int, float, float | None, float], None], backlog: int = 2):
        self._evaluate = evaluate
        self._on_result = on_result
        self._backlog = backlog
        self._waiting: deque[tuple[int, Mapping]] = deque()
        self._busy = False
        self._closed = False
        self._cv = threading.Condition()
        self.error: BaseException | None = None
        self._threads = torch.get_num_threads()  # per OS thread: carry the creator's setting over
        self._thread = threading.Thread(target=self._run, name="evaluation", daemon=True)
        self._thread.start()

    def submit(self, round: int, tensors: Mapping[str, Mapping[str, Tensor]]) -> None:
        with self._cv:
            if self._closed or self.error is not None:
                _release(tensors)
                return
            if len(self._waiting) >= self._backlog:
                dropped, snapshot = self._waiting.popleft()
                _release(snapshot)
                log.warning("evaluation of round %d skipped: evaluations are slower than rounds", dropped)
            self._waiting.append((round, tensors))
            self._cv.notify_all()

    def wait_idle(self, stop: threading.Event, poll_s: float = 0.1) -> bool:
        """Wait until every submitted evaluation is done: True, or False if `stop` is set first or an
        evaluation failed."""
        with self._cv:
            while (self._waiting or self._busy) and not stop.is_set() and self.error is None:
                self._cv.wait(poll_s)
            return not (self._waiting or self._busy) and self.error is None

    def close(self, timeout: float = 5.0) -> None:
        """Drop what waits; an evaluation under way is left to finish (its result is not recorded).
        Closing twice is harmless."""
        with self._cv:
            self._closed = True
            self._drop_waiting()
            self._cv.notify_all()
        self._thread.join(timeout)

    def _drop_waiting(self) -> None:
        while self._waiting:
            _release(self._waiting.popleft()[1])

    def _run(self) -> None:
        torch.set_num_threads(self._threads)
        while True:
            with self._cv:
                while not self._waiting and not self._closed:
                    self._cv.wait()
                if not self._waiting:
                    return
                round, tensors = self._waiting.popleft()
                self._busy = True
            try:
                t0 = time.perf_counter()
                loss = float(self._evaluate(tensors))
                # Where the data has answers to choose from, the evaluator also scores them.
                accuracy = getattr(getattr(self._evaluate, "last", None), "accuracy", None)
                with self._cv:
                    closed = self._closed
                if not closed:  # after `close` the run's results are written: this one comes too late
                    self._on_result(round, loss, None if accuracy is None else float(accuracy), time.perf_counter() - t0)
            except Exception as e:
                log.exception("evaluation of round %d failed; no more evaluations this run", round)
                with self._cv:
                    self.error = e
                    self._drop_waiting()
            finally:
                _release(tensors)
                del tensors  # (a snapshot's tensors: not kept while the thread waits for the next)
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()


def _release(snapshot: Mapping) -> None:
    """Let go of what a snapshot holds on disk (StoredModel.snapshot's pinned files); others hold nothing."""
    release = getattr(snapshot, "release", None)
    if release is not None:
        release()
