#!/usr/bin/env python3
"""Writes a tiny TorchScript model made with torch.jit.script, and its signature.json,
into OUT_DIR/<version>/: the format users bring from Python, for the server's tests.

    .venv/bin/python scripts/make_python_model.py OUT_DIR [--version N]

The model takes x: float32 [batch, 4] and returns (x * 2 + 1, x.sum(dim=1, keepdim=True)),
served as signature "serving_default" with input "x" and outputs "y" and "total". It has
no parameters, so every run writes a model that computes exactly the same thing.
"""

import os
import sys
import warnings
from typing import Tuple

# The venv has no numpy, which this script does not need; torch warns about it on import.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torchscript_version import write_version_main  # noqa: E402

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
    return write_version_main(__doc__.split("\n\n")[0], AffineAndSum(), SIGNATURE)


if __name__ == "__main__":
    sys.exit(main())
