"""The package's structure holds: the import-linter contracts in pyproject.toml (layers, no cycles)
are kept, counting imports inside functions too."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from tests.dist_utils import REPO_ROOT


def test_import_contracts_are_kept():
    """Layers from the entry points down to config, and no cycle between sibling modules or
    packages at any depth (`lint-imports` reads them from pyproject.toml)."""
    lint_imports = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint_imports), "--no-cache"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout and "2 kept" in proc.stdout, proc.stdout[-2000:]


_LAZY = re.compile(r"#\s*lazy:\s*\S")  # "# lazy: <reason>"


def _reason_on(lines: list[str], stmt: ast.stmt) -> bool:
    """A `# lazy:` comment on the statement's own lines."""
    return any(_LAZY.search(line) for line in lines[stmt.lineno - 1:stmt.end_lineno])


def _reason_above(lines: list[str], stmt: ast.stmt) -> bool:
    """A `# lazy:` comment in the comment lines right above the statement."""
    i = stmt.lineno - 2
    while i >= 0 and lines[i].lstrip().startswith("#"):
        if _LAZY.search(lines[i]):
            return True
        i -= 1
    return False


def lazy_imports_without_reason(files: list[Path], root: Path) -> list[str]:
    """file:line of every import inside a function that has no `# lazy:` reason. A comment above
    a run of consecutive import statements (blank lines between them allowed) covers the run."""
    found = set()
    for path in files:
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source, filename=str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):  # every statement list in the function, nested blocks too
                for field in ("body", "orelse", "finalbody"):
                    stmts = getattr(inner, field, None)
                    group = False  # inside a run of imports headed by a `# lazy:` comment line
                    for stmt in stmts if isinstance(stmts, list) else ():
                        if not isinstance(stmt, (ast.Import, ast.ImportFrom)):
                            group = False
                            continue
                        group = group or _reason_above(lines, stmt)
                        if not (group or _reason_on(lines, stmt)):
                            found.add((str(path.relative_to(root)), stmt.lineno))
    return [f"{name}:{line}" for name, line in sorted(found)]


def test_function_local_imports_say_why():
    """An import inside a function hides what a module needs; each one left is there for a reason
    its `# lazy:` comment gives (start-up time of a light entry point, an optional dependency, an
    environment variable that must be set first)."""
    files = sorted((REPO_ROOT / "calm_dist").rglob("*.py"))
    missing = lazy_imports_without_reason(files, REPO_ROOT)
    assert not missing, ("imports inside functions without a `# lazy: <reason>` comment (hoist them to the "
                         "module's imports, or say why they stay):\n" + "\n".join(missing))


def test_lazy_import_check_flags_an_unexplained_import(tmp_path):
    module = tmp_path / "module.py"
    module.write_text(
        "def f():\n"
        "    # lazy: optional\n"
        "    import a\n"
        "\n"
        "    import b\n"
        "    x = 1\n"
        "    import c\n"
        "    if x:\n"
        "        import d  # lazy: optional\n"
        "        import e\n"
        "    def g():\n"
        "        import h\n"
    )
    assert lazy_imports_without_reason([module], tmp_path) == ["module.py:7", "module.py:10", "module.py:12"]


def test_planning_commands_start_without_torch_or_megatron():
    """calm-sweep plan/status and calm-config (--memory too) are arithmetic on the config: their
    modules must not pull in torch (~1 s) or megatron-core (~3 s) at start-up."""
    code = ("import sys, calm_dist.sweep.plan, calm_dist.sweep.collect, calm_dist.cli.config, calm_dist.flops; "
            "print(sorted(m for m in ('torch', 'megatron', 'megatron.core') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
