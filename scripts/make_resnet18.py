#!/usr/bin/env python3
"""Writes torchvision's ResNet-18 (random weights, nothing downloaded) as TorchScript, with
its signature.json, into OUT_DIR/<version>/: the larger model of `make bench`.

    .venv/bin/python scripts/make_resnet18.py OUT_DIR [--version N] [--seed S]

Signature "serving_default": input "input" float32 [-1, 3, 224, 224], output "logits"
float32 [-1, 1000]. Needs torchvision 0.26.0 (the release paired with torch 2.11.0);
scripts/bench.sh installs it into the venv if it is missing.
"""

import argparse
import json
import os
import sys
import tempfile

import torch

try:
    import torchvision
except ImportError as e:  # pragma: no cover - a message instead of a traceback
    sys.exit(
        f"make_resnet18.py: cannot import torchvision ({e}); "
        "install it: .venv/bin/pip install --no-deps torchvision==0.26.0 (scripts/bench.sh does)"
    )

SIGNATURE = {
    "signatures": {
        "serving_default": {
            "method": "forward",
            "inputs": [{"name": "input", "dtype": "float32", "shape": [-1, 3, 224, 224]}],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, 1000]}],
        }
    }
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder that holds the model's version folders")
    parser.add_argument("--version", type=int, default=1, help="version number (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args()
    if args.version < 1:
        parser.error(f"--version is {args.version}; a version is a positive integer")

    torch.manual_seed(args.seed)
    model = torchvision.models.resnet18(weights=None).eval()
    scripted = torch.jit.script(model)
    with torch.no_grad():
        out = scripted(torch.rand(2, 3, 224, 224))
    if tuple(out.shape) != (2, 1000):
        sys.exit(f"make_resnet18.py: the model answered shape {tuple(out.shape)}, not (2, 1000)")

    # Write into a temporary folder beside the target, then rename: a poller never sees a
    # half-written version.
    os.makedirs(args.out_dir, exist_ok=True)
    final = os.path.join(args.out_dir, str(args.version))
    if os.path.exists(final):
        sys.exit(f"make_resnet18.py: {final} exists already; remove it first")
    tmp = tempfile.mkdtemp(prefix=".resnet18-", dir=args.out_dir)
    os.chmod(tmp, 0o755)
    scripted.save(os.path.join(tmp, "model.pt"))
    with open(os.path.join(tmp, "signature.json"), "w", encoding="utf-8") as f:
        json.dump(SIGNATURE, f, indent=2)
        f.write("\n")
    os.rename(tmp, final)
    print(f"wrote ResNet-18 (torchvision {torchvision.__version__}, random weights) to {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
