"""What the training job hands to the monitor and to serving: the model bundle and how it scores an image.

``bundle``: the folder layout of a registered model (checkpoint + ``linewatch/`` calibration and gate report), the
scoring recipe and the detector calibrated from the bundle. ``serving``: one object that loads a bundle folder and
scores images (z, anomaly score, flag); MLflow's ``python_function`` flavour loads it as its ``loader_module``.
"""
