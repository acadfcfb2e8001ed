"""The MultiGrain model: trunks, GeM pooling, whitening, the model file format and the
registry of names a user can type (`--model`)."""
