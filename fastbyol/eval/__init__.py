"""Evaluation of frozen encoders: the kNN monitor's features and votes, the paper's linear
protocol, and the ``fastbyol eval linear|knn`` commands.

* :mod:`~fastbyol.eval.features`: the one feature extractor (eval mode, bf16 + channels_last on
  GPU, no host sync per batch), sharded over ranks and gathered.
* :mod:`~fastbyol.eval.encoder`: an encoder from a fastbyol checkpoint, a run folder, an
  exported encoder, a torchvision state_dict, or random weights.
* :mod:`~fastbyol.eval.linear`: the linear probe (full protocol or precomputed features) and
  its presets.
* :mod:`~fastbyol.eval.run`: data, process group, progress, JSON and plot for the CLI.

* :mod:`~fastbyol.eval.knn`: the weighted kNN vote, shared with the training monitor.
"""
