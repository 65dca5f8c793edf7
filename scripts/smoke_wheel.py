"""Smoke test of an installed mlmf wheel, run from a fresh venv that holds only the wheel
and its dependencies (`make wheel-smoke`): the package imports from site-packages, the
CPU check passes, and one `infer` on the bundled demo model gives finite vectors.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np

import mlmf
from mlmf import demo
from mlmf._build import jpeg_decoder


def main() -> int:
    where = mlmf.__file__
    if "site-packages" not in where:
        print(f"mlmf imported from {where}, not from an installed wheel", file=sys.stderr)
        return 1
    print(f"mlmf {mlmf.__version__} from {where}")
    print(f"JPEG decoder: {jpeg_decoder()}")
    print(f"built for: {', '.join(mlmf.TARGET_FEATURES)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, name, trained = demo.load(True)
    scenes = demo.held_out()[:2]
    out = model.infer(**demo.inputs(scenes))
    fused = np.asarray(out.fused)
    if fused.shape[0] != 2 or not np.isfinite(fused).all():
        print(f"bad fused output: shape {fused.shape}", file=sys.stderr)
        return 1
    print(f"infer on the demo model ({name}, trained={trained}): fused {fused.shape}")
    print(f"captions: {[s.caption for s in scenes]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
