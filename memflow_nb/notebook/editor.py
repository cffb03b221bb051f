"""A prompt-timeline editor for notebooks, built from core ipywidgets only (no extension to
install, so it runs in Colab and JupyterLab).

    editor = TimelineEditor(pipe, mf.Timeline.from_scope_json("data/timeline_lighthouse.scope.json"))
    editor                      # shows it; the buttons call the methods below

Segments follow each other: segment i lasts `duration` seconds and the next one starts where it
ends. A Scope file with gaps is read by giving each gap to the segment before it, which is what
the timeline model does with gaps anyway, so the video does not change.

The video is a `memflow_nb.generation.Session`: it keeps the chunks, the checkpoints, stop and
regenerate-from; the editor shows it. Generate and "Regenerate from here" run in a background
thread, so the kernel stays free to receive the Stop click; the session checks Stop between
chunks. The same actions are plain methods (`generate`, `regenerate_from`, `stop`), which run in
the calling thread.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import ipywidgets as W
import numpy as np

from ..generation import Session
from ..timeline.clock import FPS, frames_of_chunks, seconds_of_frames
from ..timeline.model import Timeline, TimelineError
from .controls import button, field
from .files import ScopeFilePanel
from .messages import RED_BORDER, errors_html, findings_html
from .run import RunPanel
from .segments import PromptsLike, SegmentBox, prompt_list

__all__ = ["TimelineEditor"]


class TimelineEditor:
    """Edit a prompt timeline and generate from it, in a notebook.

    Args:
        pipe: a loaded pipeline (`memflow_nb.load(...)`).
        timeline: a `Timeline` to start from (default: one empty 5-second segment).
        height, width: video size in pixels (default: the timeline's, else the pipeline's default).
        seed: noise seed (default: the timeline's, else 0).
        max_chunks: make at most this many chunks (0: the whole timeline); for quick previews.

    Python API (what the buttons do):
        add_segment / remove_segment / move_segment / set_prompts: edit segments.
        timeline: the edited `Timeline` (raises `TimelineError`); assigning one loads it.
        validate(): the timeline, or None with the field errors shown in the editor.
        generate(): make the video; frames uint8 [T, H, W, 3] (None after an error, shown in the editor).
        regenerate_from(chunk): keep chunks before `chunk`, regenerate the rest with the current timeline.
        stop(): stop after the chunk in progress.
        frames: the current video, uint8 [T, H, W, 3] (None before the first chunk).
        session: the `Session` holding the video (chunks, checkpoints).
        import_scope_json(source) / export_scope_json(): Scope timeline files (dict, JSON text or path).
        wait(timeout): block until a background run started by a button has finished.
    Widgets are attributes (generate_button, stop_button, regenerate_button, regenerate_chunk,
    seed, height, width, max_chunks, segments, json_text, import_button, export_button, upload,
    download, error_box, status, progress, preview, video, log); `widget` is the whole editor.
    """

    def __init__(self, pipe, timeline: Optional[Timeline] = None, *, height: Optional[int] = None,
                 width: Optional[int] = None, seed: Optional[int] = None, max_chunks: int = 0):
        self.pipe = pipe
        self.segments: list[SegmentBox] = []
        self._denoising_steps = None  # kept from an imported file, not edited here
        self._coached: Optional[Timeline] = None  # the timeline the coach's findings are about
        self._scope = None  # what an imported Scope file held beyond the timeline (written back on export)
        self._errors: list[tuple[str, str]] = []
        self._loading = False  # no re-validation per field while a whole timeline is being loaded
        self.session = Session(pipe)
        self.runner = RunPanel(self.session, self._request, self._show_errors)
        self._callback = self.runner.callback
        self._build(height, width, seed, max_chunks)
        if timeline is not None:
            self.timeline = timeline
            if height is not None or width is not None or seed is not None:
                self._override(height, width, seed)
        else:
            self.add_segment("", duration=5.0)

    # -- layout ------------------------------------------------------------------------------

    def _build(self, height, width, seed, max_chunks) -> None:
        dh, dw = getattr(self.pipe, "default_size", (480, 832))
        self.summary = W.HTML()
        self.segment_box = W.VBox(layout=W.Layout(width="100%"))
        self.add_button = button("segment", "plus", "add a segment at the end (a copy of the last one's prompts)")
        self.add_button.layout.align_self = "flex-start"  # not stretched across the editor
        self.seed = field(W.IntText, "seed", "12em", value=0 if seed is None else seed)
        self.height = field(W.IntText, "height", "10em", value=height or dh, tooltip="a multiple of 16")
        self.width = field(W.IntText, "width", "10em", value=width or dw, tooltip="a multiple of 16")
        self.max_chunks = field(W.IntText, "max chunks", "11em", value=max_chunks, tooltip="0: the whole timeline")
        self.error_box = W.HTML()
        r = self.runner
        self.generate_button, self.stop_button, self.progress, self.status, self.log = (
            r.generate_button, r.stop_button, r.progress, r.status, r.log)
        self.preview, self.video = r.preview, r.video
        self.regenerate_chunk, self.regenerate_button, self.regenerate_info = (
            r.regenerate_chunk, r.regenerate_button, r.regenerate_info)
        self.files = ScopeFilePanel(self.import_scope_json, self.export_scope_json, self._callback)
        self.json_text, self.import_button, self.export_button = (self.files.json_text, self.files.import_button,
                                                                  self.files.export_button)
        self.upload, self.download = self.files.upload, self.files.download
        self.add_button.on_click(self._callback(lambda _: self.add_segment()))
        for w in (self.seed, self.height, self.width, self.max_chunks):
            w.observe(self._on_field, names="value")
        self.widget = W.VBox([
            self.summary,
            self.segment_box,
            self.add_button,
            W.HBox([self.seed, self.height, self.width, self.max_chunks]),
            r.controls,
            self.error_box,
            r.media,
            r.regenerate_controls,
            self.files.widget,
            self.log,
        ], layout=W.Layout(width="100%"))

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    # -- editing -----------------------------------------------------------------------------

    def add_segment(self, prompts: Optional[PromptsLike] = None, duration: float = 5.0, transition_steps: int = 0,
                    transition_method: str = "slerp", index: Optional[int] = None) -> int:
        """Insert a segment (default: at the end) and return its index.

        prompts: "text", or a list of "text" / (text, weight) / {"text", "weight"}; None copies the
        last segment's prompts (keeping a description identical across segments keeps it stable).
        """
        if prompts is None:
            prompts = [(r.text.value, r.weight.value) for r in self.segments[-1].prompts] if self.segments else ""
        seg = SegmentBox(prompt_list(prompts), duration, transition_steps, transition_method, wrap=self._callback,
                         on_edit=self._refresh, on_remove=lambda box: self.remove_segment(self.segments.index(box)),
                         on_move=lambda box, by: self.move_segment(self.segments.index(box),
                                                                   self.segments.index(box) + by),
                         on_copy=lambda box, source: self.copy_subject(source, self.segments.index(box)))
        index = len(self.segments) if index is None else index
        self.segments.insert(index, seg)
        self._relayout()
        return index

    def remove_segment(self, index: int) -> None:
        """Remove segment `index` (the ones after it move earlier)."""
        del self.segments[index]
        self._relayout()

    def move_segment(self, index: int, to: int) -> None:
        """Move segment `index` to position `to` (out-of-range moves are ignored)."""
        if 0 <= index < len(self.segments) and 0 <= to < len(self.segments) and index != to:
            self.segments.insert(to, self.segments.pop(index))
            self._relayout()

    def set_prompts(self, index: int, prompts: PromptsLike) -> None:
        """Replace segment `index`'s prompt blend."""
        self.segments[index].set_prompts(prompt_list(prompts))

    def copy_subject(self, source: int, target: int) -> bool:
        """Make segment `target`'s main prompt describe its subject word for word as segment
        `source` does (`memflow_nb.prompt_coach.copy_subject`); False, with the reason shown, when
        there is nothing to copy."""
        from ..prompt_coach import copy_subject

        tl = self.validate()
        new = copy_subject(tl, source, target) if tl is not None else None
        if new is None:
            if tl is not None:
                self.runner.set_status(f"Nothing to copy: segment {source + 1} has no subject description the "
                                       f"coach can find, or segment {target + 1}'s prompt has none to replace.")
            return False
        self.set_prompts(target, [(p.text, p.weight) for p in new.segments[target].prompts])
        return True

    def _coach(self, tl: Optional[Timeline]) -> None:
        """The prompt coach's findings in each segment box. Only on a valid timeline, and only when
        the prompts or times changed (typing commits on leaving a prompt box, so this is debounced)."""
        from ..prompt_coach import coach

        if tl is None or tl == self._coached:
            return
        self._coached = tl
        coaching = coach(tl)
        for i, s in enumerate(self.segments):
            s.coach.value = findings_html(coaching.for_segment(i))

    def _relayout(self) -> None:
        self.segment_box.children = [s.box for s in self.segments]
        self._refresh()

    # -- the timeline ------------------------------------------------------------------------

    def _fields(self) -> dict:
        segs, start = [], 0.0
        for s in self.segments:
            segs.append(s.values(start))
            start = segs[-1]["end"]
        return {"segments": segs, "unit": "seconds", "seed": self.seed.value, "height": self.height.value,
                "width": self.width.value, "denoising_steps": self._denoising_steps, "scope": self._scope}

    @property
    def timeline(self) -> Timeline:
        """The timeline as edited (validated; raises `TimelineError` naming the bad fields)."""
        return Timeline(**self._fields())

    @timeline.setter
    def timeline(self, tl: Timeline) -> None:
        self._load(tl)

    @property
    def errors(self) -> list[tuple[str, str]]:
        """(field path, message) of the problems shown now."""
        return list(self._errors)

    def validate(self) -> Optional[Timeline]:
        """The timeline, or None with its errors shown in the editor."""
        try:
            tl = self.timeline
        except TimelineError as e:
            self._show_errors(e.errors)
            return None
        self._show_errors([])
        return tl

    def _load(self, tl: Timeline) -> None:
        if tl.unit == "chunks":  # the editor works in seconds; Scope's writer converts exactly
            tl = Timeline.from_scope_json(tl.to_scope_json())
        segs = tl.segments
        # Each segment lasts until the next one starts (a gap belongs to the segment before it).
        starts = [0.0] + [s.start for s in segs[1:]]
        ends = starts[1:] + [segs[-1].end]
        gaps = segs[0].start != 0 or any(a.end != b.start for a, b in zip(segs, segs[1:]))
        self._loading = True
        try:
            self.segments = []
            for s, a, b in zip(segs, starts, ends):
                self.add_segment([(p.text, p.weight) for p in s.prompts], duration=round(b - a, 6),
                                 transition_steps=s.transition_steps or 0,
                                 transition_method=s.transition_method or "slerp")
            if tl.seed is not None:
                self.seed.value = tl.seed
            if tl.height is not None:
                self.height.value, self.width.value = tl.height, tl.width
            self._denoising_steps, self._scope = tl.denoising_steps, tl.scope
        finally:
            self._loading = False
        self._relayout()
        if gaps:
            self.runner.set_status("The timeline had gaps; each now belongs to the segment before it (the same video).")

    def _override(self, height, width, seed) -> None:
        self._loading = True
        try:
            if height is not None:
                self.height.value = height
            if width is not None:
                self.width.value = width
            if seed is not None:
                self.seed.value = seed
        finally:
            self._loading = False
        self._refresh()

    def _on_field(self, change) -> None:
        self._callback(lambda _: self._refresh())(change)

    def _refresh(self) -> None:
        """Re-validate after an edit: errors, segment headers with their chunks, the summary."""
        if self._loading:
            return
        tl = self.validate()
        plan = tl.chunk_plan() if tl is not None else ()
        start = 0.0
        for i, s in enumerate(self.segments):
            end = start + (s.duration.value or 0.0)
            chunks = [k for k, j in enumerate(plan) if j == i]
            where = "" if tl is None else "never plays (shorter than a chunk)" if not chunks else \
                f"chunk {chunks[0]}" if len(chunks) == 1 else f"chunks {chunks[0]}&ndash;{chunks[-1]}"
            s.header.value = (f"<b>Segment {i + 1}</b> &nbsp; {start:g}&ndash;{end:g} s"
                              + (f" &nbsp;<span style='color:#666'>{where}</span>" if where else ""))
            s.up.disabled, s.down.disabled = i == 0, i == len(self.segments) - 1
            others = [(f"segment {j + 1}", j) for j in range(len(self.segments)) if j != i]
            if [o for o in s.copy_from.options] != others:
                s.copy_from.options = others
            s.copy_button.disabled = not others
            start = end
        self._coach(tl)
        if tl is None:
            self.summary.value = "<b>Timeline</b> (fix the fields marked in red)"
        else:
            n = tl.num_chunks
            frames = frames_of_chunks(n)
            self.summary.value = (f"<b>Timeline</b>: {len(tl.segments)} segment(s), {n} chunks, "
                                  f"{seconds_of_frames(frames):.2f} s of video ({frames} frames at {FPS} fps); "
                                  f"{tl.switch_summary()}")

    def _field_widget(self, path: str):
        parts = path.split(".")
        if parts[0] in ("seed", "height", "width", "max_chunks"):
            return getattr(self, parts[0])
        if len(parts) < 3 or parts[0] != "segments" or not parts[1].isdigit() or int(parts[1]) >= len(self.segments):
            return None
        seg = self.segments[int(parts[1])]
        if parts[2] == "prompts":
            if len(parts) >= 5 and parts[3].isdigit() and int(parts[3]) < len(seg.prompts):
                return getattr(seg.prompts[int(parts[3])], parts[4], None)
            return seg.add_prompt
        return {"start": seg.duration, "end": seg.duration, "transition_steps": seg.transition_steps,
                "transition_method": seg.transition_method}.get(parts[2])

    def _show_errors(self, errors: Sequence[tuple[str, str]], title: str = "Fix these fields") -> None:
        """List errors by field path and editor place; outline the widgets they refer to."""
        self._errors = [(str(p), str(m)) for p, m in errors]
        marked = {id(w) for w in (self._field_widget(p) for p, _ in self._errors) if w is not None}
        for w in [self.seed, self.height, self.width, self.max_chunks] + [w for s in self.segments for w in s.widgets()]:
            w.layout.border = RED_BORDER if id(w) in marked else None
        self.error_box.value = errors_html(self._errors, title)

    # -- Scope JSON --------------------------------------------------------------------------

    def import_scope_json(self, source: Union[dict, str]) -> Optional[Timeline]:
        """Load a Scope timeline (dict, JSON text or file path). Errors are shown with Scope's field
        names and leave the editor unchanged; returns the timeline, or None."""
        if isinstance(source, str) and not source.strip():
            self._show_errors([("", "nothing to import: paste a Scope timeline JSON first")], "Import failed")
            return None
        try:
            tl = Timeline.from_scope_json(source)
        except TimelineError as e:
            self._show_errors(e.errors, "Import failed (paths are Scope's)")
            return None
        self._load(tl)
        return tl

    def export_scope_json(self) -> Optional[dict]:
        """The timeline as a Scope dict (version 2.1, or the imported file's version and settings, kept),
        also written to the JSON box and a download link."""
        tl = self.validate()
        if tl is None:
            return None
        doc = tl.to_scope_json()
        self.files.show(doc)
        return doc

    # -- generation (RunPanel shows it, the Session does it) -----------------------------------

    @property
    def frames(self) -> Optional[np.ndarray]:
        """The video made so far: uint8 [T, H, W, 3] (9 frames for chunk 0, 12 per later chunk)."""
        return self.session.frames

    def generate(self) -> Optional[np.ndarray]:
        """What the Generate button does, in this thread: returns the frames, or None after an error
        (the error is shown in the editor, as for the button)."""
        return self.runner.generate()

    def regenerate_from(self, chunk: int) -> Optional[np.ndarray]:
        """Keep the chunks before `chunk` bit for bit and regenerate from it with the timeline as
        edited now (same seed unless it was changed). Returns the frames, or None after an error."""
        return self.runner.regenerate_from(chunk)

    def stop(self) -> None:
        """Ask a running generation to stop once the chunk in progress is done."""
        self.runner.stop()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for a background run (started by a button); True when none is running anymore."""
        return self.runner.wait(timeout)

    def _request(self) -> tuple[Timeline, dict]:
        """The timeline to make and the size and length asked for (raises TimelineError)."""
        tl = self.timeline
        self._show_errors([])
        m = self.max_chunks.value
        total = tl.num_chunks if m <= 0 else min(m, tl.num_chunks)
        return tl, {"height": self.height.value, "width": self.width.value, "num_chunks": total}
