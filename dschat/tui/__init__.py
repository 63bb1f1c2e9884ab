"""The full-screen chat (Textual), laid out as Textual apps are: the app (app.py), its screens
(ask_screen.py, help_screen.py), its widgets (prompt_area.py, message_view.py, reply_markdown.py), its
styles (chat.tcss), and the terminal driver it runs on (terminal_driver.py)."""

from dschat.tui.app import ChatApp, run_tui

__all__ = ["ChatApp", "run_tui"]
