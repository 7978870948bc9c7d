"""The one place where ember pins the ONNX IR version and the opsets it emits.

onnxruntime rejects models whose IR version is newer than it knows (onnx 1.23 writes IR 14 by default)
and ai.onnx opsets past what it implements. Opset 23 is the first with ``RMSNormalization`` and is run by
every onnxruntime ember supports (>= 1.22). ``tests/graphs/test_versions.py`` checks the pin against the
installed onnxruntime.
"""

IR_VERSION = 10
ONNX_OPSET = 23
EMBER_DOMAIN = "ember"
EMBER_OPSET = 1
MS_DOMAIN = "com.microsoft"
MS_OPSET = 1

OPSET_IMPORTS = {"": ONNX_OPSET, EMBER_DOMAIN: EMBER_OPSET}
