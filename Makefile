# Set-up and entry points. `make demo` and `make test` each do all set-up on a fresh Debian 12/13 machine.
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV := $(CURDIR)/.venv
VPY := $(VENV)/bin/python
export VZPKG_CACHE_DIR ?= $(CURDIR)/cache
DEMO_TEMPLATE ?= debian-12-x86_64

APT_PACKAGES := debootstrap mmdebstrap btrfs-progs e2fsprogs zstd tar gnupg gpgv debian-archive-keyring arch-test \
	uidmap iproute2 apt-utils openssh-client rsync python3-venv util-linux procps psmisc \
	dnf rpm python3-rpm createrepo-c busybox-static gcc libc6-dev strace \
	docker-registry skopeo umoci openssl

.PHONY: setup system-packages venv client criu sshd demo test lint unit integration bench clean

setup: system-packages venv client criu

# The C front end of vzctl (client/vzctl.c): hands commands to a resident `vzctl server` when one runs, else runs
# the Python vzctl. Replaces the console script pip wrote (which `make venv` rewrites; then this runs again).
client: $(VENV)/.client

$(VENV)/.client: client/vzctl.c $(VENV)/.installed
	@# static where libc.a is there (no dynamic loader at each start: ~0.3 ms of every command)
	flags="-O2 -Wall -Wextra -Werror -DVZCTL_SOCKET=\"$$($(VPY) -m vzpkg.cli.server print-socket)\" -DVZCTL_PYTHON=\"$(VPY)\""; \
	gcc -static $$flags -o $(VENV)/bin/vzctl.new client/vzctl.c 2>/dev/null \
		|| gcc $$flags -o $(VENV)/bin/vzctl.new client/vzctl.c
	mv -f $(VENV)/bin/vzctl.new $(VENV)/bin/vzctl
	touch $@

# CRIU >= 4.2 (checkpoint/restore; docs/checkpoint.md): the distribution's if new enough, else the Debian archive's
# testing package and its libraries unpacked into $(CRIU_PREFIX) (started through its own ld-linux). vzctl finds
# it there, or where $$VZ_CRIU or `criu` in the vzpkg config file points.
CRIU_PREFIX ?= /opt/vzpkg/criu

criu: system-packages venv
	$(VPY) -m vzpkg.runtime.criu_install --prefix $(CRIU_PREFIX)

# An OpenSSH server for the ssh migration tests, unpacked into $(SSHD_PREFIX) from the host suite's packages
# (apt-get download + dpkg-deb -x): never installed, never a service; each test starts its own on 127.0.0.1.
SSHD_PREFIX ?= /opt/vzpkg/sshd

sshd: system-packages venv
	$(VPY) tests/integration/sshd_install.py --prefix $(SSHD_PREFIX)

system-packages:
	@dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 && echo "system packages: present" || { \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(APT_PACKAGES); }
	@# The tests start their own docker-registry on 127.0.0.1; the package's system service must not keep running.
	@if [ -d /run/systemd/system ] && systemctl is-enabled -q docker-registry 2>/dev/null; then \
	  systemctl disable --now docker-registry; fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# compat: a plain path in a .pth file; the default editable mode installs an import finder whose start-up
	# (pathlib, urllib, importlib.util) cost ~10 ms of every vzctl command (setuptools may drop compat: then the default)
	$(VPY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat 2>/dev/null \
		|| $(VPY) -m pip install -q -e '.[test]'
	touch $@

DEMO_VE ?= demo

# Build the default template's cache, then start a VE from it and show it working. The VE is left running:
# `.venv/bin/vzctl enter demo`, `.venv/bin/vzctl stop demo`, `.venv/bin/vzctl destroy demo`.
demo: setup
	$(VENV)/bin/vzpkg create-cache $(DEMO_TEMPLATE) --force
	$(VENV)/bin/vzpkg info $(DEMO_TEMPLATE)
	@if $(VENV)/bin/vzctl status $(DEMO_VE) | grep -q ' exist'; then $(VENV)/bin/vzctl destroy $(DEMO_VE) --force; fi
	$(VENV)/bin/vzctl create $(DEMO_VE) --ostemplate $(DEMO_TEMPLATE) --hostname $(DEMO_VE)
	$(VENV)/bin/vzctl start $(DEMO_VE)
	$(VENV)/bin/vzctl exec $(DEMO_VE) /bin/sh -c 'hostname; head -n 2 /etc/os-release; ps -e -o pid,comm'
	$(VENV)/bin/vzctl status $(DEMO_VE)
	$(VENV)/bin/vzlist -a

lint: venv
	$(VENV)/bin/ruff check vzpkg tests bench

test: setup sshd lint
	$(VENV)/bin/pytest -ra tests

unit: venv
	$(VENV)/bin/pytest -ra tests/unit

BENCH_PACKAGES := lxc podman

bench: setup
	@dpkg -s $(BENCH_PACKAGES) >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(BENCH_PACKAGES)
	$(VPY) bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info
