"""memflow_nb: a Jupyter-first toolkit for MemFlow streaming text-to-video."""
