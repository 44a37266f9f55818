"""Host code reading a tree a sandbox made (a layer from a build step) follows no link in it."""

from __future__ import annotations

import os
from pathlib import Path

from bilik.runtime.fsutil import read_beneath


def test_read_beneath_follows_no_link(tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "passwd").write_text("host-secret\n")
    layer = tmp_path / "layer"
    layer.mkdir()
    # /etc a link out of the layer (as a build step can leave it): not read.
    (layer / "etc").symlink_to(host)
    assert read_beneath(layer, "etc/passwd") is None
    # /etc/passwd a link, or a FIFO (which would block a plain open): not read either.
    (layer / "etc").unlink()
    (layer / "etc").mkdir()
    (layer / "etc" / "passwd").symlink_to(host / "passwd")
    assert read_beneath(layer, "etc/passwd") is None
    (layer / "etc" / "passwd").unlink()
    os.mkfifo(layer / "etc" / "passwd")
    assert read_beneath(layer, "etc/passwd") is None
    (layer / "etc" / "passwd").unlink()
    (layer / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    assert read_beneath(layer, "etc/passwd") == b"root:x:0:0::/root:/bin/sh\n"
