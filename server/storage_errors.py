"""Which store failures mean "out of space", whatever the store: the answer is then 507, not 500.

A full disk (ENOSPC), a quota (EDQUOT), a file size limit (EFBIG, RLIMIT_FSIZE), SQLite's "database or disk
is full", and an S3 service saying the same (MinIO's XMinioStorageFull, a quota, any 507 answer).
"""
from __future__ import annotations

import errno
import sqlite3

_OUT_OF_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_S3_FULL_CODES = frozenset({"XMinioStorageFull", "QuotaExceeded", "InsufficientStorage"})


def is_out_of_space(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _OUT_OF_SPACE_ERRNOS:
        return True
    if isinstance(exc, sqlite3.Error):  # the primary code is the low byte of an extended one
        return (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF == sqlite3.SQLITE_FULL
    response = getattr(exc, "response", None)  # botocore's ClientError (boto3 is an optional extra)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in _S3_FULL_CODES or status == 507
    return False
