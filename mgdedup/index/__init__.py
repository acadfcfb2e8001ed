"""The index folder: its layout, the HDF5 rows (source of truth), the FAISS search structure,
building and updating it, merging shards, and the writer lock."""
