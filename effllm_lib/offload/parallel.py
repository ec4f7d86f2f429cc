"""The controller's baselines over many problems at once: N worker processes on one accelerator.

Three steps, one command each (``python -m effllm_lib.offload.parallel <step> --help``):

``export-problems`` (where the assets are): writes the problems as JSON lines (id, source, question, answer, and
the ``seed``/``n``/``index`` that drew them), so the GPU machine needs no assets. ``--source multistep_arithmetic
--n 200 --seed 1`` gives exactly the problems notebook 02 (``controller_and_baselines``) runs, in the same order
(its 13-problem CPU run is the first 13). They are held out: nothing in the library was tuned on them (the
controller's knobs are the paper's; notebook 01 only shows seed-0 problems to illustrate the rewards), and part 2's
training must leave these ids out.

``run`` (on the GPU machine): converts each GGUF once to a float folder in the run's dtype (``--hf-cache``), measures
each model's throughput alone (batch 1, a fixed short prompt, prefill then ``--tp-decode-tokens`` greedy decode
steps, median of ``--tp-repeats``; ``throughput.json``), then starts ``--workers`` processes. Worker k takes
problems k, k+N, ... (of those not yet complete in every mode), loads both models onto the device, and runs every
mode of the grid on each problem with ``baselines.run_modes``, writing its own resumable JSON-lines logs
``LOG_DIR/w{k}/<mode>.jsonl``. It does not start a problem it expects to finish after the time budget (counted from
the start of ``run``); a worker still busy ``--grace-s`` after the budget is terminated (the logs are appended one
line at a time, so at most the completion in flight is lost). A second ``run`` on the same log dir resumes; it
refuses to mix settings (models, dtype, token budgets, controller knobs, modes). Completions are scored at run time
with the strict check of ``answers.py`` (no math_verify needed); ``merge`` re-scores them all.

``merge`` (where the assets are): re-scores every completion with the problems' real (strict) scorers, keeps
the problems that have every mode, and saves with ``results.save`` (chapter ``splitreason``) the per-mode summary
(``baselines.summarize``), the per-completion records without their text (what ``baselines.latency_table`` needs)
and the latency table against the throughputs measured on the device. The provenance's ``hardware`` is the machine
that merges; ``extra.run_hardware`` is the device's (GPU, CPU, torch and transformers versions, ``EFFLLM_COMMIT``).

Model specs: a ``.gguf`` file, a transformers folder, or ``tiny:<arch>:<seed>`` (a random 2-layer model with a
byte tokenizer, for tests and dry runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..paths import atomic_write
from .baselines import MATCHED_OFFLOAD, log_name, mode_grid
from .problems import SOURCES, Problem, read_log

DTYPES = ("float32", "bfloat16", "float16")
THROUGHPUT_QUESTION = "((-3 + 7) * (2 - 9)) - (4 * -5) ="  # a fixed short prompt (in each model's chat template)
DEFAULT_HF_CACHE = "/tmp/effllm-splitreason-hf"
# The paper's controller and random-switch definitions (papers.md, section 1): 64-token big chunks probed with an
# 8-token lookahead, big segments capped at 512 tokens, random switching in chunks of 32 tokens.
PAPER_CONTROLLER = {"chunk_tokens": 64, "probe_tokens": 8, "max_big_segment": 512, "switch_chunk": 32}
SCORER = "strict (answers.strict_score: the final answer is a number equal to the gold)"
RUN_FILE, CALL_FILE, PROBLEMS_FILE, THROUGHPUT_FILE = "run.json", "call.json", "problems.jsonl", "throughput.json"


def grid_for(labels: list[str] | None) -> list[dict]:
    """The specs of ``mode_grid()`` with these labels (all when None), in the grid's order."""
    grid = mode_grid(MATCHED_OFFLOAD)
    if labels is None:
        return grid
    known = [g["label"] for g in grid]
    unknown = [lab for lab in labels if lab not in known]
    if unknown or not labels:
        raise ValueError(f"unknown modes {unknown or labels}; choose from {', '.join(known)}")
    return [g for g in grid if g["label"] in labels]


def _write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {what} (is this the log dir of a `run`?)")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------ problems
def export_problems(source: str, n: int, seed: int, out: str | os.PathLike) -> Path:
    """Write ``load_problems(source, n, seed)`` as JSON lines (no scorers: ``merge`` rebuilds them)."""
    from .problems import load_problems

    probs = load_problems(source, n, seed)
    lines = [json.dumps({"id": p.id, "source": p.source, "question": p.question, "answer": p.answer,
                         "seed": seed, "n": n, "index": i}, sort_keys=True) + "\n" for i, p in enumerate(probs)]
    return atomic_write(Path(out), "".join(lines))


