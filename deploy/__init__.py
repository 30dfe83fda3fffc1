"""Deployment of decoders: export for streaming runtimes and run the exports.

* :mod:`videovae.deploy.export`: ONNX and ``torch.export`` of any exactly streamable decoder as a
  first-chunk graph and a step graph whose causal state is explicit tensor inputs and outputs.
* :mod:`videovae.deploy.runtime`: ``OnnxDecoder`` (needs ``onnxruntime``, the ``export`` extra) and
  ``TorchExportDecoder`` decode latents chunk by chunk with an export.

Nothing here imports ``onnx`` or ``onnxruntime`` at import time.
"""
