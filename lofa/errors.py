"""One exception type for bad input: the CLI prints its message as one line and exits 2."""


class LofaError(Exception):
    """Bad input (wrong / corrupt file, mismatched shapes, unknown module names, NaN weights, missing model).

    The message is one line that says what is wrong and what to do.
    """
