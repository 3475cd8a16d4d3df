"""
End to end, groups (#12): real pip and real uv, over TLS (a trustme CA)
and with their own configuration shut out as in L{tests.e2e.test_install},
install through a proxy of three upstreams: C{acme-lib} is private's 1.0,
never public's 99.0, and a merged group installs from both its members.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import pytest_twisted

from tests.conftest import TLS, Running, clean_env
from tests.e2e.test_install import pip_install, run, uv_install
from tests.integration import test_groups as groups
from tests.integration.test_groups import (
    ATTACK_LIB,
    ONLY_PUBLIC,
    PRIVATE_LIB,
    SHARED_THIRD,
    THIRD_OWN,
    Upstreams,
    yaml_text,
)

#: The fake upstreams and the proxy factory of the integration tests.
upstreams = groups.upstreams
start = groups.start

INSTALLERS = {"pip": pip_install, "uv": uv_install}


async def versions(target: Path, *modules: str) -> list[str]:
    """
    C{VERSION} of each module installed in C{target}, imported by a fresh
    interpreter.
    """
    code = f"import {', '.join(modules)}; print({', '.join(m + '.VERSION' for m in modules)})"
    script = f"import sys; sys.path.insert(0, {str(target)!r}); {code}"
    out = await run([sys.executable, "-I", "-c", script], clean_env())
    return out.split()


@pytest.mark.parametrize("client", ["pip", "uv"])
@pytest_twisted.ensureDeferred
async def test_install_gets_private_never_public(
    client: str, upstreams: Upstreams, start: Callable[..., Running], tls: TLS, tmp_path: Path
) -> None:
    """
    Through the default group, with C{acme-*} routed to private, the
    client installs private's acme-lib 1.0 (public has 99.0), and public
    is never asked about acme-lib, its page or its file.
    """
    running = start(yaml_text(upstreams, tmp_path), endpoint=tls.endpoint())
    index = f"https://localhost:{running.port.getHost().port}/simple/"
    await INSTALLERS[client](index, tls, tmp_path / "t", "acme-lib")
    assert await versions(tmp_path / "t", "acme_lib") == ["1.0"]
    assert upstreams.private.fake.requests["/packages/" + PRIVATE_LIB.filename] == 1
    assert [p for p, _ in upstreams.public.fake.seen if "acme" in p] == []
    assert upstreams.public.fake.requests["/packages/" + ATTACK_LIB.filename] == 0


@pytest_twisted.ensureDeferred
async def test_uv_installs_from_a_merged_page(
    upstreams: Upstreams, start: Callable[..., Running], tls: TLS, tmp_path: Path
) -> None:
    """
    uv installs C{shared} from the merged group [public, third]: 1.1, which
    only third lists, with its dependency widget, which only public has;
    third's file that conflicts with public's is never fetched.
    """
    running = start(yaml_text(upstreams, tmp_path), endpoint=tls.endpoint())
    index = f"https://localhost:{running.port.getHost().port}/merged/simple/"
    await uv_install(index, tls, tmp_path / "t", "shared")
    assert await versions(tmp_path / "t", "shared", "widget") == ["1.1", "3.0"]
    assert upstreams.third.fake.requests["/packages/" + THIRD_OWN.filename] == 1
    assert upstreams.public.fake.requests["/packages/" + ONLY_PUBLIC.filename] == 1
    assert upstreams.third.fake.requests["/packages/" + SHARED_THIRD.filename] == 0


@pytest_twisted.ensureDeferred
async def test_install_after_private_went_down_gets_private_stale_never_public(
    upstreams: Upstreams, start: Callable[..., Running], tls: TLS, tmp_path: Path
) -> None:
    """
    No route: pip installs acme-lib 1.0 from private; then private's port
    closes, and uv, asking again (private's pages are never fresh:
    index-ttl 0), still installs 1.0, from the stale page and the cached
    file; public is never asked about acme-lib.
    """
    running = start(
        yaml_text(upstreams, tmp_path, routes=False, private="    index-ttl: 0"), endpoint=tls.endpoint()
    )
    index = f"https://localhost:{running.port.getHost().port}/simple/"
    await pip_install(index, tls, tmp_path / "a", "acme-lib")
    await upstreams.private.port.stopListening()
    out = await uv_install(index, tls, tmp_path / "b", "acme-lib")
    assert await versions(tmp_path / "b", "acme_lib") == ["1.0"], out
    assert upstreams.private.fake.requests["/packages/" + PRIVATE_LIB.filename] == 1
    assert [p for p, _ in upstreams.public.fake.seen if "acme" in p] == []
