"""Drop-in APIs of other BYOL packages, with fastbyol underneath.

* :mod:`fastbyol.compat.byol_pytorch`: lucidrains' byol-pytorch (``BYOL``, ``BYOLTrainer``,
  ``MockDataset``); change ``from byol_pytorch import ...`` to
  ``from fastbyol.compat.byol_pytorch import ...``.
"""
