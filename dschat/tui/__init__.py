"""The full-screen chat (Textual), built as Textual apps are: a thin app (app.py: themes, keys, notices, the
model, quitting) running one screen (chat_screen.py: the layout, the actions, the turn), whose widgets post
messages the screen handles (conversation_list.py: the sidebar; chat_view.py: the conversation and the
streaming reply; prompt_area.py: the input; status_bar.py: the status line; message_view.py and
reply_markdown.py: one message), its dialogs (ask_screen.py, help_screen.py), its styles (chat.tcss) and the
terminal driver it runs on (terminal_driver.py)."""

from dschat.tui.app import ChatApp, run_tui

__all__ = ["ChatApp", "run_tui"]
