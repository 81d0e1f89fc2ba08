"""Token-bucket link limits, alone and on a real upload."""

import time

import pytest

from fedblock.common.ratelimit import TokenBucket


class FakeTime:
    def __init__(self):
        self.now = 0.0

    def clock(self):
        return self.now

    def sleep(self, s):
        self.now += s


def test_long_run_rate_is_exact_for_any_chunk_size():
    for chunk in (1000, 65536, 1 << 20):
        t = FakeTime()
        bucket = TokenBucket(1_000_000, clock=t.clock, sleep=t.sleep)
        sent = 0
        while sent < 10_000_000:
            bucket.consume(chunk)
            sent += chunk
        # 10 MB at 1 MB/s, minus the initial burst credit (64 KiB)
        assert t.now == pytest.approx((sent - 65536) / 1e6, abs=1e-6)


def test_idle_time_does_not_bank_more_than_the_burst():
    t = FakeTime()
    bucket = TokenBucket(1_000_000, burst=100_000, clock=t.clock, sleep=t.sleep)
    t.now = 1000.0  # a long idle period
    assert bucket.consume(100_000) == 0
    assert bucket.consume(500_000) == pytest.approx(0.5)


def test_unlimited_and_bad_rates():
    assert TokenBucket(0).consume(10**9) == 0
    with pytest.raises(ValueError):
        TokenBucket(-1)


def test_upload_rate_limit_paces_a_real_upload(federation):
    import threading

    from fedblock.client.session import Session
    from fedblock.common import wire
    from fedblock.common.codecs import CodecPipeline
    from fedblock.common.messages import Assignment

    fed = federation(rounds=1, chunk_size=64 * 1024, train_blocks="embed")
    runner = threading.Thread(target=fed.run, daemon=True)
    session = Session(fed.address, "slow", upload_rate=1_000_000)
    session.join(num_examples=1, device="cpu", timeout=10)
    events = session.events()
    runner.start()
    next(e for e in events if isinstance(e, Assignment))
    delta = {t.name: t.shape for t in fed.coordinator.specs["embed"].tensors}
    import torch

    manifest, blob = wire.pack("embed", {n: torch.zeros(s) for n, s in delta.items()}, CodecPipeline("none"),
                               round=1, base_version=0, chunk_size=64 * 1024, num_tokens=1)
    t0 = time.monotonic()
    assert session.upload(manifest, blob) == "accepted"
    elapsed = time.monotonic() - t0
    expected = (len(blob) - 65536) / 1e6
    assert expected > 0.05 and expected * 0.95 <= elapsed <= expected * 1.5 + 0.2
    runner.join(30)
    session.close()
