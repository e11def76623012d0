"""The repository's layout (docs/CONTRIBUTING.md "Layout"): layers that import downward only, no import cycle, no
private import across packages, one name per op through every layer, a ``kernels/`` folder that never shadows an
installed ``kernels`` package, and references that resolve inside the repository."""
from __future__ import annotations

import ast
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Lowest first; a module may import its own layer or lower ones. The first matching prefix gives the layer.
LAYERS = (
    ("streamkern._checks", 0), ("streamkern.capture", 0),
    ("streamkern._backend", 1),
    ("streamkern.kernels", 2), ("streamkern.ops.reference", 2),
    ("streamkern.ops", 3),
    ("streamkern.streaming_kv", 4), ("streamkern.step_graph", 4),
    ("streamkern.distributed", 5),
    ("streamkern.pipelines", 6),
    ("streamkern.integrations", 7), ("streamkern.demo", 7), ("streamkern.testing", 7), ("streamkern.bench", 7),
)
PACKAGES = {"streamkern": ROOT / "streamkern", "streamkern.kernels": ROOT / "kernels",
            "streamkern.bench": ROOT / "bench"}


def _modules() -> dict[str, pathlib.Path]:
    """Every module of the installed package, by dotted name (``streamkern/``, ``kernels/``, ``bench/``)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            if package == "streamkern" and rel.parts[0] in ("kernels", "bench"):
                continue
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _layer(module: str) -> int | None:
    return next((layer for prefix, layer in LAYERS if module == prefix or module.startswith(prefix + ".")), None)


def _imports(module: str, path: pathlib.Path) -> set[str]:
    """The streamkern modules ``module`` imports anywhere in its file (function-level imports included), as the
    module each name resolves to."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in (*MODULES, "streamkern._C") else base
                     for a in node.names]
        else:
            continue
        for name in names:
            if name == "streamkern._C":   # the compiled extension
                continue
            while name and name not in MODULES:   # "pkg.mod.func" -> "pkg.mod"
                name = name.rpartition(".")[0]
            if name.startswith("streamkern") and name != module:
                out.add(name)
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    assert [m for m in MODULES if m != "streamkern" and _layer(m) is None] == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "streamkern"))
def test_imports_go_downward(module):
    """``streamkern/__init__.py`` re-exports from every layer; every other module imports only its own layer and
    the ones below it."""
    upward = [f"{dep} (layer {_layer(dep)})" for dep in sorted(GRAPH[module])
              if dep != "streamkern" and _layer(dep) > _layer(module)]
    assert upward == [], f"{module} (layer {_layer(module)}) imports upward"
    assert "streamkern" not in GRAPH[module] or _layer(module) >= 7, \
        f"{module} imports the top-level package, which imports every layer"


def test_no_import_cycle():
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for dep in sorted(GRAPH.get(m, ())):
            if dep == "streamkern":
                continue
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def test_no_private_import_across_packages():
    """A private module (``_name``) is imported only from inside the package that holds it (``streamkern._backend``
    by anything in streamkern, ``streamkern.kernels._grid`` only by kernels)."""
    bad = []
    for module, deps in GRAPH.items():
        for dep in deps:
            parts = dep.split(".")
            private = [i for i, p in enumerate(parts) if p.startswith("_") and not p.startswith("__")]
            if not private or dep == "streamkern._C":
                continue
            holder = ".".join(parts[:private[0]])
            if not (module == holder or module.startswith(holder + ".")):
                bad.append(f"{module} -> {dep}")
    assert bad == []


# --- one name per op ------------------------------------------------------------------------------------------

