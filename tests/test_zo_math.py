"""Zeroth-order math (common/zo.py): the sign generator, DeComFL and FedSPZO estimators and updates,
the split forward and its layer counts."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from fedblock.common import blocks as B  # noqa: E402
from fedblock.common import zo  # noqa: E402
from fedblock.common.data import IGNORE_INDEX  # noqa: E402
from fedblock.common.models import load_model, make_tiny_model  # noqa: E402
from fedblock.common.training import causal_lm_loss  # noqa: E402

# signs(seed=1, direction=0, index=0, numel=64), '+' for +1: recorded once, so that any change to the
# generator (which would break replays against peers running the old one) fails here.
GOLDEN_1_0_0 = "++++--+-+-+--+++--++-++-++++--++-++--+-+-+-+++-+++-+-+-++--+++--"


# ---- an independent re-implementation of the documented generator (plain Python ints) ------------

M = 0xFFFFFFFF


def ref_mix32(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M
    x ^= x >> 15
    x = (x * 0x846CA68B) & M
    return x ^ (x >> 16)


def ref_signs(seed, direction, index, numel):
    k = ref_mix32((seed + 0x9E3779B9) & M)
    k = ref_mix32(k ^ direction)
    k = ref_mix32(k ^ index)
    out = []
    for e in range(numel):
        word = ref_mix32(ref_mix32((e // 32) ^ k) ^ k)
        out.append(2 * ((word >> (e % 32)) & 1) - 1)
    return out


def test_signs_golden_values_and_documented_algorithm():
    z = zo.signs(seed=1, direction=0, index=0, numel=64)
    assert z.dtype == torch.float32 and z.shape == (64,)
    assert "".join("+" if v > 0 else "-" for v in z.tolist()) == GOLDEN_1_0_0
    for key in [(1, 0, 0), (0, 0, 0), (2**32 - 1, 7, 123), (12345, 2**32 - 1, 2**31)]:
        assert zo.signs(*key, 100).tolist() == ref_signs(*key, 100)
    with pytest.raises(ValueError):
        zo.signs(2**32, 0, 0, 4)
    with pytest.raises(ValueError):
        zo.signs(0, -1, 0, 4)


def test_signs_identical_across_dtypes_and_chunkings(monkeypatch):
    key = (7, 3, 5)
    ref = zo.signs(*key, 1000)
    assert set(ref.unique().tolist()) == {-1.0, 1.0}
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert torch.equal(zo.signs(*key, 1000, dtype=dtype).float(), ref)
    monkeypatch.setattr(zo, "CHUNK", 64)  # 1000 elements now span 16 chunks, the last one partial
    assert torch.equal(zo.signs(*key, 1000), ref)
    p = torch.zeros(1000)
    zo.add_direction_(p, *key, scale=1.0)
    assert torch.equal(p, ref)
    monkeypatch.setattr(zo, "CHUNK", 48)
    with pytest.raises(ValueError, match="multiple of 32"):
        zo.signs(*key, 100)


def test_signs_balanced_and_streams_uncorrelated():
    n = 1_000_000
    z = zo.signs(1, 0, 0, n, dtype=torch.float64)
    assert abs(z.mean().item()) < 0.01
    for other in [(2, 0, 0), (1, 1, 0), (1, 0, 1), (0, 1, 0)]:
        corr = (z * zo.signs(*other, n, dtype=torch.float64)).mean().item()
        assert abs(corr) < 0.01, (other, corr)


def test_f32_rounds_to_float32():
    assert zo.f32(0.1) == torch.tensor(0.1, dtype=torch.float32).item() != 0.1
    assert zo.f32(zo.f32(1e-3)) == zo.f32(1e-3)
    assert zo.f32(-2.5) == -2.5
    assert zo.f32(1e300) == float("inf")


def test_add_direction_single_rounding_and_dtypes():
    torch.manual_seed(0)
    p = torch.randn(3, 50)
    before = p.clone()
    zo.add_direction_(p, 4, 2, 9, 0.1)
    z = zo.signs(4, 2, 9, 150, dtype=torch.float64).view(3, 50)
    expected = (before.double() + zo.f32(0.1) * z).float()  # exact sum, rounded once to float32
    assert torch.equal(p, expected)
    # 16-bit: the float32 sum, rounded to the dtype (torch's own bfloat16 add_ would round 0.1 to bfloat16
    # first on CPU but not on CUDA)
    for dtype in (torch.bfloat16, torch.float16):
        q = before.to(dtype)
        zo.add_direction_(q, 4, 2, 9, 0.1)
        assert torch.equal(q, (before.to(dtype).float() + zo.f32(0.1) * z.float()).to(dtype))
    r = before.double()
    zo.add_direction_(r, 4, 2, 9, 0.1)
    assert torch.equal(r, before.double() + zo.f32(0.1) * z)
    leaf = nn.Parameter(torch.zeros(10))  # a leaf that requires grad: updated in place all the same
    zo.add_direction_(leaf, 1, 0, 0, 2.0)
    assert torch.equal(leaf.detach(), 2 * zo.signs(1, 0, 0, 10))
    with pytest.raises(ValueError, match="contiguous"):
        zo.add_direction_(torch.zeros(4, 6).t(), 1, 0, 0, 1.0)


def test_apply_equals_replay_and_replay_order_does_not_matter():
    torch.manual_seed(1)
    params = [torch.randn(37), torch.randn(5, 8), torch.randn(200).to(torch.bfloat16)]
    scalars = [0.7, -1.3, 2.1, 0.05]
    applied = [p.clone() for p in params]
    zo.apply_(applied, 11, scalars, lr=0.01)
    steps = zo.steps_for(11, scalars, lr=0.01)
    assert steps == [(11, d, zo.f32(0.01 * g / 4)) for d, g in enumerate(scalars)]
    by_param = [p.clone() for p in params]
    for i, p in enumerate(by_param):  # parameter outer, steps inner
        zo.replay_(p, i, steps)
    by_step = [p.clone() for p in params]
    for step in steps:  # step outer, parameters inner
        for i, p in enumerate(by_step):
            zo.replay_(p, i, [step])
    for a, b, c, p in zip(applied, by_param, by_step, params, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c) and not torch.equal(a, p)
    # apply_ really is x -= lr/P * sum g_p z_p (up to float32 rounding)
    z = zo.signs(11, 2, 0, 37, dtype=torch.float64)
    one = params[0].clone()
    zo.apply_([one], 11, [0.0, 0.0, 3.0, 0.0], lr=0.5)
    assert torch.allclose(one.double(), params[0].double() - 0.5 / 4 * 3.0 * z, atol=1e-6)


class Quadratic(nn.Module):
    """loss = 0.5 ||w - t||^2 with a float64 w: the directional derivative along z is z·(w - t)."""

    def __init__(self, d=50):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))
        self.t = torch.randn(d, generator=g, dtype=torch.float64)


def quadratic_loss(model, _batch):
    return 0.5 * ((model.w - model.t) ** 2).sum(), 1


def test_decomfl_estimate_on_a_known_loss():
    model = Quadratic().eval()
    w0 = model.w.detach().clone()
    settings = zo.ZOSettings(perturbations=6, mu=1e-3)
    grads, loss = zo.estimate(model, [model.w], None, seed=5, settings=settings, loss_fn=quadratic_loss)
    exact = [(zo.signs(5, p, 0, 50, dtype=torch.float64) @ (w0 - model.t)).item() for p in range(6)]
    assert len(grads) == 6
    for g, e in zip(grads, exact, strict=True):
        assert abs(g - e) <= 1e-3 * abs(e)
    assert (model.w.detach() - w0).abs().max().item() < 1e-6
    mu = zo.f32(1e-3)  # mean of L(w ± mu z) = L(w) + mu²d/2
    assert abs(loss - (quadratic_loss(model, None)[0].item() + mu * mu * 50 / 2)) < 1e-9

    forward = zo.ZOSettings(perturbations=6, mu=1e-3, estimator="forward")
    grads, loss = zo.estimate(model, [model.w], None, seed=5, settings=forward, loss_fn=quadratic_loss)
    for g, e in zip(grads, exact, strict=True):  # one-sided: biased by mu/2 z·z = mu d/2
        assert abs(g - (e + mu * 50 / 2)) <= 1e-3 * abs(e)
    assert loss == quadratic_loss(model, None)[0].item()
    with pytest.raises(ValueError, match="eval"):
        zo.estimate(model.train(), [model.w], None, 5, settings, quadratic_loss)


# ---- tiny Hugging Face models ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            folder = make_tiny_model(tmp_path_factory.mktemp(family) / family, family, seed=0, num_layers=4,
                                     hidden_size=32)
            made[family] = load_model(folder).eval()
        return made[family]

    return get


def make_batch(pad=True):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX  # a prompt the loss skips
    if pad:  # right-padded second row
        mask[1, 7:] = 0
        labels[1, 7:] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def split_params(model, split):
    """Block 1: embed (tied head included) and layers[:split]; block 2: layers[split:] and head."""
    first, second = [], []
    for block in B.partition(model):
        params = list(B.block_params(model, block).values())
        later = block.name == B.HEAD or (block.name.startswith("layers.") and int(block.name[7:]) >= split)
        (second if later else first).extend(params)
    return first, second


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_split_forward_equals_full_forward(tiny, family):
    model = tiny(family)
    batch = make_batch()
    full = causal_lm_loss(model, batch)[0].item()
    for split in (1, 2, 3):
        halves = zo.SplitForward(model, split, causal_lm_loss)
        captured = halves.first(batch)
        loss, n = halves.second(captured, batch)
        assert abs(loss.item() - full) < 1e-6 and n == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    # second() really starts from the captured hidden states: changing a block-1 layer afterwards
    # changes nothing, and the layer list is restored.
    _, layers = B.find_decoder_layers(model)
    before = list(layers)
    halves = zo.SplitForward(model, 2, causal_lm_loss)
    captured = halves.first(batch)
    saved = [p.detach().clone() for p in layers[0].parameters()]
    with torch.no_grad():
        for p in layers[0].parameters():
            p.mul_(3.0).add_(0.5)
    try:
        assert abs(halves.second(captured, batch)[0].item() - full) < 1e-6
        assert abs(causal_lm_loss(model, batch)[0].item() - full) > 1e-3
    finally:
        with torch.no_grad():
            for p, s in zip(layers[0].parameters(), saved, strict=True):
                p.copy_(s)
    assert list(layers) == before
    for bad in (0, 4):
        with pytest.raises(ValueError, match="split"):
            zo.SplitForward(model, bad, causal_lm_loss)


class DirectCalls(nn.Module):
    """A model whose forward bypasses its layers' __call__ (so no hooks run): cannot be split."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x


