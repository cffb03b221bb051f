"""Notebook views, built from core ipywidgets and matplotlib only (no extension to install).

editor     TimelineEditor: edit a prompt timeline and generate from it
run        Generate / Stop / Regenerate from here, the preview and the video: the view of a `Session`
segments   the widgets of one segment and of one prompt of its blend
controls   labelled inputs and buttons sized to their labels
messages   field errors and status lines as HTML
media      frame previews (PNG) and the inline video
files      the Scope JSON import / export panel
plots      matplotlib figures of the memory bank and attention
"""
