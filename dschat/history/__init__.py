"""Saved conversations: the SQLite history and the per-conversation turn lock."""
