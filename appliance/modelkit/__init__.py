"""Making and judging models: fitting (``appliance model fit``), evaluation (``model eval``),
ONNX export with an operator check, signed releases (``release.py``: ``model keygen``/``model
sign``; the downlink's ``model.release`` verifies them with it). Used by the CLI, the downlink
and the scripts in ``models/``; the serving pipeline never imports it (``onnx`` is needed only
to write a bundle)."""
