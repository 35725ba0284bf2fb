"""CountMatmuls: how many matrix products the ops inside a ``with`` block dispatch (mm, addmm, bmm).

Used to check that a fused pass runs the GEMMs it claims, e.g. the 3 of the floor in a fused loss's
forward and none in its backward.
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))
