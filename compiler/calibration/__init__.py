"""Compile-time calibration: statistics of the float model that static quantization parameters need.

Kept apart from the passes because it runs the model (onnxruntime on the lowered float graph) instead of
rewriting it; a pass then bakes the result into the graph as constants.
"""
