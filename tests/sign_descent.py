"""A federated algorithm from outside fedblock, for tests of the algorithm seam (test_algorithm_seam.py).

Sign-of-delta block descent: the workers run fedbcd's local AdamW steps unchanged; the coordinator
moves each updated block by a fixed server step in the direction of the sign of the mean delta,
g <- g + SERVER_LR * sign(mean delta), so every element moves by -SERVER_LR, 0 or +SERVER_LR per round.
Nothing in fedblock is changed for it: runs name it as `sign_descent:SignDescent` (the tests folder is
on sys.path under pytest).
"""

from __future__ import annotations

import torch

from fedblock.common.algorithms.blockwise import BlockDescent


class SignDescent(BlockDescent):
    name = "sign-descent"
    summary = "fedbcd whose server step is a fixed step along the sign of the mean delta"
    server_lr = 1e-3

    def step(self, block, mean, lr):
        return {n: (g.float() + self.server_lr * torch.sign(mean[n])).to(g.dtype) for n, g in block.items()}

    def close(self, plan, model):
        return {b: self.step(model[b], plan.sums.mean(b), plan.lr) for b in plan.sums.blocks}
