"""The one exception type the CLI turns into a one-line message and exit code 2."""


class FastByolError(RuntimeError):
    """A user-facing error: bad config, bad data, non-finite loss. No traceback is shown."""


EXIT_CODES = {"SIGTERM": 143, "SIGINT": 130}  # 128 + the signal number, the shell's convention


class TrainingStopped(Exception):
    """The run stopped on a signal after writing a checkpoint (:mod:`fastbyol.stop`);
    ``exit_code`` is 143 (SIGTERM) or 130 (SIGINT)."""

    def __init__(self, signame: str, step: int, path: str):
        self.signame, self.step, self.path = signame, step, path
        self.exit_code = EXIT_CODES[signame]
        super().__init__(f"stopped by {signame} after step {step}: checkpoint written to {path}; continue with "
                         f"--resume auto (exit {self.exit_code})")
