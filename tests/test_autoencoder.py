"""CG-FedLLM's gradient autoencoder: shapes, the block-as-image layout, scaling, training, FAF, weights."""

import math

import pytest
import torch
from safetensors.torch import save_file

from fedblock.common.autoencoder import (
    GradientAutoencoder,
    cosine,
    encoder_state,
    file_sha256,
    from_image,
    layout,
    load_encoder_state,
    load_weights,
    read_metadata,
    relative_error,
    save_weights,
    scale,
    to_image,
    train_autoencoder,
    tune_encoder,
    unscale,
)


def synthetic(n: int, h: int = 32, w: int = 64, rank: int = 3, seed: int = 0) -> list[torch.Tensor]:
    """Images [1, h, w]: random combinations of `rank` fixed outer products of smooth (low-frequency)
    vectors, scaled to a peak of 1e-3 like a LoRA update. Smooth factors give the spatial correlation a
    convolutional autoencoder can exploit; with Gaussian factors nothing is learnt at these sizes."""
    g = torch.Generator().manual_seed(seed)
    f = torch.arange(1, rank + 1, dtype=torch.float32)
    phase = 2 * math.pi * torch.rand(rank, 2, generator=g)
    u = torch.cos(2 * math.pi * f[:, None] * torch.arange(h) / h + phase[:, :1])[:, :, None]
    v = torch.cos(2 * math.pi * f[:, None] * torch.arange(w) / w + phase[:, 1:])[:, None, :]
    out = []
    for _ in range(n):
        x = (torch.randn(rank, 1, 1, generator=g) * u * v).sum(0)
        out.append((1e-3 * x / x.abs().max())[None])
    return out


@pytest.fixture(scope="module")
def trained() -> GradientAutoencoder:
    """A ratio-16 model after a few steps: BatchNorm running statistics that are not the defaults."""
    model, _ = train_autoencoder(synthetic(6), 16, variant="max", steps=4, lr=1e-3, holdout=0)
    return model


@pytest.mark.parametrize("ratio,h,w", [(2, 2, 4), (4, 64, 128), (16, 64, 128), (64, 64, 64), (64, 64, 128)])
def test_the_latent_holds_one_value_in_ratio(ratio, h, w):
    model = GradientAutoencoder(ratio).eval()
    assert model.multiple == ratio and model.k == ratio.bit_length() - 1
    with torch.no_grad():
        latent = model.encode(torch.randn(2, 1, h, w))
        assert tuple(latent.shape) == (2, *model.latent_shape(h, w)) == (2, ratio, h // ratio, w // ratio)
        assert latent[0].numel() * ratio == h * w
        # a 1-position-tall latent (and a 2x2 image) cannot be reflected: the padding replicates there
        assert tuple(model.decode(latent).shape) == (2, 1, h, w)


@pytest.mark.parametrize("ratio", [0, 1, 3, 6, 8192, 2.0, True, -4])
def test_a_ratio_must_be_a_power_of_two_in_range(ratio):
    with pytest.raises(ValueError, match="power of two"):
        GradientAutoencoder(ratio)


def test_encode_refuses_sides_that_are_not_multiples():
    model = GradientAutoencoder(16).eval()
    with pytest.raises(ValueError, match="multiples of 16"):
        model.encode(torch.zeros(1, 1, 16, 40))
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\]"):
        model.encode(torch.zeros(1, 2, 16, 16))
    with pytest.raises(ValueError, match="latent"):
        model.decode(torch.zeros(1, 8, 1, 1))


def test_a_lora_block_round_trips_through_its_image_with_b_transposed():
    g = torch.Generator().manual_seed(1)
    block = {"a": torch.randn(4, 48, generator=g), "b": torch.randn(40, 4, generator=g),
             "bias": torch.randn(40, generator=g)}
    lay = layout([(n, tuple(t.shape)) for n, t in block.items()], 16)
    # long sides 48 and 40, once each: the longer wins; 392 elements -> 9 rows -> 16
    assert (lay.width, lay.height, lay.numel, lay.padded) == (48, 16, 392, 16 * 48 - 392)
    assert lay.latent_shape == (16, 1, 3)
    assert [e.transposed for e in lay.entries] == [False, True, False]
    image = to_image(block, lay)
    assert image.shape == (1, 1, 16, 48) and image.dtype == torch.float32
    plane = image[0, 0]
    assert torch.equal(plane[:4], block["a"])  # A (r x d_in) as is: one row per factor vector
    assert torch.equal(plane[4:8, :40].reshape(-1)[:40], block["b"][:, 0])  # B's first column starts row 4
    assert torch.equal(image.reshape(-1)[192:352], block["b"].T.reshape(-1))
    assert torch.equal(image.reshape(-1)[352:392], block["bias"])
    assert not image.reshape(-1)[392:].any()
    back = from_image(image + 0.0, lay)
    assert list(back) == list(block) and all(torch.equal(back[k], block[k]) for k in block)
    assert all(back[k].is_contiguous() for k in back)


