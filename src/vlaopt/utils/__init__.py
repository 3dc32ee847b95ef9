"""Small shared helpers: atomic file writes and name registries."""
