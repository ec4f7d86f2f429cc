"""Find numbers typed into notebook prose: every measured number must be glued, so it cannot go stale.

    python scripts/check_glue.py [NOTEBOOK_OR_MD ...]     (default: every notebooks/**/*.ipynb)

Exit status 1 and one line per finding (notebook, cell, the number, the sentence) when a markdown cell
states a number that is not computed. A number in prose is allowed only where it cannot be a result:

* it is **glued**: inside a MyST role (``{glue:text}`name:.1f` ``) or a substitution (``{{ name }}``);
* it is part of a **name**: a token that starts with a letter (H200, fp16, x86-64, SmolLM2-135M,
  Llama-3-8B, AVX-512, p99, R1-Distill-Qwen-1.5B), a number joined to a word (4-bit, 2-core, 256-token,
  135M, 2nd, a commit hash such as 2db80ad), a shape (2560x1600, 224x224x3) or a version with two dots
  (1.0.4);
* it is **code or a formula**: inside a fenced code block, inline code or ``$math$`` - except that inline
  code holding nothing but a number (``` `3.47x` ```) and a decimal number inside math (``$0.87$``) are
  still checked, so wrapping a result in backticks or dollars does not hide it;
* it is inside a link's target (the URL), an HTML comment, or a directive's ``:option:`` line;
* it numbers a heading or a list item (``1. ``, ``## 2.``), or it refers to a part of a text
  (Section 4.4, Table 2, Figure 3, notebook 01, part 2, issue 13) or is a year after a name or in a
  citation (DAC 2024, Chen et al., 2025);
* it is one of the **paper's published values** for the chapter (``paper_value`` and the numbers of
  ``description`` in ``data/paper/<chapter>.csv``, the chapter being the notebook's folder):
  quoting the paper is allowed, and is why the paper's 56% may be typed.

Everything else is flagged: a measured number with a unit (65%, 3.47x, 12 ms, 7.9 GB/s), a bare number
(0.87, "36 requests per point", "6 s per design") or a range (1.5-2x, 0-95 %). Experiment settings count too:
read them from the results file's provenance and glue them, so the prose says what the committed run did.
Numbers written as words (one thread, two pools) are not checked.

A ``{glue:...}`name``` reference that no code cell glues is not this script's business: the strict book
build (``-W``) fails on it.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

UNITS = ("x", "×", "%", "ms", "s", "sec", "us", "µs", "ns", "min", "h", "KB", "kB", "MB", "GB", "TB", "KiB",
         "MiB", "GiB", "GB/s", "MB/s", "TB/s", "tok/s", "rps", "MP", "W", "mW", "J", "mJ", "nJ", "pJ", "GHz",
         "MHz", "mm2", "mm²", "pp")
NUMBER = r"\d[\d,]*(?:\.\d+)?"
# a number or a range of numbers, then optionally a unit glued to it: the shapes a measured value takes
VALUE_RE = re.compile(rf"(?P<num>{NUMBER}(?:[-–]{NUMBER})*)(?P<unit>{'|'.join(map(re.escape, sorted(UNITS, key=len, reverse=True)))})?")
SHAPE_RE = re.compile(r"\d+(?:[x×]\d+)+")
VERSION_RE = re.compile(r"\d+(?:\.\d+){2,}")
REFERENCE_WORDS = {"section", "sections", "sec.", "§", "table", "tables", "figure", "figures", "fig.", "eq.",
                   "equation", "chapter", "chapters", "notebook", "notebooks", "part", "parts", "issue",
                   "issues", "step", "steps", "appendix", "algorithm", "listing", "line", "lines", "page",
                   "pages", "#"}
# characters that end a token; what stays inside one is what names and numbers are written with
TOKEN_RE = re.compile(r"[A-Za-z0-9µ×%.,/_+\-–‹›]+")
STRIP_LEAD = "+-–.,/_"
STRIP_TRAIL = ".,/_-–"
PLACEHOLDER = " ‹› "

FENCE_RE = re.compile(r"^(?P<fence>`{3,}|~{3,})(?P<info>[^\n]*)\n(?P<body>.*?)^(?P=fence)[ \t]*$", re.M | re.S)
ROLE_RE = re.compile(r"\{[a-zA-Z][\w:.-]*\}`[^`]*`")
SUBST_RE = re.compile(r"\{\{.*?\}\}", re.S)
INLINE_CODE_RE = re.compile(r"(`+)(.+?)\1", re.S)
MATH_RE = re.compile(r"\$\$.+?\$\$|\$[^$\n]+\$", re.S)
LINK_TARGET_RE = re.compile(r"\]\([^)\s]*(?:\s+\"[^\"]*\")?\)")
AUTOLINK_RE = re.compile(r"<https?://[^>]+>|https?://\S+")
COMMENT_RE = re.compile(r"<!--.*?-->", re.S)
HTML_TAG_RE = re.compile(r"</?[a-zA-Z][^>]*>")
HEADING_NUM_RE = re.compile(r"^(\s*#{1,6}\s+)\d+(?:\.\d+)*\.?(?=\s)", re.M)
LIST_NUM_RE = re.compile(r"^(\s*)\d+[.)](?=\s)", re.M)
OPTION_LINE_RE = re.compile(r"^:[\w-]+:.*$", re.M)
DECIMAL_RE = re.compile(r"\d+\.\d+")
SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z*(\[‹])|\n\s*\n")


@dataclass(frozen=True)
class Finding:
    source: str
    cell: int
    number: str
    sentence: str

    def __str__(self) -> str:
        return f"{self.source} cell {self.cell}: {self.number!r} in: {self.sentence}"


def paper_values(chapter: str, paper_dir: Path | None = None) -> set[float]:
    """The chapter's published numbers: paper_value and the numbers in the claim descriptions."""
    path = (paper_dir or ROOT / "data" / "paper") / f"{chapter}.csv"
    values: set[float] = set()
    if not path.is_file():
        return values
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            for text in (row.get("paper_value") or "", row.get("description") or ""):
                for m in VALUE_RE.finditer(text):
                    for part in re.split(r"[-–]", m["num"]):
                        values.add(_as_float(part))
    return values


