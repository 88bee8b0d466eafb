"""User-facing errors: one line that says what was wrong and where."""


class HpcllmError(Exception):
    """A problem with the user's input (config, files, checkpoint, layout).

    The CLI prints ``hpcllm: error: <message>`` on every rank that raises it and
    exits with status 2; it never prints a traceback for these.
    """
