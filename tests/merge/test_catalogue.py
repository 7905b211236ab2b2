"""The committed method catalogue (merge/methods/catalogue.json) is the registry's, and listing it imports no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from merge.catalogue import CATALOGUE, build_catalogue, read_catalogue

ROOT = Path(__file__).resolve().parents[2]


def test_the_committed_catalogue_is_the_registrys() -> None:
    built = json.loads(json.dumps(build_catalogue(), default=str))
    assert CATALOGUE.exists()
    assert read_catalogue() == built, "merge/methods/catalogue.json is stale: run `python -m merge.catalogue`"


def test_weightsmith_methods_imports_no_torch() -> None:
    code = ("import sys; from click.testing import CliRunner; from service.cli.main import main; "
            "r = CliRunner().invoke(main, ['methods']); assert r.exit_code == 0 and 'ties' in r.output; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
