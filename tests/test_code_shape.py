"""The package's habits, checked with the suite: no class over 300 lines of code, no function over 60
(counted as bench/code_shape.py counts them: blank lines, comments and docstrings aside), and ruff's
check with the repository's ruff.toml."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from bench.code_shape import CLASS_LIMIT, FUNCTION_LIMIT, definitions

ROOT = Path(__file__).resolve().parent.parent


def test_no_class_in_the_package_is_over_300_lines_of_code():
    too_long = [f"{d.name}: {d.lines}" for d in definitions() if d.kind == "class" and d.lines > CLASS_LIMIT]
    assert not too_long, f"classes over {CLASS_LIMIT} lines of code: {too_long}"


def test_no_function_in_the_package_is_over_60_lines_of_code():
    too_long = [f"{d.name}: {d.lines}" for d in definitions() if d.kind == "function" and d.lines > FUNCTION_LIMIT]
    assert not too_long, f"functions over {FUNCTION_LIMIT} lines of code: {too_long}"


def test_the_line_count_leaves_out_blank_lines_comments_and_docstrings(tmp_path):
    (tmp_path / "shape.py").write_text(
        "class Shape:\n"
        '    """A docstring\n    of two lines."""\n'
        "\n"
        "    # a comment\n"
        "    def area(self):\n"
        '        text = """a string\n        that is code"""\n'
        "        return len(text)  # a trailing comment\n"
    )
    found = {d.name.split(":")[1]: d.lines for d in definitions(tmp_path)}
    assert found == {"Shape": 5, "Shape.area": 4}


def test_ruff_check_passes_on_the_repository():
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
    command = [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
