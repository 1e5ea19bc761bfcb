"""Layer rules: the engine never imports server/; models/ never imports the engine (only its config);
pallas_kernels/ imports only JAX, numpy, the standard library and itself; the scheduler and page allocator are plain Python."""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def modules_in(folder: str):
    return sorted((ROOT / folder).glob("*.py"))


def test_engine_never_imports_server():
    for path in modules_in("jaxserve"):
        if path.name in ("cli.py", "__main__.py"):  # the command line is where the server is started
            continue
        assert not any(m.startswith("jaxserve.server") for m in imported_modules(path)), path.name


def test_models_never_import_the_engine():
    allowed = ("jaxserve.config", "jaxserve.models", "jaxserve.pallas_kernels")
    for path in modules_in("models"):
        bad = [m for m in imported_modules(path) if m.startswith("jaxserve") and not m.startswith(allowed)]
        assert not bad, (path.name, bad)


def test_pallas_kernels_import_only_jax():
    for path in modules_in("pallas_kernels"):
        for m in imported_modules(path):
            top = m.lstrip(".").split(".")[0]
            assert m.startswith(".") or top in ("jax", "jaxlib", "numpy", "__future__") \
                or top in sys.stdlib_module_names, (path.name, m)


def test_scheduler_and_page_allocator_are_plain_python():
    for name in ("scheduler.py", "kv_cache_manager.py", "sequence.py", "buckets.py"):
        mods = imported_modules(ROOT / "jaxserve" / name)
        assert not any(m.split(".")[0] in ("jax", "flax", "numpy") for m in mods), (name, mods)
