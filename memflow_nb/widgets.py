"""A prompt-timeline editor for notebooks, built from core ipywidgets only (no extension to
install, so it runs in Colab and JupyterLab).

    editor = TimelineEditor(pipe, mf.Timeline.from_scope_json("data/timeline_lighthouse.scope.json"))
    editor                      # shows it; the buttons call the methods below

Segments follow each other: segment i lasts `duration` seconds and the next one starts where it
ends. A Scope file with gaps is read by giving each gap to the segment before it, which is what
the timeline model does with gaps anyway, so the video does not change.

Generate and "Regenerate from here" run in a background thread, so the kernel stays free to
receive the Stop click; Stop is checked between chunks. The same actions are plain methods
(`generate`, `regenerate_from`, `stop`), which run in the calling thread.
"""
from __future__ import annotations

import base64
import html
import io
import json
import threading
import time
import traceback
from typing import Any, Callable, Optional, Sequence, Union

import ipywidgets as W
import numpy as np

from .generation import Checkpoints, generate, resume
from .timeline import Timeline, TimelineError, time_of_chunk
from .video import FPS, show_video

__all__ = ["TimelineEditor"]

METHODS = ("slerp", "linear")  # transition interpolation; slerp is Scope's default for MemFlow
_RED = "2px solid #d33"
_PREVIEW_MIN_WIDTH = 320  # tiny frames (32x48) are upscaled to at least this many pixels
_AUTO = {"description_width": "initial"}  # labels take their natural width instead of being cut


def _field(widget_type, description: str, width: str, **kw):
    """A labelled input whose label is never truncated (`width` is the input's room, label included)."""
    return widget_type(description=description, style=_AUTO, layout=W.Layout(width=width), **kw)


def _button(description: str = "", icon: str = "", tooltip: str = "", **kw):
    """A button as wide as its label (icon-only buttons stay square)."""
    width = "auto" if description else "2.6em"
    return W.Button(description=description, icon=icon, tooltip=tooltip, layout=W.Layout(width=width), **kw)


PromptsLike = Union[str, Sequence[Union[str, tuple, dict]]]


class _Problem(Exception):
    """A mistake the user can fix (shown in the editor as a one-line error, no traceback)."""


def _prompt_list(prompts: PromptsLike) -> list[tuple[str, float]]:
    """"text" | ["text", ("text", weight), {"text": ..., "weight": ...}] -> [(text, weight)]."""
    if isinstance(prompts, str):
        return [(prompts, 1.0)]
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append((p, 1.0))
        elif isinstance(p, dict):
            out.append((p["text"], float(p.get("weight", 1.0))))
        else:
            text, weight = p
            out.append((text, float(weight)))
    return out


def _describe(path: str) -> str:
    """A timeline field path -> where it is in the editor ("segments.1.end" -> "segment 2, duration")."""
    parts = path.split(".")
    if len(parts) >= 2 and parts[0] == "segments" and parts[1].isdigit():
        where, rest = f"segment {int(parts[1]) + 1}", parts[2:]
        if len(rest) >= 2 and rest[0] == "prompts" and rest[1].isdigit():
            where, rest = f"{where}, prompt {int(rest[1]) + 1}", rest[2:]
        names = {"end": "duration", "start": "start (the durations before it)", "transition_steps": "transition steps",
                 "transition_method": "transition method", "prompts": "prompts"}
        return f"{where}, {names.get(rest[0], rest[0])}" if rest else where
    return {"": "timeline", "segments": "segments", "denoising_steps": "denoising steps"}.get(path, path)


def _where(path: str) -> str:
    """HTML naming a field: its path, plus where it is in the editor when that says more."""
    if not path:
        return ""
    place = _describe(path)
    return f"<code>{html.escape(path)}</code>" + (f" ({html.escape(place)})" if place != path else "") + ": "


