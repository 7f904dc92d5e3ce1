"""User-facing errors: the CLI prints these as one line and exits non-zero, never a traceback."""

import json


class CramkitError(Exception):
    """A mistake the user can fix (bad input, bad config, missing file)."""


class ConfigError(CramkitError, ValueError):
    """An invalid configuration key or value."""


class UnknownName(ConfigError):
    """A name that no registry holds: a misspelling, or a technique / optimizer / schedule from a
    plugin that is not loaded (which a run's readers that do not need it may pass over)."""


class UnknownKey(ConfigError):
    """A config key that no section has; ``key`` is its dotted path (``train.bugdet``)."""

    def __init__(self, message: str, key: str = ""):
        super().__init__(message)
        self.key = key


class DataError(CramkitError, ValueError):
    """A source, corpus or prepared dataset that cannot be used."""


class CheckpointError(CramkitError):
    """A checkpoint that is missing, truncated or does not match the run."""


class TrainingError(CramkitError):
    """Training cannot go on (for example too many non-finite losses in a row)."""


class RunError(CramkitError):
    """A run directory (or its metrics log or summary) that cannot be read."""


class RankFailed(CramkitError):
    """Under torchrun: rank 0 failed at work it does alone (preparing data, writing the run's
    files), and this rank stops with it rather than wait for it."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an interrupt so that it unwinds like ^C (the command line's handler
    outside the training loop; the trainer's for a second signal inside it)."""


def resume_refusal(changes, reason: str, advice: str, error: type[CramkitError] = ConfigError) -> CramkitError:
    """The one wording of a resume's refusal of settings that its checkpoint fixes.

    ``changes``: ``(setting, new, old)`` triples, values as the user would write them (a string is
    shown as it is, so a caller may describe an unset value). Every refusal reads alike, so that a
    user who met one knows where the others put the setting, its saved value, why and what to do::

        seed=1 differs from the 0 this run was checkpointed with: <reason>; <advice>
    """
    def shown(value) -> str:
        if isinstance(value, str):
            return value
        return json.dumps(list(value) if isinstance(value, tuple) else value)

    settings = " and ".join(f"{key}={shown(new)}" for key, new, _ in changes)
    olds = " and ".join(shown(old) for _, _, old in changes)
    verb = "differs" if len(changes) == 1 else "differ"
    return error(
        f"{settings} {verb} from the {olds} this run was checkpointed with: {reason}; {advice}")
