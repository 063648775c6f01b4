"""The shape of ``llama/``: its tree with line counts, and its longest classes and functions.

    python bench/code_shape.py              # the tree, the 15 longest classes and functions
    python bench/code_shape.py --top 40

Each file and folder shows its lines and its lines of code. A line of code holds a token other than
a comment and is not part of a docstring (the string a module, class or function opens with): blank
lines, comment lines and docstrings do not count, a multi-line expression counts every line it
spans. A class or function counts from its ``class``/``def`` line to its last, decorators excluded,
nested definitions included (a class counts its methods). Classes over ``CLASS_LIMIT`` and
functions over ``FUNCTION_LIMIT`` lines of code are flagged; tests/test_code_shape.py holds the
package to both limits.
"""

import argparse
import ast
import io
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import List, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "llama"
CLASS_LIMIT = 300
FUNCTION_LIMIT = 60
NOT_CODE = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}


@dataclass(frozen=True)
class Definition:
    kind: str  # "class" or "function"
    name: str  # path:Class.method, the path from the package's folder (llama/...)
    lines: int  # lines of code

    @property
    def limit(self) -> int:
        return CLASS_LIMIT if self.kind == "class" else FUNCTION_LIMIT


def docstring_lines(tree: ast.Module) -> Set[int]:
    """Numbers of the lines that docstrings take."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            is_string = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            if is_string and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def code_lines(source: str, tree: ast.Module) -> Set[int]:
    """Numbers of the lines of code of ``source`` (see the module's docstring)."""
    lines = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in NOT_CODE:
            lines.update(range(token.start[0], token.end[0] + 1))
    return lines - docstring_lines(tree)


def file_definitions(path: Path, root: Path) -> List[Definition]:
    """Every class and function of ``path`` (methods and nested ones too), with its lines of code; names
    start with the path relative to ``root``."""
    source = path.read_text()
    tree = ast.parse(source, str(path))
    code = code_lines(source, tree)
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                kind = "class" if isinstance(child, ast.ClassDef) else "function"
                lines = len(code.intersection(range(child.lineno, child.end_lineno + 1)))
                found.append(Definition(kind, f"{path.relative_to(root)}:{prefix}{child.name}", lines))
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def definitions(package: Path = PACKAGE) -> List[Definition]:
    """Every class and function of the package's files, longest first."""
    found = [d for path in sorted(package.rglob("*.py")) for d in file_definitions(path, package.parent)]
    return sorted(found, key=lambda d: -d.lines)


def over_limits(package: Path = PACKAGE) -> List[Definition]:
    return [d for d in definitions(package) if d.lines > d.limit]


def counts(path: Path) -> Tuple[int, int]:
    """(lines, lines of code) of a Python file, or of every one in a folder."""
    if path.is_dir():
        each = [counts(p) for p in path.rglob("*.py")]
        return sum(lines for lines, _ in each), sum(code for _, code in each)
    source = path.read_text()
    return len(source.splitlines()), len(code_lines(source, ast.parse(source)))


def print_tree(folder: Path, depth: int = 0) -> None:
    """``folder``, then its Python files and subfolders, each with its (lines, lines of code)."""
    for path in [folder] + sorted(p for p in folder.iterdir() if p.suffix == ".py"):
        lines, code = counts(path)
        name = "  " * (depth + (path != folder)) + path.name + ("/" if path == folder else "")
        print(f"{name:44s} {lines:7,d} {code:7,d}")
    for subfolder in sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "__pycache__"):
        print_tree(subfolder, depth + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=int, default=15, help="longest classes and functions shown")
    args = parser.parse_args()
    print(f"{'':44s} {'lines':>7s} {'code':>7s}")
    print_tree(PACKAGE)
    found = definitions()
    for kind, limit in (("class", CLASS_LIMIT), ("function", FUNCTION_LIMIT)):
        of_kind = [d for d in found if d.kind == kind]
        over = [d for d in of_kind if d.lines > limit]
        plural = "classes" if kind == "class" else "functions"
        print(f"\nthe longest of {len(of_kind)} {plural}, in lines of code ({len(over)} over {limit}):")
        for d in of_kind[: max(args.top, len(over))]:
            print(f"  {d.lines:5d}  {d.name}{'  OVER ' + str(limit) if d.lines > limit else ''}")


if __name__ == "__main__":
    main()