def test_split_forward_refuses_a_model_it_cannot_split():
    model = DirectCalls().eval()

    def loss_fn(m, batch):
        return m(batch).square().mean(), 1

    with pytest.raises(ValueError, match="never called decoder layer"):
        zo.SplitForward(model, 1, loss_fn).first(torch.ones(2, 4))


def test_spzo_scalars_are_joint_central_derivatives(tiny):
    model = tiny("llama")
    batch = make_batch()
    split, P1, P2, seed = 2, 2, 3, 9
    mu = zo.f32(1e-2)
    params1, params2 = split_params(model, split)
    start = [p.detach().clone() for p in params1 + params2]
    grads, loss = zo.spzo_estimate(model, split, params1, params2, batch, seed, P1, P2, mu, causal_lm_loss)
    assert len(grads) == P1 * P2
    assert max((p.detach() - s).abs().max().item() for p, s in zip(params1 + params2, start, strict=True)) < 1e-6

    n1 = len(params1)
    losses = []
    for i in range(P1):
        for j in range(P2):
            def move(scale, i=i, j=j):
                zo.perturb_(params1, seed, i, scale)
                zo.perturb_(params2, seed, i * P2 + j, scale, first_index=n1)

            move(mu)
            plus = causal_lm_loss(model, batch)[0].item()
            move(-2 * mu)
            minus = causal_lm_loss(model, batch)[0].item()
            move(mu)
            losses += [plus, minus]
            g = grads[i * P2 + j]
            assert abs(g - (plus - minus) / (2 * mu)) < 1e-4 * max(1.0, abs(g)), (i, j)
    assert abs(loss - sum(losses) / len(losses)) < 1e-6
    assert any(abs(g) > 1e-3 for g in grads)

    # no trained tokens: nothing to estimate, and no error
    empty = dict(batch, labels=torch.full_like(batch["labels"], IGNORE_INDEX))
    assert zo.spzo_estimate(model, split, params1, params2, empty, seed, 1, 2, mu, causal_lm_loss)[0] == [0.0, 0.0]


