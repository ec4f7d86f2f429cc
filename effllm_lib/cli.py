"""``effllm``: rerun any chapter notebook with your own parameters.

    effllm list                                  # the notebooks and their parameters
    effllm run notebooks/bitmod/02_perplexity.ipynb -p scale full -p models '["smollm2-135m"]'
    effllm scorecard [chapter] [--csv] [--summary]

``run`` is papermill with one difference: a parameter the notebook's ``parameters`` cell does not define
is an error (papermill itself only warns, and the run would silently use the default). Values are parsed
as Python literals where they parse (``3``, ``0.5``, ``[1, 2]``, ``True``), else kept as strings.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

from .paths import repo_root


class NotebookParameterError(ValueError):
    """A parameter the notebook does not define, or a notebook without a parameters cell."""


def notebook_parameters(path: str | Path) -> dict[str, dict]:
    """The parameters a notebook's ``parameters`` cell defines: name -> {default, type, help}."""
    import papermill as pm

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such notebook")
    params = pm.inspect_notebook(str(path))
    if not params:
        raise NotebookParameterError(f"{path} has no cell tagged 'parameters'")
    return {name: {"default": p["default"], "type": p["inferred_type_name"], "help": p["help"]}
            for name, p in params.items()}


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def check_parameters(path: str | Path, given: dict) -> None:
    known = notebook_parameters(path)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise NotebookParameterError(
            f"{path}: unknown parameter(s) {', '.join(unknown)}; this notebook takes: {', '.join(sorted(known))}")


def run_notebook(path: str | Path, params: dict | None = None, output: str | Path | None = None,
                 *, cwd: str | Path | None = None, progress: bool = True):
    """Execute a notebook with ``params`` after checking every name exists; returns the output path."""
    import papermill as pm

    params = params or {}
    path = Path(path)
    check_parameters(path, params)
    output = Path(output) if output else path.with_name(path.stem + ".out.ipynb")
    pm.execute_notebook(str(path), str(output), parameters=params, cwd=str(cwd or path.parent),
                        progress_bar=progress, kernel_name="python3")
    return output


def all_notebooks() -> list[Path]:
    root = repo_root() or Path.cwd()
    return sorted(p for p in (root / "notebooks").rglob("*.ipynb")
                  if ".ipynb_checkpoints" not in p.parts and not p.name.endswith(".out.ipynb"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["scorecard"]:
        # the scorecard parses its own arguments, so `effllm scorecard --help` shows them
        from .scorecard import main as scorecard_main

        return scorecard_main(argv[1:])
    parser = argparse.ArgumentParser(prog="effllm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="execute a notebook with parameters (papermill, strict names)")
    run.add_argument("notebook")
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    run.add_argument("-o", "--output", help="where to write the executed notebook (default NAME.out.ipynb)")
    sub.add_parser("list", help="list the notebooks and their parameters")
    sub.add_parser("scorecard", help="print the scorecard (effllm scorecard --help for its options)")
    args = parser.parse_args(argv)

    if args.cmd == "list":
        for nb in all_notebooks():
            print(nb)
            for name, p in notebook_parameters(nb).items():
                print(f"    {name} = {p['default']}" + (f"   # {p['help']}" if p["help"] else ""))
        return 0
    params = {name: parse_value(value) for name, value in args.parameter}
    try:
        out = run_notebook(args.notebook, params, args.output)
    except (NotebookParameterError, FileNotFoundError) as exc:
        print(f"effllm: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
