"""Hashes of what a result is made from, computed without importing anything heavy.

Snakemake reruns a job when its params change, not when the package's code does: every rule
carries `code_fingerprint(<its CLI command>)` as a param. The fingerprint covers the command's
function in its module of the `cli/` package (with its argument function and the cli helpers
they call, in that module or imported from another cli module) plus every `pipeline` module it
imports, directly or through other modules, lazily or not. Files are read and parsed with `ast`,
never imported, so the Snakemake process computes it at parse time without loading torch.
Comments and formatting do not count (the syntax tree is hashed), so a reformatted module reruns
nothing; nor does moving a cli function to another cli module.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PACKAGE = "pipeline"
PACKAGE_DIR = Path(__file__).resolve().parent  # the package a job's `python -m pipeline` runs


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


def _from_module(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The module a `from ... import` reads from, a relative one resolved against `importer`."""
    base = node.module or ""
    if not node.level:
        return base
    here = importer.split(".") if is_package else importer.split(".")[:-1]
    return ".".join(here[: len(here) - (node.level - 1)] + ([base] if base else []))


def imported_modules(tree: ast.AST, importer: str, is_package: bool, root: Path = PACKAGE_DIR) -> set[str]:
    """Package modules imported anywhere in `tree` (top level or inside functions).

    `from pipeline import x` names module `pipeline.x` when it is one (else `pipeline` itself);
    relative imports are resolved against `importer`.
    """
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            base = _from_module(node, importer, is_package)
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


CLI = f"{PACKAGE}.cli"  # the command line: its modules count by function, not as files


def _cli_modules(root: Path) -> dict[str, Path]:
    """Module name -> file, of every module of the cli package."""
    return {CLI if p.name == "__init__.py" else f"{CLI}.{p.stem}": p for p in sorted((root / "cli").glob("*.py"))}


def _top_imports(path: Path) -> list[ast.Import | ast.ImportFrom]:
    return [n for n in parse(path).body if isinstance(n, (ast.Import, ast.ImportFrom))]


def _cli_names(module: str, path: Path, modules: dict[str, Path]) -> dict[str, tuple[str, str | None]]:
    """The names a cli module's top-level imports bind to the cli package: local name ->
    (module, its name there), or (module, None) for a module itself (`from . import args`)."""
    names: dict[str, tuple[str, str | None]] = {}
    for node in _top_imports(path):
        if not isinstance(node, ast.ImportFrom):
            continue
        base = _from_module(node, module, path.name == "__init__.py")
        if base in modules:
            for a in node.names:
                sub = f"{base}.{a.name}"
                names[a.asname or a.name] = (sub, None) if sub in modules else (base, a.name)
    return names


def _command_functions(command: str, root: Path = PACKAGE_DIR) -> list[tuple[str, ast.FunctionDef]]:
    """(cli module, function) of the function registered as `command` (`@command("name", args_fn)`
    in any module of the cli package), of its argument function and of the cli helpers they call
    by name, transitively: defined in the same module, or imported from another cli module (by
    name, or called as `module.helper`). In the order of the functions' names."""
    files = _cli_modules(root)
    defs = {m: {n.name: n for n in parse(p).body if isinstance(n, ast.FunctionDef)} for m, p in files.items()}
    names = {m: _cli_names(m, p, files) for m, p in files.items()}

    def find(module: str, name: str, hops: int = 0) -> tuple[str, ast.FunctionDef] | None:
        """The function `name` means in `module`: defined there, or imported (re-exports followed)."""
        if name in defs[module]:
            return module, defs[module][name]
        other, there = names[module].get(name, (None, None))
        return find(other, there, hops + 1) if there and hops < len(files) else None

    def called(module: str, fn: ast.FunctionDef):
        for n in ast.walk(fn):
            if isinstance(n, ast.Name):
                yield find(module, n.id)
            elif isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name):  # args._names
                other, there = names[module].get(n.value.id, (None, None))
                if other and there is None:
                    yield find(other, n.attr)

    todo: list[tuple[str, ast.FunctionDef] | None] = []
    for module, fns in defs.items():
        for fn in fns.values():
            for d in fn.decorator_list:
                if (isinstance(d, ast.Call) and getattr(d.func, "id", None) == "command" and d.args
                        and isinstance(d.args[0], ast.Constant) and d.args[0].value == command):
                    todo += [(module, fn)] + [find(module, a.id) for a in d.args[1:] if isinstance(a, ast.Name)]
    if not todo:
        raise KeyError(f"no CLI command {command!r} in {root / 'cli'}")
    seen: dict[tuple[str, str], tuple[str, ast.FunctionDef]] = {}
    while todo:
        found = todo.pop()
        if found is None or (found[1].name, found[0]) in seen:
            continue
        seen[found[1].name, found[0]] = found
        todo += called(*found)
    return [seen[k] for k in sorted(seen)]


def command_files(command: str, root: Path = PACKAGE_DIR) -> list[Path]:
    """The package files `python -m pipeline <command>` runs: every package module imported by
    its cli functions or by the top level of their cli modules (and of the cli package's
    `__init__.py`, which runs every command), transitively. The cli package's own files are not
    in it: only the command's functions in them count (`code_fingerprint`)."""
    files = _cli_modules(root)
    functions = _command_functions(command, root)
    roots = {PACKAGE}
    for module in {CLI} | {m for m, _ in functions}:
        top = ast.Module(body=_top_imports(files[module]), type_ignores=[])
        roots |= imported_modules(top, module, files[module].name == "__init__.py", root)
    for module, fn in functions:
        roots |= imported_modules(fn, module, files[module].name == "__init__.py", root)
    return module_closure({m for m in roots if m != CLI and not m.startswith(f"{CLI}.")}, root)


def code_fingerprint(command: str, extra: tuple[str | Path, ...] = (), root: Path = PACKAGE_DIR) -> str:
    """16 hex digits naming the code of one CLI command (plus `extra` files, e.g. a script).

    Changes when that command's cli function, any package module it runs, or an extra file
    changes in substance; stays when another stage's module or a comment changes.
    """
    h = hashlib.sha256()
    for _, fn in _command_functions(command, root):
        h.update(ast.dump(fn).encode())
    for p in command_files(command, root):
        h.update(str(p.relative_to(root)).encode() + b"\0" + _dump(p))
    for p in map(Path, extra):
        h.update(str(p).encode() + b"\0" + (_dump(p) if p.suffix == ".py" else p.read_bytes()))
    return h.hexdigest()[:16]