def test_spzo_steps_and_apply():
    P1, P2, lr = 2, 3, 0.1
    scalars = [0.5, -1.0, 2.0, 0.25, 0.75, -0.5]
    steps = zo.spzo_steps(4, scalars, lr, P1, P2, n1=2, n2=1)
    assert len(steps) == 3 and steps[0] == steps[1]
    assert steps[0] == [(4, 0, zo.f32(lr / 2 * (1.5 / 3))), (4, 1, zo.f32(lr / 2 * (0.5 / 3)))]
    assert steps[2] == [(4, d, zo.f32(lr / 6 * g)) for d, g in enumerate(scalars)]
    torch.manual_seed(2)
    params1, params2 = [torch.randn(40), torch.randn(3, 3)], [torch.randn(70)]
    applied = [p.clone() for p in params1 + params2]
    zo.spzo_apply_(applied[:2], applied[2:], 4, scalars, lr, P1, P2)
    replayed = [p.clone() for p in params1 + params2]
    for k, p in enumerate(replayed):
        zo.replay_(p, k, steps[k])
    assert all(torch.equal(a, r) for a, r in zip(applied, replayed, strict=True))
    assert not torch.equal(applied[0], params1[0])
    with pytest.raises(ValueError):
        zo.spzo_steps(4, scalars[:5], lr, P1, P2, 2, 1)


