"""``python -m opd_kernels``: versions and which backends can run here (and why the others cannot)."""
import platform
import sys

import torch

from . import __version__
from .backends import available


def main() -> int:
    print(f"opd_kernels {__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__}  "
          f"(CUDA build: {torch.version.cuda or 'no'}; CUDA device: {torch.cuda.is_available()})")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except Exception as e:  # noqa: BLE001 - report any import failure verbatim
        print(f"triton: not importable ({type(e).__name__}: {e})")
    print("backends:")
    for name, (ok, reason) in available().items():
        print(f"  {name:9s} {'available' if ok else 'unavailable'}{'' if ok else ': ' + reason}")
    namespace = torch.ops.opd
    ops = [op for op in dir(namespace) if isinstance(getattr(namespace, op, None), torch._ops.OpOverloadPacket)]
    print(f"torch.ops.opd: {', '.join(sorted(ops)) if ops else '(no compiled ops registered)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
