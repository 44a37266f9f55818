"""The SDK's API page is what its docstrings say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_sdk_page_is_current(tmp_path: Path) -> None:
    out = tmp_path / "sdk.md"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen-sdk-docs.py"), str(out)], check=True
    )
    assert out.read_text() == (ROOT / "docs" / "sdk.md").read_text(), (
        "docs/sdk.md is stale: run scripts/gen-sdk-docs.py"
    )


def test_every_public_call_is_documented() -> None:
    page = (ROOT / "docs" / "sdk.md").read_text()
    undocumented = [
        line for line in page.splitlines() if line.startswith("- `") and line.endswith("(class)")
    ]
    assert not undocumented, undocumented
