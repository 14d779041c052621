"""Hashes of what a result is made from, computed without importing anything heavy.

Snakemake reruns a job when its params change, not when the package's code does: every rule
carries `code_fingerprint(<its CLI command>)` as a param. The fingerprint covers the command's
function in `cli.py` (and the cli helpers it calls) plus every `pipeline` module it imports,
directly or through other modules, lazily or not. Files are read and parsed with `ast`, never
imported, so the Snakemake process computes it at parse time without loading torch. Comments and
formatting do not count (the syntax tree is hashed), so a reformatted module reruns nothing.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PACKAGE = "pipeline"
PACKAGE_DIR = Path(__file__).resolve().parent  # the package a job's `python -m pipeline` runs


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (encoder weights can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _stamp(path: Path) -> tuple[Path, int, int]:
    """The cache key of a file's derived data: its path, mtime and size."""
    st = path.stat()
    return path, st.st_mtime_ns, st.st_size


def parse(path: Path) -> ast.Module:
    """The file's syntax tree (cached while the file is unchanged)."""
    return _parse(*_stamp(path))


@functools.lru_cache(maxsize=512)
def _parse(path: Path, mtime_ns: int, size: int) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _dump(path: Path) -> bytes:
    """`ast.dump` of the file's tree (cached like `parse`: every command shares most modules)."""
    return _dump_cached(*_stamp(path))


@functools.lru_cache(maxsize=512)
def _dump_cached(path: Path, mtime_ns: int, size: int) -> bytes:
    return ast.dump(_parse(path, mtime_ns, size)).encode()


def _file_imports(path: Path, name: str, root: Path) -> frozenset[str]:
    """`imported_modules` of a whole module file (cached like `parse`)."""
    return _file_imports_cached(*_stamp(path), name, root)


@functools.lru_cache(maxsize=1024)
def _file_imports_cached(path: Path, mtime_ns: int, size: int, name: str, root: Path) -> frozenset[str]:
    return frozenset(imported_modules(_parse(path, mtime_ns, size), name, path.name == "__init__.py", root))


def module_file(name: str, root: Path = PACKAGE_DIR) -> Path | None:
    """Source file of the package module `name` ("pipeline.mil.models.abmil"), None when not one."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = root.joinpath(*parts[1:])
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def imported_modules(tree: ast.AST, importer: str, is_package: bool, root: Path = PACKAGE_DIR) -> set[str]:
    """Package modules imported anywhere in `tree` (top level or inside functions).

    `from pipeline import x` names module `pipeline.x` when it is one (else `pipeline` itself);
    relative imports are resolved against `importer`.
    """
    here = importer.split(".") if is_package else importer.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = here[: len(here) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            if base.split(".")[0] != PACKAGE:
                continue
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if module_file(f"{base}.{a.name}", root))
    return found


def module_closure(roots: set[str], root: Path = PACKAGE_DIR) -> list[Path]:
    """Files of `roots` and of every package module they import, transitively, with the
    `__init__.py` of each package on the way (importing `a.b.c` runs `a` and `a.b` first)."""
    seen: dict[str, Path] = {}
    todo = set(roots)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        todo.update(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) not in seen)
        path = module_file(name, root)
        if path is None or name in seen:
            continue
        seen[name] = path
        todo.update(_file_imports(path, name, root) - set(seen))
    return sorted(seen.values())


def _command_functions(command: str, root: Path = PACKAGE_DIR) -> list[ast.FunctionDef]:
    """The cli function registered as `command`, its argument function and the cli helpers
    they call (by name), transitively."""
    tree = parse(root / "cli.py")
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    start = []
    for fn in defs.values():
        for d in fn.decorator_list:
            if (isinstance(d, ast.Call) and getattr(d.func, "id", None) == "command" and d.args
                    and isinstance(d.args[0], ast.Constant) and d.args[0].value == command):
                start += [fn] + [defs[a.id] for a in d.args[1:] if isinstance(a, ast.Name) and a.id in defs]
    if not start:
        raise KeyError(f"no CLI command {command!r} in {root / 'cli.py'}")
    seen: dict[str, ast.FunctionDef] = {}
    todo = start
    while todo:
        fn = todo.pop()
        if fn.name in seen:
            continue
        seen[fn.name] = fn
        todo += [defs[n.id] for n in ast.walk(fn) if isinstance(n, ast.Name) and n.id in defs]
    return [seen[k] for k in sorted(seen)]


def command_files(command: str, root: Path = PACKAGE_DIR) -> list[Path]:
    """The package files `python -m pipeline <command>` runs (cli.py's own imports included)."""
    cli_tree = parse(root / "cli.py")
    top = ast.Module(body=[n for n in cli_tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])
    roots = imported_modules(top, f"{PACKAGE}.cli", False, root) | {PACKAGE}
    for fn in _command_functions(command, root):
        roots |= imported_modules(fn, f"{PACKAGE}.cli", False, root)
    return module_closure(roots, root)


def code_fingerprint(command: str, extra: tuple[str | Path, ...] = (), root: Path = PACKAGE_DIR) -> str:
    """16 hex digits naming the code of one CLI command (plus `extra` files, e.g. a script).

    Changes when that command's cli function, any package module it runs, or an extra file
    changes in substance; stays when another stage's module or a comment changes.
    """
    h = hashlib.sha256()
    for fn in _command_functions(command, root):
        h.update(ast.dump(fn).encode())
    for p in command_files(command, root):
        h.update(str(p.relative_to(root)).encode() + b"\0" + _dump(p))
    for p in map(Path, extra):
        h.update(str(p).encode() + b"\0" + (_dump(p) if p.suffix == ".py" else p.read_bytes()))
    return h.hexdigest()[:16]
