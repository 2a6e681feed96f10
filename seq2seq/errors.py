"""The project's error for user mistakes: the CLI prints it on one line and exits 2."""


class Seq2SeqError(Exception):
    """A problem the user can fix (bad file, bad input, bad argument); printed without traceback."""
