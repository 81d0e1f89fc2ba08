"""Partitioning models into blocks, and the block tensor math (delta, apply, ParaBlock rebase)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

from fedblock.common import blocks as B

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "llama-tied": LlamaConfig(**TINY, tie_word_embeddings=True),
    "qwen2-untied": Qwen2Config(**TINY, tie_word_embeddings=False),
    "mistral": MistralConfig(**TINY, tie_word_embeddings=False),
    "gpt2": GPT2Config(vocab_size=128, n_embd=32, n_layer=4, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
    "opt-projected": OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=4, num_attention_heads=4,
                               word_embed_proj_dim=16, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                               pad_token_id=1),
}


def model_of(name):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[name])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_partition_covers_every_parameter_once(name):
    model = model_of(name)
    blocks = B.partition(model)
    names = [b.name for b in blocks]
    assert names[0] == "embed" and names[1:5] == ["layers.0", "layers.1", "layers.2", "layers.3"]
    all_params = [n for b in blocks for n in b.params]
    assert sorted(all_params) == sorted(n for n, _ in model.named_parameters())
    assert len(all_params) == len(set(all_params))


def test_embed_and_head_found_by_execution_order():
    blocks = {b.name: b.params for b in B.partition(model_of("llama-tied"))}
    assert blocks["embed"] == ("model.embed_tokens.weight",)  # tied lm_head is the same tensor
    assert blocks["head"] == ("model.norm.weight",)
    blocks = {b.name: set(b.params) for b in B.partition(model_of("qwen2-untied"))}
    assert blocks["head"] == {"model.norm.weight", "lm_head.weight"}
    gpt2 = {b.name: set(b.params) for b in B.partition(model_of("gpt2"))}
    assert gpt2["embed"] == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert gpt2["head"] == {"transformer.ln_f.weight", "transformer.ln_f.bias"}
    # OPT registers project_out before project_in; only tracing gets the sides right.
    opt = {b.name: set(b.params) for b in B.partition(model_of("opt-projected"))}
    assert "model.decoder.project_in.weight" in opt["embed"]
    assert "model.decoder.project_out.weight" in opt["head"]


def test_layers_per_block_groups_consecutive_layers():
    blocks = B.partition(model_of("llama-tied"), layers_per_block=3)
    assert [b.name for b in blocks] == ["embed", "layers.0-2", "layers.3", "head"]
    assert all(".layers.0." in p or ".layers.1." in p or ".layers.2." in p for p in blocks[1].params)
    with pytest.raises(ValueError):
        B.partition(model_of("llama-tied"), layers_per_block=0)


def test_set_trainable_computes_no_gradient_below_the_block():
    model = model_of("llama-tied")
    blocks = {b.name: b for b in B.partition(model)}
    trainable = B.set_trainable(model, [blocks["layers.2"]])
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if name in blocks["layers.2"].params:
            assert p.grad is not None and p.grad.abs().sum() > 0
        else:
            assert p.grad is None, name
    assert len(trainable) == len(blocks["layers.2"].params)


def test_delta_and_add_scaled_are_inverse():
    start = {"a": torch.randn(3, 4), "b": torch.randn(5)}
    current = {n: t + 0.01 * torch.randn_like(t) for n, t in start.items()}
    d = B.delta(current, start)
    rebuilt = B.snapshot(start)
    B.add_scaled_(rebuilt, d)
    for n in start:
        torch.testing.assert_close(rebuilt[n], current[n], rtol=0, atol=1e-7)


def test_rebase_keeps_own_progress_on_the_new_global():
    s = {"w": torch.tensor([1.0, 2.0, 3.0])}
    w = {"w": torch.tensor([1.5, 1.0, 3.25])}  # progress since s: [+0.5, -1.0, +0.25]
    g = {"w": torch.tensor([10.0, 20.0, 30.0])}
    live = w["w"]
    B.rebase_(w, s, g)
    assert w["w"] is live  # in place: the optimizer still holds this tensor
    assert torch.equal(w["w"], torch.tensor([10.5, 19.0, 30.25]))
    assert torch.equal(s["w"], g["w"])
    # The delta computed after the rebase is exactly the worker's own progress.
    assert torch.equal(B.delta(w, s)["w"], torch.tensor([0.5, -1.0, 0.25]))


def test_rebase_twice_accumulates_progress_only_once():
    s = {"w": torch.zeros(4)}
    w = {"w": torch.full((4,), 0.5)}
    B.rebase_(w, s, {"w": torch.ones(4)})
    w["w"] += 0.25  # more local steps
    B.rebase_(w, s, {"w": torch.full((4,), 2.0)})
    assert torch.equal(w["w"], torch.full((4,), 2.75))
    assert torch.equal(B.delta(w, s)["w"], torch.full((4,), 0.75))


def test_rebase_with_unchanged_global_is_identity():
    s = {"w": torch.randn(16)}
    w = {"w": s["w"] + 0.125}
    before = w["w"].clone()
    B.rebase_(w, s, {"w": s["w"].clone()})
    torch.testing.assert_close(w["w"], before, rtol=0, atol=1e-6)


def test_rebase_in_bfloat16_weights_takes_float32_global():
    s = {"w": torch.zeros(4, dtype=torch.bfloat16)}
    w = {"w": torch.full((4,), 0.5, dtype=torch.bfloat16)}
    B.rebase_(w, s, {"w": torch.full((4,), 1.0)})
    assert w["w"].dtype == torch.bfloat16 and torch.equal(w["w"].float(), torch.full((4,), 1.5))