def test_layer_counts_of_one_step(tiny):
    model = tiny("llama")
    batch = make_batch()
    params1, params2 = split_params(model, 3)
    mu = 1e-3
    zo.spzo_estimate(model, 3, params1, params2, batch, 0, 1, 1, mu, causal_lm_loss)  # one-time priming
    with zo.LayerCounter(model) as counter:
        zo.spzo_estimate(model, 3, params1, params2, batch, 0, 1, 8, mu, causal_lm_loss)
    assert counter.count == 22 == zo.layer_evaluations("fedspzo", 4, 3, P1=1, P2=8)
    params = params1 + params2
    with zo.LayerCounter(model) as counter:
        zo.estimate(model, params, batch, 0, zo.ZOSettings(perturbations=8), causal_lm_loss)
    assert counter.count == 64 == zo.layer_evaluations("decomfl", 4, 0, P=8)
    with zo.LayerCounter(model) as counter:
        zo.estimate(model, params, batch, 0, zo.ZOSettings(perturbations=8, estimator="forward"), causal_lm_loss)
    assert counter.count == 36 == zo.layer_evaluations("decomfl", 4, 0, P=8, estimator="forward")
    with zo.LayerCounter(model) as counter:  # hooks are gone after the block
        pass
    causal_lm_loss(model, batch)
    assert counter.count == 0


def test_default_split():
    assert zo.default_split(30, 1, 8) == 18
    assert zo.layer_evaluations("fedspzo", 30, 18, P1=1, P2=8) * 2 <= zo.layer_evaluations("decomfl", 30, 0, P=8)
    assert zo.layer_evaluations("fedspzo", 30, 17, P1=1, P2=8) * 2 > zo.layer_evaluations("decomfl", 30, 0, P=8)
    assert zo.default_split(4, 1, 1) == 3  # P2 = 1 never halves the cost
    with pytest.raises(ValueError):
        zo.layer_evaluations("mezo", 4, 1)
