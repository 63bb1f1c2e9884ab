"""The `dschat` command line: its parser and dispatch, the subcommands, pipe mode and line mode."""
