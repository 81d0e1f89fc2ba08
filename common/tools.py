"""The small commands: `fedblock export`, `fedblock eval`, `fedblock status`."""

from __future__ import annotations

import math
import time

import torch

from .config import EvalConfig, ExportConfig, StatusConfig


def export(config: ExportConfig) -> str:
    """Write a state dir's global model (latest or chosen round) as a Hugging Face folder."""
    import json

    from ..server.store import Checkpoint, StateError, StateStore, export_model

    if not (config.state_dir / "checkpoints").is_dir():
        raise StateError(f"{config.state_dir} is not a fedblock state dir (no checkpoints/)")
    store = StateStore(config.state_dir)
    blocks = None
    if config.round is None:
        intact = store.latest_intact()  # past a damaged newest checkpoint, as a resume does
        ckpt, blocks = intact if intact is not None else (None, None)
    else:
        path = store.ckpt_dir / f"round-{config.round:06d}.json"
        if not path.exists():
            kept = ", ".join(p.stem for p in store.checkpoints())
            raise StateError(f"no checkpoint for round {config.round} (kept: {kept})")
        ckpt = Checkpoint(**json.loads(path.read_text()))
    if ckpt is None:
        raise StateError(f"{config.state_dir} holds no checkpoint")
    from ..server.daemon import checkpoint_model

    tensors = checkpoint_model(store, ckpt, blocks if blocks is not None else store.load_blocks(ckpt))
    return str(export_model(store.model_dir, tensors, config.out))


def evaluate(config: EvalConfig) -> dict:
    """Print held-out loss and accuracy: for classification data (examples with choices) that of the
    choices' argmax, otherwise exact-match accuracy of greedy generation where the data has answers."""
    from .data import encode_prompt, extract_answer, load_examples, sample, tokenize
    from .models import load_model, load_tokenizer, resolve_model
    from .training import evaluate as evaluate_data

    if config.threads:
        torch.set_num_threads(config.threads)
    path = resolve_model(config.model)
    examples = sample(load_examples(config.data), config.max_examples)
    tokenizer = load_tokenizer(path)
    model = load_model(path)
    t0 = time.perf_counter()
    data = tokenize(examples, tokenizer, config.max_seq_len)
    evaluation = evaluate_data(model, data, config.batch_size, tokenizer.pad_token_id)
    loss, tokens = evaluation.loss, evaluation.tokens
    result = {"examples": len(examples), "tokens": tokens, "loss": loss, "perplexity": math.exp(loss) if loss < 50 else math.inf}
    if evaluation.accuracy is not None:
        result["accuracy"] = evaluation.accuracy
        correct = round(evaluation.accuracy * tokens) if tokens else 0
        print(f"loss {loss:.4f}  (cross-entropy over {len(data[0].choices) if data else 0} choices; {len(examples)} examples, "
              f"{tokens} scored, {time.perf_counter() - t0:.1f} s)")
        print(f"accuracy {evaluation.accuracy:.3f}  ({correct}/{tokens} right: the highest-scoring choice)")
        return result
    print(f"loss {loss:.4f}  perplexity {result['perplexity']:.2f}  ({len(examples)} examples, {tokens} tokens, {time.perf_counter() - t0:.1f} s)")
    scored = [e for e in examples if e.answer][: config.accuracy_examples]
    if scored:
        correct = 0
        model.eval()
        for e in scored:
            prompt = torch.tensor([encode_prompt(e, tokenizer)])
            with torch.no_grad():
                out = model.generate(prompt, max_new_tokens=config.max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            text = tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
            correct += _same_answer(extract_answer(text) or _last_number(text), e.answer)
        result["accuracy"] = correct / len(scored)
        print(f"accuracy {result['accuracy']:.3f}  ({correct}/{len(scored)} exact-match answers, greedy)")
    return result


def _last_number(text: str) -> str | None:
    import re

    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return numbers[-1] if numbers else None


def _same_answer(got: str | None, want: str) -> bool:
    def norm(s: str) -> str:
        return s.strip().strip(".$ ").replace(",", "").lower()

    return got is not None and norm(got) == norm(want)


def status(config: StatusConfig) -> int:
    import grpc

    from .pb import coordinator_pb2 as pb
    from .pb import coordinator_pb2_grpc as pb_grpc
    from .rpc import open_channel
    from .security import channel_credentials

    credentials = None if config.insecure else channel_credentials(config.tls_ca, None, None)
    with open_channel(config.coordinator, credentials, config.tls_server_name) as channel:
        try:
            s = pb_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(), timeout=10)
        except grpc.RpcError as e:
            print(f"fedblock status: error: {config.coordinator}: {e.code().name}: {e.details()}")
            return 2
    loss = "n/a" if math.isnan(s.last_eval_loss) else f"{s.last_eval_loss:.4f} (after round {s.last_eval_round})"
    print(f"run {s.run_id}: {s.algorithm}, {s.state}, round {s.round}, {s.rounds_completed}/{s.rounds_total} rounds completed")
    print(f"bytes received {s.bytes_received / 1e6:.1f} MB, sent {s.bytes_sent / 1e6:.1f} MB; last eval loss {loss}")
    for w in s.workers:
        seen = "never" if w.last_seen_s < 0 else f"{w.last_seen_s:.0f} s ago"
        print(f"  {w.name:20s} {'connected' if w.connected else 'gone':9s} last seen {seen:>10s}  updates {w.updates_accepted}")
    return 0
