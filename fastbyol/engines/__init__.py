"""The optimisation step behind one contract (:class:`~fastbyol.engines.contract.Engine`), so the
trainer does not care who runs it: :mod:`~fastbyol.engines.local` on one process,
:mod:`~fastbyol.engines.deepspeed_engine` (with :mod:`~fastbyol.engines.deepspeed_config`) on one
or many ranks. Importing this package does not import DeepSpeed."""
from .contract import DTYPES, Engine, StepSeen, autocast_context
from .local import LocalEngine

__all__ = ["DTYPES", "Engine", "LocalEngine", "StepSeen", "autocast_context"]
