"""The notebooks: each runs top to bottom on the tiny model (MEMFLOW_NB_MODEL=tiny, MEMFLOW_NB_FAST=1)
in a real kernel, they use only the public API, and none is committed with outputs."""
import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from jupyter_env import kernel_env

import memflow_nb as mf

ROOT = Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NAMES = ["01_quickstart", "02_prompt_timeline", "03_memory_bank", "04_memory_experiments", "05_studies"]
COLAB = "https://colab.research.google.com/github/memflow-nb/memflow_nb/blob/main/notebooks/"


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def outputs_of(nb, kind):
    """All outputs' `kind` payloads (e.g. "text/html") plus stream text, as one string per output."""
    out = []
    for c in code_cells(nb):
        for o in c.get("outputs", []):
            if o.get("output_type") == "stream" and kind == "stream":
                out.append(o["text"])
            elif kind in o.get("data", {}):
                d = o["data"][kind]
                out.append(d if isinstance(d, str) else json.dumps(d))
    return out


def test_the_notebooks_are_there():
    assert [p.stem for p in NOTEBOOKS] == NAMES


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebooks_have_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, c in enumerate(code_cells(nb)):
        assert c.outputs == [] and c.execution_count is None, f"{path.name} cell {i} has outputs: strip them"
    assert "widgets" not in nb.metadata, f"{path.name} carries saved widget state"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_badge_install_cell_and_model_switch(path):
    nb = nbformat.read(path, as_version=4)
    assert f"{COLAB}{path.name}" in nb.cells[0].source
    install = code_cells(nb)[0].source
    assert 'REPO_URL = "https://github.com/memflow-nb/memflow_nb"' in install
    assert "import google.colab" in install and "if IN_COLAB:" in install
    pip = [ln.strip() for ln in install.splitlines() if "%pip install" in ln]
    # Installed from REPO_URL, with Colab's torch pinned as a constraint so pip keeps it.
    assert len(pip) == 1 and "{REPO_URL}" in pip[0] and "-c /tmp/keep_torch.txt" in pip[0]
    assert "torch==" in install
    setup = code_cells(nb)[1].source
    assert 'MODEL = os.environ.get("MEMFLOW_NB_MODEL", "auto")' in setup and "MEMFLOW_NB_FAST" in setup


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_use_only_the_public_api(path):
    nb = nbformat.read(path, as_version=4)
    src = "\n".join(c.source for c in code_cells(nb))
    assert "import memflow_nb as mf" in src
    used = set(re.findall(r"\bmf\.(\w+)", src))
    assert used and used <= set(mf.__all__), f"not public: {sorted(used - set(mf.__all__))}"
    imports = {ln.strip() for ln in src.splitlines() if re.match(r"\s*(from|import)\s+memflow_nb", ln)}
    assert imports <= {"import memflow_nb as mf", "from memflow_nb import plots"}, imports
    from memflow_nb import plots

    used = set(re.findall(r"\bplots\.(\w+)", src)) | set(re.findall(r"\bmemflow_nb\.(\w+)", src))
    public_plots = {n for n in vars(plots) if n.startswith("plot_")}
    assert used <= public_plots | {"plots"}, f"not public: {sorted(used - public_plots)}"


def run_notebook(path: Path, tmp_path: Path, monkeypatch) -> nbformat.NotebookNode:
    """Execute a copy in a scratch tree shaped like the repo (notebooks/ beside data/), so files the
    notebook writes stay out of the checkout. The kernel inherits this process's environment."""
    (tmp_path / "notebooks").mkdir()
    copy = tmp_path / "notebooks" / path.name
    shutil.copy(path, copy)
    shutil.copytree(ROOT / "data", tmp_path / "data")
    for key, value in kernel_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")  # figures as outputs
    nb = nbformat.read(copy, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(copy.parent)}}).execute()
    return nb


