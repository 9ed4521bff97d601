"""The folder -> package mapping, computed here; all other metadata lives in pyproject.toml.

The repository keeps two folders, ``engine/`` (orchestration) and ``kernels/`` (arrays in, arrays
out), and installs them as one import package: ``moetrace`` <- ``engine/``, ``moetrace.kernels``
<- ``kernels/``. Nothing else is installed at the top level, so moetrace lives beside any other
``engine`` or ``kernels`` (Hugging Face's hub-kernel package, which transformers imports).
"""
from setuptools import find_packages, setup


def mapped(folder: str, package: str) -> list[str]:
    return [package + name[len(folder):] for name in find_packages(include=[folder, folder + ".*"])]


setup(packages=mapped("engine", "moetrace") + mapped("kernels", "moetrace.kernels"),
      package_dir={"moetrace": "engine", "moetrace.kernels": "kernels"})
