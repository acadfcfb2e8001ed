"""Questions asked of an index or a model about given images: nearest neighbours, classes."""
