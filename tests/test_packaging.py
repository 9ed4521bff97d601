"""Packaging facts other tools rely on."""

import subprocess
import sys

import engine


def test_version_stays_below_the_transformers_kernels_probe():
    # transformers probes for an unrelated distribution that also provides an import
    # package named `kernels` and accepts it only from a minimum version on; ours must
    # never be mistaken for it.
    major, minor = (int(x) for x in engine.__version__.split(".")[:2])
    assert (major, minor) < (0, 18)


def test_transformers_does_not_take_our_kernels_package_for_its_hub_kernels():
    code = (
        "import kernels, engine, transformers\n"
        "from transformers.utils import import_utils as iu\n"
        "print(iu.is_kernels_available())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_console_script_reports_version():
    out = subprocess.run([sys.executable, "-m", "engine.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"moetrace {engine.__version__}"
