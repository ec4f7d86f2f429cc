"""Check a built book: every page the table of contents names exists, every figure it shows was produced,
and no page hides an error or shows noise.

A notebook can catch its own exception and print it; the build then passes. This check reads the HTML
and fails on tracebacks or error outputs, on a notebook page without a figure (every chapter notebook
plots), on an <img> whose file is missing, and on any stderr output a page shows (weight-loading progress
bars, deprecation warnings, server logs: a cell that makes them is tagged ``remove-stderr``, or the
notebook silences the warning where it is raised).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "_build" / "html"
STDERR_MARKER = 'class="output stderr'
ERROR_MARKERS = (
    "Traceback (most recent call last)",
    'class="output traceback',
    "output_error",
    "Error executing notebook",
)


def toc_files(toc: dict) -> list[str]:
    files = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections"))
            walk(entry.get("chapters"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return files


def main(html: Path = HTML, toc_path: Path = ROOT / "_toc.yml") -> int:
    problems: list[str] = []
    if not (html / "index.html").is_file():
        print(f"check_book: {html / 'index.html'} was not produced")
        return 1
    toc = yaml.safe_load(toc_path.read_text())
    for name in toc_files(toc):
        stem = re.sub(r"\.(md|ipynb)$", "", name)
        page = html / f"{stem}.html"
        if not page.is_file():
            problems.append(f"{stem}: page not produced ({page})")
            continue
        text = page.read_text(errors="replace")
        for marker in ERROR_MARKERS:
            if marker in text:
                problems.append(f"{stem}: the page shows an error ({marker!r})")
        if STDERR_MARKER in text:
            problems.append(f"{stem}: the page shows stderr output (progress bars, warnings, logs); tag the cell "
                            "remove-stderr or silence it at the source")
        images = re.findall(r'<img[^>]+src="([^"]+)"', text)
        for src in images:
            if src.startswith(("http:", "https:", "data:")):
                continue
            if not (page.parent / src.split("#")[0]).resolve().is_file():
                problems.append(f"{stem}: figure {src} is missing")
        if stem.startswith("notebooks/") and not images:
            problems.append(f"{stem}: a chapter notebook produced no figure")
    if problems:
        print("check_book: the built book has problems:")
        for p in problems:
            print("  -", p)
        return 1
    print(f"check_book: {len(toc_files(toc))} pages present, figures resolved, no error output")
    return 0


if __name__ == "__main__":
    sys.exit(main())
