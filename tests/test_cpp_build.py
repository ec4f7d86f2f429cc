"""The shared C++ extension loader: build keys follow the sources, a missing toolchain or machine is a clear
error that is remembered, and the three kernel families use it."""

import pytest

from effllm_lib import _cpp


def test_build_key_follows_sources(tmp_path):
    (tmp_path / "a.cpp").write_text("int a() { return 1; }\n")
    (tmp_path / "a.h").write_text("#pragma once\n")
    k1 = _cpp.build_key(tmp_path, ["a.cpp"], ["a.h"])
    assert k1 == _cpp.build_key(tmp_path, ["a.cpp"], ["a.h"]) and len(k1) == 16
    (tmp_path / "a.h").write_text("#pragma once\n// edited\n")
    k2 = _cpp.build_key(tmp_path, ["a.cpp"], ["a.h"])
    assert k2 != k1
    assert _cpp.build_key(tmp_path, ["a.cpp"], ["a.h"], cflags=("-O2",)) != k2


def test_missing_toolchain_is_a_clear_remembered_error(tmp_path, monkeypatch):
    (tmp_path / "a.cpp").write_text("int a() { return 1; }\n")
    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_cpp, "_no_toolchain", lambda: "a C++ compiler (g++)")
    name = "test_no_compiler"
    with pytest.raises(RuntimeError, match=r"could not build the test kernels .*g\+\+.* not found"):
        _cpp.load_extension(name, ["a.cpp"], kernel_dir=tmp_path, what="the test kernels")
    assert _cpp.available(name) is False
    monkeypatch.setattr(_cpp, "_no_toolchain", lambda: None)  # not retried: the first answer stands
    with pytest.raises(RuntimeError, match="g\\+\\+"):
        _cpp.load_extension(name, ["a.cpp"], kernel_dir=tmp_path, what="the test kernels")


def test_wrong_machine_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(_cpp.platform, "machine", lambda: "aarch64")
    with pytest.raises(RuntimeError, match="x86-64 code; this machine is aarch64"):
        _cpp.load_extension("test_arch", ["a.cpp"], kernel_dir=tmp_path, what="the test kernels")


def test_the_three_families_share_the_loader():
    from effllm_lib.bitmod import cpu_gemv
    from effllm_lib.pq import lut_kernel
    from effllm_lib.sparse import _build

    for mod, name in ((_build, "sparse_kernels"), (cpu_gemv, "bitmod_kernels"), (lut_kernel, "pq_lut_kernels")):
        mod.load_extension()
        assert _cpp.available(name) is True
        assert mod.load_extension() is _cpp._modules[name]
    assert _build.build_key() == _cpp.build_key(_build.KERNEL_DIR, _build.SOURCES, _build.HEADERS)
