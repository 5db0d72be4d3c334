"""Serving: score with an exported model (onnxruntime only, no torch or RecBole)."""
