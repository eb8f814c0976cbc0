"""stripe-mock: Stripe's API answered from its OpenAPI fixtures (stateless, no
webhooks). Installed with `go install` at a pinned version."""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

from smi.settings import Settings
from smi.stack import probes
from smi.stack.component import Component, not_loopback
from smi.stack.layout import Layout

MODULE = "github.com/stripe/stripe-mock"
VERSION = "v0.203.0"
# stripe-mock accepts any test-mode key; the check does not depend on STRIPE_API_KEY.
PROBE_KEY = "sk_test_123"


def binary_path() -> Path:
    """Where `go install` puts the binary: $GOBIN, else $(go env GOPATH)/bin."""
    gobin, gopath = _go_env("GOBIN", "GOPATH")
    return Path(gobin or Path(gopath) / "bin") / "stripe-mock"


def ensure_binary() -> Path:
    """The pinned stripe-mock, installed unless the binary there already is that version."""
    if shutil.which("go") is None:
        raise RuntimeError("go not found: install Go to build stripe-mock")
    binary = binary_path()
    if binary.is_file() and _built_version(binary) == VERSION:
        return binary
    result = subprocess.run(["go", "install", f"{MODULE}@{VERSION}"], capture_output=True, text=True,
                            env={**os.environ, "GOFLAGS": "-mod=mod"})
    if result.returncode != 0:
        raise RuntimeError(f"go install {MODULE}@{VERSION} failed:\n{result.stdout}{result.stderr}")
    return binary


def _built_version(binary: Path) -> str | None:
    """The module version recorded in the binary (`go version -m`)."""
    result = subprocess.run(["go", "version", "-m", str(binary)], capture_output=True, text=True)
    for line in result.stdout.splitlines():
        fields = line.split()
        if fields[:2] == ["mod", MODULE] and len(fields) >= 3:
            return fields[2]
    return None


def _go_env(*names: str) -> list[str]:
    result = subprocess.run(["go", "env", *names], capture_output=True, text=True, check=True)
    return result.stdout.splitlines()


def prepare(host: str, port: int) -> list[str]:
    # HTTPS sits on the next port, as in stripe-mock's defaults (12111/12112).
    return [str(ensure_binary()), "-http-addr", f"{host}:{port}", "-https-addr", f"{host}:{port + 1}"]


def component(settings: Settings, layout: Layout) -> Component:
    base = settings.stripe_api_base.rstrip("/")
    url = urlsplit(base)
    host, port = url.hostname or "127.0.0.1", url.port or (443 if url.scheme == "https" else 80)
    if url.scheme != "http":
        cannot_start = "STRIPE_API_BASE is not http://; the local stripe-mock is served over plain HTTP"
    else:
        cannot_start = not_loopback(host, "STRIPE_API_BASE")
    check = partial(probes.http_ok, f"{base}/v1/charges", {"Authorization": f"Bearer {PROBE_KEY}"})
    return Component(
        name="stripe-mock",
        program="stripe-mock",
        host=host,
        port=port,
        answers=check,
        ready=check,
        prepare=partial(prepare, host, port),
        cannot_start=cannot_start,
    )


if __name__ == "__main__":
    # .ci/run installs the pinned binary as a step of its own.
    print(ensure_binary())