def test_layout_widths_rounding_and_the_smallest_image():
    square = layout([("w", (8, 8)), ("s", ())], 4)  # square: transposed; 65 elements
    assert square.entries[0].transposed and (square.width, square.height) == (8, 12)
    flat = layout([("x", (3, 5, 7)), ("y", (10,))], 8)  # no 2-D tensor: width ceil(sqrt(115)) = 11 -> 16
    assert (flat.width, flat.height) == (16, 8)
    tiny = layout([("x", (5,))], 8)  # never a single 8x8 square: that latent (1x1) cannot train BN
    assert (tiny.width, tiny.height, tiny.latent_shape) == (8, 16, (8, 2, 1))
    common = layout([("a", (4, 64)), ("b", (64, 4)), ("c", (4, 100))], 32)  # 64 twice beats 100 once
    assert common.width == 64 and common.height == 32
    with pytest.raises(ValueError, match="nothing"):
        layout([("e", (0, 3))], 4)
    with pytest.raises(ValueError, match="duplicate"):
        layout([("a", (2,)), ("a", (3,))], 4)
    with pytest.raises(ValueError, match="shape"):
        to_image({"a": torch.zeros(4, 60), "b": torch.zeros(64, 4), "c": torch.zeros(4, 100)}, common)
    with pytest.raises(ValueError, match="match"):
        to_image({"a": torch.zeros(4, 64)}, common)


def test_max_scaling_maps_into_tanh_range_and_back():
    x = torch.randn(1, 1, 16, 32) * 3e-3
    s, factor = scale(x, "max")
    assert s.abs().max() == 1.0 and factor == float(x.abs().max())
    assert torch.tensor(factor, dtype=torch.float32).item() == factor  # exactly one float32
    torch.testing.assert_close(unscale(s, factor), x, rtol=1e-6, atol=0)
    zeros = torch.zeros(1, 1, 4, 4)
    assert scale(zeros, "max") == (zeros, 1.0)
    same, one = scale(x, "none")
    assert same is x and one == 1.0 and unscale(x, 1.0) is x
    with pytest.raises(ValueError, match="variant"):
        scale(x, "std")


def test_metrics_over_all_entries_of_a_block():
    a = {"x": torch.tensor([1.0, 0.0]), "y": torch.tensor([[0.0]])}
    b = {"y": torch.tensor([[1.0]]), "x": torch.tensor([1.0, 0.0])}
    assert cosine(a, b) == pytest.approx(1 / math.sqrt(2))
    assert cosine(a, a) == pytest.approx(1.0)
    assert cosine(a, {"x": torch.zeros(2), "y": torch.zeros(1, 1)}) == 0.0
    assert relative_error(b, a) == pytest.approx(1.0)
    assert relative_error(a, a) == 0.0
    assert relative_error(torch.ones(3), torch.zeros(3)) == math.inf
    with pytest.raises(ValueError, match="names"):
        cosine(a, {"x": torch.zeros(2)})


