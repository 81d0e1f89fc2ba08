"""Shared fixtures: tiny models and data, and an in-process coordinator plus workers on real gRPC."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["FEDBLOCK_LINGER"] = "0"  # processes the tests start exit when their run ends (no scraper waits)

import subprocess  # noqa: E402
import threading  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from fedblock.common.config import CoordinatorConfig, WorkerConfig  # noqa: E402
from fedblock.common.data import Example, write_jsonl  # noqa: E402
from fedblock.common.models import make_tiny_model  # noqa: E402

hf_logging.disable_progress_bar()
torch.set_num_threads(1)  # the suite runs on 2 cores; workers and coordinator share them


def train_every_block(model, blocks, model_dir, data_file, rounds: int, steps: int, lr: float) -> dict:
    """What fedavg with one worker does, on one machine: each round AdamW (a fresh state) over all of
    `blocks` for `steps` steps of the worker's data order, then every block's change taken as a delta
    (`take_delta_`, the float32 rounding of the exchange). Returns the final parameters."""
    from fedblock.common import blocks as B
    from fedblock.common.data import BatchStream, load_examples, tokenize
    from fedblock.common.models import load_tokenizer
    from fedblock.common.training import BlockTrainer, OptimConfig

    tokenizer = load_tokenizer(model_dir)
    stream = BatchStream(tokenize(load_examples(str(data_file)), tokenizer, 64), 4, 0, tokenizer.pad_token_id)
    trainer = BlockTrainer(model, blocks, OptimConfig())
    for t in range(1, rounds + 1):
        trainer.begin_round([b.name for b in blocks])
        start = {b.name: B.snapshot(B.block_params(model, b)) for b in blocks}
        batches = stream.round(t)
        for _ in range(steps):
            trainer.step(next(batches), lr)
        for b in blocks:
            B.take_delta_(B.block_params(model, b), start[b.name])
    return {n: p.detach() for n, p in model.named_parameters()}


def arithmetic_examples(n: int = 48) -> list[Example]:
    return [
        Example((("user", f"What is {i} plus {i + 1}?"), ("assistant", f"{i} plus {i + 1} is {2 * i + 1}.")),
                answer=str(2 * i + 1), category=f"c{i % 4}")
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", seed=0, num_layers=4, hidden_size=64)


@pytest.fixture(scope="session")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_jsonl(arithmetic_examples(), path)
    return path


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a coordinator certificate for localhost/127.0.0.1 and client certificates for two sites:
    the same commands as in README.md (Operations)."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "365", "-subj", "/CN=fedblock test CA",
            "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, ext in (("coordinator", "server.ext"), ("site-a", None), ("site-b", None)):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={'localhost' if name == 'coordinator' else name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "365", "-out", f"{name}.pem", *(["-extfile", ext] if ext else []), cwd=d)
    # A second, unrelated CA: certificates from it must not be accepted.
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "365", "-subj", "/CN=other CA",
            "-keyout", "other.key", "-out", "other.pem", cwd=d)
    return d


@dataclass
class Federation:
    """A coordinator served on loopback and worker threads running the real worker code."""

    running: object
    workers: list = field(default_factory=list)
    outcomes: dict = field(default_factory=dict)
    threads: list = field(default_factory=list)

    @property
    def coordinator(self):
        return self.running.coordinator

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def worker_config(self, name: str, data: Path, **kw) -> WorkerConfig:
        return WorkerConfig(coordinator=self.address, name=name, data=str(data),
                            **{"batch_size": 4, "max_seq_len": 64, "connect_timeout": 30, "insecure": True, **kw})

    def add_worker(self, config: WorkerConfig):
        from fedblock.client.worker import Worker

        worker = Worker(config)
        t = threading.Thread(target=lambda: self.outcomes.__setitem__(config.name, worker.run()), daemon=True)
        self.workers.append(worker)
        self.threads.append(t)
        t.start()
        return worker

    def run(self, timeout: float = 120) -> dict:
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("summary", self.coordinator.run()), daemon=True)
        t.start()
        t.join(timeout)
        if t.is_alive():
            self.coordinator.stop()
            t.join(10)
            raise AssertionError(f"the run did not finish in {timeout} s")
        for w in self.threads:
            w.join(30)
        return result["summary"]

    def close(self):
        self.coordinator.stop()
        for w in self.workers:
            w.stop.set()
        for t in self.threads:
            t.join(10)
        self.running.close(grace=0)


@pytest.fixture
def federation(tmp_path, tiny_model):
    """federation(**coordinator_options) -> Federation (started; call .run())."""
    from fedblock.server import daemon

    made = []

    def start(model=None, **options):
        config = CoordinatorConfig(model=str(model or tiny_model), state_dir=tmp_path / f"state{len(made)}",
                                   listen="127.0.0.1:0", **{"insecure": True, **options})
        fed = Federation(daemon.start(config))
        made.append(fed)
        return fed

    yield start
    for fed in made:
        fed.close()
