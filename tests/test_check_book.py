"""scripts/check_book.py catches what a green book build can hide."""
import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("check_book", Path(__file__).parent.parent / "scripts" / "check_book.py")
check_book = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_book)

TOC = "format: jb-book\nroot: book/intro\nparts:\n  - caption: A\n    chapters:\n      - file: notebooks/a/01_x\n"


@pytest.fixture
def book(tmp_path):
    html = tmp_path / "html"
    (html / "book").mkdir(parents=True)
    (html / "notebooks" / "a").mkdir(parents=True)
    (html / "index.html").write_text("<html></html>")
    (html / "book" / "intro.html").write_text("<p>intro</p>")
    (html / "_images").mkdir()
    (html / "_images" / "f.png").write_bytes(b"png")
    (html / "notebooks" / "a" / "01_x.html").write_text('<img alt="" src="../../_images/f.png" />')
    (tmp_path / "_toc.yml").write_text(TOC)
    return tmp_path


def run(book):
    return check_book.main(book / "html", book / "_toc.yml")


def test_good_book_passes(book):
    assert run(book) == 0


def test_missing_page_fails(book, capsys):
    (book / "html" / "book" / "intro.html").unlink()
    assert run(book) == 1
    assert "book/intro: page not produced" in capsys.readouterr().out


def test_swallowed_traceback_fails(book, capsys):
    page = book / "html" / "notebooks" / "a" / "01_x.html"
    page.write_text(page.read_text() + "<pre>Traceback (most recent call last):\n ValueError</pre>")
    assert run(book) == 1
    assert "shows an error" in capsys.readouterr().out


def test_missing_figure_fails(book, capsys):
    (book / "html" / "_images" / "f.png").unlink()
    assert run(book) == 1
    assert "figure ../../_images/f.png is missing" in capsys.readouterr().out


def test_notebook_without_figure_fails(book, capsys):
    (book / "html" / "notebooks" / "a" / "01_x.html").write_text("<p>no plot</p>")
    assert run(book) == 1
    assert "produced no figure" in capsys.readouterr().out


def test_no_index_fails(book):
    (book / "html" / "index.html").unlink()
    assert run(book) == 1


def test_stderr_output_fails(book, capsys):
    page = book / "html" / "notebooks" / "a" / "01_x.html"
    page.write_text(page.read_text() + '<div class="output stderr highlight-myst-ansi notranslate">'
                    "Loading weights: 100%</div>")
    assert run(book) == 1
    assert "notebooks/a/01_x: the page shows stderr output" in capsys.readouterr().out
