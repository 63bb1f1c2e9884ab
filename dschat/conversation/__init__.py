"""A conversation as the app runs it: messages and exact token ids, the chat template, the context window, one reply's driver."""
