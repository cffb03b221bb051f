"""Packaging: declared dependencies match what the package imports; environment.yml installs the
project itself; the engine needs only torch; the README's main job needs no notebook extra."""
import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "memflow_nb"
# Modules whose imports are an extra's business, by extra.
EXTRA_MODULES = {
    "notebook": re.compile(r"^(widgets|plots|notebook/.+)\.py$"),  # the editor and the plots
    "prompt": re.compile(r"^prompt_extend\.py$"),  # a small local language model
    "study": re.compile(r"^study_\w+\.py$"),  # the Parquet results table
    "eval": re.compile(r"^eval_models\.py$"),  # CLIP / DINOv2 metrics
}
# Import name -> distribution name, where they differ (pydantic-core comes with pydantic, pinned by it).
DISTRIBUTION = {"PIL": "pillow", "pydantic_core": "pydantic"}
# In an extra for its program or for the notebooks, not for an import of the package:
# `jupyter lab notebooks/`; pandas reads the study table back in notebooks/05_studies.ipynb.
TOOLS = {"jupyterlab", "pandas"}


def _norm(req: str) -> str:
    return re.match(r"\s*([A-Za-z0-9_.\-]+)", req).group(1).lower().replace("_", "-")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _third_party_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    names -= set(sys.stdlib_module_names) | {"__future__", "memflow_nb"}
    return {_norm(DISTRIBUTION.get(n, n)) for n in names}


def test_dependencies_match_imports():
    core, by_extra = set(), {name: set() for name in EXTRA_MODULES}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        owners = [name for name, pattern in EXTRA_MODULES.items() if pattern.match(rel)]
        assert len(owners) <= 1, f"{rel} belongs to several extras: {owners}"
        (by_extra[owners[0]] if owners else core).update(_third_party_imports(path))
    py = _pyproject()
    declared = {_norm(r) for r in py["dependencies"]}
    assert core == declared, f"imported, undeclared: {core - declared}; declared, unused: {declared - core}"
    extras = py["optional-dependencies"]
    assert set(extras) == set(EXTRA_MODULES) | {"dev"}, set(extras)
    for name, imported in by_extra.items():
        extra = {_norm(r) for r in extras[name]}
        assert imported - core == extra - TOOLS, (f"{name} modules import, undeclared: {imported - core - extra}; "
                                                  f"in the {name} extra, unused: {extra - TOOLS - imported}")
    dev_extras = {m.group(1) for r in extras["dev"] if (m := re.fullmatch(r"memflow_nb\[([\w,]+)\]", r))}
    assert {e for group in dev_extras for e in group.split(",")} == set(EXTRA_MODULES), extras["dev"]


def test_environment_installs_the_project_instead_of_repeating_its_dependencies():
    text = (ROOT / "environment.yml").read_text()
    items = [(len(m.group(1)), m.group(2)) for ln in text.split("dependencies:", 1)[1].splitlines()
             if (m := re.match(r"(\s*)-\s+([^#]+?)\s*(#.*)?$", ln))]
    top = min(indent for indent, _ in items)
    conda = [item for indent, item in items if indent == top]
    pip = [item for indent, item in items if indent > top]
    assert [c.split("=")[0] for c in conda] == ["python", "pip", "pip:"], conda
    assert len(pip) == 1, f"environment.yml repeats dependencies; pip should install only the project: {pip}"
    m = re.fullmatch(r"-e \.\[([\w,]+)\]", pip[0])
    assert m, pip[0]
    extras = set(m.group(1).split(","))
    assert extras == {"notebook", "dev"} and extras <= set(_pyproject()["optional-dependencies"])


def test_engine_and_benchmark_need_only_torch():
    """GPU machines may carry torch alone: the engine, speed modes and benchmark must not pull in
    the notebook / timeline / tokenizer dependencies at import time."""
    import subprocess
    import sys

    code = ("import sys, memflow_nb.bench, memflow_nb.fast, memflow_nb.engine.steps\n"
            "heavy = [m for m in ('pydantic', 'ftfy', 'mediapy', 'ipywidgets', 'tokenizers', 'matplotlib') "
            "if m in sys.modules]\n"
            "assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_readme_main_job_needs_no_notebook_extra(tmp_path):
    """The CLI writes the tiny model's video with ipywidgets unavailable, and never imports the
    editor or the plots (so `pip install -e .` without [notebook] runs it)."""
    out = tmp_path / "lighthouse.mp4"
    code = ("import sys\n"
            "sys.modules['ipywidgets'] = None  # importing it now raises ImportError\n"
            "from memflow_nb.cli import main\n"
            f"rc = main(['generate', 'data/timeline_lighthouse.scope.json', '-o', {str(out)!r}, '--model', 'tiny',\n"
            "           '--frames', '9', '--no-progress'])\n"
            "loaded = [m for m in sys.modules if m.startswith('memflow_nb.notebook')]\n"
            "assert rc == 0 and not loaded, (rc, loaded)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0