def _as_float(text: str) -> float:
    return float(text.replace(",", ""))


def _is_only_a_value(code: str) -> bool:
    m = VALUE_RE.fullmatch(code.strip().replace(" ", "").lstrip("~≈<>=+-"))
    return m is not None


def visible_prose(markdown: str) -> str:
    """The markdown with everything that may hold a number replaced by a placeholder (see the docstring)."""
    text = COMMENT_RE.sub(PLACEHOLDER, markdown)

    def fence(m: re.Match) -> str:
        info = m["info"].strip()
        if info.startswith("{"):  # a MyST directive: its body is prose, its :options: are not
            return OPTION_LINE_RE.sub(PLACEHOLDER, m["body"])
        return PLACEHOLDER

    text = FENCE_RE.sub(fence, text)
    text = ROLE_RE.sub(PLACEHOLDER, text)
    text = SUBST_RE.sub(PLACEHOLDER, text)

    def inline_code(m: re.Match) -> str:
        return f" {m[2]} " if _is_only_a_value(m[2]) else PLACEHOLDER

    text = INLINE_CODE_RE.sub(inline_code, text)

    def math(m: re.Match) -> str:
        decimals = DECIMAL_RE.findall(m[0])
        return (" " + " ".join(decimals) + " ") if decimals else PLACEHOLDER

    text = MATH_RE.sub(math, text)
    text = LINK_TARGET_RE.sub("]" + PLACEHOLDER, text)
    text = AUTOLINK_RE.sub(PLACEHOLDER, text)
    text = HTML_TAG_RE.sub(PLACEHOLDER, text)
    text = HEADING_NUM_RE.sub(r"\1", text)
    text = LIST_NUM_RE.sub(r"\1", text)
    return text


