"""The admin API's bearer token as a file: `admin_token_file:` (or `serve
--admin-token-file`) makes the gateway read the token from it, or generate one into it at
start, so a loopback admin can need a token without anyone typing one; the clients
(`modelgate canary`, `analyze --admin`) read the same file (`--token-file` or
MODELGATE_ADMIN_TOKEN_FILE).
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from pathlib import Path

__all__ = [
    "TOKEN_ENV",
    "TOKEN_FILE_ENV",
    "TokenFileError",
    "client_token",
    "load_or_create_token",
    "read_token_file",
]

TOKEN_ENV = "MODELGATE_ADMIN_TOKEN"
TOKEN_FILE_ENV = "MODELGATE_ADMIN_TOKEN_FILE"
TOKEN_SYNTAX = re.compile(r"[!-~]{16,512}")  # as config.admin_token: visible ASCII, 16-512
_MAX_FILE_BYTES = 4096  # a token and its whitespace; read no more of a wrong file


class TokenFileError(Exception):
    """A token file that cannot be used; the message names the file and the problem."""


def read_token_file(path: str | Path, *, private: bool = True) -> str:
    """The token in `path` (one line). `private` (the gateway's own file): the file is opened
    without following a symlink and must be a regular file owned by this user that nobody
    else may read or write, as ssh does for keys, because whoever can put a file there
    chooses the admin token. A client (`private=False`) may read it through a link or a group.
    """
    where = f"admin token file {path}"
    # O_NONBLOCK: opening a planted FIFO must fail the checks below, not hang the start.
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
    if private:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise TokenFileError(f"{where}: no such file") from None
    except PermissionError:
        raise TokenFileError(f"{where}: cannot be read (permission denied)") from None
    except OSError as exc:
        if private and exc.errno == errno.ELOOP and _is_symlink(path):
            raise TokenFileError(
                f"{where}: is a symbolic link, which the gateway does not follow (whoever "
                f"can plant one chooses the token); give the file's real path"
            ) from None
        raise TokenFileError(f"{where}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)  # the file opened, not whatever the path names by now
        if not stat.S_ISREG(info.st_mode):
            raise TokenFileError(f"{where}: not a regular file")
        if private and info.st_uid != os.geteuid():
            raise TokenFileError(
                f"{where}: owned by uid {info.st_uid}, not by the gateway's user "
                f"(uid {os.geteuid()}), so another user chose its token; delete it to have "
                f"a new one generated, or chown it"
            )
        if private and info.st_mode & 0o077:
            raise TokenFileError(
                f"{where}: mode {stat.S_IMODE(info.st_mode):04o} lets other users read or "
                f"write it; run chmod 600 {path}"
            )
        data = b""
        while len(data) <= _MAX_FILE_BYTES and (chunk := os.read(fd, _MAX_FILE_BYTES + 1)):
            data += chunk
    except OSError as exc:
        raise TokenFileError(f"{where}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > _MAX_FILE_BYTES:
        raise TokenFileError(f"{where}: larger than {_MAX_FILE_BYTES} bytes, not a token")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise TokenFileError(f"{where}: not ASCII text") from None
    token = text.strip()
    if not token:
        raise TokenFileError(f"{where}: empty; delete it to have a new token generated")
    if not TOKEN_SYNTAX.fullmatch(token):
        raise TokenFileError(
            f"{where}: the token must be one line of 16 to 512 visible ASCII characters "
            f"(no spaces), found {len(token)} characters"
        )
    return token


def _is_symlink(path: str | Path) -> bool:
    """Whether an ELOOP from O_NOFOLLOW means the path itself is a link (not a loop above)."""
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def load_or_create_token(path: str | Path) -> tuple[str, bool]:
    """(token, created): the file's token, or a new one written to a new file with mode
    0600 (O_EXCL: two gateways starting at once end up with the same token)."""
    token = secrets.token_urlsafe(32)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        return read_token_file(path), False
    except OSError as exc:
        raise TokenFileError(
            f"admin token file {path}: cannot be created: {exc.strerror or exc}"
        ) from None
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(token + "\n")
    return token, True


def client_token(
    token: str | None, token_file: str | None, config_file: str | None = None
) -> str | None:
    """The token a client sends: --token, else MODELGATE_ADMIN_TOKEN, else --token-file,
    else MODELGATE_ADMIN_TOKEN_FILE, else the gateway config's admin_token_file."""
    token = token or os.environ.get(TOKEN_ENV)
    if token:
        return token
    path = token_file or os.environ.get(TOKEN_FILE_ENV) or config_file
    return read_token_file(path, private=False) if path else None
