"""migrate_dest: DEST of `vzctl migrate` parsed into a destination, and the commands it makes (no ssh run here)."""

from __future__ import annotations

import shlex

import pytest

from vzpkg.errors import MigrationRemoteError, MigrationUnreachableError, UsageError
from vzpkg.runtime import migrate_dest


def test_ssh_url_parts_and_commands():
    d = migrate_dest.parse("ssh://admin@node1:2222/srv/vz", vzctl="env A=1 /opt/bin/vzctl", ssh_opts="-i /k")
    assert isinstance(d, migrate_dest.SSH)
    assert (d.user, d.host, d.port, d.root) == ("admin", "node1", 2222, "/srv/vz")
    cmd = d.command(["migrate-receive", "101"])
    assert cmd[:3] == ["ssh", "-i", "/k"]  # the user's options first: ssh keeps the first value of an option
    assert "BatchMode=yes" in cmd and cmd[cmd.index("-p") + 1] == "2222"
    assert cmd[-2] == "admin@node1"
    assert shlex.split(cmd[-1]) == ["env", "A=1", "/opt/bin/vzctl", "--root", "/srv/vz", "migrate-receive", "101"]
    assert d.rsync_path("/srv/vz/dump/101/") == "admin@node1:/srv/vz/dump/101/"
    assert shlex.split(d.rsync_shell()[1])[:3] == ["ssh", "-i", "/k"]
    assert migrate_dest.from_record(migrate_dest.to_record(d)) == d


def test_ssh_url_defaults_and_ipv6():
    d = migrate_dest.parse("ssh://node", ssh_opts="")
    assert (d.user, d.host, d.port, d.root) == (None, "node", None, None)
    assert "--root" not in d.command(["x"])[-1]
    d = migrate_dest.parse("ssh://[::1]:22/vz", ssh_opts="")
    assert (d.host, d.port, d.root) == ("::1", 22, "/vz")


@pytest.mark.parametrize("bad", ["ssh://", "ssh://@host", "ssh://host:0", "ssh://host:99999", "ssh://host:x",
                                 "ssh://-oProxyCommand=x", "ssh://host/a:b"])
def test_bad_urls_are_usage_errors(bad):
    with pytest.raises(UsageError):
        migrate_dest.parse(bad, ssh_opts="")


def test_local_root_and_failures(tmp_path):
    d = migrate_dest.parse(str(tmp_path / "vz2"), vzctl="/x/vzctl")
    assert isinstance(d, migrate_dest.LocalRoot)
    assert d.command(["migrate-receive", "7"]) == ["/x/vzctl", "--root", str(tmp_path / "vz2"), "migrate-receive", "7"]
    assert isinstance(d.failure(127, "sh: /x/vzctl: not found"), MigrationRemoteError)
    s = migrate_dest.parse("ssh://h", ssh_opts="")
    e = s.failure(255, "ssh: connect to host h port 22: Connection refused\n")
    assert isinstance(e, MigrationUnreachableError) and "Connection refused" in str(e) and "\n" not in str(e)
