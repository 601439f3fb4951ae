"""What the scripts that write test models share: the command line (OUT_DIR
[--version N]) and writing one version folder, OUT_DIR/<version>/{model.pt,
signature.json}, atomically (written beside it, then renamed into place, so a watcher
never sees half a version). Imported by make_python_model.py and make_fault_model.py.
"""

import argparse
import json
import os
import sys
import tempfile


def write_version_main(description: str, module, signature: dict) -> int:
    """Parses OUT_DIR [--version N] and writes `module` (scripted) with `signature`;
    returns the process exit code."""
    import torch

    parser = argparse.ArgumentParser(description=description)
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
    tmp = tempfile.mkdtemp(prefix=f".tmp-{args.version}-", dir=args.out_dir)
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the version from a server run as another user
    torch.jit.script(module).save(os.path.join(tmp, "model.pt"))
    with open(os.path.join(tmp, "signature.json"), "w") as f:
        json.dump(signature, f, indent=2)
        f.write("\n")
    os.rename(tmp, target)
    print(f"wrote {target}")
    return 0
