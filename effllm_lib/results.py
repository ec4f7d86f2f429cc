"""Measured results with provenance.

``save(df, chapter, name, params=..., scale=...)`` writes ``data/results/<chapter>/<name>.csv`` (CI-scale
runs: ``data/results/<chapter>/ci/<name>.csv``, git-ignored): a block of
``# key: <json>`` provenance lines (commit, dirty flag, hardware, date, parameters, scale, versions) followed
by the table as CSV. The header's ``rows_sha256`` is a checksum of the table's text: a file whose rows were
truncated or edited by hand no longer matches it, and reading it is an error. The file is written to a temporary file in the same folder and renamed over the old one,
so a crash never leaves a half-written results file. ``load(chapter, name)`` reads it back and puts the
provenance in ``df.attrs["provenance"]``; anything wrong with the file raises ``ResultsError`` naming the
file and the problem.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import platform
import re
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

from . import CHAPTERS, __version__
from .paths import atomic_write, data_dir, repo_root

REQUIRED_KEYS = ("chapter", "name", "date", "commit", "dirty", "hardware", "params", "scale", "rows_sha256")
SCALES = ("ci", "full")
# The CPU features the chapters depend on; the full flag list is long and says little more.
_INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni",
                      "avx512_vbmi2", "avx512_vpopcntdq", "amx_bf16", "amx_int8", "amx_tile")


class ResultsError(RuntimeError):
    """A results file is missing or malformed; the message names the file and what is wrong."""


def results_dir(chapter: str) -> Path:
    return data_dir() / "results" / chapter


def results_path(chapter: str, name: str, scale: str = "full") -> Path:
    """Full-scale results sit in data/results/<chapter>/ (committed, shown by the book and the scorecard);
    CI-scale runs write to data/results/<chapter>/ci/ (git-ignored), so a quick run never overwrites or
    churns a published result."""
    folder = results_dir(chapter) if scale == "full" else results_dir(chapter) / "ci"
    return folder / f"{name}.csv"


# ----------------------------------------------------------------------------------------------- provenance
def _git(*args: str) -> str | None:
    root = repo_root() or Path.cwd()
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    # only the trailing newline goes: porcelain status lines start with a meaningful space
    return out.stdout.rstrip("\n") if out.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """Commit hash and whether the working tree had uncommitted changes to tracked files."""
    if os.environ.get("EFFLLM_COMMIT"):
        # a copy of the tree run elsewhere (the device machine) names its commit; its git state is not ours
        dirty_env = os.environ.get("EFFLLM_DIRTY")
        return {"commit": os.environ["EFFLLM_COMMIT"],
                "dirty": None if dirty_env is None else dirty_env.lower() in ("1", "true", "yes")}
    commit = _git("rev-parse", "HEAD") or "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no")
    # Results files themselves don't make the code dirty (a notebook run rewrites several in a row).
    dirty = None if status is None else any(not line[3:].startswith("data/results/")
                                            for line in status.splitlines())
    return {"commit": commit, "dirty": dirty}


@lru_cache(maxsize=1)
def hardware() -> dict[str, Any]:
    """CPU model, core count, the relevant instruction-set flags, memory and the GPU if torch sees one."""
    info: dict[str, Any] = {"machine": platform.machine(), "cores": os.cpu_count()}
    cpu_model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu_model in ("unknown", "", platform.machine()):
                cpu_model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    info["cpu"] = cpu_model
    info["cpu_flags"] = [f for f in _INTERESTING_FLAGS if f in flags]
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - provenance must never break a save
        pass
    info["python"] = platform.python_version()
    return info


def provenance(chapter: str, name: str, params: dict | None, scale: str) -> dict[str, Any]:
    return {
        "chapter": chapter,
        "name": name,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **git_state(),
        "hardware": hardware(),
        "params": params or {},
        "scale": scale,
        "effllm_lib": __version__,
    }


# ------------------------------------------------------------------------------------------------ save/load
def _check_name(chapter: str, name: str) -> None:
    if chapter not in CHAPTERS:
        raise ValueError(f"unknown chapter {chapter!r}; expected one of {', '.join(CHAPTERS)}")
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"results name must be a plain file stem, got {name!r}")


def save(df: pd.DataFrame, chapter: str, name: str, *, params: dict | None = None, scale: str,
         extra: dict | None = None, path: str | os.PathLike | None = None,
         hardware: dict | None = None) -> Path:
    """Write ``df`` with provenance to ``data/results/<chapter>/<name>.csv`` (or ``path``), atomically.

    ``params`` are the parameters that produced the table (JSON-serializable); ``scale`` says whether it
    is a CI-sized run or the full one the book shows; ``extra`` adds free-form provenance (e.g. a model's
    size); ``hardware`` replaces this machine's description when the numbers were measured elsewhere (a
    table merged here from logs written on the device machine). Returns the path written.

    If the file already holds exactly this table from the same parameters and scale, it is left alone:
    rerunning a deterministic notebook does not churn committed files, and the provenance keeps naming
    the commit that first produced these numbers.
    """
    _check_name(chapter, name)
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if not isinstance(df, pd.DataFrame) or df.empty:
        raise ValueError("save() needs a non-empty pandas DataFrame")
    meta = provenance(chapter, name, params, scale)
    if hardware is not None:
        meta["hardware"] = hardware
    if extra:
        meta["extra"] = extra
    body = df.to_csv(index=False)
    meta["rows_sha256"] = rows_checksum(body)
    try:
        header = "".join(f"# {k}: {json.dumps(v, sort_keys=True, default=str)}\n" for k, v in meta.items())
    except TypeError as exc:  # pragma: no cover - default=str makes this rare
        raise ValueError(f"provenance is not JSON-serializable: {exc}") from exc
    target = Path(path) if path is not None else results_path(chapter, name, scale)
    if _unchanged(target, df, meta):
        return target
    atomic_write(target, header + body)
    return target


def rows_checksum(body: str) -> str:
    """sha256 of a results file's table text (everything after the provenance header)."""
    return hashlib.sha256(body.encode()).hexdigest()


