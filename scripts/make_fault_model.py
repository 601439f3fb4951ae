#!/usr/bin/env python3
"""Writes a TorchScript model that misbehaves on purpose, and its signature.json, into
OUT_DIR/<version>/: for the tests of how the worker copes with a model that fails or
stalls on some inputs.

    .venv/bin/python scripts/make_fault_model.py OUT_DIR [--version N]

The model takes x: float32 [batch, 4] and returns y = x * 2 + 1 (signature
"serving_default", input "x", output "y"), except on two markers in a row's first value:
- RAISE_MARKER (-999): it raises RuntimeError("fault model: input row holds the raise
  marker -999"), so the whole forward pass fails with that message;
- LOOP_MARKER (-777): it first runs a busy loop of `x[row, 1] * 10000` rounds of a small
  matrix product (bounded by that count, so it always ends), then answers as usual. A
  test picks the count that keeps a forward pass busy for a few seconds: one unit
  (10,000 rounds) took about 12 ms on a 2-core VM.
Zeros (the worker's warm-up) hit neither marker. The model has no parameters, so every
run writes a model that computes exactly the same thing.
"""

import os
import sys
import warnings

# The venv has no numpy, which this script does not need; torch warns about it on import.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torchscript_version import write_version_main  # noqa: E402

RAISE_MARKER = -999.0
LOOP_MARKER = -777.0

SIGNATURE = {
    "signatures": {
        "serving_default": {
            "method": "forward",
            "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 4]}],
        }
    }
}


class Faulty(torch.nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        first = x[:, 0]
        if bool((first == -999.0).any()):
            raise RuntimeError("fault model: input row holds the raise marker -999")
        looping = first == -777.0
        if bool(looping.any()):
            rounds = int(x[looping][:, 1].max().item()) * 10000
            m = torch.full((64, 64), 1e-3)
            acc = torch.zeros(64, 64)
            for _ in range(rounds):
                acc = acc + m @ m
            # Tied to the answer so the loop cannot be optimised away; adds exactly 0.
            return x * 2.0 + 1.0 + acc.sum() * 0.0
        return x * 2.0 + 1.0


def main() -> int:
    return write_version_main(__doc__.split("\n\n")[0], Faulty(), SIGNATURE)


if __name__ == "__main__":
    sys.exit(main())
