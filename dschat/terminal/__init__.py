"""Text for a terminal: escape sequences made harmless, syntax highlighting."""
