"""environment.yml and pyproject.toml declare the same dependencies with the same bounds."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _norm(req: str) -> tuple[str, str]:
    m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(.*)", req)
    return m.group(1).lower().replace("_", "-"), m.group(2).replace(" ", "")


def test_environment_matches_pyproject():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_norm(r) for r in py["dependencies"]}
    for extra in py["optional-dependencies"].values():
        wanted |= {_norm(r) for r in extra}
    env, in_deps = [], False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        in_deps = in_deps or line.startswith("dependencies:")
        m = in_deps and re.match(r"\s*-\s+([^#]+?)\s*(#.*)?$", line)
        if m and ":" not in m.group(1) and not m.group(1).startswith(("-e", "python=", "pip")):
            env.append(m.group(1))
    got = {_norm(r) for r in env}
    assert got == wanted, f"only in environment.yml: {got - wanted}; only in pyproject: {wanted - got}"


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
