"""Errors a user can fix. The CLI turns each into one line on stderr and exit code 2."""


class UserError(Exception):
    """Bad input or environment: the message says what to do."""

    exit_code = 2


class SourceError(UserError):
    """The model could not be resolved (path, hub id, network, access)."""


class ConfigError(UserError):
    """The model's config could not be read or built."""


class RemoteCodeError(ConfigError):
    """The model needs its own code and `--trust-remote-code` was not given."""


class CheckpointError(UserError):
    """A checkpoint file is unreadable (corrupt or truncated header)."""


class RunError(UserError):
    """A parity run could not complete (a rank died, hung or ran out of memory)."""


class FollowerExit(Exception):
    """This process is one of several ranks (torchrun) and global rank 0 reports the outcome:
    exit with `exit_code` and print nothing."""

    def __init__(self, exit_code: int):
        super().__init__(f"exit {exit_code}")
        self.exit_code = exit_code


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that `finally` blocks clean up (ranks stopped, the
    run's temporary folder removed) before the process exits with 128 + SIGTERM. A
    BaseException, like KeyboardInterrupt, so no `except Exception` swallows it."""

    exit_code = 143