def _sentence_at(text: str, pos: int) -> str:
    start = 0
    for m in SENTENCE_END_RE.finditer(text):
        if m.end() <= pos:
            start = m.end()
        else:
            end = m.start()
            break
    else:
        end = len(text)
    return " ".join(text[start:end].split())


def typed_numbers(markdown: str, allowed: set[float] = frozenset()) -> list[tuple[str, str]]:
    """(number, sentence) for every number in the markdown that no rule allows."""
    text = visible_prose(markdown)
    found = []
    previous = previous_raw = ""
    for m in TOKEN_RE.finditer(text):
        raw = m.group()
        token = raw.lstrip(STRIP_LEAD).rstrip(STRIP_TRAIL)
        before, before_raw, previous, previous_raw = previous, previous_raw, token.lower(), raw
        if not re.search(r"\d", token) or "‹" in token or "›" in token:
            continue
        if token[0].isalpha() or SHAPE_RE.fullmatch(token) or VERSION_RE.fullmatch(token):
            continue
        value = VALUE_RE.fullmatch(token)
        if value is None:  # a number joined to a word: 4-bit, 2-core, 135M, 2nd, a commit hash
            continue
        if before in REFERENCE_WORDS or text[max(0, m.start() - 1)] == "#":
            continue
        numbers = [_as_float(p) for p in re.split(r"[-–]", value["num"]) if p]
        if re.fullmatch(r"(19[7-9]\d|20[0-3]\d)", token) and before[:1].isalpha() and \
                (text[_previous_word_start(text, m.start())].isupper() or before_raw.endswith(",")):
            continue  # a year after a name or in a citation: DAC 2024, (Chen et al., 2025)
        if numbers and all(n in allowed for n in numbers):
            continue
        found.append((token, _sentence_at(text, m.start()).replace("‹›", "…")))
    return found


def _previous_word_start(text: str, pos: int) -> int:
    i = pos - 1
    while i > 0 and text[i].isspace():
        i -= 1
    while i > 0 and not text[i - 1].isspace():
        i -= 1
    return max(i, 0)


def check_cells(cells: list[dict], source: str, allowed: set[float]) -> list[Finding]:
    findings = []
    for i, cell in enumerate(cells):
        if cell.get("cell_type") != "markdown":
            continue
        for number, sentence in typed_numbers(_text(cell), allowed):
            findings.append(Finding(source, i, number, sentence))
    return findings


def _text(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def chapter_of(path: Path) -> str:
    """notebooks/<chapter>/NN_name.ipynb -> <chapter>; the folder name for anything else."""
    return path.resolve().parent.name


def check_file(path: Path, paper_dir: Path | None = None) -> list[Finding]:
    allowed = paper_values(chapter_of(path), paper_dir)
    try:
        source = str(path.resolve().relative_to(ROOT))
    except ValueError:
        source = str(path)
    if path.suffix == ".ipynb":
        try:
            cells = json.loads(path.read_text())["cells"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"{path}: not a notebook ({exc})") from exc
    elif path.suffix == ".md":
        cells = [{"cell_type": "markdown", "source": path.read_text()}]
    else:
        raise ValueError(f"{path}: expected a .ipynb notebook or a .md page")
    return check_cells(cells, source, allowed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="The rule, in full: see the docstring of scripts/check_glue.py.")
    parser.add_argument("paths", nargs="*", type=Path,
                        help="notebooks or MyST pages to check (default: notebooks/**/*.ipynb)")
    args = parser.parse_args(argv)
    paths = args.paths or sorted((ROOT / "notebooks").rglob("*.ipynb"))
    paths = [p for p in paths if ".ipynb_checkpoints" not in p.parts]
    findings = []
    for path in paths:
        if not path.is_file():
            print(f"check_glue: {path} does not exist")
            return 2
        findings += check_file(path)
    if findings:
        print(f"check_glue: {len(findings)} number(s) typed into notebook prose; glue them "
              "(myst_nb.glue + {glue:text}) or say why they are not results (see the script's docstring):")
        for f in findings:
            print("  -", f)
        return 1
    print(f"check_glue: {len(paths)} file(s), every number in prose is glued, a name, code or the paper's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
