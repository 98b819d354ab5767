"""A template cannot ask jinja for gigabytes (vzpkg/template_sandbox.py): string methods, filters, `%`, `+`, `~`,
loops in macros and at the top. `vzpkg validate` and `create-cache` fail with the template's one-line error
(FILE:LINE, exit 3) while the process stays small (its peak RSS, measured by the kernel, under 200 MB)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vzpkg.config import PROJECT_DIR
from vzpkg.errors import TemplateError
from vzpkg.template import render_file

BASE = """
summary = "test"
description = "test template"
distribution = "debian"
release = "12"
suite = "bookworm"
architecture = "x86_64"
package_manager = "apt"
packages = ["procps"]
repositories = ["deb {{ mirror }} {{ suite }} main"]
"""
PEAK_RSS_MAX = 200 << 20
BIG = "{% set b = 'x' * 1000000 %}"  # the largest string one operation may build

# each asks for gigabytes (or for ever more) in its own way; each must end as a TemplateError naming line 2
PAYLOADS = {
    "ljust": "{{ 'x'.ljust(10**9) }}",
    "rjust": "{{ 'x'.rjust(10**9, '-') }}",
    "center": "{{ 'x'.center(10**9) }}",
    "zfill": "{{ '1'.zfill(10**9) }}",
    "expandtabs": "{{ ('\\t' * 1000).expandtabs(10**6) }}",
    "format": "{{ '{:>999999999}'.format(1) }}",
    "format-nested": "{{ '{:>{}}'.format(1, 10**9) }}",
    "format_map": "{{ '{a:^999999999}'.format_map({'a': 1}) }}",
    "format-many": "{{ ('{0}' * 100000).format('x' * 1000) }}",
    "percent": "{{ '%999999999d' % 1 }}",
    "percent-star": "{{ '%*d' % (999999999, 1) }}",
    "percent-precision": "{{ '%.999999999f' % 1.5 }}",
    "percent-mapping": "{{ '%(a)s%(a)s%(a)s' % {'a': 'x' * 600000} }}",
    "replace-empty": "{{ ('x' * 100000).replace('', 'yyyyyyyyyyyy') }}",
    "replace-loop": "{% set ns = namespace(s='xy') %}{% for i in range(64) %}{% set ns.s = ns.s.replace('x', 'xx') %}"
                    "{% endfor %}",
    "join": "{{ ('x' * 1000).join(['y'] * 100000) }}",
    "join-same-string": BIG + "{{ ''.join([b, b, b, b]) }}",
    "translate": "{{ ('x' * 1000).translate({120: 'y' * 100000}) }}",
    "bytes-ljust": "{{ 'x'.encode().ljust(10**9) }}",
    "concat-doubling": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "plus-doubling": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "list-doubling": "{% set ns = namespace(l=['x' * 1000]) %}{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}"
                     "{% endfor %}{{ ns.l | join }}",
    "list-of-one-string": BIG + "{{ [b] * 1000 }}",
    "list-literal-printed": BIG + "{{ [b, b, b] }}",
    "int-squaring": "{% set ns = namespace(n=10**60) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}"
                    "{% endfor %}",
    "filter-center": "{{ 'x' | center(10**9) }}",
    "filter-indent": "{{ ('x\\n' * 1000) | indent(10**6) }}",
    "filter-format": "{{ '%999999999s' | format('x') }}",
    "filter-replace": "{{ ('x' * 1000) | replace('x', 'y' * 100000) }}",
    "filter-join": "{{ range(100000) | join('x' * 1000) }}",
    "filter-wordwrap": "{{ ('a ' * 1000) | wordwrap(1, wrapstring='x' * 100000) }}",
    "filter-batch": "{{ [1] | batch(10**9, 0) | list }}",
    "filter-slice": "{{ [1] | slice(10**9) | list }}",
    "filter-tojson": "{{ {'a': [1, [2, [3]]]} | tojson(10**9) }}",
    "map-amplifies": "{{ range(100000) | map('center', 1000000) | list | length }}",
    "method-in-a-loop": BIG + "{% for i in range(100000) %}{% set c = b.upper() %}{% endfor %}",
    "lipsum": "{{ lipsum(10**6) }}",
    "output-loops": "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx{% endfor %}{% endfor %}",
    "macro-loops": "{% macro m() %}{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
                   "{% endmacro %}{{ m() }}",
    "set-block-loops": "{% set x %}{% for i in range(100000) %}{% for j in range(1000) %}xxxxxxxxxxxxxxxx{% endfor %}"
                       "{% endfor %}{% endset %}",
    "filter-block": "{% filter upper %}{% for i in range(100000) %}{% for j in range(1000) %}xxxxxxxxxxxxxxxx"
                    "{% endfor %}{% endfor %}{% endfilter %}",
}


def _template_dir(root: Path, name: str, payload: str) -> Path:
    d = root / name
    (d / "files/etc").mkdir(parents=True)
    (d / "template.toml").write_text(BASE)
    (d / "files/etc/motd.j2").write_text("line one\n" + payload + "\n")
    return d


# Starts ARGV from a small process of its own and writes its peak RSS (KiB) to a file. Measured directly, a child
# of the test process starts with the test process's own peak: Linux carries the peak RSS of the memory a process
# had before exec (the forked copy of a pytest process hundreds of MB large) into its ru_maxrss.
_MEASURE = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_pid, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _run_measured(argv: list[str], env: dict[str, str], tmp: Path) -> tuple[int, str, str, int]:
    """(exit status, stdout, stderr, peak RSS in bytes) of ARGV, from the kernel's accounting of that process."""
    peak = tmp / "peak"
    p = subprocess.run([sys.executable, "-c", _MEASURE, str(peak), *argv], env=env, capture_output=True, text=True,
                       cwd=PROJECT_DIR, timeout=300)
    return p.returncode, p.stdout, p.stderr, int(peak.read_text()) * 1024


