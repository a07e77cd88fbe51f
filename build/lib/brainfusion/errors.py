"""User-facing errors.

Anything the user can fix (a missing folder, a corrupt file, a config typo) is raised as a
`BrainfusionError` carrying one sentence that names the file or option and the fix. The CLI
prints that sentence and exits with status 2 instead of showing a traceback.
"""


class BrainfusionError(Exception):
    """An error caused by user input; its message is one sentence naming the fix."""
