"""Packaging: one import package, `moetrace`, that lives beside Hugging Face's `kernels` and any `engine`."""

import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import moetrace

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel `pip install moetrace` would install, built from this checkout (no network)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(ROOT)], check=True, capture_output=True)
    (path,) = out.glob("moetrace-*.whl")
    return path


def test_the_wheel_installs_one_top_level_package_moetrace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"moetrace", f"moetrace-{moetrace.__version__}.dist-info"}
    # both folders are inside it, the demo checkpoint included
    for member in ("moetrace/__init__.py", "moetrace/cli.py", "moetrace/kernels/counting.py",
                   "moetrace/kernels/routing.py", "moetrace/demo/checkpoint/model.safetensors"):
        assert member in names, member


def test_moetrace_installs_beside_hugging_faces_kernels_and_both_work(wheel, tmp_path):
    """A fresh environment that already has Hugging Face's `kernels` (the package transformers
    imports): installing moetrace leaves it whole, and both import and run."""
    import kernels as hf_kernels  # Hugging Face's, from the dev lock

    assert Path(hf_kernels.__file__).parent.parent == Path(sysconfig.get_paths()["purelib"])
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # the heavy dependencies (torch, transformers, numba, HF kernels ...) come from this environment's
    # site-packages; moetrace's own editable install there is not visible (its .pth is not processed)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True)
    assert not (site / "kernels").exists() and not (site / "engine").exists()
    code = r"""
import torch
import kernels
from kernels import Mode, kernelize, use_kernel_forward_from_hub
import transformers.integrations.hub_kernels  # what transformers itself imports

@use_kernel_forward_from_hub("SiluAndMul")
class SiluAndMul(torch.nn.Module):
    def forward(self, x):
        d = x.shape[-1] // 2
        return torch.nn.functional.silu(x[..., :d]) * x[..., d:]

x = torch.randn(3, 8)
layer = kernelize(torch.nn.Sequential(SiluAndMul()), mode=Mode.INFERENCE, device="cpu")
assert torch.allclose(layer(x), torch.nn.functional.silu(x[:, :4]) * x[:, 4:])

import numpy as np
import moetrace
from moetrace.counting import count
from moetrace.kernels import counting
import zarr
from moetrace.synthetic import TraceSpec, write_store
write_store("t.zarr", TraceSpec(n_tokens=4096, n_layers=2, n_experts=8, top_k=2, seq_len=64), progress=False)
load = count("t.zarr", stats=["experts"], progress=False)["experts"].sum("rank").values  # Numba, moetrace.kernels
experts = zarr.open_group("t.zarr", mode="r")["routing/experts"][:]  # [tokens, layers, k]
want = np.stack([np.bincount(experts[:, l].ravel(), minlength=8) for l in range(2)])
assert np.array_equal(load, want), (load, want)
print(kernels.__file__)
print(moetrace.__file__)
print(counting.__file__)
"""
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    hf_file, mt_file, counting_file = out.stdout.strip().splitlines()[-3:]
    assert Path(hf_file) == Path(hf_kernels.__file__)
    assert Path(mt_file) == site / "moetrace" / "__init__.py"
    assert Path(counting_file) == site / "moetrace" / "kernels" / "counting.py"
    version = subprocess.run([str(venv / "bin" / "moetrace"), "--version"], check=True, capture_output=True,
                             text=True, cwd=tmp_path)
    assert version.stdout.strip() == f"moetrace {moetrace.__version__}"


def test_nothing_imports_the_folders_by_their_own_names():
    """The folders engine/ and kernels/ are the package moetrace; no code, test, bench script or
    document imports `engine` or `kernels` (that would be another project's package, or Hugging Face's)."""
    files = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.toml", "Makefile"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    pattern = re.compile(r"^\s*(from|import)\s+(engine|kernels)\b|(?<![\w./])(engine|kernels)\.[a-z_]+\.[a-z_]+\(", re.M)
    offenders = [f"{f}: {m.group(0).strip()}" for f in files if f != "tests/test_packaging.py"
                 for m in pattern.finditer((ROOT / f).read_text(encoding="utf-8"))]
    assert offenders == []


def test_console_script_reports_version():
    out = subprocess.run([sys.executable, "-m", "moetrace.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"moetrace {moetrace.__version__}"
