"""Making and judging models: fitting (``appliance model fit``), evaluation (``model eval``),
ONNX export with an operator check. Used by the CLI and the scripts in ``models/``; the serving
pipeline never imports it (``onnx`` is needed only to write a bundle)."""
