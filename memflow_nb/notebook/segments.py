"""The widgets of one timeline segment: its weighted prompt blend, duration and transition."""
from __future__ import annotations

from typing import Callable, Sequence, Union

import ipywidgets as W

from .controls import button, field

METHODS = ("slerp", "linear")  # transition interpolation; slerp is Scope's default for MemFlow

PromptsLike = Union[str, Sequence[Union[str, tuple, dict]]]


def prompt_list(prompts: PromptsLike) -> list[tuple[str, float]]:
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


class PromptRow:
    """One prompt of a segment's blend: text and weight (only weight ratios matter)."""

    def __init__(self, text: str, weight: float):
        self.text = W.Textarea(value=text, placeholder="Describe the subject, the setting, the action and the camera.",
                               continuous_update=False, layout=W.Layout(flex="1 1 auto", width="auto", height="5.5em"))
        self.weight = field(W.FloatText, "weight", "10em", value=weight)
        self.remove = button(icon="times", tooltip="remove this prompt from the blend")
        self.box = W.HBox([self.text, W.VBox([self.weight, self.remove], layout=W.Layout(flex="0 0 auto"))],
                          layout=W.Layout(width="100%"))


class SegmentBox:
    """Widgets of one segment: its prompt blend, duration (s), transition steps and method.

    The editor that holds it passes `wrap` (wraps widget callbacks so errors are shown),
    `on_edit()` (any value changed), `on_move(box, by)`, `on_remove(box)` and `on_copy(box, source)`
    ("copy the character description from segment `source`"). `coach` shows the prompt coach's
    findings; `copy_from` lists the other segments (the editor fills both in).
    """

    def __init__(self, prompts: list[tuple[str, float]], duration: float, transition_steps: int,
                 transition_method: str, *, wrap: Callable[[Callable], Callable], on_edit: Callable[[], None],
                 on_move: Callable[["SegmentBox", int], None], on_remove: Callable[["SegmentBox"], None],
                 on_copy: Callable[["SegmentBox", int], None] = lambda box, source: None):
        self._wrap, self._on_edit = wrap, on_edit
        self.header = W.HTML(layout=W.Layout(flex="1 1 auto"))
        self.up = button(icon="arrow-up", tooltip="move this segment earlier")
        self.down = button(icon="arrow-down", tooltip="move this segment later")
        self.remove = button(icon="trash", tooltip="remove this segment")
        self.add_prompt = button("blend in a prompt", "plus", "add a weighted prompt to this segment's blend")
        self.duration = field(W.FloatText, "seconds", "11em", value=duration, step=0.5)
        self.transition_steps = field(W.IntText, "transition (chunks)", "14em", value=transition_steps,
                                      tooltip="0: hard cut; N: reach this segment's prompt over N chunks")
        self.transition_method = field(W.Dropdown, "method", "11em", options=METHODS, value=transition_method)
        self.coach = W.HTML()
        self.copy_from = field(W.Dropdown, "from", "11em", options=[])
        self.copy_button = button("copy the character", "clone",
                                  "make this segment describe its subject word for word as the chosen segment does")
        self.prompts: list[PromptRow] = []
        self.prompt_box = W.VBox(layout=W.Layout(width="100%"))
        self.box = W.VBox([W.HBox([self.header, self.up, self.down, self.remove], layout=W.Layout(width="100%")),
                           self.coach,
                           self.prompt_box,
                           W.HBox([self.add_prompt, self.duration, self.transition_steps, self.transition_method,
                                   self.copy_button, self.copy_from])],
                          layout=W.Layout(border="1px solid #ccc", padding="4px", margin="2px 0", width="100%"))
        for p in prompts:
            self.add(*p, refresh=False)
        self.up.on_click(wrap(lambda _: on_move(self, -1)))
        self.down.on_click(wrap(lambda _: on_move(self, 1)))
        self.remove.on_click(wrap(lambda _: on_remove(self)))
        self.add_prompt.on_click(wrap(lambda _: self.add("", 1.0)))
        self.copy_button.on_click(wrap(lambda _: self.copy_from.value is not None and on_copy(self, self.copy_from.value)))
        for w in (self.duration, self.transition_steps, self.transition_method):
            w.observe(wrap(lambda _: on_edit()), names="value")

    def add(self, text: str, weight: float, refresh: bool = True) -> PromptRow:
        """Blend in one more prompt."""
        row = PromptRow(text, weight)
        row.remove.on_click(self._wrap(lambda _: self.drop(row)))
        for w in (row.text, row.weight):
            w.observe(self._wrap(lambda _: self._on_edit()), names="value")
        self.prompts.append(row)
        self.prompt_box.children = [r.box for r in self.prompts]
        if refresh:
            self._on_edit()
        return row

    def drop(self, row: PromptRow) -> None:
        """Take one prompt out of the blend."""
        self.prompts.remove(row)
        self.prompt_box.children = [r.box for r in self.prompts]
        self._on_edit()

    def set_prompts(self, prompts: list[tuple[str, float]]) -> None:
        """Replace the whole blend."""
        self.prompts.clear()
        for p in prompts:
            self.add(*p, refresh=False)
        self.prompt_box.children = [r.box for r in self.prompts]
        self._on_edit()

    def values(self, start: float) -> dict:
        """This segment as Timeline fields, starting at `start` seconds."""
        steps = self.transition_steps.value
        return {"start": start, "end": round(start + self.duration.value, 6),
                "prompts": [{"text": r.text.value, "weight": r.weight.value} for r in self.prompts],
                # 0 and None both mean a hard cut; None keeps files without transitions unchanged.
                "transition_steps": steps or None,
                "transition_method": self.transition_method.value if steps else None}

    def widgets(self):
        """Every input of this segment, in order (to outline the ones with errors)."""
        yield from (self.duration, self.transition_steps, self.transition_method, self.add_prompt)
        for r in self.prompts:
            yield from (r.text, r.weight)
