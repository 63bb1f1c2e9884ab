"""Fill-in-the-middle: the fill itself (core) and `dschat fim` (command)."""