def _png(frame: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes; small frames are enlarged by pixel repetition (crisp, not blurred)."""
    from PIL import Image

    k = max(1, -(-_PREVIEW_MIN_WIDTH // frame.shape[1]))
    if k > 1:
        frame = frame.repeat(k, axis=0).repeat(k, axis=1)
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


class _PromptRow:
    """One prompt of a segment's blend: text and weight (only weight ratios matter)."""

    def __init__(self, text: str, weight: float):
        self.text = W.Textarea(value=text, placeholder="Describe the subject, the setting, the action and the camera.",
                               continuous_update=False, layout=W.Layout(flex="1 1 auto", width="auto", height="5.5em"))
        self.weight = _field(W.FloatText, "weight", "10em", value=weight)
        self.remove = _button(icon="times", tooltip="remove this prompt from the blend")
        self.box = W.HBox([self.text, W.VBox([self.weight, self.remove], layout=W.Layout(flex="0 0 auto"))],
                          layout=W.Layout(width="100%"))


class _SegmentBox:
    """Widgets of one segment: its prompt blend, duration (s), transition steps and method."""

    def __init__(self, editor: "TimelineEditor", prompts: list[tuple[str, float]], duration: float,
                 transition_steps: int, transition_method: str):
        self._editor = editor
        self.header = W.HTML()
        self.up = _button(icon="arrow-up", tooltip="move this segment earlier")
        self.down = _button(icon="arrow-down", tooltip="move this segment later")
        self.remove = _button(icon="trash", tooltip="remove this segment")
        self.add_prompt = _button("blend in a prompt", "plus", "add a weighted prompt to this segment's blend")
        self.duration = _field(W.FloatText, "seconds", "11em", value=duration, step=0.5)
        self.transition_steps = _field(W.IntText, "transition (chunks)", "14em", value=transition_steps,
                                       tooltip="0: hard cut; N: reach this segment's prompt over N chunks")
        self.transition_method = _field(W.Dropdown, "method", "11em", options=METHODS, value=transition_method)
        self.prompts: list[_PromptRow] = []
        self.prompt_box = W.VBox(layout=W.Layout(width="100%"))
        self.header.layout = W.Layout(flex="1 1 auto")
        self.box = W.VBox([W.HBox([self.header, self.up, self.down, self.remove], layout=W.Layout(width="100%")),
                           self.prompt_box,
                           W.HBox([self.add_prompt, self.duration, self.transition_steps, self.transition_method])],
                          layout=W.Layout(border="1px solid #ccc", padding="4px", margin="2px 0", width="100%"))
        for p in prompts:
            self.add(*p, refresh=False)
        self.up.on_click(editor._callback(lambda _: editor.move_segment(self.index, self.index - 1)))
        self.down.on_click(editor._callback(lambda _: editor.move_segment(self.index, self.index + 1)))
        self.remove.on_click(editor._callback(lambda _: editor.remove_segment(self.index)))
        self.add_prompt.on_click(editor._callback(lambda _: self.add("", 1.0)))
        for w in (self.duration, self.transition_steps, self.transition_method):
            w.observe(editor._on_field, names="value")

    @property
    def index(self) -> int:
        return self._editor.segments.index(self)

    def add(self, text: str, weight: float, refresh: bool = True) -> _PromptRow:
        row = _PromptRow(text, weight)
        row.remove.on_click(self._editor._callback(lambda _: self.drop(row)))
        for w in (row.text, row.weight):
            w.observe(self._editor._on_field, names="value")
        self.prompts.append(row)
        self.prompt_box.children = [r.box for r in self.prompts]
        if refresh:
            self._editor._refresh()
        return row

    def drop(self, row: _PromptRow) -> None:
        self.prompts.remove(row)
        self.prompt_box.children = [r.box for r in self.prompts]
        self._editor._refresh()

    def values(self, start: float) -> dict:
        """This segment as Timeline fields, starting at `start` seconds."""
        steps = self.transition_steps.value
        return {"start": start, "end": round(start + self.duration.value, 6),
                "prompts": [{"text": r.text.value, "weight": r.weight.value} for r in self.prompts],
                # 0 and None both mean a hard cut; None keeps files without transitions unchanged.
                "transition_steps": steps or None,
                "transition_method": self.transition_method.value if steps else None}


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
        import_scope_json(source) / export_scope_json(): Scope timeline files (dict, JSON text or path).
        wait(timeout): block until a background run started by a button has finished.
    Widgets are attributes (generate_button, stop_button, regenerate_button, regenerate_chunk,
    seed, height, width, max_chunks, segments, json_text, import_button, export_button, upload,
    download, error_box, status, progress, preview, video, log); `widget` is the whole editor.
    """

    def __init__(self, pipe, timeline: Optional[Timeline] = None, *, height: Optional[int] = None,
                 width: Optional[int] = None, seed: Optional[int] = None, max_chunks: int = 0):
        self.pipe = pipe
        self.background = True  # buttons run in a thread, so Stop can be received while generating
        self.segments: list[_SegmentBox] = []
        self._chunks: list[np.ndarray] = []  # frames of each generated chunk, uint8 [t, H, W, 3]
        self._video_timeline: Optional[Timeline] = None  # the timeline those chunks were made from
        self._checkpoints: Optional[Checkpoints] = None
        self._denoising_steps = None  # kept from an imported file, not edited here
        self._errors: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._loading = False  # no re-validation per field while a whole timeline is being loaded
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
        self.add_button = _button("segment", "plus", "add a segment at the end (a copy of the last one's prompts)")
        self.add_button.layout.align_self = "flex-start"  # not stretched across the editor
        self.seed = _field(W.IntText, "seed", "12em", value=0 if seed is None else seed)
        self.height = _field(W.IntText, "height", "10em", value=height or dh, tooltip="a multiple of 16")
        self.width = _field(W.IntText, "width", "10em", value=width or dw, tooltip="a multiple of 16")
        self.max_chunks = _field(W.IntText, "max chunks", "11em", value=max_chunks, tooltip="0: the whole timeline")
        self.generate_button = _button("Generate", "play", "generate the timeline, showing each chunk as it arrives",
                                       button_style="primary")
        self.generate_button.add_class("memflow-generate")  # a stable hook for browser tests
        self.stop_button = _button("Stop", "stop", "stop after the chunk being generated", disabled=True)
        self.progress = W.IntProgress(value=0, min=0, max=1, layout=W.Layout(width="14em"))
        self.status = W.HTML()
        self.error_box = W.HTML()
        # The latest chunk's last frame; hidden until the first chunk, at most half a 832-pixel frame wide.
        self.preview = W.Image(format="png", layout=W.Layout(display="none", max_width="416px", height="auto"))
        self.video = W.HTML()
        self.regenerate_chunk = _field(W.BoundedIntText, "from chunk", "12em", value=0, min=0, max=0)
        self.regenerate_info = W.HTML()
        self.regenerate_button = _button("Regenerate from here", "redo", "keep the chunks before this one and "
                                         "regenerate the rest with the timeline as edited now", disabled=True)
        self.json_text = W.Textarea(placeholder="Paste a Scope timeline (.json) here and press Import",
                                    layout=W.Layout(width="100%", height="12em"))
        self.import_button = _button("Import", "upload", "read the JSON above")
        self.export_button = _button("Export", "download", "write the timeline as Scope JSON above and as a link")
        self.upload = W.FileUpload(accept=".json", multiple=False, description="Open file")
        self.download = W.HTML()
        self.log = W.Output()  # tracebacks of unexpected errors (validation errors go to error_box)

        self.add_button.on_click(self._callback(lambda _: self.add_segment()))
        self.generate_button.on_click(self._callback(lambda _: self._launch(self._generate)))
        self.stop_button.on_click(self._callback(lambda _: self.stop()))
        self.regenerate_button.on_click(
            self._callback(lambda _: self._launch(lambda: self._regenerate(self.regenerate_chunk.value))))
        self.import_button.on_click(self._callback(lambda _: self.import_scope_json(self.json_text.value)))
        self.export_button.on_click(self._callback(lambda _: self.export_scope_json()))
        self.upload.observe(self._callback(self._on_upload), names="value")
        self.regenerate_chunk.observe(self._callback(lambda _: self._show_regenerate_info()), names="value")
        for w in (self.seed, self.height, self.width, self.max_chunks):
            w.observe(self._on_field, names="value")

        files = W.VBox([self.json_text, W.HBox([self.import_button, self.upload, self.export_button, self.download])])
        accordion = W.Accordion(children=[files])
        accordion.set_title(0, "Scope timeline JSON: import / export")
        accordion.selected_index = None
        self.widget = W.VBox([
            self.summary,
            self.segment_box,
            self.add_button,
            W.HBox([self.seed, self.height, self.width, self.max_chunks]),
            W.HBox([self.generate_button, self.stop_button, self.progress, self.status],
                   layout=W.Layout(align_items="center")),
            self.error_box,
            W.HBox([self.preview, self.video], layout=W.Layout(align_items="flex-start", flex_flow="row wrap")),
            W.HBox([self.regenerate_chunk, self.regenerate_button, self.regenerate_info],
                   layout=W.Layout(align_items="center")),
            accordion,
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
        seg = _SegmentBox(self, _prompt_list(prompts), duration, transition_steps, transition_method)
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
        seg = self.segments[index]
        self._loading = True
        try:
            seg.prompts.clear()
            for p in _prompt_list(prompts):
                seg.add(*p)
        finally:
            self._loading = False
        self._refresh()

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
                "width": self.width.value, "denoising_steps": self._denoising_steps}

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
            self._denoising_steps = tl.denoising_steps
        finally:
            self._loading = False
        self._relayout()
        if gaps:
            self._set_status("The timeline had gaps; each now belongs to the segment before it (the same video).")

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
            start = end
        if tl is None:
            self.summary.value = "<b>Timeline</b> (fix the fields marked in red)"
        else:
            n = tl.num_chunks
            frames = 9 + 12 * (n - 1)
            self.summary.value = (f"<b>Timeline</b>: {len(tl.segments)} segment(s), {n} chunks, "
                                  f"{frames / FPS:.2f} s of video ({frames} frames at {FPS} fps)")

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

    def _all_fields(self):
        yield from (self.seed, self.height, self.width, self.max_chunks)
        for s in self.segments:
            yield from (s.duration, s.transition_steps, s.transition_method, s.add_prompt)
            for r in s.prompts:
                yield from (r.text, r.weight)

    def _show_errors(self, errors: Sequence[tuple[str, str]], title: str = "Fix these fields") -> None:
        """List errors by field path and editor place; outline the widgets they refer to."""
        self._errors = [(str(p), str(m)) for p, m in errors]
        marked = {id(w) for w in (self._field_widget(p) for p, _ in self._errors) if w is not None}
        for w in self._all_fields():
            w.layout.border = _RED if id(w) in marked else None
        if not self._errors:
            self.error_box.value = ""
            return
        items = "".join(f"<li>{_where(p)}{html.escape(m)}</li>" for p, m in self._errors)
        self.error_box.value = (f"<div class='memflow-errors' style='color:#b00'><b>{html.escape(title)}:</b>"
                                f"<ul style='margin:2px 0'>{items}</ul></div>")

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
        """The timeline as a Scope 2.1 dict, also written to the JSON box and a download link."""
        tl = self.validate()
        if tl is None:
            return None
        doc = tl.to_scope_json()
        text = json.dumps(doc, indent=2, ensure_ascii=False)
        self.json_text.value = text
        b64 = base64.b64encode(text.encode("utf-8")).decode("ascii")
        self.download.value = (f"<a download='timeline.scope.json' href='data:application/json;base64,{b64}'>"
                               "download timeline.scope.json</a>")
        return doc

    def _on_upload(self, change) -> None:
        files = change["new"]
        if not files:
            return
        # ipywidgets 8: a tuple of {name, content: memoryview}; ipywidgets 7: {name: {content: bytes}}.
        item = files[0] if isinstance(files, (tuple, list)) else next(iter(files.values()))
        content = item["content"]
        text = (content.tobytes() if isinstance(content, memoryview) else bytes(content)).decode("utf-8")
        self.json_text.value = text
        self.import_scope_json(text)
        if isinstance(files, tuple):
            self.upload.value = ()  # so that choosing the same file again is seen as a change

    # -- generation --------------------------------------------------------------------------

    @property
    def frames(self) -> Optional[np.ndarray]:
        """The video made so far: uint8 [T, H, W, 3] (9 frames for chunk 0, 12 per later chunk)."""
        return np.concatenate(self._chunks) if self._chunks else None

    def generate(self) -> Optional[np.ndarray]:
        """What the Generate button does, in this thread: returns the frames, or None after an error
        (the error is shown in the editor, as for the button)."""
        return None if self._refuse_if_busy() else self._run(self._generate)

    def regenerate_from(self, chunk: int) -> Optional[np.ndarray]:
        """Keep the chunks before `chunk` bit for bit and regenerate from it with the timeline as
        edited now (same seed unless it was changed). Returns the frames, or None after an error."""
        return None if self._refuse_if_busy() else self._run(lambda: self._regenerate(chunk))

    def stop(self) -> None:
        """Ask a running generation to stop once the chunk in progress is done."""
        self._stop.set()
        if self._busy():
            self._set_status("stopping after this chunk...")

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for a background run (started by a button); True when none is running anymore."""
        t = self._thread
        if t is not None:
            t.join(timeout)
        return t is None or not t.is_alive()

    def _busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _refuse_if_busy(self) -> bool:
        if self._busy():
            self._set_status("already generating: press Stop first")
            return True
        return False

    def _launch(self, work: Callable[[], Any]) -> None:
        """Run `work` as the buttons do: in a background thread (or here when background is False)."""
        if self._refuse_if_busy():
            return
        if not self.background:
            self._run(work)
            return
        self._thread = threading.Thread(target=self._run, args=(work,), name="memflow-editor", daemon=True)
        self._set_buttons(running=True)
        self._thread.start()

    def _run(self, work: Callable[[], Any]):
        """Run one generation with the buttons set accordingly; errors are shown, never raised."""
        self._stop.clear()
        self._set_buttons(running=True)
        try:
            return work()
        except TimelineError as e:
            self._show_errors(e.errors)
        except _Problem as e:
            self._show_errors([("", str(e))], "Cannot do that")
            self._set_status("")
        except Exception as e:  # unexpected: one line here, the traceback in the log
            self.log.append_stdout(traceback.format_exc())
            self._set_status(f"error: {type(e).__name__}: {e} (traceback below)", error=True)
        finally:
            self._set_buttons(running=False)
        return None

    def _callback(self, fn: Callable):
        """Wrap a widget callback: output and errors go to the editor, never lost in the kernel log."""
        def wrapped(*args):
            with self.log:
                try:
                    fn(*args)
                except TimelineError as e:
                    self._show_errors(e.errors)
                except Exception as e:
                    self.log.append_stdout(traceback.format_exc())
                    self._set_status(f"error: {type(e).__name__}: {e} (traceback below)", error=True)
        return wrapped

    def _set_buttons(self, running: bool) -> None:
        self.generate_button.disabled = running
        self.stop_button.disabled = not running
        self.regenerate_button.disabled = running or not self._chunks

    def _set_status(self, text: str, error: bool = False) -> None:
        color = "#b00" if error else "#333"
        self.status.value = f"<span style='color:{color}'>{html.escape(text)}</span>" if text else ""

    def _total(self, tl: Timeline) -> int:
        """Chunks to make for `tl`: all of them, or at most max_chunks."""
        m = self.max_chunks.value
        return tl.num_chunks if m <= 0 else min(m, tl.num_chunks)

    def _valid_timeline(self) -> Timeline:
        tl = self.timeline  # TimelineError -> shown by _run
        self._show_errors([])
        return tl

    def _generate(self) -> np.ndarray:
        tl = self._valid_timeline()
        self._checkpoints = Checkpoints.auto(self.pipe)
        self._chunks, self._video_timeline = [], None
        self.video.value = ""
        total = self._total(tl)
        chunks = generate(self.pipe, tl, num_chunks=total, checkpoints=self._checkpoints, progress=False)
        return self._consume(chunks, tl, total, first=0)

    def _regenerate(self, chunk: int) -> np.ndarray:
        if self._video_timeline is None or not self._chunks:
            raise _Problem("generate a video first; then choose the chunk to regenerate from")
        done = len(self._chunks)
        if not 0 <= chunk <= done:
            raise _Problem(f"chunk {chunk} is outside the video made so far (chunks 0 to {done - 1})")
        tl = self._valid_timeline()
        old = self._video_timeline
        if (tl.height, tl.width) != (old.height, old.width):
            raise _Problem(f"the size changed ({old.height}x{old.width} -> {tl.height}x{tl.width}): "
                           "press Generate to start a new video")
        total = self._total(tl)
        if total <= chunk:
            raise _Problem(f"the timeline now has {total} chunk(s); nothing to make from chunk {chunk}")
        self._set_status(f"going back to chunk {chunk}...")
        start = resume(self.pipe, old, self._checkpoints, chunk)  # replays from the nearest checkpoint
        chunks = generate(self.pipe, tl, start=start, seed=tl.seed, num_chunks=total,
                          checkpoints=self._checkpoints, progress=False)
        self._chunks = self._chunks[:chunk]  # earlier chunks are kept as they are
        return self._consume(chunks, tl, total, first=chunk)

    def _consume(self, chunks, tl: Timeline, total: int, first: int) -> np.ndarray:
        """Show each chunk as it arrives; stop between chunks when asked; then show the video."""
        self.progress.max, self.progress.value = total, first
        t0 = time.perf_counter()
        try:
            for ch in chunks:
                self._chunks.append(ch.frames)
                made = ch.index + 1 - first
                self.preview.value = _png(ch.frames[-1])
                self.preview.layout.display = None
                self._set_status(f"chunk {ch.index + 1}/{total}, {len(self.frames) / FPS:.2f} s of video, "
                                 f"{(time.perf_counter() - t0) / made:.2f} s per chunk")
                self.progress.value = ch.index + 1
                if self._stop.is_set():
                    break
        finally:
            chunks.close()  # a generator left early: end it now, not at garbage collection
            self._video_timeline = tl
        frames = self.frames
        done = len(self._chunks)
        stopped = done < total
        h, w = frames.shape[1:3]
        self.video.value = show_video(frames, return_html=True, width=max(w, _PREVIEW_MIN_WIDTH))
        note = f"stopped after {done} of {total} chunks" if stopped else f"done: {done} chunks"
        self._set_status(f"{note}, {len(frames)} frames ({len(frames) / FPS:.2f} s) at {h}x{w}, seed {tl.seed}, "
                         f"{time.perf_counter() - t0:.1f} s")
        self.regenerate_chunk.max = done if stopped else done - 1
        self._show_regenerate_info()
        return frames

    def _show_regenerate_info(self) -> None:
        if self._video_timeline is None:
            self.regenerate_info.value = ""
            return
        k = self.regenerate_chunk.value
        plan = self._video_timeline.chunk_plan()
        seg = plan[k] + 1 if k < len(plan) else len(self._video_timeline.segments)
        self.regenerate_info.value = (f"<span style='color:#666'>chunk {k} starts at {time_of_chunk(k):.2f} s "
                                      f"(segment {seg})</span>")
