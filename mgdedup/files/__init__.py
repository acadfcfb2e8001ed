"""File-system helpers every area shares: atomic writes, user directories, content digests."""
