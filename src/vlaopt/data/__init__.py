"""Data: the episode file format, expert collection, a torch dataset of action chunks, and plain text as LM token windows."""
