"""Training and checkpoints: :func:`locconf.engine.train.train` and its steps (see :mod:`locconf.engine.train`).

The evaluation lives in :mod:`locconf.evaluation`.
"""
