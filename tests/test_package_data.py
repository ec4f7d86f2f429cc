"""Every C/C++ source the kernels compile at run time ships in a (non-editable) install of the package."""

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_kernel_source_is_package_data():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    missing = []
    for src in sorted((ROOT / "effllm_lib").rglob("*")):
        if src.suffix not in (".c", ".cpp", ".h"):
            continue
        rel = src.relative_to(ROOT)
        # the package owning it is the nearest folder above with an __init__.py
        pkg = next(p for p in rel.parents if (ROOT / p / "__init__.py").exists())
        inside = rel.relative_to(pkg).as_posix()
        if not any(fnmatch.fnmatch(inside, pat) for pat in data.get(".".join(pkg.parts), [])):
            missing.append(str(rel))
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"
