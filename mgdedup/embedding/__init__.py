"""Images to descriptors: the Embedder (decode, trunk, GeM, whitening) and the ONNX Runtime
trunk it uses on CPU."""