def read_problems(path: str | os.PathLike) -> list[dict]:
    """The rows of an exported problems file, checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: problems file not found (write it with `export-problems`)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {n} is not JSON ({exc})") from None
        missing = [k for k in ("id", "source", "question", "answer", "seed", "n") if k not in row]
        if missing:
            raise ValueError(f"{path}: line {n} lacks {', '.join(missing)} (not written by `export-problems`?)")
        if row["source"] not in SOURCES:
            raise ValueError(f"{path}: line {n}: unknown source {row['source']!r}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no problems")
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: problem ids are not unique")
    return rows


def run_time_scorer_name() -> str:
    return SCORER


def provisional_problems(rows: list[dict]) -> list[Problem]:
    """Problems with the strict scorer built from the file's gold answers (it needs nothing outside this library,
    so the device scores as ``merge`` does; ``merge`` still re-scores, from the real problems)."""
    from .answers import strict_scorer

    return [Problem(r["id"], r["source"], r["question"], r["answer"], strict_scorer(r["answer"])) for r in rows]


def real_problems(rows: list[dict]) -> dict[str, Problem]:
    """The problems with their real scorers (``load_problems`` again), checked against the file's text."""
    from .problems import load_problems

    out: dict[str, Problem] = {}
    for key in sorted({(r["source"], int(r["seed"]), int(r["n"])) for r in rows}):
        out.update({p.id: p for p in load_problems(key[0], key[2], key[1])})
    for r in rows:
        p = out.get(r["id"])
        if p is None or p.question != r["question"] or p.answer != r["answer"]:
            raise ValueError(f"problem {r['id']} of the file differs from load_problems({r['source']!r}, "
                             f"{r['n']}, seed={r['seed']}): exported from other data?")
    return out


# -------------------------------------------------------------------------------------------------- models
class TinyByteTokenizer:
    """The byte tokenizer of ``models.tiny_causal_lm`` with the decode signature the controller calls."""

    def __init__(self):
        from ..models import ByteTokenizer

        self._t = ByteTokenizer()
        self.eos_token_id = self._t.eos_token_id
        self.chat_template = None

    def __len__(self):
        return len(self._t)

    def __call__(self, text, add_special_tokens=False, **kw):
        return self._t(text, add_special_tokens=add_special_tokens, **kw)

    def decode(self, ids, skip_special_tokens=True, **_):
        return self._t.decode(ids, skip_special_tokens)


def _sha256(path: Path) -> str:
    from ..assets import sha256_file

    return sha256_file(path)


