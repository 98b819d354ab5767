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

Warm checkpoints (--ve-warm auto|always|never, ini ve_warm; default auto): where CRIU works (`criu check`), a
started VE is restored from a checkpoint of one VE booted and warmed up once per session (per template and
parameters; hostname and ipadd are each VE's own), under an id of this process's owner. `auto` takes that path
when there is something to warm up — a `warmup` command (marker or ve_factory parameter), INIT="distro", or a
pytest_vzpkg_warm_up hook — because a bare VE with the minimal init starts faster than CRIU restores one
(docs/performance.md). The images are removed at session end; those of a run killed with SIGKILL by the next
sweep (they are named after the owner). Any failure on that path: one warning, then create + start.

Hooks:
  pytest_vzpkg_make_ve(config, template, params, start) -> VE | None    (firstresult; see VzpkgHooks)
  pytest_vzpkg_warm_up(config, ve, template, params)                    (every freshly started VE / image)
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

    def pytest_vzpkg_warm_up(self, config: pytest.Config, ve: VE, template: VETemplate, params: dict[str, Any]
                             ) -> None:
        """Prepare a freshly started VE (start services, load data): called on every VE the plugin starts, and
        on the warm path once per checkpoint, before it is taken — the VEs restored from it have what this did,
        already running. A process started here must leave the exec's stdout/stderr (`... >/dev/null 2>&1 &`)."""


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
    group.addoption("--ve-warm", default=None, choices=WARM_MODES,
                    help="VEs restored from a warm checkpoint where CRIU works: auto (when there is a warm-up), "
                         "always, never (default auto)")
    parser.addini("ve_warm", "auto, always or never (see --ve-warm)", default=None)
    parser.addini("ve_template", "template of the `ve` fixture", default=None)
    parser.addini("vz_root", "VZ root of the test VEs", default=None)
    parser.addini("ve_cache_dir", "where the template caches are", default=None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ve(template=None, **params): the template and parameters (ram, numproc, "
                                       "cpus, hostname, ..., warmup=SHELL COMMAND) of the VEs of the `ve` and "
                                       "`ve_factory` fixtures")


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

    warm = session.config.stash.get(_WARM_KEY, None)
    if warm is not None:
        warm.remove_all()
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


WARM_MODES = ("auto", "always", "never")
# parameters each restored VE gets for itself (restore --hostname/--ipadd), not part of the checkpoint's key
_OWN_PARAMS = ("hostname", "ipadd")
# parameters that need a storage layout with a quota (image, btrfs); without them the warm VE is an overlay VE
_QUOTA_PARAMS = ("diskspace", "diskinodes")


class WarmImages:
    """The session's warm checkpoints, one per (template, VZ root, parameters without hostname/ipadd), made on
    first use under dump/<owner token>-warm<n> (owners.sweep removes them when the owner dies)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.images: dict[tuple, Path] = {}
        self.failed: dict[tuple, str] = {}
        self.criu: bool | None = None

    def mode(self) -> str:
        value = _setting(self.config, "ve_warm") or "auto"
        if value not in WARM_MODES:
            raise pytest.UsageError(f"vzpkg: ve_warm = {value!r}: use one of {', '.join(WARM_MODES)}")
        return value

    def wanted(self, params: dict[str, Any]) -> bool:
        mode = self.mode()
        if mode == "never":
            return False
        if mode == "auto" and not (params.get("warmup") or str(params.get("init", "")) == "distro"
                                   or self.config.pluginmanager.hook.pytest_vzpkg_warm_up.get_hookimpls()):
            return False
        return self.criu_works()

    def criu_works(self) -> bool:
        if self.criu is None:
            from vzpkg.errors import VzError
            from vzpkg.runtime import criu, criu_install

            try:
                self.criu = criu_install.check(criu.find())[0]
            except VzError:
                self.criu = False
        return self.criu

    @staticmethod
    def key(template: VETemplate, params: dict[str, Any]) -> tuple:
        rest = tuple(sorted((k, repr(v)) for k, v in params.items() if k not in _OWN_PARAMS))
        return (template.name, str(template.cache_dir), str(template.root), rest)

    def image(self, template: VETemplate, params: dict[str, Any]) -> Path | None:
        """The checkpoint for TEMPLATE and PARAMS (made now if needed), or None if it cannot be made."""
        k = self.key(template, params)
        if k in self.images:
            return self.images[k]
        if k in self.failed:
            return None
        from vzpkg.errors import VzError

        try:
            self.images[k] = self._make(template, params, len(self.images) + len(self.failed) + 1)
            return self.images[k]
        except VzError as e:
            self.fail(k, f"could not make a warm checkpoint ({e})")
            return None

    def fail(self, k: tuple, why: str) -> None:
        import warnings

        self.failed[k] = why
        self.images.pop(k, None)
        warnings.warn(pytest.PytestWarning(f"vzpkg: {why}: VEs of {k[0]} are created and started instead"),
                      stacklevel=2)

    def _make(self, template: VETemplate, params: dict[str, Any], n: int) -> Path:
        from vzpkg.api import VE, owner_for

        base = {k: v for k, v in params.items() if k not in (*_OWN_PARAMS, "warmup")}
        # overlay unless a disk limit needs a layout with a quota: each restored VE then gets its own copy of
        # the checkpoint's image (or btrfs snapshot), with the limit
        layout = {} if any(params.get(k) for k in _QUOTA_PARAMS) else {"fs_layout": "overlay"}
        src = VE.create(template=template.name, root=template.root, cache_dir=template.cache_dir, **layout, **base)
        try:
            src.start(exec_server=False)  # (a server's connection to this process is nothing CRIU can dump)
            _warm_up(self.config, src, template, params)
            target = src.layout.root / "dump" / f"{owner_for(src.layout).token}-warm{n}"
            return src.checkpoint(target, leave_running=True)
        finally:
            src.destroy(force=True)

    def restore(self, template: VETemplate, params: dict[str, Any]) -> VE | None:
        image = self.image(template, params)
        if image is None:
            return None
        from vzpkg.api import VE
        from vzpkg.errors import VzError

        try:
            return VE.restore(image, root=template.root, hostname=params.get("hostname"), ipadd=params.get("ipadd"))
        except VzError as e:
            self.fail(self.key(template, params), f"restoring the warm checkpoint {image} failed ({e})")
            return None

    def remove_all(self) -> None:
        import shutil

        while self.images:
            shutil.rmtree(self.images.popitem()[1], ignore_errors=True)


_WARM_KEY = pytest.StashKey[WarmImages]()


def _warm(config: pytest.Config) -> WarmImages:
    warm = config.stash.get(_WARM_KEY, None)
    if warm is None:
        warm = config.stash[_WARM_KEY] = WarmImages(config)
    return warm


def _warm_up(config: pytest.Config, v: VE, template: VETemplate, params: dict[str, Any]) -> None:
    """The `warmup` command, then the pytest_vzpkg_warm_up hooks, on the freshly started V."""
    cmd = params.get("warmup")
    if cmd:
        v.exec(["/bin/sh", "-c", str(cmd)], check=True, timeout=600)
    config.hook.pytest_vzpkg_warm_up(config=config, ve=v, template=template, params=params)


@pytest.hookimpl(trylast=True)
def pytest_vzpkg_make_ve(config: pytest.Config, template: VETemplate, params: dict[str, Any], start: bool) -> VE:
    """The plugin's own: restored from the session's warm checkpoint (WarmImages), else created (an id of this
    process's owner), started and warmed up."""
    from vzpkg.api import VE

    warm = _warm(config)
    if start and warm.wanted(params):
        v = warm.restore(template, params)
        if v is not None:
            return v
    create = {k: v for k, v in params.items() if k != "warmup"}
    v = VE.create(template=template.name, root=template.root, cache_dir=template.cache_dir, **create)
    if start:
        try:
            v.start()
            _warm_up(config, v, template, params)
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
