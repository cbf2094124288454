"""The setup a newcomer runs: one dependency list in two files, the two commands, the CLI."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# conda-forge spells a few packages differently from PyPI
CONDA_TO_PYPI = {"pytorch": "torch", "pysoundfile": "soundfile"}
CONDA_ONLY = {"python", "pip", "ffmpeg", "fluidsynth"}  # system parts that pip does not install


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject_packages() -> set[str]:
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = proj["dependencies"] + [r for extra in proj["optional-dependencies"].values() for r in extra]
    return {_name(r) for r in reqs}


def test_environment_yml_lists_the_same_packages_as_pyproject():
    text = (ROOT / "environment.yml").read_text()
    deps = text.split("dependencies:", 1)[1]
    names = set()
    for line in deps.splitlines():
        s = line.strip()
        if s.startswith("- ") and not s.startswith("- pip:") and not s.startswith("- -e"):
            n = _name(s[2:])
            names.add(CONDA_TO_PYPI.get(n, n))
    assert names - CONDA_ONLY == _pyproject_packages()


def test_torch_is_pinned_first_in_setup():
    setup = (ROOT / ".ci" / "setup.sh").read_text()
    assert re.search(r"TORCH_VERSION=\$\{TORCH_VERSION:-\d+\.\d+\.\d+\}", setup)
    assert setup.index('"torch==$TORCH_VERSION"') < setup.index("--no-deps \"torchaudio==") < setup.rindex('-e ".[dev]"')
    assert "--no-deps" in setup


def test_readme_gives_the_two_commands_and_ci_calls_them():
    readme = (ROOT / "README.md").read_text()
    assert "make lab" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("setup", "lab", "test", "demo", "notebooks"):
        assert re.search(rf"^{target}:", makefile, re.M), target


def test_torchaudio_imports_with_its_pure_pytorch_parts():
    import torch
    import torchaudio.functional as AF
    import torchaudio.transforms as T

    x = torch.randn(1, 16_000)
    assert AF.resample(x, 16_000, 8_000).shape == (1, 8_000)
    assert T.MelSpectrogram(16_000, n_mels=40)(x).shape[1] == 40


def test_repair_script_leaves_a_working_torchaudio_alone():
    out = subprocess.run([sys.executable, str(ROOT / ".ci" / "repair_torchaudio.py")], capture_output=True, text=True)
    assert out.returncode == 0 and "imports fine" in out.stdout


@pytest.mark.parametrize("args", [["--help"], ["data", "make", "--help"], ["data", "manifest", "--help"],
                                  ["demo", "--help"], ["bench", "--help"],
                                  ["train", "codec", "--help"], ["train", "lm", "--help"], ["train", "tagger", "--help"], ["tokenize", "--help"],
                                  ["study", "--help"]])
def test_cli_help(args):
    out = subprocess.run([sys.executable, "-m", "musicgen_lite.cli", *args], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: musicgen-lite" in out.stdout


def test_cli_errors_are_clear(tmp_path):
    out = subprocess.run([sys.executable, "-m", "musicgen_lite.cli", "data", "manifest", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "no audio files found" in out.stderr and "Traceback" not in out.stderr


def test_cli_data_make_and_demo(tmp_path):
    from musicgen_lite.cli import main

    assert main(["data", "make", str(tmp_path / "d"), "--n", "2", "--seconds", "1", "--workers", "1"]) == 0
    assert len((tmp_path / "d" / "data.jsonl").read_text().splitlines()) == 2
    from musicgen_lite.demo import DEMO_CAPTIONS
    from musicgen_lite.hub import default_model_path

    assert main(["demo", "--out", str(tmp_path / "demo"), "--n", "2", "--seconds", "1.5"]) == 0
    generated = len(DEMO_CAPTIONS) if (default_model_path() / "config.json").is_file() else 0  # the shipped model plays
    assert sorted(p.suffix for p in (tmp_path / "demo").iterdir()) == (
        [".json"] * 2 + [".md"] + [".png"] * (2 + generated) + [".wav"] * (2 + generated))
    assert len(list((tmp_path / "demo").glob("gen_*.wav"))) == generated


@pytest.mark.parametrize("cuda", [None, "13.0"])
def test_repair_script_on_a_broken_torchaudio(tmp_path, cuda):
    """A fake torchaudio whose compiled libs fail to load: fixed beside a CPU torch, untouched beside CUDA."""
    pkgs = tmp_path / "site"
    ta = pkgs / "torchaudio"
    (ta / "lib").mkdir(parents=True)
    (ta / "__init__.py").write_text(
        "import glob, os\n"
        "if glob.glob(os.path.join(os.path.dirname(__file__), 'lib', '*.so')):\n"
        "    raise OSError('libtorchaudio.so: undefined symbol: _ZN3c10')\n")
    (ta / "transforms.py").write_text("")
    (ta / "functional.py").write_text("")
    for name in ("libtorchaudio.so", "libctc_prefix_decoder.so"):
        (ta / "lib" / name).write_bytes(b"\x7fELF")
    (pkgs / "torch").mkdir()
    (pkgs / "torch" / "__init__.py").write_text(
        f"__version__ = '2.13.0'\nclass version:\n    cuda = {cuda!r}\n    hip = None\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(pkgs)}
    out = subprocess.run([sys.executable, str(ROOT / ".ci" / "repair_torchaudio.py")], capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0, out.stderr
    libs = sorted(p.name for p in (ta / "lib").iterdir())
    if cuda is None:
        assert "repaired" in out.stdout and libs == ["libctc_prefix_decoder.so.disabled", "libtorchaudio.so.disabled"]
    else:
        assert "Nothing was changed" in out.stderr and libs == ["libctc_prefix_decoder.so", "libtorchaudio.so"]