@pytest.mark.slow
def test_01_quickstart_runs(tmp_path, monkeypatch):
    nb = run_notebook(ROOT / "notebooks" / "01_quickstart.ipynb", tmp_path, monkeypatch)
    printed = "".join(outputs_of(nb, "stream"))
    assert "RANDOM WEIGHTS" in printed  # the tiny model was used
    assert "plan: tiny 64x112" in printed and "text encoder cpu" in printed  # the plan, printed in the first cells
    assert "(33, 32, 48, 3) uint8" in printed  # FAST: 3 chunks at 32x48
    assert any("<video" in h for h in outputs_of(nb, "text/html"))
    assert (tmp_path / "notebooks" / "quickstart.mp4").stat().st_size > 0


@pytest.mark.slow
def test_02_prompt_timeline_runs(tmp_path, monkeypatch):
    nb = run_notebook(ROOT / "notebooks" / "02_prompt_timeline.ipynb", tmp_path, monkeypatch)
    printed = "".join(outputs_of(nb, "stream"))
    assert "segment 1: asked for 8 s" in printed  # effective switches of the lighthouse file
    assert "plan: tiny 64x112" in printed
    assert outputs_of(nb, "application/vnd.jupyter.widget-view+json")  # the editor was displayed
    # The prompt coach: the bad file's three warnings, none left once its suggestions are applied,
    # then the embedding similarities (said to be random for the tiny model), and no extension run (FAST).
    reports = [s for s in outputs_of(nb, "stream") if "prompt coach: 4 segments" in s]
    assert len(reports) == 3, reports
    assert "3 warnings" in reports[1] and "pronoun_start" in reports[1] and "description_drift" in reports[1]
    assert "hard_cut" in reports[1] and "0 warnings" in reports[2]
    assert "segment 1 now:" in printed and "segment 3 now: transition 4" in printed
    assert re.search(r"similarity with the previous segment: -, (-?[01]\.\d{3}, ){2}-?[01]\.\d{3}", printed)
    assert "tiny model: a random text encoder" in printed
    assert 'pip install "memflow_nb[prompt]"' in printed


@pytest.mark.slow
def test_03_memory_bank_runs(tmp_path, monkeypatch):
    nb = run_notebook(ROOT / "notebooks" / "03_memory_bank.ipynb", tmp_path, monkeypatch)
    figures = outputs_of(nb, "image/png")
    assert len(figures) >= 5  # bank timeline, thumbnails, attention mass, attention groups, scores, diffs
    html = "".join(outputs_of(nb, "text/html"))
    assert html.count("<video") >= 3  # memory on / off / SMA side by side


@pytest.mark.slow
def test_04_memory_experiments_runs(tmp_path, monkeypatch):
    nb = run_notebook(ROOT / "notebooks" / "04_memory_experiments.ipynb", tmp_path, monkeypatch)
    printed = "".join(outputs_of(nb, "stream"))
    assert "11 chunks at 32x48; segments start at chunks [0, 4, 7]" in printed  # FAST
    assert "frame 0 is held by 2 of 2 layers" in printed
    # thumbnail, reference, 4 bank timelines, attention + difference, empty choice, ablation
    assert len(outputs_of(nb, "image/png")) >= 9
    assert "".join(outputs_of(nb, "text/html")).count("<video") >= 8  # four ways + the empty-frame choice


@pytest.mark.slow
def test_05_studies_runs(tmp_path, monkeypatch):
    nb = run_notebook(ROOT / "notebooks" / "05_studies.ipynb", tmp_path, monkeypatch)
    printed = "".join(outputs_of(nb, "stream"))
    assert "3 runs done, 0 failed, 0 pending" in printed  # FAST: one story x off / on / SMA
    assert len(outputs_of(nb, "image/png")) >= 2  # per metric, per segment
    assert "".join(outputs_of(nb, "text/html")).count("<video") >= 3
    import pandas as pd

    results = pd.read_parquet(tmp_path / "notebooks" / "studies" / "out" / "results.parquet")
    assert sorted(results.setting) == ["off", "on", "sma"] and (results.returns == 1).all()
    on = results.set_index("setting").loc["on"]
    assert on.compressions > 0 and 0 <= on.revisit_retrieval <= 1
