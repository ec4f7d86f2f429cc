"""Add the ``rows_sha256`` checksum to results files written before ``results.save`` recorded one.

Only files that have no checksum line are touched, and only their header gains a line: the table is left
byte for byte as it is. A file whose checksum is present but wrong is never re-stamped (that is exactly the
damage the checksum exists to catch). Run once after merging results produced by an older checkout:

    python scripts/stamp_checksums.py data/results          # or explicit files
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from effllm_lib.paths import atomic_write
from effllm_lib.results import rows_checksum


def stamp(path: Path) -> bool:
    """Add the checksum line to ``path`` if it has none; True when the file was changed."""
    lines = path.read_text().splitlines(keepends=True)
    n = 0
    while n < len(lines) and lines[n].startswith("# "):
        n += 1
    if n == 0:
        raise SystemExit(f"{path}: no provenance header (not a results file)")
    if any(line.startswith("# rows_sha256:") for line in lines[:n]):
        return False
    body = "".join(lines[n:])
    atomic_write(path, "".join(lines[:n]) + f'# rows_sha256: "{rows_checksum(body)}"\n' + body)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", type=Path, help="results files or folders (searched for *.csv)")
    args = ap.parse_args(argv)
    files = []
    for p in args.paths:
        files += sorted(p.rglob("*.csv")) if p.is_dir() else [p]
    changed = [f for f in files if stamp(f)]
    for f in changed:
        print(f"stamped {f}")
    print(f"{len(changed)} of {len(files)} files stamped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
