"""onnxcompress: compress recommender models in ONNX."""
