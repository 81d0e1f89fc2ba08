"""Held-out evaluation of the global model on the coordinator."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..common.data import DataError, load_examples, sample, tokenize
from ..common.models import build_model_from_files, load_tokenizer
from ..common.training import Evaluation, evaluate


class Evaluator:
    """Callable: {block: {param: tensor}} -> token-weighted mean loss on the first `max_examples` examples
    (for classification data the row-weighted loss over the choices). The whole result of the latest
    call, with the accuracy of classification data, is in `last`."""

    def __init__(self, model_dir: Path, source: str, max_examples: int, batch_size: int, max_seq_len: int):
        tokenizer = load_tokenizer(model_dir)
        examples = sample(load_examples(source), max_examples)
        self.data = tokenize(examples, tokenizer, max_seq_len)
        if not self.data:
            raise DataError(f"--eval-data {source}: no example keeps a scored token within --max-seq-len {max_seq_len}")
        self.pad_id = tokenizer.pad_token_id
        self.batch_size = batch_size
        self.model = build_model_from_files(model_dir, dtype=torch.float32)
        self._params = dict(self.model.named_parameters())
        self.last: Evaluation | None = None

    def __call__(self, blocks: Mapping[str, Mapping[str, Tensor]]) -> float:
        with torch.no_grad():
            for tensors in blocks.values():
                for name, t in tensors.items():
                    self._params[name].copy_(t)
        self.last = evaluate(self.model, self.data, self.batch_size, self.pad_id)
        return self.last.loss
