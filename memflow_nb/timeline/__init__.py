"""Prompt timelines.

model         Timeline, Segment, WeightedPrompt, TimelineError: the validated timeline and its chunk mapping
scope         Scope timeline JSON (versions 1.0-2.1) read and write
official      official MemFlow JSONL prompts and its switch rule
clock         frames per second, video frames per chunk, chunk <-> time (needs no third-party package)
conditioning  prompt blends, transitions and the per-chunk conditioning plan

Nothing is imported here, so `memflow_nb.timeline.clock` loads without pydantic or torch.
"""