def test_every_payload_is_one_line_exit_3_and_little_memory(tmp_path: Path) -> None:
    names = {}
    for i, case in enumerate(sorted(PAYLOADS)):
        names[f"bomb{i}-1-x86_64"] = case
        _template_dir(tmp_path, f"bomb{i}-1-x86_64", PAYLOADS[case])
    env = {"VZPKG_TEMPLATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "VZPKG_CONFIG": "/nonexistent"}
    code, out, err, peak = _run_measured([sys.executable, "-m", "vzpkg.cli.vzpkg", "validate"], env, tmp_path)
    assert code == TemplateError.exit_code, err
    assert err == f"vzpkg: error: {len(names)} of {len(names)} templates are invalid\n"
    lines = dict(line.split(": ", 1) for line in out.splitlines())
    for name, case in names.items():
        assert lines[name].startswith(f"{tmp_path / name}/files/etc/motd.j2:2: "), (case, lines[name])
        assert "too large for a template" in lines[name], (case, lines[name])
    assert peak < PEAK_RSS_MAX, f"peak RSS {peak >> 20} MB"


def test_create_cache_stops_at_the_template(tmp_path: Path) -> None:
    d = _template_dir(tmp_path / "t", "bomb-1-x86_64", PAYLOADS["ljust"])
    env = {"VZPKG_TEMPLATE_DIR": str(tmp_path / "t"), "PATH": "/usr/bin:/bin", "VZPKG_CONFIG": "/nonexistent"}
    code, out, err, peak = _run_measured([sys.executable, "-m", "vzpkg.cli.vzpkg", "create-cache", "bomb-1-x86_64",
                                          "--cache-dir", str(tmp_path / "cache"), "-q"], env, tmp_path)
    assert code == TemplateError.exit_code
    assert err.startswith(f"vzpkg: error: {d}/files/etc/motd.j2:2: str.ljust() would make 1000000000 characters")
    assert err.count("\n") == 1 and peak < PEAK_RSS_MAX


def _render(tmp_path: Path, text: str) -> str:
    f = tmp_path / "t.j2"
    f.write_text(text)
    return render_file(f, {"suite": "bookworm"})


def test_ordinary_templates_still_render(tmp_path: Path) -> None:
    text = ("{{ 'x'.ljust(5, '.') }}|{{ '{:>6}'.format(suite) }}|{{ '%-4s|%03d' % ('ab', 7) }}|"
            "{{ suite.replace('o', '0') }}|{{ ', '.join(['a', 'b']) }}|{{ 'a\\nb' | indent(2, true) }}|"
            "{{ '%s-%s' | format(1, 2) }}|{{ [1, 2, 3] | join('+') }}|{{ {'a': 1} | tojson }}|{{ 'ab' ~ 'cd' }}|"
            "{{ [1] + [2] }}|{{ '-' * 3 }}|{% macro m(x) %}<{{ x }}>{% endmacro %}{{ m(1) }}|"
            "{% set s %}set{% endset %}{{ s }}|{{ [1, 2, 3] | batch(2) | list }}|{{ 2 ** 10 }}")
    assert _render(tmp_path, text) == ("x....|bookworm|ab  |007|b00kw0rm|a, b|  a\n  b|1-2|1+2+3|{\"a\": 1}|abcd|"
                                       "[1, 2]|---|<1>|set|[[1, 2], [3]]|1024")


def test_the_largest_value_allowed_renders(tmp_path: Path) -> None:
    assert len(_render(tmp_path, "{{ 'x'.ljust(2**20) }}")) == 2**20
    with pytest.raises(TemplateError, match=r"t\.j2:1: str\.ljust\(\) would make 1048577 characters"):
        _render(tmp_path, "{{ 'x'.ljust(2**20 + 1) }}")


_METHODS = st.sampled_from(["ljust", "rjust", "center", "zfill"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=_METHODS, width=st.integers(min_value=0, max_value=2**40), via_filter=st.booleans())
def test_any_width_is_bounded_or_exact(tmp_path: Path, method: str, width: int, via_filter: bool) -> None:
    """Every width: the exact result up to the bound, the template's error above it; never a larger string."""
    expr = f"'ab' | center({width})" if via_filter and method == "center" else f"'ab'.{method}({width})"
    try:
        out = _render(tmp_path, "{{ " + expr + " }}")
    except TemplateError as e:
        assert width > 2**20 and "too large for a template" in str(e)
    else:
        assert width <= 2**20 and len(out) == max(width, 2)
