"""Build an AVX-512 kernel source for this CPU through SIMDe (the dev machine has AVX2 only): its intrinsics header
and target pragmas stripped, ``shims`` (SIMDe's native aliases plus any intrinsic it lacks) put in front and
``tail`` (e.g. an extern "C" runner) after, compiled to a shared library. Skips when simde-py or g++ is missing."""

import re
import subprocess
from pathlib import Path

import pytest


def build_emulated(source: Path, shims: str, include_dir: Path, out_dir: Path, must_contain: str,
                   tail: str = "") -> Path:
    simde_py = pytest.importorskip("simde_py", reason="simde-py (SIMDe headers) not installed")
    body = re.sub(r"^\s*#(include <immintrin.h>|pragma GCC (push_options|pop_options|target.*))\s*$", "",
                  Path(source).read_text(), flags=re.M)
    assert "pragma GCC target" not in body and must_contain in body
    (out_dir / "emulated.cpp").write_text(shims + body + tail)
    lib = out_dir / "emulated.so"
    cmd = ["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-w", f"-I{simde_py.get_include()}", f"-I{include_dir}",
           str(out_dir / "emulated.cpp"), "-o", str(lib)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot build the emulated kernel: {exc}")
    assert res.returncode == 0, res.stderr[-3000:]
    return lib
