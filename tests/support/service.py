"""Helpers for the service tests: tiny real checkpoints, a real server in a subprocess, certificates."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-token-0123456789"


def tiny_state_dict(
    seed: int,
    *,
    layers: int = 4,
    hidden: int = 8,
    vocab: int = 12,
    base: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """A small LLaMA-named state dict (``layers`` x 2 matrices + embeddings + norm)."""
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(layers):
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (2 * hidden, hidden)
        shapes[f"model.layers.{i}.mlp.down_proj.weight"] = (hidden, 2 * hidden)
    out = {}
    for k, s in shapes.items():
        noise = torch.randn(s, generator=g)
        out[k] = base[k] + 0.01 * noise if base is not None else 0.02 * noise
    return out


def write_model(folder: Path, sd: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(
        json.dumps(config or {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 4})
    )
    return folder


def make_models(root: Path, n: int = 3, *, layers: int = 4, hidden: int = 8, prefix: str = "m") -> list[Path]:
    """``n`` related checkpoints ``root/<prefix>0`` (base) ... ``root/<prefix>{n-1}``."""
    base = tiny_state_dict(0, layers=layers, hidden=hidden)
    paths = [write_model(root / f"{prefix}0", base)]
    for i in range(1, n):
        paths.append(
            write_model(root / f"{prefix}{i}", tiny_state_dict(i, layers=layers, hidden=hidden, base=base))
        )
    return paths


def linear_recipe(models: list[Path | str], **extra: Any) -> str:
    return yaml.safe_dump(
        {"merge_method": "linear", "models": [{"model": str(m)} for m in models], **extra}, sort_keys=False
    )


def tree_digest(folder: Path) -> str:
    """sha256 over every file name and content below ``folder`` (proves inputs are untouched)."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def partials(root: Path) -> list[Path]:
    """Leftovers of an interrupted writer anywhere below ``root``."""
    return [p for p in root.rglob("*") if ".partial-" in p.name or ".old-" in p.name]


class ServerProcess:
    """``python -m service.cli.service serve`` on 127.0.0.1 with a free port, in a subprocess."""

    def __init__(
        self,
        data_dir: Path,
        roots: list[Path],
        *,
        token: str | None = TOKEN,
        args: list[str] | None = None,
        tls: dict[str, Path] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.roots = roots
        self.token = token
        self.args = list(args or [])
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"

    def command(self) -> list[str]:
        port_file = self.data_dir.parent / f"{self.data_dir.name}.port"
        cmd = [
            sys.executable,
            "-m",
            "service.cli.service",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--data-dir",
            str(self.data_dir),
            "--shutdown-grace",
            "5",
        ]
        for r in self.roots:
            cmd += ["--root", str(r)]
        if self.token:
            cmd += ["--token", self.token]
        if self.tls:
            cmd += ["--tls-cert", str(self.tls["server_cert"]), "--tls-key", str(self.tls["server_key"])]
            if "client_ca" in self.tls:
                cmd += ["--tls-client-ca", str(self.tls["client_ca"])]
        return cmd + self.args

    def start(self, timeout: float = 60.0) -> ServerProcess:
        port_file = self.data_dir.parent / f"{self.data_dir.name}.port"
        port_file.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("WEIGHTSMITH_TOKEN", None)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(self.command(), cwd=str(REPO), env=env, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"server did not start:\n{self.log()}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, token: str | None | bool = True, **kw: Any) -> Any:
        from service.client import Client

        tok = self.token if token is True else (token or None)
        if self.tls and "tls_ca" not in kw:
            kw["tls_ca"] = self.tls["ca"]
        return Client(self.target, token=tok, **kw)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        try:
            self.stop()
        finally:
            self.kill()


def wait_for(pred: Any, timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


def make_certs(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate (openssl CLI)."""
    import shutil

    import pytest

    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=weightsmith-test-ca",
    )
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    )
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
        "-subj",
        "/CN=test-client",
    )
    run(
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "client.pem",
        "-days",
        "2",
    )
    return {
        "ca": folder / "ca.pem",
        "server_cert": folder / "server.pem",
        "server_key": folder / "server.key",
        "client_cert": folder / "client.pem",
        "client_key": folder / "client.key",
    }
