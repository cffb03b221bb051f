"""The run controls of the editor: Generate / Stop / progress / status, the preview and the video,
and "Regenerate from here". A view of a `memflow_nb.generation.Session`, which does the work.

Runs started by a button go to a background thread, so the kernel stays free to receive the Stop
click; the session checks Stop between chunks. Errors never escape: a field error or a refused
request is shown in the editor, anything unexpected as one status line plus its traceback in `log`.
"""
from __future__ import annotations

import threading
import time
import traceback
from typing import Any, Callable, Iterator, Optional, Sequence

import ipywidgets as W
import numpy as np

from ..generation import Chunk, Session, SessionError
from ..timeline.clock import frames_of_chunks, seconds_of_frames, time_of_chunk
from ..timeline.model import Timeline, TimelineError
from .controls import button, field
from .media import png, video_html
from .messages import status_html

Errors = Sequence[tuple[str, str]]


class RunPanel:
    """Generate and regenerate a `session`'s video, showing each chunk as it arrives.

    request(): the timeline to make and the `Session.generate` keywords (height, width,
        num_chunks) from the editor's fields; raises TimelineError when a field is wrong.
    show_errors(errors, title): show (field path, message) errors in the editor.
    """

    def __init__(self, session: Session, request: Callable[[], tuple[Timeline, dict]],
                 show_errors: Callable[[Errors, str], None]):
        self.session = session
        self.background = True  # buttons run in a thread, so Stop can be received while generating
        self._request, self._show_errors = request, show_errors
        self._thread: Optional[threading.Thread] = None
        self.generate_button = button("Generate", "play", "generate the timeline, showing each chunk as it arrives",
                                      button_style="primary")
        self.generate_button.add_class("memflow-generate")  # a stable hook for browser tests
        self.stop_button = button("Stop", "stop", "stop after the chunk being generated", disabled=True)
        self.progress = W.IntProgress(value=0, min=0, max=1, layout=W.Layout(width="14em"))
        self.status = W.HTML()
        # The latest chunk's last frame; hidden until the first chunk, at most half a 832-pixel frame wide.
        self.preview = W.Image(format="png", layout=W.Layout(display="none", max_width="416px", height="auto"))
        self.video = W.HTML()
        self.regenerate_chunk = field(W.BoundedIntText, "from chunk", "12em", value=0, min=0, max=0)
        self.regenerate_info = W.HTML()
        self.regenerate_button = button("Regenerate from here", "redo", "keep the chunks before this one and "
                                        "regenerate the rest with the timeline as edited now", disabled=True)
        self.log = W.Output()  # tracebacks of unexpected errors (validation errors go to the editor)
        self.generate_button.on_click(self.callback(lambda _: self._launch(self._generate)))
        self.stop_button.on_click(self.callback(lambda _: self.stop()))
        self.regenerate_button.on_click(
            self.callback(lambda _: self._launch(lambda: self._regenerate(self.regenerate_chunk.value))))
        self.regenerate_chunk.observe(self.callback(lambda _: self._show_regenerate_info()), names="value")
        self.controls = W.HBox([self.generate_button, self.stop_button, self.progress, self.status],
                               layout=W.Layout(align_items="center"))
        self.media = W.HBox([self.preview, self.video], layout=W.Layout(align_items="flex-start", flex_flow="row wrap"))
        self.regenerate_controls = W.HBox([self.regenerate_chunk, self.regenerate_button, self.regenerate_info],
                                          layout=W.Layout(align_items="center"))

    # -- actions -----------------------------------------------------------------------------

    def generate(self) -> Optional[np.ndarray]:
        """What Generate does, in this thread: the frames, or None after an error (shown)."""
        return None if self._refuse_if_busy() else self._run(self._generate)

    def regenerate_from(self, chunk: int) -> Optional[np.ndarray]:
        """What "Regenerate from here" does, in this thread: the frames, or None after an error (shown)."""
        return None if self._refuse_if_busy() else self._run(lambda: self._regenerate(chunk))

    def stop(self) -> None:
        """Ask a running generation to stop once the chunk in progress is done."""
        self.session.stop()
        if self._busy():
            self.set_status("stopping after this chunk...")

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for a background run (started by a button); True when none is running anymore."""
        t = self._thread
        if t is not None:
            t.join(timeout)
        return t is None or not t.is_alive()

    def set_status(self, text: str, error: bool = False) -> None:
        self.status.value = status_html(text, error)

    def callback(self, fn: Callable) -> Callable:
        """Wrap a widget callback: output and errors go to the editor, never lost in the kernel log."""
        def wrapped(*args):
            with self.log:
                try:
                    fn(*args)
                except TimelineError as e:
                    self._show_errors(e.errors, "Fix these fields")
                except Exception as e:
                    self._unexpected(e)
        return wrapped

    # -- running -----------------------------------------------------------------------------

    def _busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _refuse_if_busy(self) -> bool:
        if self._busy():
            self.set_status("already generating: press Stop first")
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
        self._set_buttons(running=True)
        try:
            return work()
        except TimelineError as e:
            self._show_errors(e.errors, "Fix these fields")
        except SessionError as e:
            self._show_errors([("", str(e))], "Cannot do that")
            self.set_status("")
        except Exception as e:  # unexpected: one line here, the traceback in the log
            self._unexpected(e)
        finally:
            self._set_buttons(running=False)
        return None

    def _unexpected(self, e: Exception) -> None:
        self.log.append_stdout(traceback.format_exc())
        self.set_status(f"error: {type(e).__name__}: {e} (traceback below)", error=True)

    def _set_buttons(self, running: bool) -> None:
        self.generate_button.disabled = running
        self.stop_button.disabled = not running
        self.regenerate_button.disabled = running or not len(self.session)

    def _generate(self) -> np.ndarray:
        tl, asked = self._request()
        self.video.value = ""
        return self._show(self.session.generate(tl, **asked), tl, asked["num_chunks"], first=0)

    def _regenerate(self, chunk: int) -> np.ndarray:
        tl, asked = self._request()
        chunks = self.session.regenerate_from(chunk, tl, **asked)  # refuses what it cannot do, before any work
        self.set_status(f"going back to chunk {chunk}...")
        return self._show(chunks, tl, asked["num_chunks"], first=chunk)

    def _show(self, chunks: Iterator[Chunk], tl: Timeline, total: int, first: int) -> Optional[np.ndarray]:
        """Show each chunk as it arrives (the session stops between chunks when asked); then the video."""
        self.progress.max, self.progress.value = total, first
        t0 = time.perf_counter()
        try:
            for ch in chunks:
                made = ch.index + 1 - first
                self.preview.value = png(ch.frames[-1])
                self.preview.layout.display = None
                self.set_status(f"chunk {ch.index + 1}/{total}, {seconds_of_frames(frames_of_chunks(ch.index + 1)):.2f}"
                                f" s of video, {(time.perf_counter() - t0) / made:.2f} s per chunk")
                self.progress.value = ch.index + 1
        finally:
            chunks.close()  # a run left early (an error here) ends now, not at garbage collection
        frames, done = self.session.frames, len(self.session)
        if frames is None:
            self.set_status("stopped before the first chunk")
            return None
        stopped = done < total
        h, w = frames.shape[1:3]
        self.video.value = video_html(frames)
        note = f"stopped after {done} of {total} chunks" if stopped else f"done: {done} chunks"
        self.set_status(f"{note}, {len(frames)} frames ({seconds_of_frames(len(frames)):.2f} s) at {h}x{w}, "
                        f"seed {tl.seed}, {time.perf_counter() - t0:.1f} s")
        self.regenerate_chunk.max = done if stopped else done - 1
        self._show_regenerate_info()
        return frames

    def _show_regenerate_info(self) -> None:
        tl = self.session.timeline
        if tl is None:
            self.regenerate_info.value = ""
            return
        k = self.regenerate_chunk.value
        plan = tl.chunk_plan()
        seg = plan[k] + 1 if k < len(plan) else len(tl.segments)
        self.regenerate_info.value = (f"<span style='color:#666'>chunk {k} starts at {time_of_chunk(k):.2f} s "
                                      f"(segment {seg})</span>")
