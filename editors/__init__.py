"""Editors, installed as `seqedit.editors`. One editor = one file; `list_editors()` finds them without importing.

Import editors through `seqedit.editors.get_editor(name)`; never `import editors` (that name is not installed).
"""
from __future__ import annotations

from seqedit.editors.base import (
    BaseEditor,
    Editor,
    EditorContext,
    EDITORS,
    get_editor,
    list_editors,
    register_editor,
)

__all__ = ["BaseEditor", "Editor", "EditorContext", "EDITORS", "get_editor", "list_editors", "register_editor"]
