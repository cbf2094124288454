"""Make `import torchaudio` work beside a CPU build of torch.

The torchaudio wheels on PyPI for Linux x86_64 are CUDA builds. Beside a CPU torch their
compiled extension libraries (torchaudio/lib/*.so) fail to load and take `import torchaudio`
down with them. Without those libraries the pure-PyTorch parts we use (transforms,
functional, resampling) work. So: if the import fails *and* torch is a CPU build, move the
libraries aside and check again. On a CUDA torch nothing is touched.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

QUIET = "--quiet" in sys.argv


def _imports() -> tuple[bool, str]:
    proc = subprocess.run(
        [sys.executable, "-c", "import torchaudio, torchaudio.transforms, torchaudio.functional"],
        capture_output=True, text=True,
    )
    return proc.returncode == 0, proc.stderr.strip().splitlines()[-1:] and proc.stderr.strip().splitlines()[-1] or ""


def main() -> int:
    spec = importlib.util.find_spec("torchaudio")
    if spec is None or spec.origin is None:
        print("[setup] torchaudio is not installed", file=sys.stderr)
        return 1
    ok, err = _imports()
    if ok:
        if not QUIET:
            print("[setup] torchaudio imports fine")
        return 0
    import torch

    if torch.version.cuda is not None or torch.version.hip is not None:
        print(f"[setup] WARNING: torchaudio fails to import beside CUDA torch {torch.__version__}: {err}\n"
              "[setup]   Nothing was changed. Install the torchaudio build that matches your torch.",
              file=sys.stderr)
        return 0
    lib_dir = Path(spec.origin).parent / "lib"
    moved = 0
    for so in sorted(lib_dir.glob("*.so")):
        so.rename(so.with_name(so.name + ".disabled"))
        moved += 1
    ok, err = _imports()
    if not ok:
        print(f"[setup] ERROR: torchaudio still fails to import after disabling {moved} libs: {err}", file=sys.stderr)
        return 1
    print(f"[setup] torchaudio repaired for CPU torch {torch.__version__}: disabled {moved} compiled libs "
          "(pure-PyTorch transforms/functional/resample remain)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
