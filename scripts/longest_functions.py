"""The longest functions of a package, by lines from ``def`` to the last line of the body.

python scripts/longest_functions.py [compressor] [--top 10]
"""

import argparse
import ast
from pathlib import Path


def function_lengths(root: Path) -> list[tuple[int, str]]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((node.end_lineno - node.lineno + 1, f"{path}:{node.lineno} {node.name}"))
    return sorted(found, reverse=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default="compressor", type=Path)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    for length, where in function_lengths(args.root)[: args.top]:
        print(f"{length:5d}  {where}")
