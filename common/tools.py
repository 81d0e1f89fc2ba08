"""The small commands: `fedblock export`, `fedblock eval`, `fedblock status`, `fedblock codec train`."""

from __future__ import annotations

import math
import time

import torch

from .config import CodecTrainConfig, ConfigError, EvalConfig, ExportConfig, StatusConfig


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
    from .adapters import recorded

    tensors = checkpoint_model(store, ckpt, blocks if blocks is not None else store.load_blocks(ckpt))
    lora = recorded(json.loads((store.root / "run.json").read_text()))
    return str(export_model(store.model_dir, tensors, config.out, lora, config.adapter_out))


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
    """Print the coordinator's view of the run once, or with --watch every SECONDS until the run ends
    (finished or stopped: the final view, exit 0) or Ctrl-C. On a terminal the view is redrawn in place;
    otherwise each refresh is one block of lines, blank-line separated, so that it can be logged."""
    import sys

    import grpc

    from .pb import coordinator_pb2 as pb
    from .pb import coordinator_pb2_grpc as pb_grpc
    from .rpc import open_channel
    from .security import channel_credentials

    out = sys.stdout
    tty = out.isatty()
    credentials = None if config.insecure else channel_credentials(config.tls_ca, None, None)
    with open_channel(config.coordinator, credentials, config.tls_server_name) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        shown = None
        try:
            while True:
                try:
                    s = stub.Status(pb.StatusRequest(), timeout=10)
                except grpc.RpcError as e:
                    if shown is None:
                        print(f"fedblock status: error: {config.coordinator}: {e.code().name}: {e.details()}")
                        return 2
                    print(f"fedblock status: {config.coordinator} no longer answers ({e.code().name}): the "
                          f"coordinator stopped while the run was {shown.state}", file=sys.stderr)
                    return 1
                view = status_view(s, config.watch if config.watch else None)
                if tty and config.watch:
                    out.write("\x1b[H\x1b[2J" + view)  # home, clear: redraw in place
                else:
                    out.write(("\n" if shown is not None else "") + view)
                out.flush()
                shown = s
                if not config.watch or s.state in ("finished", "stopped"):
                    return 0
                time.sleep(config.watch)
        except KeyboardInterrupt:  # the way to leave a watch
            return 0


def status_view(s, every: float | None = None) -> str:
    """The lines `fedblock status` shows for one StatusReply (`every`: the watch's refresh, for the header)."""
    total, done = max(int(s.rounds_total), 0), int(s.rounds_completed)
    width = 30
    filled = min(width, round(width * done / total)) if total else 0
    loss = "none yet" if math.isnan(s.last_eval_loss) else f"{s.last_eval_loss:.4f} (after round {s.last_eval_round})"
    lines = []
    if every:
        lines.append(f"fedblock status {time.strftime('%H:%M:%S')}, every {every:g} s (Ctrl-C to stop)")
    lines += [
        f"run {s.run_id}: {s.algorithm}, {s.state}, {done}/{total} rounds completed"
        + (f", round {s.round} open" if s.round and s.state not in ("finished", "stopped") else ""),
        f"[{'#' * filled}{'.' * (width - filled)}] {100 * done / total if total else 0:.0f}%",
        f"bytes up {s.bytes_received / 1e6:.1f} MB (received), down {s.bytes_sent / 1e6:.1f} MB (sent); "
        f"last eval loss {loss}",
    ]
    if s.workers:
        lines.append(f"  {'worker':20s} {'state':9s} {'last seen':>10s} {'round':>6s} {'steps':>6s} {'updates':>8s}  device")
    for w in s.workers:
        ago = w.last_seen_s
        seen = "never" if not math.isfinite(ago) or ago < 0 else f"{ago:.1f} s ago" if ago < 10 else f"{ago:.0f} s ago"
        lines.append(f"  {w.name:20s} {'connected' if w.connected else 'gone':9s} {seen:>10s} "
                     f"{getattr(w, 'current_round', 0) or '-':>6} {getattr(w, 'local_steps', 0) or '-':>6} "
                     f"{w.updates_accepted:>8d}  {getattr(w, 'device', '') or '-'}")
    if not s.workers:
        lines.append("  no worker has joined yet")
    return "\n".join(lines) + "\n"


def codec_train(config: CodecTrainConfig) -> dict:
    """Pre-train the autoencoder codec on a run's recorded updates, over all its rounds and workers (the
    paper's temporal ensemble), and write its weights. Prints and returns the hold-out reconstruction."""
    import fnmatch

    import safetensors
    import safetensors.torch

    from .autoencoder import save_weights, train_autoencoder
    from .codecs import Autoencoder

    if config.threads:
        torch.set_num_threads(config.threads)
    records = sorted((config.from_dir / "records").glob("round-*/*.safetensors"))
    if not records:
        raise ConfigError(f"--from {config.from_dir}: no recorded updates under records/ "
                          "(run the coordinator with --record-updates)")
    patterns = [p.strip() for p in config.blocks.split(",") if p.strip()]
    images = []
    for path in records:
        block = path.stem.partition("@")[2]
        if any(fnmatch.fnmatchcase(block, p) for p in patterns):
            try:
                images.append(Autoencoder.block_image(safetensors.torch.load_file(str(path)), config.ratio)[0][0])
            except (OSError, ValueError, safetensors.SafetensorError) as e:  # a record cut short, or not one
                raise ConfigError(f"--from: {path} is not a readable recorded update ({e}); delete it") from None
    if not images:
        raise ConfigError(f"--blocks {config.blocks!r} matches none of the {len(records)} recorded updates")
    model, report = train_autoencoder(images, config.ratio, variant=config.variant, steps=config.steps, lr=config.lr,
                                      batch_size=config.batch_size, seed=config.seed, holdout=config.holdout,
                                      log_every=max(1, config.steps // 10))
    config.out.parent.mkdir(parents=True, exist_ok=True)
    save_weights(model, config.out, variant=config.variant,
                 extra={"updates": str(len(images)), "steps": str(config.steps), "source": str(config.from_dir)})
    result = {"out": str(config.out), "ratio": config.ratio, "variant": config.variant, "updates": len(images),
              "train_updates": report.train_images, "holdout_updates": report.holdout_images,
              "train_mse": report.train_mse, "holdout_mse": report.holdout_mse,
              "holdout_cosine": report.holdout_cosine, "holdout_rel_error": report.holdout_rel_error,
              "seconds": round(report.seconds, 1)}
    for key, value in result.items():
        print(f"{key:18s} {value:.4g}" if isinstance(value, float) else f"{key:18s} {value}")
    return result
