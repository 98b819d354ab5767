"""pytest plugin (entry point `pytest11`, installed with vzpkg): a fresh VE per test.

Fixtures:
  ve            a running VE of its own for the test, destroyed afterwards (pass, failure, error or Ctrl-C)
  ve_factory    ve_factory(template=None, *, start=True, **params) -> VE: several per test, each destroyed after
  ve_template   (session) the template the VEs are made from, checked once: VETemplate(name, cache_dir, root)
Marker:
  @pytest.mark.ve(template="debian-12-x86_64", ram="256M", numproc=200, ...)   for `ve` and ve_factory
Options (or ini keys ve_template, vz_root, ve_cache_dir): --ve-template NAME, --vz-root DIR, --ve-cache-dir DIR;
defaults $VZ_ROOT / $VZPKG_CACHE_DIR / the vzpkg config file, template debian-12-x86_64.

Nothing is left behind: each VE belongs to this process's owner (vzpkg.runtime.owners: ids `<token>-<n>`, the
owner file flock'ed while the process lives), so concurrent runs and xdist workers never touch each other's VEs;
a run killed with SIGKILL leaves an owner file nobody holds, and the next session (of any test run on that VZ
root) or `vzpkg clean --ves` destroys its VEs. SIGTERM is turned into KeyboardInterrupt during the session so that
teardown runs.

Hook (for a faster source of VEs, e.g. a warm checkpoint restored instead of a boot):
  pytest_vzpkg_make_ve(config, template, params, start) -> VE | None    (firstresult; see VzpkgHooks)
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from vzpkg.api import VE

DEFAULT_TEMPLATE = "debian-12-x86_64"


class VzpkgHooks:
    """Hook specifications of the plugin."""

    @pytest.hookspec(firstresult=True)
    def pytest_vzpkg_make_ve(self, config: pytest.Config, template: VETemplate, params: dict[str, Any],
                             start: bool) -> VE | None:
        """Make the VE a test asked for (`ve`, `ve_factory`): return it (running when START), or None to leave it
        to the next implementation — the plugin's own creates and starts it (VE.create + VE.start).

        The place for a warm-checkpoint fast path: an implementation that boots one VE per (template, params)
        once per session, checkpoints it, and returns `VE.restore(...)` of that checkpoint under an id of this
        process's owner (`vzpkg.api.owner_for(layout).next_id()`), so that teardown and the SIGKILL sweep treat
        it like any other. Whatever it returns is destroyed after the test by the fixture."""


class VETemplate:
    """The session's template: NAME (a cache in CACHE_DIR) and the VZ root VEs are made in (None: the default)."""

    def __init__(self, name: str, cache_dir: Path, root: Path | None) -> None:
        self.name = name
        self.cache_dir = cache_dir
        self.root = root

    def __repr__(self) -> str:
        return f"VETemplate({self.name!r}, cache_dir={str(self.cache_dir)!r}, root={self.root and str(self.root)!r})"


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(VzpkgHooks)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vzpkg", "VEs for tests (vzpkg)")
    group.addoption("--ve-template", default=None, help=f"template of the `ve` fixture (default {DEFAULT_TEMPLATE})")
    group.addoption("--vz-root", default=None, help="VZ root of the test VEs (default $VZ_ROOT or the config)")
    group.addoption("--ve-cache-dir", default=None, help="where the template caches are (default $VZPKG_CACHE_DIR)")
    parser.addini("ve_template", "template of the `ve` fixture", default=None)
    parser.addini("vz_root", "VZ root of the test VEs", default=None)
    parser.addini("ve_cache_dir", "where the template caches are", default=None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ve(template=None, **params): the template and parameters (ram, numproc, "
                                       "cpus, hostname, ...) of the VEs of the `ve` and `ve_factory` fixtures")


def _setting(config: pytest.Config, name: str) -> str | None:
    return config.getoption(f"--{name.replace('_', '-')}") or config.getini(name) or None


def _root(config: pytest.Config) -> Path | None:
    value = _setting(config, "vz_root")
    return Path(value) if value else None


def _sweep(config: pytest.Config) -> None:
    """The VEs of test runs that were killed (their owner's lock is free) on this VZ root."""
    if os.geteuid() != 0:
        return
    try:
        from vzpkg.api import layout_for
        from vzpkg.errors import VzError
        from vzpkg.runtime import owners

        layout = layout_for(_root(config))
        if owners.owners_dir(layout).is_dir():
            owners.sweep(layout)
    except (VzError, OSError) as e:
        config.issue_config_time_warning(pytest.PytestWarning(f"vzpkg: could not sweep leftover VEs: {e}"), 2)


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


_previous_sigterm: Any = None


def pytest_sessionstart(session: pytest.Session) -> None:
    global _previous_sigterm
    _sweep(session.config)
    # `timeout`, CI runners: SIGTERM would skip teardown and leave VEs running
    try:
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            _previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        pass


def pytest_sessionfinish(session: pytest.Session) -> None:
    global _previous_sigterm
    import sys

    api = sys.modules.get("vzpkg.api")
    if api is not None:
        for problem in api.destroy_owned():
            session.config.issue_config_time_warning(pytest.PytestWarning(f"vzpkg: {problem}"), 2)
    if _previous_sigterm is not None:
        signal.signal(signal.SIGTERM, _previous_sigterm)
        _previous_sigterm = None


@pytest.fixture(scope="session")
def ve_template(request: pytest.FixtureRequest) -> VETemplate:
    """The template of the session's VEs, checked once: root is needed, and its cache must exist."""
    if os.geteuid() != 0:
        pytest.skip("VEs need root")
    from vzpkg.api import _cache_dir

    config = request.config
    name = _setting(config, "ve_template") or DEFAULT_TEMPLATE
    cache = _cache_dir(_setting(config, "ve_cache_dir"))
    if not (cache / f"{name}.json").is_file():
        pytest.fail(f"vzpkg: no cache of template {name} in {cache}: build it with 'vzpkg create-cache {name} "
                    f"--cache-dir {cache}', or name another directory (--ve-cache-dir)", pytrace=False)
    return VETemplate(name, cache, _root(config))


class VEFactory:
    """ve_factory(template=None, *, start=True, **params) -> VE; every VE made is destroyed after the test."""

    def __init__(self, config: pytest.Config, template: VETemplate, marker_kwargs: dict[str, Any]) -> None:
        self.config = config
        self.template = template
        self.defaults = dict(marker_kwargs)
        self.made: list[VE] = []

    def __call__(self, template: str | None = None, *, start: bool = True, **params: Any) -> VE:
        defaults = dict(self.defaults)
        name = template or defaults.pop("template", None) or self.template.name
        defaults.pop("template", None)
        tpl = self.template if name == self.template.name else VETemplate(name, self.template.cache_dir,
                                                                          self.template.root)
        merged = {**defaults, **params}
        v = self.config.hook.pytest_vzpkg_make_ve(config=self.config, template=tpl, params=merged, start=start)
        self.made.append(v)
        return v

    def destroy_all(self) -> list[str]:
        from vzpkg.errors import VENotFoundError, VzError

        problems = []
        while self.made:
            v = self.made.pop()
            try:
                v.destroy(force=True)
            except VENotFoundError:
                pass  # the test destroyed it itself
            except VzError as e:
                problems.append(f"VE {v.veid}: {e}")
        return problems


@pytest.hookimpl(trylast=True)
def pytest_vzpkg_make_ve(config: pytest.Config, template: VETemplate, params: dict[str, Any], start: bool) -> VE:
    """The plugin's own: create (an id of this process's owner) and start."""
    from vzpkg.api import VE

    v = VE.create(template=template.name, root=template.root, cache_dir=template.cache_dir, **params)
    if start:
        try:
            v.start()
        except BaseException:
            v.destroy(force=True)
            raise
    return v


def _marker_kwargs(request: pytest.FixtureRequest) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for mark in reversed(list(request.node.iter_markers("ve"))):  # the closest marker wins
        if mark.args:
            kwargs["template"] = mark.args[0]
        kwargs.update(mark.kwargs)
    return kwargs


@pytest.fixture
def ve_factory(request: pytest.FixtureRequest, ve_template: VETemplate):
    factory = VEFactory(request.config, ve_template, _marker_kwargs(request))
    try:
        yield factory
    finally:
        problems = factory.destroy_all()
        if problems:
            pytest.fail("vzpkg: could not destroy: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def ve(ve_factory: VEFactory) -> VE:
    """A running VE of the test's own (template and parameters from @pytest.mark.ve), destroyed afterwards."""
    return ve_factory()