OPS = sorted(p.stem for p in (ROOT / "streamkern" / "ops").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("op", OPS)
def test_one_name_per_op(op):
    """Every file of an op carries the op's module name: its reference, its Triton launcher (``triton("<op>:...")``),
    its C++ and CUDA sources and header where it has a C++ backend, its test and its benchmark."""
    source = (ROOT / "streamkern" / "ops" / f"{op}.py").read_text()
    expected = [f"tests/test_{op}.py"]
    if re.search(r"\bdefine_op\(", source):
        expected += [f"streamkern/ops/reference/{op}.py", f"bench/bench_{op}.py"]
    launchers = set(re.findall(r'\btriton\("(\w+):', source))
    assert launchers <= {op}, f"{op}'s Triton launchers live in kernels/{sorted(launchers)}.py"
    if launchers:
        expected.append(f"kernels/{op}.py")
    if re.search(r'\bcxx\("', source):
        expected += [f"csrc/cpu/{op}.cpp", f"csrc/include/streamkern/ops/{op}.h"]
    missing = [p for p in expected if not (ROOT / p).is_file()]
    assert missing == []


def test_sources_carry_an_op_name():
    """Each op source in kernels/ and csrc/ is named for an op, or for what the ops share (listed here)."""
    shared = {"attention_tile", "tile_classes", "token_copy", "ordered_bits", "_constants", "_grid", "__init__",
              "module"}
    stems = {p.stem.removesuffix("_binding") for d in ("kernels", "csrc/cpu", "csrc/cuda")
             for p in (ROOT / d).glob("*.*") if p.suffix in (".py", ".cpp", ".cu")}
    stems |= {p.stem for p in (ROOT / "csrc/include/streamkern/ops").glob("*.h")}
    assert sorted(stems - set(OPS) - shared) == []


# --- the kernels/ folder never shadows an installed package -------------------------------------------------


def _python_at_root(code: str, tmp_path, standin: bool) -> subprocess.CompletedProcess:
    """``python -c code`` run from the repository root (so the root is ``sys.path[0]``), with a stand-in
    top-level ``kernels`` package installed on ``PYTHONPATH`` when ``standin``."""
    env = dict(os.environ)
    if standin:
        (tmp_path / "kernels").mkdir()
        (tmp_path / "kernels" / "__init__.py").write_text("class CUDAProperties:\n    pass\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_root_does_not_shadow_an_installed_kernels_package(tmp_path):
    """transformers does ``from kernels import CUDAProperties`` (Hugging Face's kernels package): from a clone's
    root that must reach the installed package, and streamkern's Triton kernels must still import."""
    run = _python_at_root("import sys; from kernels import CUDAProperties; import kernels; "
                          "import streamkern.kernels.frame_write as k; print(kernels.__file__); print(k.__name__); "
                          "print(sys.path[0] in ('', '.'))", tmp_path, standin=True)
    assert run.returncode == 0, run.stderr
    installed, triton_module, root_first = run.stdout.split()
    assert installed == str(tmp_path / "kernels" / "__init__.py")
    assert triton_module == "streamkern.kernels.frame_write" and root_first == "True"


def test_root_kernels_folder_is_not_a_top_level_package(tmp_path):
    """With nothing installed under the name, ``kernels`` from the root is an empty namespace package (what a
    folder without ``__init__.py`` gives): no file, no version, no submodules, so availability checks that import
    it (transformers') read "not installed"."""
    run = _python_at_root("import kernels\nprint(getattr(kernels, '__file__', None), list(kernels.__path__), "
                          "hasattr(kernels, '__version__'))\nimport kernels.frame_write", tmp_path, standin=False)
    assert run.stdout.split() == ["None", "[]", "False"], run.stderr
    assert "ModuleNotFoundError: No module named 'kernels.frame_write'" in run.stderr


def test_transformers_sees_no_kernels_package_from_the_root(tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed here (it is in `make test-fastvideo`'s "
                                               "venv)")
    run = _python_at_root("from transformers.utils.import_utils import is_kernels_available\n"
                          "print(is_kernels_available())", tmp_path, standin=False)
    assert run.returncode == 0 and run.stdout.split()[-1:] == ["False"], run.stderr


# --- references resolve inside the repository ---------------------------------------------------------------


def _tracked(*patterns: str) -> list[pathlib.Path]:
    files = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True).stdout.split()
    return [ROOT / f for f in files if (ROOT / f).is_file()]


needs_git = pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")


@needs_git
def test_markdown_links_resolve():
    bad = []
    for md in _tracked("*.md"):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", md.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            if not (md.parent / target).exists():
                bad.append(f"{md.relative_to(ROOT)} -> {target}")
    assert bad == []


@needs_git
def test_contract_citations_resolve():
    """Code and docs cite the contract as ``docs/contract.md §N``; every cited section exists, and nothing cites a
    file outside the repository."""
    contract = (ROOT / "docs" / "contract.md").read_text()
    sections = set(re.findall(r"^#+ (\d+(?:\.\d+)?)[. ]", contract, flags=re.M))
    bad = []
    for path in _tracked():
        if path.suffix not in (".py", ".md", ".h", ".cpp", ".cu", ".cuh", ".sh", ".txt", ".toml") or \
                "bench/results" in str(path) or path == pathlib.Path(__file__).resolve():
            continue
        text = path.read_text(errors="replace")
        if "../shared" in text or "/work/" in text or "DESIGN.md" in text:
            bad.append(f"{path.relative_to(ROOT)}: cites a file outside the repository")
        for cited in re.findall(r"contract\.md §(\d+(?:\.\d+)?)", text):
            if cited not in sections:
                bad.append(f"{path.relative_to(ROOT)}: §{cited} is not a section of docs/contract.md")
    assert bad == []


@needs_git
def test_repository_paths_named_in_code_and_docs_exist():
    """Every path into the repository that a docstring, comment or document names (``kernels/attention_tile.py``,
    ``docs/contract.md``) exists; headers may be named from ``csrc/include``."""
    named = re.compile(r"(?<![\w/.-])((?:streamkern|kernels|csrc|tests|bench|docs|tools)/[\w/.-]+"
                       r"\.(?:py|cpp|cu|h|cuh|md|sh|json|jsonl|txt))\b")
    bad = []
    for path in _tracked():
        if path.suffix not in (".py", ".md", ".h", ".cpp", ".cu", ".cuh", ".sh", ".txt", ".toml") or \
                "bench/results" in str(path):
            continue
        for name in named.findall(path.read_text(errors="replace")):
            if "foo" not in name and not any((base / name).exists() for base in
                                             (ROOT, ROOT / "csrc/include", ROOT / "csrc/include/streamkern")):
                bad.append(f"{path.relative_to(ROOT)} names {name}")
    assert bad == []
