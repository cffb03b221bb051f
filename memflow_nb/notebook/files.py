"""The Scope timeline JSON panel: a text box, Import / Export buttons, a file upload and a download link."""
from __future__ import annotations

import base64
import json
from typing import Any, Callable

import ipywidgets as W

from .controls import button


class ScopeFilePanel:
    """Widgets to move Scope timeline JSON in and out of the editor.

    `on_import(text)` is called with the JSON of the text box (Import) or of an uploaded file;
    `on_export()` on Export (it calls `show` with the document). `wrap` wraps widget callbacks.
    """

    def __init__(self, on_import: Callable[[str], Any], on_export: Callable[[], Any],
                 wrap: Callable[[Callable], Callable]):
        self.json_text = W.Textarea(placeholder="Paste a Scope timeline (.json) here and press Import",
                                    layout=W.Layout(width="100%", height="12em"))
        self.import_button = button("Import", "upload", "read the JSON above")
        self.export_button = button("Export", "download", "write the timeline as Scope JSON above and as a link")
        self.upload = W.FileUpload(accept=".json", multiple=False, description="Open file")
        self.download = W.HTML()
        self._on_import = on_import
        self.import_button.on_click(wrap(lambda _: on_import(self.json_text.value)))
        self.export_button.on_click(wrap(lambda _: on_export()))
        self.upload.observe(wrap(self._uploaded), names="value")
        files = W.VBox([self.json_text, W.HBox([self.import_button, self.upload, self.export_button, self.download])])
        self.widget = W.Accordion(children=[files])
        self.widget.set_title(0, "Scope timeline JSON: import / export")
        self.widget.selected_index = None  # folded until opened

    def show(self, doc: dict) -> None:
        """Put `doc` in the text box and behind the download link."""
        text = json.dumps(doc, indent=2, ensure_ascii=False)
        self.json_text.value = text
        b64 = base64.b64encode(text.encode("utf-8")).decode("ascii")
        self.download.value = (f"<a download='timeline.scope.json' href='data:application/json;base64,{b64}'>"
                               "download timeline.scope.json</a>")

    def _uploaded(self, change) -> None:
        files = change["new"]
        if not files:
            return
        # ipywidgets 8: a tuple of {name, content: memoryview}; ipywidgets 7: {name: {content: bytes}}.
        item = files[0] if isinstance(files, (tuple, list)) else next(iter(files.values()))
        content = item["content"]
        text = (content.tobytes() if isinstance(content, memoryview) else bytes(content)).decode("utf-8")
        self.json_text.value = text
        self._on_import(text)
        if isinstance(files, tuple):
            self.upload.value = ()  # so that choosing the same file again is seen as a change