def check_model_spec(spec: str, role: str) -> dict:
    """What a model spec names; a clear error when it names nothing usable."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"{role} model: empty spec")
    if spec.startswith("tiny:"):
        parts = spec.split(":")
        from ..models import _TINY_FAMILY

        if len(parts) != 3 or parts[1] not in _TINY_FAMILY or not parts[2].isdigit():
            raise ValueError(f"{role} model: tiny spec is tiny:<{'|'.join(_TINY_FAMILY)}>:<seed>, got {spec!r}")
        return {"kind": "tiny", "spec": spec, "file": spec}
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return {"kind": "gguf", "spec": str(path.resolve()), "file": path.name}
    if path.is_dir() and (path / "config.json").is_file():
        return {"kind": "hf", "spec": str(path.resolve()), "file": path.name}
    if not path.exists():
        raise FileNotFoundError(f"{role} model: {spec} does not exist (expected a .gguf file, a transformers "
                                f"folder or tiny:<arch>:<seed>)")
    raise ValueError(f"{role} model: {spec} is neither a .gguf file nor a folder with config.json")


def _packaged_name(sha: str) -> str | None:
    from .. import assets
    from ..models import MODELS

    for name, files in assets.SHA256.items():
        if sha in files.values() and name in MODELS:
            return name
    return None


def prepare_model(info: dict, dtype: str, hf_cache: str | os.PathLike, convert: bool = True) -> dict:
    """A folder the workers load: a GGUF is dequantized once (as ``models.hf_dir`` does) and saved in ``dtype``
    under ``hf_cache`` (named by the file's sha256, the dtype and the transformers version)."""
    info = dict(info)
    if info["kind"] == "gguf":
        gguf = Path(info["spec"])
        info["sha256"] = _sha256(gguf)
        packaged = _packaged_name(info["sha256"])
        if packaged:
            from ..models import MODELS

            info["packaged"], info["hf_name"] = packaged, MODELS[packaged].hf_name
        import transformers

        target = Path(hf_cache) / f"{gguf.stem}-{info['sha256'][:16]}-{dtype}-tf{transformers.__version__}"
        if convert and not (target / ".complete").is_file():
            _convert_gguf(gguf, target, dtype)
        info["load"] = str(target)
    else:
        info["load"] = info["spec"]
    return info


def prepare_models(models: dict[str, dict], dtype: str, hf_cache: str | os.PathLike) -> dict[str, dict]:
    """``prepare_model`` for each role; two GGUFs to convert are converted at once, in two processes."""
    out = {role: m if "load" in m else prepare_model(m, dtype, hf_cache, convert=False) for role, m in models.items()}
    todo = [(Path(m["spec"]), Path(m["load"])) for m in out.values()
            if m["kind"] == "gguf" and not (Path(m["load"]) / ".complete").is_file()]
    todo = list(dict.fromkeys(todo))  # the same file for both roles: once
    if len(todo) > 1:
        procs = [subprocess.Popen([sys.executable, "-m", "effllm_lib.offload.parallel", "convert", "--gguf", str(g),
                                   "--target", str(t), "--dtype", dtype], env=_child_env()) for g, t in todo]
        rcs = [p.wait() for p in procs]
        if any(rcs):
            raise RuntimeError(f"converting {[str(g) for g, _ in todo]} failed (exit codes {rcs}; see above)")
    elif todo:
        _convert_gguf(*todo[0], dtype)
    return out


def _convert_gguf(gguf: Path, target: Path, dtype: str) -> None:
    import torch

    from ..models import convert_gguf

    try:
        import gguf as _gguf  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("reading a GGUF file needs the `gguf` package (pip install --no-deps gguf)") from exc
    t0 = time.perf_counter()
    print(f"converting {gguf.name} to a {dtype} transformers folder {target}", flush=True)
    convert_gguf(gguf, target, getattr(torch, dtype))
    print(f"converted {gguf.name} in {time.perf_counter() - t0:.1f} s", flush=True)


def load_model(info: dict, device: str, dtype: str):
    """(model, tokenizer) on ``device`` in ``dtype``, eval mode."""
    import torch

    torch_dtype = getattr(torch, dtype)
    if info["kind"] == "tiny":
        from ..models import tiny_causal_lm

        _, arch, seed = info["spec"].split(":")
        model, _ = tiny_causal_lm(arch, seed=int(seed), tokenizer="byte", hidden=32)
        return model.to(device=device, dtype=torch_dtype).eval(), TinyByteTokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device == "cpu":
        model = AutoModelForCausalLM.from_pretrained(info["load"], dtype=torch_dtype)
    else:  # straight onto the accelerator, without a full copy in host memory per worker
        model = AutoModelForCausalLM.from_pretrained(info["load"], dtype=torch_dtype, device_map=device)
    return model.eval(), AutoTokenizer.from_pretrained(info["load"])


def measure_throughput(model, tokenizer, *, decode_tokens: int = 128, repeats: int = 3) -> dict:
    """Tokens/s of one model alone: prefill of a fixed short chat prompt, then ``decode_tokens`` greedy steps
    (batch 1, KV cache, ``simulator.time_prefill_decode``); medians of ``repeats`` after a warm-up."""
    from .problems import build_prompt
    from .simulator import time_prefill_decode

    if decode_tokens < 1 or repeats < 1:
        raise ValueError("decode_tokens and repeats must be >= 1")
    ids = tokenizer(build_prompt(tokenizer, THROUGHPUT_QUESTION), add_special_tokens=False)["input_ids"]
    time_prefill_decode(model, ids, min(8, decode_tokens))  # warm-up (allocator, kernels)
    runs = [time_prefill_decode(model, ids, decode_tokens) for _ in range(repeats)]
    prefill_s, decode_s = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    return {"prompt_tokens": len(ids), "decode_tokens": decode_tokens, "repeats": repeats,
            "prefill_tok_s": len(ids) / prefill_s, "decode_tok_s": decode_tokens / decode_s,
            "prefill_s": [r[0] for r in runs], "decode_s": [r[1] for r in runs]}


def hardware_info(device: str) -> dict:
    """What a worker ran on: the accelerator, the CPU, library versions, the commit it was told."""
    import torch
    import transformers

    from ..results import hardware

    hw = dict(hardware())
    hw.update({"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
               "effllm_commit": os.environ.get("EFFLLM_COMMIT"), "node": platform.node()})
    if device.startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        hw["gpu"] = torch.cuda.get_device_name(idx)
        hw["gpu_memory_gib"] = round(torch.cuda.get_device_properties(idx).total_memory / 2**30, 1)
        hw["gpu_count"] = torch.cuda.device_count()
        hw["cuda"] = torch.version.cuda
    return hw


# ------------------------------------------------------------------------------------------------------ run
def complete_ids(log_dir: Path, labels: list[str]) -> set[str]:
    """Problems whose every mode is logged (in any worker's folder)."""
    seen: dict[str, set[str]] = {}
    for wdir in sorted(log_dir.glob("w*")):
        for lab in labels:
            for r in read_log(wdir / log_name(lab)) if (wdir / log_name(lab)).exists() else []:
                seen.setdefault(r["problem_id"], set()).add(lab)
    return {pid for pid, labs in seen.items() if labs >= set(labels)}


def run(problems: str | os.PathLike, small: str, big: str, log_dir: str | os.PathLike, *, device: str = "cuda",
        dtype: str = "bfloat16", workers: int = 12, max_new_tokens: int = 256, time_budget_s: float = 500,
        grace_s: float = 25, modes: list[str] | None = None, hf_cache: str | os.PathLike = DEFAULT_HF_CACHE,
        max_problems: int | None = None, throughput: bool = True, tp_decode_tokens: int = 128,
        tp_repeats: int = 3, inline: bool = False, progress_every_s: float = 30, temperature: float = 0.0,
        seed: int = 1, **controller) -> dict:
    """See the module docstring. Returns this call's record (also appended to ``run.json``)."""
    t_start = time.time()
    deadline = t_start + time_budget_s
    # ---- every input is checked before anything is loaded or spawned
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if time_budget_s <= 0 or grace_s < 0:
        raise ValueError("time_budget_s must be > 0 and grace_s >= 0")
    unknown = set(controller) - set(PAPER_CONTROLLER)
    if unknown:
        raise TypeError(f"unknown controller settings {sorted(unknown)}; known: {sorted(PAPER_CONTROLLER)}")
    ctl = {**PAPER_CONTROLLER, **controller}
    for k, v in ctl.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{k} must be a positive int, got {v!r}")
    grid = grid_for(modes)
    models = {"small": check_model_spec(small, "small"), "big": check_model_spec(big, "big")}
    rows = read_problems(problems)
    if max_problems is not None:
        if max_problems < 1:
            raise ValueError(f"max_problems must be >= 1, got {max_problems}")
        rows = rows[:max_problems]
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} asked for but torch sees no CUDA device")
    elif device != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda[:i]', got {device!r}")
    # ---- the settings and problems must be those of any earlier call on this log dir
    models = {role: prepare_model(m, dtype, hf_cache, convert=False) for role, m in models.items()}
    settings = {"models": {role: {k: v for k, v in m.items() if k in ("kind", "file", "sha256", "hf_name")}
                           for role, m in models.items()},
                "dtype": dtype, "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
                "controller": ctl, "modes": [g["label"] for g in grid]}
    log_dir = Path(log_dir)
    run_file, ours = log_dir / RUN_FILE, log_dir / PROBLEMS_FILE
    history = json.loads(run_file.read_text()) if run_file.exists() else {"settings": settings, "calls": []}
    if json.dumps(history["settings"], sort_keys=True) != json.dumps(settings, sort_keys=True):
        raise ValueError(f"{log_dir} was run with other settings ({history['settings']}); now {settings}. "
                         "Use another --log-dir, or the same settings to resume")
    new_ids = [r["id"] for r in rows]
    old_ids = [r["id"] for r in read_problems(ours)] if ours.exists() else []
    if old_ids and old_ids[:len(new_ids)] != new_ids and new_ids[:len(old_ids)] != old_ids:
        raise ValueError(f"{log_dir} holds a run over other problems ({ours}); use another --log-dir")
    log_dir.mkdir(parents=True, exist_ok=True)
    if len(new_ids) > len(old_ids):
        atomic_write(ours, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    # this call is on record from now on (a command killed from outside still leaves run.json for merge)
    record = {"start": t_start, "end": None, "wall_s": None, "workers": workers, "device": device,
              "time_budget_s": time_budget_s, "problems_assigned": None, "worker_rc": {}, "killed_at_deadline": [],
              "complete_after": None, "finished": False, "effllm_commit": os.environ.get("EFFLLM_COMMIT")}
    history["calls"].append(record)
    _write_json(run_file, history)
    # ---- convert the GGUFs once (both at once); the workers load the folders
    models = prepare_models(models, dtype, hf_cache)
    # ---- throughput of each model alone, before any worker starts
    tp_file = log_dir / THROUGHPUT_FILE
    if throughput and not tp_file.exists():
        import torch

        tp = {"device": device, "dtype": dtype, "decode_tokens": tp_decode_tokens, "repeats": tp_repeats}
        for role in ("small", "big"):
            model, tok = load_model(models[role], device, dtype)
            tp[role] = measure_throughput(model, tok, decode_tokens=tp_decode_tokens, repeats=tp_repeats)
            print(f"throughput {role} ({models[role]['file']}): prefill {tp[role]['prefill_tok_s']:.0f} tok/s "
                  f"({tp[role]['prompt_tokens']} tokens), decode {tp[role]['decode_tok_s']:.1f} tok/s", flush=True)
            del model, tok
        import gc

        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        tp["hardware"] = hardware_info(device)
        _write_json(tp_file, tp)
    # ---- plan: problem i (of those not complete) goes to worker i % N
    labels = [g["label"] for g in grid]
    done = complete_ids(log_dir, labels)
    plan = {str(k): [] for k in range(workers)}
    for i, r in enumerate(rows):
        if r["id"] not in done:
            plan[str(i % workers)].append(r["id"])
    todo = sum(len(v) for v in plan.values())
    print(f"{len(rows)} problems, {len(done & {r['id'] for r in rows})} already complete, {todo} to run on "
          f"{workers} workers; {len(grid)} modes; budget {time_budget_s:.0f} s "
          f"({deadline - time.time():.0f} s left)", flush=True)
    call = {"start": t_start, "deadline": deadline, "grace_s": grace_s, "device": device, "dtype": dtype,
            "workers": workers, "time_budget_s": time_budget_s, "plan": plan, "settings": settings,
            "load": {role: {"kind": m["kind"], "spec": m["spec"], "load": m["load"]} for role, m in models.items()}}
    _write_json(log_dir / CALL_FILE, call)
    record["problems_assigned"] = todo
    _write_json(run_file, history)
    active = [k for k in range(workers) if plan[str(k)]]
    killed, rcs = [], {}
    if inline:
        for k in active:
            worker(log_dir, k)
            rcs[str(k)] = 0
    elif active:
        rcs, killed = _spawn_and_wait(log_dir, active, deadline + grace_s, progress_every_s, len(rows), labels)
    record.update({"end": time.time(), "wall_s": time.time() - t_start, "problems_assigned": todo, "worker_rc": rcs,
                   "killed_at_deadline": killed, "complete_after": len(complete_ids(log_dir, labels)),
                   "finished": True})
    _write_json(run_file, history)
    print(f"run finished in {record['wall_s']:.0f} s: {record['complete_after']}/{len(rows)} problems complete in "
          f"every mode" + (f"; workers {killed} terminated at the deadline" if killed else ""), flush=True)
    failed = {k: rc for k, rc in rcs.items() if rc != 0 and int(k) not in killed}
    if failed:
        for n, k in enumerate(failed):  # the first failure in full, the others briefly (they often repeat it)
            wlog = log_dir / f"w{k}" / "worker.log"
            tail = wlog.read_text(errors="replace")[-(3000 if n == 0 else 300):] if wlog.exists() else ""
            print(f"--- worker {k} exited with {failed[k]}; end of its log:\n{tail}", flush=True)
        raise RuntimeError(f"workers {sorted(failed)} failed (exit codes {failed}); see {log_dir}/w*/worker.log")
    return record


def _progress_line(log_dir: Path, active: list[int], elapsed: float, n_rows: int, labels: list[str]) -> str:
    parts, total = [], 0
    for k in active:
        p = log_dir / f"w{k}" / "progress.json"
        try:
            st = json.loads(p.read_text())
            parts.append(f"w{k} {st['done']}/{st['assigned']}")
            total += st["done"]
        except (OSError, ValueError, KeyError):
            parts.append(f"w{k} starting")
    line = f"[{elapsed:5.0f} s] problems done this call: {total}; " + ", ".join(parts)
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            free, total_mem = torch.cuda.mem_get_info()
            line += f"; GPU memory in use {(total_mem - free) / 2**30:.1f} of {total_mem / 2**30:.0f} GiB"
    except Exception:  # noqa: BLE001 - a progress line must never stop the run
        pass
    return line


def _child_env(**extra) -> dict:
    """The environment of a child `python -m effllm_lib...`: this checkout first on the path, output unbuffered."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _spawn_and_wait(log_dir: Path, active: list[int], hard_deadline: float, progress_every_s: float,
                    n_rows: int, labels: list[str]):
    env = _child_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    procs = {}
    t0 = time.time()
    for k in active:
        wdir = log_dir / f"w{k}"
        wdir.mkdir(parents=True, exist_ok=True)
        fh = open(wdir / "worker.log", "ab")
        procs[k] = (subprocess.Popen([sys.executable, "-m", "effllm_lib.offload.parallel", "worker",
                                      "--log-dir", str(log_dir), "--k", str(k)],
                                     stdout=fh, stderr=subprocess.STDOUT, env=env), fh)
    killed: list[int] = []
    last = time.time()
    try:
        while any(p.poll() is None for p, _ in procs.values()):
            now = time.time()
            if now > hard_deadline:
                for k, (p, _) in procs.items():
                    if p.poll() is None:
                        killed.append(k)
                        p.send_signal(signal.SIGTERM)
                end = time.time() + 5
                for k in killed:
                    p = procs[k][0]
                    try:
                        p.wait(timeout=max(0.1, end - time.time()))
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
                break
            if now - last >= progress_every_s:
                print(_progress_line(log_dir, active, now - t0, n_rows, labels), flush=True)
                last = now
            time.sleep(0.5)
    finally:
        for k, (p, fh) in procs.items():
            if p.poll() is None:  # an exception in this loop: leave no worker behind
                p.kill()
                p.wait()
            fh.close()
    print(_progress_line(log_dir, active, time.time() - t0, n_rows, labels), flush=True)
    return {str(k): p.returncode for k, (p, _) in procs.items()}, killed


def worker(log_dir: str | os.PathLike, k: int) -> int:
    """Worker ``k`` of the current call: its problems through every mode, until done or out of time."""
    import torch

    from .baselines import run_modes

    log_dir = Path(log_dir)
    call = _read_json(log_dir / CALL_FILE, "call.json")
    ids = call["plan"].get(str(k))
    if ids is None:
        raise ValueError(f"worker {k} is not in the plan of {log_dir / CALL_FILE}")
    settings = call["settings"]
    rows = {r["id"]: r for r in read_problems(log_dir / PROBLEMS_FILE)}
    problems = provisional_problems([rows[i] for i in ids])
    wdir = log_dir / f"w{k}"
    wdir.mkdir(parents=True, exist_ok=True)
    device = call["device"]
    if device == "cuda" and torch.cuda.device_count() > 1:
        device = f"cuda:{k % torch.cuda.device_count()}"
    if torch.device(device).index is not None:
        torch.cuda.set_device(torch.device(device))
    torch.set_num_threads(1)
    t0 = time.time()
    small = load_model(call["load"]["small"], device, call["dtype"])
    big = load_model(call["load"]["big"], device, call["dtype"])
    _write_json(wdir / "hardware.json", {**hardware_info(device), "worker": k, "pid": os.getpid(),
                                         "scorer_at_run": run_time_scorer_name(), "load_s": time.time() - t0})
    print(f"[w{k}] models on {device} in {time.time() - t0:.1f} s; {len(problems)} problems", flush=True)
    grid = grid_for(settings["modes"])
    kw = {**settings["controller"], "max_new_tokens": settings["max_new_tokens"],
          "temperature": settings["temperature"], "seed": settings["seed"]}
    times: list[float] = []
    errors = 0
    status = {"assigned": len(problems), "done": 0, "stopped_for_time": False, "errors": 0}
    for i, p in enumerate(problems):
        expected = statistics.mean(times) if times else 0.0
        if time.time() + expected > call["deadline"]:
            status["stopped_for_time"] = True
            print(f"[w{k}] stopping: {len(problems) - i} problems left, the next would end after the budget",
                  flush=True)
            break
        t = time.perf_counter()
        try:
            run_modes([p], small, big, wdir, grid=grid, **kw)
            errors = 0
        except Exception as exc:  # noqa: BLE001 - one bad problem must not lose the worker's others
            errors += 1
            status["errors"] += 1
            from .problems import append_record

            append_record(wdir / "errors.jsonl", {"problem_id": p.id, "error": repr(exc)})
            print(f"[w{k}] {p.id}: {exc!r}", flush=True)
            if errors >= 3:
                raise
            continue
        times.append(time.perf_counter() - t)
        status["done"] = i + 1 - status["errors"]
        _write_json(wdir / "progress.json", {**status, "last": p.id, "elapsed_s": time.time() - t0})
        print(f"[w{k}] {status['done']}/{len(problems)} {p.id} in {times[-1]:.1f} s", flush=True)
    _write_json(wdir / "progress.json", {**status, "elapsed_s": time.time() - t0})
    return 0


# ---------------------------------------------------------------------------------------------------- merge
def collect_records(log_dir: Path, labels: list[str]):
    """Every logged completion of these modes over all workers, one per (mode, problem, sample)."""
    import pandas as pd

    recs = []
    for wdir in sorted(log_dir.glob("w*")):
        if not wdir.is_dir():
            continue
        for lab in labels:
            path = wdir / log_name(lab)
            for r in read_log(path) if path.exists() else []:
                recs.append({**r, "worker": wdir.name})
    if not recs:
        raise ValueError(f"{log_dir}: no completions logged (did `run` start any worker?)")
    df = pd.DataFrame(recs)
    return df.drop_duplicates(["label", "problem_id", "sample"], keep="first").reset_index(drop=True)


def merge(log_dir: str | os.PathLike, problems: str | os.PathLike | None = None, *,
          name: str = "controller_modes_gpu", latency_name: str = "controller_latency_vs_simulator_gpu",
          scale: str = "full", out: str | os.PathLike | None = None) -> dict:
    """Re-score, summarize and save (see the module docstring). Returns the frames and the paths written."""
    from .. import results
    from .baselines import PairThroughput, latency_table, summarize
    from .simulator import Throughput

    log_dir = Path(log_dir)
    history = _read_json(log_dir / RUN_FILE, "run.json")
    settings = history["settings"]
    labels = settings["modes"]
    rows = read_problems(problems if problems is not None else log_dir / PROBLEMS_FILE)
    run_ids = [r["id"] for r in read_problems(log_dir / PROBLEMS_FILE)]
    if problems is not None and [r["id"] for r in rows][:len(run_ids)] != run_ids:
        raise ValueError(f"{problems} is not the problems file this run used ({log_dir / PROBLEMS_FILE})")
    real = real_problems(rows)
    recs = collect_records(log_dir, labels)
    stray = sorted(set(recs.problem_id) - set(real))
    if stray:
        raise ValueError(f"logs hold problems not in the problems file: {stray[:5]}")
    recs["correct_at_run"] = recs["correct"].astype(float)
    recs["correct"] = [real[pid].score(text) for pid, text in zip(recs.problem_id, recs.text)]
    changed = int((recs.correct != recs.correct_at_run).sum())
    from .answers import END_MARKERS

    # a completion holding an end-of-turn marker kept generating after its turn ended (the stop-set bug)
    try:  # the published reward's verdict beside the strict one, to show what the strict check refuses
        from .rewards import accuracy_reward

        recs["correct_math_verify"] = [accuracy_reward(t, real[pid].answer, published=True) or 0.0
                                       for pid, t in zip(recs.problem_id, recs.text)]
    except ImportError:
        pass
    recs["past_end_of_turn"] = [any(m in t for m in END_MARKERS) for t in recs.text]
    have = recs.groupby("problem_id").label.nunique()
    complete = set(have[have == len(labels)].index)
    order = {r["id"]: i for i, r in enumerate(rows)}
    recs = recs[recs.problem_id.isin(complete)].copy()
    if recs.empty:
        raise ValueError(f"{log_dir}: no problem has every mode ({', '.join(labels)}) logged yet")
    recs["_mode"] = recs.label.map({lab: i for i, lab in enumerate(labels)})
    recs["_order"] = recs.problem_id.map(order)
    recs = recs.sort_values(["_mode", "_order", "sample"]).drop(columns=["_mode", "_order"]).reset_index(drop=True)
    summary = summarize(recs)
    hws = [json.loads(p.read_text()) for p in sorted(log_dir.glob("w*/hardware.json"))]
    run_hw = hws[0] if hws else {}
    errors = sum(len(read_log(p)) for p in log_dir.glob("w*/errors.jsonl"))
    sources = sorted({(r["source"], r["seed"], r["n"]) for r in rows})
    calls = history["calls"]
    params = {"problems": [{"source": s, "seed": sd, "n": n} for s, sd, n in sources],
              "max_new_tokens": settings["max_new_tokens"], **settings["controller"], "seed": settings["seed"],
              "temperature": settings["temperature"], "dtype": settings["dtype"], "modes": labels,
              "small": settings["models"]["small"]["file"], "big": settings["models"]["big"]["file"],
              "device": sorted({c["device"] for c in calls}), "workers": sorted({c["workers"] for c in calls}),
              "time_budget_s": sorted({c["time_budget_s"] for c in calls})}
    extra = {"models": settings["models"], "problems_requested": len(rows), "problems_run": len(complete),
             "problems_incomplete_dropped": int((have < len(labels)).sum()), "rescored_changed": changed,
             "past_end_of_turn": {lab: int(n) for lab, n in recs.groupby("label", sort=False).past_end_of_turn.sum()
                                  .items()},
             "scorer": SCORER,
             "scorer_at_run": sorted({h.get("scorer_at_run", "?") for h in hws}),
             "worker_errors": errors, "run_calls": [{k: c.get(k) for k in ("wall_s", "workers", "problems_assigned",
                                                                           "killed_at_deadline", "finished",
                                                                           "effllm_commit")}
                                                  for c in calls],
             # a resumed run can span commits: each call's commit is on record (None: not recorded)
             "run_commits": sorted({c.get("effllm_commit") or "unrecorded" for c in calls}),
             "run_hardware": {k: run_hw.get(k) for k in ("gpu", "gpu_memory_gib", "gpu_count", "cuda", "cpu", "cores",
                                                          "memory_gib", "torch", "transformers", "python",
                                                          "effllm_commit", "device")},
             "gpus_seen": sorted({h.get("gpu") or "none" for h in hws})}
    tp = json.loads((log_dir / THROUGHPUT_FILE).read_text()) if (log_dir / THROUGHPUT_FILE).exists() else None
    if tp:
        extra["throughput_tok_s"] = {role: {"prefill": tp[role]["prefill_tok_s"], "decode": tp[role]["decode_tok_s"],
                                            "prompt_tokens": tp[role]["prompt_tokens"]} for role in ("small", "big")}
    # the numbers were measured on the run's machine: its description goes in the hardware field
    run_hardware = {**{k: v for k, v in run_hw.items() if v is not None}, "merged_on": results.hardware()["cpu"]} \
        if run_hw else None
    if out is not None:
        out = Path(out)
        paths = {"summary": out, "records": out.with_name(out.stem + "_records.csv"),
                 "latency": out.with_name(out.stem + "_latency.csv")}
    else:
        paths = {"summary": None, "records": None, "latency": None}
    written = {"summary": results.save(summary, "splitreason", name, params=params, scale=scale, extra=extra,
                                       path=paths["summary"], hardware=run_hardware)}
    keep = [c for c in recs.columns if c not in ("text",)]
    written["records"] = results.save(recs[keep], "splitreason", f"{name}_records", params=params, scale=scale,
                                      extra=extra, path=paths["records"], hardware=run_hardware)
    lat = None
    if tp:
        pair = PairThroughput(Throughput(tp["small"]["prefill_tok_s"], tp["small"]["decode_tok_s"]),
                              Throughput(tp["big"]["prefill_tok_s"], tp["big"]["decode_tok_s"]))
        lat = latency_table(recs, pair, chunk_tokens=settings["controller"]["chunk_tokens"])
        written["latency"] = results.save(lat, "splitreason", latency_name, params=params, scale=scale,
                                          extra=extra, path=paths["latency"], hardware=run_hardware)
    print(f"merged {len(complete)} problems x {len(labels)} modes ({changed} completions re-scored differently); "
          f"wrote " + ", ".join(str(p) for p in written.values()), flush=True)
    return {"summary": summary, "records": recs, "latency": lat, "paths": written}


# ------------------------------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m effllm_lib.offload.parallel",
                                 description="SplitReason baselines in parallel worker processes (see the docstring)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export-problems", help="write problems as JSON lines (run where the assets are)")
    ex.add_argument("--source", default="multistep_arithmetic", choices=SOURCES)
    ex.add_argument("--n", type=int, default=200)
    ex.add_argument("--seed", type=int, default=1, help="1: notebook 02's evaluation problems")
    ex.add_argument("--out", required=True)
    rn = sub.add_parser("run", help="every mode over the problems in worker processes (the GPU machine)")
    rn.add_argument("--problems", required=True)
    rn.add_argument("--small-gguf", required=True, help=".gguf file, transformers folder or tiny:<arch>:<seed>")
    rn.add_argument("--big-gguf", required=True)
    rn.add_argument("--device", default="cuda")
    rn.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    rn.add_argument("--workers", type=int, default=12)
    rn.add_argument("--max-new-tokens", type=int, default=256)
    rn.add_argument("--log-dir", required=True)
    rn.add_argument("--time-budget-s", type=float, default=500,
                    help="from the start of this command: no problem starts that is expected to end later")
    rn.add_argument("--grace-s", type=float, default=25, help="workers still running this long after the budget "
                                                               "are terminated")
    rn.add_argument("--modes", default=None, help="comma-separated labels of baselines.mode_grid() (default all)")
    rn.add_argument("--hf-cache", default=DEFAULT_HF_CACHE, help="where the GGUFs are converted (not the log dir)")
    rn.add_argument("--max-problems", type=int, default=None, help="only the first N problems of the file")
    for key, val in PAPER_CONTROLLER.items():
        rn.add_argument("--" + key.replace("_", "-"), type=int, default=val)
    rn.add_argument("--temperature", type=float, default=0.0)
    rn.add_argument("--seed", type=int, default=1)
    rn.add_argument("--no-throughput", action="store_true", help="skip the throughput measurement")
    rn.add_argument("--tp-decode-tokens", type=int, default=128)
    rn.add_argument("--tp-repeats", type=int, default=3)
    rn.add_argument("--inline", action="store_true", help="run the workers one after the other in this process")
    rn.add_argument("--progress-every-s", type=float, default=30)
    wk = sub.add_parser("worker", help="(internal) one worker of the current call")
    wk.add_argument("--log-dir", required=True)
    wk.add_argument("--k", type=int, required=True)
    cv = sub.add_parser("convert", help="(internal) dequantize one GGUF into a transformers folder")
    cv.add_argument("--gguf", required=True)
    cv.add_argument("--target", required=True)
    cv.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    mg = sub.add_parser("merge", help="re-score, summarize and save with provenance (run where the assets are)")
    mg.add_argument("--log-dir", required=True)
    mg.add_argument("--problems", default=None, help="the exported file (default: the run's copy in the log dir)")
    mg.add_argument("--name", default="controller_modes_gpu")
    mg.add_argument("--latency-name", default="controller_latency_vs_simulator_gpu")
    mg.add_argument("--scale", default="full", choices=("ci", "full"))
    mg.add_argument("--out", default=None, help="write the summary here (records and latency beside it) instead "
                                                "of data/results/splitreason/")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "export-problems":
        path = export_problems(args.source, args.n, args.seed, args.out)
        print(f"wrote {args.n} {args.source} problems (seed {args.seed}) to {path}")
    elif args.cmd == "run":
        modes = [m.strip() for m in args.modes.split(",")] if args.modes else None
        run(args.problems, args.small_gguf, args.big_gguf, args.log_dir, device=args.device, dtype=args.dtype,
            workers=args.workers, max_new_tokens=args.max_new_tokens, time_budget_s=args.time_budget_s,
            grace_s=args.grace_s, modes=modes, hf_cache=args.hf_cache, max_problems=args.max_problems,
            throughput=not args.no_throughput, tp_decode_tokens=args.tp_decode_tokens, tp_repeats=args.tp_repeats,
            inline=args.inline, progress_every_s=args.progress_every_s, temperature=args.temperature,
            seed=args.seed, **{k: getattr(args, k) for k in PAPER_CONTROLLER})
    elif args.cmd == "worker":
        return worker(args.log_dir, args.k)
    elif args.cmd == "convert":
        _convert_gguf(Path(args.gguf), Path(args.target), args.dtype)
    else:
        merge(args.log_dir, args.problems, name=args.name, latency_name=args.latency_name, scale=args.scale,
              out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
