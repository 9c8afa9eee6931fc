"""A command's one error line: the library's message, its API arguments named as the flags."""
from __future__ import annotations

# Library messages speak Python (`overwrite=True`); a command speaks its flags.
FLAGS = {"pass overwrite=True": "add --overwrite", "overwrite=True": "--overwrite"}


def error_line(err: BaseException) -> str:
    """"error: <message>" for stderr, with the API arguments of FLAGS replaced by their flags."""
    message = str(err)
    for api, flag in FLAGS.items():
        message = message.replace(api, flag)
    return f"error: {message}"
