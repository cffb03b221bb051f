"""What the editor says: field errors (named by path and by place in the editor) and status lines."""
from __future__ import annotations

import html
from typing import Sequence

RED_BORDER = "2px solid #d33"  # outlines a widget whose field has an error


def describe(path: str) -> str:
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


def where(path: str) -> str:
    """HTML naming a field: its path, plus where it is in the editor when that says more."""
    if not path:
        return ""
    place = describe(path)
    return f"<code>{html.escape(path)}</code>" + (f" ({html.escape(place)})" if place != path else "") + ": "


def errors_html(errors: Sequence[tuple[str, str]], title: str) -> str:
    """A titled list of (field path, message) errors; empty when there are none."""
    if not errors:
        return ""
    items = "".join(f"<li>{where(p)}{html.escape(m)}</li>" for p, m in errors)
    return (f"<div class='memflow-errors' style='color:#b00'><b>{html.escape(title)}:</b>"
            f"<ul style='margin:2px 0'>{items}</ul></div>")


def status_html(text: str, error: bool = False) -> str:
    """One status line (red for an error); empty text clears it."""
    color = "#b00" if error else "#333"
    return f"<span style='color:{color}'>{html.escape(text)}</span>" if text else ""


def findings_html(findings: Sequence) -> str:
    """A segment's prompt-coach findings (`memflow_nb.prompt_coach.Finding`): a small badge with the
    number of warnings (notes when there are none), whose tooltip and collapsible list give each
    reason and suggestion. Empty when there is nothing to say."""
    if not findings:
        return ""
    n_warn = sum(f.severity == "warn" for f in findings)
    n = n_warn or len(findings)
    label = f"{n} {'warning' if n_warn else 'note'}{'s' * (n != 1)}"
    color = "#c77700" if n_warn else "#777"
    lines = [f"{f.kind}: {f.reason}" + (f" -> {f.suggestion}" if f.suggestion else "") for f in findings]
    items = "".join(f"<li><b>{html.escape(f.severity)}</b> {html.escape(line)}</li>" for f, line in zip(findings, lines))
    return (f"<details class='memflow-coach' style='font-size:90%'><summary title='{html.escape(chr(10).join(lines))}'>"
            f"<span class='memflow-coach-badge' style='background:{color};color:white;border-radius:8px;"
            f"padding:0 6px'>prompt coach: {label}</span></summary><ul style='margin:2px 0'>{items}</ul></details>")
