"""The user's settings: the config file, the checks flags and the file share, the TUI's key map, where dschat keeps its files."""