def test_training_with_max_scaling_learns_smooth_low_rank_updates():
    images = synthetic(20)
    state = torch.get_rng_state()
    _, untrained = train_autoencoder(images, 16, variant="max", steps=0, lr=1e-3)
    model, report = train_autoencoder(images, 16, variant="max", steps=200, lr=1e-3, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # seeded on its own generators
    assert not model.training
    assert (report.steps, report.train_images, report.holdout_images) == (200, 16, 4)
    # measured (1/16, 32x64, 200 steps): untrained 0.00; trained 0.75 with 1 thread, 0.72 with 2
    # (rel. error 0.67, 0.70); seeds 1-3 give 0.83-0.89. "none" stays at 0.00 (rel. error 4-40).
    assert abs(untrained.holdout_cosine) < 0.1
    assert report.holdout_cosine > untrained.holdout_cosine + 0.5
    assert report.holdout_rel_error < 0.9 and report.train_mse < untrained.train_mse


def test_training_groups_shapes_and_holds_out_at_least_one():
    images = synthetic(2) + synthetic(1, 64, 32)
    _, report = train_autoencoder(images, 16, variant="none", steps=3, holdout=0.01, batch_size=2)
    assert (report.train_images, report.holdout_images) == (2, 1)
    assert math.isfinite(report.holdout_cosine)
    _, alone = train_autoencoder(images[:1], 16, variant="max", steps=1)
    assert alone.holdout_images == 0 and math.isnan(alone.holdout_mse)
    with pytest.raises(ValueError, match="1x1 latent"):
        train_autoencoder([torch.zeros(1, 16, 16)], 16, variant="max", steps=1)


def test_eval_mode_encode_and_decode_are_deterministic(trained):
    x = scale(synthetic(1)[0][None], "max")[0]
    with torch.no_grad():
        latent = trained.encode(x)
        trained.encode(torch.randn(3, 1, 32, 64))  # eval mode: other inputs leave no trace
        assert torch.equal(trained.encode(x), latent)
        assert torch.equal(trained.decode(latent), trained.decode(latent.clone()))


def test_weights_round_trip_bit_identically(trained, tmp_path):
    path = tmp_path / "ae.safetensors"
    save_weights(trained, path, variant="max", extra={"trained_on": "synthetic"})
    assert read_metadata(path) == {"format": "fedblock-ae/1", "ratio": "16", "variant": "max",
                                   "trained_on": "synthetic"}
    assert len(file_sha256(path)) == 64 and file_sha256(path) == file_sha256(path)
    state = torch.get_rng_state()
    loaded, variant = load_weights(path)
    assert variant == "max" and not loaded.training and loaded.ratio == 16
    assert torch.equal(torch.get_rng_state(), state)
    x = torch.randn(2, 1, 32, 64)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), trained.encode(x))
        assert torch.equal(loaded(x), trained(x))
    with pytest.raises(ValueError, match="may not set"):
        save_weights(trained, path, variant="max", extra={"ratio": "4"})


def test_load_weights_rejects_a_file_that_is_not_exactly_an_autoencoder(trained, tmp_path):
    good = {k: v.contiguous() for k, v in trained.state_dict().items()}
    meta = {"format": "fedblock-ae/1", "ratio": "16", "variant": "max"}
    name = next(k for k, v in good.items() if v.dim() == 4)
    cases = {
        "format": (good, {**meta, "format": "other/1"}),
        "ratio-4": (good, {**meta, "ratio": "4"}),
        "ratio must": (good, {**meta, "ratio": "12"}),
        "bad ratio": (good, {**meta, "ratio": "x"}),
        "variant": (good, {**meta, "variant": "std"}),
        "missing": ({k: v for k, v in good.items() if k != name}, meta),
        "expected": ({**good, name: torch.zeros(1, 1, 1, 1)}, meta),
    }
    for i, (match, (tensors, metadata)) in enumerate(cases.items()):
        path = tmp_path / f"{i}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        with pytest.raises(ValueError, match=match):
            load_weights(path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_weights(junk)


def test_tune_encoder_lowers_its_error_without_touching_the_model(trained):
    x = scale(synthetic(1, seed=7)[0][None], "max")[0]
    before = {k: v.clone() for k, v in trained.state_dict().items()}

    def mse() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(trained(x), x))

    start = mse()
    assert all(torch.equal(v, before[f"encoder.{k}"]) for k, v in tune_encoder(trained, x, 0).items())
    tuned = tune_encoder(trained, x, steps=20, lr=1e-3)
    assert all(torch.equal(v, before[k]) for k, v in trained.state_dict().items())  # not mutated
    assert mse() == start
    assert set(tuned) == set(trained.encoder.state_dict())
    assert all(torch.equal(tuned[k], before[f"encoder.{k}"]) for k in tuned if "running" in k)  # BN stats kept
    saved = encoder_state(trained)
    load_encoder_state(trained, tuned)
    try:
        assert mse() < start
    finally:
        load_encoder_state(trained, saved)
    assert mse() == start
