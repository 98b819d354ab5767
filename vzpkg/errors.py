"""Exceptions with an exit code each and a message a user can act on.

Every error the CLI can print is one of these; the table in docs/exit-codes.md lists them.
"""

from __future__ import annotations


class VzError(Exception):
    """Base class: a one-line message and a distinct process exit code."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(VzError):
    exit_code = 2


class TemplateError(VzError):
    """A template is missing, malformed or invalid (names the file and the key)."""

    exit_code = 3


class CacheExistsError(VzError):
    """create-cache found a cache and --force was not given."""

    exit_code = 4


class CacheNotFoundError(VzError):
    exit_code = 5


class LockTimeoutError(VzError):
    """Another vzpkg run holds the template's lock for longer than --timeout."""

    exit_code = 6


class MirrorError(VzError):
    """The mirror or repository could not be reached or returned an error."""

    exit_code = 7


class SignatureError(VzError):
    """Repository metadata or a package failed signature verification."""

    exit_code = 8


class BuildError(VzError):
    """A build step failed (package installation, bootstrap, ...)."""

    exit_code = 9


class ScriptError(BuildError):
    """A template script exited non-zero."""

    exit_code = 10


class VerifyError(VzError):
    """A cache does not match its manifest."""

    exit_code = 11


class UnsafeArchiveError(VzError):
    """An archive member would escape the target, repeat an earlier name or create a forbidden node."""

    exit_code = 12


class ConfigError(VzError):
    """A configuration file or value is invalid."""

    exit_code = 13


class MissingToolError(VzError):
    """A required host program is not installed."""

    exit_code = 14


class DiskFullError(VzError):
    """A filesystem vzpkg writes to is full (or a quota is exhausted); names the mount point."""

    exit_code = 15


class NotWritableError(VzError):
    """A directory vzpkg must write to is read-only or not writable (names the directory)."""

    exit_code = 16


class RegistryError(VzError):
    """An OCI registry answered with an error, or not like a registry."""

    exit_code = 40


class RegistryAuthError(RegistryError):
    """The registry wants credentials, or refused the ones given."""

    exit_code = 41


class RegistryNotFoundError(RegistryError):
    """The repository, tag or blob is not in the registry."""

    exit_code = 42


class RegistryUnreachableError(RegistryError):
    """The registry refused the connection, did not answer in time, or the host is unknown."""

    exit_code = 43


class RegistryTLSError(RegistryError):
    """The registry's TLS certificate is not trusted (or TLS failed)."""

    exit_code = 44


class UpdatesAvailable(VzError):
    """Not a failure: `vzpkg status` found newer packages (scripts rely on the code)."""

    exit_code = 20


class VEError(VzError):
    """Runtime: a VE operation failed."""

    exit_code = 30


class VENotFoundError(VEError):
    exit_code = 31


class VEStateError(VEError):
    """The VE is in the wrong state for the operation (running, stopped, ...)."""

    exit_code = 32


class VEOutOfMemoryError(VEError):
    """A command run in a VE (vzctl exec) was killed by the VE's memory limit (the OOM killer)."""

    exit_code = 33


class AddressInUseError(VEError):
    """A VE's IP address is already routed on the host (another VE's, the host's own): giving it to this VE
    would take it from its owner or send the VE's traffic elsewhere."""

    exit_code = 34


class VECommandError(VEError):
    """A command run in a VE through the Python API (VE.exec) with check=True exited non-zero, or ran past its
    timeout and was killed; `result` is its ExecResult (status, output)."""

    exit_code = 35

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result


class StorageError(VEError):
    """A VE's storage backend failed (image, btrfs pool, loop mount, resize)."""

    exit_code = 50


class LoopDevicesExhaustedError(StorageError):
    """No free loop device for a VE's image (the kernel's loop devices are all in use)."""

    exit_code = 51


class DiskLimitError(StorageError):
    """A disk limit cannot be applied: a shrink below what is used, an inode limit btrfs cannot enforce, an
    inode count an ext4 image cannot change."""

    exit_code = 52


class StorageUnsupportedError(StorageError):
    """The storage backend or quota level needs kernel or host support this machine lacks (named in the message)."""

    exit_code = 53


class StoragePoolError(StorageError):
    """The btrfs backend was asked for where no btrfs pool exists (the VZ root is not on btrfs and
    `vzctl storage init --btrfs SIZE` was not run), or the pool cannot be mounted."""

    exit_code = 54


class CheckpointError(VEError):
    """vzctl chkpnt: CRIU could not dump the VE (its last error lines and the log's path are in the message); the
    VE keeps running."""

    exit_code = 60


class RestoreError(VEError):
    """vzctl restore: CRIU could not restore the VE; the images are kept and the VE stays restorable."""

    exit_code = 61


class CheckpointNotFoundError(VEError):
    """No checkpoint images where restore (or clone --from) looked."""

    exit_code = 62


class MigrationError(VEError):
    """vzctl migrate failed; the VE is left running (or restorable) on the source."""

    exit_code = 63


class MigrationRemoteError(MigrationError):
    """vzctl migrate: the destination lacks what it needs (a working vzctl, rsync, CRIU for --online); the message
    names it. Nothing was moved; the VE is as it was on the source."""

    exit_code = 65


class MigrationUnreachableError(MigrationError):
    """vzctl migrate: ssh cannot reach or log in to the destination (host, port, user, key, host key); nothing was
    moved."""

    exit_code = 66


class CriuUnavailableError(VEError):
    """No CRIU >= 4.2 that passes `criu check` (run `make criu`, or set VZ_CRIU)."""

    exit_code = 64


class LazyRestoreUnavailableError(VEError):
    """`--lazy` (post-copy restore with userfaultfd) cannot work here; nothing was changed."""

    exit_code = 67


class ServerLostError(VEError):
    """The resident vzctl server stopped while it ran a command (the C front end reports it: client/vzctl.c)."""

    exit_code = 68
