"""Environment for kernels started by the notebook and browser tests.

The kernels run this interpreter (a "python3" kernelspec written to a scratch JUPYTER_PATH, which
wins over any user or system one), import memflow_nb from this checkout, and use the tiny model
in fast mode (MEMFLOW_NB_MODEL=tiny, MEMFLOW_NB_FAST=1: 32x48 pixels, a few chunks).
"""
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def kernel_env(tmp: Path) -> dict:
    """Variables to add to the environment of a kernel (or of the Jupyter server that starts it)."""
    spec = tmp / "jupyter-path" / "kernels" / "python3"
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (memflow_nb tests)", "language": "python"}))
    paths = [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    return {"JUPYTER_PATH": str(tmp / "jupyter-path"), "PYTHONPATH": os.pathsep.join(paths),
            "MEMFLOW_NB_MODEL": "tiny", "MEMFLOW_NB_FAST": "1", "HF_HUB_OFFLINE": "1",
            "IPYTHONDIR": str(tmp / "ipython")}
