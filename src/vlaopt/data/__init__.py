"""Demonstration data: the episode file format, expert collection, and a torch dataset of action chunks."""
