#!/usr/bin/env python3
"""Writes a tiny TorchScript model made with torch.jit.script, and its signature.json,
into OUT_DIR/<version>/: the format users bring from Python, for the server's tests.

    .venv/bin/python scripts/make_python_model.py OUT_DIR [--version N]

The model takes x: float32 [batch, 4] and returns (x * 2 + 1, x.sum(dim=1, keepdim=True)),
served as signature "serving_default" with input "x" and outputs "y" and "total". It has
no parameters, so every run writes a model that computes exactly the same thing.
"""

import argparse
import json
import os
import sys
import tempfile
import warnings
from typing import Tuple

# The venv has no numpy, which this script does not need; torch warns about it on import.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

SIGNATURE = {
    "signatures": {
        "serving_default": {
            "method": "forward",
            "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
            "outputs": [
                {"name": "y", "dtype": "float32", "shape": [-1, 4]},
                {"name": "total", "dtype": "float32", "shape": [-1, 1]},
            ],
        }
    }
}


class AffineAndSum(torch.nn.Module):
    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return x * 2.0 + 1.0, x.sum(dim=1, keepdim=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder that holds the model's version folders")
    parser.add_argument("--version", type=int, default=1, help="version number (default 1)")
    args = parser.parse_args()
    if args.version < 1:
        parser.error(f"--version is {args.version}; a version is a positive integer")

    target = os.path.join(args.out_dir, str(args.version))
    if os.path.exists(target):
        print(f"error: {target} already exists; refusing to overwrite it", file=sys.stderr)
        return 1
    os.makedirs(args.out_dir, exist_ok=True)
    # Written beside the target and renamed into place, so a watcher never sees half a version.
    tmp = tempfile.mkdtemp(prefix=f".tmp-{args.version}-", dir=args.out_dir)
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the version from a server run as another user
    torch.jit.script(AffineAndSum()).save(os.path.join(tmp, "model.pt"))
    with open(os.path.join(tmp, "signature.json"), "w") as f:
        json.dump(SIGNATURE, f, indent=2)
        f.write("\n")
    os.rename(tmp, target)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
