"""Errors raised for bad input data.

A DataError carries one line that names the file (and record, where known) at fault; the command-line
entry points print that line alone, without a stack trace.
"""


class DataError(Exception):
    """Bad or missing input data; the message names the file and record at fault."""
