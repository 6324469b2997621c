"""The accuracy comparison: every localization-confidence method, same budget, same data, several seeds.

Trains each variant with the same backbone, image size, iterations, batch and schedule on the
training split of a setting, keeps every candidate of the val split once, scores it under every
post-processing method the candidates support (DIR Table 1 style: NMS / Soft-NMS / IoU-guided /
quality / variance voting), and aggregates over seeds.

- :mod:`locconf.bench.settings`: the settings (data + budget), the variants and the config of one run;
- :mod:`locconf.bench.stats`: spreads over seeds, paired deltas, the issue's targets;
- :mod:`locconf.bench.report`: the Markdown report and the summary figure;
- :mod:`locconf.bench.run`: training, evaluation and :func:`~locconf.bench.run.run_benchmark`;
- :mod:`locconf.bench.cli`: the options of ``locconf bench`` (and ``benchmarks/accuracy.py``).

The submodules are imported one by one (``settings`` without torch, so the CLI stays fast).
"""