def _unchanged(target: Path, df: pd.DataFrame, meta: dict) -> bool:
    """True when ``target`` already holds this table from the same parameters, scale and extra."""
    if not target.is_file():
        return False
    try:
        old = read(target)
    except ResultsError:
        return False
    old_meta = old.attrs["provenance"]
    if old_meta.get("dirty") is not False and meta.get("dirty") is False:
        return False  # replace a result from uncommitted code by the same result from a clean commit
    same_setup = all(json.dumps(old_meta.get(k), sort_keys=True, default=str)
                     == json.dumps(meta.get(k), sort_keys=True, default=str) for k in ("params", "scale", "extra"))
    body = target.read_text().split("\n")
    body = "\n".join(line for line in body if not line.startswith("# "))
    return same_setup and body == df.to_csv(index=False)


def read(path: str | os.PathLike) -> pd.DataFrame:
    """Read a results file at ``path``; see ``load``."""
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{path}: results file not found (run the notebook or benchmark that writes it)")
    text = path.read_text()
    meta: dict[str, Any] = {}
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines) and lines[i].startswith("# "):
        key, sep, value = lines[i][2:].partition(": ")
        if not sep:
            raise ResultsError(f"{path}: line {i + 1}: provenance line is not '# key: value'")
        try:
            meta[key.strip()] = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ResultsError(f"{path}: line {i + 1}: provenance value of {key!r} is not JSON ({exc})") from None
        i += 1
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ResultsError(f"{path}: provenance is missing {', '.join(missing)} (not written by results.save?)")
    body = "".join(lines[i:])
    if not body.strip():
        raise ResultsError(f"{path}: no table after the provenance header")
    try:
        df = pd.read_csv(io.StringIO(body))
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ResultsError(f"{path}: table is not valid CSV ({exc})") from None
    if df.empty:
        raise ResultsError(f"{path}: table has a header but no rows")
    if rows_checksum(body) != meta["rows_sha256"]:
        raise ResultsError(f"{path}: the table does not match the checksum in its header (rows_sha256): the file "
                           "was truncated or edited by hand; rerun what wrote it (results.save) or restore it "
                           "from git")
    df.attrs["provenance"] = meta
    df.attrs["path"] = str(path)
    return df


def load(chapter: str, name: str) -> pd.DataFrame:
    """Read ``data/results/<chapter>/<name>.csv``; provenance in ``df.attrs['provenance']``.

    Where no full-scale file exists, a CI-scale one (``ci/<name>.csv``) is returned instead; its
    provenance says ``scale: ci`` and figure captions repeat it.
    """
    _check_name(chapter, name)
    full, ci = results_path(chapter, name), results_path(chapter, name, "ci")
    if not full.is_file() and ci.is_file():
        return read(ci)
    return read(full)


def available(chapter: str) -> list[str]:
    """Names of the full-scale results files a chapter has (the ones the scorecard reads)."""
    folder = results_dir(chapter)
    return sorted(p.stem for p in folder.glob("*.csv")) if folder.is_dir() else []


def machine_name(hw: dict[str, Any]) -> str:
    """A short name for the machine that measured: "NVIDIA H100 80GB HBM3 host, Intel Xeon 16 cores, AMX" or
    "2-core AMD EPYC"."""
    cpu = re.sub(r"\((R|TM)\)|\bCPU\b|\bProcessor\b|@.*$|\d+-Core", "", str(hw.get("cpu") or "unknown CPU"))
    cpu = re.sub(r"\s+", " ", cpu).strip() or "unknown CPU"
    cores = hw.get("cores")
    amx = ", AMX" if "amx_tile" in (hw.get("cpu_flags") or []) or "amx_bf16" in (hw.get("cpu_flags") or []) else ""
    if hw.get("gpu"):
        return f"{hw['gpu']} host, {cpu}" + (f" {cores} cores" if cores else "") + amx
    return (f"{cores}-core {cpu}" if cores else cpu) + amx


def describe(meta: dict[str, Any]) -> str:
    """One line for a caption: hardware, scale, date and commit of a results file."""
    hw = meta.get("hardware", {})
    where = hw.get("cpu", "unknown CPU")
    if hw.get("cores"):
        where += f" ({hw['cores']} cores)"
    if hw.get("gpu"):
        where += f" + {hw['gpu']}"
    commit = str(meta.get("commit", "unknown"))[:8] + ("+dirty" if meta.get("dirty") else "")
    return f"{where}; scale {meta.get('scale', '?')}; {str(meta.get('date', '?'))[:10]}; commit {commit}"
