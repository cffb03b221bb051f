"""Labelled inputs and buttons that size themselves to their labels (nothing truncated)."""
from __future__ import annotations

import ipywidgets as W

_AUTO = {"description_width": "initial"}  # labels take their natural width instead of being cut


def field(widget_type, description: str, width: str, **kw):
    """A labelled input whose label is never truncated (`width` is the input's room, label included)."""
    return widget_type(description=description, style=_AUTO, layout=W.Layout(width=width), **kw)


def button(description: str = "", icon: str = "", tooltip: str = "", **kw):
    """A button as wide as its label (icon-only buttons stay square)."""
    width = "auto" if description else "2.6em"
    return W.Button(description=description, icon=icon, tooltip=tooltip, layout=W.Layout(width=width), **kw)
