"""Saved conversations: the SQLite history (store.py: opening, writing, reading, search; schema.py: its named
migrations; transfer.py: export, import and their checks; records.py: what it holds and its errors) and the
per-conversation turn lock (turn_lock.py)."""
