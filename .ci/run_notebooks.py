"""Execute every notebook in place at this machine's default scale and store the outputs.

    python .ci/run_notebooks.py notebooks [NAME ...]

Outputs are committed so that learners see results before running anything; this checks
that no machine path leaks into them and that each file stays under 5 MB.
"""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

MAX_BYTES = 5 * 1024 * 1024
PATH_RE = re.compile(r"(/work/|/root/|/home/[^/\s]+/|/Users/[^/\s]+/|/tmp/|/content/)")


def run(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    t0 = time.time()
    NotebookClient(nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    for cell in nb.cells:  # keep diffs small: no execution timestamps
        cell.get("metadata", {}).pop("execution", None)
    outputs = "\n".join(nbformat.writes(nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(outputs=c.get("outputs", [])) for c in nb.cells if c.cell_type == "code"])).splitlines())
    leaks = sorted(set(m.group(0) for m in PATH_RE.finditer(outputs)))
    if leaks:
        print(f"  WARNING {path.name}: machine paths in outputs: {leaks[:5]}")
    nbformat.write(nb, path)
    size = path.stat().st_size
    print(f"  {path.name}: {time.time() - t0:.0f} s, {size / 1e6:.2f} MB")
    if size > MAX_BYTES:
        raise SystemExit(f"{path}: {size / 1e6:.1f} MB is over the 5 MB limit")


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "notebooks")
    names = sys.argv[2:]
    paths = sorted(p for p in folder.glob("*.ipynb") if not names or p.stem in names or p.name in names)
    os.environ.pop("CI", None)
    # Stored outputs show the static figures: a widget saved without its kernel shows nothing on GitHub.
    os.environ["MUSICGEN_LITE_NO_WIDGETS"] = "1"
    print(f"executing {len(paths)} notebooks (scale: {os.environ.get('MUSICGEN_LITE_SCALE', 'machine default')})")
    for p in paths:
        run(p)


if __name__ == "__main__":
    main()
